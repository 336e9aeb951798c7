// The safetensors format: an 8-byte little-endian header length N, N bytes of
// JSON ({"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
// ..., "__metadata__": {str: str}}), then the data buffer, offsets relative to
// its start. Used for checkpoints, Hugging Face imports and routing traces.
//
// Reading validates the whole header on open() (sizes, dtypes, offsets,
// overlaps) and reads tensor bytes lazily with pread, so a multi-GB tensor
// exists once in memory. Every error names the file and the tensor/offset.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace fm {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data buffer
};

class SafetensorsFile {
 public:
  // Reads and validates the header; keeps the path and opens the file again for each load.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // file order (by data offset)
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;  // "<path>: no tensor named 'x'"
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }  // file order

  // A new owning CPU tensor holding the data.
  Tensor load(const std::string& name) const;
  // Reads into an existing CPU tensor whose dtype and shape must match exactly.
  void load_into(const std::string& name, Tensor& dst) const;

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t data_start() const { return data_start_; }  // absolute file offset of the data buffer

 private:
  SafetensorsFile() = default;

  std::string path_;
  uint64_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;  // name -> position in entries_
  std::map<std::string, std::string> metadata_;
};

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// Writes CPU tensors atomically (temp file + fsync + rename; see files.h). Names must be
// unique and non-empty. The data buffer starts 8-byte aligned (header padded with spaces)
// and tensors are laid out contiguously, largest element size first (stable), so every
// tensor is aligned to its element size.
// The bytes before the data buffer for a JSON header: its 8-byte little-endian length,
// then the header space-padded so the data starts 8-byte aligned. For writers that
// stream tensor data themselves (write_safetensors uses it too).
std::string safetensors_prefix(std::string header_json);

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace fm
