// The planner interface (balancer/planner.h): config checks, the factory, input checks shared
// by every planner, the previous plans, and the `none` planner.
#include "balancer/planner.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

#include "balancer/load_matrix.h"
#include "balancer/src/planners.h"

namespace fm {

PlannerKind planner_kind(std::string_view name) {
  if (name == "none") return PlannerKind::kNone;
  if (name == "step_ema") return PlannerKind::kStepEma;
  if (name == "step_oracle") return PlannerKind::kStepOracle;
  if (name == "foresight") return PlannerKind::kForesight;
  throw std::invalid_argument(fmt::format(
      "planner.name: unknown planner '{}' (expected none, step_ema, step_oracle or foresight)",
      name));
}

std::string_view planner_name(PlannerKind kind) {
  switch (kind) {
    case PlannerKind::kNone:
      return "none";
    case PlannerKind::kStepEma:
      return "step_ema";
    case PlannerKind::kStepOracle:
      return "step_oracle";
    case PlannerKind::kForesight:
      return "foresight";
  }
  return "?";
}

void validate_planner_config(const PlannerConfig& c) {
  planner_kind(c.name);
  if (c.topology.nodes < 1)
    throw std::invalid_argument(
        fmt::format("planner.topology.nodes must be >= 1 (got {})", c.topology.nodes));
  if (c.topology.gpus_per_node < 1)
    throw std::invalid_argument(fmt::format("planner.topology.gpus_per_node must be >= 1 (got {})",
                                            c.topology.gpus_per_node));
  const int32_t W = c.topology.world_size();
  if (c.n_experts < 1 || c.n_experts % W != 0)
    throw std::invalid_argument(fmt::format(
        "planner.n_experts: {} experts cannot be split evenly over {} ranks ({} nodes x {} GPUs)",
        c.n_experts, W, c.topology.nodes, c.topology.gpus_per_node));
  if (c.n_moe_layers < 1)
    throw std::invalid_argument(
        fmt::format("planner.n_moe_layers must be >= 1 (got {})", c.n_moe_layers));
  if (c.replica_slots < 0)
    throw std::invalid_argument(
        fmt::format("planner.replica_slots must be >= 0 (got {})", c.replica_slots));
  if (!(c.ema_decay >= 0.0 && c.ema_decay < 1.0))
    throw std::invalid_argument(
        fmt::format("planner.ema_decay must be in [0, 1) (got {})", c.ema_decay));
}

Planner::Planner(const PlannerConfig& c, PlannerKind kind) : config_(c), kind_(kind) {
  validate_planner_config(c);
  W_ = c.topology.world_size();
  E_ = c.n_experts;
  S_ = c.replica_slots;
  L_ = c.n_moe_layers;
  N_ = c.topology.nodes;
  G_ = c.topology.gpus_per_node;
  H_ = E_ / W_;
  previous_.assign(static_cast<size_t>(L_) * W_ * S_, -1);
}

void Planner::begin_step(const std::vector<std::vector<int64_t>>& step_load) {
  if (static_cast<int32_t>(step_load.size()) != L_)
    throw std::invalid_argument(fmt::format("{}: begin_step: step load has {} layers, expected {}",
                                            planner_name(kind_), step_load.size(), L_));
  for (size_t l = 0; l < step_load.size(); ++l) {
    if (static_cast<int32_t>(step_load[l].size()) != E_)
      throw std::invalid_argument(
          fmt::format("{}: begin_step: layer {} has {} experts, expected {}", planner_name(kind_),
                      l, step_load[l].size(), E_));
    for (size_t e = 0; e < step_load[l].size(); ++e)
      if (step_load[l][e] < 0)
        throw std::invalid_argument(
            fmt::format("{}: begin_step: layer {} expert {}: negative load {}", planner_name(kind_),
                        l, e, step_load[l][e]));
  }
  start_step(step_load);
}

void Planner::start_step(const std::vector<std::vector<int64_t>>&) {}

void Planner::forget_previous() {
  std::fill(previous_.begin(), previous_.end(), -1);
}

void Planner::plan(int32_t layer, const LoadMatrix& load, LayerPlacement& out) {
  if (layer < 0 || layer >= L_)
    throw std::invalid_argument(
        fmt::format("{}: layer {} is out of range [0, {})", planner_name(kind_), layer, L_));
  // Shape and signs, without building a message unless something is wrong.
  bool ok = static_cast<int32_t>(load.size()) == E_;
  for (size_t e = 0; ok && e < load.size(); ++e) {
    ok = static_cast<int32_t>(load[e].size()) == W_;
    for (int32_t r = 0; ok && r < W_; ++r) ok = load[e][r] >= 0;
  }
  if (!ok)
    validate_load_matrix(load, E_, W_,
                         fmt::format("{}: layer {}: load matrix", planner_name(kind_), layer));
  planners::shape_output(out, W_, E_, S_);
  plan_layer(layer, load, out);
  int32_t* prev = previous_.data() + static_cast<size_t>(layer) * W_ * S_;
  for (int32_t r = 0; r < W_; ++r)
    for (int32_t s = 0; s < S_; ++s) prev[r * S_ + s] = out.slots[r][s];
}

LayerPlacement Planner::plan(int32_t layer, const LoadMatrix& load) {
  LayerPlacement out;
  plan(layer, load, out);
  return out;
}

std::span<const int32_t> Planner::previous_slots(int32_t layer) const {
  if (layer < 0 || layer >= L_)
    throw std::invalid_argument(
        fmt::format("{}: layer {} is out of range [0, {})", planner_name(kind_), layer, L_));
  return {previous_.data() + static_cast<size_t>(layer) * W_ * S_, static_cast<size_t>(W_ * S_)};
}

std::unique_ptr<Planner> make_planner(const PlannerConfig& config) {
  validate_planner_config(config);
  switch (planner_kind(config.name)) {
    case PlannerKind::kNone:
      return std::make_unique<planners::NonePlanner>(config);
    case PlannerKind::kStepEma:
      return std::make_unique<planners::StepPlanner>(config, PlannerKind::kStepEma);
    case PlannerKind::kStepOracle:
      return std::make_unique<planners::StepPlanner>(config, PlannerKind::kStepOracle);
    case PlannerKind::kForesight:
      return std::make_unique<planners::ForesightPlanner>(config);
  }
  throw std::logic_error("make_planner: unreachable");
}

namespace planners {

void shape_output(LayerPlacement& out, int32_t W, int32_t E, int32_t S) {
  out.world_size = W;
  out.n_experts = E;
  out.replica_slots = S;
  out.slots.resize(static_cast<size_t>(W));
  for (auto& s : out.slots) s.resize(static_cast<size_t>(S));
  out.split.resize(static_cast<size_t>(E));
  for (auto& per_source : out.split) per_source.resize(static_cast<size_t>(W));
}

void NonePlanner::plan_layer(int32_t, const LoadMatrix& load, LayerPlacement& out) {
  for (auto& s : out.slots) std::fill(s.begin(), s.end(), -1);
  for (int32_t e = 0; e < E_; ++e) {
    const ExpertInstance home{e / H_, ExpertInstance::kHomeSlot};
    for (int32_t r = 0; r < W_; ++r) {
      auto& shares = out.split[e][r];
      shares.clear();
      if (load[e][r] > 0) shares.push_back({home, load[e][r]});
    }
  }
}

}  // namespace planners

}  // namespace fm
