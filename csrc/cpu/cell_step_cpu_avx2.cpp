// Cell-step CPU kernels built for AVX2 (chosen at run time by cell_step_cpu.cpp).
// Every header with code shared beyond this file is included BEFORE the target pragma, so only
// this file's own functions (in namespace isa_avx2) use the wider instructions.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../cell_step_params.h"
#include "cell_step_bias.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define FR_ISA_NS isa_avx2
#define FR_CELL_VEC_BYTES 32
#include "cell_step_cpu_kernels.h"
#endif
