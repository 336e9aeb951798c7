#include "model/optimizer.h"

#include <cmath>

#include "engine/config.h"
#include "engine/error.h"

namespace fm {

OptimizerConfig OptimizerConfig::from_yaml(const ConfigNode& n) {
  OptimizerConfig c;
  c.lr = n.get_in_range("lr", 0.0, 10.0, c.lr);
  c.min_lr = n.get_in_range("min_lr", 0.0, 10.0, c.min_lr);
  c.beta1 = n.get_in_range("beta1", 0.0, 0.999999, c.beta1);
  c.beta2 = n.get_in_range("beta2", 0.0, 0.999999999, c.beta2);
  c.eps = n.get_in_range("eps", 1e-30, 1.0, c.eps);
  c.weight_decay = n.get_in_range("weight_decay", 0.0, 10.0, c.weight_decay);
  c.grad_clip = n.get_in_range("grad_clip", 0.0, 1e9, c.grad_clip);
  const std::string s =
      n.get_choice("schedule", {"constant", "linear_warmup", "cosine"}, "constant");
  c.schedule = s == "cosine"          ? LrSchedule::cosine
               : s == "linear_warmup" ? LrSchedule::linear_warmup
                                      : LrSchedule::constant;
  c.warmup_steps = n.get<int64_t>("warmup_steps", 0);
  if (c.warmup_steps < 0) n.fail("warmup_steps", "must be >= 0");
  c.total_steps = n.get<int64_t>("total_steps", 0);
  if (c.schedule == LrSchedule::cosine && c.total_steps <= c.warmup_steps)
    n.fail("total_steps",
           fmt::format("must exceed warmup_steps ({}) for the cosine schedule", c.warmup_steps));
  if (c.min_lr > c.lr) n.fail("min_lr", "must not exceed lr");
  return c;
}

double lr_at(const OptimizerConfig& c, int64_t step) {
  if (c.schedule != LrSchedule::constant && step < c.warmup_steps)
    return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  if (c.schedule != LrSchedule::cosine) return c.lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - c.warmup_steps) /
                        static_cast<double>(std::max<int64_t>(1, c.total_steps - c.warmup_steps)));
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(M_PI * progress));
}

AdamW::AdamW(OptimizerConfig config, ParamArena& params, Backend& backend)
    : config_(config), params_(params), backend_(backend) {
  m_ = backend_.zeros(params_.flat().shape(), params_.flat().dtype());
  v_ = backend_.zeros(params_.flat().shape(), params_.flat().dtype());
}

StepReport AdamW::step(ParamArena& grads) {
  return step(grads, std::sqrt(backend_.sum_squares(grads.flat())));
}

StepReport AdamW::step(ParamArena& grads, double grad_norm) {
  StepReport r;
  r.lr = lr_at(config_, steps_taken_ + steps_skipped_);
  r.grad_norm = grad_norm;
  if (!std::isfinite(r.grad_norm)) {
    ++steps_skipped_;
    r.skipped = true;
    return r;
  }
  if (config_.grad_clip > 0.0 && r.grad_norm > config_.grad_clip)
    backend_.scale(grads.flat(), config_.grad_clip / r.grad_norm);
  ++steps_taken_;
  int64_t offset = 0;
  for (const ParamSlot& p : params_.slots()) {
    const int64_t n = shape_numel(p.shape);
    Tensor param = params_.flat().slice(offset, offset + n);
    Tensor m = m_.slice(offset, offset + n), v = v_.slice(offset, offset + n);
    backend_.adamw_step(param, grads.flat().slice(offset, offset + n), m, v, r.lr, config_.beta1,
                        config_.beta2, config_.eps, p.weight_decay ? config_.weight_decay : 0.0,
                        steps_taken_);
    offset += n;
  }
  params_.touch();
  return r;
}

}  // namespace fm
