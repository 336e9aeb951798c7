// The planners of the balancer: for every (micro-step, MoE layer) they turn the load matrix
// load[e][r] (balancer/load_matrix.h) into a LayerPlacement (balancer/placement.h): what each
// rank's S replica slots hold, and how each (expert, source rank)'s tokens are split over the
// expert's instances. See ../shared/design/DESIGN.md, "Expert parallelism and the balancer".
//
// One interface, four planners selected by PlannerConfig::name:
//
// none        Static expert parallelism: every token to its expert's home, slots empty.
//
// step_oracle One replica set per RL step and layer, EPLB-style, from the step's true
//             per-expert load w_e (sum over its micro-steps and source ranks):
//             (a) replica counts: c_e = 1; W*S times, c_e += 1 for the expert with the largest
//                 w_e / c_e among those with w_e > 0 and c_e < W (a rank holds at most one
//                 instance of an expert; ties: lowest e). So every slot is filled when useful.
//             (b) packing, hierarchical longest-processing-time: the homes are fixed (they own
//                 weights and optimizer state), each carrying w_e / c_e; the c_e - 1 replicas of
//                 each expert, each also carrying w_e / c_e, are taken heaviest first and put on
//                 the least-loaded node that still has a rank with a free slot not already
//                 holding that expert (nor being its home), then on the least-loaded such rank of
//                 that node (per-rank cap: S slots). A replica with no such rank is dropped.
//             (c) per micro-step, the token split is static, as in EPLB (which picks replicas
//                 uniformly): the load[e][r] tokens of each source are divided equally over e's
//                 c_e instances (floor, the remainder one token each to the instances starting at
//                 index (e + r) mod c_e, the home being index 0). No use of the micro-step's load
//                 beyond that: this is what a step-level method can do.
// step_ema    The same with w_e = an EMA of past steps' loads, as pre-training balancers plan
//             from history: ema = decay * ema + (1 - decay) * w_step, seeded by the first step's
//             load. begin_step(w) plans step t from the EMA of steps < t and only then folds w in;
//             the first step, with no history, runs static expert parallelism (no replicas).
// foresight   Per micro-step and layer, from the known load matrix (routing replay), a
//             hierarchical greedy with target tau = placement_lower_bound(load, W, S)
//             (balancer/plan_metrics.h; ceil(total / W) unless slots are scarce):
//             L_r = rank r's current load (initially the load of its home experts),
//             NL_n = node n's, rem_e = tokens still on e's home (initially all of e's).
//             (1) node level: while some node's load exceeds G * tau, its most-loaded rank h
//                 sheds part of its heaviest home expert e to a rank q of another node:
//                   a = min(NL_n - G tau, L_h - tau, rem_e, G tau - NL_m(q), tau - L_q),
//                 i.e. how much of each hot expert each node serves, capped so no node and no
//                 rank passes the water level (nodes in order of most load).
//             (2) GPU level, inside each node: its most-loaded rank h sheds its heaviest home
//                 expert to a rank q of the node: a = min(L_h - tau, rem_e, tau - L_q).
//             (3) The same across nodes for whatever (1)-(2) left above tau (e.g. a node short
//                 of slots). Every move fills q to tau, brings h down to tau or empties e's
//                 home (or fills or drains a node), so there are at most 2W + E + 2N of them.
//             (4) Relays, when the ranks below tau have no free slot left: h passes
//                 a = min(L_h - tau, rem_e, tau - L_q, rem_x) of e to a rank p with a free slot,
//                 and p passes a of its home expert x to x's replica on q (p's load unchanged);
//                 the largest such a first.
//             Destinations must have a free slot (per-rank cap S) or already hold e; among them
//             those already holding e in this plan come first, then those where e is resident
//             from the previous micro-step's plan of this layer (same rank, the slot is kept, so
//             no weights move), then the rest, each group by most room (tie: lowest rank); a
//             reused candidate wins unless it has under half the room of the best other one.
//             (4) token split, per expert, to the amounts decided above (home: rem_e, each
//                 replica: what it took): first each instance takes tokens from its own rank,
//                 then from ranks of its node, then from any rank (in rank order).
//             Allocation-free after the first call for a layer when `out` is reused; O(E*W +
//             moves * W*S) per layer.
//
// Every plan passes validate_placement; no slot holds its own rank's home expert and no rank
// holds an expert twice. A planner is deterministic (no randomness; all ties by lowest index)
// and keeps the slots of its previous plan of each layer, which foresight reuses.
//
// Call order: begin_step(step_load) once per RL step (every planner accepts it; only the step
// planners use it), then plan(layer, load, out) for each micro-step and layer in execution
// order. Errors: std::invalid_argument naming the key or argument; step_oracle's plan() before
// any begin_step() is a std::logic_error.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "balancer/placement.h"
#include "balancer/topology.h"

