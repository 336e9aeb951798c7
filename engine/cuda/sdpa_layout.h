// The host side of cuDNN's ragged ("THD") attention layout (cudnn_sdpa.h), kept free of CUDA
// headers so CPU-only builds test it: from the packed batch's sequence offsets, the non-empty
// sequences' lengths, their ragged offsets in elements, and the plan's length bound.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

namespace fm::cuda {

// The S bound of a plan: the longest sequence rounded up to a power of two, at least 64, so
// one plan serves every batch of the same sequence count whose longest sequence rounds alike.
inline int64_t sdpa_length_bound(int64_t longest) {
  const auto bound = static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(longest)));
  return bound < 64 ? 64 : bound;
}

struct SdpaLayout {
  int64_t batch = 0;             // B: the non-empty sequences (an empty one holds no rows)
  int64_t max_len = 0;           // S: sdpa_length_bound of the longest
  std::vector<int32_t> seq_len;  // [B]
  // Entries per offsets segment: B + 1 rounded up to even, so every segment of the one
  // buffer starts 16-byte aligned, as cuDNN's descriptors of them declare.
  int64_t segment = 0;
  // [qo | kv | stats], `segment` entries each (zeros past B + 1): each kept sequence's first
  // row (then the total) times Hq * D (q, out, dout, dq), Hkv * D (k, v, dk, dv) and Hq (lse).
  std::vector<int64_t> offsets;
};

// seq_off: 0 = seq_off[0] <= ... <= seq_off[S] = N, already checked.
inline SdpaLayout sdpa_layout(const std::vector<int32_t>& seq_off, int64_t hq, int64_t hkv,
                              int64_t dim) {
  SdpaLayout l;
  std::vector<int64_t> start;
  for (size_t i = 0; i + 1 < seq_off.size(); ++i)
    if (seq_off[i + 1] > seq_off[i]) {
      l.seq_len.push_back(seq_off[i + 1] - seq_off[i]);
      start.push_back(seq_off[i]);
    }
  l.batch = static_cast<int64_t>(start.size());
  if (l.batch == 0) return l;
  l.max_len = sdpa_length_bound(*std::max_element(l.seq_len.begin(), l.seq_len.end()));
  start.push_back(seq_off.back());
  l.segment = (l.batch + 2) / 2 * 2;
  l.offsets.assign(static_cast<size_t>(3 * l.segment), 0);
  int64_t* seg = l.offsets.data();
  for (const int64_t per_row : {hq * dim, hkv * dim, hq}) {
    for (size_t i = 0; i < start.size(); ++i) seg[i] = start[i] * per_row;
    seg += l.segment;
  }
  return l;
}

}  // namespace fm::cuda
