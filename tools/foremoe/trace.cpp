// `foremoe trace stats|synth`: routing-trace files (model/trace_io.h).
//   stats: expert load, MaxVio and the per-micro-step rank imbalance of static
//          expert parallelism (balancer/trace_stats.h), optionally as JSON.
//   synth: a synthetic trace with Zipf-skewed, drifting expert popularity
//          (balancer/synthetic_trace.h), for tests and balancer experiments.
#include <fmt/format.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <stdexcept>

#include "balancer/synthetic_trace.h"
#include "balancer/trace_stats.h"
#include "engine/error.h"
#include "engine/files.h"
#include "model/trace_io.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

struct TraceStatsArgs {
  std::string file;
  int64_t micro_batch = 1;
  int64_t ranks = 0;
  std::string json;
};

static nlohmann::json summary_json(const RatioSummary& s) {
  return {{"mean", s.mean}, {"p50", s.p50}, {"p95", s.p95}, {"max", s.max}, {"count", s.count}};
}

// null for an unknown (0) dimension, as in the trace file.
static nlohmann::json unknown_or_value(int64_t v) {
  return v > 0 ? nlohmann::json(v) : nullptr;
}

static nlohmann::json stats_json(const std::string& file, const RoutingTrace& t,
                                 const TraceMetadata& meta, const TraceImbalance& r) {
  nlohmann::json j;
  j["file"] = file;
  j["metadata"] = {{"model", meta.model},
                   {"n_layers", meta.n_layers},
                   {"first_k_dense", meta.first_k_dense},
                   {"n_moe_layers", t.n_moe_layers},
                   {"n_experts", t.n_experts},
                   {"top_k", t.top_k},
                   {"vocab_size", unknown_or_value(meta.vocab_size)},
                   {"hidden", unknown_or_value(meta.hidden)},
                   {"source", meta.source},
                   {"micro_step_offsets", meta.micro_step_offsets}};
  j["sequences"] = static_cast<int64_t>(t.seq_offsets.size()) - 1;
  j["tokens"] = t.tokens();
  j["ranks"] = r.ranks;
  j["micro_batch"] = r.micro_batch;
  j["experts_per_rank"] = r.experts_per_rank;
  j["overall"] = summary_json(r.overall);
  j["whole_trace_ratio"] = r.whole_trace_ratio;
  j["time_ratio"] = r.time_ratio;
  j["lower_bound_time_ratio"] = r.lower_bound_time_ratio;
  j["token_ratio"] = summary_json(r.token_ratio);
  j["layers"] = nlohmann::json::array();
  for (const LayerImbalance& l : r.layers)
    j["layers"].push_back({{"expert_load", l.expert_load},
                           {"max_vio", l.max_vio},
                           {"rank_load", l.rank_load},
                           {"whole_trace_ratio", l.whole_trace_ratio},
                           {"micro_step", summary_json(l.micro_step)},
                           {"time_ratio", l.time_ratio}});
  j["micro_steps"] = nlohmann::json::array();
  for (int64_t m = 0; m < r.n_micro_steps(); ++m) {
    const MicroStep& s = r.micro_steps[static_cast<size_t>(m)];
    const auto row = static_cast<std::ptrdiff_t>(m * r.n_layers);
    j["micro_steps"].push_back(
        {{"first_seq", s.first_seq},
         {"end_seq", s.end_seq},
         {"first_token", s.first_token},
         {"end_token", s.end_token},
         {"partial", s.partial},
         {"rank_tokens", s.rank_tokens},
         {"token_ratio", s.token_ratio},
         {"lower_bound_ratio", s.lower_bound_ratio},
         {"ratio", std::vector<double>(r.ratio.begin() + row, r.ratio.begin() + row + r.n_layers)},
         {"max_rank_load", std::vector<int64_t>(r.max_rank_load.begin() + row,
                                                r.max_rank_load.begin() + row + r.n_layers)}});
  }
  return j;
}

