// Argument checks for the CPU backend's ops: each message names the op, the
// tensor and what was expected, e.g.
//   "rmsnorm_forward: w must be f32[64] but is f32[32] on cpu".
#pragma once

#include <climits>
#include <cstdint>
#include <vector>

#include "engine/error.h"
#include "engine/tensor.h"

namespace fm::cpu {

// Argument checks for one op; every message names the op and the tensor.
class ArgCheck {
 public:
  explicit ArgCheck(const char* op) : op_(op) {}
  const char* op() const { return op_; }

  void cpu(const char* name, const Tensor& t) const {
    FM_CHECK(t.defined(), "{}: {} is undefined", op_, name);
    FM_CHECK(t.is_cpu(), "{}: {} must be on cpu but is {}", op_, name, t.describe());
  }
  // The float dtype (f32 or f64) of `t`, which the op's other float tensors must share. bf16
  // arguments never get here: the op runs its f32 form on their widened copies.
  DType float_dtype(const char* name, const Tensor& t, int rank) const {
    cpu(name, t);
    FM_CHECK((t.dtype() == DType::f32 || t.dtype() == DType::f64) && t.rank() == rank,
             "{}: {} must be an f32, f64 or bf16 tensor of rank {} but is {}", op_, name, rank,
             t.describe());
    return t.dtype();
  }
  void is(const char* name, const Tensor& t, DType dtype, const Shape& shape) const {
    cpu(name, t);
    FM_CHECK(t.dtype() == dtype && t.shape() == shape, "{}: {} must be {}{} but is {}", op_, name,
             dtype_name(dtype), shape_str(shape), t.describe());
  }
  void same(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) const {
    cpu(name, t);
    FM_CHECK(t.dtype() == ref.dtype() && t.shape() == ref.shape(),
             "{}: {} must match {} ({}) but is {}", op_, name, ref_name, ref.describe(),
             t.describe());
  }
  // Every id in [0, bound).
  void ids_below(const char* name, const Tensor& ids, int64_t bound) const {
    const int32_t* p = ids.data<int32_t>();
    for (int64_t i = 0; i < ids.numel(); ++i)
      FM_CHECK(p[i] >= 0 && p[i] < bound, "{}: {}[{}] = {} is out of range [0, {})", op_, name, i,
               p[i], bound);
  }
  void fits_int(const char* what, int64_t v) const {
    FM_CHECK(v <= INT_MAX, "{}: {} = {} is too large for BLAS (max {})", op_, what, v, INT_MAX);
  }
  // Row offsets of G groups over `rows` rows: off[0] = 0, non-decreasing, off[G] = rows.
  void group_offsets(const std::vector<int64_t>& off, int64_t groups, int64_t rows) const {
    FM_CHECK(static_cast<int64_t>(off.size()) == groups + 1,
             "{}: off must have G + 1 = {} entries but has {}", op_, groups + 1, off.size());
    FM_CHECK(off.front() == 0 && off.back() == rows, "{}: off must run from 0 to {} but is {}..{}",
             op_, rows, off.front(), off.back());
    for (int64_t g = 0; g < groups; ++g)
      FM_CHECK(off[g] <= off[g + 1],
               "{}: off must be non-decreasing but off[{}] = {} > off[{}] = {}", op_, g, off[g],
               g + 1, off[g + 1]);
  }

 private:
  const char* op_;
};

}  // namespace fm::cpu
