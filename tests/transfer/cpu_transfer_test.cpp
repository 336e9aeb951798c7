// The CPU transfer engine over W = 4 in-process ranks: slots filled per random plans hold the
// home experts' current weights by either path, replica gradients sum into home gradients
// bit-exactly in the documented order, the CPU-assisted path serves the weights of the last
// mirror refresh, unchanged slots are reused, moves overlap on the worker, and misuse or a
// failed move gives an fm::Error naming the problem -- never a hang.
#include "transfer/cpu_transfer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>

#include "engine/error.h"

namespace fm {
namespace {

using std::chrono::milliseconds;
// Generous for 2 shared cores, short enough that a hang fails the test quickly.
constexpr milliseconds kTimeout{20000};

constexpr int32_t kW = 4, kE = 8, kL = 3, kS = 2, kF = 3, kH = 4;

CpuTransferConfig config(PathPolicy policy = PathPolicy::split, int32_t ranks_per_node = 2,
                         bool bf16_slots = false) {
  CpuTransferConfig c;
  c.world_size = kW;
  c.n_experts = kE;
  c.n_layers = kL;
  c.slots_per_rank = kS;
  c.expert.parts = {{kF, kH}, {kF, kH}, {kH, kF}};  // gate, up, down
  c.expert.bf16_slots = bf16_slots;
  c.links.ranks_per_node = ranks_per_node;
  c.policy = policy;
  c.timeout = kTimeout;
  return c;
}

// Every expert's weights and gradients of every layer, as the W ranks' home tensors.
struct Experts {
  // [rank]: [layer][part] -> [E/W, ...part]
  std::vector<ExpertTensors> weights, grads;