// The `n` most loaded experts of a layer as "id:load" pairs.
static std::string hottest(const std::vector<int64_t>& load, size_t n) {
  std::vector<size_t> order(load.size());
  std::iota(order.begin(), order.end(), size_t{0});
  n = std::min(n, order.size());
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n), order.end(),
                    [&](size_t a, size_t b) { return load[a] > load[b]; });
  std::string s;
  for (size_t i = 0; i < n; ++i)
    s += fmt::format("{}{}:{}", i ? " " : "", order[i], load[order[i]]);
  return s;
}

static int run_stats(const TraceStatsArgs& a) {
  TraceMetadata meta;
  const RoutingTrace t = load_trace(a.file, &meta);
  TraceImbalance r;
  try {
    r = trace_imbalance(t, a.ranks, a.micro_batch);
  } catch (const std::exception& e) {  // layout errors (E % W, ...) are bad CLI input
    throw Error(fmt::format("{}: trace stats: {}", a.file, e.what()));
  }
  const int64_t S = static_cast<int64_t>(t.seq_offsets.size()) - 1;
  int64_t partial = 0;
  for (const MicroStep& m : r.micro_steps) partial += m.partial;

  fmt::print("trace {}: model '{}', {} layers ({} dense first, {} MoE), {} experts top-{}\n",
             a.file, meta.model, meta.n_layers, meta.first_k_dense, t.n_moe_layers, t.n_experts,
             t.top_k);
  fmt::print("  {} sequences, {} tokens; source {}\n", S, t.tokens(), meta.source.dump());
  if (!meta.micro_step_offsets.empty())
    fmt::print("  the file records {} micro-steps (not used: --micro-batch decides)\n",
               meta.micro_step_offsets.size());
  fmt::print(
      "static EP over {} ranks ({} experts each); a micro-step = {} ranks x {} sequences: "
      "{} micro-steps ({} partial)\n\n",
      r.ranks, r.experts_per_rank, r.ranks, r.micro_batch, r.n_micro_steps(), partial);

  fmt::print("expert load over the whole trace (token assignments)\n");
  fmt::print("{:>5}  {:>7}  {:>8}  {:>8}  {:>8}  {}\n", "layer", "MaxVio", "min", "mean", "max",
             "hottest experts (id:load)");
  for (int64_t l = 0; l < r.n_layers; ++l) {
    const LayerImbalance& li = r.layers[static_cast<size_t>(l)];
    const auto [mn, mx] = std::minmax_element(li.expert_load.begin(), li.expert_load.end());
    fmt::print("{:>5}  {:>7.3f}  {:>8}  {:>8.1f}  {:>8}  {}\n", l, li.max_vio, *mn,
               static_cast<double>(t.tokens() * t.top_k) / static_cast<double>(t.n_experts), *mx,
               hottest(li.expert_load, 4));
  }

  fmt::print("\nrank imbalance max/mean of rank loads (1 = perfect; {} = everything on one rank)\n",
             r.ranks);
  fmt::print("{:>5}  {:>11}  {:>8} {:>8} {:>8} {:>8}  {:>10}\n", "layer", "whole-trace", "ms mean",
             "ms p50", "ms p95", "ms max", "time ratio");
  for (int64_t l = 0; l < r.n_layers; ++l) {
    const LayerImbalance& li = r.layers[static_cast<size_t>(l)];
    fmt::print("{:>5}  {:>11.3f}  {:>8.3f} {:>8.3f} {:>8.3f} {:>8.3f}  {:>10.3f}\n", l,
               li.whole_trace_ratio, li.micro_step.mean, li.micro_step.p50, li.micro_step.p95,
               li.micro_step.max, li.time_ratio);
  }
  fmt::print("{:>5}  {:>11.3f}  {:>8.3f} {:>8.3f} {:>8.3f} {:>8.3f}  {:>10.3f}\n", "all",
             r.whole_trace_ratio, r.overall.mean, r.overall.p50, r.overall.p95, r.overall.max,
             r.time_ratio);
  fmt::print(
      "  ms = per micro-step and layer; time ratio = sum of max rank loads / sum of mean loads\n"
      "  (MoE compute time vs perfect balance). Lower bound with any replica plan "
      "(ceil(total/W)): {:.3f}\n",
      r.lower_bound_time_ratio);
  fmt::print(
      "tokens per rank micro-batch max/mean (attention/dense side): mean {:.3f} p95 {:.3f} "
      "max {:.3f}\n",
      r.token_ratio.mean, r.token_ratio.p95, r.token_ratio.max);
  if (!a.json.empty()) {
    write_file_atomic(a.json, stats_json(a.file, t, meta, r).dump(1) + "\n");
    fmt::print("wrote {}\n", a.json);
  }
  return 0;
}

