#include "balancer/load_matrix.h"

#include <fmt/format.h>

#include <stdexcept>

namespace fm {

#define LOAD_CHECK(cond, ...)                                           \
  do {                                                                  \
    if (!(cond)) throw std::invalid_argument(fmt::format(__VA_ARGS__)); \
  } while (0)

SequenceAssignment consecutive_assignment(const RoutingTrace& trace, int64_t ranks,
                                          int64_t micro_batch) {
  LOAD_CHECK(ranks >= 1, "consecutive_assignment: ranks must be >= 1 (got {})", ranks);
  LOAD_CHECK(micro_batch >= 1, "consecutive_assignment: micro_batch must be >= 1 (got {})",
             micro_batch);
  LOAD_CHECK(trace.seq_offsets.size() >= 2, "consecutive_assignment: the trace has no sequences");
  const int64_t S = static_cast<int64_t>(trace.seq_offsets.size()) - 1;
  SequenceAssignment out;
  for (int64_t first = 0; first < S; first += ranks * micro_batch) {
    std::vector<std::vector<int64_t>> step(static_cast<size_t>(ranks));
    for (int64_t r = 0; r < ranks; ++r)
      for (int64_t s = first + r * micro_batch; s < first + (r + 1) * micro_batch && s < S; ++s)
        step[static_cast<size_t>(r)].push_back(s);
    out.push_back(std::move(step));
  }
  return out;
}

namespace {

// Checks the trace against a world of W ranks (once per call).
void check_trace_for_world(const RoutingTrace& trace, int64_t W) {
  validate_trace(trace);
  LOAD_CHECK(W >= 1, "load matrix: an assignment needs at least one rank (got {})", W);
  LOAD_CHECK(trace.n_experts >= 1 && trace.n_experts % W == 0,
             "load matrix: the trace's {} experts cannot be split evenly over {} ranks",
             trace.n_experts, W);
}

// Checks one micro-step's sequence indices: in range, none used before (by this or an earlier
// micro-step: `used` carries the marks).
void check_step(const RoutingTrace& trace, const std::vector<std::vector<int64_t>>& step, size_t m,
                std::vector<char>& used) {
  const int64_t S = static_cast<int64_t>(trace.seq_offsets.size()) - 1;
  for (size_t r = 0; r < step.size(); ++r)
    for (int64_t s : step[r]) {
      LOAD_CHECK(s >= 0 && s < S,
                 "load matrix: micro-step {}, rank {}: sequence {} is out of range [0, {})", m, r,
                 s, S);
      LOAD_CHECK(!used[static_cast<size_t>(s)],
                 "load matrix: micro-step {}, rank {}: sequence {} is assigned twice", m, r, s);
      used[static_cast<size_t>(s)] = 1;
    }
}

// The load matrix (E x W) of a checked micro-step in `layer`.
LoadMatrix accumulate(const RoutingTrace& trace, int64_t layer,
                      const std::vector<std::vector<int64_t>>& step) {
  LoadMatrix load(static_cast<size_t>(trace.n_experts), std::vector<int64_t>(step.size(), 0));
  for (size_t r = 0; r < step.size(); ++r)
    for (int64_t s : step[r])
      for (int64_t t = trace.seq_offsets[static_cast<size_t>(s)];
           t < trace.seq_offsets[static_cast<size_t>(s) + 1]; ++t)
        for (int64_t k = 0; k < trace.top_k; ++k) ++load[trace.at(t, layer, k)][r];
  return load;
}

}  // namespace

LoadMatrix load_matrix(const RoutingTrace& trace, int64_t layer,
                       const std::vector<std::vector<int64_t>>& step_assignment) {
  const int64_t W = static_cast<int64_t>(step_assignment.size());
  check_trace_for_world(trace, W);
  LOAD_CHECK(layer >= 0 && layer < trace.n_moe_layers,
             "load matrix: layer {} is out of range [0, {})", layer, trace.n_moe_layers);
  std::vector<char> used(trace.seq_offsets.size() - 1, 0);
  check_step(trace, step_assignment, 0, used);
  return accumulate(trace, layer, step_assignment);
}

std::vector<std::vector<LoadMatrix>> load_matrices(const RoutingTrace& trace,
                                                   const SequenceAssignment& assignment) {
  LOAD_CHECK(!assignment.empty(), "load matrix: the assignment has no micro-steps");
  const int64_t W = static_cast<int64_t>(assignment[0].size());
  check_trace_for_world(trace, W);
  for (size_t m = 0; m < assignment.size(); ++m)
    LOAD_CHECK(static_cast<int64_t>(assignment[m].size()) == W,
               "load matrix: micro-step {} has {} ranks, micro-step 0 has {}", m,
               assignment[m].size(), W);
  std::vector<char> used(trace.seq_offsets.size() - 1, 0);
  std::vector<std::vector<LoadMatrix>> out(assignment.size());
  for (size_t m = 0; m < assignment.size(); ++m) {
    check_step(trace, assignment[m], m, used);
    for (int64_t l = 0; l < trace.n_moe_layers; ++l)
      out[m].push_back(accumulate(trace, l, assignment[m]));
  }
  return out;
}

std::vector<std::vector<int64_t>> step_expert_load(
    const std::vector<std::vector<LoadMatrix>>& loads) {
  std::vector<std::vector<int64_t>> out;
  for (size_t m = 0; m < loads.size(); ++m) {
    LOAD_CHECK(m == 0 || loads[m].size() == loads[0].size(),
               "step_expert_load: micro-step {} has {} layers, micro-step 0 has {}", m,
               loads[m].size(), loads[0].size());
    if (m == 0) out.resize(loads[0].size());
    for (size_t l = 0; l < loads[m].size(); ++l) {
      const LoadMatrix& load = loads[m][l];
      if (m == 0) out[l].assign(load.size(), 0);
      LOAD_CHECK(load.size() == out[l].size(),
                 "step_expert_load: micro-step {} layer {} has {} experts, expected {}", m, l,
                 load.size(), out[l].size());
      for (size_t e = 0; e < load.size(); ++e)
        for (int64_t c : load[e]) out[l][e] += c;
    }
  }
  return out;
}

void validate_load_matrix(const LoadMatrix& load, int32_t n_experts, int32_t world_size,
                          const std::string& what) {
  LOAD_CHECK(world_size >= 1, "{}: world size must be >= 1 (got {})", what, world_size);
  LOAD_CHECK(n_experts >= 1 && n_experts % world_size == 0,
             "{}: {} experts cannot be split evenly over {} ranks", what, n_experts, world_size);
  LOAD_CHECK(static_cast<int64_t>(load.size()) == n_experts, "{}: {} expert rows, expected {}",
             what, load.size(), n_experts);
  for (size_t e = 0; e < load.size(); ++e) {
    LOAD_CHECK(static_cast<int64_t>(load[e].size()) == world_size,
               "{}: expert {} has {} source ranks, expected {}", what, e, load[e].size(),
               world_size);
    for (size_t r = 0; r < load[e].size(); ++r)
      LOAD_CHECK(load[e][r] >= 0, "{}: expert {} from rank {}: negative count {}", what, e, r,
                 load[e][r]);
  }
}

}  // namespace fm