  explicit Experts(uint32_t seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal;
    const ExpertLayout layout = config().expert;
    for (auto* set : {&weights, &grads}) {
      set->assign(kW, ExpertTensors(kL));
      for (int32_t r = 0; r < kW; ++r)
        for (int32_t l = 0; l < kL; ++l)
          for (const Shape& part : layout.parts) {
            Tensor t = Tensor::empty({kE / kW, part[0], part[1]}, DType::f32);
            for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = normal(gen);
            (*set)[r][l].push_back(t);
          }
    }
  }
  // Expert e's part p of layer l, straight from its home rank's tensor.
  const float* weight(int32_t l, int32_t e, size_t p) const {
    const Tensor& t = weights[e / (kE / kW)][l][p];
    return t.data<float>() + (e % (kE / kW)) * (t.numel() / (kE / kW));
  }
};

// A random valid slot table: each slot empty (1 in 4) or any expert, repeats allowed.
SlotTable random_slots(std::mt19937& gen) {
  std::uniform_int_distribution<int32_t> pick(-2, kE - 1);
  SlotTable t(kW, std::vector<int32_t>(kS));
  for (auto& r : t)
    for (auto& e : r) e = std::max(pick(gen), -1);
  return t;
}

LayerPlacement plan_with(const SlotTable& slots) {
  LayerPlacement p;
  p.world_size = kW;
  p.n_experts = kE;
  p.replica_slots = kS;
  p.slots = slots;
  return p;
}

// Expects every filled slot of `layer` on this rank to hold the expert's weights in `experts`
// (bf16 slots: each weight rounded to nearest even bf16, the bits a bf16 convert gives).
void expect_slots_hold(CpuTransferEngine& eng, const Experts& experts, int32_t layer,
                       const SlotTable& slots, const std::string& what) {
  const std::vector<Tensor>& w = eng.slot_weights(layer);
  ASSERT_EQ(eng.slot_experts(layer), slots[eng.rank()]) << what;
  for (int32_t s = 0; s < kS; ++s) {
    const int32_t e = slots[eng.rank()][s];
    if (e < 0) continue;
    for (size_t p = 0; p < w.size(); ++p) {
      const int64_t n = w[p].numel() / kS;
      const float* want = experts.weight(layer, e, p);
      ASSERT_EQ(w[p].dtype(), eng.layout().slot_dtype());
      const auto* bits = static_cast<const uint16_t*>(w[p].raw()) + s * n;  // bf16
      int64_t wrong = 0;
      for (int64_t i = 0; i < n; ++i)
        wrong += w[p].dtype() == DType::bf16
                     ? bits[i] != f32_to_bf16(want[i])
                     : std::memcmp(w[p].data<float>() + s * n + i, want + i, sizeof(float)) != 0;
      EXPECT_EQ(wrong, 0) << what << ": rank " << eng.rank() << " layer " << layer << " slot " << s
                          << " expert " << e << " part " << p;
    }
  }
}

void expect_error(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << fragment;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// (path policy, bf16 slots)
class CpuTransferPolicies : public ::testing::TestWithParam<std::tuple<PathPolicy, bool>> {};

TEST_P(CpuTransferPolicies, SlotsHoldHomeWeightsForRandomPlans) {
  const auto [policy, bf16] = GetParam();
  Experts experts(7);
  CpuTransferGroup group(config(policy, 2, bf16));
  constexpr int kMicroSteps = 6;
  std::mt19937 gen(11);
  // [micro-step][layer]; the same on every rank. Every other micro-step keeps half of the
  // previous table, so reuse happens.
  std::vector<std::vector<SlotTable>> plans(kMicroSteps, std::vector<SlotTable>(kL));
  int64_t filled = 0;
  for (int m = 0; m < kMicroSteps; ++m)
    for (int32_t l = 0; l < kL; ++l) {
      plans[m][l] = random_slots(gen);
      if (m % 2 == 1)
        for (int32_t r = 0; r < kW; r += 2) plans[m][l][r] = plans[m - 1][l][r];
      for (const auto& r : plans[m][l])
        for (int32_t e : r) filled += e >= 0;
    }
  std::atomic<int64_t> moved{0}, reused{0}, direct{0}, cpu{0};
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank]);
    for (int m = 0; m < kMicroSteps; ++m) {
      // One layer ahead, as the MoE layers would consume them.
      eng.prefetch(m, 0, plan_with(plans[m][0]));
      for (int32_t l = 0; l < kL; ++l) {
        if (l + 1 < kL) eng.prefetch(m, l + 1, plan_with(plans[m][l + 1]));
        eng.wait(l);
        expect_slots_hold(eng, experts, l, plans[m][l], "micro-step " + std::to_string(m));
      }
      for (int32_t l = 0; l < kL; ++l) eng.release(l);
    }
    const TransferStats& st = eng.stats();
    moved += st.moves_direct + st.moves_cpu;
    reused += st.slots_reused;
    direct += st.moves_direct;
    cpu += st.moves_cpu;
    EXPECT_EQ(st.bytes_direct + st.bytes_cpu,
              (st.moves_direct + st.moves_cpu) * eng.layout().bytes());
    // A move carries 3 x F x H elements of the slot dtype; gradients stay f32.
    EXPECT_EQ(eng.layout().bytes(), 3 * kF * kH * (bf16 ? 2 : 4));
    EXPECT_EQ(eng.slot_grads(0)[0].dtype(), DType::f32);
  });
  EXPECT_EQ(moved + reused, filled);
  EXPECT_GT(reused, 0);
  if (policy == PathPolicy::direct_only) {
    EXPECT_EQ(cpu, 0);
  }
  if (policy == PathPolicy::cpu_only) {
    EXPECT_EQ(direct, 0);
  }
  if (policy == PathPolicy::split) {
    // Default LinkModel, 2 nodes: same-node moves go direct (NVLink outruns H2D), a
    // cross-node move ties NIC and H2D and takes the CPU path: both paths carry moves.
    EXPECT_GT(direct, 0);
    EXPECT_GT(cpu, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, CpuTransferPolicies,
                         ::testing::Combine(::testing::Values(PathPolicy::split,
                                                              PathPolicy::direct_only,
                                                              PathPolicy::cpu_only),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(policy_name(std::get<0>(info.param)))
                               .append(std::get<1>(info.param) ? "_bf16" : "_f32");
                         });

TEST(CpuTransfer, ReturnedGradientsSumBitExactly) {
  Experts experts(3);
  std::vector<std::vector<std::vector<std::vector<float>>>> home0(kW);  // [r][l][p]
  for (int32_t r = 0; r < kW; ++r) {
    home0[r].resize(kL);
    for (int32_t l = 0; l < kL; ++l)
      for (const Tensor& g : experts.grads[r][l])
        home0[r][l].emplace_back(g.data<float>(), g.data<float>() + g.numel());
  }
  CpuTransferGroup group(config());
  constexpr int kMicroSteps = 2;
  std::mt19937 gen(5);
  std::vector<std::vector<SlotTable>> plans(kMicroSteps, std::vector<SlotTable>(kL));
  for (auto& m : plans)
    for (auto& t : m) t = random_slots(gen);
  // The gradient the backward would leave in rank q's slot s of (micro-step m, layer l, part p):
  // a deterministic function of the indices, with values of mixed magnitude so that the
  // summation order matters in fp32.
  auto slot_grad = [](int m, int32_t l, int32_t q, int32_t s, size_t p, int64_t i) {
    std::mt19937 g(static_cast<uint32_t>((((m * kL + l) * kW + q) * kS + s) * 7 + p));
    g.discard(static_cast<unsigned long long>(i));
    const float u = std::uniform_real_distribution<float>(-1, 1)(g);
    return u * (i % 3 == 0 ? 1e4f : 1e-3f);
  };
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank]);
    for (int m = 0; m < kMicroSteps; ++m) {
      for (int32_t l = 0; l < kL; ++l) {
        eng.prefetch(m, l, plan_with(plans[m][l]));
        eng.wait(l);
      }
      for (int32_t l = kL - 1; l >= 0; --l) {  // "backward": accumulate into the slots
        std::vector<Tensor>& g = eng.slot_grads(l);
        for (size_t p = 0; p < g.size(); ++p) {
          const int64_t n = g[p].numel() / kS;
          for (int32_t s = 0; s < kS; ++s)
            for (int64_t i = 0; i < n; ++i) {
              EXPECT_EQ(g[p].data<float>()[s * n + i], 0.f) << "slot gradients start at zero";
              g[p].data<float>()[s * n + i] += slot_grad(m, l, rank, s, p, i);
            }
        }
        eng.return_gradients(l);
        for (const Tensor& t : eng.slot_grads(l))
          for (int64_t i = 0; i < t.numel(); ++i)
            ASSERT_EQ(t.data<float>()[i], 0.f) << "slot gradients are cleared after the return";
        eng.release(l);
      }
    }
    EXPECT_GT(eng.stats().grad_bytes_returned, 0);
  });
  // Sequential reference: for each micro-step, for each slot in (rank, slot) order, add its
  // gradient into the home expert's, element by element in fp32.
  for (int32_t r = 0; r < kW; ++r)
    for (int32_t l = 0; l < kL; ++l)
      for (size_t p = 0; p < 3; ++p) {
        std::vector<float> want = home0[r][l][p];
        const int64_t n = static_cast<int64_t>(want.size()) / (kE / kW);
        for (int m = 0; m < kMicroSteps; ++m)
          for (int32_t q = 0; q < kW; ++q)
            for (int32_t s = 0; s < kS; ++s) {
              const int32_t e = plans[m][l][q][s];
              if (e < 0 || e / (kE / kW) != r) continue;
              for (int64_t i = 0; i < n; ++i)
                want[(e % (kE / kW)) * n + i] += slot_grad(m, l, q, s, p, i);
            }
        const Tensor& got = experts.grads[r][l][p];
        ASSERT_EQ(std::memcmp(got.data<float>(), want.data(), want.size() * sizeof(float)), 0)
            << "rank " << r << " layer " << l << " part " << p;
      }
}

