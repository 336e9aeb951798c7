// The expert permutation of a routed batch: the N*K assignments (token n's k-th expert,
// numbered j = n*K + k) grouped by expert, stably (ascending j within an expert). The
// MoE layer gathers its expert input rows in this order so each expert's rows are one
// contiguous group of the grouped GEMMs. Host form here; Backend::sort_assignments makes
// the same permutation where the ids live (on the device, without a host round trip).
#pragma once

#include <cstdint>
#include <vector>

namespace fm {

struct AssignmentOrder {
  std::vector<int64_t> offsets;  // [n_keys + 1]: group g is positions [offsets[g], offsets[g+1])
  std::vector<int32_t> assign;   // [N*K]: the assignment j at each position
  std::vector<int32_t> token;    // [N*K]: its token, assign / K
};

// Stable counting sort of key (N*K entries, K per token) by key; throws, naming `what`,
// for an entry outside [0, n_keys) or a size that is not a multiple of K.
AssignmentOrder sort_assignments_host(const std::vector<int32_t>& key, int64_t n_keys, int64_t K,
                                      const char* what);

}  // namespace fm
