// The path-split scheduler: when and by which path every replica-slot fill of a run of
// micro-steps happens, against a compute timeline (see ../shared/design/DESIGN.md,
// "Transfer engine"). Pure logic; the tests check its invariants on random workloads and the
// CPU engine takes its path choice from the same PathLoad (transfer/path_model.h).
//
// The workload is a sequence of *uses* -- one (micro-step, MoE layer) plan's slot table, the
// expert in every rank's S replica slots -- and a compute timeline of *phases* in execution
// order, each the compute of one use (a layer's forward, its backward). A use's slots must be
// filled before its first phase starts and stay unchanged until its last phase ends (its
// release). The ranks run in lock step (the EP all-to-all joins them), so one timeline serves
// all ranks.
//
// Rules:
// - Issue: the moves of use u are issued when the first phase of use u - lookahead starts
//   (lookahead 1: one layer ahead; L: one micro-step ahead over L layers; 0: no prefetch).
// - Memory: a move writes a slot buffer, which must be free (its previous use released) when
//   the move starts. Default: S buffers per rank and layer, slot s of layer l being buffer
//   l * S + s, as the engines allocate them. With slot_memory_bytes > 0 instead: a pool of
//   slot_memory_bytes / expert_bytes buffers per rank shared by all layers; a use that finds
//   too few free buffers is an error (std::invalid_argument), never an overrun.
// - Reuse: a slot holding the same expert as in the previous use of the same layer (same rank,
//   same slot) is not moved again when its buffer still holds it.
// - Paths: moves are assigned in issue order (use, destination rank, slot) to the path that
//   finishes first given the load already placed on each path (PathLoad).
// - Deadlines: the first phase of a use starts when the previous phase has ended AND every
//   move of the use has finished. The difference is that use's stall: delivery is never late,
//   the consuming layer waits and the wait is reported.
// A workload describes one optimizer step (the weights do not change inside it).
#pragma once

#include <cstdint>
#include <vector>

#include "transfer/path_model.h"

namespace fm {

struct SlotUse {
  int64_t micro_step = 0;
  int32_t layer = 0;
  SlotTable slots;  // [W][S]
};

struct ComputePhase {
  int32_t use = 0;     // the use whose slots this compute reads
  double seconds = 0;  // its duration without stalls
};

struct TransferWorkload {
  int32_t world_size = 1, n_experts = 0, n_layers = 0, slots_per_rank = 0;
  int64_t expert_bytes = 0;
  std::vector<SlotUse> uses;         // ordered by their first phase
  std::vector<ComputePhase> phases;  // execution order
};

// n micro-steps over L layers, plans[m][l] the slot table of micro-step m, layer l: each
// micro-step runs the forwards of layers 0..L-1 (forward_s each) and, when backward_s > 0,
// the backwards of layers L-1..0 (backward_s each). Use m * L + l is (m, l).
TransferWorkload layered_workload(int32_t n_experts, int64_t expert_bytes,
                                  const std::vector<std::vector<SlotTable>>& plans,
                                  double forward_s, double backward_s);

struct ScheduleOptions {
  LinkModel links;
  PathPolicy policy = PathPolicy::split;
  int32_t lookahead = 1;          // in uses, >= 0
  int64_t slot_memory_bytes = 0;  // per rank; 0: S buffers per layer (see above)
};

struct ScheduledMove {
  int32_t use = 0;
  Move move;
  TransferPath path = TransferPath::cpu;
  double issue = 0, start = 0, finish = 0;  // seconds from the start of the timeline
  int32_t buffer = 0;                       // the slot buffer written, in [0, buffers_per_rank)
};

struct TransferSchedule {
  int32_t buffers_per_rank = 0;
  std::vector<ScheduledMove> moves;  // in issue order
  std::vector<double> phase_start;   // [phase]
  std::vector<double> use_stall;     // [use]: seconds its first phase waited for its moves
  std::vector<double> use_release;   // [use]: end of its last phase
  // [use][rank][slot]: the buffer holding the slot's expert during the use, -1 when empty.
  std::vector<SlotTable> buffer;
  int64_t bytes_direct = 0, bytes_cpu = 0;  // moved per path
  int64_t moves_direct = 0, moves_cpu = 0;
  int64_t slots_reused = 0;                           // filled slots that needed no move
  double compute_s = 0, stall_s = 0, makespan_s = 0;  // makespan = compute + stall
};

// Throws std::invalid_argument naming the problem: slot tables not W x S, expert ids out of
// range, E not divisible by W, uses out of first-phase order or without a phase, two uses of
// one layer live at once (default memory), too little slot memory, bad link model or options.
TransferSchedule schedule_transfers(const TransferWorkload& workload,
                                    const ScheduleOptions& options);

}  // namespace fm
