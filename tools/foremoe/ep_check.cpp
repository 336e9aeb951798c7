// `foremoe ep-check`: expert parallelism against the single-rank model, through real ranks.
// Each rank (a process of `foremoe launch` over Gloo, or a thread with --backend inprocess)
// builds the EP model (its E/W home experts) and, locally, the W = 1 model of the same seed,
// runs its sequences of one deterministic global batch with uneven routing through
// lm_loss_and_backward and compares with the reference: the global loss, its log-probs, every
// gradient tensor of its shard, the global grad norm, the router load and, before and after
// each of --steps AdamW steps, its parameters. Max relative errors (per tensor: largest error
// over largest reference entry) are held to --tol. The verdict is all-gathered, so every rank
// exits 0 only when every check passed on every rank.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "engine/comm.h"
#include "engine/dist_env.h"
#include "engine/error.h"
#include "engine/process_group.h"
#include "engine/rng.h"
#include "model/moe_transformer.h"
#include "model/optimizer.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

namespace {

struct EpCheckOptions {
  std::string preset = "tiny";
  uint64_t seed = 1;
  int64_t tokens_per_rank = 16;
  std::string backend = "gloo";
  int ranks = 4;
  double timeout_s = 60;
  int steps = 2;
  int perturb_rank = -1;
  double tol = 2e-5;
};

struct RankReport {
  int rank = 0, world = 1;
  int64_t tokens = 0;
  double loss = 0, logp = 0, grad = 0, grad_norm = 0, params = 0;  // max relative errors
  double first_loss = 0, last_loss = 0;                            // the reference's
  std::string worst_grad, worst_param;
  std::vector<std::string> problems;       // besides the tolerances
  std::vector<std::vector<int64_t>> load;  // [MoE layer][E] global, first step
  std::vector<int32_t> failed;             // [W] every rank's verdict (all-gathered)
  bool ok() const { return failed[static_cast<size_t>(rank)] == 0; }
};

// The global batch: 2 sequences per rank with lengths in [1, 2N - 1] (ranks get different
// token counts), random tokens; targets are the next tokens, -1 at each sequence's end.
Batch global_batch(const ModelConfig& c, int W, int64_t N, uint64_t seed) {
  Rng rng(seed, 101);
  Batch b;
  b.seq_offsets = {0};
  for (int s = 0; s < 2 * W; ++s) {
    const int64_t len = std::min<int64_t>(
        c.max_seq_len, 1 + static_cast<int64_t>(rng.next_below(static_cast<uint64_t>(2 * N - 1))));
    const int64_t start = b.size();
    for (int64_t t = 0; t < len; ++t)
      b.tokens.push_back(static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size))));
    for (int64_t t = 0; t < len; ++t)
      b.targets.push_back(t + 1 < len ? b.tokens[start + t + 1] : -1);
    b.seq_offsets.push_back(b.size());
  }
  return b;
}

// Rank r's part of the global batch: sequences 2r and 2r + 1.
Batch rank_batch(const Batch& full, int rank) {
  const int64_t begin = full.seq_offsets[2 * rank], end = full.seq_offsets[2 * rank + 2];
  Batch b;
  b.tokens.assign(full.tokens.begin() + begin, full.tokens.begin() + end);
  b.targets.assign(full.targets.begin() + begin, full.targets.begin() + end);
  for (int s = 0; s <= 2; ++s) b.seq_offsets.push_back(full.seq_offsets[2 * rank + s] - begin);
  return b;
}

// Uneven routing in the first MoE layer: router rows 2j and 2j + 1 (j < top_k) become +r and
// -r of row 2j's initial values and every other row 0, so for any token one expert of each
// pair has a positive logit and the rest 0: experts >= 2 top_k never get a token there (their
// home ranks receive nothing for them). Other layers route as initialised.
void skew_router(MoeTransformer& model) {
  const ModelConfig& c = model.config();
  float* r =
      model.params().weights().layers[static_cast<size_t>(c.first_k_dense)].router.data<float>();
  for (int64_t e = 0; e < c.n_experts; ++e)
    for (int64_t h = 0; h < c.hidden; ++h)
      r[e * c.hidden + h] =
          e < 2 * c.top_k ? static_cast<float>(e % 2 == 0 ? 1 : -1) * r[(e - e % 2) * c.hidden + h]
                          : 0.f;
}

// Largest |got - want| over the largest |want|; against an all-zero reference any error is 1,
// a non-finite value of `got` is an infinite error.
template <class A, class B>
double rel_err(const A* got, const B* want, int64_t n) {
  double err = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(static_cast<double>(got[i]))) return INFINITY;
    err = std::max(err, std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i])));
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  }
  return scale > 0 ? err / scale : (err > 0 ? 1.0 : 0.0);
}

