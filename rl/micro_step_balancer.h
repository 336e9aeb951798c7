// MicroStepBalancer: the balancer in the RL stages (see ../shared/design/DESIGN.md, "Expert
// parallelism and the balancer"). Recompute and update replay the rollout's routing, so the
// load of every micro-step is known before it runs; this class turns that foresight into a
// placement plan per (micro-step, MoE layer) and fills the replica slots the plans use.
//
// Per stage (a recompute pass, or one mini-batch of an update):
//   begin_stage(routes)   collective: every rank's expert counts of each of its micro-batches
//                         are all-gathered into the load matrices c[e][r] of every micro-step
//                         (the micro-batch counts must agree over the ranks); planning of
//                         micro-step 0 starts on a thread of its own
//   before_forward(k)     waits for micro-step k's plans, starts planning k + 1 (so it runs
//                         while k computes), starts the moves into the replica slots, and
//                         returns the plans for ForwardOptions::placements
//   after_forward(k)      recompute: the slots may be refilled
//   after_backward(k)     update: the replica gradients go back into their home experts
//   before_optimizer_step() / after_optimizer_step()   around AdamW (the transfer engine's
//                         drain and host-mirror refresh)
// Every rank computes the same plans (the planners are deterministic and see the same loads).
//
// Replica slots are filled by the CPU transfer engine (transfer/cpu_transfer.h: GPU-direct and
// CPU-assisted paths, chosen by the path-split model) when the ranks are in-process threads
// sharing a CpuTransferGroup, and by CommReplicaSlots (send/recv through the communicator, all
// counted as the direct path) otherwise (e.g. Gloo processes).
//
// Planners: none | step_ema | step_oracle | foresight (balancer/planner.h). The step planners
// get the step's global expert load at begin_step() (step_ema plans from earlier steps' EMA,
// step_oracle from this step's). With `none` or a single rank the balancer only measures:
// before_forward returns null and the imbalance before equals after.
#pragma once

#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "balancer/placement.h"
#include "balancer/planner.h"
#include "balancer/routing_trace.h"
#include "model/moe_transformer.h"
#include "transfer/path_model.h"

namespace fm {

class Communicator;
class CpuTransferGroup;
class CpuTransferEngine;
class CommReplicaSlots;
class TransferReplicaWeights;

struct BalancerConfig {
  std::string planner = "none";  // none | step_ema | step_oracle | foresight
  int64_t replica_slots = 0;     // S per rank and MoE layer
  int64_t nodes = 1;             // the topology: W = nodes x (W / nodes) GPUs
  double ema_decay = 0.5;        // step_ema
  PathPolicy transfer = PathPolicy::split;
};

// One stage's balance figures, summed over its micro-steps x MoE layers (means at the end).
struct StageBalance {
  std::string planner;                      // the planner's name
  int64_t plans = 0;                        // (micro-step, layer) pairs planned
  double before = 0;                        // sum of max/mean rank load with every token at home
  double after = 0;                         // sum of max/mean under the plans
  double ratio_to_bound = 0;                // sum of max load / lower bound under the plans
  double planner_s = 0;                     // planning time (on the planning thread)
  int64_t bytes_direct = 0, bytes_cpu = 0;  // expert weights moved into slots, per path
  // Per micro-step (mean over layers), in order: for the per-micro-step plot.
  std::vector<double> micro_before, micro_after;
};

// Hooks an update loop calls per micro-batch (update_actor, update_critic).
class MicroStepHooks {
 public:
  virtual ~MicroStepHooks() = default;
  virtual const std::vector<LayerPlacement>* before_forward(size_t micro) = 0;
  virtual void after_backward(size_t micro) = 0;
  virtual void before_optimizer_step() = 0;
  virtual void after_optimizer_step() = 0;
};

// The CPU transfer group for `model`'s routed experts at `world` in-process ranks (null when
// there is nothing to move: one rank, no slots or planner none). `dtype`: the parameters';
// `compute_dtype` bf16 (mixed precision) moves bf16 slots, half the bytes. Create it before
// the rank threads; it must outlive their balancers.
std::unique_ptr<CpuTransferGroup> make_cpu_transfer_group(const BalancerConfig& config,
                                                          const ModelConfig& model, DType dtype,
                                                          DType compute_dtype, int world);

class MicroStepBalancer final : public MicroStepHooks {
 public:
  // `group`: the CPU transfer group the in-process ranks share (null: CommReplicaSlots).
  // Collective when the model runs expert parallelism with a planner other than none.
  MicroStepBalancer(const BalancerConfig& config, MoeTransformer& model, Communicator* comm,
                    CpuTransferGroup* group);
  ~MicroStepBalancer() override;
  MicroStepBalancer(const MicroStepBalancer&) = delete;
  MicroStepBalancer& operator=(const MicroStepBalancer&) = delete;

  // Whether plans can move tokens (a planner other than none, more than one rank).
  bool planning() const { return planner_ != nullptr; }

  // Collective: the step's global expert load from this rank's micro-batch routes.
  void begin_step(const std::vector<const RoutingTrace*>& routes);
  // Collective: starts a stage over this rank's micro-batches; figures add into `out`.
  void begin_stage(const std::vector<const RoutingTrace*>& routes, StageBalance* out);
  const std::vector<LayerPlacement>* before_forward(size_t micro) override;
  void after_forward(size_t micro);
  void after_backward(size_t micro) override;
  void before_optimizer_step() override;
  void after_optimizer_step() override;

  // Collective: the stage's bytes moved are summed over the ranks into its StageBalance.
  void end_stage();

 private:
  // Plans (and figures) of micro-step k, computed on the planning thread.
  struct MicroPlan {
    std::vector<LayerPlacement> plans;
    double before = 0, after = 0, ratio = 0, seconds = 0;
  };
  MicroPlan plan_micro_step(size_t k);
  // [micro][layer][expert][rank] from the gathered counts.
  LoadMatrix load_of(size_t k, int64_t layer) const;

  BalancerConfig config_;
  MoeTransformer& model_;
  Communicator* comm_ = nullptr;
  int world_ = 1, rank_ = 0;
  int64_t layers_ = 0, experts_ = 0;
  Topology topology_;
  std::unique_ptr<Planner> planner_;
  std::unique_ptr<CpuTransferEngine> engine_;
  std::unique_ptr<TransferReplicaWeights> engine_slots_;
  std::unique_ptr<CommReplicaSlots> comm_slots_;
  // The stage: counts_[k][r][l * E + e], the plans being made, the figures.
  std::vector<std::vector<std::vector<int64_t>>> counts_;
  std::future<MicroPlan> next_;
  size_t next_k_ = 0;
  MicroPlan current_;
  StageBalance* out_ = nullptr;
  int64_t micro_steps_done_ = 0;  // over the run: the transfer engine's micro-step ids
  int64_t direct_seen_ = 0, cpu_seen_ = 0;
  int64_t stage_direct_ = 0, stage_cpu_ = 0;  // this rank's, since begin_stage
};

}  // namespace fm
