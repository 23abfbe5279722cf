// The emulator's own CUDA vector and half-precision types, for machines without the CUDA toolkit's headers
// (cuda_emu.h prefers the toolkit's host-compilable cuda_fp16.h / cuda_bf16.h; -DFR_EMU_OWN_HALF forces these).
// Conversions round to nearest even, as __float2half_rn / __float2bfloat16_rn do.
#pragma once

#include <cstdint>
#include <cstring>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu, out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);                // inf / nan
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);         // normal: rebias 15 -> 127
  } else if (man == 0) {
    out = sign;                                             // zero
  } else {                                                  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    out = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  if (abs >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {                                   // result subnormal (or zero)
    const int shift = 126 - static_cast<int>(abs >> 23);     // 14..
    if (shift > 24) return __half{sign};
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    uint32_t h = man >> (shift);
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return __half{static_cast<uint16_t>(sign | h)};
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);                  // rebias 127 -> 15, drop 13 mantissa bits
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t x = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(x >> 16)};
}
