#include "transfer/path_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace fm {

namespace {

enum Resource : int32_t { kNvlinkOut = 0, kNvlinkIn, kNicOut, kNicIn, kH2d, kResourceKinds };

void check_bw(double bw, const char* key) {
  if (!(bw > 0) || !std::isfinite(bw))
    throw std::invalid_argument(
        fmt::format("link model: {} must be a positive finite bandwidth (got {})", key, bw));
}

}  // namespace

const char* path_name(TransferPath path) {
  return path == TransferPath::direct ? "direct" : "cpu";
}

const char* policy_name(PathPolicy policy) {
  switch (policy) {
    case PathPolicy::split:
      return "split";
    case PathPolicy::direct_only:
      return "direct_only";
    case PathPolicy::cpu_only:
      return "cpu_only";
  }
  return "?";
}

void LinkModel::validate(int32_t world_size) const {
  if (world_size < 1)
    throw std::invalid_argument(
        fmt::format("link model: world_size must be >= 1 (got {})", world_size));
  if (ranks_per_node < 1 || world_size % ranks_per_node != 0)
    throw std::invalid_argument(
        fmt::format("link model: ranks_per_node ({}) must be >= 1 and divide the world size ({})",
                    ranks_per_node, world_size));
  check_bw(intra_node_bw, "intra_node_bw");
  check_bw(inter_node_bw, "inter_node_bw");
  check_bw(h2d_bw, "h2d_bw");
  if (!(latency_s >= 0) || !std::isfinite(latency_s))
    throw std::invalid_argument(
        fmt::format("link model: latency_s must be >= 0 and finite (got {})", latency_s));
}

double LinkModel::seconds(TransferPath path, int32_t src, int32_t dst, int64_t bytes) const {
  double bw = h2d_bw;
  if (path == TransferPath::direct)
    bw = node_of(src) == node_of(dst) ? intra_node_bw : inter_node_bw;
  return latency_s + static_cast<double>(bytes) / bw;
}

PathLoad::PathLoad(const LinkModel& model, int32_t world_size) : model_(model), world_(world_size) {
  model.validate(world_size);
  free_at_.assign(static_cast<size_t>(kResourceKinds) * world_size, 0.0);
}

std::vector<int32_t> PathLoad::resources(TransferPath path, const Move& m) const {
  if (m.src < 0 || m.src >= world_ || m.dst < 0 || m.dst >= world_)
    throw std::invalid_argument(
        fmt::format("path load: move of expert {} from rank {} to rank {} is outside the {} ranks",
                    m.expert, m.src, m.dst, world_));
  if (path == TransferPath::cpu) return {kH2d * world_ + m.dst};
  if (model_.node_of(m.src) == model_.node_of(m.dst))
    return {kNvlinkOut * world_ + m.src, kNvlinkIn * world_ + m.dst};
  return {kNicOut * world_ + m.src, kNicIn * world_ + m.dst};
}

PathChoice PathLoad::choose(const Move& move, double ready, PathPolicy policy) const {
  PathChoice best;
  bool have = false;
  // CPU first: on a tie it stays chosen (it leaves the fabric to the all-to-all).
  for (TransferPath path : {TransferPath::cpu, TransferPath::direct}) {
    if (policy == PathPolicy::direct_only && path == TransferPath::cpu) continue;
    if (policy == PathPolicy::cpu_only && path == TransferPath::direct) continue;
    double start = ready;
    for (int32_t r : resources(path, move)) start = std::max(start, free_at_[r]);
    const double finish = start + model_.seconds(path, move.src, move.dst, move.bytes);
    if (!have || finish < best.finish) best = {path, start, finish};
    have = true;
  }
  return best;
}

PathChoice PathLoad::assign(const Move& move, double ready, PathPolicy policy) {
  const PathChoice c = choose(move, ready, policy);
  for (int32_t r : resources(c.path, move)) free_at_[r] = c.finish;
  return c;
}

std::vector<Move> slot_moves(const SlotTable& slots, int32_t n_experts, int64_t expert_bytes,
                             const SlotTable* resident, int64_t* reused) {
  const auto W = static_cast<int32_t>(slots.size());
  if (W < 1 || n_experts < 1 || n_experts % W != 0)
    throw std::invalid_argument(fmt::format(
        "slot moves: {} experts over {} ranks (the expert count must be a positive multiple of "
        "the rank count)",
        n_experts, W));
  if (resident && resident->size() != slots.size())
    throw std::invalid_argument(fmt::format(
        "slot moves: resident slots are for {} ranks, the plan for {}", resident->size(), W));
  const int32_t per_rank = n_experts / W;
  std::vector<Move> moves;
  for (int32_t r = 0; r < W; ++r) {
    if (slots[r].size() != slots[0].size())
      throw std::invalid_argument(fmt::format("slot moves: rank {} has {} slots, rank 0 has {}", r,
                                              slots[r].size(), slots[0].size()));
    for (size_t s = 0; s < slots[r].size(); ++s) {
      const int32_t e = slots[r][s];
      if (e < -1 || e >= n_experts)
        throw std::invalid_argument(fmt::format(
            "slot moves: rank {} slot {} holds expert {}, not in [-1, {})", r, s, e, n_experts));
      if (e < 0) continue;
      const bool same = resident && s < (*resident)[r].size() && (*resident)[r][s] == e;
      if (same) {
        if (reused) ++*reused;
        continue;
      }
      moves.push_back({e, e / per_rank, r, static_cast<int32_t>(s), expert_bytes});
    }
  }
  return moves;
}

}  // namespace fm
