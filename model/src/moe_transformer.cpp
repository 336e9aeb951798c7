#include "model/moe_transformer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "engine/comm.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "model/src/blocks.h"

namespace fm {

struct LayerActs {
  blocks::AttentionActs attn;
  Tensor x_mid;           // after attention residual [N, H]
  Tensor f_in, ffn_rstd;  // normed FFN input
  blocks::FfnActs dense;
  blocks::MoeActs moe;
};

struct MoeTransformer::Activations {
  Tensor tokens, targets, pos, seq_off;
  std::vector<Tensor> x;  // [L + 1] residual stream entering each layer (x[L] = final)
  std::vector<LayerActs> layers;
  Tensor xf, final_rstd, logits, logp, entropy, lse;  // logits: kept when one chunk
  Tensor values;                                      // [N, 1] (value head)
  int64_t n = 0;
  int64_t head_rows = 0;  // LM-head rows per chunk
};

int64_t lm_head_rows_for(int64_t requested, int64_t N, int64_t V, DType dtype) {
  FM_CHECK(requested >= kLmHeadWhole,
           "forward: lm_head_rows {} is invalid (0: automatic, -1: whole batch, > 0: rows)",
           requested);
  if (requested == kLmHeadWhole) return N;
  if (requested > 0) return std::min(requested, N);
  const int64_t row_bytes = V * static_cast<int64_t>(dtype_size(dtype));
  return std::clamp<int64_t>(kLmHeadChunkBytes / row_bytes, 1, N);
}

MoeTransformer::MoeTransformer(ModelConfig config, Backend& backend, DType dtype, ExpertParallel ep)
    : config_(std::move(config)), backend_(backend), dtype_(dtype), act_(dtype) {
  FM_CHECK(dtype == DType::f32 || dtype == DType::f64, "MoeTransformer: dtype must be f32 or f64");
  if (ep.comm != nullptr && ep.comm->size() > 1) {
    const int W = ep.comm->size();
    FM_CHECK(config_.n_experts % W == 0,
             "expert parallelism: model '{}' has {} experts, which {} ranks cannot split evenly "
             "(the world size must divide n_experts)",
             config_.name, config_.n_experts, W);
    comm_ = ep.comm;
    ep_world_ = W;
    ep_rank_ = ep.comm->rank();
  }
  params_ = std::make_unique<ParamArena>(config_, backend_, dtype_, ep_world_);
  grads_ = std::make_unique<ParamArena>(config_, backend_, dtype_, ep_world_);
  balance_.assign(static_cast<size_t>(config_.n_moe_layers()),
                  LayerBalanceState(config_.n_experts));
  acts_ = std::make_unique<Activations>();
}

MoeTransformer::~MoeTransformer() = default;

void MoeTransformer::init_weights(uint64_t seed) {
  Rng rng(seed, /*stream=*/0x1417);
  const double residual_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(config_.n_layers));
  // Under EP, draw in the single-rank arena order, whole tensors (transiently one full expert
  // tensor in host doubles), and keep this rank's experts: the numbers of W = 1.
  ModelWeights full_views;
  const std::vector<ParamSlot> order =
      ep_world_ > 1 ? param_slots(config_, full_views) : params_->slots();
  for (const ParamSlot& p : order) {
    const int64_t n = shape_numel(p.shape);
    std::vector<double> host(static_cast<size_t>(n), p.init == ParamInit::zeros ? 0.0 : 1.0);
    if (p.init == ParamInit::normal || p.init == ParamInit::normal_residual) {
      const double std =
          config_.init_std * (p.init == ParamInit::normal_residual ? residual_scale : 1.0);
      rng.normal(host.data(), n, 0.0, std);
    }
    const ParamSlot& dst = ep_world_ > 1 ? params_->slot(p.name) : p;
    if (dst.expert && ep_world_ > 1) {
      const int64_t part = shape_numel(dst.shape);
      host =
          std::vector<double>(host.begin() + ep_rank_ * part, host.begin() + (ep_rank_ + 1) * part);
    }
    Tensor src = backend_.upload(host, dst.shape, dtype_);
    backend_.copy(*dst.slot, src);
  }
  params_->touch();
}

