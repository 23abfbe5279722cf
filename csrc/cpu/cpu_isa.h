// The widest instruction set this CPU runs, for the kernels built once per instruction set
// (baseline x86-64, AVX2+FMA, AVX-512) and chosen at run time. FUSED_RNN_CPU_ISA=default|avx2|avx512
// caps it (tests use it to run every variant on one machine).
#pragma once

#include <cstdlib>
#include <string>

namespace fused_rnn {
namespace cpu {

enum class Isa { Default, Avx2, Avx512 };

inline Isa best_isa() {
  static const Isa isa = [] {
    const char* cap = std::getenv("FUSED_RNN_CPU_ISA");
    const std::string want = cap ? cap : "";
    if (want == "default") return Isa::Default;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (want == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::Avx2 : Isa::Default;
    if (__builtin_cpu_supports("avx512f")) return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
    return Isa::Default;
  }();
  return isa;
}

// Defines `void fn(const P& p)` calling isa_avx512::fn, isa_avx2::fn or isa_default::fn (each
// declared by the includer) by best_isa().
#if defined(__x86_64__) && defined(__GNUC__)
#define FR_DEFINE_ISA_DISPATCH(fn, P)             \
  void fn(const P& p) {                           \
    switch (best_isa()) {                         \
      case Isa::Avx512: return isa_avx512::fn(p); \
      case Isa::Avx2: return isa_avx2::fn(p);     \
      default: return isa_default::fn(p);         \
    }                                             \
  }
#else
#define FR_DEFINE_ISA_DISPATCH(fn, P) \
  void fn(const P& p) { isa_default::fn(p); }
#endif

}  // namespace cpu
}  // namespace fused_rnn