struct TraceSynthArgs {
  std::string out;
  SyntheticTraceOptions options;
};

static int run_synth(const TraceSynthArgs& a) {
  const SyntheticTraceOptions& o = a.options;
  RoutingTrace t;
  try {
    t = synthetic_trace(o);
  } catch (const std::invalid_argument& e) {
    throw Error(e.what());
  }
  TraceMetadata meta;
  meta.model = "synthetic";
  meta.n_layers = o.n_moe_layers;
  meta.source = {{"generator", "foremoe trace synth"},
                 {"experts", o.n_experts},
                 {"top_k", o.top_k},
                 {"layers", o.n_moe_layers},
                 {"sequences", o.sequences},
                 {"len", o.seq_len},
                 {"skew", o.skew},
                 {"drift", o.drift},
                 {"seed", o.seed}};
  save_trace(a.out, t, meta);
  fmt::print(
      "wrote {}: {} sequences x {} tokens, {} MoE layers, {} experts top-{}, Zipf skew {} "
      "drift {} seed {}\n",
      a.out, o.sequences, o.seq_len, o.n_moe_layers, o.n_experts, o.top_k, o.skew, o.drift, o.seed);
  return 0;
}

Runner add_trace(CLI::App& app) {
  auto* cmd = app.add_subcommand("trace", "Routing-trace files: imbalance statistics, synthesis");
  cmd->require_subcommand(1);

  auto* stats = cmd->add_subcommand(
      "stats", "Expert load, MaxVio and per-micro-step rank imbalance under static EP");
  auto s = std::make_shared<TraceStatsArgs>();
  stats->add_option("file", s->file, "routing trace (.safetensors)")->required();
  stats->add_option("--micro-batch", s->micro_batch, "sequences per rank per micro-step")
      ->required()
      ->check(CLI::PositiveNumber);
  stats->add_option("--ranks", s->ranks, "expert-parallel ranks W (must divide n_experts)")
      ->required()
      ->check(CLI::PositiveNumber);
  stats->add_option("--json", s->json, "also write every figure to this JSON file");

  auto* synth =
      cmd->add_subcommand("synth", "Write a synthetic trace (Zipf-skewed, drifting popularity)");
  auto y = std::make_shared<TraceSynthArgs>();
  SyntheticTraceOptions& o = y->options;
  synth->add_option("--out", y->out, "output file (.safetensors)")->required();
  synth->add_option("--experts", o.n_experts, "experts per MoE layer")->capture_default_str();
  synth->add_option("--top-k", o.top_k, "experts per token")->capture_default_str();
  synth->add_option("--layers", o.n_moe_layers, "MoE layers")->capture_default_str();
  synth->add_option("--sequences", o.sequences, "sequences")->capture_default_str();
  synth->add_option("--len", o.seq_len, "tokens per sequence")->capture_default_str();
  synth->add_option("--skew", o.skew, "Zipf exponent of expert popularity (0 = uniform)")
      ->capture_default_str();
  synth
      ->add_option("--drift", o.drift,
                   "popularity drift per sequence: random swaps as a fraction of the experts")
      ->capture_default_str();
  synth->add_option("--seed", o.seed, "random seed")->capture_default_str();

  return [stats, synth, s, y] {
    if (stats->parsed()) return run_stats(*s);
    if (synth->parsed()) return run_synth(*y);
    return 1;
  };
}

}  // namespace fm::cli