void MoeTransformer::set_compute_dtype(DType dtype) {
  if (dtype == dtype_) {
    act_ = dtype_;
    compute_.reset();
    return;
  }
  FM_CHECK(dtype == DType::bf16 && dtype_ == DType::f32,
           "set_compute_dtype: {} compute with {} parameters is not supported (bf16 needs f32 "
           "master weights; f32 or f64 compute in the parameters' own dtype)",
           dtype_name(dtype), dtype_name(dtype_));
  act_ = dtype;
  compute_ = std::make_unique<ParamArena>(config_, backend_, act_, ep_world_);
  compute_version_ = params_->version() - 1;  // refreshed by the next forward
}

const ModelWeights& MoeTransformer::compute_weights() {
  if (compute_ == nullptr) return params_->weights();
  if (compute_version_ != params_->version()) {
    backend_.convert(compute_->flat(), params_->flat());
    compute_version_ = params_->version();
  }
  return compute_->weights();
}

void MoeTransformer::all_reduce_grads() {
  if (ep_world_ == 1) return;
  Tensor replicated = grads_->flat().slice(0, grads_->replicated_numel());
  backend_.synchronize();  // the communicator reads device memory once its writes are done
  comm_->all_reduce(replicated.raw(), replicated.numel(), dtype_, ReduceOp::sum);
}

double MoeTransformer::grad_norm() {
  const Tensor& g = grads_->flat();
  if (ep_world_ == 1) return std::sqrt(backend_.sum_squares(g));
  const int64_t split = grads_->replicated_numel();
  double experts = backend_.sum_squares(g.slice(split, g.numel()));
  comm_->all_reduce(&experts, 1, DType::f64, ReduceOp::sum);
  return std::sqrt(backend_.sum_squares(g.slice(0, split)) + experts);
}

const Tensor& MoeTransformer::logits() const {
  FM_CHECK(!config_.value_head(), "logits: a value model (head: value) has no LM-head logits");
  FM_CHECK(acts_->n > 0, "logits: no forward has run");
  FM_CHECK(acts_->logits.defined(),
           "logits: the last forward computed the LM head in chunks of {} of its {} rows and kept "
           "no logits (pass ForwardOptions::lm_head_rows = kLmHeadWhole to keep them)",
           acts_->head_rows, acts_->n);
  return acts_->logits;
}

int64_t MoeTransformer::lm_head_chunk_rows() const {
  FM_CHECK(acts_->n > 0, "lm_head_chunk_rows: no forward has run");
  return acts_->head_rows;
}

void MoeTransformer::zero_grad() {
  backend_.fill(grads_->flat(), 0.0);
}

void validate_batch(const ModelConfig& c, const Batch& batch) {
  const int64_t N = batch.size();
  FM_CHECK(N > 0, "batch: no tokens");
  FM_CHECK(static_cast<int64_t>(batch.targets.size()) == N, "batch: {} targets for {} tokens",
           batch.targets.size(), N);
  FM_CHECK(batch.seq_offsets.size() >= 2 && batch.seq_offsets.front() == 0 &&
               batch.seq_offsets.back() == N,
           "batch: seq_offsets must run from 0 to the token count {}", N);
  for (size_t s = 1; s < batch.seq_offsets.size(); ++s) {
    const int64_t len = batch.seq_offsets[s] - batch.seq_offsets[s - 1];
    FM_CHECK(len > 0, "batch: sequence {} is empty", s - 1);
    FM_CHECK(len <= c.max_seq_len, "batch: sequence {} has {} tokens, above max_seq_len {}", s - 1,
             len, c.max_seq_len);
  }
  for (int64_t n = 0; n < N; ++n) {
    FM_CHECK(batch.tokens[n] >= 0 && batch.tokens[n] < c.vocab_size,
             "batch: token {} at position {} is outside the vocabulary [0, {})", batch.tokens[n], n,
             c.vocab_size);
    FM_CHECK(batch.targets[n] >= -1 && batch.targets[n] < c.vocab_size,
             "batch: target {} at position {} is outside [-1, {})", batch.targets[n], n,
             c.vocab_size);
  }
}

