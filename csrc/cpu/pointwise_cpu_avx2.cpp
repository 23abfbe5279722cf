// CPU kernels (pointwise and fused recurrence) built for AVX2 (chosen at run time by pointwise_cpu.cpp).
// Every header with code shared beyond this file is included BEFORE the target pragma, so only
// this file's own functions (in namespace isa_avx2) use the wider instructions.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../recurrence_params.h"
#include "packed_weight_cache.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define FR_ISA_NS isa_avx2
#define FR_VEC_BYTES 32
#include "pointwise_cpu_kernels.h"
#include "fused_cpu_kernels.h"
#endif
