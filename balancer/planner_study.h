// The planner imbalance study (issue 6, "Benchmarks"): replays a routing trace as RL steps and
// measures, for every planner, the plan of every (micro-step, MoE layer) with plan_metrics
// (balancer/plan_metrics.h). bench/planner_study.cpp is its command line.
//
// Steps. The trace's sequences are cut, in order, into RL steps of micro_steps x W x mb
// sequences (a trailing partial step is left out). Inside a step the sequences are dealt to
// micro-steps and ranks as consecutive_assignment does (micro-step m, rank r: the mb sequences
// from m*W*mb + r*mb) after, when shuffle_seed != 0, a seeded shuffle of the step's sequences
// (a trainer shuffling its batch; consecutive order keeps the samples of one prompt together).
//
// Planners. Each planner named in `planners` runs the whole trace on its own instance, as the
// trainer would: begin_step(step_expert_load(step)) at each step, then plan(layer, load) for
// micro-steps in order and layers in order. step_ema therefore plans step t from steps < t
// (step 0: no history, static placement); step_oracle from step t's true load; foresight from
// each micro-step's load. plan_us is the wall time of that plan() call.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "balancer/routing_trace.h"
#include "balancer/topology.h"
#include "balancer/trace_stats.h"

namespace fm {

struct PlannerStudyOptions {
  Topology topology;          // W = nodes x gpus_per_node; E % W == 0
  int32_t replica_slots = 2;  // S per rank and layer
  int64_t micro_batch = 1;    // mb: sequences per rank per micro-step, >= 1
  int64_t micro_steps = 4;    // micro-steps per RL step, >= 1
  uint64_t shuffle_seed = 0;  // 0: consecutive order; else shuffle each step's sequences
  double ema_decay = 0.5;     // step_ema's PlannerConfig::ema_decay
  int64_t expert_bytes = 0;   // bytes of one expert's weights (bytes_moved)
  std::vector<std::string> planners = {"none", "step_ema", "step_oracle", "foresight"};
};

// One plan: planner p at (step, micro_step, layer).
struct PlannerStudyRow {
  std::string planner;
  int64_t step = 0, micro_step = 0, layer = 0;
  double max_over_mean = 1;    // PlanMetrics::max_over_mean
  double ratio_to_bound = 1;   // PlanMetrics::ratio_to_bound
  double bound_over_mean = 1;  // lower_bound / mean_load: the best max/mean any plan can reach
  int64_t cross_gpu_tokens = 0, cross_node_tokens = 0, total = 0;
  int32_t replicas = 0, new_replicas = 0;
  int64_t bytes_moved = 0;
  double plan_us = 0;
};

// Rows in planner order, then step, micro-step, layer. Throws std::invalid_argument naming the
// option when mb, micro_steps or the topology is invalid, E % W != 0, or the trace has fewer
// sequences than one step (and the planners' and load_matrices' errors otherwise).
std::vector<PlannerStudyRow> run_planner_study(const RoutingTrace& trace,
                                               const PlannerStudyOptions& options);

// Per planner (in first-seen order of `rows`): summaries over its rows.
struct PlannerStudySummary {
  std::string planner;
  RatioSummary max_over_mean, ratio_to_bound, plan_us;
  double bound_over_mean = 1;   // mean over rows
  double cross_gpu_share = 0;   // sum cross_gpu_tokens / sum total
  double cross_node_share = 0;  // sum cross_node_tokens / sum total
  double within_110 = 0;        // share of plans with max_over_mean <= 1.10 (the target)
  double new_replicas_per_plan = 0;
  double bytes_moved_per_plan = 0;
};
std::vector<PlannerStudySummary> summarize_planner_study(const std::vector<PlannerStudyRow>& rows);

}  // namespace fm
