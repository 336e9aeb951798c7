// The transfer engine (transfer/): the path-split scheduler on modeled H100 nodes, and the CPU
// engine's slot fills against a memcpy roofline. Results and commands: bench/results/transfer.md.
//
// BM_Schedule/<policy>  schedule_transfers (transfer/transfer_schedule.h) over M = 4 micro-steps
//   x L = 8 MoE layers of replica plans from the real foresight planner (balancer/planner.h) at
//   W = 8..64 ranks (8 GPUs per node), E = 128 experts, top-8, S = 2 slots per rank and layer.
//   Loads: a synthetic trace (balancer/synthetic_trace.h: Zipf 1.0, drift 0.02) cut into
//   micro-steps of 4 sequences x 1024 tokens per rank (balancer/load_matrix.h). Each weight move
//   is one Qwen3-30B-A3B expert: gate, up, down = 3 x 2048 x 768 bf16 = 9,437,184 bytes.
//   Modes (arg `mode`):
//     0 recompute    forward only, lookahead 1 (one layer ahead), S buffers per layer
//     1 update       forward then backward per micro-step, lookahead 1, S buffers per layer:
//                    layer l's next fill must wait for its backward (the end of the micro-step
//                    for l = 0)
//     2 update_pool  the same with one pool of S x L buffers per rank (the same memory) shared
//                    by all layers, so the next micro-step's first layers fill during the
//                    backward of the last ones
//   Compute (arg `tokens`): tokens per rank and micro-step that the compute model charges
//   (forward_seconds below): 4096 (the trace's own) or 512 (a short micro-step, same plans: the
//   regime where moves no longer hide behind compute).
//   Counters (whole run): stall_ms (compute waiting for moves) and stall_pct (of compute),
//   makespan_ms, compute_ms, GB_direct / GB_cpu (bytes per path), cpu_share, reuse (filled slots
//   that needed no move), sched_s/layer (the scheduler's own CPU time per (micro-step, layer):
//   the timed call / the M x L uses).
//
// BM_CpuEngine / BM_MemcpyRoofline  CpuTransferEngine (transfer/cpu_transfer.h) at W = 4
//   in-process ranks (2 nodes of 2), E = 16, L = 2, S = 2, f32 experts of 1 MB or 9.4 MB: per
//   iteration every rank prefetches both layers (plans alternating so that no slot is reused),
//   waits, releases, and the ranks meet at a barrier: GB/s = slot-fill bytes of all ranks / time.
//   The roofline: the same W threads each memcpy the same bytes between private buffers, with the
//   same barrier; BM_CpuEngine also measures it right before its loop (10 rounds) and reports
//   the ratio, and the same for memcpy + a memset of as many bytes (copy+zero): the engine zeroes
//   every filled slot's gradient with the fill, so that is the traffic it really makes.
//   Arg `bf16`: 1 moves bf16 slots (ExpertLayout::bf16_slots, what bf16 compute moves): half the
//   bytes per move; a direct move rounds the f32 home row as it copies it, the CPU path copies
//   the bf16 mirror. Its copy+zero roofline zeroes the f32 gradient (twice the slot bytes);
//   ms_per_round compares the two directly (the same experts and plans).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "balancer/load_matrix.h"
#include "balancer/planner.h"
#include "balancer/synthetic_trace.h"
#include "engine/comm.h"
#include "transfer/cpu_transfer.h"
#include "transfer/transfer_schedule.h"

