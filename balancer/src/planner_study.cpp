#include "balancer/planner_study.h"

#include <fmt/format.h>

#include <chrono>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <utility>

#include "balancer/load_matrix.h"
#include "balancer/plan_metrics.h"
#include "balancer/planner.h"

namespace fm {

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("planner study: " + what);
}

// The assignment of step t: its W*mb*M sequences, optionally shuffled, dealt as
// consecutive_assignment deals a trace.
SequenceAssignment step_assignment(int64_t first, int64_t W, int64_t mb, int64_t M,
                                   std::mt19937_64* shuffle) {
  std::vector<int64_t> seqs(static_cast<size_t>(W * mb * M));
  std::iota(seqs.begin(), seqs.end(), first);
  if (shuffle != nullptr)
    for (size_t i = seqs.size() - 1; i > 0; --i)  // Fisher-Yates on raw output (portable)
      std::swap(seqs[i], seqs[static_cast<size_t>((*shuffle)() % (i + 1))]);
  SequenceAssignment a(static_cast<size_t>(M));
  size_t next = 0;
  for (auto& micro : a) {
    micro.resize(static_cast<size_t>(W));
    for (auto& rank : micro)
      for (int64_t i = 0; i < mb; ++i) rank.push_back(seqs[next++]);
  }
  return a;
}

}  // namespace

std::vector<PlannerStudyRow> run_planner_study(const RoutingTrace& trace,
                                               const PlannerStudyOptions& o) {
  validate_topology(o.topology);
  check(o.micro_batch >= 1, fmt::format("micro_batch must be >= 1 (got {})", o.micro_batch));
  check(o.micro_steps >= 1, fmt::format("micro_steps must be >= 1 (got {})", o.micro_steps));
  check(o.expert_bytes >= 0, fmt::format("expert_bytes must be >= 0 (got {})", o.expert_bytes));
  validate_trace(trace);
  const int64_t W = o.topology.world_size();
  check(trace.n_experts % W == 0,
        fmt::format("the trace's {} experts are not divisible by W = {}", trace.n_experts, W));
  const int64_t per_step = W * o.micro_batch * o.micro_steps;
  const int64_t sequences = static_cast<int64_t>(trace.seq_offsets.size()) - 1;
  const int64_t steps = sequences / per_step;
  check(steps >= 1, fmt::format("the trace has {} sequences, fewer than one step of {} "
                                "(micro_steps {} x W {} x micro_batch {})",
                                sequences, per_step, o.micro_steps, W, o.micro_batch));

  // Load matrices of every step: loads[t][m][l].
  std::vector<std::vector<std::vector<LoadMatrix>>> loads;
  std::mt19937_64 shuffle(o.shuffle_seed);
  for (int64_t t = 0; t < steps; ++t)
    loads.push_back(
        load_matrices(trace, step_assignment(t * per_step, W, o.micro_batch, o.micro_steps,
                                             o.shuffle_seed != 0 ? &shuffle : nullptr)));

  std::vector<PlannerStudyRow> rows;
  for (const std::string& name : o.planners) {
    PlannerConfig c;
    c.name = name;
    c.topology = o.topology;
    c.n_experts = static_cast<int32_t>(trace.n_experts);
    c.n_moe_layers = static_cast<int32_t>(trace.n_moe_layers);
    c.replica_slots = o.replica_slots;
    c.ema_decay = o.ema_decay;
    std::unique_ptr<Planner> planner = make_planner(c);
    std::vector<LayerPlacement> previous(static_cast<size_t>(trace.n_moe_layers));
    std::vector<bool> has_previous(previous.size(), false);
    LayerPlacement plan;
    for (int64_t t = 0; t < steps; ++t) {
      const auto& step = loads[static_cast<size_t>(t)];
      planner->begin_step(step_expert_load(step));
      for (size_t m = 0; m < step.size(); ++m)
        for (size_t l = 0; l < step[m].size(); ++l) {
          const LoadMatrix& load = step[m][l];
          const auto start = std::chrono::steady_clock::now();
          planner->plan(static_cast<int32_t>(l), load, plan);
          const double us =
              std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
                  .count();
          const PlanMetrics pm = plan_metrics(
              plan, load, o.topology, has_previous[l] ? &previous[l] : nullptr, o.expert_bytes);
          PlannerStudyRow r;
          r.planner = name;
          r.step = t;
          r.micro_step = static_cast<int64_t>(m);
          r.layer = static_cast<int64_t>(l);
          r.max_over_mean = pm.max_over_mean;
          r.ratio_to_bound = pm.ratio_to_bound;
          r.bound_over_mean =
              pm.total == 0 ? 1 : static_cast<double>(pm.lower_bound) / pm.mean_load;
          r.cross_gpu_tokens = pm.cross_gpu_tokens;
          r.cross_node_tokens = pm.cross_node_tokens;
          r.total = pm.total;
          r.replicas = pm.replicas;
          r.new_replicas = pm.new_replicas;
          r.bytes_moved = pm.bytes_moved;
          r.plan_us = us;
          rows.push_back(std::move(r));
          std::swap(previous[l], plan);
          has_previous[l] = true;
        }
    }
  }
  return rows;
}

std::vector<PlannerStudySummary> summarize_planner_study(const std::vector<PlannerStudyRow>& rows) {
  std::vector<std::string> order;
  std::map<std::string, std::vector<const PlannerStudyRow*>> by;
  for (const PlannerStudyRow& r : rows) {
    auto [it, fresh] = by.try_emplace(r.planner);
    if (fresh) order.push_back(r.planner);
    it->second.push_back(&r);
  }
  std::vector<PlannerStudySummary> out;
  for (const std::string& name : order) {
    const auto& rs = by[name];
    std::vector<double> mom, rtb, us;
    double bound = 0, gpu = 0, node = 0, total = 0, fresh = 0, bytes = 0, within = 0;
    for (const PlannerStudyRow* r : rs) {
      mom.push_back(r->max_over_mean);
      rtb.push_back(r->ratio_to_bound);
      us.push_back(r->plan_us);
      bound += r->bound_over_mean;
      gpu += static_cast<double>(r->cross_gpu_tokens);
      node += static_cast<double>(r->cross_node_tokens);
      within += r->max_over_mean <= 1.10 ? 1 : 0;
      total += static_cast<double>(r->total);
      fresh += r->new_replicas;
      bytes += static_cast<double>(r->bytes_moved);
    }
    const double n = static_cast<double>(rs.size());
    PlannerStudySummary s;
    s.planner = name;
    s.max_over_mean = summarize(std::move(mom));
    s.ratio_to_bound = summarize(std::move(rtb));
    s.plan_us = summarize(std::move(us));
    s.bound_over_mean = bound / n;
    s.cross_gpu_share = total > 0 ? gpu / total : 0;
    s.cross_node_share = total > 0 ? node / total : 0;
    s.within_110 = within / n;
    s.new_replicas_per_plan = fresh / n;
    s.bytes_moved_per_plan = bytes / n;
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace fm
