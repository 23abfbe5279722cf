// How a v2 plan (persistent_plan.h) becomes a launch of persistent_v2_kernels.cuh: the kernel instance of
// (cell, dtype, tiling), the grid, the shared memory, the parameters with the plan's workspace. One
// function for two runtimes: persistent.cu passes a `launch` that calls cudaLaunchCooperativeKernel,
// the emulated driver (tests/emu/kernels_persistent.cpp) one that calls fr_emu::launch — so the tests
// run the launcher's own code from the plan to the kernel. No runtime calls here.
#pragma once

#include <type_traits>

#include "persistent_plan.h"
#include "persistent_v2_kernels.cuh"

namespace fused_rnn {
namespace cuda {

// The launch's workspace, laid out as PersistentV2Plan says; `flags` must be zero when the kernel starts.
struct V2Workspace {
  void* h_buf = nullptr;
  unsigned* flags = nullptr;
  float* partials = nullptr;  // backward only
};

// The workspace's pointers in one allocation of v2_workspace_offsets(plan, backward).total bytes at `base`.
inline V2Workspace v2_workspace_at(const PersistentV2Plan& plan, bool backward, void* base) {
  const V2WorkspaceOffsets o = v2_workspace_offsets(plan, backward);
  unsigned char* bytes = static_cast<unsigned char*>(base);
  V2Workspace ws;
  ws.h_buf = bytes + o.h_buf;
  ws.flags = reinterpret_cast<unsigned*>(bytes + o.flags);
  ws.partials = backward ? reinterpret_cast<float*>(bytes + o.partials) : nullptr;
  return ws;
}

// FR_V2_INSTANCES (a define, default all): the (cell, dtype) instances compiled, bit cell * 4 + dtype
// in the numbering of recurrence_params.h, as tests/emu/kernels_io.h's FR_INSTANCES: the emulated
// sanitizer builds compile only the kernels their tests run.
#ifndef FR_V2_INSTANCES
#define FR_V2_INSTANCES 0xFFFF
#endif

// Calls f(cell, storage, tiling, math) with the cell, the tiling index and the math as
// std::integral_constant and a value of the storage type (bf16, fp16 or float): the one (cell, dtype,
// math, tiling) switch of the launcher and of the emulated driver. Only the instances the plan may choose
// (v2_tiling_for: bf16/fp16 with Mma16, fp32 with Tf32 or Tf32x3, within the register budget) exist;
// the others call nothing.
template <typename F> void dispatch_v2(Cell cell, DType dtype, V2Math math, int tiling, F&& f) {
  auto with_tiling = [&](auto c, auto s, auto m) {
    constexpr DType d = std::is_same<decltype(s), __half>::value          ? DType::Float16
                        : std::is_same<decltype(s), __nv_bfloat16>::value ? DType::BFloat16
                                                                          : DType::Float32;
    constexpr V2Math M = decltype(m)::value;
    auto instance = [&](auto i) {
      if constexpr (v2_tiling_for(decltype(i)::value, M)) f(c, s, i, m);
    };
    if constexpr ((FR_V2_INSTANCES) >> (int(decltype(c)::value) * 4 + int(d)) & 1) {
      switch (tiling) {
        case 0: instance(std::integral_constant<int, 0>{}); break;
        case 1: instance(std::integral_constant<int, 1>{}); break;
        case 2: instance(std::integral_constant<int, 2>{}); break;
        case 3: instance(std::integral_constant<int, 3>{}); break;
        case 4: instance(std::integral_constant<int, 4>{}); break;
        case 5: instance(std::integral_constant<int, 5>{}); break;
        default: break;
      }
    }
  };
  static_assert(kV2TilingCount == 6, "dispatch_v2: one case per tiling of kV2Tilings");
  using Mma16 = std::integral_constant<V2Math, V2Math::Mma16>;
  using Tf32 = std::integral_constant<V2Math, V2Math::Tf32>;
  using Tf32x3 = std::integral_constant<V2Math, V2Math::Tf32x3>;
  dispatch_cell(cell, [&](auto c) {
    if (dtype == DType::BFloat16 && math == V2Math::Mma16) with_tiling(c, __nv_bfloat16{}, Mma16{});
    if (dtype == DType::Float16 && math == V2Math::Mma16) with_tiling(c, __half{}, Mma16{});
    if (dtype == DType::Float32 && math == V2Math::Tf32) with_tiling(c, float{}, Tf32{});
    if (dtype == DType::Float32 && math == V2Math::Tf32x3) with_tiling(c, float{}, Tf32x3{});
  });
}

// The forward and backward kernel instances of tiling I and math M.
template <Cell C, typename S, int I, V2Math M> struct V2Kernels {
  static constexpr V2Tiling t = kV2Tilings[I];
  static constexpr auto forward = persistent_v2_forward_kernel<C, S, t.mt, t.kt, t.nt, M>;
  static constexpr auto backward = persistent_v2_backward_kernel<C, S, t.mt, t.kt, t.nt, M>;
};

// launch(kernel, grid, dynamic smem bytes, params, layout): one cooperative launch of kV2Threads per CTA.
template <typename Launch>
void launch_v2_forward(const PersistentForwardParams& p, const PersistentV2Plan& plan, const V2Workspace& ws,
                       Launch&& launch) {
  const PersistentV2Layout lay{plan.units, plan.k_tiles, ws.flags, nullptr, ws.h_buf};
  dispatch_v2(p.cell, p.dtype, plan.math, plan.tiling, [&](auto c, auto s, auto i, auto m) {
    launch(V2Kernels<decltype(c)::value, decltype(s), decltype(i)::value, decltype(m)::value>::forward,
           dim3(unsigned(plan.grid_x), unsigned(plan.grid_y), 1), plan.smem_forward, p, lay);
  });
}

template <typename Launch>
void launch_v2_backward(const PersistentBackwardParams& p, const PersistentV2Plan& plan, const V2Workspace& ws,
                        Launch&& launch) {
  const PersistentV2Layout lay{plan.units, plan.k_tiles, ws.flags, ws.partials, nullptr};
  dispatch_v2(p.cell, p.dtype, plan.math, plan.tiling, [&](auto c, auto s, auto i, auto m) {
    launch(V2Kernels<decltype(c)::value, decltype(s), decltype(i)::value, decltype(m)::value>::backward,
           dim3(unsigned(plan.grid_x), unsigned(plan.grid_y), 1), plan.smem_backward, p, lay);
  });
}

}  // namespace cuda
}  // namespace fused_rnn
