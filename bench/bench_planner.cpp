// Planner latency per MoE layer (balancer/planner.h): the time one plan() call takes for one
// layer of one micro-step, at W = 8..64 ranks, E = 64..256 experts, top-k 2 and 8, S = 2
// replica slots per rank, nodes of G = min(W, 8) GPUs. Target (issue 6): foresight <= 50 us at
// W = 64, E = 128, K = 8 on one core, so planning micro-step i + 1 hides behind micro-step i.
//
// Loads are realistic in size and skew: a synthetic trace (balancer/synthetic_trace.h, Zipf 1.0,
// drift 0.02) cut the trace_stats way into micro-steps of 16 sequences x 512 tokens per rank;
// four consecutive micro-steps of one layer are planned in turn with one reused LayerPlacement,
// as the trainer would (so foresight sees its previous plan and the hot path allocates nothing).
//
//   BM_Foresight        foresight's plan(): targets, replica placement, token split.
//   BM_StepEmaMicroStep step_ema's per-micro-step work (its fixed replica set's equal split);
//                       its once-per-step replica placement runs in begin_step, outside.
//   BM_None             static expert parallelism: just writing the plan, the floor for any
//                       planner emitting the E x W split lists of balancer/placement.h.
// Counters: max/mean rank load and ratio to the lower bound (balancer/plan_metrics.h) of the
// plans, averaged over the four micro-steps, and the replicas a plan uses.
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <tuple>
#include <vector>

#include "balancer/load_matrix.h"
#include "balancer/plan_metrics.h"
#include "balancer/planner.h"
#include "balancer/synthetic_trace.h"

namespace {

using fm::LoadMatrix;

constexpr int32_t kSlots = 2;
constexpr int64_t kSeqPerRank = 16, kSeqLen = 512, kMicroSteps = 4;

fm::Topology topology(int32_t W) {
  const int32_t G = W < 8 ? W : 8;
  return fm::Topology{W / G, G};
}

// Four consecutive micro-steps' load matrices (one MoE layer), cached per (W, E, K).
const std::vector<LoadMatrix>& loads(int32_t W, int32_t E, int32_t K) {
  static std::map<std::tuple<int32_t, int32_t, int32_t>, std::vector<LoadMatrix>> cache;
  auto [it, fresh] = cache.try_emplace({W, E, K});
  if (fresh) {
    fm::SyntheticTraceOptions o;
    o.n_experts = E;
    o.top_k = K;
    o.n_moe_layers = 1;
    o.sequences = W * kSeqPerRank * kMicroSteps;
    o.seq_len = kSeqLen;
    o.skew = 1.0;
    o.drift = 0.02;
    o.seed = 1;
    const fm::RoutingTrace trace = fm::synthetic_trace(o);
    for (auto& per_layer :
         fm::load_matrices(trace, fm::consecutive_assignment(trace, W, kSeqPerRank)))
      it->second.push_back(per_layer[0]);
  }
  return it->second;
}

void run(benchmark::State& state, const char* name) {
  const int32_t W = static_cast<int32_t>(state.range(0)), E = static_cast<int32_t>(state.range(1)),
                K = static_cast<int32_t>(state.range(2));
  const std::vector<LoadMatrix>& micro = loads(W, E, K);
  fm::PlannerConfig c;
  c.name = name;
  c.topology = topology(W);
  c.n_experts = E;
  c.replica_slots = kSlots;
  auto planner = fm::make_planner(c);
  // step_ema: one step of history, then the step being measured.
  std::vector<std::vector<LoadMatrix>> step;
  for (const LoadMatrix& l : micro) step.push_back({l});
  const auto totals = fm::step_expert_load(step);
  planner->begin_step(totals);
  planner->begin_step(totals);

  fm::LayerPlacement out;
  for (const LoadMatrix& l : micro) planner->plan(0, l, out);  // warm: capacities, prev plan
  size_t i = 0;
  for (auto _ : state) {
    planner->plan(0, micro[i], out);
    benchmark::DoNotOptimize(out.split.data());
    i = (i + 1) % micro.size();
  }
  double ratio = 0, bound = 0, replicas = 0;
  for (const LoadMatrix& l : micro) {
    planner->plan(0, l, out);
    const fm::PlanMetrics m = fm::plan_metrics(out, l, c.topology, nullptr, 0);
    ratio += m.max_over_mean;
    bound += m.ratio_to_bound;
    replicas += m.replicas;
  }
  const double n = static_cast<double>(micro.size());
  state.counters["max/mean"] = ratio / n;
  state.counters["to_bound"] = bound / n;
  state.counters["replicas"] = replicas / n;
}

void args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"W", "E", "K"});
  for (int64_t W : {8, 16, 32, 64})
    for (int64_t E : {64, 128, 256})
      for (int64_t K : {2, 8}) b->Args({W, E, K});
  b->Unit(benchmark::kMicrosecond);
}

void BM_Foresight(benchmark::State& s) {
  run(s, "foresight");
}
void BM_StepEmaMicroStep(benchmark::State& s) {
  run(s, "step_ema");
}
void BM_None(benchmark::State& s) {
  run(s, "none");
}

BENCHMARK(BM_Foresight)->Apply(args);
BENCHMARK(BM_StepEmaMicroStep)->Apply(args);
BENCHMARK(BM_None)->Apply(args);

}  // namespace

BENCHMARK_MAIN();