TEST(CpuTransfer, CpuPathServesRefreshedWeights) {
  for (const auto& [policy, bf16] : {std::pair{PathPolicy::cpu_only, false},
                                     {PathPolicy::direct_only, false},
                                     {PathPolicy::cpu_only, true},
                                     {PathPolicy::direct_only, true}}) {
    SCOPED_TRACE(std::string(policy_name(policy)).append(bf16 ? " bf16" : " f32"));
    Experts experts(9);
    CpuTransferGroup group(config(policy, 2, bf16));
    std::mt19937 gen(2);
    const SlotTable slots = random_slots(gen);
    run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
      CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank]);
      for (int32_t step = 0; step < 3; ++step) {
        for (int32_t l = 0; l < kL; ++l) {
          eng.prefetch(step, l, plan_with(slots));
          eng.wait(l);
          expect_slots_hold(eng, experts, l, slots, "step " + std::to_string(step));
          eng.release(l);
        }
        eng.drain();
        // "Optimizer step": every home weight changes (w = 0.5 w + step + 1).
        for (auto& layer : experts.weights[rank])
          for (Tensor& t : layer)
            for (int64_t i = 0; i < t.numel(); ++i)
              t.data<float>()[i] = 0.5f * t.data<float>()[i] + static_cast<float>(step + 1);
        eng.refresh_mirror();
      }
      // The same slots every step: nothing is reused across an optimizer step.
      EXPECT_EQ(eng.stats().slots_reused, 0);
    });
  }
}

