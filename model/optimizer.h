// AdamW (decoupled weight decay) over a ParamArena, with global grad-norm
// clipping, learning-rate schedules and the skip of non-finite steps.
#pragma once

#include <cstdint>
#include <string>

#include "engine/backend.h"
#include "model/weights.h"

namespace fm {

class ConfigNode;

enum class LrSchedule { constant, linear_warmup, cosine };

struct OptimizerConfig {
  double lr = 3e-4;
  double min_lr = 0.0;  // cosine floor
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // matrices only; norms never decay
  double grad_clip = 1.0;     // max global L2 norm; 0 disables
  LrSchedule schedule = LrSchedule::constant;
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;  // cosine horizon

  // Reads and validates the `optimizer:` mapping.
  static OptimizerConfig from_yaml(const ConfigNode& node);
};

// The learning rate at optimizer step `step` (0-based).
double lr_at(const OptimizerConfig& c, int64_t step);

struct StepReport {
  double grad_norm = 0.0;  // before clipping
  double lr = 0.0;
  bool skipped = false;  // non-finite grad norm: parameters untouched
};

class AdamW {
 public:
  AdamW(OptimizerConfig config, ParamArena& params, Backend& backend);

  // Clips, then updates every parameter from `grads` (same layout). Counts and
  // skips the step when the gradient norm is not finite.
  StepReport step(ParamArena& grads);
  // The same with the gradient norm given: under expert parallelism every rank passes the
  // global norm (MoeTransformer::grad_norm), so all ranks clip and skip alike.
  StepReport step(ParamArena& grads, double grad_norm);

  const OptimizerConfig& config() const { return config_; }
  int64_t steps_taken() const { return steps_taken_; }  // applied updates (Adam's t)
  int64_t steps_skipped() const { return steps_skipped_; }
  Tensor& exp_avg() { return m_; }  // flat, like the param arena
  Tensor& exp_avg_sq() { return v_; }
  void set_counters(int64_t taken, int64_t skipped) {
    steps_taken_ = taken;
    steps_skipped_ = skipped;
  }

 private:
  OptimizerConfig config_;
  ParamArena& params_;
  Backend& backend_;
  Tensor m_, v_;
  int64_t steps_taken_ = 0;
  int64_t steps_skipped_ = 0;
};

}  // namespace fm