// A single rank computes every token on the home experts, whatever the plan; it still checks
// the plan against the load so that a wrong plan is caught at W = 1 too.
static void check_single_rank_plan(const LayerPlacement& plan, const std::vector<int64_t>& load,
                                   int64_t moe_layer) {
  LoadMatrix column(load.size());
  for (size_t e = 0; e < load.size(); ++e) column[e] = {load[e]};
  try {
    validate_placement(plan, column, fmt::format("MoE layer {}", moe_layer));
  } catch (const std::invalid_argument& e) {
    throw Error(e.what());
  }
}

const ForwardResult& MoeTransformer::forward(const Batch& batch, const ForwardOptions& options) {
  const ModelConfig& c = config_;
  Backend& b = backend_;
  validate_batch(c, batch);
  const int64_t N = batch.size(), H = c.hidden, L = c.n_layers, K = c.top_k;
  const int64_t n_moe = c.n_moe_layers();
  if (options.replay != nullptr) {
    const RoutingTrace& r = *options.replay;
    FM_CHECK(
        r.tokens() == N && r.n_moe_layers == n_moe && r.top_k == K && r.n_experts == c.n_experts,
        "routing replay: the trace has {} tokens x {} MoE layers x top-{} over {} experts, the "
        "batch needs {} x {} x top-{} over {}",
        r.tokens(), r.n_moe_layers, r.top_k, r.n_experts, N, n_moe, K, c.n_experts);
    FM_CHECK(static_cast<int64_t>(r.ids.size()) == N * n_moe * K,
             "routing replay: trace ids has {} entries, expected {}", r.ids.size(), N * n_moe * K);
  }

  Activations& a = *acts_;
  a = Activations();  // the last forward's activations go before this one's are allocated
  a.n = N;
  a.tokens = b.upload(batch.tokens, {N});
  a.targets = b.upload(batch.targets, {N});
  std::vector<int32_t> pos(static_cast<size_t>(N)), off(batch.seq_offsets.size());
  for (size_t s = 0; s + 1 < batch.seq_offsets.size(); ++s)
    for (int64_t n = batch.seq_offsets[s]; n < batch.seq_offsets[s + 1]; ++n)
      pos[n] = static_cast<int32_t>(n - batch.seq_offsets[s]);
  for (size_t s = 0; s < off.size(); ++s) off[s] = static_cast<int32_t>(batch.seq_offsets[s]);
  a.pos = b.upload(pos, {N});
  a.seq_off = b.upload(off, {static_cast<int64_t>(off.size())});

  ForwardResult& r = result_;
  r = ForwardResult{};
  r.routes.n_moe_layers = n_moe;
  r.routes.top_k = K;
  r.routes.n_experts = c.n_experts;
  r.routes.seq_offsets = batch.seq_offsets;
  r.routes.ids.assign(static_cast<size_t>(N * n_moe * K), 0);
  r.router.resize(static_cast<size_t>(n_moe));

  const ModelWeights& w = compute_weights();
  a.x.assign(static_cast<size_t>(L + 1), Tensor());
  a.layers.resize(static_cast<size_t>(L));
  a.x[0] = b.empty({N, H}, act_);
  b.embedding_forward(a.x[0], w.embed, a.tokens);

  // A placements list of the wrong length fails every MoE layer (on every rank under EP).
  const bool plans_ok =
      options.placements == nullptr || static_cast<int64_t>(options.placements->size()) == n_moe;
  const std::string plans_error = plans_ok ? ""
                                           : fmt::format("forward: {} placements for {} MoE layers",
                                                         options.placements->size(), n_moe);
  std::vector<int32_t> replay_ids;
  for (int64_t l = 0; l < L; ++l) {
    LayerActs& la = a.layers[l];
    const LayerWeights& lw = w.layers[l];
    la.x_mid = b.empty({N, H}, act_);
    blocks::attention_forward(b, c, lw, la.attn, la.x_mid, a.x[l], a.pos, a.seq_off);
    la.f_in = b.empty({N, H}, act_);
    la.ffn_rstd = b.empty({N}, stat_dtype());
    b.rmsnorm_forward(la.f_in, la.ffn_rstd, la.x_mid, lw.ffn_norm, c.rms_eps);
    Tensor y = b.empty({N, H}, act_);
    if (!c.is_moe_layer(l)) {
      blocks::ffn_forward(b, lw.dense, la.dense, y, la.f_in);
    } else {
      const int64_t m = l - c.first_k_dense;
      const std::vector<int32_t>* replay = nullptr;
      if (options.replay != nullptr) {
        replay_ids.resize(static_cast<size_t>(N * K));
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < K; ++k) replay_ids[n * K + k] = options.replay->at(n, m, k);
        replay = &replay_ids;
      }
      const LayerPlacement* plan =
          options.placements != nullptr && plans_ok ? &(*options.placements)[m] : nullptr;
      if (ep_world_ > 1) {
        blocks::MoeParallelLayer p{comm_, m, plan, replicas_, plans_error};
        blocks::moe_parallel_forward(b, c, lw, balance_[m], replay, p, la.moe, y, la.f_in);
      } else {
        FM_CHECK(plans_error.empty(), "{}", plans_error);
        blocks::moe_forward(b, c, lw, balance_[m], replay, la.moe, y, la.f_in);
        if (plan != nullptr) check_single_rank_plan(*plan, la.moe.load, m);
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
          r.routes.at(n, m, k) = static_cast<uint16_t>(la.moe.host_ids[n * K + k]);
      LayerRouterStats& st = r.router[m];
      st.load = la.moe.load;
      st.max_vio = max_violation(st.load);
      st.balance_loss = la.moe.balance.loss;
      r.balance_loss += la.moe.balance.loss;
      if (options.training)
        accumulate_step_stats(balance_[m], la.moe.prob_sum, la.moe.load, la.moe.tokens);
    }
    a.x[l + 1] = b.empty({N, H}, act_);
    b.copy(a.x[l + 1], la.x_mid);
    b.axpy(a.x[l + 1], 1.0, y);
  }

  a.xf = b.empty({N, H}, act_);
  a.final_rstd = b.empty({N}, stat_dtype());
  b.rmsnorm_forward(a.xf, a.final_rstd, a.x[L], w.final_norm, c.rms_eps);
  if (c.value_head()) {
    // v = xf . w + b: [N, H] x [1, H]^T -> [N, 1]; no vocabulary projection.
    a.logits = a.logp = a.entropy = a.lse = Tensor();
    a.values = b.empty({N, 1}, stat_dtype());
    blocks::linear_forward(b, a.values, a.xf, w.value_head);
    b.add_row_vector(a.values, w.value_head_bias, 1.0);
    r.values = b.download_f64(a.values);
    r.logp.assign(static_cast<size_t>(N), 0.0);
    r.entropy.assign(static_cast<size_t>(N), 0.0);
    return r;
  }
  a.values = Tensor();
  a.head_rows = lm_head_rows_for(options.lm_head_rows, N, c.vocab_size, act_);
  a.logp = b.empty({N}, stat_dtype());
  a.entropy = b.empty({N}, stat_dtype());
  a.lse = b.empty({N}, stat_dtype());
  // One [rows, V] buffer serves every chunk; it is the kept logits when there is one chunk.
  Tensor logits = b.empty({a.head_rows, c.vocab_size}, act_);
  for (int64_t r0 = 0; r0 < N; r0 += a.head_rows) {
    const int64_t r1 = std::min(N, r0 + a.head_rows);
    Tensor lc = logits.slice(0, r1 - r0), logp = a.logp.slice(r0, r1);
    Tensor entropy = a.entropy.slice(r0, r1), lse = a.lse.slice(r0, r1);
    blocks::linear_forward(b, lc, a.xf.slice(r0, r1), w.lm_head);
    b.logprob_forward(logp, entropy, lse, lc, a.targets.slice(r0, r1));
  }
  a.logits = a.head_rows == N ? logits : Tensor();
  r.logp = b.download_f64(a.logp);
  r.entropy = b.download_f64(a.entropy);
  return r;
}

