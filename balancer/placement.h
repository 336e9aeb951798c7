// The placement plan of one MoE layer for one micro-step: where every expert's tokens are
// computed (see ../shared/design/DESIGN.md, "Expert parallelism and the balancer").
//
// World of W ranks, E logical experts, E % W == 0. Expert e's home is rank e / (E / W), which
// owns its weights, gradient and optimizer state. Each rank also has S replica slots; a slot
// holds a copy of some expert's current weights for this micro-step (or nothing). An instance
// of expert e is its home or a slot holding e.
//
// The plan says (a) what each slot holds and (b) for each (expert e, source rank r), how the
// load[e][r] tokens of r routed to e are split over e's instances. The MoE layer sends the
// first split[e][r][0].tokens of r's assignments to e (in r's permuted order, which is
// deterministic) to the first share's instance, the next ones to the second, and so on.
//
// The trivial plan (every token to its expert's home, empty slots) is static expert
// parallelism; the planners of the balancer issue produce the others.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fm {

// An instance of an expert: rank `rank`'s home experts (slot == kHomeSlot) or its replica
// slot `slot`.
struct ExpertInstance {
  static constexpr int32_t kHomeSlot = -1;
  int32_t rank = 0;
  int32_t slot = kHomeSlot;
  bool is_home() const { return slot == kHomeSlot; }
  bool operator==(const ExpertInstance&) const = default;
};

// Tokens of one (expert, source rank) pair sent to one instance.
struct TokenShare {
  ExpertInstance instance;
  int64_t tokens = 0;
};

struct LayerPlacement {
  int32_t world_size = 1, n_experts = 0, replica_slots = 0;
  // slots[r][s]: the expert in rank r's replica slot s, or -1 when the slot is empty.
  std::vector<std::vector<int32_t>> slots;
  // split[e][r]: how the tokens of source rank r routed to expert e are spread over e's
  // instances, in dispatch order. Shares with 0 tokens are allowed (and skipped).
  std::vector<std::vector<std::vector<TokenShare>>> split;

  int32_t experts_per_rank() const { return n_experts / world_size; }
  int32_t home_rank(int32_t expert) const { return expert / experts_per_rank(); }
  // Tokens of source rank r routed to expert e under this plan (sum of its shares).
  int64_t tokens(int32_t expert, int32_t source) const;
};

// load[e][r] = tokens of source rank r routed to expert e.
using LoadMatrix = std::vector<std::vector<int64_t>>;

// Static expert parallelism: everything to the home expert, `replica_slots` empty slots.
LayerPlacement trivial_placement(const LoadMatrix& load, int32_t world_size,
                                 int32_t replica_slots = 0);

// Throws std::invalid_argument naming the first problem: E not divisible by W, shape mismatches, a
// slot holding an expert id out of range, a share sent to a rank or slot that does not exist or to
// a slot that does not hold that expert, negative token counts, or shares of (e, r) not
// adding up to load[e][r]. `what` prefixes the message (e.g. "layer 3, micro-step 7").
void validate_placement(const LayerPlacement& plan, const LoadMatrix& load,
                        const std::string& what = "placement");

}  // namespace fm
