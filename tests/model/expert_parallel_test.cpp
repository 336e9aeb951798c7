// Expert parallelism: W ranks (threads with the in-process communicator), each with its
// own sequences and E/W home experts, against the single-rank model on all sequences.
#include "model/expert_parallel.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <memory>

#include "engine/comm.h"
#include "model/optimizer.h"
#include "model/replica_slots.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

using std::chrono::milliseconds;
// Generous for 2 shared cores, short enough that a hang fails the test quickly.
constexpr milliseconds kTimeout{20000};

// micro_config with 8 experts, so that W = 4 leaves 2 home experts per rank.
ModelConfig ep_config(const std::string& balance = "method: switch_aux\n    alpha: 0.1") {
  ModelConfig c = testing::micro_config(balance);
  c.n_experts = 8;
  return c;
}

// Sequences [first, last) of `full` as a batch of their own.
Batch sub_batch(const Batch& full, size_t first, size_t last) {
  Batch b;
  const int64_t begin = full.seq_offsets[first], end = full.seq_offsets[last];
  b.tokens.assign(full.tokens.begin() + begin, full.tokens.begin() + end);
  b.targets.assign(full.targets.begin() + begin, full.targets.begin() + end);
  for (size_t s = first; s <= last; ++s) b.seq_offsets.push_back(full.seq_offsets[s] - begin);
  return b;
}

RoutingTrace sub_trace(const RoutingTrace& full, int64_t begin, int64_t end) {
  RoutingTrace t = full;
  const int64_t row = full.n_moe_layers * full.top_k;
  t.ids.assign(full.ids.begin() + begin * row, full.ids.begin() + end * row);
  t.seq_offsets = {0, end - begin};
  return t;
}

template <class T>
std::vector<T> slice(const std::vector<T>& v, int64_t begin, int64_t end) {
  return std::vector<T>(v.begin() + begin, v.begin() + end);
}

// The batch of every test: six sequences; rank r of W gets sequences parts[W][r].
const std::vector<int64_t> kLengths = {1, 5, 4, 7, 3, 6};
std::vector<std::pair<size_t, size_t>> partition(int W) {
  if (W == 2) return {{0, 1}, {1, 6}};                  // rank 0: one token
  if (W == 4) return {{0, 1}, {1, 3}, {3, 4}, {4, 6}};  // rank 0: one token
  return {{0, 6}};
}

// Routing that makes the all-to-all uneven: rank 0's (single) token goes to experts 0 and 1
// in every layer (home of rank 0 for W = 2 and 4: it sends nothing to any peer), expert 7
// gets no token in MoE layer 0 (for W = 4, rank 3 then receives nothing for it), the rest at
// random.
RoutingTrace uneven_routes(const ModelConfig& c, int64_t tokens, uint64_t seed) {
  Rng rng(seed, 3);
  RoutingTrace t;
  t.n_moe_layers = c.n_moe_layers();
  t.top_k = c.top_k;
  t.n_experts = c.n_experts;
  t.seq_offsets = {0, tokens};
  t.ids.resize(static_cast<size_t>(tokens * t.n_moe_layers * t.top_k));
  for (int64_t n = 0; n < tokens; ++n)
    for (int64_t m = 0; m < t.n_moe_layers; ++m) {
      const int64_t experts = m == 0 ? c.n_experts - 1 : c.n_experts;
      const int64_t first = n == 0 ? 0 : static_cast<int64_t>(rng.next_below(experts));
      const int64_t step = n == 0 ? 1 : 1 + static_cast<int64_t>(rng.next_below(experts - 1));
      t.at(n, m, 0) = static_cast<uint16_t>(first);
      t.at(n, m, 1) = static_cast<uint16_t>((first + step) % experts);
    }
  return t;
}

struct Objective {
  std::vector<double> c_logp, c_entropy;
  double balance_scale = 0.7;
};

Objective random_objective(int64_t n, uint64_t seed) {
  Rng rng(seed, 5);
  Objective o;
  o.c_logp.resize(n);
  o.c_entropy.resize(n);
  rng.uniform(o.c_logp.data(), n, -1.0, 1.0);
  rng.uniform(o.c_entropy.data(), n, -0.5, 0.5);
  return o;
}