namespace {

using fm::PathPolicy;
using fm::SlotTable;

// ---------------------------------------------------------------------------------------------
// The modeled hardware and workload.

constexpr int32_t kGpusPerNode = 8, kExperts = 128, kTopK = 8, kLayers = 8, kSlots = 2;
constexpr int64_t kMicroSteps = 4, kSeqPerRank = 4, kSeqLen = 1024;
constexpr int64_t kTokensPerRank = kSeqPerRank * kSeqLen;
// Qwen3-30B-A3B (hidden 2048, moe_intermediate 768, 128 experts, top-8): one expert's
// gate + up + down in bf16.
constexpr int64_t kExpertBytes = int64_t{3} * 2048 * 768 * 2;  // 9,437,184
// Compute per MoE layer and rank for `tokens` tokens: 2 FLOPs per active parameter per token
// forward, 2x that backward. Active parameters per layer ~59 M (attention q/k/v/o 21 M + 8 experts
// x 4.7 M + router); 300 TFLOP/s achieved bf16 (~30% of the H100 SXM's 989 dense peak, typical of
// MoE layers' small grouped GEMMs). 4096 tokens: 1.61 ms forward. The all-to-all is not counted,
// so compute is short and the stalls are upper bounds.
constexpr double kActiveParamsPerLayer = 59e6, kAchievedFlops = 300e12;
double forward_seconds(int64_t tokens) {
  return static_cast<double>(tokens) * 2 * kActiveParamsPerLayer / kAchievedFlops;
}

// H100 SXM nodes (DGX H100 style): NVLink 4 = 900 GB/s bidirectional per GPU -> 450 GB/s per
// direction (NVIDIA H100 datasheet); one ConnectX-7 400 Gb/s NIC per GPU -> 50 GB/s per
// direction (DGX H100 user guide); PCIe Gen5 x16 = 64 GB/s per direction raw, ~50 GB/s for
// pinned H2D copies. Nominal figures, not the derated LinkModel defaults; 10 us per move.
fm::LinkModel h100_links() {
  fm::LinkModel m;
  m.ranks_per_node = kGpusPerNode;
  m.intra_node_bw = 450e9;
  m.inter_node_bw = 50e9;
  m.h2d_bw = 50e9;
  m.latency_s = 10e-6;
  return m;
}

// plans[m][l]: foresight's slot tables for the M micro-steps x L layers at W ranks (cached).
const std::vector<std::vector<SlotTable>>& foresight_plans(int32_t W) {
  static std::map<int32_t, std::vector<std::vector<SlotTable>>> cache;
  auto [it, fresh] = cache.try_emplace(W);
  if (!fresh) return it->second;
  fm::SyntheticTraceOptions o;
  o.n_experts = kExperts;
  o.top_k = kTopK;
  o.n_moe_layers = kLayers;
  o.sequences = W * kSeqPerRank * kMicroSteps;
  o.seq_len = kSeqLen;
  o.skew = 1.0;
  o.drift = 0.02;
  o.seed = 1;
  const fm::RoutingTrace trace = fm::synthetic_trace(o);
  const auto loads = fm::load_matrices(trace, fm::consecutive_assignment(trace, W, kSeqPerRank));
  fm::PlannerConfig c;
  c.name = "foresight";
  c.topology = {W / kGpusPerNode, kGpusPerNode};
  c.n_experts = kExperts;
  c.n_moe_layers = kLayers;
  c.replica_slots = kSlots;
  auto planner = fm::make_planner(c);
  planner->begin_step(fm::step_expert_load(loads));
  fm::LayerPlacement out;
  for (const auto& micro : loads) {
    it->second.emplace_back();
    for (int32_t l = 0; l < kLayers; ++l) {
      planner->plan(l, micro[l], out);
      it->second.back().push_back(out.slots);
    }
  }
  return it->second;
}

void BM_Schedule(benchmark::State& state, PathPolicy policy) {
  const auto W = static_cast<int32_t>(state.range(0));
  const auto mode = static_cast<int32_t>(state.range(1));
  const double forward_s = forward_seconds(state.range(2));
  const fm::TransferWorkload work = fm::layered_workload(
      kExperts, kExpertBytes, foresight_plans(W), forward_s, mode == 0 ? 0.0 : 2 * forward_s);
  fm::ScheduleOptions o;
  o.links = h100_links();
  o.policy = policy;
  o.lookahead = 1;
  if (mode == 2) o.slot_memory_bytes = int64_t{kSlots} * kLayers * kExpertBytes;

  fm::TransferSchedule s;
  for (auto _ : state) {
    s = fm::schedule_transfers(work, o);
    benchmark::DoNotOptimize(s.makespan_s);
  }
  const double uses = static_cast<double>(work.uses.size());
  const double moved = static_cast<double>(s.moves_direct + s.moves_cpu);
  const auto per_use = benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert;
  state.counters["stall_ms"] = s.stall_s * 1e3;
  state.counters["makespan_ms"] = s.makespan_s * 1e3;
  state.counters["compute_ms"] = s.compute_s * 1e3;
  state.counters["stall_pct"] = 100 * s.stall_s / s.compute_s;
  state.counters["GB_direct"] = static_cast<double>(s.bytes_direct) * 1e-9;
  state.counters["GB_cpu"] = static_cast<double>(s.bytes_cpu) * 1e-9;
  state.counters["cpu_share"] =
      static_cast<double>(s.bytes_cpu) / std::max<double>(1, s.bytes_cpu + s.bytes_direct);
  state.counters["reuse"] =
      static_cast<double>(s.slots_reused) / std::max<double>(1, s.slots_reused + moved);
  state.counters["sched_s/layer"] = benchmark::Counter(uses, per_use);
}

void schedule_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"W", "mode", "tokens"});
  for (int64_t tokens : {kTokensPerRank, int64_t{512}})
    for (int64_t mode : {0, 1, 2})
      for (int64_t W : {8, 16, 32, 64}) b->Args({W, mode, tokens});
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK_CAPTURE(BM_Schedule, split, PathPolicy::split)->Apply(schedule_args);
BENCHMARK_CAPTURE(BM_Schedule, direct_only, PathPolicy::direct_only)->Apply(schedule_args);
BENCHMARK_CAPTURE(BM_Schedule, cpu_only, PathPolicy::cpu_only)->Apply(schedule_args);