namespace fm {

enum class PlannerKind { kNone, kStepEma, kStepOracle, kForesight };

// "none" | "step_ema" | "step_oracle" | "foresight"; throws std::invalid_argument otherwise.
PlannerKind planner_kind(std::string_view name);
std::string_view planner_name(PlannerKind kind);

struct PlannerConfig {
  std::string name = "none";  // see above
  Topology topology;          // W = nodes * gpus_per_node
  int32_t n_experts = 0;      // E, E % W == 0
  int32_t n_moe_layers = 1;   // L >= 1
  int32_t replica_slots = 0;  // S >= 0 per rank and layer
  double ema_decay = 0.5;     // step_ema: weight of the old EMA, in [0, 1)
};

// Throws std::invalid_argument naming the key ("planner.replica_slots", ...) and the value.
void validate_planner_config(const PlannerConfig& config);

class Planner {
 public:
  virtual ~Planner() = default;
  Planner(const Planner&) = delete;
  Planner& operator=(const Planner&) = delete;

  PlannerKind kind() const { return kind_; }
  const PlannerConfig& config() const { return config_; }
  int32_t world_size() const { return W_; }

  // Starts an RL step: step_load[l][e] = the step's total tokens routed to expert e in MoE
  // layer l ([L][E], e.g. step_expert_load()). Checked for shape and signs by every planner.
  void begin_step(const std::vector<std::vector<int64_t>>& step_load);

  // The plan of MoE layer `layer` for the next micro-step with load matrix `load` (E x W),
  // written into `out` (reshaped if needed; reusing it across calls avoids allocations).
  void plan(int32_t layer, const LoadMatrix& load, LayerPlacement& out);
  LayerPlacement plan(int32_t layer, const LoadMatrix& load);

  // Forgets the previous plans (every slot empty), so that the next plans depend only on the
  // loads from here on (and a step planner's history): e.g. at each RL step, so a resumed run
  // plans as an uninterrupted one.
  void forget_previous();
  // slots[r * S + s] of the previous plan of `layer` (-1 = empty; all -1 before the first).
  std::span<const int32_t> previous_slots(int32_t layer) const;

 protected:
  Planner(const PlannerConfig& config, PlannerKind kind);
  virtual void start_step(const std::vector<std::vector<int64_t>>& step_load);
  // Writes every slots[r] and every split[e][r] of `out`, already shaped E x W and W x S.
  virtual void plan_layer(int32_t layer, const LoadMatrix& load, LayerPlacement& out) = 0;

  PlannerConfig config_;
  PlannerKind kind_;
  int32_t W_, E_, S_, L_, N_, G_, H_;  // ranks, experts, slots, layers, nodes, GPUs, E / W
  std::vector<int32_t> previous_;      // [L][W * S]
};

// The planner named by config.name (after validate_planner_config).
std::unique_ptr<Planner> make_planner(const PlannerConfig& config);

}  // namespace fm
