// The path model: move times per path, the earliest-finish-time choice under load (a
// saturated GPU-direct path spills to the CPU-assisted one), forced policies, the slot moves
// of a plan with reuse, and bad input.
#include "transfer/path_model.h"

#include <gtest/gtest.h>

#include <functional>
#include <stdexcept>
#include <string>

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

// Round numbers: 1 GB/s H2D, 4 GB/s NVLink, 2 GB/s NIC, no latency; 2 nodes of 4 ranks.
LinkModel round_links() {
  LinkModel m;
  m.ranks_per_node = 4;
  m.h2d_bw = 1e9;
  m.intra_node_bw = 4e9;
  m.inter_node_bw = 2e9;
  m.latency_s = 0;
  return m;
}

TEST(PathModel, MoveTimeFollowsTheLinkOfThePath) {
  LinkModel m = round_links();
  m.latency_s = 1e-3;
  EXPECT_DOUBLE_EQ(m.seconds(TransferPath::direct, 0, 3, 1'000'000'000), 0.25 + 1e-3);  // NVLink
  EXPECT_DOUBLE_EQ(m.seconds(TransferPath::direct, 0, 4, 1'000'000'000), 0.5 + 1e-3);   // NIC
  EXPECT_DOUBLE_EQ(m.seconds(TransferPath::cpu, 0, 4, 1'000'000'000), 1.0 + 1e-3);      // H2D
  EXPECT_EQ(m.node_of(3), 0);
  EXPECT_EQ(m.node_of(4), 1);
}

TEST(PathModel, SaturatedDirectPathSpillsToCpu) {
  // One hot expert (home rank 0) goes to the other 3 ranks of its node, 1 GB each, twice
  // (two slots per rank). Direct: rank 0's NVLink port serves one move at a time, 0.25 s each;
  // CPU: each destination's own H2D engine, 1 s each. Earliest finish: moves 1-3 direct
  // (finish 0.25, 0.5, 0.75); then the port is busy until 0.75, so moves 4-6 finish at 1.0 on
  // either path and take the CPU one (ties go there), each on its destination's engine.
  PathLoad load(round_links(), 8);
  const int64_t GB = 1'000'000'000;
  std::vector<PathChoice> got;
  for (int32_t slot = 0; slot < 2; ++slot)
    for (int32_t dst = 1; dst <= 3; ++dst) got.push_back(load.assign({5, 0, dst, slot, GB}, 0.0));
  const TransferPath D = TransferPath::direct, C = TransferPath::cpu;
  const std::vector<TransferPath> want_path = {D, D, D, C, C, C};
  const std::vector<double> want_finish = {0.25, 0.5, 0.75, 1.0, 1.0, 1.0};
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].path, want_path[i]) << "move " << i;
    EXPECT_DOUBLE_EQ(got[i].finish, want_finish[i]) << "move " << i;
  }
  // Now rank 1's H2D engine is busy until 1.0, so its next move takes the direct port again
  // (free at 0.75, finish 1.0 rather than 2.0).
  const PathChoice next = load.assign({5, 0, 1, 2, GB}, 0.0);
  EXPECT_EQ(next.path, D);
  EXPECT_DOUBLE_EQ(next.start, 0.75);
  EXPECT_DOUBLE_EQ(next.finish, 1.0);
}

TEST(PathModel, FasterPathWinsWhenIdle) {
  const int64_t bytes = 1 << 20;
  LinkModel m = round_links();
  EXPECT_EQ(PathLoad(m, 8).choose({0, 0, 1, 0, bytes}, 0).path, TransferPath::direct);
  // Across nodes the NIC (2 GB/s) still beats H2D (1 GB/s); slow it down and H2D wins.
  EXPECT_EQ(PathLoad(m, 8).choose({0, 0, 5, 0, bytes}, 0).path, TransferPath::direct);
  m.inter_node_bw = 0.5e9;
  EXPECT_EQ(PathLoad(m, 8).choose({0, 0, 5, 0, bytes}, 0).path, TransferPath::cpu);
  // A tie goes to the CPU-assisted path (it leaves the fabric to the all-to-all).
  m.inter_node_bw = 1e9;
  EXPECT_EQ(PathLoad(m, 8).choose({0, 0, 5, 0, bytes}, 0).path, TransferPath::cpu);
  // A later release time delays the start.
  const PathChoice c = PathLoad(m, 8).choose({0, 0, 1, 0, 4'000'000'000}, 2.0);
  EXPECT_DOUBLE_EQ(c.start, 2.0);
  EXPECT_DOUBLE_EQ(c.finish, 3.0);
}

TEST(PathModel, ForcedPoliciesUseOnePath) {
  PathLoad direct(round_links(), 8), cpu(round_links(), 8);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(direct.assign({0, 0, 1, i, 1000}, 0, PathPolicy::direct_only).path,
              TransferPath::direct);
    EXPECT_EQ(cpu.assign({0, 0, 1, i, 1000}, 0, PathPolicy::cpu_only).path, TransferPath::cpu);
  }
}

TEST(PathModel, SlotMovesSkipResidentSlots) {
  // 4 experts over 2 ranks (0, 1 on rank 0; 2, 3 on rank 1), 2 slots per rank.
  const SlotTable slots = {{3, -1}, {0, 3}};
  const SlotTable resident = {{3, 2}, {1, 3}};
  int64_t reused = 0;
  const std::vector<Move> moves = slot_moves(slots, 4, 100, &resident, &reused);
  ASSERT_EQ(moves.size(), 1u);
  EXPECT_EQ(moves[0].expert, 0);
  EXPECT_EQ(moves[0].src, 0);
  EXPECT_EQ(moves[0].dst, 1);
  EXPECT_EQ(moves[0].slot, 0);
  EXPECT_EQ(moves[0].bytes, 100);
  EXPECT_EQ(reused, 2);
  EXPECT_EQ(slot_moves(slots, 4, 100).size(), 3u);  // nothing resident
}

TEST(PathModel, BadInputNamesTheProblem) {
  LinkModel m = round_links();
  expect_invalid([&] { m.validate(6); },
                 "ranks_per_node (4) must be >= 1 and divide the world "
                 "size (6)");
  m = round_links();
  m.h2d_bw = 0;
  expect_invalid([&] { PathLoad(m, 8); }, "h2d_bw must be a positive finite bandwidth (got 0)");
  m = round_links();
  m.latency_s = -1;
  expect_invalid([&] { m.validate(8); }, "latency_s must be >= 0");
  expect_invalid(
      [&] {
        PathLoad(round_links(), 8).choose({0, 0, 8, 0, 1}, 0);
      },
      "move of expert 0 from rank 0 to rank 8 is outside the 8 ranks");
  expect_invalid(
      [&] {
        slot_moves({{0, 4}, {1, 2}}, 4, 1);
      },
      "rank 0 slot 1 holds expert 4, not in [-1, 4)");
  expect_invalid([&] { slot_moves({{0}, {1, 2}}, 4, 1); }, "rank 1 has 2 slots, rank 0 has 1");
  expect_invalid([&] { slot_moves({{0}, {1}, {2}}, 4, 1); }, "4 experts over 3 ranks");
}

}  // namespace
}  // namespace fm