// ---------------------------------------------------------------------------------------------
// The CPU engine against memcpy.

constexpr int32_t kEngineRanks = 4, kEngineExperts = 16, kEngineLayers = 2;
constexpr std::chrono::milliseconds kTimeout(60000);  // every barrier and wait

// f32 gate/up/down [F, H], [F, H], [H, F]: 9.4 MB is the Qwen3 expert's byte count
// (3 x 1024 x 768 x 4 = 9,437,184), 1 MB is 3 x 256 x 341 x 4 = 1,047,552.
fm::ExpertLayout engine_expert(int64_t mb_tenths, bool bf16_slots = false) {
  const int64_t F = mb_tenths == 10 ? 256 : 1024, H = mb_tenths == 10 ? 341 : 768;
  return {{{F, H}, {F, H}, {H, F}}, fm::DType::f32, bf16_slots};
}

// Slot-fill bytes of one rank per iteration: S slots x L layers.
int64_t rank_fill_bytes(const fm::ExpertLayout& e) {
  return int64_t{kSlots} * kEngineLayers * e.bytes();
}

// W in-process rank threads (engine/comm.h): setup(rank, comm) once, then rounds of
// body(rank, comm) between two barriers for as long as next() -- asked on rank 0 before each
// round -- says; record(seconds) gets each round's wall time on rank 0, from the first barrier
// to the second (so every rank's work of the round is in it).
void run_rounds(int32_t W, const std::function<void(int, fm::Communicator&)>& setup,
                const std::function<void(int, fm::Communicator&)>& body,
                const std::function<bool()>& next, const std::function<void(double)>& record) {
  std::atomic<bool> more{true};
  fm::run_inprocess(W, kTimeout, [&](int rank, fm::Communicator& comm) {
    setup(rank, comm);
    for (;;) {
      if (rank == 0) more = next();
      comm.barrier();  // rank 0 stored `more` before it arrived
      if (!more) break;
      const auto t0 = std::chrono::steady_clock::now();
      body(rank, comm);
      comm.barrier();
      if (rank == 0)
        record(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      comm.barrier();  // nobody reads `more` of the next round before rank 0 writes it
    }
  });
}

// Rank r's private source, destination (`bytes` each) and gradient (`grad_bytes`) buffers.
struct CopyBuffers {
  std::vector<std::vector<char>> src, dst, grad;
  CopyBuffers(int32_t W, int64_t bytes, int64_t grad_bytes)
      : src(W, std::vector<char>(static_cast<size_t>(bytes), 1)),
        dst(W, std::vector<char>(static_cast<size_t>(bytes), 0)),
        grad(W, std::vector<char>(static_cast<size_t>(grad_bytes), 0)) {}
  // The roofline of a fill: one memcpy. With `zero`, also a memset of the gradient, as the
  // engine zeroes a slot's gradient with every fill.
  void copy(int rank, bool zero) {
    std::memcpy(dst[rank].data(), src[rank].data(), dst[rank].size());
    if (zero) std::memset(grad[rank].data(), 0, grad[rank].size());
  }
};

auto no_setup = [](int, fm::Communicator&) {};

// GB/s of slot-fill bytes when all W ranks copy `bytes` each at once (with `zero`, and zero
// `grad_bytes`): total bytes over total time of `rounds` rounds after one warm-up round.
double memcpy_roofline_gbps(int32_t W, int64_t bytes, int64_t grad_bytes, bool zero, int rounds) {
  CopyBuffers buf(W, bytes, grad_bytes);
  double total_s = 0;
  int round = 0;
  run_rounds(
      W, no_setup, [&](int rank, fm::Communicator&) { buf.copy(rank, zero); },
      [&] { return round++ <= rounds; }, [&](double s) { total_s += round > 1 ? s : 0; });
  return static_cast<double>(bytes) * W * rounds / total_s * 1e-9;
}

void BM_MemcpyRoofline(benchmark::State& state) {
  const fm::ExpertLayout e = engine_expert(state.range(0));
  const int64_t bytes = rank_fill_bytes(e);
  CopyBuffers buf(kEngineRanks, bytes, 0);
  double total_s = 0;
  run_rounds(
      kEngineRanks, no_setup, [&](int rank, fm::Communicator&) { buf.copy(rank, false); },
      [&] { return state.KeepRunning(); },
      [&](double s) {
        state.SetIterationTime(s);
        total_s += s;
      });
  state.counters["expert_MB"] = static_cast<double>(e.bytes()) * 1e-6;
  state.counters["GB/s"] = static_cast<double>(bytes) * kEngineRanks *
                           static_cast<double>(state.iterations()) / total_s * 1e-9;
}

// Rank r's slot s of layer l holds an expert of rank (r + 1 + s) mod W (never its own), and the
// two parities give every slot a different expert, so no fill is ever reused.
fm::LayerPlacement engine_plan(int parity, int32_t layer) {
  constexpr int32_t El = kEngineExperts / kEngineRanks;
  fm::LayerPlacement p;
  p.world_size = kEngineRanks;
  p.n_experts = kEngineExperts;
  p.replica_slots = kSlots;
  p.slots.assign(kEngineRanks, std::vector<int32_t>(kSlots));
  for (int32_t r = 0; r < kEngineRanks; ++r)
    for (int32_t s = 0; s < kSlots; ++s)
      p.slots[r][s] = (r + 1 + s) % kEngineRanks * El + (parity * 2 + s + layer) % El;
  return p;
}

void BM_CpuEngine(benchmark::State& state) {
  const fm::ExpertLayout e = engine_expert(state.range(0), state.range(1) != 0);
  const int64_t bytes = rank_fill_bytes(e);
  const int64_t grad_bytes = bytes / static_cast<int64_t>(fm::dtype_size(e.slot_dtype())) *
                             static_cast<int64_t>(fm::dtype_size(e.dtype));
  const double roofline = memcpy_roofline_gbps(kEngineRanks, bytes, 0, false, 10);
  const double fill_zero = memcpy_roofline_gbps(kEngineRanks, bytes, grad_bytes, true, 10);

  fm::CpuTransferConfig c;
  c.world_size = kEngineRanks;
  c.n_experts = kEngineExperts;
  c.n_layers = kEngineLayers;
  c.slots_per_rank = kSlots;
  c.expert = e;
  c.links = h100_links();
  c.links.ranks_per_node = 2;
  c.policy = PathPolicy::split;
  c.timeout = kTimeout;
  fm::CpuTransferGroup group(c);
  std::vector<fm::LayerPlacement> plans;
  for (int parity : {0, 1})
    for (int32_t l = 0; l < kEngineLayers; ++l) plans.push_back(engine_plan(parity, l));

  std::vector<std::unique_ptr<fm::CpuTransferEngine>> engines(kEngineRanks);
  std::vector<int64_t> rounds(kEngineRanks, 0);
  double timed_s = 0;
  int64_t timed = 0;
  try {
    run_rounds(
        kEngineRanks,
        [&](int rank, fm::Communicator& comm) {  // registration (collective), untimed
          fm::ExpertTensors w(kEngineLayers), g(kEngineLayers);
          for (int32_t l = 0; l < kEngineLayers; ++l)
            for (const fm::Shape& part : e.parts) {
              fm::Shape shape{kEngineExperts / kEngineRanks};
              shape.insert(shape.end(), part.begin(), part.end());
              w[l].push_back(fm::Tensor::zeros(shape, e.dtype));
              g[l].push_back(fm::Tensor::zeros(shape, e.dtype));
            }
          engines[rank] = std::make_unique<fm::CpuTransferEngine>(group, comm, w, g);
        },
        [&](int rank, fm::Communicator&) {
          fm::CpuTransferEngine& eng = *engines[rank];
          const int64_t round = rounds[rank]++;
          const auto parity = static_cast<size_t>(round % 2);
          for (int32_t l = 0; l < kEngineLayers; ++l)
            eng.prefetch(round, l, plans[parity * kEngineLayers + l]);
          for (int32_t l = 0; l < kEngineLayers; ++l) eng.wait(l);
          for (int32_t l = 0; l < kEngineLayers; ++l) eng.release(l);
        },
        [&] { return state.KeepRunning(); },
        [&](double s) {
          state.SetIterationTime(s);
          timed_s += s;
          ++timed;
        });
  } catch (const std::exception& ex) {
    state.SkipWithError(ex.what());
    return;
  }
  const fm::TransferStats& st = engines[0]->stats();
  if (st.slots_reused != 0) state.SkipWithError("a slot was reused: the plans must alternate");
  const double fills = static_cast<double>(bytes) * kEngineRanks;
  const double gbps = timed_s > 0 ? fills * static_cast<double>(timed) / timed_s * 1e-9 : 0;
  state.counters["expert_MB"] = static_cast<double>(e.bytes()) * 1e-6;
  state.counters["GB/s"] = gbps;
  state.counters["roofline_GB/s"] = roofline;
  state.counters["of_roofline"] = gbps / roofline;
  state.counters["copy+zero_GB/s"] = fill_zero;
  state.counters["ms_per_round"] = timed > 0 ? timed_s / static_cast<double>(timed) * 1e3 : 0;
  state.counters["of_copy+zero"] = gbps / fill_zero;
  state.counters["cpu_share"] =
      static_cast<double>(st.bytes_cpu) / std::max<double>(1, st.bytes_cpu + st.bytes_direct);
  engines.clear();  // join the workers while the group is alive
}

void roofline_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"MBx10"});
  b->Arg(10)->Arg(94);
  b->Unit(benchmark::kMillisecond)->UseManualTime();
}

void engine_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"MBx10", "bf16"});
  b->ArgsProduct({{10, 94}, {0, 1}});
  b->Unit(benchmark::kMillisecond)->UseManualTime();
}

BENCHMARK(BM_MemcpyRoofline)->Apply(roofline_args);
BENCHMARK(BM_CpuEngine)->Apply(engine_args);

}  // namespace

BENCHMARK_MAIN();
