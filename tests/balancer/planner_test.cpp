// The planners (balancer/planner.h): invariants on random loads for all four, the quality
// order on skewed synthetic traces, the extreme one-hot-expert case, locality of the foresight
// split on hand-built loads, determinism, replica reuse, and malformed config and input.
#include "balancer/planner.h"

#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include "balancer/load_matrix.h"
#include "balancer/plan_metrics.h"
#include "balancer/synthetic_trace.h"

namespace fm {
namespace {

const char* const kPlanners[] = {"none", "step_ema", "step_oracle", "foresight"};

PlannerConfig config(const std::string& name, Topology topo, int32_t E, int32_t S,
                     int32_t layers = 1) {
  PlannerConfig c;
  c.name = name;
  c.topology = topo;
  c.n_experts = E;
  c.replica_slots = S;
  c.n_moe_layers = layers;
  return c;
}

// Random load: a few hot experts (up to 50x the others), some zero rows and zero entries.
LoadMatrix random_load(int32_t E, int32_t W, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> pct(0, 99);
  LoadMatrix load(E, std::vector<int64_t>(W, 0));
  for (int32_t e = 0; e < E; ++e) {
    const int p = pct(rng);
    if (p < 15) continue;  // an idle expert
    const int64_t scale = p < 25 ? 50 : p < 50 ? 5 : 1;
    for (int32_t r = 0; r < W; ++r)
      if (pct(rng) >= 20) load[e][r] = scale * static_cast<int64_t>(pct(rng));
  }
  return load;
}

std::vector<std::vector<int64_t>> expert_totals(const std::vector<LoadMatrix>& layers) {
  std::vector<std::vector<int64_t>> out;
  for (const LoadMatrix& load : layers) {
    std::vector<int64_t> t(load.size(), 0);
    for (size_t e = 0; e < load.size(); ++e)
      for (int64_t c : load[e]) t[e] += c;
    out.push_back(t);
  }
  return out;
}

// What every plan of every planner must satisfy beyond validate_placement: no rank holds an
// expert twice or a replica of its own home expert, and no rank beats the lower bound.
void expect_plan_invariants(const LayerPlacement& p, const LoadMatrix& load, const Topology& topo,
                            const std::string& what) {
  ASSERT_NO_THROW(validate_placement(p, load, what)) << what;
  for (int32_t r = 0; r < p.world_size; ++r) {
    std::set<int32_t> held;
    ASSERT_EQ(static_cast<int32_t>(p.slots[r].size()), p.replica_slots) << what;
    for (int32_t e : p.slots[r]) {
      if (e < 0) continue;
      EXPECT_NE(p.home_rank(e), r) << what << ": rank " << r << " replicates its own expert " << e;
      EXPECT_TRUE(held.insert(e).second)
          << what << ": rank " << r << " holds expert " << e << " twice";
    }
  }
  const PlanMetrics m = plan_metrics(p, load, topo, nullptr, 1);
  EXPECT_GE(m.max_load, m.lower_bound) << what << ": the lower bound is not one";
}

// The same slots and the same non-empty shares in the same order (shares of 0 tokens carry
// nothing: trivial_placement writes them, the planners do not).
bool same_plan(const LayerPlacement& a, const LayerPlacement& b) {
  if (a.slots != b.slots || a.split.size() != b.split.size()) return false;
  auto nonzero = [](const std::vector<TokenShare>& v) {
    std::vector<std::pair<ExpertInstance, int64_t>> out;
    for (const TokenShare& s : v)
      if (s.tokens != 0) out.emplace_back(s.instance, s.tokens);
    return out;
  };
  for (size_t e = 0; e < a.split.size(); ++e) {
    if (a.split[e].size() != b.split[e].size()) return false;
    for (size_t r = 0; r < a.split[e].size(); ++r)
      if (nonzero(a.split[e][r]) != nonzero(b.split[e][r])) return false;
  }
  return true;
}

void expect_error(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << fragment;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(Planner, EveryPlannerKeepsInvariantsOnRandomLoads) {
  std::mt19937_64 rng(11);
  for (const Topology topo : {Topology{1, 4}, Topology{2, 4}, Topology{4, 2}, Topology{3, 1}})
    for (int32_t S : {0, 1, 3})
      for (const char* name : kPlanners) {
        const int32_t W = topo.world_size(), E = 2 * W, L = 2;
        auto planner = make_planner(config(name, topo, E, S, L));
        LayerPlacement out;  // reused across calls, as the hot path does
        for (int step = 0; step < 3; ++step) {
          std::vector<std::vector<LoadMatrix>> micro(4);
          for (auto& m : micro)
            for (int32_t l = 0; l < L; ++l) m.push_back(random_load(E, W, rng));
          micro[1][0] = LoadMatrix(E, std::vector<int64_t>(W, 0));  // an empty micro-step
          planner->begin_step(step_expert_load(micro));
          for (size_t m = 0; m < micro.size(); ++m)
            for (int32_t l = 0; l < L; ++l) {
              const std::string what = std::string(name) + " W=" + std::to_string(W) +
                                       " S=" + std::to_string(S) + " step " + std::to_string(step) +
                                       " micro-step " + std::to_string(m) + " layer " +
                                       std::to_string(l);
              planner->plan(l, micro[m][l], out);
              expect_plan_invariants(out, micro[m][l], topo, what);
              if (std::string(name) == "none") {
                EXPECT_TRUE(same_plan(out, trivial_placement(micro[m][l], W, S))) << what;
              }
              // The planner remembers exactly the slots it handed out.
              const auto prev = planner->previous_slots(l);
              for (int32_t r = 0; r < W; ++r)
                for (int32_t s = 0; s < S; ++s) ASSERT_EQ(prev[r * S + s], out.slots[r][s]) << what;
            }
        }
      }
}

// Mean over micro-steps and layers of max/mean rank load, steps 1.. of a run of `steps` RL
// steps of `micro` micro-steps each (step 0 only feeds step_ema's history).
struct RunResult {
  double max_over_mean = 0, ratio_to_bound = 0;
  int64_t bytes = 0;
};

RunResult run_planner(const std::string& name, const RoutingTrace& trace, Topology topo, int32_t S,
                      int64_t mb, int64_t micro, int64_t steps) {
  const int32_t W = topo.world_size();
  const auto loads = load_matrices(trace, consecutive_assignment(trace, W, mb));
  EXPECT_EQ(static_cast<int64_t>(loads.size()), micro * steps);
  const int32_t L = static_cast<int32_t>(trace.n_moe_layers);
  auto planner = make_planner(config(name, topo, static_cast<int32_t>(trace.n_experts), S, L));
  std::vector<LayerPlacement> prev(L), out(L);
  RunResult res;
  int64_t n = 0;
  for (int64_t t = 0; t < steps; ++t) {
    const std::vector<std::vector<LoadMatrix>> step(loads.begin() + t * micro,
                                                    loads.begin() + (t + 1) * micro);
    planner->begin_step(step_expert_load(step));
    for (const auto& per_layer : step)
      for (int32_t l = 0; l < L; ++l) {
        planner->plan(l, per_layer[l], out[l]);
        const PlanMetrics m =
            plan_metrics(out[l], per_layer[l], topo, prev[l].split.empty() ? nullptr : &prev[l], 1);
        prev[l] = out[l];
        if (t == 0) continue;
        res.max_over_mean += m.max_over_mean;
        res.ratio_to_bound += m.ratio_to_bound;
        res.bytes += m.bytes_moved;
        ++n;
      }
  }
  res.max_over_mean /= static_cast<double>(n);
  res.ratio_to_bound /= static_cast<double>(n);
  return res;
}

TEST(Planner, OnSkewedTracesForesightBeatsOracleBeatsEma) {
  // 8 ranks (2 nodes x 4), 64 experts, top-4, Zipf 1.2 with drifting popularity: skewed
  // micro-steps of 16 sequences, and step-level loads that move between RL steps.
  SyntheticTraceOptions o;
  o.n_experts = 64;
  o.top_k = 4;
  o.n_moe_layers = 2;
  o.seq_len = 64;
  o.skew = 1.2;
  o.drift = 0.05;
  o.seed = 3;
  const Topology topo{2, 4};
  const int64_t mb = 2, micro = 4, steps = 5;
  o.sequences = topo.world_size() * mb * micro * steps;
  const RoutingTrace trace = synthetic_trace(o);
  const RunResult none = run_planner("none", trace, topo, 2, mb, micro, steps);
  const RunResult ema = run_planner("step_ema", trace, topo, 2, mb, micro, steps);
  const RunResult oracle = run_planner("step_oracle", trace, topo, 2, mb, micro, steps);
  const RunResult fore = run_planner("foresight", trace, topo, 2, mb, micro, steps);
  const std::string numbers = "mean max/mean: none " + std::to_string(none.max_over_mean) +
                              ", step_ema " + std::to_string(ema.max_over_mean) + ", step_oracle " +
                              std::to_string(oracle.max_over_mean) + ", foresight " +
                              std::to_string(fore.max_over_mean) + "; foresight / bound " +
                              std::to_string(fore.ratio_to_bound);
  EXPECT_LT(ema.max_over_mean, none.max_over_mean) << numbers;
  EXPECT_LE(oracle.max_over_mean, ema.max_over_mean) << numbers;
  EXPECT_LT(fore.max_over_mean, oracle.max_over_mean) << numbers;
  // The target is foresight <= 1.10 max/mean wherever S >= 2; with 2 slots per rank
  // foresight should sit on the lower bound (measured: 1.0000), 2% is generous.
  EXPECT_LE(fore.max_over_mean, 1.10) << numbers;
  EXPECT_LE(fore.ratio_to_bound, 1.02) << numbers;
  RecordProperty("numbers", numbers);
  std::printf("%s\n", numbers.c_str());
}

TEST(Planner, OneHotExpertIsSpreadOverEverySlot) {
  // Every token of every rank goes to expert 5 (home: rank 2): the best plan puts a replica
  // of it on each of the other 7 ranks and splits 1/8 to each.
  const Topology topo{2, 4};
  const int32_t W = 8, E = 16;
  LoadMatrix load(E, std::vector<int64_t>(W, 0));
  for (int32_t r = 0; r < W; ++r) load[5][r] = 1000 + r;  // T = 8028, T / W = 1003.5
  for (const char* name : {"step_oracle", "foresight"}) {
    auto planner = make_planner(config(name, topo, E, 1));
    std::vector<int64_t> totals(E, 0);
    totals[5] = 8028;
    planner->begin_step({totals});
    const LayerPlacement p = planner->plan(0, load);
    expect_plan_invariants(p, load, topo, name);
    for (int32_t r = 0; r < W; ++r)
      if (r != 2) {
        EXPECT_EQ(p.slots[r][0], 5) << name << ": rank " << r;
      }
    const PlanMetrics m = plan_metrics(p, load, topo, nullptr, 1);
    EXPECT_EQ(m.lower_bound, 1004);
    // Foresight reaches the bound; the oracle's equal split is off by its rounding only.
    EXPECT_LE(m.max_load, std::string(name) == "foresight" ? 1004 : 1004 + 8) << name;
  }
}

TEST(Planner, ForesightSplitKeepsTokensOnTheirGpuAndNode) {
  // 2 nodes x 2 GPUs, 4 experts; expert 0 (home: rank 0, node 0) gets 100 tokens from each
  // rank of node 1, nothing else. T = 200, bound 50: node 0 may compute only 100 of them, so
  // 100 tokens must cross nodes; ranks 2 and 3 can compute 50 of their own each, so at least
  // 100 cross GPUs. The plan must reach the bound with exactly those minima.
  const Topology topo{2, 2};
  LoadMatrix load(4, std::vector<int64_t>(4, 0));
  load[0][2] = load[0][3] = 100;
  auto planner = make_planner(config("foresight", topo, 4, 1));
  const LayerPlacement p = planner->plan(0, load);
  expect_plan_invariants(p, load, topo, "foresight");
  const PlanMetrics m = plan_metrics(p, load, topo, nullptr, 1);
  EXPECT_EQ(m.rank_load, (std::vector<int64_t>{50, 50, 50, 50}));
  EXPECT_EQ(m.cross_node_tokens, 100);
  EXPECT_EQ(m.cross_gpu_tokens, 100);
  EXPECT_EQ(m.replicas, 3);
}

TEST(Planner, ForesightWithoutSlotsIsStaticAndAtTheBound) {
  std::mt19937_64 rng(5);
  const Topology topo{2, 2};
  auto planner = make_planner(config("foresight", topo, 8, 0));
  for (int i = 0; i < 5; ++i) {
    const LoadMatrix load = random_load(8, 4, rng);
    const LayerPlacement p = planner->plan(0, load);
    EXPECT_TRUE(same_plan(p, trivial_placement(load, 4, 0)));
    // With S = 0 the bound is the busiest home rank's load: nothing can do better.
    EXPECT_DOUBLE_EQ(plan_metrics(p, load, topo, nullptr, 1).ratio_to_bound, 1.0);
  }
}

TEST(Planner, PlannersAreDeterministic) {
  std::mt19937_64 rng(21);
  const Topology topo{2, 4};
  std::vector<LoadMatrix> loads;
  for (int i = 0; i < 6; ++i) loads.push_back(random_load(32, 8, rng));
  for (const char* name : kPlanners) {
    auto a = make_planner(config(name, topo, 32, 2));
    auto b = make_planner(config(name, topo, 32, 2));
    for (size_t i = 0; i < loads.size(); ++i) {
      if (i % 3 == 0) {
        const auto totals = expert_totals({loads[i]});
        a->begin_step(totals);
        b->begin_step(totals);
      }
      const LayerPlacement pa = a->plan(0, loads[i]), pb = b->plan(0, loads[i]);
      EXPECT_TRUE(same_plan(pa, pb)) << name << " load " << i;
    }
  }
}

TEST(Planner, ForesightRepeatedLoadMovesNoWeights) {
  std::mt19937_64 rng(8);
  const Topology topo{4, 4};
  for (int i = 0; i < 5; ++i) {
    const LoadMatrix load = random_load(64, 16, rng);
    auto planner = make_planner(config("foresight", topo, 64, 2));
    const LayerPlacement first = planner->plan(0, load);
    const LayerPlacement second = planner->plan(0, load);
    const PlanMetrics m1 = plan_metrics(first, load, topo, nullptr, 1000);
    const PlanMetrics m2 = plan_metrics(second, load, topo, &first, 1000);
    ASSERT_GT(m1.replicas, 0) << "load " << i << ": the test needs replicas";
    EXPECT_EQ(m1.bytes_moved, 1000 * m1.replicas);
    EXPECT_EQ(m2.bytes_moved, 0) << "load " << i << ": " << m2.new_replicas << " of " << m2.replicas
                                 << " replicas are new";
    EXPECT_EQ(m2.max_load, m1.max_load);
  }
}

TEST(Planner, StepPlannersHoldOneReplicaSetPerStep) {
  std::mt19937_64 rng(4);
  const Topology topo{1, 4};
  std::vector<LoadMatrix> micro;
  for (int i = 0; i < 3; ++i) micro.push_back(random_load(8, 4, rng));
  std::vector<std::vector<LoadMatrix>> step;
  for (const LoadMatrix& l : micro) step.push_back({l});
  const auto totals = step_expert_load(step);

  auto ema = make_planner(config("step_ema", topo, 8, 2));
  ema->begin_step(totals);  // no history yet: static expert parallelism
  for (const LoadMatrix& l : micro)
    EXPECT_TRUE(same_plan(ema->plan(0, l), trivial_placement(l, 4, 2)));
  ema->begin_step(totals);  // now planned from the first step's load
  auto oracle = make_planner(config("step_oracle", topo, 8, 2));
  EXPECT_THROW(oracle->plan(0, micro[0]), std::logic_error);
  oracle->begin_step(totals);
  for (const LoadMatrix& l : micro) {
    const LayerPlacement pe = ema->plan(0, l), po = oracle->plan(0, l);
    // The EMA of one step is that step: the same replica set as the oracle's, every slot used.
    EXPECT_EQ(pe.slots, po.slots);
    int used = 0;
    for (const auto& s : po.slots)
      for (int32_t e : s) used += e >= 0;
    EXPECT_EQ(used, 8);
  }
}

TEST(Planner, RejectsMalformedConfigAndInput) {
  const Topology topo{2, 2};
  expect_error([&] { make_planner(config("eplb", topo, 8, 1)); }, "unknown planner 'eplb'");
  expect_error([&] { make_planner(config("foresight", topo, 8, -1)); },
               "planner.replica_slots must be >= 0 (got -1)");
  expect_error([&] { make_planner(config("foresight", topo, 6, 1)); },
               "6 experts cannot be split evenly over 4 ranks");
  expect_error(
      [&] {
        make_planner(config("none", Topology{0, 2}, 8, 1));
      },
      "planner.topology.nodes must be >= 1");
  PlannerConfig c = config("step_ema", topo, 8, 1);
  c.ema_decay = 1.0;
  expect_error([&] { make_planner(c); }, "planner.ema_decay must be in [0, 1)");

  auto p = make_planner(config("foresight", topo, 8, 1, 2));
  LoadMatrix load(8, std::vector<int64_t>(4, 1));
  expect_error([&] { p->plan(2, load); }, "layer 2 is out of range [0, 2)");
  LoadMatrix short_row = load;
  short_row[3].pop_back();
  expect_error([&] { p->plan(0, short_row); }, "expert 3 has 3 source ranks, expected 4");
  LoadMatrix negative = load;
  negative[6][1] = -2;
  expect_error([&] { p->plan(1, negative); }, "expert 6 from rank 1: negative count -2");
  expect_error([&] { p->plan(0, LoadMatrix(7, std::vector<int64_t>(4, 0))); },
               "7 expert rows, expected 8");
  expect_error([&] { p->begin_step({std::vector<int64_t>(8, 1)}); },
               "step load has 1 layers, expected 2");
  expect_error(
      [&] {
        p->begin_step({std::vector<int64_t>(8, 1), std::vector<int64_t>(8, -1)});
      },
      "layer 1 expert 0: negative load -1");
}

}  // namespace
}  // namespace fm
