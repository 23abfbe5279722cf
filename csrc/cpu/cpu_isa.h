// The widest instruction set this CPU runs, for the kernels built once per instruction set
// (baseline x86-64, AVX2+FMA, AVX-512; for the bf16 fused recurrence AVX-512 with AVX512_BF16, and
// with AMX tiles where the CPU has them and Linux grants their state) and chosen at run time.
// FUSED_RNN_CPU_ISA=default|avx2|avx512|avx512_bf16|amx_bf16 caps it (tests use it to run every
// variant on one machine).
#pragma once

#include <cstdlib>
#include <string>
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// The bf16 build (fused_cpu_avx512bf16.cpp) needs GCC's AVX512_BF16 and AMX intrinsics and target
// pragmas: GCC 11 or later (not clang, which lacks `#pragma GCC target`). Without it bf16 layers take
// the AVX-512 build, as on a CPU without AVX512_BF16.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FR_HAVE_BF16_BUILD 1
#endif

namespace fused_rnn {
namespace cpu {

enum class Isa { Default, Avx2, Avx512, Avx512Bf16, AmxBf16 };  // each includes the ones before

// Asks Linux for this process's AMX tile state (ARCH_REQ_XCOMP_PERM for XTILEDATA): without it the
// first tile instruction raises SIGILL. Granted once per process, to all its threads.
inline bool amx_permitted() {
#if defined(__x86_64__) && defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

inline Isa best_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("FUSED_RNN_CPU_ISA");
    const std::string want = env ? env : "";
    const Isa cap = want == "default" ? Isa::Default : want == "avx2" ? Isa::Avx2 : want == "avx512" ? Isa::Avx512
                    : want == "avx512_bf16" ? Isa::Avx512Bf16 : Isa::AmxBf16;
    Isa have = Isa::Default;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) have = Isa::Avx2;
    if (__builtin_cpu_supports("avx512f")) have = Isa::Avx512;
#endif
#ifdef FR_HAVE_BF16_BUILD
    if (have == Isa::Avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))  // (every such CPU has them)
      have = Isa::Avx512Bf16;
    if (have == Isa::Avx512Bf16 && cap == Isa::AmxBf16 && __builtin_cpu_supports("amx-tile") &&
        __builtin_cpu_supports("amx-bf16") && amx_permitted())
      have = Isa::AmxBf16;
#endif
    return have < cap ? have : cap;
  }();
  return isa;
}

// Whether this is an AMD CPU: torch's fp32 GEMMs (MKL) run slower there than the fused loop's own
// microkernel (cpu_routes.h project_inside). Asked once per process, as best_isa().
inline bool cpu_is_amd() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

// Defines `void fn(const P& p)` calling isa_avx512::fn, isa_avx2::fn or isa_default::fn (each
// declared by the includer) by best_isa(); AVX512_BF16 and AMX take the AVX-512 build.
#if defined(__x86_64__) && defined(__GNUC__)
#define FR_DEFINE_ISA_DISPATCH(fn, P)             \
  void fn(const P& p) {                           \
    switch (best_isa()) {                         \
      case Isa::AmxBf16:                          \
      case Isa::Avx512Bf16:                       \
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
