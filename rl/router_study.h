// The router-balance study (issue 8): the same pretraining run once per router-balancing
// method (none, switch_aux, global_aux, loss_free, phi with each potential), same seed,
// data and step budget, each measured the same way:
//   val_loss        token-mean cross entropy on the held-out set (LmTrainer::evaluate);
//   MaxVio_batch    (max_i load_i - mean) / mean of each training step's top-k load (all its
//                   micro-batches), per MoE layer, averaged over layers and over all steps;
//   MaxVio_global   the same over the whole held-out set's load, averaged over layers;
//   Gini            of the held-out load, averaged over layers; plus the per-layer load.
// And the interaction with the system balancer: the held-out routing trace, cut into
// rollout-sized micro-steps (W ranks x micro_batch sequences), planned by `none` (static EP)
// and `foresight` (balancer/planner_study.h): the per-micro-step EP imbalance max/mean
// before and after micro-step replication.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "balancer/planner_study.h"
#include "rl/lm_trainer.h"

namespace fm {

class ConfigNode;

struct RouterStudyMethod {
  std::string name;  // a label: "phi_neg_entropy"
  RouterBalanceConfig balance;
};

struct RouterStudyInteraction {
  int32_t nodes = 1, gpus_per_node = 8;  // W = nodes x gpus_per_node
  int32_t replica_slots = 1;             // S per rank and MoE layer
  int64_t micro_batch = 2;               // sequences per rank per micro-step
  int64_t micro_steps = 4;               // micro-steps per (simulated) RL step
};

// A study config: `run:` (an LmRunConfig file or preset: model, optimizer, train, data), optional
// `steps:` and `run_dir:` overrides, `methods:` (a list of {name, method, alpha, ...} as in
// model.router_balance) and `interaction:`.
struct RouterStudyConfig {
  LmRunConfig run;
  std::vector<RouterStudyMethod> methods;
  RouterStudyInteraction interaction;
  std::string origin;
  static RouterStudyConfig load(const std::string& name_or_path);  // a file or "study/phi_tiny"
  static RouterStudyConfig parse(const std::string& yaml_text, const std::string& origin);
};

struct RouterStudyResult {
  std::string method;
  RouterBalanceConfig balance;
  std::vector<double> step_max_vio;  // per training step: MaxVio_batch averaged over layers
  std::vector<double> step_lm_loss;  // per training step
  std::vector<LmEvalMetrics> evals;  // every train.eval_every steps and at the end (no routes)
  LmEvalMetrics final_eval;          // the last evaluation, with its routes
  double max_vio_batch = 0.0;        // mean of step_max_vio
  double max_vio_global = 0.0;       // final_eval.max_vio averaged over layers
  double gini = 0.0;                 // final_eval.gini averaged over layers
  PlannerStudySummary ep_before, ep_after;  // `none` and `foresight` on final_eval.routes
  double train_seconds = 0.0;
};

// One method: trains `run` with its router balance replaced by method.balance on `backend`,
// evaluates, and plans the held-out trace. `progress` (if set) gets each step's metrics.
RouterStudyResult run_router_method(const LmRunConfig& run, const RouterStudyMethod& method,
                                    std::shared_ptr<const TextCorpus> corpus,
                                    const RouterStudyInteraction& interaction, Backend& backend,
                                    const std::function<void(const LmStepMetrics&)>& progress = {});

}  // namespace fm