// sum_n c_logp[n] logp[n] + c_entropy[n] entropy[n] over [begin, end) of the objective.
double token_terms(const Objective& o, const ForwardResult& r, int64_t begin) {
  double j = 0.0;
  for (size_t n = 0; n < r.logp.size(); ++n)
    j += o.c_logp[begin + n] * r.logp[n] + o.c_entropy[begin + n] * r.entropy[n];
  return j;
}

// The models' parameter dtype for a test dtype: bf16 means mixed precision (f32 parameters
// and gradients, bf16 compute: MoeTransformer::set_compute_dtype).
DType param_dtype(DType dt) {
  return dt == DType::bf16 ? DType::f32 : dt;
}

// The single-rank reference: objective, log-probs and gradients on all sequences.
struct Reference {
  double objective = 0.0, balance_loss = 0.0;
  std::vector<double> logp;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<MoeTransformer> model;
};

Reference single_rank(const ModelConfig& c, DType dt, const Batch& batch,
                      const RoutingTrace& routes, const Objective& o) {
  Reference ref;
  ref.backend = make_cpu_backend();
  ref.model = std::make_unique<MoeTransformer>(c, *ref.backend, param_dtype(dt));
  ref.model->init_weights(7);
  if (dt == DType::bf16) ref.model->set_compute_dtype(DType::bf16);
  const ForwardResult& r = ref.model->forward(batch, {.replay = &routes, .training = false});
  ref.objective = token_terms(o, r, 0) + o.balance_scale * r.balance_loss;
  ref.balance_loss = r.balance_loss;
  ref.logp = r.logp;
  ref.model->zero_grad();
  ref.model->backward(o.c_logp, o.c_entropy, o.balance_scale);
  return ref;
}

// What one rank reports: its token terms, the balance loss it saw, its log-probs, and its
// gradients' largest error against the reference's shard, relative to the largest entry of
// the same parameter tensor (so that small expert gradients are held to the same standard
// as large embedding ones).
struct RankResult {
  double token_terms = 0.0, balance_loss = 0.0;
  std::vector<double> logp;
  double max_rel_err = 0.0;
  std::string worst;  // the parameter with the largest relative error
  int nonzero_expert_tensors = 0;
  bool ran = false;
};

std::vector<double> host_values(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  if (t.dtype() == DType::f64)
    std::copy_n(t.data<double>(), v.size(), v.begin());
  else
    std::copy_n(t.data<float>(), v.size(), v.begin());
  return v;
}

// Compares arena `got` (a rank's) with `want` (the reference's shard for that rank), tensor
// by tensor. An all-zero reference tensor (an expert without rows) must come out exactly 0.
void compare_arenas(const ParamArena& got, const ParamArena& want, RankResult& out) {
  for (const ParamSlot& p : want.slots()) {
    const std::vector<double> y = host_values(*p.slot), x = host_values(*got.slot(p.name).slot);
    double err = 0.0, scale = 0.0;
    for (size_t i = 0; i < x.size(); ++i) {
      err = std::max(err, std::fabs(x[i] - y[i]));
      scale = std::max(scale, std::fabs(y[i]));
    }
    const double rel = scale > 0.0 ? err / scale : (err > 0.0 ? 1.0 : 0.0);
    if (rel >= out.max_rel_err) {
      out.max_rel_err = rel;
      out.worst = p.name;
    }
    out.nonzero_expert_tensors += p.expert && scale > 0.0;
  }
}

// Runs forward + backward + all_reduce_grads on W ranks. `plans_for(rank_loads)` gives the
// placements (null = the trivial plan) from every rank's per-layer load; with `slots` > 0
// the ranks use CommReplicaSlots.
using PlanMaker =
    std::function<std::vector<LayerPlacement>(const std::vector<LoadMatrix>& load_per_layer)>;

