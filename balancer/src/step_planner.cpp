// step_ema and step_oracle (balancer/planner.h): the EPLB-style step-level baselines. One
// replica set per RL step and layer (replica counts by largest load per instance, hierarchical
// LPT packing with per-rank slot caps), then a static, equal token split per micro-step.
#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

#include "balancer/src/planners.h"

namespace fm::planners {

StepPlanner::StepPlanner(const PlannerConfig& c, PlannerKind kind) : Planner(c, kind) {
  ema_.assign(static_cast<size_t>(L_), std::vector<double>(static_cast<size_t>(E_), 0.0));
  step_slots_.assign(static_cast<size_t>(L_),
                     std::vector<int32_t>(static_cast<size_t>(W_ * S_), -1));
  inst_begin_.resize(static_cast<size_t>(L_));
  inst_.resize(static_cast<size_t>(L_));
  const std::vector<double> none(static_cast<size_t>(E_), 0.0);
  for (int32_t l = 0; l < L_; ++l) place_step(l, none);  // static EP until a step is planned
}

void StepPlanner::start_step(const std::vector<std::vector<int64_t>>& step_load) {
  std::vector<double> w(static_cast<size_t>(E_));
  for (int32_t l = 0; l < L_; ++l) {
    if (kind_ == PlannerKind::kStepOracle) {
      for (int32_t e = 0; e < E_; ++e) w[e] = static_cast<double>(step_load[l][e]);
      place_step(l, w);
    } else {
      // Plan from the history only, then fold this step in.
      std::vector<double>& ema = ema_[l];
      if (have_history_) {
        place_step(l, ema);
      } else {
        std::fill(w.begin(), w.end(), 0.0);
        place_step(l, w);
      }
      const double d = config_.ema_decay;
      for (int32_t e = 0; e < E_; ++e) {
        const double x = static_cast<double>(step_load[l][e]);
        ema[e] = have_history_ ? d * ema[e] + (1.0 - d) * x : x;
      }
    }
  }
  have_history_ = true;
  have_step_ = true;
}

void StepPlanner::place_step(int32_t layer, const std::vector<double>& w) {
  // (a) Replica counts: W * S times, one more instance for the largest w_e / c_e.
  std::vector<int32_t> count(static_cast<size_t>(E_), 1);
  for (int64_t k = 0; k < static_cast<int64_t>(W_) * S_; ++k) {
    int32_t best = -1;
    for (int32_t e = 0; e < E_; ++e)
      if (w[e] > 0 && count[e] < W_ && (best < 0 || w[e] / count[e] > w[best] / count[best]))
        best = e;
    if (best < 0) break;
    ++count[best];
  }
  // (b) Hierarchical LPT: homes fixed with w_e / c_e each, replicas heaviest first.
  std::vector<double> rank_load(static_cast<size_t>(W_), 0.0),
      node_load(static_cast<size_t>(N_), 0.0);
  for (int32_t e = 0; e < E_; ++e) {
    const double piece = w[e] / count[e];
    rank_load[e / H_] += piece;
    node_load[(e / H_) / G_] += piece;
  }
  struct Item {
    double load;
    int32_t expert;
  };
  std::vector<Item> items;
  for (int32_t e = 0; e < E_; ++e)
    for (int32_t c = 1; c < count[e]; ++c) items.push_back({w[e] / count[e], e});
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.load > b.load; });
  std::vector<int32_t>& slots = step_slots_[layer];
  std::fill(slots.begin(), slots.end(), -1);
  std::vector<int32_t> used(static_cast<size_t>(W_), 0);
  auto eligible = [&](int32_t q, int32_t e) {
    if (used[q] >= S_ || q == e / H_) return false;
    for (int32_t s = 0; s < used[q]; ++s)
      if (slots[q * S_ + s] == e) return false;
    return true;
  };
  for (const Item& it : items) {
    int32_t best_node = -1;
    for (int32_t n = 0; n < N_; ++n) {
      if (best_node >= 0 && node_load[n] >= node_load[best_node]) continue;
      for (int32_t q = n * G_; q < (n + 1) * G_; ++q)
        if (eligible(q, it.expert)) {
          best_node = n;
          break;
        }
    }
    if (best_node < 0) continue;  // no rank can take it: dropped
    int32_t best = -1;
    for (int32_t q = best_node * G_; q < (best_node + 1) * G_; ++q)
      if (eligible(q, it.expert) && (best < 0 || rank_load[q] < rank_load[best])) best = q;
    slots[best * S_ + used[best]++] = it.expert;
    rank_load[best] += it.load;
    node_load[best_node] += it.load;
  }
  // Instance lists: home first, then replicas in slot order.
  std::vector<int32_t>& begin = inst_begin_[layer];
  std::vector<int32_t>& inst = inst_[layer];
  begin.assign(static_cast<size_t>(E_) + 1, 0);
  for (int32_t i = 0; i < W_ * S_; ++i)
    if (slots[i] >= 0) ++begin[slots[i] + 1];
  for (int32_t e = 0; e < E_; ++e) begin[e + 1] += begin[e] + 1;  // + 1: the home
  inst.assign(static_cast<size_t>(begin[E_]), 0);
  std::vector<int32_t> fill(begin.begin(), begin.end() - 1);
  for (int32_t e = 0; e < E_; ++e) inst[fill[e]++] = -1 - e / H_;
  for (int32_t i = 0; i < W_ * S_; ++i)
    if (slots[i] >= 0) inst[fill[slots[i]]++] = i;
}

void StepPlanner::plan_layer(int32_t layer, const LoadMatrix& load, LayerPlacement& out) {
  if (kind_ == PlannerKind::kStepOracle && !have_step_)
    throw std::logic_error(
        "step_oracle: plan() called before begin_step(): the oracle plans from the step's load");
  const std::vector<int32_t>& slots = step_slots_[layer];
  for (int32_t r = 0; r < W_; ++r)
    std::copy(slots.begin() + r * S_, slots.begin() + (r + 1) * S_, out.slots[r].begin());
  const std::vector<int32_t>& begin = inst_begin_[layer];
  const std::vector<int32_t>& inst = inst_[layer];
  for (int32_t e = 0; e < E_; ++e) {
    const int32_t first = begin[e], c = begin[e + 1] - begin[e];
    for (int32_t r = 0; r < W_; ++r) {
      auto& shares = out.split[e][r];
      shares.clear();
      const int64_t n = load[e][r];
      if (n == 0) continue;
      // Equal split; the n % c leftover tokens go to instances (e + r) mod c, ... (cyclic).
      const int64_t base = n / c, extra = n % c;
      const int32_t start = (e + r) % c;
      for (int32_t j = 0; j < c; ++j) {
        const int64_t tokens = base + (((j - start + c) % c) < extra ? 1 : 0);
        if (tokens == 0) continue;
        const int32_t id = inst[first + j];
        const ExpertInstance where = id < 0 ? ExpertInstance{-1 - id, ExpertInstance::kHomeSlot}
                                            : ExpertInstance{id / S_, id % S_};
        shares.push_back({where, tokens});
      }
    }
  }
}

}  // namespace fm::planners
