// The CPU TransferEngine: ranks are threads of one process (engine/comm.h,
// make_inprocess_group / run_inprocess) sharing one CpuTransferGroup, and a move is a memcpy.
//   direct  ("GPU-direct")    from the home rank's registered expert weights
//   cpu     ("CPU-assisted")  from the host mirror of the destination's node: one copy of
//                             all E experts' weights per node (LinkModel::ranks_per_node),
//                             written by refresh_mirror() after each optimizer step
// With bf16 slots (ExpertLayout::bf16_slots) the mirrors hold bf16 too (half the host memory)
// and a direct move rounds the home row as it copies it (a GPU engine would read the home
// rank's bf16 compute copy instead: the same bits).
// The path of every move comes from PathLoad (transfer/path_model.h) over all ranks' moves of
// the layer, with the group's LinkModel and PathPolicy: every rank computes the same split.
//
// Threads and memory. Each rank's moves run on a worker thread of its engine (or inline when
// CpuTransferConfig::worker_thread is false); wait() joins them. A rank's worker reads other
// ranks' home weights and the mirror and writes only its own rank's slots. Home weights change
// only between drain() (whose barrier follows every rank's last read) and refresh_mirror(),
// which writes the mirrors (each rank its own experts' rows, in every node's mirror) between
// two barriers. return_gradients(l) is pull-based: after a barrier (every rank's backward of
// l is done), each home rank adds the slot gradients of its own experts into their gradients,
// slots in (rank, slot) order -- one writer per gradient, one summation order, so the result
// is bit-reproducible -- then a barrier before the slots may be cleared.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/comm.h"
#include "transfer/path_model.h"
#include "transfer/transfer_engine.h"

namespace fm {

struct CpuTransferConfig {
  int32_t world_size = 1, n_experts = 0, n_layers = 0, slots_per_rank = 0;
  ExpertLayout expert;  // dtype f32 or f64 (gradients are summed on the CPU); bf16 slots: f32
  LinkModel links;      // ranks_per_node makes the nodes (one mirror each); bandwidths the split
  PathPolicy policy = PathPolicy::split;
  bool worker_thread = true;                 // false: moves run inside prefetch()
  std::chrono::milliseconds timeout{60000};  // bound of wait(), drain(), refresh_mirror()
};

// [layer][part]: a rank's home experts, each tensor [E/W, ...part] on the CPU.
using ExpertTensors = std::vector<std::vector<Tensor>>;

// What the W in-process ranks share: every rank's registered home buffers and slot buffers,
// and the node mirrors. Create it before the rank threads, keep it alive until every engine
// is destroyed.
class CpuTransferGroup {
 public:
  // Throws std::invalid_argument naming the field: counts < 1 (slots: < 0), E not divisible
  // by W, an empty layout, a dtype other than f32/f64, bf16 slots of f64 experts, a bad link
  // model.
  explicit CpuTransferGroup(CpuTransferConfig config);
  const CpuTransferConfig& config() const { return config_; }

 private:
  friend class CpuTransferEngine;
  struct RankBuffers {
    bool registered = false;
    ExpertTensors home_weights, home_grads;  // the caller's, [E/W, ...part]
    ExpertTensors slot_weights, slot_grads;  // the engine's, [S, ...part]
  };
  CpuTransferConfig config_;
  std::mutex mutex_;  // registration
  std::vector<RankBuffers> ranks_;
  std::vector<ExpertTensors> mirrors_;  // [node][layer][part]: [E, ...part]
};

class CpuTransferEngine final : public TransferEngine {
 public:
  // Called on the worker before each move (tests inject faults and delays with it).
  using MoveHook = std::function<void(const Move&, TransferPath)>;

  // Collective over `comm` (the group's W ranks, comm.rank() this rank): registers this
  // rank's home expert weights and gradients (the caller keeps them alive and changes the
  // weights only between drain() and refresh_mirror()), allocates the slots (zero), and fills
  // every node mirror with the current weights. Throws fm::Error naming the layer, the part
  // and the expected shape on a mismatch.
  CpuTransferEngine(CpuTransferGroup& group, Communicator& comm, ExpertTensors home_weights,
                    ExpertTensors home_grads, MoveHook hook = {});
  ~CpuTransferEngine() override;
  CpuTransferEngine(const CpuTransferEngine&) = delete;
  CpuTransferEngine& operator=(const CpuTransferEngine&) = delete;

  int32_t rank() const override { return rank_; }
  int32_t n_layers() const override { return config_.n_layers; }
  int32_t slots_per_rank() const override { return config_.slots_per_rank; }
  const ExpertLayout& layout() const override { return config_.expert; }

  void prefetch(int64_t micro_step, int32_t layer, const LayerPlacement& plan) override;
  void wait(int32_t layer) override;
  void release(int32_t layer) override;
  void return_gradients(int32_t layer) override;
  void drain() override;
  void refresh_mirror() override;

  const std::vector<Tensor>& slot_weights(int32_t layer) override;
  std::vector<Tensor>& slot_grads(int32_t layer) override;
  const std::vector<int32_t>& slot_experts(int32_t layer) const override;
  const TransferStats& stats() const override { return stats_; }

 private:
  enum class SlotState { empty, loading, ready };
  struct Job {
    int32_t layer = 0;
    int64_t micro_step = 0;
    std::vector<std::pair<Move, TransferPath>> moves;  // this rank's
  };
  struct Layer {  // caller-thread state
    SlotState state = SlotState::empty;
    int64_t micro_step = -1;
    uint64_t ticket = 0;  // the job of the last prefetch
    SlotTable plan;       // [rank][slot] of the last prefetch (all ranks)
    SlotTable resident;   // [rank][slot]: the expert whose current weights the slot holds
  };

  void check_layer(int32_t layer, const char* call) const;
  void run_job(const Job& job);  // on the worker (or inline)
  void worker_loop();
  // Blocks until job `ticket` (0: every submitted job) is done; false on timeout.
  bool wait_done(uint64_t ticket);
  void write_mirrors();

  CpuTransferGroup& group_;
  Communicator& comm_;
  CpuTransferConfig config_;
  int32_t rank_ = 0;
  MoveHook hook_;
  std::vector<Layer> layers_;
  bool updating_ = false;  // between drain() and refresh_mirror()
  TransferStats stats_;

  // Shared with the worker, under mutex_.
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<uint64_t, Job>> queue_;
  uint64_t submitted_ = 0, completed_ = 0;                // tickets: jobs run in submission order
  std::vector<std::pair<uint64_t, std::string>> errors_;  // failed jobs, not yet reported
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace fm
