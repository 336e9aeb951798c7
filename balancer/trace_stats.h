// Expert-parallel imbalance of a routing trace under STATIC placement (no
// replicas): the figure the balancer exists to shrink, measured per micro-step.
//
// Placement. W ranks, E experts per MoE layer, E % W == 0 (else an error):
// rank r owns the E/W consecutive experts [r*E/W, (r+1)*E/W), i.e. expert e
// lives on rank e / (E/W). Every MoE layer uses the same placement.
//
// Micro-steps. Attention and dense parts are data-parallel: sequences are
// taken in trace order, and one micro-step consumes W x mb of them. In
// micro-step m, rank r's micro-batch is the mb consecutive sequences starting
// at sequence m*W*mb + r*mb. The last micro-step may hold fewer sequences (some
// ranks get fewer or none); it is included and flagged `partial`.
//
// Rank load. For micro-step m and MoE layer l,
//   load[r] = #(token, k) assignments of the micro-step's tokens (from every
//             source rank) whose expert lives on rank r.
// The expert GEMMs of a micro-step finish when the busiest rank does, so
//   ratio(m, l) = max_r load[r] / mean_r load[r]          (>= 1; 1 = perfect)
// is the compute-time proxy of that layer's expert work (a micro-step with no
// tokens has ratio 1). Summed over the trace, the MoE compute time relative to
// perfect balance is
//   time_ratio(l) = sum_m max_r load / sum_m mean_r load.
// Lower bound: even a planner free to split any expert's tokens across ranks
// (replicas) cannot beat max_r load = ceil(total / W), total = tokens * k, so
//   lower_bound_ratio(m) = ceil(total / W) / (total / W)   (same for every layer).
//
// Contrast. The whole trace taken as ONE step (the view of a planner that sees
// only step-level history) gives whole_trace_ratio(l) = max_r / mean_r of the
// rank loads summed over all tokens. Per-sequence routing skew averages out
// over a whole RL step, so whole_trace_ratio is usually near 1 while the
// micro-steps, each a handful of sequences, are far worse; that gap is why
// the foresight planner plans per micro-step.
//
// Tokens. Sequence lengths differ, so the data-parallel side is imbalanced
// too: token_ratio(m) = max_r tokens[r] / mean_r tokens[r] over the ranks'
// micro-batches (the compute-time proxy of attention and dense layers).
//
// Per layer over the whole trace also: the expert load (assignments per expert)
// and MaxVio = (max_e load - mean) / mean.
//
// Summaries (mean, p50, p95, max) use linear interpolation between order
// statistics for percentiles (numpy's default). Pure logic; errors are
// std::invalid_argument naming the argument.
#pragma once

#include <cstdint>
#include <vector>

#include "balancer/routing_trace.h"

namespace fm {

struct RatioSummary {
  double mean = 0, p50 = 0, p95 = 0, max = 0;
  int64_t count = 0;
};

// mean / p50 / p95 / max of `values` (all zero with count 0 when empty).
RatioSummary summarize(std::vector<double> values);

struct MicroStep {
  int64_t first_seq = 0, end_seq = 0;      // sequences [first_seq, end_seq)
  int64_t first_token = 0, end_token = 0;  // tokens [first_token, end_token)
  bool partial = false;                    // fewer than W * mb sequences
  std::vector<int64_t> rank_tokens;        // [W] tokens in each rank's micro-batch
  double token_ratio = 1;                  // max / mean of rank_tokens (1 when empty)
  double lower_bound_ratio = 1;            // ceil(total / W) / (total / W)
};

struct LayerImbalance {
  std::vector<int64_t> expert_load;  // [E] assignments over the whole trace
  double max_vio = 0;                // MaxVio of expert_load
  std::vector<int64_t> rank_load;    // [W] assignments over the whole trace
  double whole_trace_ratio = 1;      // max / mean of rank_load
  RatioSummary micro_step;           // ratio(m, l) over micro-steps m
  double time_ratio = 1;             // sum_m max_r load / sum_m mean_r load
};

struct TraceImbalance {
  int64_t ranks = 0, micro_batch = 0, experts_per_rank = 0;
  int64_t n_layers = 0;                // MoE layers
  std::vector<MicroStep> micro_steps;  // [M]
  std::vector<double> ratio;           // [M, n_layers] row-major: ratio(m, l)
  std::vector<int64_t> max_rank_load;  // [M, n_layers]: max_r load
  std::vector<LayerImbalance> layers;  // [n_layers]
  RatioSummary overall;                // ratio(m, l) over all micro-steps x layers
  double whole_trace_ratio = 1;        // mean over layers of whole_trace_ratio(l)
  double time_ratio = 1;               // sum over m, l of max / sum of mean
  double lower_bound_time_ratio = 1;   // the same with max_r load = ceil(total / W)
  RatioSummary token_ratio;            // token_ratio(m) over micro-steps

  int64_t n_micro_steps() const { return static_cast<int64_t>(micro_steps.size()); }
  double at(int64_t m, int64_t layer) const {
    return ratio[static_cast<size_t>(m * n_layers + layer)];
  }
};

// The trace's sequences cut into micro-steps of W ranks x mb sequences (see above).
std::vector<MicroStep> micro_steps(const RoutingTrace& trace, int64_t ranks, int64_t micro_batch);

// Everything above. Throws std::invalid_argument when ranks < 1, micro_batch < 1,
// n_experts % ranks != 0 or the trace has no sequences (and validate_trace's error when the
// trace is inconsistent).
TraceImbalance trace_imbalance(const RoutingTrace& trace, int64_t ranks, int64_t micro_batch);

}  // namespace fm