static void validate_cached_input(const ModelConfig& c, const CachedInput& in,
                                  const KvCache& cache) {
  const int64_t N = static_cast<int64_t>(in.tokens.size());
  FM_CHECK(N > 0, "cached forward: no tokens");
  FM_CHECK(static_cast<int64_t>(in.slot.size()) == N && static_cast<int64_t>(in.pos.size()) == N,
           "cached forward: {} tokens but {} slots and {} positions", N, in.slot.size(),
           in.pos.size());
  std::vector<char> seen(static_cast<size_t>(cache.slots() * cache.max_len()), 0);
  for (int64_t n = 0; n < N; ++n) {
    FM_CHECK(in.tokens[n] >= 0 && in.tokens[n] < c.vocab_size,
             "cached forward: token {} at row {} is outside the vocabulary [0, {})", in.tokens[n],
             n, c.vocab_size);
    FM_CHECK(in.slot[n] >= 0 && in.slot[n] < cache.slots(),
             "cached forward: slot {} at row {} is outside the cache's {} slots", in.slot[n], n,
             cache.slots());
    FM_CHECK(in.pos[n] >= 0 && in.pos[n] < cache.max_len(),
             "cached forward: position {} at row {} is outside the cache length {}", in.pos[n], n,
             cache.max_len());
    char& s = seen[static_cast<size_t>(in.slot[n] * cache.max_len() + in.pos[n])];
    FM_CHECK(!s, "cached forward: slot {} position {} appears twice", in.slot[n], in.pos[n]);
    s = 1;
  }
  for (int32_t r : in.logit_rows)
    FM_CHECK(r >= 0 && r < N, "cached forward: logit row {} is outside [0, {})", r, N);
}

