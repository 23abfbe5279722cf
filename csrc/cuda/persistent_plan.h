// The layout of a persistent launch (csrc/cuda/persistent_kernels.cuh) as a pure function of the
// layer and of a few device numbers, so that the launcher (persistent.cu) runs it with the real
// device's attributes and occupancy, and the emulated tests (tests/test_cuda_emulated.py) run the
// very same function for fake devices: 132 SMs (H100/H200), 108 (A100), and small ones that force
// several units per block or the fallback to the per-step kernels.
// Plain C++: no CUDA headers, no torch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../persistent_params.h"

namespace fused_rnn {

// Threads per block of both persistent kernels (their __launch_bounds__).
constexpr int kPersistentThreads = 256;

// What the plan needs to know about a device (cudaDeviceGetAttribute).
struct PersistentDevice {
  int sm_count = 0;                 // cudaDevAttrMultiProcessorCount
  bool cooperative_launch = false;  // cudaDevAttrCooperativeLaunch
  size_t smem_optin = 0;            // cudaDevAttrMaxSharedMemoryPerBlockOptin: the most one block may use
};

// Why a layer does or does not run persistently. Everything but Persistent means "per-step kernels".
enum class PlanVerdict {
  Persistent,
  Float64,              // the persistent kernels accumulate in fp32 only
  EmptyLayer,           // H <= 0
  NoCooperativeLaunch,  // the device cannot guarantee co-resident blocks (needed by the grid barrier)
  SliceTooLarge,        // a block's slice of w_hh does not fit in shared memory
  NotCoResident,        // the grid would not fit on the device at once
  QueryFailed,          // a CUDA attribute or occupancy query returned an error
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
  }
  return "?";
}

inline size_t storage_bytes(DType d) { return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2; }

// The plan. Block k owns hidden units [k*units, k*units + units) with all G gate rows of them; the
// units are spread over every SM (units = ceil(H / SMs)), so the last block may own fewer. Its
// slice of w_hh — G*units rows of H (forward) or units columns of G*H (backward), the same bytes —
// stays in dynamic shared memory for the whole sequence.
//
// `resident_blocks(smem_bytes)` says how many blocks of the persistent kernels (the smaller count
// of forward and backward) one SM holds with `smem_bytes` of dynamic shared memory, or a negative
// number when it could not tell: the CUDA occupancy query on a GPU, resident_blocks_model() in
// tests. A cooperative launch needs every block resident at once, else the grid barrier would wait
// forever: the plan falls back when blocks > resident_blocks * SMs.
template <typename ResidentBlocks>
PlanVerdict plan_persistent(Cell cell, DType dtype, int64_t H, const PersistentDevice& dev,
                            ResidentBlocks&& resident_blocks, PersistentPlan* plan) {
  if (dtype == DType::Float64) return PlanVerdict::Float64;
  if (H <= 0) return PlanVerdict::EmptyLayer;
  if (!dev.cooperative_launch || dev.sm_count <= 0) return PlanVerdict::NoCooperativeLaunch;
  const int64_t units = (H + dev.sm_count - 1) / dev.sm_count;
  const int64_t blocks = (H + units - 1) / units;
  const size_t smem = size_t(num_gates(cell) * units * H) * storage_bytes(dtype);
  if (smem > dev.smem_optin) return PlanVerdict::SliceTooLarge;
  const int per_sm = resident_blocks(smem);
  if (per_sm < 0) return PlanVerdict::QueryFailed;
  if (int64_t(per_sm) * dev.sm_count < blocks) return PlanVerdict::NotCoResident;
  *plan = PersistentPlan{int(blocks), kPersistentThreads, int(units), smem};
  return PlanVerdict::Persistent;
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
