// The layout of a persistent launch as a pure function of the layer and of a few device numbers, so
// that the launcher (persistent.cu) runs it with the real device's attributes and occupancy, and the
// emulated tests (tests/test_cuda_emulated.py) run the very same function for fake devices: 132 SMs
// (H100/H200), 108 (A100), and small ones whose grids do not fit, which sends the layer to the per-step
// kernels. Plain C++: no CUDA headers, no torch.
//
// Which kernels run a layer (csrc/recurrence.cpp asks persistent.cu's persistent_plan, which runs
// plan_persistent_v2 below with the device's numbers):
//   - the persistent kernels (persistent_v2_kernels.cuh: tensor cores, w_hh in registers, per-step
//     flags) — bf16/fp16 (m16n8k16) and fp32 (TF32 m16n8k8, or 3xTF32 when torch's TF32 flag is off)
//     without a projection on sm_80+, where plan_persistent_v2 finds a compiled tiling whose A fragments
//     fit the register budget and whose grid is co-resident (the choice depends on the batch size B);
//   - else the per-step kernels, for the reason the plan's verdict gives (float64, a projection, fp32
//     above H=512, a grid that does not fit the device, ...).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../recurrence_params.h"

namespace fused_rnn {

// What the plan needs to know about a device (cudaDeviceGetAttribute).
struct PersistentDevice {
  int sm_count = 0;                 // cudaDevAttrMultiProcessorCount
  bool cooperative_launch = false;  // cudaDevAttrCooperativeLaunch
  size_t smem_optin = 0;            // cudaDevAttrMaxSharedMemoryPerBlockOptin: the most one block may use
  int compute_capability = 0;       // 10 * major + minor (cudaDevAttrComputeCapabilityMajor/Minor)
};

// Why a layer does or does not run persistently. Everything but Persistent means "per-step kernels".
enum class PlanVerdict {
  Persistent,
  Float64,              // the persistent kernels accumulate in fp32 only
  EmptyLayer,           // H <= 0
  NoCooperativeLaunch,  // the device cannot guarantee co-resident CTAs (the flag waits need them)
  SliceTooLarge,        // a CTA's shared memory exceeds the device's per-block opt-in limit
  NotCoResident,        // the grid would not fit on the device at once
  QueryFailed,          // a CUDA attribute or occupancy query returned an error
  RegisterBudget,       // the tilings that cover H hold more A-fragment registers than kV2MaxARegisters
  Projection,           // proj_size > 0: the kernels keep no projection
  OldArchitecture,      // mma.sync bf16 needs sm_80 or newer
  HiddenTooLarge,       // no compiled tiling covers ceil(H/16) k-tiles with its 8 warps
};

inline const char* verdict_name(PlanVerdict v) {
  switch (v) {
    case PlanVerdict::Persistent: return "persistent";
    case PlanVerdict::Float64: return "float64";
    case PlanVerdict::EmptyLayer: return "empty-layer";
    case PlanVerdict::NoCooperativeLaunch: return "no-cooperative-launch";
    case PlanVerdict::SliceTooLarge: return "slice-too-large";
    case PlanVerdict::NotCoResident: return "not-co-resident";
    case PlanVerdict::QueryFailed: return "query-failed";
    case PlanVerdict::RegisterBudget: return "register-budget";
    case PlanVerdict::Projection: return "projection";
    case PlanVerdict::OldArchitecture: return "old-architecture";
    case PlanVerdict::HiddenTooLarge: return "hidden-too-large";
  }
  return "?";
}

inline size_t storage_bytes(DType d) { return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2; }

// ---- v2 (persistent_v2_kernels.cuh) --------------------------------------------------------------------
// Threads per CTA of the v2 kernels (8 warps that split K) and what one CTA computes: MT m-tiles of 16
// w_hh rows (its units' G gate rows, zero-padded), KT k-tiles of 16 per warp (8*KT >= ceil(H/16)),
// NT n-tiles of 8 batch rows.
constexpr int kV2Threads = 256;
constexpr int kV2Warps = kV2Threads / 32;

// The arithmetic of the MMAs, by storage type: bf16/fp16 run mma.m16n8k16 (Mma16); fp32 runs
// mma.m16n8k8 on tf32 operands, once (Tf32: torch's TF32 flag on, ~1e-4 relative error) or three times
// on a big + small split of each operand (Tf32x3: the flag off, fp32-level error; the measurement and
// the choice over FFMA: benchmarks/PERSISTENT_V2.md, shape 3).
enum class V2Math : int { Mma16 = 0, Tf32 = 1, Tf32x3 = 2 };
inline const char* v2_math_name(V2Math m) {
  return m == V2Math::Mma16 ? "mma16" : m == V2Math::Tf32 ? "tf32" : "3xtf32";
}

// The math of a layer of `dtype` (not float64); `allow_tf32`: torch.backends.cuda.matmul.allow_tf32.
inline V2Math v2_math_of(DType dtype, bool allow_tf32) {
  return dtype != DType::Float32 ? V2Math::Mma16 : allow_tf32 ? V2Math::Tf32 : V2Math::Tf32x3;
}

// Registers per thread that hold one 16x16 (rows x k) tile of w_hh as A fragments: 4 packed 16-bit pairs,
// 8 tf32 values (two k8 halves), or 16 (the big and the small part of each).
constexpr int v2_a_registers_per_tile(V2Math m) { return m == V2Math::Mma16 ? 4 : m == V2Math::Tf32 ? 8 : 16; }
// The most A-fragment registers a compiled instance holds: 64, what the largest bf16 tilings hold at
// 118-172 registers in all and no spills (ptxas, benchmarks/PERSISTENT_V2.md); more would leave too few
// of the 255 for the accumulators, the B fragments and the pointwise state.
constexpr int kV2MaxARegisters = 64;

struct V2Tiling {
  int mt, kt, nt;
  bool fp32;  // a tiling of fp32 layers (Tf32, Tf32x3) rather than of bf16/fp16 ones
};
// The tilings compiled into the launcher, in the order the plan tries them: the first of the layer's kind
// whose warps cover H, whose A fragments fit kV2MaxARegisters and whose grid is co-resident wins. Fewer
// k-tiles per warp first (fewer idle A registers and MMAs), then more rows per CTA (fewer CTAs, so more
// batch groups fit). They are the tilings of benchmarks/PERSISTENT_V2.md's shapes. bf16/fp16: (1,2,2)
// B=16 H=256; (4,4,2) B=64 H=512 (4 batch groups); (2,6,2) B=16 H=768; (2,8,2) B=16 H=1024 (and anything
// up to H=1024 that the others do not fit). fp32: (2,4,4) B=64 H=512 TF32 (2 batch groups: 64 A
// registers); (1,4,8) B=64 H=512 3xTF32 (one batch group of 64 rows: 64 A registers, the most 3xTF32 can
// hold, so exact fp32 runs v2 up to H=512), and TF32 where (2,4,4)'s grid is not co-resident. fp32 LSTM
// and GRU layers above H=512 would need 128 A registers per thread (w_hh is 8-16 MB in fp32, over 132
// SMs): the per-step kernels.
constexpr V2Tiling kV2Tilings[] = {{1, 2, 2, false}, {4, 4, 2, false}, {2, 6, 2, false}, {2, 8, 2, false},
                                   {2, 4, 4, true},  {1, 4, 8, true}};
constexpr int kV2TilingCount = int(sizeof(kV2Tilings) / sizeof(kV2Tilings[0]));

constexpr int v2_a_registers(const V2Tiling& t, V2Math m) { return t.mt * t.kt * v2_a_registers_per_tile(m); }
// Whether the plan may choose tiling i for math m; exactly these instances are compiled (dispatch_v2).
constexpr bool v2_tiling_for(int i, V2Math m) {
  return kV2Tilings[i].fp32 == (m != V2Math::Mma16) && v2_a_registers(kV2Tilings[i], m) <= kV2MaxARegisters;
}

// Dynamic shared memory of one v2 CTA, for `elem`-byte storage (2: bf16/fp16, 4: fp32). Forward: the h
// tile [8*NT][16*k_tiles + pad] (rows padded by 16 bytes: the 8 row addresses of one ldmatrix fall in
// different banks), then the partial sums [warps][16*MT][8*NT] fp32. Backward: the dG_h tile
// [8*NT][16*MT + pad].
constexpr size_t v2_forward_smem_bytes(int mt, int nt, int k_tiles, size_t elem = 2) {
  return size_t(8 * nt) * (size_t(16 * k_tiles) * elem + 16) + size_t(kV2Warps) * 16 * mt * 8 * nt * 4;
}
constexpr size_t v2_backward_smem_bytes(int mt, int nt, size_t elem = 2) {
  return size_t(8 * nt) * (size_t(16 * mt) * elem + 16);
}

// A v2 launch: grid (grid_x, grid_y) of kV2Threads; CTA (x, y) owns units [x*units, x*units + units) for
// batch rows [y*8*NT, y*8*NT + 8*NT). Its workspace (allocated per launch: v2_workspace_offsets below):
//   h_buf     S [2, B, 16*k_tiles]  h exchanged between CTAs, double-buffered by step parity, rows padded
//                                   to whole k-tiles so that every 16-byte cp.async is aligned;
//   flags     unsigned [grid_y * grid_x], zeroed before every launch (each CTA counts its published steps);
//   partials  backward only: fp32 [2][grid_y][grid_x][8*NT][16*k_tiles], each CTA's partial dh.
struct PersistentV2Plan {
  int tiling = -1;  // index into kV2Tilings
  V2Math math = V2Math::Mma16;
  int units = 0, k_tiles = 0;
  int grid_x = 0, grid_y = 0;
  size_t smem_forward = 0, smem_backward = 0;
  size_t h_buf_bytes = 0, flag_bytes = 0, partial_bytes = 0;
};

// The v2 plan of a layer (a projection keeps the per-step kernels: the verdicts say why). `allow_tf32`
// (torch.backends.cuda.matmul.allow_tf32) picks Tf32 over Tf32x3 for fp32 layers.
// `resident_blocks(tiling, smem_forward, smem_backward)` says how many CTAs of that tiling's forward and
// backward kernels (the smaller count) one SM holds, or a negative number when it could not tell. The
// flag waits spin on other CTAs, so every CTA must be resident at once: a cooperative launch, and a
// grid of at most resident_blocks * SMs CTAs.
template <typename ResidentBlocks>
PlanVerdict plan_persistent_v2(Cell cell, DType dtype, int64_t H, int64_t B, bool projection,
                               const PersistentDevice& dev, ResidentBlocks&& resident_blocks,
                               PersistentV2Plan* plan, bool allow_tf32 = false) {
  if (dtype == DType::Float64) return PlanVerdict::Float64;
  const V2Math math = v2_math_of(dtype, allow_tf32);
  const size_t elem = storage_bytes(dtype);
  if (projection) return PlanVerdict::Projection;
  if (H <= 0 || B <= 0) return PlanVerdict::EmptyLayer;
  if (dev.compute_capability < 80) return PlanVerdict::OldArchitecture;
  if (!dev.cooperative_launch || dev.sm_count <= 0) return PlanVerdict::NoCooperativeLaunch;
  const int G = num_gates(cell);
  const int64_t k_tiles = (H + 15) / 16;
  PlanVerdict why = PlanVerdict::HiddenTooLarge;
  for (int i = 0; i < kV2TilingCount; ++i) {
    const V2Tiling t = kV2Tilings[i];
    if (int64_t(kV2Warps) * t.kt < k_tiles) continue;
    if (!v2_tiling_for(i, math)) {
      // a tiling that covers H, but whose A fragments in this math exceed the budget (fp32 above H=512)
      if (v2_a_registers(t, math) > kV2MaxARegisters && why == PlanVerdict::HiddenTooLarge)
        why = PlanVerdict::RegisterBudget;
      continue;
    }
    const int64_t units = 16 * t.mt / G < H ? 16 * t.mt / G : H;  // U = floor(16*MT / G): G*U rows in MT m-tiles
    const int64_t grid_x = (H + units - 1) / units, grid_y = (B + 8 * t.nt - 1) / (8 * t.nt);
    const size_t smem_f = v2_forward_smem_bytes(t.mt, t.nt, int(k_tiles), elem);
    const size_t smem_b = v2_backward_smem_bytes(t.mt, t.nt, elem);
    if ((smem_f > smem_b ? smem_f : smem_b) > dev.smem_optin) {
      why = PlanVerdict::SliceTooLarge;
      continue;
    }
    const int per_sm = resident_blocks(i, smem_f, smem_b);
    if (per_sm < 0) return PlanVerdict::QueryFailed;
    if (int64_t(per_sm) * dev.sm_count < grid_x * grid_y) {
      why = PlanVerdict::NotCoResident;
      continue;
    }
    PersistentV2Plan p;
    p.tiling = i;
    p.math = math;
    p.units = int(units);
    p.k_tiles = int(k_tiles);
    p.grid_x = int(grid_x);
    p.grid_y = int(grid_y);
    p.smem_forward = smem_f;
    p.smem_backward = smem_b;
    p.h_buf_bytes = size_t(2 * B * 16 * k_tiles) * storage_bytes(dtype);
    p.flag_bytes = size_t(grid_x * grid_y) * sizeof(unsigned);
    p.partial_bytes = size_t(2 * grid_x * grid_y) * size_t(8 * t.nt) * size_t(16 * k_tiles) * sizeof(float);
    *plan = p;
    return PlanVerdict::Persistent;
  }
  return why;
}

// The workspace of one launch as one allocation (csrc/recurrence.cpp takes it from torch's caching
// allocator): byte offsets of h_buf, the flags and (backward) the partials, each 256-byte aligned, and
// the total. persistent.cu and the emulated driver place the pointers with the same numbers.
struct V2WorkspaceOffsets {
  size_t h_buf = 0, flags = 0, partials = 0, total = 0;
};
inline V2WorkspaceOffsets v2_workspace_offsets(const PersistentV2Plan& plan, bool backward) {
  auto align = [](size_t n) { return (n + 255) / 256 * 256; };
  V2WorkspaceOffsets o;
  o.flags = align(plan.h_buf_bytes);
  o.partials = o.flags + align(plan.flag_bytes);
  o.total = o.partials + (backward ? plan.partial_bytes : 0);
  return o;
}

// A streaming multiprocessor's limits, for the occupancy model below (defaults: H100/H200, sm_90).
struct SmLimits {
  int max_threads = 2048;
  int max_blocks = 32;
  size_t smem = 228 * 1024;                // shared memory per SM
  size_t smem_reserved_per_block = 1024;   // the driver keeps 1 KiB of it per resident block
  int regs = 65536;
  int reg_alloc_per_warp = 256;            // registers are allocated per warp in units of 256
};

// Resident blocks per SM from threads, registers and shared memory: what
// cudaOccupancyMaxActiveBlocksPerMultiprocessor computes, for devices the tests make up.
inline int resident_blocks_model(const SmLimits& sm, int threads, int regs_per_thread, size_t smem_per_block) {
  const int warps = (threads + 31) / 32;
  int n = sm.max_threads / (warps * 32);
  if (sm.max_blocks < n) n = sm.max_blocks;
  const int regs_per_warp = (regs_per_thread * 32 + sm.reg_alloc_per_warp - 1) / sm.reg_alloc_per_warp *
                            sm.reg_alloc_per_warp;
  if (regs_per_warp > 0 && sm.regs / (regs_per_warp * warps) < n) n = sm.regs / (regs_per_warp * warps);
  const size_t smem_block = smem_per_block + sm.smem_reserved_per_block;
  if (smem_block > 0 && int(sm.smem / smem_block) < n) n = int(sm.smem / smem_block);
  return n;
}

}  // namespace fused_rnn
