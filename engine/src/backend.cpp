#include "engine/backend.h"

#include <algorithm>

#include "engine/assignments.h"
#include "engine/error.h"
#include "engine/mixed_precision.h"

namespace fm {

Tensor Backend::zeros(Shape shape, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  fill(t, 0.0);
  return t;
}

Tensor Backend::to_host(const Tensor& x) {
  Tensor h = Tensor::empty(x.shape(), x.dtype(), Device::cpu());
  copy(h, x);
  return h;
}

void Backend::sample_rows(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&,
                          const SamplingParams&) {
  throw Error(
      fmt::format("{} backend: sample_rows: no device sampling here (samples_on_device() "
                  "is false: sample on the host, model/sampling.h)",
                  name()));
}

void Backend::convert(Tensor& dst, const Tensor& src) {
  FM_CHECK(dst.shape() == src.shape(), "convert: dst {} and src {} differ in shape", dst.describe(),
           src.describe());
  for (const Tensor* t : {static_cast<const Tensor*>(&dst), &src})
    FM_CHECK(t->dtype() == DType::f32 || t->dtype() == DType::f64 || t->dtype() == DType::bf16,
             "convert: {} is not a float tensor this engine converts (f32, f64, bf16)",
             t->describe());
  if (dst.dtype() == src.dtype()) return copy(dst, src);
  if (dst.is_cpu() && src.is_cpu()) return host_convert(dst, src);
  const Tensor h = to_host(src);
  Tensor out = Tensor::empty(dst.shape(), dst.dtype(), Device::cpu());
  host_convert(out, h);
  copy(dst, out);
}

Tensor Backend::upload(const std::vector<double>& host, Shape shape, DType dtype) {
  FM_CHECK(shape_numel(shape) == static_cast<int64_t>(host.size()),
           "upload: {} values for shape {}", host.size(), shape_str(shape));
  FM_CHECK(dtype == DType::f32 || dtype == DType::f64 || dtype == DType::bf16,
           "upload: float data needs f32, f64 or bf16, not {}", dtype_name(dtype));
  Tensor h = Tensor::empty(shape, dtype, Device::cpu());
  for (size_t i = 0; i < host.size(); ++i) host_float_set(h, static_cast<int64_t>(i), host[i]);
  Tensor d = empty(std::move(shape), dtype);
  copy(d, h);
  return d;
}

Tensor Backend::upload(const std::vector<int32_t>& host, Shape shape) {
  FM_CHECK(shape_numel(shape) == static_cast<int64_t>(host.size()),
           "upload: {} values for shape {}", host.size(), shape_str(shape));
  Tensor h = Tensor::view(const_cast<int32_t*>(host.data()), shape, DType::i32);
  Tensor d = empty(std::move(shape), DType::i32);
  copy(d, h);
  return d;
}

std::vector<double> Backend::download_f64(const Tensor& x) {
  Tensor h = to_host(x);
  FM_CHECK(h.dtype() == DType::f32 || h.dtype() == DType::f64 || h.dtype() == DType::bf16,
           "download_f64: {} is not a float tensor", h.describe());
  std::vector<double> out(static_cast<size_t>(h.numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = host_float_at(h, static_cast<int64_t>(i));
  return out;
}

std::vector<int32_t> Backend::download_i32(const Tensor& x) {
  Tensor h = to_host(x);
  return std::vector<int32_t>(h.data<int32_t>(), h.data<int32_t>() + h.numel());
}

void Backend::grouped_matmul_device(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                                    const Tensor& off) {
  FM_CHECK(off.dtype() == DType::i32 && off.rank() == 1,
           "grouped_matmul_device: off must be an i32 vector but is {}", off.describe());
  const std::vector<int32_t> host = download_i32(off);
  grouped_matmul(y, x, w, trans_w, std::vector<int64_t>(host.begin(), host.end()));
}

void Backend::sort_assignments(Tensor& offsets, Tensor& perm_assign, Tensor& perm_token,
                               const Tensor& key) {
  const char* op = "sort_assignments";
  FM_CHECK(key.dtype() == DType::i32 && key.rank() == 2,
           "{}: key must be an i32 [N, K] tensor but is {}", op, key.describe());
  const int64_t nk = key.numel();
  FM_CHECK(offsets.dtype() == DType::i32 && offsets.rank() == 1 && offsets.dim(0) >= 1,
           "{}: offsets must be an i32 [G + 1] tensor but is {}", op, offsets.describe());
  for (const Tensor* t : {&perm_assign, &perm_token})
    FM_CHECK(t->dtype() == DType::i32 && t->shape() == Shape{nk},
             "{}: the permutations must be i32 [{}] tensors but one is {}", op, nk, t->describe());
  const AssignmentOrder o =
      sort_assignments_host(download_i32(key), offsets.dim(0) - 1, key.dim(1), op);
  std::vector<int32_t> starts(o.offsets.begin(), o.offsets.end());
  copy(offsets, upload(starts, {offsets.dim(0)}));
  copy(perm_assign, upload(o.assign, {nk}));
  copy(perm_token, upload(o.token, {nk}));
}

void Backend::scale_rows(Tensor& out, const Tensor& x, const Tensor& w) {
  FM_CHECK(x.rank() == 2 && w.rank() == 1 && w.dim(0) == x.dim(0) && out.shape() == x.shape(),
           "scale_rows: x {} w {} out {} do not agree", x.describe(), w.describe(), out.describe());
  std::vector<int32_t> identity(static_cast<size_t>(x.dim(0)));
  for (size_t i = 0; i < identity.size(); ++i) identity[i] = static_cast<int32_t>(i);
  const Tensor idx = upload(identity, {x.dim(0)});
  fill(out, 0.0);
  scatter_add_rows(out, x, idx, w);
}

DeviceChoice parse_device(const std::string& name) {
  if (name == "cpu") return {};
  if (name == "cuda") return {DeviceKind::cuda, -1};
  const std::string prefix = "cuda:";
  if (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0) {
    const std::string digits = name.substr(prefix.size());
    const bool numeric =
        digits.size() <= 4 &&
        std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (numeric) return {DeviceKind::cuda, std::stoi(digits)};
  }
  throw Error(fmt::format("device '{}': expected cpu, cuda or cuda:N (N a GPU index)", name));
}

std::unique_ptr<Backend> make_backend(const std::string& name, int local_rank) {
  const DeviceChoice d = parse_device(name);
  if (d.kind == DeviceKind::cpu) return make_cpu_backend();
  const int count = cuda_device_count();
#ifdef FOREMOE_HAVE_CUDA
  const char* why = "no CUDA GPU is visible to this process";
#else
  const char* why = "this foremoe build has no CUDA backend (configured without a CUDA toolkit)";
#endif
  FM_CHECK(count > 0, "device '{}': {}", name, why);
  FM_CHECK(d.index < count, "device '{}': only {} CUDA GPU(s) visible", name, count);
  return make_cuda_backend(d.index >= 0 ? d.index : local_rank % count);
}

}  // namespace fm