// Raises `worst` (naming the tensor) to the largest rel_err of a tensor of `got` against
// the same tensor of `want`; an all-zero reference tensor (an expert without tokens) must come
// out exactly 0.
void compare_arenas(const ParamArena& got, const ParamArena& want, double& worst,
                    std::string& name) {
  for (const ParamSlot& p : want.slots()) {
    const double e =
        rel_err(got.slot(p.name).slot->data<float>(), p.slot->data<float>(), p.slot->numel());
    if (e > worst) std::tie(worst, name) = std::pair{e, p.name};
  }
}

RankReport check_rank(const EpCheckOptions& o, const ModelConfig& c, Communicator& comm) {
  RankReport rep;
  rep.rank = comm.rank();
  rep.world = comm.size();
  FM_CHECK(o.perturb_rank < rep.world, "ep-check: --perturb-rank {} is not a rank of {}",
           o.perturb_rank, rep.world);
  auto backend = make_cpu_backend();
  MoeTransformer ep(c, *backend, DType::f32, {.comm = &comm}), ref(c, *backend, DType::f32);
  for (MoeTransformer* m : {&ep, &ref}) {
    m->init_weights(o.seed);
    skew_router(*m);
  }
  if (rep.rank == o.perturb_rank) {  // the checker's self-test: must be reported
    Tensor& w = ep.params().weights().layers.back().experts.w_down;
    for (int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] *= 1.01f;
  }
  // Adam's update is ~lr * sign(g) where |g| >> eps: an entry whose gradient is at fp32 noise
  // level could flip it. eps ~ the gradients' size keeps it proportional to g there, and lr
  // 1e-3 (~10% of the init std per step) keeps the parameter errors ~1e-6 (lr 1e-2: ~1e-5).
  OptimizerConfig oc;
  oc.lr = 1e-3;
  oc.eps = 1e-4;
  AdamW ep_opt(oc, ep.params(), *backend), ref_opt(oc, ref.params(), *backend);
  const Batch full = global_batch(c, rep.world, o.tokens_per_rank, o.seed);
  const Batch mine = rank_batch(full, rep.rank);
  const int64_t begin = full.seq_offsets[2 * rep.rank];
  rep.tokens = mine.size();
  ParamArena shard(c, *backend, DType::f32, rep.world);
  for (int step = 0;; ++step) {
    copy_param_shard(*backend, ref.params(), shard, rep.rank);
    compare_arenas(ep.params(), shard, rep.params, rep.worst_param);
    ep.zero_grad();
    ref.zero_grad();
    const double loss = ep.lm_loss_and_backward(mine, {}),
                 want = ref.lm_loss_and_backward(full, {});
    rep.loss = std::max(rep.loss, rel_err(&loss, &want, 1));
    if (step == 0) rep.first_loss = want;
    rep.last_loss = want;
    rep.logp = std::max(rep.logp, rel_err(ep.forward_result().logp.data(),
                                          ref.forward_result().logp.data() + begin, mine.size()));
    for (size_t m = 0; m < ref.forward_result().router.size(); ++m) {
      const std::vector<int64_t>& got = ep.forward_result().router[m].load;
      if (step == 0) rep.load.push_back(got);
      if (got != ref.forward_result().router[m].load)
        rep.problems.push_back(fmt::format("step {}: MoE layer {}: router load {} != reference {}",
                                           step, m, got, ref.forward_result().router[m].load));
    }
    ep.all_reduce_grads();
    copy_param_shard(*backend, ref.grads(), shard, rep.rank);
    compare_arenas(ep.grads(), shard, rep.grad, rep.worst_grad);
    const double norm = ep.grad_norm(), want_norm = ref.grad_norm();
    rep.grad_norm = std::max(rep.grad_norm, rel_err(&norm, &want_norm, 1));
    if (step == o.steps) break;
    ep_opt.step(ep.grads(), norm);
    ref_opt.step(ref.grads(), want_norm);
    ep.end_balance_step();
    ref.end_balance_step();
  }
  const auto empty = std::ranges::count(rep.load.front(), 0);
  if (rep.world > 1 && empty == 0)
    rep.problems.push_back("routing is not uneven: every expert got tokens in MoE layer 0");
  const bool ok = rep.problems.empty() &&
                  std::max({rep.loss, rep.logp, rep.grad, rep.grad_norm, rep.params}) <= o.tol;
  const int32_t mine_failed = ok ? 0 : 1;
  rep.failed.resize(static_cast<size_t>(rep.world));
  comm.all_gather(&mine_failed, rep.failed.data(), 1, DType::i32);
  return rep;
}

void print_load(const RankReport& r, const ModelConfig& c) {
  for (size_t m = 0; m < r.load.size(); ++m) {
    std::vector<std::string> empty;
    for (int64_t e = 0; e < c.n_experts; ++e)
      if (r.load[m][static_cast<size_t>(e)] == 0)
        empty.push_back(fmt::format("{} (rank {})", e, e / (c.n_experts / r.world)));
    fmt::print("ep-check: router load, MoE layer {}: [{}]; no tokens for expert {}\n", m,
               fmt::join(r.load[m], " "),
               empty.empty() ? "none" : fmt::format("{}", fmt::join(empty, ", ")));
  }
}

