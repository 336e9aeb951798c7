// The two paths an expert weight move can take, their bandwidth model, and the
// earliest-finish-time choice between them (see ../shared/design/DESIGN.md, "Transfer engine").
//
// A move fills one replica slot: expert e's weights (bytes) go to slot `slot` of rank `dst`.
//   direct  GPU-direct: from e's home rank. Same node: the home's outgoing and the
//           destination's incoming NVLink port (intra_node_bw each); other node: the home's
//           and the destination's NIC (inter_node_bw).
//   cpu     CPU-assisted: an H2D copy from the destination node's host mirror on the
//           destination's copy engine (h2d_bw), leaving NVLink and the NICs to the all-to-all.
// Each of those resources (a port, a NIC, a copy engine) serves one move at a time. A move
// takes latency_s + bytes / bandwidth on its path and starts when every resource of the path
// is free and the move is released; PathLoad picks the path that finishes first (the current
// load of each path decides), the CPU-assisted one on a tie. Pure logic: the CPU engine
// (transfer/cpu_transfer.h) and the scheduler (transfer/transfer_schedule.h) both use it.
#pragma once

#include <cstdint>
#include <vector>

namespace fm {

enum class TransferPath { direct, cpu };
const char* path_name(TransferPath path);  // "direct", "cpu"

// Which paths moves may use: both (split by PathLoad), or one forced (baselines, tests).
enum class PathPolicy { split, direct_only, cpu_only };
const char* policy_name(PathPolicy policy);

// Bandwidths in bytes per second, per rank and direction; latency in seconds per move.
// The defaults are H100-class figures (NVLink 4 ~ 450 GB/s per direction, one 400 Gb/s NIC
// per GPU, PCIe 5 x16 H2D ~ 50 GB/s), derated for what copies reach in practice.
struct LinkModel {
  int32_t ranks_per_node = 1;
  double intra_node_bw = 300e9;
  double inter_node_bw = 40e9;
  double h2d_bw = 40e9;
  double latency_s = 10e-6;

  int32_t node_of(int32_t rank) const { return rank / ranks_per_node; }
  // Throws std::invalid_argument naming the field: ranks_per_node not dividing world_size,
  // a bandwidth that is not positive and finite, a negative latency.
  void validate(int32_t world_size) const;
  // latency_s + bytes / bandwidth of `path` for a move src -> dst.
  double seconds(TransferPath path, int32_t src, int32_t dst, int64_t bytes) const;
};

// [rank][slot] -> the expert in the slot, or -1 when empty (LayerPlacement::slots).
using SlotTable = std::vector<std::vector<int32_t>>;

// One replica-slot fill: `expert` (home rank src) into slot `slot` of rank dst.
struct Move {
  int32_t expert = 0, src = 0, dst = 0, slot = 0;
  int64_t bytes = 0;
};

struct PathChoice {
  TransferPath path = TransferPath::cpu;
  double start = 0, finish = 0;
};

// The load of every path resource of W ranks: when each becomes free.
class PathLoad {
 public:
  PathLoad(const LinkModel& model, int32_t world_size);

  // Where and when `move`, released at `ready`, would run under `policy` (earliest finish
  // time over the allowed paths; the CPU-assisted path on a tie). Does not change the load.
  PathChoice choose(const Move& move, double ready, PathPolicy policy = PathPolicy::split) const;
  // choose() and occupy the chosen path's resources until the move's finish.
  PathChoice assign(const Move& move, double ready, PathPolicy policy = PathPolicy::split);

  const LinkModel& model() const { return model_; }

 private:
  // The resources a move on `path` occupies: indices into free_at_.
  std::vector<int32_t> resources(TransferPath path, const Move& move) const;
  LinkModel model_;
  int32_t world_ = 0;
  // [kind * W + rank]: nvlink out, nvlink in, nic out, nic in, h2d engine.
  std::vector<double> free_at_;
};

// The moves that fill the replica slots of one layer: slots[r][s] is the expert in rank r's
// slot s (-1: empty), for W = slots.size() ranks and E = n_experts experts (home rank
// e / (E / W)). A slot whose expert equals resident[r][s] (what the slot already holds, with
// current weights) needs no move and is counted in *reused. resident may be null (nothing
// resident). Order: by destination rank, then slot. Throws std::invalid_argument on an
// expert id out of [-1, E), ragged slots or E not divisible by W.
std::vector<Move> slot_moves(const SlotTable& slots, int32_t n_experts, int64_t expert_bytes,
                             const SlotTable* resident = nullptr, int64_t* reused = nullptr);

}  // namespace fm