std::vector<RankResult> run_ranks(const ModelConfig& c, DType dt, int W, const Batch& batch,
                                  const RoutingTrace& routes, const Objective& o,
                                  const Reference& ref, const PlanMaker& plans_for = nullptr,
                                  int64_t slots = 0) {
  const auto parts = partition(W);
  // The global load matrix of each MoE layer (what a planner would get from the traces).
  std::vector<LoadMatrix> load(static_cast<size_t>(c.n_moe_layers()),
                               LoadMatrix(static_cast<size_t>(c.n_experts),
                                          std::vector<int64_t>(static_cast<size_t>(W), 0)));
  for (int r = 0; r < W; ++r)
    for (int64_t m = 0; m < c.n_moe_layers(); ++m) {
      const std::vector<int64_t> l = expert_load(routes, m, batch.seq_offsets[parts[r].first],
                                                 batch.seq_offsets[parts[r].second]);
      for (int64_t e = 0; e < c.n_experts; ++e) load[m][e][r] = l[e];
    }
  const std::vector<LayerPlacement> plans =
      plans_for ? plans_for(load) : std::vector<LayerPlacement>{};

  std::vector<RankResult> out(static_cast<size_t>(W));
  run_inprocess(W, kTimeout, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    MoeTransformer model(c, *backend, param_dtype(dt), {.comm = &comm});
    model.init_weights(7);
    if (dt == DType::bf16) model.set_compute_dtype(DType::bf16);
    std::unique_ptr<CommReplicaSlots> replicas;
    if (slots > 0) {
      replicas = std::make_unique<CommReplicaSlots>(model, slots);
      // Slot weights in the compute dtype (bf16 moves half the bytes), gradients in f32/f64.
      EXPECT_EQ(replicas->slot_weights(0).w_down.dtype(), dt);
      EXPECT_EQ(replicas->slot_grads(0).w_down.dtype(), param_dtype(dt));
      model.set_replica_weights(replicas.get());
      replicas->load(plans);
    }
    const auto [first, last] = parts[rank];
    const int64_t begin = batch.seq_offsets[first], end = batch.seq_offsets[last];
    const Batch mine = sub_batch(batch, first, last);
    const RoutingTrace my_routes = sub_trace(routes, begin, end);
    const ForwardResult& r = model.forward(
        mine,
        {.replay = &my_routes, .training = false, .placements = plans_for ? &plans : nullptr});
    RankResult& res = out[rank];
    res.token_terms = token_terms(o, r, begin);
    res.balance_loss = r.balance_loss;
    res.logp = r.logp;
    model.zero_grad();
    model.backward(slice(o.c_logp, begin, end), slice(o.c_entropy, begin, end), o.balance_scale);
    if (replicas) replicas->reduce_grads();
    model.all_reduce_grads();
    ParamArena expected(c, *backend, param_dtype(dt), W);
    copy_param_shard(*backend, ref.model->grads(), expected, rank);
    compare_arenas(model.grads(), expected, res);
    res.ran = true;
  });
  return out;
}

// Checks W ranks against the reference: the objective (token terms summed over ranks plus
// the balance term once), every rank's log-probs and every rank's gradient shard.
void expect_matches(const Reference& ref, const std::vector<RankResult>& ranks, const Objective& o,
                    const Batch& batch, int W, double tol) {
  const auto parts = partition(W);
  double objective = o.balance_scale * ranks[0].balance_loss;
  for (int r = 0; r < W; ++r) {
    const RankResult& res = ranks[r];
    ASSERT_TRUE(res.ran);
    objective += res.token_terms;
    EXPECT_NEAR(res.balance_loss, ref.balance_loss, tol * std::fabs(ref.balance_loss))
        << "rank " << r;
    const int64_t begin = batch.seq_offsets[parts[r].first];
    for (size_t n = 0; n < res.logp.size(); ++n)
      EXPECT_NEAR(res.logp[n], ref.logp[begin + n], tol * 10) << "rank " << r << " token " << n;
    EXPECT_GT(res.nonzero_expert_tensors, 0) << "rank " << r;
    EXPECT_LE(res.max_rel_err, tol) << "rank " << r << ": " << res.worst;
  }
  EXPECT_NEAR(objective, ref.objective, tol * (1.0 + std::fabs(ref.objective)));
}

void check_against_single_rank(DType dt, int W, double tol) {
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  const Objective o = random_objective(batch.size(), 9);
  const Reference ref = single_rank(c, dt, batch, routes, o);
  expect_matches(ref, run_ranks(c, dt, W, batch, routes, o, ref), o, batch, W, tol);
}

// fp32: the ranks sum the same terms in other orders (expert-gradient rows by source rank,
// the router statistics and replicated gradients over ranks), each ~1e-7 relative; through
// a few layers that stays well below 2e-5 of the largest gradient.
TEST(ExpertParallel, TwoRanksMatchSingleRankFloat32) {
  check_against_single_rank(DType::f32, 2, 2e-5);
}

