// The cluster shape the balancer plans for: W ranks = N nodes x G GPUs per node, one rank per
// GPU, rank r on node r / G (ranks of a node are consecutive, as torchrun and Slurm number them).
// Traffic between GPUs of one node rides NVLink; traffic between nodes rides the NICs, which
// is why the planners (balancer/planner.h) keep tokens and weights inside a node when they can.
#pragma once

#include <cstdint>

namespace fm {

struct Topology {
  int32_t nodes = 1;
  int32_t gpus_per_node = 1;

  int32_t world_size() const { return nodes * gpus_per_node; }
  int32_t node_of(int32_t rank) const { return rank / gpus_per_node; }
  bool operator==(const Topology&) const = default;
};

// Throws std::invalid_argument naming the field when nodes < 1 or gpus_per_node < 1.
void validate_topology(const Topology& topology);

}  // namespace fm
