// The in-process communicator: the conformance suite (support/comm_conformance.h) at world
// sizes 1, 2, 3, 4 and 8, and on device buffers at 1, 2, 4 and 8 (GPU only); bit-identical sums
// whatever the thread timing; and failures -- a missing rank times out on every peer, a throwing
// rank is reported and releases its peers, disagreeing calls and bad arguments fail on every rank
// -- after which the group stays broken.
#include "engine/comm.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "support/comm_conformance.h"
#include "support/device_staged_comm.h"

namespace fm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// Conformance runs never wait for this: it only bounds a broken run on 2 shared cores.
constexpr auto kConformanceTimeout = 30s;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Runs fn(rank, comm) on a thread per rank of a fresh group (without run_inprocess's abort on
// failure) and returns each rank's error message, "" for a rank that returned.
std::vector<std::string> rank_errors(int world_size, std::chrono::milliseconds timeout,
                                     const std::function<void(int, Communicator&)>& fn) {
  auto comms = make_inprocess_group(world_size, timeout);
  std::vector<std::string> errors(world_size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world_size; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        fn(rank, *comms[rank]);
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

// The message run_inprocess rethrows ("" when it returned).
std::string run_inprocess_error(int world_size, std::chrono::milliseconds timeout,
                                const std::function<void(int, Communicator&)>& fn) {
  try {
    run_inprocess(world_size, timeout, fn);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// ---- Conformance ----

// W ranks on host buffers, or on device buffers (support/device_staged_comm.h: virtual ranks
// sharing one GPU; skipped without one).
struct ConformanceCase {
  int world = 1;
  bool device = false;
};

class InProcessConformance : public ::testing::TestWithParam<ConformanceCase> {
 protected:
  void run(const std::function<void(Communicator&)>& check) {
    const ConformanceCase c = GetParam();
    if (c.device && !cuda_available())
      GTEST_SKIP() << "no CUDA GPU visible: the device path of the in-process comm is not run";
    run_inprocess(c.world, kConformanceTimeout, [&](int rank, Communicator& comm) {
      ASSERT_EQ(comm.rank(), rank);
      ASSERT_EQ(comm.size(), c.world);
      if (!c.device) return check(comm);
      testing::DeviceStaged staged(comm);
      check(staged);
    });
  }
};

TEST_P(InProcessConformance, AllReduce) {
  run([](Communicator& comm) { testing::check_all_reduce(comm); });
}
TEST_P(InProcessConformance, AllGather) {
  run(testing::check_all_gather);
}
TEST_P(InProcessConformance, ReduceScatter) {
  run(testing::check_reduce_scatter);
}
TEST_P(InProcessConformance, BroadcastFromEveryRoot) {
  run(testing::check_broadcast);
}
TEST_P(InProcessConformance, AllToAllUnevenCounts) {
  run(testing::check_all_to_all);
}
TEST_P(InProcessConformance, SendRecvRingAndTags) {
  run(testing::check_send_recv);
}
TEST_P(InProcessConformance, Barrier) {
  run(testing::check_barrier);
}
TEST_P(InProcessConformance, MixedSequence) {
  run([](Communicator& comm) { testing::check_mixed_sequence(comm); });
}

INSTANTIATE_TEST_SUITE_P(
    WorldSizes, InProcessConformance,
    ::testing::Values(ConformanceCase{1}, ConformanceCase{2}, ConformanceCase{3},
                      ConformanceCase{4}, ConformanceCase{8}, ConformanceCase{1, true},
                      ConformanceCase{2, true}, ConformanceCase{4, true}, ConformanceCase{8, true}),
    [](const auto& info) {
      return fmt::format("W{}{}", info.param.world, info.param.device ? "_device" : "");
    });

// A check that cannot fail is no check: a wrong result must throw, naming element and rank.
TEST(CommConformance, WrongResultThrowsNamingTheElement) {
  auto comms = make_inprocess_group(1, 1s);
  try {
    testing::expect_values<float>("demo", *comms[0], {1.f, 2.f, 3.f}, {1.f, 2.5f, 3.f});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("demo [inprocess, rank 0 of 1]: element 1 is 2, expected 2.5"));
  }
}

// ---- Determinism ----

// f32 sums of normal values depend on the order of the additions; the group adds in rank order
// whatever order the threads arrive in (each rank sleeps a random 0-2 ms first).
TEST(InProcessComm, F32SumsAreBitIdenticalAcrossRepeats) {
  constexpr int kWorld = 8, kCount = 4099, kRepeats = 20;
  std::vector<std::vector<float>> inputs(kWorld, std::vector<float>(kCount));
  for (int r = 0; r < kWorld; ++r) Rng(7, r).normal(inputs[r].data(), kCount);
  std::vector<float> in_rank_order = inputs[0], in_reverse_order = inputs[kWorld - 1];
  for (int r = 1; r < kWorld; ++r) {
    for (int i = 0; i < kCount; ++i) {
      in_rank_order[i] += inputs[r][i];
      in_reverse_order[i] += inputs[kWorld - 1 - r][i];
    }
  }
  // Otherwise this test could not tell the orders apart.
  ASSERT_NE(std::memcmp(in_rank_order.data(), in_reverse_order.data(), kCount * sizeof(float)), 0);

  for (int repeat = 0; repeat < kRepeats; ++repeat) {
    std::vector<std::vector<float>> all_reduced(kWorld), scattered(kWorld);
    run_inprocess(kWorld, kConformanceTimeout, [&](int rank, Communicator& comm) {
      Rng jitter(repeat, rank);
      std::this_thread::sleep_for(std::chrono::microseconds(jitter.next_below(2000)));
      all_reduced[rank] = inputs[rank];
      comm.all_reduce(all_reduced[rank].data(), kCount, DType::f32, ReduceOp::sum);
      std::vector<float> send(static_cast<size_t>(kCount) * kWorld);
      for (int p = 0; p < kWorld; ++p)
        std::memcpy(send.data() + p * kCount, inputs[rank].data(), kCount * sizeof(float));
      scattered[rank].resize(kCount);
      comm.reduce_scatter(send.data(), scattered[rank].data(), kCount, DType::f32, ReduceOp::sum);
    });
    for (int r = 0; r < kWorld; ++r) {
      ASSERT_EQ(std::memcmp(all_reduced[r].data(), in_rank_order.data(), kCount * sizeof(float)), 0)
          << "all_reduce, repeat " << repeat << ", rank " << r;
      ASSERT_EQ(std::memcmp(scattered[r].data(), in_rank_order.data(), kCount * sizeof(float)), 0)
          << "reduce_scatter, repeat " << repeat << ", rank " << r;
    }
  }
}

// ---- Failures ----

TEST(InProcessComm, MissingRankTimesOutOnEveryPeer) {
  const auto start = Clock::now();
  const auto errors = rank_errors(4, 300ms, [](int rank, Communicator& comm) {
    if (rank == 3) return;  // never calls
    double x = rank;
    comm.all_reduce(&x, 1, DType::f64, ReduceOp::sum);
  });
  const double elapsed = seconds_since(start);
  EXPECT_GE(elapsed, 0.3);
  EXPECT_LT(elapsed, 3.0);  // timeout + a generous margin for 2 shared cores
  EXPECT_EQ(errors[3], "");
  int timed_out = 0;
  for (int r = 0; r < 3; ++r) {
    // The rank that timed out first reports it; the others may see its abort, which quotes it.
    EXPECT_THAT(errors[r], HasSubstr("inprocess all_reduce: rank ")) << r;
    EXPECT_THAT(errors[r], HasSubstr(" ms for rank(s) 3 (timeout 300 ms)")) << r;
    if (errors[r].starts_with(fmt::format("inprocess all_reduce: rank {} waited ", r))) ++timed_out;
  }
  EXPECT_GE(timed_out, 1);
}

TEST(InProcessComm, RecvWithoutSendTimesOut) {
  const auto start = Clock::now();
  const auto errors = rank_errors(2, 200ms, [](int rank, Communicator& comm) {
    float x[4];
    if (rank == 1) comm.recv(x, 4, DType::f32, 0, 3);
  });
  EXPECT_LT(seconds_since(start), 3.0);
  EXPECT_THAT(errors[1], StartsWith("inprocess recv from rank 0 (tag 3): rank 1 waited "));
  EXPECT_THAT(errors[1], HasSubstr("for rank(s) 0 (timeout 200 ms)"));
}

TEST(RunInprocess, ReportsTheTimeoutOfAMissingRank) {
  const std::string error = run_inprocess_error(3, 300ms, [](int rank, Communicator& comm) {
    if (rank != 2) comm.barrier();
  });
  EXPECT_THAT(error, StartsWith("inprocess barrier: rank "));
  EXPECT_THAT(error, HasSubstr("for rank(s) 2 (timeout 300 ms)"));
}

// Rank 3 throws its own error after a first collective; ranks 0-2 wait in the next one with a
// 60 s timeout. They must be released at once, and run_inprocess must rethrow rank 3's error
// itself, not the "group aborted" errors of the lower ranks.
TEST(RunInprocess, ReportsTheRankThatThrewAndReleasesItsPeers) {
  std::vector<std::string> peer_errors(4);
  const auto start = Clock::now();
  try {
    run_inprocess(4, 60s, [&](int rank, Communicator& comm) {
      int32_t x = rank;
      comm.all_reduce(&x, 1, DType::i32, ReduceOp::sum);
      if (rank == 3) throw std::runtime_error("rank 3 ran out of tokens");
      try {
        comm.all_reduce(&x, 1, DType::i32, ReduceOp::sum);
      } catch (const Error& e) {
        peer_errors[rank] = e.what();
        throw;
      }
    });
    FAIL() << "run_inprocess returned";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(dynamic_cast<const Error*>(&e), nullptr) << "not the root cause: " << e.what();
    EXPECT_STREQ(e.what(), "rank 3 ran out of tokens");
  }
  EXPECT_LT(seconds_since(start), 5.0);
  for (int r = 0; r < 3; ++r)
    EXPECT_EQ(peer_errors[r], "group aborted: rank 3 failed: rank 3 ran out of tokens") << r;
}

TEST(InProcessComm, MismatchedCollectivesFailOnEveryRank) {
  const auto start = Clock::now();
  const auto errors = rank_errors(3, 10s, [](int rank, Communicator& comm) {
    float x[2] = {1, 2};
    if (rank == 2) {
      comm.all_reduce(x, 2, DType::f32, ReduceOp::sum);
    } else {
      comm.broadcast(x, 2, DType::f32, 0);
    }
  });
  EXPECT_LT(seconds_since(start), 5.0);  // no waiting for the timeout
  for (int r = 0; r < 3; ++r)
    EXPECT_EQ(errors[r],
              "inprocess: ranks called different collectives as collective #0 of the group: "
              "rank 0 called broadcast, rank 2 called all_reduce")
        << r;
}

// Rank 1 passes one argument differently from ranks 0 and 2; every rank reports the same error.
TEST(InProcessComm, DisagreeingArgumentsFailOnEveryRank) {
  struct Case {
    const char* name;
    std::function<void(Communicator&, bool odd_one)> call;
    const char* error;
  };
  const std::vector<Case> cases = {
      {"count",
       [](Communicator& c, bool odd) {
         std::vector<float> x(5);
         c.all_reduce(x.data(), odd ? 5 : 4, DType::f32, ReduceOp::sum);
       },
       "inprocess all_reduce (collective #0): rank 0 passes count 4, rank 1 passes count 5"},
      {"dtype",
       [](Communicator& c, bool odd) {
         std::vector<double> x(4), y(12);
         c.all_gather(x.data(), y.data(), 4, odd ? DType::i64 : DType::f64);
       },
       "inprocess all_gather (collective #0): rank 0 passes dtype f64, rank 1 passes i64"},
      {"op",
       [](Communicator& c, bool odd) {
         std::vector<int64_t> x(6), y(2);
         c.reduce_scatter(x.data(), y.data(), 2, DType::i64, odd ? ReduceOp::max : ReduceOp::sum);
       },
       "inprocess reduce_scatter (collective #0): rank 0 reduces with sum, rank 1 with max"},
      {"root",
       [](Communicator& c, bool odd) {
         std::vector<int32_t> x(3);
         c.broadcast(x.data(), 3, DType::i32, odd ? 2 : 0);
       },
       "inprocess broadcast (collective #0): rank 0 broadcasts from root 0, rank 1 from root 2"},
  };
  for (const Case& c : cases) {
    const auto errors =
        rank_errors(3, 10s, [&](int rank, Communicator& comm) { c.call(comm, rank == 1); });
    for (int r = 0; r < 3; ++r) EXPECT_EQ(errors[r], c.error) << c.name << ", rank " << r;
  }
}

// Rank 2 sends rank 1 one element where rank 1 expects two (all other pairs agree on two).
TEST(InProcessComm, AllToAllCountMismatchFailsOnEveryRank) {
  const auto start = Clock::now();
  const auto errors = rank_errors(3, 10s, [](int rank, Communicator& comm) {
    std::vector<int64_t> send_counts = {2, 2, 2}, recv_counts = {2, 2, 2};
    if (rank == 2) send_counts[1] = 1;
    std::vector<float> send(6), recv(6);
    comm.all_to_all(send.data(), send_counts, recv.data(), recv_counts, DType::f32);
  });
  EXPECT_LT(seconds_since(start), 5.0);
  for (int r = 0; r < 3; ++r)
    EXPECT_EQ(errors[r],
              "inprocess all_to_all (collective #0): rank 1 expects 2 elements from rank 2, but "
              "rank 2 sends 1 to rank 1 (recv_counts[2] of rank 1 must equal send_counts[1] of "
              "rank 2)")
        << r;
}

TEST(InProcessComm, SendRecvCountMismatchIsAnError) {
  const auto errors = rank_errors(2, 10s, [](int rank, Communicator& comm) {
    float x[4] = {};
    if (rank == 0) comm.send(x, 3, DType::f32, 1, 7);
    if (rank == 1) comm.recv(x, 4, DType::f32, 0, 7);
  });
  EXPECT_EQ(errors[0], "");  // the send had completed
  EXPECT_EQ(errors[1],
            "inprocess recv: rank 1 expects 4 f32 elements from rank 0 (tag 7), but rank 0 sent 3 "
            "f32");
}

// Rank 0 passes a bad argument; it gets the error, and rank 1, waiting in the matching call,
// is released at once with the group's abort naming it.
TEST(InProcessComm, BadArgumentsFailAndAbortTheGroup) {
  struct Case {
    std::function<void(Communicator&, bool bad)> call;
    const char* error;
  };
  const std::vector<Case> cases = {
      {[](Communicator& c, bool bad) {
         float x = 0;
         c.broadcast(&x, 1, DType::f32, bad ? 5 : 0);
       },
       "inprocess broadcast on rank 0: root 5 is not a rank of a group of 2"},
      {[](Communicator& c, bool bad) {
         uint16_t x[2] = {};
         c.all_reduce(x, bad ? 2 : 1, bad ? DType::bf16 : DType::i32, ReduceOp::sum);
       },
       "inprocess all_reduce on rank 0: dtype bf16 cannot be reduced (f32, f64, i32 or i64 can)"},
      {[](Communicator& c, bool bad) {
         float x[2] = {}, y[4];
         c.all_gather(x, y, bad ? -1 : 2, DType::f32);
       },
       "inprocess all_gather on rank 0: count -1 is negative"},
      {[](Communicator& c, bool bad) {
         float y[4];
         c.all_gather(nullptr, y, bad ? 2 : 0, DType::f32);
       },
       "inprocess all_gather on rank 0: send is null for count 2"},
      {[](Communicator& c, bool bad) {
         float x[4] = {}, y[4];
         const std::vector<int64_t> counts = {1, 1}, short_counts = {1};
         c.all_to_all(x, bad ? short_counts : counts, y, counts, DType::f32);
       },
       "inprocess all_to_all on rank 0: send_counts has 1 entries, expected one per rank (2)"},
      {[](Communicator& c, bool bad) {
         float x = 0;
         if (bad) c.send(&x, 1, DType::f32, 0, 1);
         c.recv(&x, 1, DType::f32, 1 - c.rank(), 1);
       },
       "inprocess send on rank 0: peer 0 is this rank itself"},
      {[](Communicator& c, bool bad) {
         float x = 0;
         c.recv(&x, 1, DType::f32, bad ? 2 : 0, 1);
       },
       "inprocess recv on rank 0: peer 2 is not a rank of a group of 2"},
  };
  for (const Case& c : cases) {
    const auto start = Clock::now();
    const auto errors =
        rank_errors(2, 10s, [&](int rank, Communicator& comm) { c.call(comm, rank == 0); });
    EXPECT_LT(seconds_since(start), 5.0) << c.error;
    EXPECT_EQ(errors[0], c.error);
    EXPECT_EQ(errors[1], fmt::format("group aborted: {}", c.error));
  }
}

// After an error every call of every rank throws at once, naming the first failure.
TEST(InProcessComm, GroupStaysBrokenAfterAnError) {
  std::vector<std::string> later(2);
  std::vector<double> later_seconds(2);
  rank_errors(2, 10s, [&](int rank, Communicator& comm) {
    float x = 1;
    try {
      if (rank == 0) comm.barrier();
      if (rank == 1) comm.all_reduce(&x, 1, DType::f32, ReduceOp::sum);
    } catch (const Error&) {
    }
    const auto start = Clock::now();
    int calls = 0;
    const auto expect_broken = [&](const std::function<void()>& call) {
      try {
        call();
      } catch (const Error& e) {
        ++calls;
        if (later[rank].empty()) later[rank] = e.what();
        EXPECT_EQ(later[rank], e.what());
      }
    };
    expect_broken([&] { comm.barrier(); });
    expect_broken([&] { comm.all_reduce(&x, 1, DType::f32, ReduceOp::sum); });
    expect_broken([&] { comm.broadcast(&x, 1, DType::f32, 0); });
    expect_broken([&] { comm.send(&x, 1, DType::f32, 1 - rank, 0); });
    expect_broken([&] { comm.recv(&x, 1, DType::f32, 1 - rank, 0); });
    EXPECT_EQ(calls, 5) << "rank " << rank;
    later_seconds[rank] = seconds_since(start);
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(later[r],
              "group aborted: inprocess: ranks called different collectives as collective #0 of "
              "the group: rank 0 called barrier, rank 1 called all_reduce");
    EXPECT_LT(later_seconds[r], 1.0);  // at once, not after the 10 s timeout
  }
}

TEST(InProcessComm, AbortGroupReleasesWaitingRanks) {
  auto comms = make_inprocess_group(3, 60s);
  std::vector<std::string> errors(2);
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        comms[rank]->barrier();  // rank 2 never comes
      } catch (const Error& e) {
        errors[rank] = e.what();
      }
    });
  }
  std::this_thread::sleep_for(50ms);
  abort_group(*comms[2], "operator stop");
  for (auto& t : threads) t.join();
  EXPECT_LT(seconds_since(start), 5.0);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(errors[r], "group aborted: operator stop");
}

// ---- Semantics beyond the conformance suite ----

// Each rank arrives later than the previous one; none leaves the barrier before all arrived.
TEST(InProcessComm, BarrierHoldsEveryRankUntilAllArrive) {
  constexpr int kWorld = 4, kRounds = 3;
  std::atomic<int> arrived[kRounds] = {};
  std::vector<std::vector<int>> seen(kWorld, std::vector<int>(kRounds));
  run_inprocess(kWorld, kConformanceTimeout, [&](int rank, Communicator& comm) {
    for (int round = 0; round < kRounds; ++round) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10 * rank));
      arrived[round].fetch_add(1);
      comm.barrier();
      seen[rank][round] = arrived[round].load();
    }
  });
  for (int r = 0; r < kWorld; ++r)
    for (int round = 0; round < kRounds; ++round) EXPECT_EQ(seen[r][round], kWorld) << r;
}