// One MoE layer's ids [N, K] into routes [N, n_moe, K] at layer m.
static void record_routes(std::vector<uint16_t>& routes, const int32_t* ids, int64_t m,
                          int64_t n_moe, int64_t N, int64_t K) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      routes[(n * n_moe + m) * K + k] = static_cast<uint16_t>(ids[n * K + k]);
}

void MoeTransformer::forward_cached(const CachedInput& in, KvCache& cache, CachedOutput& out,
                                    bool defer_routes) {
  const ModelConfig& c = config_;
  Backend& b = backend_;
  FM_CHECK(!c.value_head(), "cached forward: a value model (head: value) does not generate");
  const int64_t N = static_cast<int64_t>(in.tokens.size()), H = c.hidden, K = c.top_k;
  const int64_t n_moe = c.n_moe_layers(), R = static_cast<int64_t>(in.logit_rows.size());
  const ModelWeights& w = compute_weights();
  if (ep_world_ == 1) {
    validate_cached_input(c, in, cache);
  } else {
    // A bad input on one rank must not leave its peers waiting: the rank still joins the
    // first MoE layer's counts exchange, with the error, and every rank throws there.
    std::string error;
    try {
      validate_cached_input(c, in, cache);
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty()) {
      if (n_moe > 0) {
        blocks::MoeActs moe;
        Tensor x = b.empty({1, H}, act_), y = b.empty({1, H}, act_);
        blocks::MoeParallelLayer p{comm_, 0, nullptr, replicas_, error};
        blocks::moe_parallel_forward(b, c, w.layers[c.first_k_dense], balance_[0], nullptr, p, moe,
                                     y, x);
      }
      throw Error(error);
    }
  }

  // Every index tensor from here on is built on the host from the input validated above
  // (tokens, slots, positions, cache rows, logit rows) or made in range by a kernel (top-k
  // ids, NaN rows included; the expert permutations, by the host or by sort_assignments): the
  // device backend need not check them again, which would cost a synchronisation per layer.
  // What the kernels find wrong (a NaN router row) is raised after the last layer.
  const IndexChecksOff trusted(b);
  std::vector<int32_t> rows(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n)
    rows[n] = static_cast<int32_t>(in.slot[n] * cache.max_len() + in.pos[n]);
  const Tensor tokens = b.upload(in.tokens, {N}), pos = b.upload(in.pos, {N});
  const Tensor slot = b.upload(in.slot, {N}), cache_rows = b.upload(rows, {N});

  Tensor x = b.empty({N, H}, act_), x_mid = b.empty({N, H}, act_);
  Tensor f_in = b.empty({N, H}, act_), rstd = b.empty({N}, stat_dtype());
  Tensor y = b.empty({N, H}, act_);
  b.embedding_forward(x, w.embed, tokens);
  out.routes.assign(static_cast<size_t>(N * n_moe * K), 0);
  const bool device_routed =
      ep_world_ == 1 && (cached_routing_ == CachedRouting::device ||
                         (cached_routing_ == CachedRouting::automatic &&
                          N * K <= kDeviceRoutedRowsPerExpert * c.n_experts));
  // Device routing: every MoE layer's ids [N, K], kept on the backend until the last layer.
  Tensor layer_ids = device_routed ? b.empty({n_moe, N * K}, DType::i32) : Tensor();
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    blocks::AttentionActs attn;
    blocks::attention_cached_forward(b, c, lw, attn, x_mid, x, pos, cache.keys(l), cache.values(l),
                                     slot, cache_rows);
    b.rmsnorm_forward(f_in, rstd, x_mid, lw.ffn_norm, c.rms_eps);
    if (!c.is_moe_layer(l)) {
      blocks::FfnActs dense;
      blocks::ffn_forward(b, lw.dense, dense, y, f_in);
    } else {
      const int64_t m = l - c.first_k_dense;
      blocks::MoeActs moe;
      if (ep_world_ > 1) {  // collective: every token to its expert's home rank
        blocks::MoeParallelLayer p{comm_, m, nullptr, replicas_, ""};
        blocks::moe_parallel_forward(b, c, lw, balance_[m], nullptr, p, moe, y, f_in,
                                     /*router_stats=*/false);
      } else if (device_routed) {
        blocks::moe_forward_device_routed(b, c, lw, balance_[m], moe, y, f_in);
      } else {
        blocks::moe_forward(b, c, lw, balance_[m], nullptr, moe, y, f_in, /*router_stats=*/false);
      }
      if (device_routed) {
        Tensor row = layer_ids.slice(m, m + 1).reshape({N, K});
        b.copy(row, moe.ids);
      } else {
        record_routes(out.routes, moe.host_ids.data(), m, n_moe, N, K);
      }
    }
    b.copy(x, x_mid);
    b.axpy(x, 1.0, y);
  }

  out.logits = Tensor();
  if (R > 0) {  // final norm and LM head on the wanted rows only
    Tensor xr = b.empty({R, H}, act_), xf = b.empty({R, H}, act_), rr = b.empty({R}, stat_dtype());
    b.gather_rows(xr, x, b.upload(in.logit_rows, {R}));
    b.rmsnorm_forward(xf, rr, xr, w.final_norm, c.rms_eps);
    out.logits = b.empty({R, c.vocab_size}, stat_dtype());  // f32 for sampling
    blocks::linear_forward(b, out.logits, xf, w.lm_head);
  }
  out.pending_ids = device_routed && n_moe > 0 ? layer_ids : Tensor();
  if (!defer_routes) finish_cached(out);
}

