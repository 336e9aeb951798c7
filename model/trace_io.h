// Routing-trace files: a RoutingTrace plus what produced it, as safetensors so
// that Python reads them with nothing but the standard library (see
// tools/read_trace.py).
//
// Tensors:
//   routes              U8 when n_experts <= 256, else U16   [tokens, n_moe_layers, top_k]
//                       logical expert ids, token-major (RoutingTrace::ids)
//   seq_offsets         I64 [S + 1]: sequence s is tokens [seq_offsets[s], seq_offsets[s+1])
//   micro_step_offsets  I64 [M], optional: the sequence index where each micro-step begins
//                       (0 first, strictly increasing, < S), when the writer knows them
// Metadata: __metadata__["foremoe_trace"] is a JSON object (as a string):
//   {"format": "foremoe-trace", "format_version": 1, "model": "<name>",
//    "n_layers": 48, "first_k_dense": 0, "n_moe_layers": 48, "n_experts": 128, "top_k": 8,
//    "vocab_size": 151936 | null, "hidden": 2048 | null, "source": <any JSON>}
// n_moe_layers == n_layers - first_k_dense, and the dimensions must match the tensors.
//
// load_trace validates everything (tensors present, dtypes, shapes against the
// metadata, offsets, every id < n_experts) and throws fm::Error naming the
// file, the tensor or key and the problem.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "balancer/routing_trace.h"
#include "model/config.h"

namespace fm {

inline constexpr int kTraceFormatVersion = 1;

struct TraceMetadata {
  std::string model;          // model name; "" when unknown
  int64_t n_layers = 0;       // all transformer layers
  int64_t first_k_dense = 0;  // leading dense layers; n_moe_layers = n_layers - first_k_dense
  int64_t vocab_size = 0;     // 0 = unknown (null in the file)
  int64_t hidden = 0;         // 0 = unknown (null in the file)
  nlohmann::json source = nlohmann::json::object();  // free-form: task, checkpoint, step, ...
  std::vector<int64_t> micro_step_offsets;           // sequence index where each micro-step
                                                     // begins; empty = unknown
  bool operator==(const TraceMetadata&) const = default;
};

// Model name and dimensions taken from a model config.
TraceMetadata trace_metadata(const ModelConfig& config,
                             nlohmann::json source = nlohmann::json::object());

// Writes atomically (temp file + rename). Throws fm::Error naming `path` when the trace
// is invalid or disagrees with the metadata (n_layers - first_k_dense != n_moe_layers).
void save_trace(const std::string& path, const RoutingTrace& trace, const TraceMetadata& meta);

// Reads and validates; fills *meta when given.
RoutingTrace load_trace(const std::string& path, TraceMetadata* meta = nullptr);

}  // namespace fm
