// Load matrices: per (micro-step, MoE layer), load[e][r] = the (token, k) assignments of source
// rank r's tokens routed to logical expert e (balancer/placement.h's LoadMatrix, E x W). A token
// with top-k experts contributes k assignments, one to each of its experts, so
//   sum_e sum_r load[e][r] = k x (tokens of the micro-step).
// They are built from a replayed RoutingTrace and the assignment of its sequences to
// (micro-step, rank): what the RL trainer decides (data-parallel micro-batches) before the
// micro-steps run, which is exactly why the foresight planner knows the load in advance.
//
// A SequenceAssignment is general: assignment[m][r] lists the sequence indices (into the
// trace's seq_offsets) that rank r processes in micro-step m, in any order; a sequence may be
// used at most once, and sequences may be left out. consecutive_assignment() gives the layout
// balancer/trace_stats.h measures: micro-step m, rank r takes the mb consecutive sequences from
// m*W*mb + r*mb (the last micro-step may be partial: some ranks get fewer or none).
//
// Errors are std::invalid_argument naming the micro-step, rank, sequence or expert at fault.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "balancer/placement.h"
#include "balancer/routing_trace.h"

namespace fm {

// assignment[m][r] = sequence indices of rank r's micro-batch in micro-step m.
using SequenceAssignment = std::vector<std::vector<std::vector<int64_t>>>;

// The trace_stats layout: ceil(sequences / (W*mb)) micro-steps of W ranks x mb sequences.
// Throws when ranks < 1, micro_batch < 1 or the trace has no sequences.
SequenceAssignment consecutive_assignment(const RoutingTrace& trace, int64_t ranks,
                                          int64_t micro_batch);

// loads[m][l] = the load matrix (E x W) of micro-step m, MoE layer l. W = the number of ranks
// in each micro-step of `assignment` (all must agree). Throws when the trace is inconsistent
// (validate_trace), W < 1, E % W != 0, a micro-step has a different rank count, a sequence
// index is out of range, or a sequence is assigned twice.
std::vector<std::vector<LoadMatrix>> load_matrices(const RoutingTrace& trace,
                                                   const SequenceAssignment& assignment);

// The load matrix of one micro-step's assignment (step_assignment[r] = rank r's sequences) in
// MoE layer `layer`; the same checks (the sequence-used-twice check within this micro-step).
LoadMatrix load_matrix(const RoutingTrace& trace, int64_t layer,
                       const std::vector<std::vector<int64_t>>& step_assignment);

// step_load[l][e] = sum over micro-steps m and source ranks r of loads[m][l][e][r]: one RL
// step's per-expert load, what the step-level planners (step_ema, step_oracle) plan from.
std::vector<std::vector<int64_t>> step_expert_load(
    const std::vector<std::vector<LoadMatrix>>& loads);

// Throws std::invalid_argument, prefixed by `what`, unless `load` is n_experts rows of
// world_size non-negative counts, world_size >= 1 and n_experts % world_size == 0.
void validate_load_matrix(const LoadMatrix& load, int32_t n_experts, int32_t world_size,
                          const std::string& what = "load matrix");

}  // namespace fm
