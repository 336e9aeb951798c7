// Per-micro-step imbalance of every planner (issue 6, "Benchmarks"): max/mean rank load and
// ratio to the lower bound of each plan, on a routing-trace file written by rollouts
// (model/trace_io.h) or a synthetic trace (balancer/synthetic_trace.h), for each world size W
// and slot count S asked for. The simulation is balancer/planner_study.h's; this program parses
// flags, builds the traces, writes one CSV row per plan and a markdown summary table.
//
//   planner_study --trace FILE | --synthetic [synthetic options] [study options] --csv OUT.csv
//                 [--md OUT.md]
// Run with --help for the options. Not a Google Benchmark program: it has its own main.
#include "balancer/planner_study.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "balancer/synthetic_trace.h"
#include "model/trace_io.h"

namespace {

constexpr const char* kUsage =
    R"(usage: planner_study (--trace FILE | --synthetic) --csv FILE [options]

Source (one of):
  --trace FILE            routing-trace file written by `foremoe generate --trace-out`
  --synthetic             a synthetic trace (balancer/synthetic_trace.h), sized for --steps
Synthetic trace:
  --experts N (128)  --top-k N (8)  --layers N (4)  --seq-len N (256)  --seed N (1)
  --skew X (1.0)  --layer-skew X,X,... (one per layer)  --drift X (0.02)
  --preference X (0.5)  --preference-skew X (1.0)  --preference-group N (8)
Study:
  --world W,W,... (8)     world sizes; nodes of min(W, --gpus-per-node) GPUs
  --gpus-per-node G (8)
  --slots S,S,... (2)     replica slots per rank and layer
  --micro-batch N (1)     sequences per rank per micro-step
  --micro-steps N (4)     micro-steps per RL step
  --steps N (0)           RL steps per configuration (0 = every full step of the trace;
                          required with --synthetic)
  --shuffle-seed N (0)    0 = sequences in trace order; else shuffle each step's sequences
  --ema-decay X (0.5)     step_ema's decay
  --expert-bytes N (0)    bytes of one expert's weights, for bytes_moved
  --planners a,b,... (none,step_ema,step_oracle,foresight)
Output:
  --csv FILE              one row per (configuration, planner, step, micro-step, layer)
  --md FILE               the summary table as markdown (also printed)
)";

struct Args {
  std::string trace;
  bool synthetic = false;
  fm::SyntheticTraceOptions syn;
  std::vector<int64_t> world = {8}, slots = {2};
  int64_t gpus_per_node = 8, steps = 0;
  fm::PlannerStudyOptions study;
  std::string csv, md;
};

[[noreturn]] void fail(const std::string& message) {
  throw std::invalid_argument(message + " (see --help)");
}

int64_t to_int(const std::string& flag, const std::string& v) {
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size())
    fail(fmt::format("{}: expected an integer, got '{}'", flag, v));
  return x;
}

double to_double(const std::string& flag, const std::string& v) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size()) fail(fmt::format("{}: expected a number, got '{}'", flag, v));
  return x;
}