TEST(ExpertParallel, FourRanksMatchSingleRankFloat32) {
  check_against_single_rank(DType::f32, 4, 2e-5);
}

// fp64: the same reorderings at ~1e-16 relative.
TEST(ExpertParallel, FourRanksMatchSingleRankFloat64) {
  check_against_single_rank(DType::f64, 4, 1e-12);
}

// Mixed precision (bf16 compute, f32 master weights and gradients): the ranks exchange bf16
// rows and keep the router f32, as the single rank does. On the CPU a row's GEMM result
// does not depend on the other rows, so the bf16 activations and the log-probs come out as
// at W = 1; what differs is the order of the f32 sums over ranks (the gradients' all-reduce,
// expert gradient rows by source), 2e-7 of a tensor's largest gradient as measured, under
// the 1e-6 allowed. A token sent to the wrong expert or rank, or a bf16 rounding step
// (2^-8), errs by far more.
TEST(ExpertParallel, TwoAndFourRanksMatchSingleRankInMixedPrecision) {
  check_against_single_rank(DType::bf16, 2, 1e-6);
  check_against_single_rank(DType::bf16, 4, 1e-6);
}

TEST(ExpertParallel, UnevenRoutingLeavesPeersAndExpertsEmpty) {
  // The premise of the tests above: rank 0 sends nothing to any peer, and with W = 4 rank 3
  // receives nothing for expert 7 in MoE layer 0.
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  EXPECT_EQ(expert_load(routes, 0, 0, batch.size())[7], 0);
  const std::vector<int64_t> rank0 = expert_load(routes, 1, 0, 1);
  EXPECT_EQ(rank0[0] + rank0[1], 2);
}

// A random valid plan per layer: S slots per rank holding random experts (or nothing), and
// each (expert, source) load split at random over the expert's instances in random order.
std::vector<LayerPlacement> random_plans(const std::vector<LoadMatrix>& load, int W, int64_t S,
                                         uint64_t seed) {
  Rng rng(seed, 11);
  std::vector<LayerPlacement> plans;
  for (const LoadMatrix& l : load) {
    const int32_t E = static_cast<int32_t>(l.size());
    LayerPlacement p = trivial_placement(l, W, static_cast<int32_t>(S));
    for (int r = 0; r < W; ++r)
      for (int64_t s = 0; s < S; ++s)
        p.slots[r][s] = static_cast<int32_t>(rng.next_below(E + 1)) - 1;
    for (int32_t e = 0; e < E; ++e) {
      std::vector<ExpertInstance> inst = {{p.home_rank(e), ExpertInstance::kHomeSlot}};
      for (int r = 0; r < W; ++r)
        for (int32_t s = 0; s < S; ++s)
          if (p.slots[r][s] == e) inst.push_back({r, s});
      for (int r = 0; r < W; ++r) {
        for (size_t i = inst.size(); i > 1; --i) std::swap(inst[i - 1], inst[rng.next_below(i)]);
        p.split[e][r].clear();
        int64_t left = l[e][r];
        for (size_t i = 0; i < inst.size(); ++i) {
          const int64_t t =
              i + 1 == inst.size() ? left : static_cast<int64_t>(rng.next_below(left + 1));
          p.split[e][r].push_back({inst[i], t});
          left -= t;
        }
      }
    }
    validate_placement(p, l, "random plan");
    plans.push_back(std::move(p));
  }
  return plans;
}

// Shares to replica slots on any rank (the slot weights copied from the home rank, the
// slot gradients sent back and added there) give the results of the trivial plan.
void check_random_plans_with_replicas(DType dt, double tol) {
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  const Objective o = random_objective(batch.size(), 9);
  const Reference ref = single_rank(c, dt, batch, routes, o);
  for (uint64_t seed : {1, 2, 3}) {
    const int W = seed == 1 ? 2 : 4;
    int64_t slot_rows = 0;
    const auto plans = [&](const std::vector<LoadMatrix>& load) {
      std::vector<LayerPlacement> p = random_plans(load, W, 3, seed);
      for (const LayerPlacement& l : p)
        for (const auto& by_source : l.split)
          for (const auto& shares : by_source)
            for (const TokenShare& s : shares) slot_rows += s.instance.is_home() ? 0 : s.tokens;
      return p;
    };
    const auto ranks = run_ranks(c, dt, W, batch, routes, o, ref, plans, 3);
    EXPECT_GT(slot_rows, 10) << "the random plans barely use the replica slots";
    expect_matches(ref, ranks, o, batch, W, tol);
  }
}

