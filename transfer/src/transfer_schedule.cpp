#include "transfer/transfer_schedule.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace fm {

namespace {

[[noreturn]] void bad(const std::string& message) {
  throw std::invalid_argument("transfer schedule: " + message);
}

// One slot buffer of a rank: what it holds and whether a use still needs it.
struct Buffer {
  double free_at = 0;                          // when the last use holding it was released
  int32_t holder = -1;                         // the use holding it, -1 when free
  int32_t layer = -1, expert = -1, slot = -1;  // its contents (-1: nothing usable)
};

void validate(const TransferWorkload& w, const ScheduleOptions& o) {
  o.links.validate(w.world_size);
  if (w.n_experts < 1 || w.n_experts % w.world_size != 0)
    bad(fmt::format("n_experts ({}) must be a positive multiple of world_size ({})", w.n_experts,
                    w.world_size));
  if (w.n_layers < 1) bad(fmt::format("n_layers must be >= 1 (got {})", w.n_layers));
  if (w.slots_per_rank < 0)
    bad(fmt::format("slots_per_rank must be >= 0 (got {})", w.slots_per_rank));
  if (w.expert_bytes < 1) bad(fmt::format("expert_bytes must be >= 1 (got {})", w.expert_bytes));
  if (o.lookahead < 0) bad(fmt::format("lookahead must be >= 0 (got {})", o.lookahead));
  if (o.slot_memory_bytes < 0)
    bad(fmt::format("slot_memory_bytes must be >= 0 (got {})", o.slot_memory_bytes));
  for (size_t u = 0; u < w.uses.size(); ++u) {
    const SlotUse& use = w.uses[u];
    if (use.layer < 0 || use.layer >= w.n_layers)
      bad(fmt::format("use {} (micro-step {}) is for layer {}, not in [0, {})", u, use.micro_step,
                      use.layer, w.n_layers));
    if (static_cast<int32_t>(use.slots.size()) != w.world_size)
      bad(fmt::format("use {} (micro-step {}, layer {}) has slot tables for {} ranks, expected {}",
                      u, use.micro_step, use.layer, use.slots.size(), w.world_size));
    for (int32_t r = 0; r < w.world_size; ++r) {
      if (static_cast<int32_t>(use.slots[r].size()) != w.slots_per_rank)
        bad(fmt::format("use {} (micro-step {}, layer {}): rank {} has {} slots, expected {}", u,
                        use.micro_step, use.layer, r, use.slots[r].size(), w.slots_per_rank));
      for (int32_t s = 0; s < w.slots_per_rank; ++s)
        if (use.slots[r][s] < -1 || use.slots[r][s] >= w.n_experts)
          bad(
              fmt::format("use {} (micro-step {}, layer {}): rank {} slot {} holds expert {}, not "
                          "in [-1, {})",
                          u, use.micro_step, use.layer, r, s, use.slots[r][s], w.n_experts));
    }
  }
  for (size_t p = 0; p < w.phases.size(); ++p) {
    const ComputePhase& ph = w.phases[p];
    if (ph.use < 0 || static_cast<size_t>(ph.use) >= w.uses.size())
      bad(fmt::format("phase {} is for use {}, not in [0, {})", p, ph.use, w.uses.size()));
    if (!(ph.seconds >= 0) || !std::isfinite(ph.seconds))
      bad(fmt::format("phase {} lasts {} s (must be >= 0 and finite)", p, ph.seconds));
  }
}

}  // namespace

TransferWorkload layered_workload(int32_t n_experts, int64_t expert_bytes,
                                  const std::vector<std::vector<SlotTable>>& plans,
                                  double forward_s, double backward_s) {
  TransferWorkload w;
  w.n_experts = n_experts;
  w.expert_bytes = expert_bytes;
  if (plans.empty() || plans[0].empty() || plans[0][0].empty())
    bad("layered_workload needs at least one micro-step, one layer and one rank");
  w.n_layers = static_cast<int32_t>(plans[0].size());
  w.world_size = static_cast<int32_t>(plans[0][0].size());
  w.slots_per_rank = static_cast<int32_t>(plans[0][0][0].size());
  const auto L = w.n_layers;
  for (size_t m = 0; m < plans.size(); ++m) {
    if (static_cast<int32_t>(plans[m].size()) != L)
      bad(fmt::format("micro-step {} has plans for {} layers, micro-step 0 for {}", m,
                      plans[m].size(), L));
    const auto base = static_cast<int32_t>(w.uses.size());
    for (int32_t l = 0; l < L; ++l) {
      w.uses.push_back({static_cast<int64_t>(m), l, plans[m][l]});
      w.phases.push_back({base + l, forward_s});
    }
    if (backward_s > 0)
      for (int32_t l = L - 1; l >= 0; --l) w.phases.push_back({base + l, backward_s});
  }
  return w;
}

