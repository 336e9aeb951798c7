#include "balancer/topology.h"

#include <fmt/format.h>

#include <stdexcept>

namespace fm {

void validate_topology(const Topology& t) {
  if (t.nodes < 1)
    throw std::invalid_argument(fmt::format("topology: nodes must be >= 1 (got {})", t.nodes));
  if (t.gpus_per_node < 1)
    throw std::invalid_argument(
        fmt::format("topology: gpus_per_node must be >= 1 (got {})", t.gpus_per_node));
}

}  // namespace fm