TEST(ExpertParallel, RandomPlansWithReplicasMatchSingleRank) {
  check_random_plans_with_replicas(DType::f64, 1e-12);
}

// Mixed precision: the slots receive the f32 master weights rounded to bf16 on the home rank,
// the bits of the home experts' bf16 compute copy, so a replica computes what its home expert
// would (were the slots computing in f32, the rows they take would differ from W = 1 by bf16
// rounding steps); tolerance as for TwoAndFourRanksMatchSingleRankInMixedPrecision.
TEST(ExpertParallel, RandomPlansWithReplicasMatchSingleRankInMixedPrecision) {
  check_random_plans_with_replicas(DType::bf16, 1e-6);
}

TEST(ExpertParallel, ExplicitTrivialPlanMatchesSingleRank) {
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  const Objective o = random_objective(batch.size(), 9);
  const Reference ref = single_rank(c, DType::f64, batch, routes, o);
  const auto trivial = [](const std::vector<LoadMatrix>& load) {
    std::vector<LayerPlacement> p;
    for (const LoadMatrix& l : load) p.push_back(trivial_placement(l, 4));
    return p;
  };
  expect_matches(ref, run_ranks(c, DType::f64, 4, batch, routes, o, ref, trivial), o, batch, 4,
                 1e-12);
}

TEST(ExpertParallel, InitGivesEachRankItsSliceOfTheSingleRankWeights) {
  const ModelConfig c = ep_config();
  auto backend = make_cpu_backend();
  MoeTransformer full(c, *backend, DType::f32);
  full.init_weights(7);
  std::vector<std::vector<float>> got(4), want(4);
  run_inprocess(4, kTimeout, [&](int rank, Communicator& comm) {
    auto b = make_cpu_backend();
    MoeTransformer model(c, *b, DType::f32, {.comm = &comm});
    model.init_weights(7);
    ParamArena expected(c, *b, DType::f32, 4);
    copy_param_shard(*b, full.params(), expected, rank);
    const Tensor& p = model.params().flat();
    got[rank].assign(p.data<float>(), p.data<float>() + p.numel());
    want[rank].assign(expected.flat().data<float>(), expected.flat().data<float>() + p.numel());
    EXPECT_EQ(model.params().weights().layers[1].experts.w_gate.dim(0), 2);
  });
  for (int r = 0; r < 4; ++r) EXPECT_EQ(got[r], want[r]) << "rank " << r;  // bit-identical
}

TEST(ExpertParallel, SlotsMadeBeforeBf16ComputeAreAnError) {
  // The slots take the compute dtype when they are made; switching the model to bf16 later
  // would send bf16 rows into f32 slots: refused on every rank, naming the fix.
  const ModelConfig c = ep_config();
  run_inprocess(2, kTimeout, [&](int, Communicator& comm) {
    auto b = make_cpu_backend();
    MoeTransformer model(c, *b, DType::f32, {.comm = &comm});
    CommReplicaSlots slots(model, 1);
    model.set_compute_dtype(DType::bf16);
    LayerPlacement p;
    p.world_size = 2;
    p.n_experts = static_cast<int32_t>(c.n_experts);
    p.replica_slots = 1;
    p.slots = {{-1}, {-1}};
    const std::vector<LayerPlacement> plans(static_cast<size_t>(c.n_moe_layers()), p);
    EXPECT_THAT([&] { slots.load(plans); },
                ::testing::ThrowsMessage<Error>(::testing::HasSubstr(
                    "the slots hold f32 weights but the model computes in bf16 (set the compute "
                    "dtype before making the slots)")));
  });
}

TEST(ExpertParallel, GroupOfOneIsTheSingleRankModel) {
  // A communicator of one rank takes the single-rank code path: bit-identical results.
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  auto backend = make_cpu_backend();
  MoeTransformer plain(c, *backend, DType::f32);
  plain.init_weights(7);
  const std::vector<double> want = plain.forward(batch).logp;
  run_inprocess(1, kTimeout, [&](int, Communicator& comm) {
    MoeTransformer model(c, *backend, DType::f32, {.comm = &comm});
    model.init_weights(7);
    EXPECT_EQ(model.ep_world(), 1);
    EXPECT_EQ(model.forward(batch).logp, want);
  });
}