TEST(CpuTransfer, StaleMirrorWouldBeCaught) {
  // The check above can fail: weights changed without refresh_mirror (outside the contract,
  // on purpose, with no move in flight) leave the CPU path serving the old ones.
  Experts experts(4);
  CpuTransferGroup group(config(PathPolicy::cpu_only));
  const SlotTable slots = {{1, 6}, {0, -1}, {7, 3}, {2, 5}};
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank]);
    const int32_t e = slots[rank][0];
    const float old = experts.weight(0, e, 0)[0];
    comm.barrier();
    for (auto& layer : experts.weights[rank])
      for (Tensor& t : layer)  // a change the mirror never saw
        for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] += 1.f;
    comm.barrier();
    eng.prefetch(0, 0, plan_with(slots));
    eng.wait(0);
    EXPECT_EQ(eng.slot_weights(0)[0].data<float>()[0], old);
    EXPECT_NE(eng.slot_weights(0)[0].data<float>()[0], experts.weight(0, e, 0)[0]);
    eng.release(0);
  });
}

TEST(CpuTransfer, UnchangedSlotsAreNotMovedAgain) {
  Experts experts(1);
  CpuTransferGroup group(config());
  const SlotTable a = {{1, 6}, {0, -1}, {7, 3}, {2, 5}};
  SlotTable b = a;
  b[0][1] = 4;   // changed
  b[2][0] = 3;   // changed (3 stays in slot 1 too: a slot, not an expert, is what is reused)
  b[3][1] = -1;  // emptied
  std::atomic<int> moves{0};
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank],
                          [&](const Move&, TransferPath) { ++moves; });
    eng.prefetch(0, 1, plan_with(a));
    eng.wait(1);
    eng.release(1);
    comm.barrier();
    if (rank == 0) {
      EXPECT_EQ(moves.load(), 7);
    }
    comm.barrier();
    eng.prefetch(1, 1, plan_with(b));
    eng.wait(1);
    expect_slots_hold(eng, experts, 1, b, "second micro-step");
    eng.release(1);
    comm.barrier();
    if (rank == 0) {
      EXPECT_EQ(moves.load(), 7 + 2);
    }
    const int64_t want_reused[kW] = {1, 1, 1, 1};
    EXPECT_EQ(eng.stats().slots_reused, want_reused[rank]) << "rank " << rank;
  });
}