TransferSchedule schedule_transfers(const TransferWorkload& w, const ScheduleOptions& o) {
  validate(w, o);
  const int32_t W = w.world_size, S = w.slots_per_rank, L = w.n_layers;
  const auto U = static_cast<int32_t>(w.uses.size());

  // First and last phase of every use; uses must come in first-phase order.
  std::vector<int32_t> first(U, -1), last(U, -1);
  for (size_t p = 0; p < w.phases.size(); ++p) {
    const int32_t u = w.phases[p].use;
    if (first[u] < 0) first[u] = static_cast<int32_t>(p);
    last[u] = static_cast<int32_t>(p);
  }
  for (int32_t u = 0; u < U; ++u) {
    if (first[u] < 0)
      bad(fmt::format("use {} (micro-step {}, layer {}) has no compute phase", u,
                      w.uses[u].micro_step, w.uses[u].layer));
    if (u > 0 && first[u] < first[u - 1])
      bad(
          fmt::format("use {} starts (phase {}) before use {} (phase {}): uses must be ordered "
                      "by their first phase",
                      u, first[u], u - 1, first[u - 1]));
  }
  // The previous use of the same layer, and (default memory) the rule that it has ended.
  std::vector<int32_t> prev(U, -1), latest(L, -1);
  for (int32_t u = 0; u < U; ++u) {
    prev[u] = latest[w.uses[u].layer];
    latest[w.uses[u].layer] = u;
    if (o.slot_memory_bytes == 0 && prev[u] >= 0 && last[prev[u]] >= first[u])
      bad(
          fmt::format("uses {} and {} of layer {} are live at once (phase {} of the first runs "
                      "after phase {} of the second), but the layer has one set of S slots; give "
                      "slot_memory_bytes for a shared pool",
                      prev[u], u, w.uses[u].layer, last[prev[u]], first[u]));
  }

  TransferSchedule out;
  const bool pooled = o.slot_memory_bytes > 0;
  const int64_t pool = pooled ? o.slot_memory_bytes / w.expert_bytes : int64_t{S} * L;
  if (pool > std::numeric_limits<int32_t>::max())
    bad(fmt::format("slot memory of {} buffers per rank is too many", pool));
  out.buffers_per_rank = static_cast<int32_t>(pool);
  std::vector<std::vector<Buffer>> buffers(W, std::vector<Buffer>(out.buffers_per_rank));
  out.phase_start.assign(w.phases.size(), 0.0);
  out.use_stall.assign(U, 0.0);
  out.use_release.assign(U, 0.0);
  out.buffer.assign(U, SlotTable(W, std::vector<int32_t>(S, -1)));
  PathLoad load(o.links, W);

  // Commits the moves of use u (issued at `issue`) and returns when its last one finishes.
  auto commit = [&](int32_t u, double issue) {
    const SlotUse& use = w.uses[u];
    double ready = 0;
    for (int32_t r = 0; r < W; ++r) {
      std::vector<Buffer>& mine = buffers[r];
      // Reused slots first, so that a moved slot never takes a buffer this use still reads.
      std::vector<int32_t> to_move;
      for (int32_t s = 0; s < S; ++s) {
        const int32_t e = use.slots[r][s];
        if (e < 0) continue;
        const int32_t b = prev[u] >= 0 ? out.buffer[prev[u]][r][s] : -1;
        if (b >= 0 && mine[b].holder < 0 && mine[b].layer == use.layer && mine[b].expert == e &&
            mine[b].slot == s) {
          mine[b].holder = u;
          out.buffer[u][r][s] = b;
          ++out.slots_reused;
        } else {
          to_move.push_back(s);
        }
      }
      for (int32_t s : to_move) {
        int32_t b = -1;
        if (!pooled) {
          b = use.layer * S + s;
          if (mine[b].holder >= 0)  // excluded by validation; kept as an invariant check
            bad(fmt::format("rank {} slot {} of layer {} is still held by use {}", r, s, use.layer,
                            mine[b].holder));
        } else {
          // The free buffer that became free first (lowest index on a tie).
          for (int32_t i = 0; i < out.buffers_per_rank; ++i)
            if (mine[i].holder < 0 && (b < 0 || mine[i].free_at < mine[b].free_at)) b = i;
          if (b < 0)
            bad(
                fmt::format("slot memory: rank {} needs a buffer for slot {} of use {} "
                            "(micro-step {}, layer {}) but all {} buffers ({} bytes of {}-byte "
                            "experts) are held by uses still running; raise slot_memory_bytes",
                            r, s, u, use.micro_step, use.layer, out.buffers_per_rank,
                            o.slot_memory_bytes, w.expert_bytes));
        }
        const int32_t e = use.slots[r][s];
        const Move m{e, e / (w.n_experts / W), r, s, w.expert_bytes};
        const PathChoice c = load.assign(m, std::max(issue, mine[b].free_at), o.policy);
        mine[b] = {mine[b].free_at, u, use.layer, e, s};
        out.buffer[u][r][s] = b;
        out.moves.push_back({u, m, c.path, issue, c.start, c.finish, b});
        (c.path == TransferPath::direct ? out.bytes_direct : out.bytes_cpu) += m.bytes;
        ++(c.path == TransferPath::direct ? out.moves_direct : out.moves_cpu);
        ready = std::max(ready, c.finish);
      }
    }
    return ready;
  };

  double t = 0;
  for (size_t p = 0; p < w.phases.size(); ++p) {
    const int32_t u = w.phases[p].use;
    double start = t;
    if (first[u] == static_cast<int32_t>(p)) {
      const int32_t issuer = u - o.lookahead;
      // The issuing use's first phase has started already (or is this one: no prefetch).
      const double issue = issuer < 0 ? 0.0 : (issuer == u ? t : out.phase_start[first[issuer]]);
      start = std::max(t, commit(u, issue));
      out.use_stall[u] = start - t;
      out.stall_s += start - t;
    }
    out.phase_start[p] = start;
    t = start + w.phases[p].seconds;
    out.compute_s += w.phases[p].seconds;
    if (last[u] == static_cast<int32_t>(p)) {
      out.use_release[u] = t;
      for (int32_t r = 0; r < W; ++r)
        for (int32_t s = 0; s < S; ++s) {
          const int32_t b = out.buffer[u][r][s];
          if (b < 0) continue;
          buffers[r][b].holder = -1;
          buffers[r][b].free_at = t;
        }
    }
  }
  out.makespan_s = t;
  return out;
}

}  // namespace fm