std::vector<std::string> split(const std::string& v) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  a.syn.n_experts = 128;
  a.syn.top_k = 8;
  a.syn.n_moe_layers = 4;
  a.syn.seq_len = 256;
  a.syn.skew = 1.0;
  a.syn.drift = 0.02;
  a.syn.preference = 0.5;
  a.syn.preference_skew = 1.0;
  a.syn.preference_group = 8;
  a.syn.seed = 1;
  std::vector<double> layer_skew;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (flag == "--synthetic") {
      a.synthetic = true;
      continue;
    }
    if (flag.rfind("--", 0) != 0) fail(fmt::format("unexpected argument '{}'", flag));
    if (i + 1 >= argc) fail(fmt::format("{} needs a value", flag));
    const std::string v = argv[++i];
    auto ints = [&] {
      std::vector<int64_t> xs;
      for (const std::string& s : split(v)) xs.push_back(to_int(flag, s));
      if (xs.empty()) fail(fmt::format("{}: expected a comma-separated list", flag));
      return xs;
    };
    if (flag == "--trace")
      a.trace = v;
    else if (flag == "--experts")
      a.syn.n_experts = to_int(flag, v);
    else if (flag == "--top-k")
      a.syn.top_k = to_int(flag, v);
    else if (flag == "--layers")
      a.syn.n_moe_layers = to_int(flag, v);
    else if (flag == "--seq-len")
      a.syn.seq_len = to_int(flag, v);
    else if (flag == "--seed")
      a.syn.seed = static_cast<uint64_t>(to_int(flag, v));
    else if (flag == "--skew")
      a.syn.skew = to_double(flag, v);
    else if (flag == "--layer-skew")
      for (const std::string& s : split(v)) layer_skew.push_back(to_double(flag, s));
    else if (flag == "--drift")
      a.syn.drift = to_double(flag, v);
    else if (flag == "--preference")
      a.syn.preference = to_double(flag, v);
    else if (flag == "--preference-skew")
      a.syn.preference_skew = to_double(flag, v);
    else if (flag == "--preference-group")
      a.syn.preference_group = to_int(flag, v);
    else if (flag == "--world")
      a.world = ints();
    else if (flag == "--gpus-per-node")
      a.gpus_per_node = to_int(flag, v);
    else if (flag == "--slots")
      a.slots = ints();
    else if (flag == "--micro-batch")
      a.study.micro_batch = to_int(flag, v);
    else if (flag == "--micro-steps")
      a.study.micro_steps = to_int(flag, v);
    else if (flag == "--steps")
      a.steps = to_int(flag, v);
    else if (flag == "--shuffle-seed")
      a.study.shuffle_seed = static_cast<uint64_t>(to_int(flag, v));
    else if (flag == "--ema-decay")
      a.study.ema_decay = to_double(flag, v);
    else if (flag == "--expert-bytes")
      a.study.expert_bytes = to_int(flag, v);
    else if (flag == "--planners")
      a.study.planners = split(v);
    else if (flag == "--csv")
      a.csv = v;
    else if (flag == "--md")
      a.md = v;
    else
      fail(fmt::format("unknown flag {}", flag));
  }
  a.syn.layer_skew = layer_skew;
  if (a.synthetic == !a.trace.empty()) fail("give exactly one of --trace FILE and --synthetic");
  if (a.csv.empty()) fail("--csv FILE is required");
  if (a.synthetic && a.steps < 1) fail("--synthetic needs --steps N >= 1");
  if (a.steps < 0) fail(fmt::format("--steps must be >= 0 (got {})", a.steps));
  if (a.gpus_per_node < 1)
    fail(fmt::format("--gpus-per-node must be >= 1 (got {})", a.gpus_per_node));
  for (int64_t w : a.world)
    if (w < 1) fail(fmt::format("--world: every W must be >= 1 (got {})", w));
  for (int64_t s : a.slots)
    if (s < 0) fail(fmt::format("--slots: every S must be >= 0 (got {})", s));
  return a;
}

// The first `sequences` sequences of `trace` (all when it has no more).
fm::RoutingTrace prefix(const fm::RoutingTrace& trace, int64_t sequences) {
  if (sequences + 1 >= static_cast<int64_t>(trace.seq_offsets.size())) return trace;
  fm::RoutingTrace t = trace;
  t.seq_offsets.resize(static_cast<size_t>(sequences + 1));
  t.ids.resize(static_cast<size_t>(t.tokens() * t.n_moe_layers * t.top_k));
  return t;
}