void MoeTransformer::finish_cached(CachedOutput& out) {
  // After the head (and, deferred, the caller's sampling) is queued, so the one wait covers the
  // whole step rather than draining the queue early: what top-k and the sort found wrong (NaN
  // router rows, keys out of range), then, under device routing, every layer's ids in one
  // download.
  Backend& b = backend_;
  b.raise_deferred_errors();
  if (!out.pending_ids.defined()) return;
  const int64_t n_moe = out.pending_ids.dim(0), K = config_.top_k;
  const int64_t N = out.pending_ids.dim(1) / K;
  const std::vector<int32_t> ids = b.download_i32(out.pending_ids);
  out.pending_ids = Tensor();
  for (int64_t m = 0; m < n_moe; ++m)
    record_routes(out.routes, ids.data() + m * N * K, m, n_moe, N, K);
}

void MoeTransformer::check_backward(const char* what, size_t n) const {
  FM_CHECK(acts_->n > 0, "{}: no forward to differentiate", what);
  FM_CHECK(static_cast<int64_t>(n) == acts_->n, "{}: {} gradients for {} tokens", what, n,
           acts_->n);
}

void MoeTransformer::backward(const std::vector<double>& dlogp, const std::vector<double>& dentropy,
                              double balance_scale) {
  const ModelConfig& c = config_;
  Backend& b = backend_;
  Activations& a = *acts_;
  FM_CHECK(!c.value_head(),
           "backward: a value model (head: value) has no log-probs; use backward_values");
  check_backward("backward", dlogp.size());
  const int64_t N = a.n, H = c.hidden;
  FM_CHECK(dentropy.empty() || static_cast<int64_t>(dentropy.size()) == N,
           "backward: {} dentropy for {} tokens", dentropy.size(), N);
  const ModelWeights& w = compute_weights();
  ModelWeights& g = grads_->weights();

  // Chunk by chunk (ForwardOptions::lm_head_rows): the logits again when the forward did not
  // keep them, their gradient, then the head's weight gradient and this chunk's rows of dxf.
  const int64_t rows = a.head_rows, V = c.vocab_size;
  const Tensor dlp = b.upload(dlogp, {N}, stat_dtype());
  const Tensor dent = dentropy.empty() ? Tensor() : b.upload(dentropy, {N}, stat_dtype());
  Tensor dxf = b.empty({N, H}, act_), dlogits = b.empty({rows, V}, act_);
  Tensor logits = a.logits.defined() ? a.logits : b.empty({rows, V}, act_);
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t r1 = std::min(N, r0 + rows);
    const Tensor xf = a.xf.slice(r0, r1);
    Tensor lc = logits.slice(0, r1 - r0), dlc = dlogits.slice(0, r1 - r0);
    Tensor dxc = dxf.slice(r0, r1);
    if (!a.logits.defined()) blocks::linear_forward(b, lc, xf, w.lm_head);
    b.logprob_backward(dlc, dlp.slice(r0, r1), dent.defined() ? dent.slice(r0, r1) : Tensor(), lc,
                       a.lse.slice(r0, r1), a.targets.slice(r0, r1));
    blocks::linear_backward(b, &dxc, 0.0, g.lm_head, dlc, xf, w.lm_head);
  }
  backward_trunk(dxf, balance_scale);
}

