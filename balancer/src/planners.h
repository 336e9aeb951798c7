// The planner implementations behind make_planner (balancer/planner.h, which documents what
// each one does). Private to balancer/.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "balancer/planner.h"

namespace fm::planners {

// Reshapes `out` to W x S slots and E x W split lists without releasing their capacity.
void shape_output(LayerPlacement& out, int32_t W, int32_t E, int32_t S);

class NonePlanner final : public Planner {
 public:
  explicit NonePlanner(const PlannerConfig& c) : Planner(c, PlannerKind::kNone) {}

 protected:
  void plan_layer(int32_t layer, const LoadMatrix& load, LayerPlacement& out) override;
};

// step_ema and step_oracle: one EPLB-style replica set per step, static token split.
class StepPlanner final : public Planner {
 public:
  StepPlanner(const PlannerConfig& c, PlannerKind kind);

 protected:
  void start_step(const std::vector<std::vector<int64_t>>& step_load) override;
  void plan_layer(int32_t layer, const LoadMatrix& load, LayerPlacement& out) override;

 private:
  // Fills step_slots_[l] and the instance lists of layer l from the weights w[e].
  void place_step(int32_t layer, const std::vector<double>& w);

  bool have_step_ = false;                        // step_oracle: begin_step() was called
  bool have_history_ = false;                     // step_ema: the EMA holds >= 1 step
  std::vector<std::vector<double>> ema_;          // [L][E]
  std::vector<std::vector<int32_t>> step_slots_;  // [L][W * S]
  // Instances of expert e in layer l: inst_[l][inst_begin_[l][e] .. inst_begin_[l][e + 1]),
  // each a flat slot id r * S + s, or -1 - r for rank r's home (always first).
  std::vector<std::vector<int32_t>> inst_begin_, inst_;
};

class ForesightPlanner final : public Planner {
 public:
  explicit ForesightPlanner(const PlannerConfig& c);

 protected:
  void plan_layer(int32_t layer, const LoadMatrix& load, LayerPlacement& out) override;

 private:
  enum class Scope { kOtherNodes, kSameNode, kAnyNode };
  // Moves from rank h's most-loaded home expert to the best destination in `scope`, at most
  // `limit` tokens; false when there is no destination.
  bool shed(int32_t h, Scope scope, int64_t limit, std::span<const int32_t> prev);
  // Through an intermediate rank (phase 4 in planner.h); false when there is none.
  bool relay(int32_t h, std::span<const int32_t> prev);
  // The free slot of rank q to give expert e (resident: e was there in the previous plan).
  int32_t free_slot(int32_t e, int32_t q, std::span<const int32_t> prev, bool& resident) const;
  // Moves a tokens of expert e from its home to slot s of rank q (a new or its replica).
  void place(int32_t e, int32_t q, int32_t s, int64_t a);
  void split_tokens(const LoadMatrix& load, LayerPlacement& out);

  int64_t tau_ = 0, node_tau_ = 0;
  std::vector<int64_t> total_;        // [E] tokens of expert e
  std::vector<int64_t> rem_;          // [E] tokens left on e's home
  std::vector<int64_t> home_load_;    // [W] load of rank r's home experts (A_r)
  std::vector<int64_t> rank_load_;    // [W] current L_r
  std::vector<int64_t> node_load_;    // [N] current NL_n
  std::vector<int32_t> slot_expert_;  // [W * S] expert in each slot of the plan being built
  std::vector<int64_t> slot_tokens_;  // [W * S] tokens it serves
  std::vector<int32_t> slots_used_;   // [W]
  std::vector<int32_t> first_rep_;    // [E] first slot (flat id) holding e, -1 if none
  std::vector<int32_t> next_rep_;     // [W * S] next slot holding the same expert
  std::vector<char> blocked_;         // [W] rank found no destination in this phase
  std::vector<char> node_blocked_;    // [N]
  std::vector<int64_t> src_rem_;      // [W] split scratch: tokens of each source left
  std::vector<int32_t> node_cursor_;  // [N] split scratch
  std::vector<int32_t> inst_rank_, inst_slot_;  // [1 + W * S] split scratch
  std::vector<int64_t> inst_cap_;
};

}  // namespace fm::planners
