// CudnnSdpa (cudnn_sdpa.h) on cuDNN's backend API (through cudnn_graph.h). The graphs are the ones
// cuDNN's runtime fusion engines match as flash attention (the same op sequence cudnn-frontend's
// composite SDPA nodes lower to for a padding mask, a top-left causal mask and statistics):
//
// forward   S = Q K^T (M, N overridden by the lengths); S *= scale; padding mask (row <
//           len and col < len, else the fill); causal mask (row >= col); M = rowmax S;
//           E = exp(S - M); Z = rowsum E; lse = M + log Z; P = E / Z (bf16); O = P V.
// backward  sum = rowsum(dO * O) * 1; S as above, masked by padding; S -= lse; causal mask;
//           P = exp(S); dV = P^T dO; dP = dO V^T; dS = (dP - sum) * P * scale;
//           dK = dS^T Q; dQ = dS K. With grouped-query heads dK and dV are computed per query
//           head and summed over each group by a reduction.
//
// K (and V in the backward) enter as transposed views, [B, H, D, S] with the strides of
// the two last axes swapped; P^T and dS^T are reshapes that swap the strides the same way.
// All scalars (scale, the mask fill, 1) are by-value host floats.
//
// Variants, tried in order for each problem until one has an engine that finalises:
// deterministic (dQ written by its matmul directly) before dQ accumulated in an f32
// workspace buffer (atomics inside cuDNN), and a fill of -inf before the lowest float (what
// older cuDNN versions wanted). Which one runs is kept with the plan.
//
// Checked without a GPU (tests/engine/cuda_cudnn_attention_test.cpp, CudnnSdpaGraph): every
// descriptor finalises, and for an H100 described to cuDNN (its device-properties descriptor)
// the heuristics' flash attention engines accept both graphs and compile them for sm_90.
#include "engine/cuda/cudnn_sdpa.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <array>
#include <limits>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "engine/cuda/cudnn_graph.h"
#include "engine/error.h"

namespace fm::cuda {

namespace {

using cudnn::describe;
using cudnn::Descriptor;
using cudnn::Dims;
using cudnn::refuse_unless;
using cudnn::Refused;

// The tensors the caller binds (their unique ids); virtual tensors count up from kFirstVirtual.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kDO,
  kDQ,
  kDK,
  kDV,
  kSeqLenQ,
  kSeqLenKV,
  kOffQO,
  kOffKV,
  kOffStats,
  kScale,
  kFillPadding,
  kFillCausal,
  kOne,
  kSoftmaxSum,  // backward: rowsum(dO * O), an f32 buffer at the front of the workspace
  kDQAccum,     // backward, non-deterministic variant: f32 dQ before its conversion
  kFirstVirtual = 100,
};

struct Variant {
  bool deterministic = true;
  bool lowest_fill = false;
};

// The forward or backward attention graph of one problem (and variant).
class SdpaGraph : public cudnn::OpGraph {
 public:
  SdpaGraph(const SdpaProblem& p, Variant v) : OpGraph(kFirstVirtual), p_(p), v_(v) {}

  // --- the shared pieces of both graphs ---------------------------------------------------

