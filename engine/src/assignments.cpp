#include "engine/assignments.h"

#include "engine/error.h"

namespace fm {

AssignmentOrder sort_assignments_host(const std::vector<int32_t>& key, int64_t n_keys, int64_t K,
                                      const char* what) {
  const int64_t NK = static_cast<int64_t>(key.size());
  FM_CHECK(K > 0 && NK % K == 0, "{}: {} assignments are not a whole number of tokens of {}", what,
           NK, K);
  AssignmentOrder o;
  o.offsets.assign(static_cast<size_t>(n_keys + 1), 0);
  for (int64_t j = 0; j < NK; ++j) {
    FM_CHECK(key[j] >= 0 && key[j] < n_keys, "{}: key[{}] = {} is out of range [0, {})", what, j,
             key[j], n_keys);
    ++o.offsets[static_cast<size_t>(key[j]) + 1];
  }
  for (int64_t g = 0; g < n_keys; ++g) o.offsets[g + 1] += o.offsets[g];
  std::vector<int64_t> cursor(o.offsets.begin(), o.offsets.end() - 1);
  o.assign.resize(static_cast<size_t>(NK));
  o.token.resize(static_cast<size_t>(NK));
  for (int64_t j = 0; j < NK; ++j) {
    const int64_t m = cursor[key[j]]++;
    o.assign[m] = static_cast<int32_t>(j);
    o.token[m] = static_cast<int32_t>(j / K);
  }
  return o;
}

}  // namespace fm