TEST(CpuTransfer, PrefetchOverlapsOnTheWorker) {
  Experts experts(2);
  CpuTransferGroup group(config());
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  std::atomic<int> entered{0};
  const SlotTable slots = {{4, -1}, {-1, -1}, {-1, -1}, {-1, -1}};
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    // Rank 0's only move blocks on the worker until the caller opens the gate (bounded).
    CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank],
                          [&](const Move&, TransferPath) {
                            ++entered;
                            std::unique_lock<std::mutex> lock(mu);
                            cv.wait_for(lock, std::chrono::seconds(10), [&] { return open; });
                          });
    eng.prefetch(0, 2, plan_with(slots));  // returns while the move is held
    if (rank == 0) {
      for (int i = 0; i < 1000 && entered.load() == 0; ++i)
        std::this_thread::sleep_for(milliseconds(5));
      EXPECT_EQ(entered.load(), 1) << "the move runs on the worker while prefetch has returned";
      EXPECT_EQ(eng.slot_weights(2)[0].data<float>()[0], 0.f) << "not filled before the gate";
      {
        std::lock_guard<std::mutex> lock(mu);
        open = true;
      }
      cv.notify_all();
    }
    eng.wait(2);
    expect_slots_hold(eng, experts, 2, slots, "after the gate");
    eng.release(2);
  });
}

TEST(CpuTransfer, WorkerErrorSurfacesAtWait) {
  Experts experts(5);
  CpuTransferGroup group(config());
  std::atomic<bool> fail{true};
  const SlotTable slots = {{1, 2}, {3, 4}, {5, 6}, {7, 0}};
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank],
                          [&](const Move& m, TransferPath) {
                            if (fail && m.dst == 1 && m.slot == 1)
                              throw std::runtime_error("injected copy fault");
                          });
    eng.prefetch(0, 0, plan_with(slots));
    if (rank == 1) {
      expect_error([&] { eng.wait(0); },
                   "the moves of layer 0 (micro-step 0) failed on rank 1's worker: injected "
                   "copy fault");
      // The failed layer is free again and a retry succeeds.
      fail = false;
      eng.prefetch(0, 0, plan_with(slots));
    }
    eng.wait(0);
    expect_slots_hold(eng, experts, 0, slots, "after the retry");
    eng.release(0);
  });
}

TEST(CpuTransfer, WaitTimesOutInsteadOfHanging) {
  Experts experts(6);
  CpuTransferConfig c = config();
  c.timeout = milliseconds(100);
  CpuTransferGroup group(c);
  const SlotTable slots = {{1, -1}, {-1, -1}, {-1, -1}, {-1, -1}};
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    CpuTransferEngine eng(
        group, comm, experts.weights[rank], experts.grads[rank],
        [&](const Move&, TransferPath) { std::this_thread::sleep_for(milliseconds(600)); });
    eng.prefetch(0, 0, plan_with(slots));
    if (rank == 0)
      expect_error([&] { eng.wait(0); }, "wait(layer 0) on rank 0 timed out after 100 ms");
  });
}