  // The caller's tensors in the packed THD layout (see the header), and the scalars.
  void declare_inputs() {
    const int64_t b = p_.batch, s = p_.max_len, hq = p_.hq, hk = p_.hkv, d = p_.dim;
    const Dims ones{1, 1, 1, 1};
    seq_q_ = &tensor(kSeqLenQ, CUDNN_DATA_INT32, {b, 1, 1, 1}, ones);
    seq_kv_ = &tensor(kSeqLenKV, CUDNN_DATA_INT32, {b, 1, 1, 1}, ones);
    off_qo_ = &tensor(kOffQO, CUDNN_DATA_INT64, {b + 1, 1, 1, 1}, ones);
    off_kv_ = &tensor(kOffKV, CUDNN_DATA_INT64, {b + 1, 1, 1, 1}, ones);
    off_stats_ = &tensor(kOffStats, CUDNN_DATA_INT64, {b + 1, 1, 1, 1}, ones);
    q_ = &q_like(kQ);
    // K^T: [B, Hk, D, S] over the [N, Hk, D] rows.
    kt_ = &tensor(kK, CUDNN_DATA_BFLOAT16, {b, hk, d, s}, {s * hk * d, d, 1, hk * d}, false, false,
                  off_kv_);
    stats_ = &tensor(kStats, CUDNN_DATA_FLOAT, {b, hq, s, 1}, {s * hq, 1, hq, 1}, false, false,
                     off_stats_);
    scale_ = &scalar(kScale);
    fill_padding_ = &scalar(kFillPadding);
    fill_causal_ = &scalar(kFillCausal);
  }
  const Descriptor& q_like(int64_t uid) {  // q, out, dout, dq: [B, Hq, S, D]
    const int64_t s = p_.max_len, hq = p_.hq, d = p_.dim;
    return tensor(uid, CUDNN_DATA_BFLOAT16, {p_.batch, hq, s, d}, {s * hq * d, d, hq * d, 1}, false,
                  false, off_qo_);
  }
  const Descriptor& kv_like(int64_t uid) {  // v, dk, dv: [B, Hk, S, D]
    const int64_t s = p_.max_len, hk = p_.hkv, d = p_.dim;
    return tensor(uid, CUDNN_DATA_BFLOAT16, {p_.batch, hk, s, d}, {s * hk * d, d, hk * d, 1}, false,
                  false, off_kv_);
  }
  Dims score_dims() const { return {p_.batch, p_.hq, p_.max_len, p_.max_len}; }
  Dims score_strides() const {
    const int64_t s = p_.max_len;
    return {p_.hq * s * s, s * s, s, 1};
  }
  Dims row_dims() const { return {p_.batch, p_.hq, p_.max_len, 1}; }
  Dims row_strides() const { return {p_.hq * p_.max_len, p_.max_len, 1, 1}; }
  const Descriptor& score(cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    return virt(type, score_dims(), score_strides());
  }
  const Descriptor& row() { return virt(CUDNN_DATA_FLOAT, row_dims(), row_strides()); }
  // The transposed [B, Hq, S_k, S_q] view of a score matrix, in bf16 (the matmuls' input type).
  const Descriptor& score_transposed() {
    const int64_t s = p_.max_len;
    return virt(CUDNN_DATA_BFLOAT16, score_dims(), {p_.hq * s * s, s * s, 1, s});
  }