TEST(ExpertParallel, BalanceStatisticsAreGlobal) {
  // Every balancing method over W = 4 ranks gives the single-rank losses and state: two
  // training micro-batches (global_aux's f spans both), a step end (loss_free's bias, phi's
  // EMA), then a forward that selects top-k with the updated bias.
  for (const char* method :
       {"method: switch_aux\n    alpha: 0.1", "method: global_aux\n    alpha: 0.1",
        "method: loss_free\n    bias_rate: 0.01", "method: phi\n    alpha: 0.2"}) {
    SCOPED_TRACE(method);
    const ModelConfig c = ep_config(method);
    const Batch a = testing::random_batch(c, kLengths, 3),
                b = testing::random_batch(c, kLengths, 5);
    auto backend = make_cpu_backend();
    MoeTransformer full(c, *backend, DType::f64);
    full.init_weights(7);
    std::vector<double> want = {full.forward(a).balance_loss, full.forward(b).balance_loss};
    full.end_balance_step();
    const ForwardResult& after = full.forward(a, {.training = false});
    want.push_back(after.balance_loss);
    const RoutingTrace want_routes = after.routes;
    const std::vector<LayerBalanceState> want_state = full.balance_state();
    if (c.balance.method == BalanceMethod::loss_free) {
      ASSERT_NE(want_state[0].bias, std::vector<double>(8, 0.0)) << "the bias did not move";
    }

    const auto parts = partition(4);
    run_inprocess(4, kTimeout, [&](int rank, Communicator& comm) {
      auto be = make_cpu_backend();
      MoeTransformer model(c, *be, DType::f64, {.comm = &comm});
      model.init_weights(7);
      const auto [first, last] = parts[rank];
      const Batch ma = sub_batch(a, first, last), mb = sub_batch(b, first, last);
      std::vector<double> got = {model.forward(ma).balance_loss, model.forward(mb).balance_loss};
      model.end_balance_step();
      const ForwardResult& r = model.forward(ma, {.training = false});
      got.push_back(r.balance_loss);
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_NEAR(got[i], want[i], 1e-12 * (1 + std::fabs(want[i]))) << "forward " << i;
      EXPECT_EQ(r.routes.ids,
                sub_trace(want_routes, a.seq_offsets[first], a.seq_offsets[last]).ids);
      for (size_t m = 0; m < want_state.size(); ++m) {
        EXPECT_EQ(model.balance_state()[m].bias, want_state[m].bias);
        for (size_t e = 0; e < want_state[m].ema.size(); ++e)
          EXPECT_NEAR(model.balance_state()[m].ema[e], want_state[m].ema[e], 1e-14);
      }
    });
  }
}

TEST(ExpertParallel, AdamWStepMatchesSingleRank) {
  // One AdamW step per rank on its own arena (replicated grads all-reduced, the clip from
  // the global norm), then a forward: the single-rank loss.
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  const Objective o = random_objective(batch.size(), 9);
  OptimizerConfig oc;
  oc.lr = 1e-2;
  oc.grad_clip = 0.05;  // far below the gradient norm (~60): the clip scale must be global
  // Adam's first update is ~lr * sign(g) where |g| >> eps: an entry whose gradient is at fp32
  // noise level (~1e-6 of the largest) could flip its update. eps ~ the clipped gradients'
  // size makes the update proportional to g there, and the clip scale visible in the loss.
  oc.eps = 1e-4;
  auto backend = make_cpu_backend();
  MoeTransformer full(c, *backend, DType::f32);
  full.init_weights(7);
  AdamW opt(oc, full.params(), *backend);
  const ForwardResult& first = full.forward(batch, {.replay = &routes});
  const double before = token_terms(o, first, 0) + o.balance_scale * first.balance_loss;
  full.zero_grad();
  full.backward(o.c_logp, o.c_entropy, o.balance_scale);
  const StepReport rep = opt.step(full.grads());
  ASSERT_GT(rep.grad_norm, oc.grad_clip);
  const ForwardResult& after = full.forward(batch, {.replay = &routes, .training = false});
  const double want = token_terms(o, after, 0) + o.balance_scale * after.balance_loss;

  const auto parts = partition(4);
  std::vector<double> terms(4), balance(4), norms(4);
  run_inprocess(4, kTimeout, [&](int rank, Communicator& comm) {
    auto be = make_cpu_backend();
    MoeTransformer model(c, *be, DType::f32, {.comm = &comm});
    model.init_weights(7);
    AdamW ranks_opt(oc, model.params(), *be);
    const auto [first, last] = parts[rank];
    const int64_t begin = batch.seq_offsets[first], end = batch.seq_offsets[last];
    const Batch mine = sub_batch(batch, first, last);
    const RoutingTrace my_routes = sub_trace(routes, begin, end);
    model.forward(mine, {.replay = &my_routes});
    model.zero_grad();
    model.backward(slice(o.c_logp, begin, end), slice(o.c_entropy, begin, end), o.balance_scale);
    model.all_reduce_grads();
    norms[rank] = ranks_opt.step(model.grads(), model.grad_norm()).grad_norm;
    const ForwardResult& r = model.forward(mine, {.replay = &my_routes, .training = false});
    terms[rank] = token_terms(o, r, begin);
    balance[rank] = r.balance_loss;
  });
  double got = o.balance_scale * balance[0];
  for (int r = 0; r < 4; ++r) {
    got += terms[r];
    EXPECT_NEAR(norms[r], rep.grad_norm, 1e-5 * rep.grad_norm);
  }
  // fp32 after one step of lr 1e-2: the parameter differences (~1e-7 relative, Adam's
  // normalised update amplifies none of it beyond ~lr * 1e-5) keep the loss within 1e-5.
  EXPECT_NEAR(got, want, 1e-5 * (1 + std::fabs(want)));
  EXPECT_GT(std::fabs(want - before), 0.1) << "the step barely changed the objective";
}