TEST(CpuTransfer, MisuseNamesTheProblem) {
  Experts experts(8);
  CpuTransferGroup group(config());
  const SlotTable good = {{1, -1}, {2, -1}, {-1, 3}, {-1, -1}};
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    CpuTransferEngine eng(group, comm, experts.weights[rank], experts.grads[rank]);
    if (rank != 2) return;
    LayerPlacement p = plan_with(good);
    p.slots[1].push_back(0);
    expect_error([&] { eng.prefetch(0, 0, p); },
                 "prefetch(micro-step 0, layer 0) on rank 2: the plan gives rank 1 3 slots, the "
                 "engine has 2");
    p = plan_with(good);
    p.replica_slots = 3;
    expect_error([&] { eng.prefetch(0, 0, p); }, "the plan is for 4 ranks, 8 experts and 3 slots");
    p = plan_with(good);
    p.slots[3][0] = 8;
    expect_error([&] { eng.prefetch(0, 0, p); }, "puts expert 8 in rank 3 slot 0, not in [-1, 8)");
    expect_error([&] { eng.prefetch(0, 3, plan_with(good)); },
                 "prefetch(layer 3) on rank 2: layer out of range [0, 3)");
    expect_error([&] { eng.wait(-1); }, "wait(layer -1) on rank 2: layer out of range");
    expect_error([&] { eng.wait(1); }, "wait(layer 1) on rank 2 without a prefetch");
    expect_error([&] { eng.release(1); }, "release(layer 1) on rank 2 without a prefetch");
    expect_error([&] { eng.return_gradients(1); },
                 "return_gradients(layer 1) on rank 2: the layer holds no prefetched slots");
    eng.prefetch(4, 1, plan_with(good));
    expect_error([&] { eng.prefetch(5, 1, plan_with(good)); },
                 "the layer's slots still hold micro-step 4");
    expect_error([&] { eng.drain(); }, "layer 1 still holds the slots of micro-step 4");
    eng.wait(1);
    eng.release(1);
  });
  // Registration with the wrong shape names the layer and part.
  CpuTransferGroup other(config());
  // Every rank fails (no peer is left waiting): rank 1 with its reason, the others naming it.
  run_inprocess(kW, kTimeout, [&](int rank, Communicator& comm) {
    ExpertTensors w = experts.weights[rank];
    if (rank == 1) w[2][1] = Tensor::zeros({2, kF, kH + 1}, DType::f32);
    expect_error([&] { CpuTransferEngine(other, comm, w, experts.grads[rank]); },
                 rank == 1 ? "rank 1 registered home weights of layer 2 part 1 as f32[2, 3, 5] "
                             "on cpu, expected f32[2, 3, 4]"
                           : "rank 1 could not register its experts");
  });
  // Prefetch between drain and refresh_mirror (one rank: no peers to wait for).
  CpuTransferConfig c1 = config();
  c1.world_size = 1;
  c1.links.ranks_per_node = 1;
  CpuTransferGroup single(c1);
  Experts e1(8);
  run_inprocess(1, kTimeout, [&](int, Communicator& comm) {
    ExpertTensors w(kL), g(kL);
    for (int32_t l = 0; l < kL; ++l)
      for (const Shape& part : c1.expert.parts) {
        w[l].push_back(Tensor::zeros({kE, part[0], part[1]}, DType::f32));
        g[l].push_back(Tensor::zeros({kE, part[0], part[1]}, DType::f32));
      }
    CpuTransferEngine eng(single, comm, w, g);
    eng.drain();
    LayerPlacement p;
    p.world_size = 1;
    p.n_experts = kE;
    p.replica_slots = kS;
    p.slots = {{0, 1}};
    expect_error([&] { eng.prefetch(0, 0, p); }, "between drain() and refresh_mirror()");
    eng.refresh_mirror();
    eng.prefetch(0, 0, p);
    eng.wait(0);
    eng.release(0);
  });
}

TEST(CpuTransfer, BadGroupConfigNamesTheField) {
  auto expect_invalid = [](CpuTransferConfig c, const std::string& fragment) {
    try {
      CpuTransferGroup g(c);
      ADD_FAILURE() << "no error; expected one containing: " << fragment;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  CpuTransferConfig c = config();
  c.n_experts = 6;
  expect_invalid(c, "n_experts (6) must be a positive multiple of world_size (4)");
  c = config();
  c.links.ranks_per_node = 3;
  expect_invalid(c, "ranks_per_node (3) must be >= 1 and divide the world size (4)");
  c = config();
  c.expert.dtype = DType::bf16;
  expect_invalid(c, "expert dtype bf16 is not supported");
  c = config();
  c.expert.dtype = DType::f64;
  c.expert.bf16_slots = true;
  expect_invalid(c, "bf16 slots need f32 experts (the expert dtype is f64)");
  c = config();
  c.slots_per_rank = -1;
  expect_invalid(c, "slots_per_rank must be >= 0 (got -1)");
}

}  // namespace
}  // namespace fm