  // S = scale * Q K^T, then rows and columns past the lengths set to the fill.
  const Descriptor& scaled_padded_scores() {
    const Descriptor& s0 = score();
    matmul(*q_, *kt_, s0, seq_q_, seq_kv_, nullptr);
    const Descriptor& s1 = score();
    binary(CUDNN_POINTWISE_MUL, s0, *scale_, s1);
    const Descriptor& row_index = score(CUDNN_DATA_INT32);
    const Descriptor& col_index = score(CUDNN_DATA_INT32);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s1, nullptr, nullptr, row_index, 2);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s1, nullptr, nullptr, col_index, 3);
    const Descriptor& row_in = score(CUDNN_DATA_BOOLEAN);
    const Descriptor& col_in = score(CUDNN_DATA_BOOLEAN);
    const Descriptor& inside = score(CUDNN_DATA_BOOLEAN);
    pointwise(CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, row_index, seq_q_, nullptr, row_in);
    pointwise(CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, col_index, seq_kv_, nullptr, col_in);
    pointwise(CUDNN_POINTWISE_LOGICAL_AND, CUDNN_DATA_BOOLEAN, row_in, &col_in, nullptr, inside);
    const Descriptor& s2 = score();
    pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s1, fill_padding_, &inside, s2);
    return s2;
  }

  // Keys after the query (column > row) set to the fill.
  const Descriptor& causal(const Descriptor& s) {
    const Descriptor& row_index = score(CUDNN_DATA_INT32);
    const Descriptor& col_index = score(CUDNN_DATA_INT32);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, s, nullptr, nullptr, row_index, 2);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, s, nullptr, nullptr, col_index, 3);
    const Descriptor& visible = score(CUDNN_DATA_BOOLEAN);
    pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row_index, &col_index, nullptr, visible);
    const Descriptor& out = score();
    pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s, fill_causal_, &visible, out);
    return out;
  }

  // c (Hk heads) = a b computed per query head, summed over each head group when Hq > Hk.
  void matmul_to_kv_heads(const Descriptor& a, const Descriptor& b, const Descriptor& c) {
    if (p_.hq == p_.hkv) {
      matmul(a, b, c, seq_kv_, nullptr, seq_q_);
      return;
    }
    const int64_t s = p_.max_len, d = p_.dim;
    const Descriptor& full =
        virt(CUDNN_DATA_BFLOAT16, {p_.batch, p_.hq, s, d}, {p_.hq * s * d, s * d, d, 1});
    matmul(a, b, full, seq_kv_, nullptr, seq_q_);
    reduction(CUDNN_REDUCE_TENSOR_ADD, full, c);
  }

  void build_forward() {
    declare_inputs();
    const Descriptor& v = kv_like(kV);
    const Descriptor& o = q_like(kO);
    const Descriptor& s = causal(scaled_padded_scores());
    const Descriptor& m = row();
    reduction(CUDNN_REDUCE_TENSOR_MAX, s, m);
    const Descriptor& shifted = score();
    binary(CUDNN_POINTWISE_SUB, s, m, shifted);
    const Descriptor& e = score();
    unary(CUDNN_POINTWISE_EXP, shifted, e);
    const Descriptor& z = row();
    reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
    const Descriptor& log_z = row();
    unary(CUDNN_POINTWISE_LOG, z, log_z);
    binary(CUDNN_POINTWISE_ADD, m, log_z, *stats_);
    const Descriptor& probs = score(CUDNN_DATA_BFLOAT16);
    binary(CUDNN_POINTWISE_DIV, e, z, probs);
    matmul(probs, v, o, seq_q_, nullptr, seq_kv_);
  }

  void build_backward() {
    declare_inputs();
    const int64_t b = p_.batch, s = p_.max_len, hq = p_.hq, hk = p_.hkv, d = p_.dim;
    // V^T: [B, Hk, D, S], as K^T.
    const Descriptor& vt = tensor(kV, CUDNN_DATA_BFLOAT16, {b, hk, d, s},
                                  {s * hk * d, d, 1, hk * d}, false, false, off_kv_);
    const Descriptor& o = q_like(kO);
    const Descriptor& dout = q_like(kDO);
    const Descriptor& dq = q_like(kDQ);
    const Descriptor& dk = kv_like(kDK);
    const Descriptor& dv = kv_like(kDV);
    const Descriptor& one = scalar(kOne);
    const Descriptor& softmax_sum =
        tensor(kSoftmaxSum, CUDNN_DATA_FLOAT, row_dims(), row_strides());

    // sum = rowsum(dO * O) (the softmax backward's per-row dot)
    const Descriptor& products =
        virt(CUDNN_DATA_FLOAT, {b, hq, s, d}, {hq * s * d, s * d, hq * d, 1});
    binary(CUDNN_POINTWISE_MUL, dout, o, products);
    const Descriptor& dot = row();
    reduction(CUDNN_REDUCE_TENSOR_ADD, products, dot);
    binary(CUDNN_POINTWISE_MUL, dot, one, softmax_sum);

    // P recomputed from the statistics.
    const Descriptor& padded = scaled_padded_scores();
    const Descriptor& shifted = score();
    binary(CUDNN_POINTWISE_SUB, padded, *stats_, shifted);
    const Descriptor& masked = causal(shifted);
    const Descriptor& probs = score();
    unary(CUDNN_POINTWISE_EXP, masked, probs);

    // dV = P^T dO
    const Descriptor& probs_t = score_transposed();
    reshape(probs, probs_t);
    matmul_to_kv_heads(probs_t, dout, dv);

    // dS = (dO V^T - sum) * P * scale
    const Descriptor& dp = score();
    matmul(dout, vt, dp, seq_q_, seq_kv_, nullptr);
    const Descriptor& centred = score();
    binary(CUDNN_POINTWISE_SUB, dp, softmax_sum, centred);
    const Descriptor& weighted = score();
    binary(CUDNN_POINTWISE_MUL, centred, probs, weighted);
    const Descriptor& ds = score();
    binary(CUDNN_POINTWISE_MUL, weighted, *scale_, ds);

    // dK = dS^T Q
    const Descriptor& ds_t = score_transposed();
    reshape(ds, ds_t);
    matmul_to_kv_heads(ds_t, *q_, dk);

    // dQ = dS K, K back in its [B, Hk, S, D] layout
    const Descriptor& k_rows =
        virt(CUDNN_DATA_FLOAT, {b, hk, s, d}, {s * hk * d, d, hk * d, 1}, off_kv_);
    reshape(*kt_, k_rows);
    if (v_.deterministic) {
      matmul(ds, k_rows, dq, seq_q_, nullptr, seq_kv_);
    } else {
      const Descriptor& accum =
          tensor(kDQAccum, CUDNN_DATA_FLOAT, {b, hq, s, d}, {hq * s * d, s * d, d, 1});
      matmul(ds, k_rows, accum, seq_q_, nullptr, seq_kv_);
      unary(CUDNN_POINTWISE_IDENTITY, accum, dq);
    }
  }

 private:
  SdpaProblem p_;
  Variant v_;
  const Descriptor *seq_q_ = nullptr, *seq_kv_ = nullptr;
  const Descriptor *off_qo_ = nullptr, *off_kv_ = nullptr, *off_stats_ = nullptr;
  const Descriptor *q_ = nullptr, *kt_ = nullptr, *stats_ = nullptr;
  const Descriptor *scale_ = nullptr, *fill_padding_ = nullptr, *fill_causal_ = nullptr;
};

