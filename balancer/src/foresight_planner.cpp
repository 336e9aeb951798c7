// foresight (balancer/planner.h): per micro-step and layer, from the known load matrix, a
// hierarchical water-filling greedy (node level, GPU level, leftovers across nodes) that moves
// hot experts' tokens from overloaded ranks to replicas on ranks below the target tau, reusing
// the previous micro-step's replicas, then a locality-first token split. Hot path: no
// allocation once the scratch below and the caller's LayerPlacement have their capacity.
#include <algorithm>

#include "balancer/plan_metrics.h"
#include "balancer/src/planners.h"

namespace fm::planners {

ForesightPlanner::ForesightPlanner(const PlannerConfig& c) : Planner(c, PlannerKind::kForesight) {
  const size_t W = static_cast<size_t>(W_), E = static_cast<size_t>(E_),
               N = static_cast<size_t>(N_), WS = W * static_cast<size_t>(S_);
  total_.resize(E);
  rem_.resize(E);
  home_load_.resize(W);
  rank_load_.resize(W);
  node_load_.resize(N);
  slot_expert_.resize(WS);
  slot_tokens_.resize(WS);
  slots_used_.resize(W);
  first_rep_.resize(E);
  next_rep_.resize(WS);
  blocked_.resize(W);
  node_blocked_.resize(N);
  src_rem_.resize(W);
  node_cursor_.resize(N);
  inst_rank_.resize(WS + 1);
  inst_slot_.resize(WS + 1);
  inst_cap_.resize(WS + 1);
}

bool ForesightPlanner::shed(int32_t h, Scope scope, int64_t limit, std::span<const int32_t> prev) {
  // The heaviest home expert of h still holding tokens (ties: lowest id).
  int32_t e = -1;
  for (int32_t x = h * H_; x < (h + 1) * H_; ++x)
    if (rem_[x] > 0 && (e < 0 || rem_[x] > rem_[e])) e = x;
  if (e < 0) return false;
  const int64_t want = std::min(limit, rem_[e]);
  const int32_t home_node = h / G_;

  // Candidates: below tau, with a free slot or already holding e. Classes: 0 = holds e in this
  // plan (no slot, no transfer), 1 = e resident in a free slot from the previous plan (no
  // transfer), 2 = other. Best of each class, and of classes 1 and 2 together, by room
  // (ties: lowest rank). Comparing a reused class with the best of a FIXED set (1 + 2) makes
  // a repeated load matrix give the same choices as the first time.
  int32_t best[4] = {-1, -1, -1, -1}, best_slot[4] = {-1, -1, -1, -1};  // [3] = classes 1 + 2
  int64_t room[4] = {0, 0, 0, 0};
  int32_t q_begin = 0, q_end = W_;
  if (scope == Scope::kSameNode) {
    q_begin = home_node * G_;
    q_end = q_begin + G_;
  }
  auto consider = [&](int32_t cls, int32_t q, int32_t slot, int64_t r) {
    if (best[cls] < 0 || r > room[cls]) {
      best[cls] = q;
      best_slot[cls] = slot;
      room[cls] = r;
    }
  };
  for (int32_t q = q_begin; q < q_end; ++q) {
    if (q == h || rank_load_[q] >= tau_) continue;
    const int32_t qn = q / G_;
    int64_t r = tau_ - rank_load_[q];
    if (scope == Scope::kOtherNodes) {
      if (qn == home_node || node_load_[qn] >= node_tau_) continue;
      r = std::min(r, node_tau_ - node_load_[qn]);
    }
    int32_t cls = 2, slot = -1;
    const int32_t* qs = slot_expert_.data() + q * S_;
    for (int32_t s = 0; s < S_; ++s)
      if (qs[s] == e) {
        cls = 0;
        slot = s;
        break;
      }
    if (cls != 0) {
      if (slots_used_[q] >= S_) continue;
      bool resident = false;
      slot = free_slot(e, q, prev, resident);
      if (resident) cls = 1;
      consider(3, q, slot, r);
    }
    consider(cls, q, slot, r);
  }
  // A reused candidate wins unless it has under half the room of the best slot-taking one.
  int32_t pick = -1;
  if (best[0] >= 0 && 2 * room[0] >= std::min(want, room[3]))
    pick = 0;
  else if (best[1] >= 0 && 2 * room[1] >= std::min(want, room[3]))
    pick = 1;
  else if (best[3] >= 0)
    pick = 3;
  else if (best[0] >= 0)
    pick = 0;
  if (pick < 0) return false;

  const int32_t q = best[pick];
  place(e, q, best_slot[pick], std::min(want, room[pick]));
  return true;
}

int32_t ForesightPlanner::free_slot(int32_t e, int32_t q, std::span<const int32_t> prev,
                                    bool& resident) const {
  // The one where e is resident from the previous plan, else an empty one, else the first.
  int32_t slot = -1, score = -1;
  for (int32_t s = 0; s < S_; ++s) {
    if (slot_expert_[q * S_ + s] >= 0) continue;
    const int32_t p = prev[q * S_ + s];
    const int32_t sc = p == e ? 2 : p < 0 ? 1 : 0;
    if (sc > score) {
      score = sc;
      slot = s;
    }
  }
  resident = score == 2;
  return slot;
}

void ForesightPlanner::place(int32_t e, int32_t q, int32_t s, int64_t a) {
  const int32_t from = e / H_;
  const int32_t id = q * S_ + s;
  if (slot_expert_[id] != e) {
    slot_expert_[id] = e;
    slot_tokens_[id] = 0;
    ++slots_used_[q];
    next_rep_[id] = first_rep_[e];
    first_rep_[e] = id;
  }
  slot_tokens_[id] += a;
  rem_[e] -= a;
  rank_load_[from] -= a;
  rank_load_[q] += a;
  node_load_[from / G_] -= a;
  node_load_[q / G_] += a;
}

bool ForesightPlanner::relay(int32_t h, std::span<const int32_t> prev) {
  int32_t e = -1;
  for (int32_t x = h * H_; x < (h + 1) * H_; ++x)
    if (rem_[x] > 0 && (e < 0 || rem_[x] > rem_[e])) e = x;
  if (e < 0) return false;
  // Best (q, slot of q holding x, p = home of x): the largest amount that can flow
  // h -> p (expert e) and p -> q (expert x, onto its existing replica), p's load unchanged.
  int64_t best_a = 0;
  int32_t best_id = -1, best_p_slot = -1;
  for (int32_t q = 0; q < W_; ++q) {
    if (rank_load_[q] >= tau_) continue;
    for (int32_t s = 0; s < S_; ++s) {
      const int32_t x = slot_expert_[q * S_ + s];
      if (x < 0 || rem_[x] == 0) continue;
      const int32_t p = x / H_;
      if (p == h) continue;
      int32_t p_slot = -1;
      for (int32_t t = 0; t < S_; ++t)
        if (slot_expert_[p * S_ + t] == e) p_slot = t;
      if (p_slot < 0) {
        if (slots_used_[p] >= S_) continue;
        bool resident = false;
        p_slot = free_slot(e, p, prev, resident);
      }
      const int64_t a = std::min(std::min(rank_load_[h] - tau_, rem_[e]),
                                 std::min(tau_ - rank_load_[q], rem_[x]));
      if (a > best_a) {
        best_a = a;
        best_id = q * S_ + s;
        best_p_slot = p_slot;
      }
    }
  }
  if (best_id < 0) return false;
  const int32_t x = slot_expert_[best_id], p = x / H_;
  place(x, best_id / S_, best_id % S_, best_a);
  place(e, p, best_p_slot, best_a);
  return true;
}

void ForesightPlanner::plan_layer(int32_t layer, const LoadMatrix& load, LayerPlacement& out) {
  // Totals, home loads, target.
  std::fill(home_load_.begin(), home_load_.end(), 0);
  std::fill(node_load_.begin(), node_load_.end(), 0);
  for (int32_t e = 0; e < E_; ++e) {
    const int64_t* row = load[e].data();
    int64_t t = 0;
    for (int32_t r = 0; r < W_; ++r) t += row[r];
    total_[e] = rem_[e] = t;
    home_load_[e / H_] += t;
    first_rep_[e] = -1;
  }
  for (int32_t r = 0; r < W_; ++r) {
    rank_load_[r] = home_load_[r];
    node_load_[r / G_] += home_load_[r];
    slots_used_[r] = 0;
  }
  std::fill(slot_expert_.begin(), slot_expert_.end(), -1);
  tau_ = placement_lower_bound(home_load_, S_);
  node_tau_ = tau_ * G_;
  const std::span<const int32_t> prev = previous_slots(layer);
  // Each successful move or relay saturates something (see planner.h): never reached.
  const int64_t max_moves = 2 * (2 * static_cast<int64_t>(W_) + E_ + 2 * N_) + 8;
  int64_t moves = 0;

  if (S_ > 0 && tau_ > 0) {
    // (1) Node level: nodes above G * tau shed to other nodes, most-loaded node first.
    if (N_ > 1) {
      std::fill(node_blocked_.begin(), node_blocked_.end(), 0);
      while (moves < max_moves) {
        int32_t n = -1;
        for (int32_t x = 0; x < N_; ++x)
          if (!node_blocked_[x] && node_load_[x] > node_tau_ &&
              (n < 0 || node_load_[x] > node_load_[n]))
            n = x;
        if (n < 0) break;
        int32_t h = n * G_;
        for (int32_t q = n * G_ + 1; q < (n + 1) * G_; ++q)
          if (rank_load_[q] > rank_load_[h]) h = q;
        const int64_t limit = std::min(node_load_[n] - node_tau_, rank_load_[h] - tau_);
        if (limit <= 0 || !shed(h, Scope::kOtherNodes, limit, prev)) {
          node_blocked_[n] = 1;
          continue;
        }
        ++moves;
      }
    }
    // (2) GPU level inside each node, then (3) across nodes.
    for (Scope scope : {Scope::kSameNode, Scope::kAnyNode}) {
      if (scope == Scope::kAnyNode && N_ == 1) break;  // (2) already covered every rank
      std::fill(blocked_.begin(), blocked_.end(), 0);
      while (moves < max_moves) {
        int32_t h = -1;
        for (int32_t q = 0; q < W_; ++q)
          if (!blocked_[q] && rank_load_[q] > tau_ && (h < 0 || rank_load_[q] > rank_load_[h]))
            h = q;
        if (h < 0) break;
        if (!shed(h, scope, rank_load_[h] - tau_, prev)) {
          blocked_[h] = 1;
          continue;
        }
        ++moves;
      }
    }
    // (4) Relays: what is still above tau goes through a rank p with a free slot, which passes
    // as much of one of its own experts to that expert's replica on a rank below tau.
    std::fill(blocked_.begin(), blocked_.end(), 0);
    while (moves < max_moves) {
      int32_t h = -1;
      for (int32_t q = 0; q < W_; ++q)
        if (!blocked_[q] && rank_load_[q] > tau_ && (h < 0 || rank_load_[q] > rank_load_[h])) h = q;
      if (h < 0) break;
      if (!relay(h, prev)) {
        blocked_[h] = 1;
        continue;
      }
      ++moves;
    }
  }

  for (int32_t r = 0; r < W_; ++r)
    std::copy(slot_expert_.begin() + r * S_, slot_expert_.begin() + (r + 1) * S_,
              out.slots[r].begin());
  split_tokens(load, out);
}

void ForesightPlanner::split_tokens(const LoadMatrix& load, LayerPlacement& out) {
  for (int32_t e = 0; e < E_; ++e) {
    const int64_t* row = load[e].data();
    auto& per_source = out.split[e];
    const int32_t home = e / H_;
    if (first_rep_[e] < 0) {  // home only
      const ExpertInstance where{home, ExpertInstance::kHomeSlot};
      for (int32_t r = 0; r < W_; ++r) {
        auto& shares = per_source[r];
        shares.clear();
        if (row[r] > 0) shares.push_back({where, row[r]});
      }
      continue;
    }
    // Instances and the tokens each must receive: the home first, then the replicas.
    int32_t n = 0;
    inst_rank_[n] = home;
    inst_slot_[n] = ExpertInstance::kHomeSlot;
    inst_cap_[n++] = rem_[e];
    for (int32_t id = first_rep_[e]; id >= 0; id = next_rep_[id]) {
      inst_rank_[n] = id / S_;
      inst_slot_[n] = id % S_;
      inst_cap_[n++] = slot_tokens_[id];
    }
    for (int32_t r = 0; r < W_; ++r) {
      src_rem_[r] = row[r];
      per_source[r].clear();
    }
    auto take = [&](int32_t i, int32_t r) {
      const int64_t x = std::min(inst_cap_[i], src_rem_[r]);
      if (x <= 0) return;
      per_source[r].push_back({ExpertInstance{inst_rank_[i], inst_slot_[i]}, x});
      inst_cap_[i] -= x;
      src_rem_[r] -= x;
    };
    // Same GPU: each instance first takes its own rank's tokens.
    for (int32_t i = 0; i < n; ++i) take(i, inst_rank_[i]);
    // Same node: then tokens of its node's ranks (a cursor per node skips drained sources).
    if (N_ > 1) {
      for (int32_t m = 0; m < N_; ++m) node_cursor_[m] = m * G_;
      for (int32_t i = 0; i < n; ++i) {
        const int32_t m = inst_rank_[i] / G_;
        int32_t& c = node_cursor_[m];
        while (inst_cap_[i] > 0 && c < (m + 1) * G_) {
          take(i, c);
          if (src_rem_[c] == 0) ++c;
        }
      }
    }
    // Any node: whatever is left, in rank order.
    int32_t c = 0;
    for (int32_t i = 0; i < n; ++i)
      while (inst_cap_[i] > 0 && c < W_) {
        take(i, c);
        if (src_rem_[c] == 0) ++c;
      }
  }
}

}  // namespace fm::planners
