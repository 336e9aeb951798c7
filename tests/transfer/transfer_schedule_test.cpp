// The path-split scheduler: on random workloads (many seeds) an independent checker confirms
// that slot memory is never exceeded, every move is delivered before its consuming layer
// starts (stalls are reported, exactly), the paths' resources never serve two moves at once,
// moves take the modeled time, and unchanged slots are reused; hand-computed cases pin the
// stall accounting, lookahead, reuse and the shared memory pool; bad input names the problem.
#include "transfer/transfer_schedule.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>

namespace fm {
namespace {

void expect_invalid(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << fragment;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// Times are sums of a few doubles computed in the same order on both sides; a relative 1e-12
// only absorbs the different association of the checker's sums.
bool near(double a, double b) {
  return std::abs(a - b) <= 1e-12 * std::max(1.0, std::abs(b));
}

// The schedule against the rules of transfer/transfer_schedule.h, recomputed independently.
void check_schedule(const TransferWorkload& w, const ScheduleOptions& o,
                    const TransferSchedule& sc) {
  const int32_t W = w.world_size, S = w.slots_per_rank;
  const auto U = static_cast<int32_t>(w.uses.size());
  const int32_t El = w.n_experts / W;
  std::vector<int32_t> first(U, -1), last(U, -1), prev(U, -1);
  for (size_t p = 0; p < w.phases.size(); ++p) {
    if (first[w.phases[p].use] < 0) first[w.phases[p].use] = static_cast<int32_t>(p);
    last[w.phases[p].use] = static_cast<int32_t>(p);
  }
  std::map<int32_t, int32_t> latest;
  for (int32_t u = 0; u < U; ++u) {
    auto it = latest.find(w.uses[u].layer);
    prev[u] = it == latest.end() ? -1 : it->second;
    latest[w.uses[u].layer] = u;
  }
  ASSERT_EQ(sc.buffers_per_rank, o.slot_memory_bytes > 0 ? o.slot_memory_bytes / w.expert_bytes
                                                         : int64_t{S} * w.n_layers);
  ASSERT_EQ(sc.phase_start.size(), w.phases.size());
  ASSERT_EQ(sc.buffer.size(), static_cast<size_t>(U));

  // Moves: one per moved slot, the right expert from its home, the modeled duration.
  std::map<std::tuple<int32_t, int32_t, int32_t>, size_t> moved;  // (use, rank, slot) -> move
  std::vector<double> ready(U, 0.0);
  int64_t bytes[2] = {0, 0}, count[2] = {0, 0};
  for (size_t i = 0; i < sc.moves.size(); ++i) {
    const ScheduledMove& m = sc.moves[i];
    ASSERT_TRUE(m.use >= 0 && m.use < U);
    const int32_t e = w.uses[m.use].slots[m.move.dst][m.move.slot];
    ASSERT_EQ(m.move.expert, e) << "move " << i;
    EXPECT_EQ(m.move.src, e / El) << "move " << i << " is not from the home rank";
    EXPECT_EQ(m.move.bytes, w.expert_bytes);
    EXPECT_TRUE(moved.emplace(std::make_tuple(m.use, m.move.dst, m.move.slot), i).second)
        << "slot filled twice, move " << i;
    EXPECT_EQ(sc.buffer[m.use][m.move.dst][m.move.slot], m.buffer);
    EXPECT_GE(m.start, m.issue) << "move " << i << " starts before it is issued";
    EXPECT_TRUE(
        near(m.finish - m.start, o.links.seconds(m.path, m.move.src, m.move.dst, m.move.bytes)))
        << "move " << i << " does not take its path's modeled time";
    if (o.policy == PathPolicy::direct_only) {
      EXPECT_EQ(m.path, TransferPath::direct);
    }
    if (o.policy == PathPolicy::cpu_only) {
      EXPECT_EQ(m.path, TransferPath::cpu);
    }
    ready[m.use] = std::max(ready[m.use], m.finish);
    bytes[m.path == TransferPath::direct] += m.move.bytes;
    ++count[m.path == TransferPath::direct];
  }
  EXPECT_EQ(sc.bytes_direct, bytes[1]);
  EXPECT_EQ(sc.bytes_cpu, bytes[0]);
  EXPECT_EQ(sc.moves_direct, count[1]);
  EXPECT_EQ(sc.moves_cpu, count[0]);

  // Timeline: a use's first phase starts once the previous phase ended and its moves are in;
  // the difference is its stall. No move arrives after its consumer starts.
  double t = 0, stall = 0, compute = 0;
  for (size_t p = 0; p < w.phases.size(); ++p) {
    const int32_t u = w.phases[p].use;
    double start = t;
    if (first[u] == static_cast<int32_t>(p)) {
      start = std::max(t, ready[u]);
      EXPECT_TRUE(near(sc.use_stall[u], start - t)) << "use " << u;
      stall += start - t;
      const int32_t issuer = u - o.lookahead;
      const double issue = issuer < 0 ? 0.0 : (issuer == u ? t : sc.phase_start[first[issuer]]);
      for (const auto& [key, i] : moved)
        if (std::get<0>(key) == u) {
          EXPECT_EQ(sc.moves[i].issue, issue) << "move " << i;
        }
    }
    ASSERT_TRUE(near(sc.phase_start[p], start)) << "phase " << p;
    if (first[u] == static_cast<int32_t>(p)) {
      EXPECT_LE(ready[u], sc.phase_start[p]) << "use " << u << " consumed before delivery";
    }
    t = start + w.phases[p].seconds;
    compute += w.phases[p].seconds;
    if (last[u] == static_cast<int32_t>(p)) {
      EXPECT_TRUE(near(sc.use_release[u], t));
    }
  }
  EXPECT_TRUE(near(sc.makespan_s, t));
  EXPECT_TRUE(near(sc.stall_s, stall));
  EXPECT_TRUE(near(sc.compute_s, compute));

  // Each resource (NVLink/NIC port per rank and direction, H2D engine per rank) serves one
  // move at a time.
  std::map<std::tuple<int, int32_t>, std::vector<std::pair<double, double>>> busy;
  for (const ScheduledMove& m : sc.moves) {
    const std::pair<double, double> iv{m.start, m.finish};
    if (m.path == TransferPath::cpu) {
      busy[{4, m.move.dst}].push_back(iv);
    } else {
      const bool same = o.links.node_of(m.move.src) == o.links.node_of(m.move.dst);
      busy[{same ? 0 : 2, m.move.src}].push_back(iv);
      busy[{same ? 1 : 3, m.move.dst}].push_back(iv);
    }
  }
  for (auto& [res, ivs] : busy) {
    std::sort(ivs.begin(), ivs.end());
    for (size_t k = 1; k < ivs.size(); ++k)
      EXPECT_GE(ivs[k].first, ivs[k - 1].second - 1e-15)
          << "resource " << std::get<0>(res) << " of rank " << std::get<1>(res) << " overlaps";
  }

  // Slot memory: every filled slot is in a buffer of its rank's memory; reused slots keep the
  // buffer of the previous use of the layer; a buffer holds one content at a time, from the
  // move that writes it until the release of the last use reading it.
  struct Hold {
    double begin, end;
    size_t content;  // the move that wrote it
  };
  std::map<std::pair<int32_t, int32_t>, std::vector<Hold>> holds;  // (rank, buffer)
  std::map<std::tuple<int32_t, int32_t, int32_t>, std::pair<size_t, double>> chain;
  int64_t reused = 0, filled = 0;
  for (int32_t u = 0; u < U; ++u)
    for (int32_t r = 0; r < W; ++r)
      for (int32_t s = 0; s < S; ++s) {
        const int32_t e = w.uses[u].slots[r][s], b = sc.buffer[u][r][s];
        if (e < 0) {
          EXPECT_EQ(b, -1);
          continue;
        }
        ++filled;
        ASSERT_TRUE(b >= 0 && b < sc.buffers_per_rank) << "buffer " << b << " outside memory";
        if (o.slot_memory_bytes == 0) {
          EXPECT_EQ(b, w.uses[u].layer * S + s);
        }
        auto it = moved.find({u, r, s});
        std::pair<size_t, double> content;  // (writing move, its start)
        if (it != moved.end()) {
          content = {it->second, sc.moves[it->second].start};
        } else {
          ++reused;
          ASSERT_GE(prev[u], 0) << "use " << u << " rank " << r << " slot " << s << " unfilled";
          ASSERT_EQ(w.uses[prev[u]].slots[r][s], e) << "reused a changed slot";
          ASSERT_EQ(sc.buffer[prev[u]][r][s], b) << "reused slot changed buffer";
          content = chain.at({prev[u], r, s});
        }
        chain[{u, r, s}] = content;
        holds[{r, b}].push_back({content.second, sc.use_release[u], content.first});
      }
  EXPECT_EQ(reused, sc.slots_reused);
  EXPECT_EQ(filled, static_cast<int64_t>(sc.moves.size()) + reused);
  for (const auto& [key, hs] : holds)
    for (size_t i = 0; i < hs.size(); ++i)
      for (size_t j = i + 1; j < hs.size(); ++j)
        if (hs[i].content != hs[j].content) {
          EXPECT_FALSE(hs[i].begin < hs[j].end && hs[j].begin < hs[i].end)
              << "rank " << key.first << " buffer " << key.second << " holds two experts at once";
        }
}

struct Case {
  TransferWorkload workload;
  ScheduleOptions options;
};

Case random_case(uint32_t seed) {
  std::mt19937 gen(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); };
  auto log_uniform = [&](double lo, double hi) {
    return std::exp(std::uniform_real_distribution<double>(std::log(lo), std::log(hi))(gen));
  };
  const int32_t W = 1 << pick(0, 3), E = W * (1 << pick(0, 2)), L = pick(1, 4), S = pick(0, 3),
                M = pick(1, 4);
  const bool backward = pick(0, 1) == 1;
  std::vector<std::vector<SlotTable>> plans(M, std::vector<SlotTable>(L));
  for (int32_t m = 0; m < M; ++m)
    for (int32_t l = 0; l < L; ++l) {
      SlotTable t(W, std::vector<int32_t>(S));
      for (int32_t r = 0; r < W; ++r)
        for (int32_t s = 0; s < S; ++s)
          t[r][s] = m > 0 && pick(0, 2) > 0 ? plans[m - 1][l][r][s] : pick(-1, E - 1);
      plans[m][l] = t;
    }
  const double fwd = log_uniform(1e-4, 1e-2);
  Case c{layered_workload(E, static_cast<int64_t>(log_uniform(1e5, 1e8)), plans, fwd,
                          backward ? 2 * fwd : 0.0),
         {}};
  LinkModel& links = c.options.links;
  links.ranks_per_node = 1 << pick(0, __builtin_ctz(static_cast<unsigned>(W)));
  links.intra_node_bw = log_uniform(1e9, 1e12);
  links.inter_node_bw = log_uniform(1e9, 1e11);
  links.h2d_bw = log_uniform(1e9, 1e11);
  links.latency_s = pick(0, 1) ? 0.0 : log_uniform(1e-6, 1e-4);
  c.options.policy = static_cast<PathPolicy>(pick(0, 2));
  const int32_t lookaheads[] = {0, 1, 2, L, 1000};
  c.options.lookahead = lookaheads[pick(0, 4)];
  if (pick(0, 1)) {  // a shared pool that fits every use live at once, with random headroom
    const int64_t need = int64_t{S} * (backward ? L : 1), extra = pick(0, S * L);
    c.options.slot_memory_bytes =
        (need + extra) * c.workload.expert_bytes + pick(0, 1000) % c.workload.expert_bytes;
    if (c.options.slot_memory_bytes == 0) c.options.slot_memory_bytes = 1;  // S = 0: still a pool
  }
  return c;
}

TEST(TransferSchedule, RandomWorkloadsKeepMemoryAndDeadlines) {
  int64_t moves = 0, reused = 0, stalled = 0, both_paths = 0;
  for (uint32_t seed = 0; seed < 400; ++seed) {
    const Case c = random_case(seed);
    SCOPED_TRACE(::testing::Message()
                 << "seed " << seed << ": W " << c.workload.world_size << ", E "
                 << c.workload.n_experts << ", L " << c.workload.n_layers << ", S "
                 << c.workload.slots_per_rank << ", policy " << policy_name(c.options.policy)
                 << ", lookahead " << c.options.lookahead << ", memory "
                 << c.options.slot_memory_bytes);
    const TransferSchedule sc = schedule_transfers(c.workload, c.options);
    check_schedule(c.workload, c.options, sc);
    if (::testing::Test::HasFailure()) return;
    moves += static_cast<int64_t>(sc.moves.size());
    reused += sc.slots_reused;
    stalled += sc.stall_s > 0;
    both_paths += sc.moves_direct > 0 && sc.moves_cpu > 0;
  }
  // The generator covers what the checker checks.
  EXPECT_GT(moves, 1000);
  EXPECT_GT(reused, 100);
  EXPECT_GT(stalled, 10);
  EXPECT_GT(both_paths, 10);
}

// W = 2 (one node), E = 2: expert 1 lives on rank 1. 1 GB experts; NVLink 4 GB/s, H2D 1 GB/s.
ScheduleOptions round_options() {
  ScheduleOptions o;
  o.links.ranks_per_node = 2;
  o.links.intra_node_bw = 4e9;
  o.links.h2d_bw = 1e9;
  o.links.latency_s = 0;
  return o;
}
constexpr int64_t kGB = 1'000'000'000;

TEST(TransferSchedule, StallIsReportedNotHidden) {
  // One layer, one micro-step: the move (0.25 s direct) cannot hide behind anything.
  const TransferWorkload w = layered_workload(2, kGB, {{{{1}, {-1}}}}, 0.1, 0.0);
  const TransferSchedule sc = schedule_transfers(w, round_options());
  check_schedule(w, round_options(), sc);
  ASSERT_EQ(sc.moves.size(), 1u);
  EXPECT_EQ(sc.moves[0].path, TransferPath::direct);
  EXPECT_DOUBLE_EQ(sc.use_stall[0], 0.25);
  EXPECT_DOUBLE_EQ(sc.phase_start[0], 0.25);
  EXPECT_DOUBLE_EQ(sc.makespan_s, 0.35);
  EXPECT_EQ(sc.bytes_direct, kGB);
  EXPECT_EQ(sc.bytes_cpu, 0);
}

TEST(TransferSchedule, LookaheadHidesMovesBehindCompute) {
  // 4 layers, each moving expert 1 into rank 0's slot (0.25 s on the direct path), forwards of
  // 0.5 s. One layer ahead, only layer 0 waits; without prefetch every layer waits.
  std::vector<std::vector<SlotTable>> plans(1, std::vector<SlotTable>(4, {{1}, {-1}}));
  const TransferWorkload w = layered_workload(2, kGB, plans, 0.5, 0.0);
  ScheduleOptions o = round_options();
  o.policy = PathPolicy::direct_only;
  for (int32_t lookahead : {0, 1, 4}) {
    o.lookahead = lookahead;
    const TransferSchedule sc = schedule_transfers(w, o);
    check_schedule(w, o, sc);
    EXPECT_DOUBLE_EQ(sc.stall_s, lookahead == 0 ? 1.0 : 0.25) << "lookahead " << lookahead;
    EXPECT_DOUBLE_EQ(sc.makespan_s, 2.0 + sc.stall_s);
  }
}

TEST(TransferSchedule, DirectSaturatedMovesGoToCpu) {
  // W = 4 (one node), E = 4: expert 0 (rank 0) into both slots of ranks 1-3, one layer.
  // NVLink 4 GB/s through rank 0's one port (0.25 s a move), H2D 1 GB/s per rank (1 s). In
  // (rank, slot) order: the port takes the first 3 (done at 0.75); the next two tie at 1.0 and
  // take the CPU path on ranks 2 and 3; the last (rank 3 again, its engine busy) the port.
  ScheduleOptions o = round_options();
  o.links.ranks_per_node = 4;
  const TransferWorkload w =
      layered_workload(4, kGB, {{{{-1, -1}, {0, 0}, {0, 0}, {0, 0}}}}, 0.1, 0.0);
  const TransferSchedule sc = schedule_transfers(w, o);
  check_schedule(w, o, sc);
  ASSERT_EQ(sc.moves.size(), 6u);
  const TransferPath D = TransferPath::direct, C = TransferPath::cpu;
  const TransferPath want[] = {D, D, D, C, C, D};
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(sc.moves[i].path, want[i]) << "move " << i;
  EXPECT_EQ(sc.bytes_direct, 4 * kGB);
  EXPECT_EQ(sc.bytes_cpu, 2 * kGB);
  EXPECT_DOUBLE_EQ(sc.use_stall[0], 1.0);  // both paths end together
  o.policy = PathPolicy::direct_only;      // the port alone: 6 x 0.25 s
  EXPECT_DOUBLE_EQ(schedule_transfers(w, o).use_stall[0], 1.5);
  o.policy = PathPolicy::cpu_only;  // each rank's engine: 2 x 1 s
  EXPECT_DOUBLE_EQ(schedule_transfers(w, o).use_stall[0], 2.0);
}

TEST(TransferSchedule, UnchangedSlotsAreReused) {
  const SlotTable t = {{1, -1}, {0, 1}};
  SlotTable changed = t;
  changed[1][0] = 1;  // slot 0 of rank 1: expert 0 -> 1 (a move); slot 1 still expert 1
  const TransferWorkload w = layered_workload(2, kGB, {{t, t}, {t, changed}}, 0.5, 1.0);
  const TransferSchedule sc = schedule_transfers(w, round_options());
  check_schedule(w, round_options(), sc);
  EXPECT_EQ(sc.moves.size(), 6u + 1u);
  EXPECT_EQ(sc.slots_reused, 5);
}

TEST(TransferSchedule, SharedPoolLoadsTheNextMicroStepEarly) {
  // Forward (0.5 s) and backward (1 s), 2 layers, 1 slot, E = 4: rank 0's slots take experts
  // 2 then 3 (home rank 1; 0.25 s a move). With S slots per layer, layer 0's next expert can
  // only be loaded once its backward has released the slot, right before its next forward:
  // a stall. A shared pool with a spare buffer loads it during the previous micro-step.
  const SlotTable a = {{2}, {-1}}, b = {{3}, {-1}};
  const TransferWorkload w = layered_workload(4, kGB, {{a, a}, {b, b}}, 0.5, 1.0);
  ScheduleOptions o = round_options();
  o.lookahead = 2;  // one micro-step ahead
  o.policy = PathPolicy::direct_only;
  const TransferSchedule per_layer = schedule_transfers(w, o);
  check_schedule(w, o, per_layer);
  // Timeline: F0 0.25-0.75, F1 0.75-1.25, B1 -2.25, B0 -3.25; layer 0's slot is free at 3.25.
  EXPECT_DOUBLE_EQ(per_layer.use_stall[2], 0.25);
  o.slot_memory_bytes = 3 * kGB;
  const TransferSchedule pooled = schedule_transfers(w, o);
  check_schedule(w, o, pooled);
  EXPECT_EQ(pooled.use_stall[2], 0.0);
  EXPECT_DOUBLE_EQ(pooled.moves[2].start, 0.5);  // as soon as the link is free
  EXPECT_LT(pooled.stall_s, per_layer.stall_s);
  // Two buffers: the move waits for the buffer layer 1's backward frees at 2.25, still in time.
  o.slot_memory_bytes = 2 * kGB + 1;
  const TransferSchedule tight = schedule_transfers(w, o);
  check_schedule(w, o, tight);
  EXPECT_EQ(tight.buffers_per_rank, 2);
  EXPECT_DOUBLE_EQ(tight.moves[2].start, 2.25);
  EXPECT_EQ(tight.use_stall[2], 0.0);
}

TEST(TransferSchedule, BadInputNamesTheProblem) {
  const SlotTable t = {{1}, {-1}};
  const TransferWorkload good = layered_workload(2, kGB, {{t, t}}, 0.5, 1.0);
  const ScheduleOptions o = round_options();
  {
    TransferWorkload w = good;
    w.uses[1].slots[1].push_back(0);
    expect_invalid([&] { schedule_transfers(w, o); },
                   "use 1 (micro-step 0, layer 1): rank 1 has 2 slots, expected 1");
  }
  {
    TransferWorkload w = good;
    w.uses[0].slots.pop_back();
    expect_invalid([&] { schedule_transfers(w, o); }, "has slot tables for 1 ranks, expected 2");
  }
  {
    TransferWorkload w = good;
    w.uses[1].layer = 2;
    expect_invalid([&] { schedule_transfers(w, o); },
                   "use 1 (micro-step 0) is for layer 2, not in [0, 2)");
  }
  {
    TransferWorkload w = good;
    w.uses[0].slots[0][0] = 2;
    expect_invalid([&] { schedule_transfers(w, o); }, "rank 0 slot 0 holds expert 2, not in");
  }
  {
    TransferWorkload w = good;
    w.uses[1].layer = 0;  // forward of layer 0 twice while the first is live
    expect_invalid([&] { schedule_transfers(w, o); }, "uses 0 and 1 of layer 0 are live at once");
  }
  {
    TransferWorkload w = good;
    std::swap(w.phases[0], w.phases[1]);
    expect_invalid([&] { schedule_transfers(w, o); }, "uses must be ordered by their first phase");
  }
  {
    TransferWorkload w = good;
    w.phases.push_back({5, 1.0});
    expect_invalid([&] { schedule_transfers(w, o); }, "phase 4 is for use 5, not in [0, 2)");
  }
  {
    TransferWorkload w = good;
    w.uses.push_back({1, 0, t});
    expect_invalid([&] { schedule_transfers(w, o); },
                   "use 2 (micro-step 1, layer 0) has no compute phase");
  }
  {
    ScheduleOptions p = o;
    p.slot_memory_bytes = kGB;  // one buffer; both layers' slots are live together
    const TransferWorkload w = layered_workload(2, kGB, {{t, t}}, 0.5, 1.0);
    expect_invalid([&] { schedule_transfers(w, p); },
                   "slot memory: rank 0 needs a buffer for slot 0 of use 1");
  }
  {
    ScheduleOptions p = o;
    p.lookahead = -1;
    expect_invalid([&] { schedule_transfers(good, p); }, "lookahead must be >= 0 (got -1)");
  }
  {
    ScheduleOptions p = o;
    p.links.ranks_per_node = 3;
    expect_invalid([&] { schedule_transfers(good, p); }, "ranks_per_node (3)");
  }
}

}  // namespace
}  // namespace fm