constexpr size_t kAlign = 256;
size_t aligned(size_t bytes) {
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

}  // namespace

struct CudnnSdpa::Impl {
  struct Plan {
    std::vector<std::unique_ptr<Descriptor>> descriptors;  // everything the plan refers to
    std::unique_ptr<Descriptor> plan;
    Variant variant;
    int64_t engine = -1;  // cuDNN's global engine index
    size_t cudnn_workspace = 0;
    size_t softmax_sum_bytes = 0, dq_accum_bytes = 0;  // backward: f32 buffers in front
    size_t total() const { return softmax_sum_bytes + dq_accum_bytes + cudnn_workspace; }
  };
  using Key = std::array<int64_t, 6>;
  // Plans kept at most; past it the cache starts over (a plan costs a heuristic query and
  // a kernel compilation, so the S bound is rounded to powers of two to keep this small).
  static constexpr size_t kMaxPlans = 256;

  cudnnHandle_t handle = nullptr;
  std::map<Key, Plan> plans;
  std::map<Key, std::string> refused;

  static Key key(const SdpaProblem& p) {
    return {p.backward ? 1 : 0, p.batch, p.max_len, p.hq, p.hkv, p.dim};
  }
};

bool CudnnSdpa::available() {
  return true;
}

SdpaCheck CudnnSdpa::check_graph(const SdpaProblem& p, bool deterministic,
                                 const std::string& device_json) {
  SdpaCheck check;
  try {
    SdpaGraph g(p, Variant{deterministic, false});
    if (p.backward)
      g.build_backward();
    else
      g.build_forward();
    check.operations = g.operations();
    if (device_json.empty()) {
      g.graph(nullptr);
      return check;
    }
    Descriptor device(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR);
    device.set(CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION, CUDNN_TYPE_CHAR,
               static_cast<int64_t>(device_json.size()), device_json.data());
    device.finalize("the device properties");
    const std::unique_ptr<Descriptor> plan =
        g.plan(nullptr, &device, &check.engine, true, &check.loaded);
    if (check.loaded) {
      int64_t bytes = 0, got = 0;
      refuse_unless(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                             CUDNN_TYPE_INT64, 1, &got, &bytes),
                    "reading the plan's workspace size");
      check.workspace = static_cast<size_t>(bytes);
    }
  } catch (const Refused& e) {
    check.refusal = e.what();
  }
  return check;
}

