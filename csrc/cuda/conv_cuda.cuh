// Loads and stores of the GPU's 16-bit storage types in fp32: the CUDA specialisations of
// recurrence_step.h's Conv<S>, shared by every kernel header (CUDA or emulator headers, no torch).
#pragma once

#include "compat.cuh"

#include "../recurrence_step.h"

namespace fused_rnn {

template <> struct Conv<__half> {
  FR_HD static float load(__half x) { return __half2float(x); }
  FR_HD static __half store(float x) { return __float2half_rn(x); }
};
template <> struct Conv<__nv_bfloat16> {
  FR_HD static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  FR_HD static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

}  // namespace fused_rnn