int run(int argc, char** argv) {
  const Args a = parse(argc, argv);
  fm::RoutingTrace base;
  std::string source;
  if (a.synthetic) {
    int64_t most = 0;  // sequences of the largest configuration
    for (int64_t w : a.world)
      most = std::max(most, a.steps * a.study.micro_steps * w * a.study.micro_batch);
    fm::SyntheticTraceOptions o = a.syn;
    o.sequences = most;
    // The generator draws sequence by sequence, so every configuration's trace (a prefix of
    // this one) is what generating it alone with the same options would give.
    base = fm::synthetic_trace(o);
    source = fmt::format("synthetic E={} K={} L={}", o.n_experts, o.top_k, o.n_moe_layers);
  } else {
    base = fm::load_trace(a.trace);
    source = a.trace;
  }

  std::ofstream csv(a.csv);
  if (!csv) throw std::runtime_error(fmt::format("cannot write --csv {}", a.csv));
  csv << "W,nodes,gpus_per_node,S,planner,step,micro_step,layer,max_over_mean,ratio_to_bound,"
         "bound_over_mean,cross_gpu,cross_node,total,replicas,new_replicas,bytes_moved,plan_us\n";
  std::string md = fmt::format(
      "Source: {} ({} experts, top-{}, {} MoE layers, {} sequences, {} tokens); micro-batch {} "
      "sequences per rank, {} micro-steps per step, shuffle seed {}.\n\n",
      source, base.n_experts, base.top_k, base.n_moe_layers, base.seq_offsets.size() - 1,
      base.tokens(), a.study.micro_batch, a.study.micro_steps, a.study.shuffle_seed);
  md +=
      "| W | N×G | S | steps | planner | max/mean mean | p95 | max | ≤ 1.10 | ratio to bound mean "
      "| p95 | max | bound/mean | cross-node | new replicas / plan | plan µs |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (int64_t w : a.world)
    for (int64_t s : a.slots) {
      fm::PlannerStudyOptions o = a.study;
      const int64_t g = std::min(w, a.gpus_per_node);
      if (w % g != 0)
        fail(fmt::format("--world {} is not a multiple of --gpus-per-node {}", w, a.gpus_per_node));
      o.topology = fm::Topology{static_cast<int32_t>(w / g), static_cast<int32_t>(g)};
      o.replica_slots = static_cast<int32_t>(s);
      const int64_t per_step = o.micro_steps * w * o.micro_batch;
      const fm::RoutingTrace trace = a.steps > 0 ? prefix(base, a.steps * per_step) : base;
      const std::vector<fm::PlannerStudyRow> rows = fm::run_planner_study(trace, o);
      const int64_t steps = (static_cast<int64_t>(trace.seq_offsets.size()) - 1) / per_step;
      for (const fm::PlannerStudyRow& r : rows)
        csv << fmt::format(
            "{},{},{},{},{},{},{},{},{:.6f},{:.6f},{:.6f},{},{},{},{},{},{},{:.2f}\n", w,
            o.topology.nodes, g, s, r.planner, r.step, r.micro_step, r.layer, r.max_over_mean,
            r.ratio_to_bound, r.bound_over_mean, r.cross_gpu_tokens, r.cross_node_tokens, r.total,
            r.replicas, r.new_replicas, r.bytes_moved, r.plan_us);
      for (const fm::PlannerStudySummary& p : fm::summarize_planner_study(rows))
        md += fmt::format(
            "| {} | {}×{} | {} | {} | {} | {:.3f} | {:.3f} | {:.3f} | {:.0f}% | {:.3f} | {:.3f} | "
            "{:.3f} | {:.3f} | {:.1f}% | {:.2f} | {:.1f} |\n",
            w, o.topology.nodes, g, s, steps, p.planner, p.max_over_mean.mean, p.max_over_mean.p95,
            p.max_over_mean.max, 100 * p.within_110, p.ratio_to_bound.mean, p.ratio_to_bound.p95,
            p.ratio_to_bound.max, p.bound_over_mean, 100 * p.cross_node_share,
            p.new_replicas_per_plan, p.plan_us.mean);
    }
  std::fputs(md.c_str(), stdout);
  if (!a.md.empty()) {
    std::ofstream out(a.md);
    if (!(out << md)) throw std::runtime_error(fmt::format("cannot write --md {}", a.md));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "planner_study: %s\n", e.what());
    return 2;
  }
}