CudnnSdpa::CudnnSdpa(CUstream_st* stream) : impl_(std::make_unique<Impl>()) {
  const cudnnStatus_t st = cudnnCreate(&impl_->handle);
  FM_CHECK(st == CUDNN_STATUS_SUCCESS, "cuDNN attention: {}", describe(st, "cudnnCreate"));
  const cudnnStatus_t set = cudnnSetStream(impl_->handle, stream);
  if (set != CUDNN_STATUS_SUCCESS) {
    (void)cudnnDestroy(impl_->handle);
    throw Error(fmt::format("cuDNN attention: {}", describe(set, "cudnnSetStream")));
  }
}

CudnnSdpa::~CudnnSdpa() {
  impl_->plans.clear();  // descriptors before the handle they were made with
  if (impl_->handle != nullptr) (void)cudnnDestroy(impl_->handle);
}

size_t CudnnSdpa::plans() const {
  return impl_->plans.size();
}

bool CudnnSdpa::prepare(const SdpaProblem& p, size_t* workspace_bytes, std::string* why) {
  const Impl::Key key = Impl::key(p);
  if (auto it = impl_->plans.find(key); it != impl_->plans.end()) {
    *workspace_bytes = it->second.total();
    return true;
  }
  if (auto it = impl_->refused.find(key); it != impl_->refused.end()) {
    *why = it->second;
    return false;
  }
  if (impl_->plans.size() + impl_->refused.size() >= Impl::kMaxPlans) {
    impl_->plans.clear();
    impl_->refused.clear();
  }
  const size_t version = cudnnGetVersion();
  if (version < 90600) {
    *why = fmt::format(
        "cuDNN {} is older than 9.6, the first with ragged grouped-query "
        "attention backward",
        version);
    impl_->refused.emplace(key, *why);
    return false;
  }
  std::string first_refusal;
  for (const Variant v : {Variant{true, false}, Variant{true, true}, Variant{false, false}}) {
    if (!p.backward && !v.deterministic) continue;  // the forward has no dQ
    try {
      SdpaGraph g(p, v);
      if (p.backward)
        g.build_backward();
      else
        g.build_forward();
      Impl::Plan plan;
      plan.plan = g.plan(impl_->handle, nullptr, &plan.engine);
      plan.descriptors = g.take_descriptors();
      plan.variant = v;
      int64_t bytes = 0, got = 0;
      refuse_unless(
          cudnnBackendGetAttribute(plan.plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                   CUDNN_TYPE_INT64, 1, &got, &bytes),
          "reading the plan's workspace size");
      plan.cudnn_workspace = static_cast<size_t>(bytes);
      if (p.backward) {
        plan.softmax_sum_bytes = aligned(sizeof(float) * p.batch * p.hq * p.max_len);
        if (!v.deterministic)
          plan.dq_accum_bytes = aligned(sizeof(float) * p.batch * p.hq * p.max_len * p.dim);
      }
      *workspace_bytes = plan.total();
      spdlog::debug(
          "cuDNN attention: {} plan for B={} S<={} Hq={} Hkv={} D={} on engine {} ({}{}), "
          "{} workspace bytes",
          p.backward ? "backward" : "forward", p.batch, p.max_len, p.hq, p.hkv, p.dim, plan.engine,
          v.deterministic ? "deterministic" : "f32 dQ buffer",
          v.lowest_fill ? ", lowest-float fill" : "", plan.total());
      impl_->plans.emplace(key, std::move(plan));
      return true;
    } catch (const Refused& e) {
      if (first_refusal.empty()) first_refusal = e.what();
    }
  }
  *why = fmt::format("cuDNN {} has no engine for {} attention B={} S<={} Hq={} Hkv={} D={}: {}",
                     version, p.backward ? "backward" : "forward", p.batch, p.max_len, p.hq, p.hkv,
                     p.dim, first_refusal);
  impl_->refused.emplace(key, *why);
  return false;
}