TEST(ExpertParallel, LmLossIsTheMeanOverAllRanksTargets) {
  // Rank 0's only token has no target: the mean and its gradient are global all the same.
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  auto backend = make_cpu_backend();
  MoeTransformer full(c, *backend, DType::f64);
  full.init_weights(7);
  full.zero_grad();
  const double want = full.lm_loss_and_backward(batch, {.replay = &routes}, 0.5);
  const auto parts = partition(4);
  std::vector<double> got(4);
  std::vector<RankResult> grads(4);
  run_inprocess(4, kTimeout, [&](int rank, Communicator& comm) {
    auto be = make_cpu_backend();
    MoeTransformer model(c, *be, DType::f64, {.comm = &comm});
    model.init_weights(7);
    const auto [first, last] = parts[rank];
    const RoutingTrace mine = sub_trace(routes, batch.seq_offsets[first], batch.seq_offsets[last]);
    model.zero_grad();
    got[rank] = model.lm_loss_and_backward(sub_batch(batch, first, last), {.replay = &mine}, 0.5);
    model.all_reduce_grads();
    ParamArena expected(c, *be, DType::f64, 4);
    copy_param_shard(*be, full.grads(), expected, rank);
    compare_arenas(model.grads(), expected, grads[rank]);
  });
  for (int r = 0; r < 4; ++r) {
    EXPECT_NEAR(got[r], want, 1e-12 * std::fabs(want)) << "rank " << r;
    EXPECT_LE(grads[r].max_rel_err, 1e-12) << "rank " << r << ": " << grads[r].worst;
  }
}