// Sends are buffered: a recv picks its (peer, tag) mailbox whatever was sent before it, and
// messages with one tag arrive in the order they were sent.
TEST(InProcessComm, RecvMatchesByTagInSendOrder) {
  std::vector<int32_t> got;
  run_inprocess(2, kConformanceTimeout, [&](int rank, Communicator& comm) {
    if (rank == 0) {
      for (int32_t v : {10, 20, 11}) comm.send(&v, 1, DType::i32, 1, v < 20 ? 1 : 2);
    } else {
      int32_t v;
      for (int tag : {2, 1, 1}) {
        comm.recv(&v, 1, DType::i32, 0, tag);
        got.push_back(v);
      }
    }
  });
  EXPECT_EQ(got, (std::vector<int32_t>{20, 10, 11}));
}

TEST(InProcessComm, MakeGroupNumbersRanksAndRejectsBadArguments) {
  auto comms = make_inprocess_group(3, 250ms);
  ASSERT_EQ(comms.size(), 3u);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(comms[r]->rank(), r);
    EXPECT_EQ(comms[r]->size(), 3);
    EXPECT_STREQ(comms[r]->backend_name(), "inprocess");
    EXPECT_EQ(comms[r]->timeout(), 250ms);
  }
  EXPECT_THROW(make_inprocess_group(0, 1s), Error);
  EXPECT_THROW(make_inprocess_group(2, 0ms), Error);
}

// abort_group() only marks in-process groups; another implementation is left alone.
TEST(InProcessComm, AbortGroupIgnoresOtherCommunicators) {
  struct Solo final : Communicator {
    Solo() : Communicator(1s) {}
    int rank() const override { return 0; }
    int size() const override { return 1; }
    const char* backend_name() const override { return "solo"; }
    void all_reduce(void*, int64_t, DType, ReduceOp) override {}
    void all_gather(const void*, void*, int64_t, DType) override {}
    void reduce_scatter(const void*, void*, int64_t, DType, ReduceOp) override {}
    void broadcast(void*, int64_t, DType, int) override {}
    void all_to_all(const void*, const std::vector<int64_t>&, void*, const std::vector<int64_t>&,
                    DType) override {}
    void send(const void*, int64_t, DType, int, int) override {}
    void recv(void*, int64_t, DType, int, int) override {}
    void barrier() override {}
  } solo;
  EXPECT_NO_THROW(abort_group(solo, "nothing to abort"));
}

TEST(ReduceOp, Names) {
  EXPECT_STREQ(reduce_op_name(ReduceOp::sum), "sum");
  EXPECT_STREQ(reduce_op_name(ReduceOp::max), "max");
}

}  // namespace
}  // namespace fm