// "1.2e-06 (the tensor)", or "0" when every tensor matched exactly.
std::string worst(double err, const std::string& name) {
  return name.empty() ? "0" : fmt::format("{:.2e} ({})", err, name);
}

void print_report(const RankReport& r, const EpCheckOptions& o) {
  fmt::print(
      "ep-check rank {}/{} ({} tokens): max rel err loss {:.2e} logp {:.2e} grad {} "
      "grad_norm {:.2e} params {} [tol {:.0e}, {} steps] {}\n",
      r.rank, r.world, r.tokens, r.loss, r.logp, worst(r.grad, r.worst_grad), r.grad_norm,
      worst(r.params, r.worst_param), o.tol, o.steps, r.ok() ? "ok" : "MISMATCH");
  for (const std::string& p : r.problems) fmt::print("ep-check rank {}: {}\n", r.rank, p);
}

// The exit status from rank 0's report (every rank holds the same verdicts).
int verdict(const RankReport& r, int steps) {
  std::vector<int> bad;
  for (int q = 0; q < r.world; ++q)
    if (r.failed[static_cast<size_t>(q)]) bad.push_back(q);
  if (bad.empty()) {
    if (r.rank == 0)
      fmt::print(
          "ep-check: {} ranks match the single-rank model: ok (loss {:.4f}, {:.4f} after {} "
          "AdamW steps)\n",
          r.world, r.first_loss, r.last_loss, steps);
    return 0;
  }
  if (r.rank == 0)
    fmt::print(stderr, "ep-check: MISMATCH: rank(s) {} of {} differ from the single-rank model\n",
               fmt::join(bad, ", "), r.world);
  return 1;
}

}  // namespace

Runner add_ep_check(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "ep-check",
      "Check expert parallelism against the single-rank model (loss, log-probs, gradients, "
      "grad norm, AdamW steps); one rank per process under `foremoe launch`");
  auto o = std::make_shared<EpCheckOptions>();
  cmd->add_option("--preset", o->preset, "model YAML file or preset name")->capture_default_str();
  cmd->add_option("--seed", o->seed, "weights and batch seed")->capture_default_str();
  cmd->add_option("--tokens-per-rank", o->tokens_per_rank, "mean tokens of a rank's 2 sequences")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  cmd->add_option("--backend", o->backend,
                  "gloo (one process per rank, under foremoe launch) or inprocess (threads)")
      ->check(CLI::IsMember({"gloo", "inprocess"}))
      ->capture_default_str();
  auto* ranks = cmd->add_option("--ranks", o->ranks, "ranks (threads) of --backend inprocess")
                    ->check(CLI::Range(1, 1024))
                    ->capture_default_str();
  cmd->add_option("--timeout-s", o->timeout_s, "bound on every collective and the rendezvous")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--steps", o->steps, "AdamW steps whose parameters are compared")
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  cmd->add_option("--tol", o->tol, "max relative error (fp32 reorderings: ~1e-6)")
      ->capture_default_str();
  cmd->add_option("--perturb-rank", o->perturb_rank,
                  "self-test of the checker: this rank scales its last MoE layer's down_proj "
                  "by 1.01, which must be reported as MISMATCH");
  return [o, ranks] {
    const ModelConfig c = ModelConfig::load(o->preset);
    FM_CHECK(c.n_moe_layers() > 0, "ep-check: model {} has no MoE layer", o->preset);
    FM_CHECK(2 * c.top_k < c.n_experts,
             "ep-check: model {} has {} experts for top_k {}: uneven routing needs more than {}",
             o->preset, c.n_experts, c.top_k, 2 * c.top_k);
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(o->timeout_s * 1000));
    if (o->backend == "inprocess") {
      std::vector<RankReport> reports(static_cast<size_t>(o->ranks));
      run_inprocess(o->ranks, timeout, [&](int rank, Communicator& comm) {
        reports[static_cast<size_t>(rank)] = check_rank(*o, c, comm);
      });
      print_load(reports[0], c);
      for (const RankReport& r : reports) print_report(r, *o);
      return verdict(reports[0], o->steps);
    }
    FM_CHECK(ranks->count() == 0,
             "ep-check: --ranks is for --backend inprocess; under gloo the "
             "ranks are the processes of `foremoe launch --nproc N`");
    const DistEnv env = dist_env_from_environment();
    FM_CHECK(env.source != "none",
             "ep-check --backend gloo: no rank variables (RANK, WORLD_SIZE, ...): run it as "
             "`foremoe launch --nproc N -- ep-check`, or use --backend inprocess --ranks N");
    const std::unique_ptr<Communicator> comm = make_process_group(env, "gloo", timeout);
    const RankReport r = check_rank(*o, c, *comm);
    if (r.rank == 0) print_load(r, c);
    print_report(r, *o);
    return verdict(r, o->steps);
  };
}

}  // namespace fm::cli