void MoeTransformer::backward_values(const std::vector<double>& dvalues, double balance_scale) {
  const ModelConfig& c = config_;
  Backend& b = backend_;
  Activations& a = *acts_;
  FM_CHECK(c.value_head(), "backward_values: an LM model (head: lm) has no values; use backward");
  check_backward("backward_values", dvalues.size());
  const int64_t N = a.n, H = c.hidden;
  const ModelWeights& w = compute_weights();
  ModelWeights& g = grads_->weights();

  // v = xf w^T + b:  dw += dv^T xf,  db += sum_n dv[n],  dxf = dv w.
  const Tensor dv = b.upload(dvalues, {N, 1}, stat_dtype());
  Tensor dxf = b.empty({N, H}, act_);
  blocks::linear_backward(b, &dxf, 0.0, g.value_head, dv, a.xf, w.value_head);
  Tensor db = b.empty({1}, stat_dtype());
  b.column_sum(db, dv);
  b.axpy(g.value_head_bias, 1.0, db);
  backward_trunk(dxf, balance_scale);
}

void MoeTransformer::backward_trunk(const Tensor& dxf, double balance_scale) {
  const ModelConfig& c = config_;
  Backend& b = backend_;
  Activations& a = *acts_;
  const int64_t N = a.n, H = c.hidden, L = c.n_layers;
  const ModelWeights& w = compute_weights();
  ModelWeights& g = grads_->weights();

  Tensor dx = b.empty({N, H}, act_);
  b.rmsnorm_backward(dx, g.final_norm, dxf, a.x[L], w.final_norm, a.final_rstd);

  Tensor df_in = b.empty({N, H}, act_), dx_mid = b.empty({N, H}, act_);
  for (int64_t l = L - 1; l >= 0; --l) {
    LayerActs& la = a.layers[l];
    const LayerWeights& lw = w.layers[l];
    LayerWeights& lg = g.layers[l];
    // x[l+1] = x_mid + ffn(norm(x_mid))
    if (!c.is_moe_layer(l))
      blocks::ffn_backward(b, lw.dense, lg.dense, la.dense, df_in, 0.0, dx, la.f_in);
    else if (la.moe.ep.comm != nullptr)
      blocks::moe_parallel_backward(b, c, lw, lg, la.moe, df_in, dx, la.f_in, balance_scale);
    else
      blocks::moe_backward(b, c, lw, lg, la.moe, df_in, dx, la.f_in, balance_scale);
    b.rmsnorm_backward(dx_mid, lg.ffn_norm, df_in, la.x_mid, lw.ffn_norm, la.ffn_rstd);
    b.axpy(dx_mid, 1.0, dx);
    blocks::attention_backward(b, c, lw, lg, la.attn, dx, dx_mid, a.pos, a.seq_off);
  }
  b.embedding_backward(g.embed, dx, a.tokens);
}

