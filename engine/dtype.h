// Element types and devices, with the conversions used by file I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace fm {

// f64 exists for the CPU reference checks (finite differences); model code
// computes in f32 on the CPU and bf16/f32 on CUDA.
enum class DType : uint8_t { f32, f64, bf16, f16, i32, i64, u8, u16 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // "f32", ...
// safetensors spellings: "F32", "F64", "BF16", "F16", "I32", "I64", "U8", "U16".
const char* dtype_safetensors_name(DType t);
// Returns false when `name` is not a safetensors dtype this engine reads.
bool dtype_from_safetensors_name(std::string_view name, DType* out);
bool dtype_is_float(DType t);

enum class DeviceKind : uint8_t { cpu, cuda };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;
  static Device cpu() { return {DeviceKind::cpu, 0}; }
  static Device cuda(int i = 0) { return {DeviceKind::cuda, i}; }
  bool operator==(const Device&) const = default;
};
std::string device_name(Device d);

// bf16: the top 16 bits of an IEEE f32, rounded to nearest even.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// dst[i] = f32_to_bf16(src[i]) for i in [0, n): the same bits, written so that the compiler
// vectorises it (host conversions of whole weight arenas and expert rows).
void f32_to_bf16_n(uint16_t* dst, const float* src, int64_t n);
uint16_t f32_to_f16(float f);  // IEEE half, round to nearest even
float f16_to_f32(uint16_t h);

}  // namespace fm