void CudnnSdpa::run(const SdpaProblem& p, const SdpaArgs& a, void* workspace) {
  const auto it = impl_->plans.find(Impl::key(p));
  FM_CHECK(it != impl_->plans.end(), "cuDNN attention: run before prepare for this problem");
  const Impl::Plan& plan = it->second;
  // By-value scalars are read from the host when the plan is launched.
  float scale = a.scale;
  float fill = plan.variant.lowest_fill ? std::numeric_limits<float>::lowest()
                                        : -std::numeric_limits<float>::infinity();
  float fill_causal = fill, one = 1.0f;
  auto* base = static_cast<char*>(workspace);
  std::vector<int64_t> uids{kQ,     kK,     kV,        kStats, kSeqLenQ,     kSeqLenKV,
                            kOffQO, kOffKV, kOffStats, kScale, kFillPadding, kFillCausal};
  std::vector<void*> ptrs{const_cast<void*>(a.q),
                          const_cast<void*>(a.k),
                          const_cast<void*>(a.v),
                          p.backward ? const_cast<float*>(a.lse_in) : a.lse,
                          const_cast<int32_t*>(a.seq_len),
                          const_cast<int32_t*>(a.seq_len),
                          const_cast<int64_t*>(a.ragged_qo),
                          const_cast<int64_t*>(a.ragged_kv),
                          const_cast<int64_t*>(a.ragged_stats),
                          &scale,
                          &fill,
                          &fill_causal};
  if (!p.backward) {
    uids.push_back(kO);
    ptrs.push_back(a.out);
  } else {
    for (auto [uid, ptr] : {std::pair<int64_t, void*>{kO, const_cast<void*>(a.out_in)},
                            {kDO, const_cast<void*>(a.dout)},
                            {kDQ, a.dq},
                            {kDK, a.dk},
                            {kDV, a.dv},
                            {kOne, &one},
                            {kSoftmaxSum, base}}) {
      uids.push_back(uid);
      ptrs.push_back(ptr);
    }
    if (!plan.variant.deterministic) {
      uids.push_back(kDQAccum);
      ptrs.push_back(base + plan.softmax_sum_bytes);
    }
  }
  void* cudnn_workspace = base + plan.softmax_sum_bytes + plan.dq_accum_bytes;
  try {
    Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
             static_cast<int64_t>(uids.size()), uids.data());
    pack.set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
             static_cast<int64_t>(ptrs.size()), ptrs.data());
    pack.set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &cudnn_workspace);
    pack.finalize("the variant pack");
    const cudnnStatus_t st = cudnnBackendExecute(impl_->handle, plan.plan->get(), pack.get());
    if (st != CUDNN_STATUS_SUCCESS) throw Refused(describe(st, "cudnnBackendExecute"));
  } catch (const Refused& e) {
    throw Error(
        fmt::format("cuDNN attention {}: {}", p.backward ? "backward" : "forward", e.what()));
  }
}

}  // namespace fm::cuda
