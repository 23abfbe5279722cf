// The fused recurrence (fused_cpu_kernels.h) built for AVX-512 with AVX512_BF16, chosen at run time
// by pointwise_cpu.cpp for bf16 layers where the CPU has it: its GEMMs multiply the bf16 operands
// in pairs with fp32 sums (Bf16PairDot) instead of converting them to fp32 for FMAs, and the
// forward's recurrent GEMM runs on AMX tiles where the CPU has them (amx_gemm_block). The other
// dtypes and the per-step kernels take the AVX-512 build. Every header with code shared beyond this
// file is included BEFORE the target pragma, so only this file's own functions (in namespace
// isa_avx512bf16) use these instructions.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#include "../recurrence_params.h"
#include "cpu_isa.h"
#include "packed_weight_cache.h"

#ifdef FR_HAVE_BF16_BUILD  // (cpu_isa.h: GCC >= 11 on x86-64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,amx-tile,amx-bf16")
#define FR_ISA_NS isa_avx512bf16
#define FR_VEC_BYTES 64
#define FR_BF16_DOT 1
#define FR_AMX 1
#include "pointwise_cpu_kernels.h"
#include "fused_cpu_kernels.h"
#endif
