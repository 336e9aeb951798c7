// SHA-256 digests (lower-case hex) for checkpoint manifests and downloads.
#pragma once

#include <cstddef>
#include <string>

namespace fm {

std::string sha256_hex(const void* data, size_t n);
// Streams the file in chunks; throws fm::Error naming the file when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace fm