double MoeTransformer::lm_loss_and_backward(const Batch& batch, const ForwardOptions& options,
                                            double scale) {
  const ForwardResult& r = forward(batch, options);
  int64_t n_targets = 0;
  for (int32_t t : batch.targets) n_targets += t >= 0;
  // Under EP the mean is over every rank's targets (a rank may have none).
  if (ep_world_ > 1) comm_->all_reduce(&n_targets, 1, DType::i64, ReduceOp::sum);
  FM_CHECK(n_targets > 0, "lm loss: the batch has no targets");
  double nll = 0.0;
  std::vector<double> dlogp(batch.targets.size(), 0.0);
  for (size_t n = 0; n < batch.targets.size(); ++n) {
    if (batch.targets[n] < 0) continue;
    nll -= r.logp[n];
    dlogp[n] = -scale / static_cast<double>(n_targets);
  }
  if (ep_world_ > 1) comm_->all_reduce(&nll, 1, DType::f64, ReduceOp::sum);
  const double loss = nll / static_cast<double>(n_targets) + r.balance_loss;
  backward(dlogp, {}, scale);
  return loss;
}

void MoeTransformer::end_balance_step() {
  for (LayerBalanceState& s : balance_) fm::end_balance_step(config_.balance, s);
}

}  // namespace fm