// Runs fn on W ranks and returns every rank's error message ("" when it did not throw).
std::vector<std::string> errors_of(int W, milliseconds timeout,
                                   const std::function<void(int, Communicator&)>& fn) {
  std::vector<std::string> errors(static_cast<size_t>(W));
  run_inprocess(W, timeout, [&](int rank, Communicator& comm) {
    try {
      fn(rank, comm);
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  });
  return errors;
}

TEST(ExpertParallel, WorldSizeNotDividingExpertsIsAnErrorOnEveryRank) {
  const ModelConfig c = ep_config();  // 8 experts
  auto backend = make_cpu_backend();
  const auto errors = errors_of(3, kTimeout, [&](int, Communicator& comm) {
    MoeTransformer model(c, *backend, DType::f32, {.comm = &comm});
  });
  for (const std::string& e : errors)
    EXPECT_THAT(e, ::testing::HasSubstr("8 experts, which 3 ranks cannot split evenly"));
}

TEST(ExpertParallel, PlanNotMatchingLocalLoadFailsOnEveryRankWithoutWaiting) {
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  const auto parts = partition(2);
  // Rank 1's column of MoE layer 1 moves one token from its first expert to another.
  std::vector<LayerPlacement> plans;
  for (int64_t m = 0; m < c.n_moe_layers(); ++m) {
    LoadMatrix load(static_cast<size_t>(c.n_experts), std::vector<int64_t>(2, 0));
    for (int r = 0; r < 2; ++r) {
      const auto l = expert_load(routes, m, batch.seq_offsets[parts[r].first],
                                 batch.seq_offsets[parts[r].second]);
      for (int64_t e = 0; e < c.n_experts; ++e) load[e][r] = l[e];
    }
    if (m == 1) {
      int64_t e = 0;
      while (load[e][1] == 0) ++e;
      --load[e][1];
      ++load[(e + 1) % c.n_experts][1];
    }
    plans.push_back(trivial_placement(load, 2));
  }
  const milliseconds timeout{5000};
  const auto start = std::chrono::steady_clock::now();
  const auto errors = errors_of(2, timeout, [&](int rank, Communicator& comm) {
    auto be = make_cpu_backend();
    MoeTransformer model(c, *be, DType::f32, {.comm = &comm});
    model.init_weights(7);
    const auto [first, last] = parts[rank];
    const RoutingTrace mine = sub_trace(routes, batch.seq_offsets[first], batch.seq_offsets[last]);
    model.forward(sub_batch(batch, first, last), {.replay = &mine, .placements = &plans});
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, timeout) << "a rank waited for a timeout";
  EXPECT_THAT(errors[1], ::testing::HasSubstr("MoE layer 1 on rank 1"));
  EXPECT_THAT(errors[1], ::testing::HasSubstr("shares add up to"));
  EXPECT_THAT(errors[0], ::testing::HasSubstr("MoE layer 1 on rank 0: rank 1 could not run"));
}

TEST(ExpertParallel, ReplicaSharesWithoutReplicaWeightsAreAnError) {
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  const auto parts = partition(2);
  std::vector<LoadMatrix> load(static_cast<size_t>(c.n_moe_layers()),
                               LoadMatrix(8, std::vector<int64_t>(2, 0)));
  for (int r = 0; r < 2; ++r)
    for (int64_t m = 0; m < c.n_moe_layers(); ++m) {
      const auto l = expert_load(routes, m, batch.seq_offsets[parts[r].first],
                                 batch.seq_offsets[parts[r].second]);
      for (int64_t e = 0; e < 8; ++e) load[m][e][r] = l[e];
    }
  const std::vector<LayerPlacement> plans = random_plans(load, 2, 2, 5);
  const auto errors = errors_of(2, kTimeout, [&](int rank, Communicator& comm) {
    auto be = make_cpu_backend();
    MoeTransformer model(c, *be, DType::f32, {.comm = &comm});
    model.init_weights(7);
    const auto [first, last] = parts[rank];
    const RoutingTrace mine = sub_trace(routes, batch.seq_offsets[first], batch.seq_offsets[last]);
    model.forward(sub_batch(batch, first, last), {.replay = &mine, .placements = &plans});
  });
  bool named = false;
  for (const std::string& e : errors) {
    EXPECT_FALSE(e.empty());
    named = named || e.find("no replica weights") != std::string::npos;
  }
  EXPECT_TRUE(named);
}

TEST(ExpertParallel, SingleRankChecksPlansAgainstItsLoad) {
  const ModelConfig c = ep_config();
  const Batch batch = testing::random_batch(c, kLengths, 3);
  const RoutingTrace routes = uneven_routes(c, batch.size(), 4);
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, DType::f32);
  model.init_weights(7);
  std::vector<LayerPlacement> plans;
  for (int64_t m = 0; m < c.n_moe_layers(); ++m) {
    LoadMatrix load(8, std::vector<int64_t>(1, 0));
    const auto l = expert_load(routes, m, 0, batch.size());
    for (int64_t e = 0; e < 8; ++e) load[e][0] = l[e];
    plans.push_back(trivial_placement(load, 1));
  }
  const std::vector<double> want = model.forward(batch, {.replay = &routes}).logp;
  EXPECT_EQ(model.forward(batch, {.replay = &routes, .placements = &plans}).logp, want);
  plans[0].split[1][0][0].tokens += 1;
  EXPECT_THAT([&] { model.forward(batch, {.replay = &routes, .placements = &plans}); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("MoE layer 0: expert 1")));
}

}  // namespace
}  // namespace fm
