// Runs the persistent forward and backward kernels (csrc/cuda/persistent_kernels.cuh) on CPU threads
// under the emulator, launched cooperatively with the plan of csrc/cuda/persistent_plan.h computed
// for a fake device, as csrc/recurrence.cpp + persistent.cu would on a GPU. Driven by
// tests/test_cuda_emulated.py:
//
//   kernels persistent run <in> <out>   inputs and params from <in> (kernels_io.h), outputs to <out>
//   kernels persistent plan <lines>     one plan per line "cell dtype H sms coop optin smem_per_sm
//                                       regs_per_thread" of <lines>, printed as "verdict blocks threads
//                                       units smem"
//
// FR_PERSISTENT_KERNELS (a define) replaces the kernel header by a copy, for the mutation tests.
#ifdef FR_PERSISTENT_KERNELS
#include FR_PERSISTENT_KERNELS
#else
#include "cuda/persistent_kernels.cuh"
#endif

#include <fstream>
#include <iostream>
#include <string>

#include "kernels_io.h"

using namespace fused_rnn;
using kernels_io::Array;
using kernels_io::File;
using kernels_io::fail;

namespace {

SmLimits sm_limits(int64_t smem_per_sm) {
  SmLimits sm;
  sm.smem = size_t(smem_per_sm);
  return sm;
}

void* ptr(Array* a) { return a ? a->bytes.get() : nullptr; }

// One forward (and, when `save`, one backward) of the layer in `in`; every output freshly poisoned.
template <Cell C, typename S> File run(File& in, const fr_emu::Device& dev, const PersistentPlan& plan) {
  const int64_t T = in.param("T"), B = in.param("B"), H = in.param("H"), GH = gates_of<C>() * H;
  const bool reverse = in.param("reverse") != 0, save = in.param("save") != 0;
  const bool lstm = C == Cell::LSTM, has_gates = C == Cell::LSTM || C == Cell::GRU;
  const DType dtype = DType(in.param("dtype"));
  const size_t s = sizeof(S), a = sizeof(float);
  Array* lengths = in.find("lengths");
  Array* b_hh = in.find("b_hh");
  Array* c0 = in.find("c0");
  File out, work;
  Array& y = out.add("y", s, T * B * H);
  Array& h_n = out.add("h_n", s, B * H);
  Array* c_n = lstm ? &out.add("c_n", s, B * H) : nullptr;
  Array* gates = save && has_gates ? &out.add("gates", s, T * B * 4 * H) : nullptr;
  Array* cells = save && lstm ? &out.add("cells", a, T * B * H) : nullptr;
  Array& h_buf = work.add("h_buf", s, 2 * B * H);
  Array* c_state = lstm ? &work.add("c_state", a, B * H) : nullptr;
  const int64_t* len = lengths ? lengths->as<int64_t>() : nullptr;

  fr_emu::LaunchConfig cfg;
  cfg.grid = dim3(unsigned(plan.blocks));
  cfg.block = dim3(unsigned(plan.threads));
  cfg.dynamic_smem = plan.smem_bytes;
  cfg.cooperative = true;
  cfg.device = dev;
  const PersistentForwardParams fwd{C, dtype, T, B, H, reverse, len, ptr(&in.get("gx")), ptr(&in.get("w_hh")),
                                    ptr(b_hh), ptr(&in.get("h0")), ptr(c0), ptr(&y), ptr(&h_n), ptr(c_n),
                                    ptr(gates), ptr(cells), ptr(&h_buf), ptr(c_state)};
  fr_emu::launch(cfg, cuda::persistent_forward_kernel<C, S>, fwd, plan.units);
  if (!save) return out;

  // As csrc/recurrence.cpp: dgh is dgx except for the GRU.
  Array& dgx = out.add("dgx", s, T * B * GH);
  Array* dgh = C == Cell::GRU ? &out.add("dgh", s, T * B * GH) : &dgx;
  Array& dh0 = out.add("dh0", s, B * H);
  Array* dc0 = lstm ? &out.add("dc0", s, B * H) : nullptr;
  Array& dh_state = work.add("dh_state", a, B * H);
  Array* dc_state = lstm ? &work.add("dc_state", a, B * H) : nullptr;
  const PersistentBackwardParams bwd{C, dtype, T, B, H, reverse, len, ptr(&in.get("w_hh")), ptr(&in.get("dy")),
                                     ptr(&in.get("dh_n")), lstm ? ptr(&in.get("dc_n")) : nullptr, ptr(gates),
                                     ptr(cells), ptr(&y), ptr(&in.get("h0")), ptr(c0), ptr(&dgx), ptr(dgh),
                                     ptr(&dh0), ptr(dc0), ptr(&dh_state), ptr(dc_state)};
  fr_emu::launch(cfg, cuda::persistent_backward_kernel<C, S>, bwd, plan.units);
  return out;
}

int run_command(const char* in_path, const char* out_path) {
  File in = kernels_io::read(in_path);
  const Cell cell = Cell(in.param("cell"));
  const DType dtype = DType(in.param("dtype"));
  fr_emu::Device dev;
  dev.sm_count = int(in.param("sms"));
  dev.smem_per_block_optin = size_t(in.param("smem_optin"));
  dev.smem_per_sm = size_t(in.param("smem_per_sm"));
  const PersistentDevice pdev{dev.sm_count, true, dev.smem_per_block_optin};
  const SmLimits sm = sm_limits(in.param("smem_per_sm"));
  PersistentPlan plan{};
  const PlanVerdict v = plan_persistent(
      cell, dtype, in.param("H"), pdev,
      [&](size_t smem) { return resident_blocks_model(sm, kPersistentThreads, 0, smem); }, &plan);
  if (v != PlanVerdict::Persistent) fail(std::string("the plan says ") + verdict_name(v));
  const int64_t repeats = in.param("repeats");
  File first;
  cuda::dispatch_persistent(cell, dtype, [&](auto c, auto s) {
    constexpr Cell C = decltype(c)::value;
    using S = decltype(s);
    if constexpr (kernels_io::built<C, S>()) {
      first = run<C, S>(in, dev, plan);
      for (int64_t r = 1; r < repeats; ++r) {
        File again = run<C, S>(in, dev, plan);
        kernels_io::require_same(first, again, r);
      }
    } else {
      fail("this build leaves these kernels out (FR_INSTANCES)");
    }
  });
  first.params["blocks"] = plan.blocks;
  first.params["units"] = plan.units;
  first.params["smem_bytes"] = int64_t(plan.smem_bytes);
  kernels_io::write(out_path, first);
  return 0;
}

int plan_command(const char* path) {
  std::ifstream lines(path);
  int cell, dtype, coop;
  long long H, sms, optin, smem_per_sm, regs;
  while (lines >> cell >> dtype >> H >> sms >> coop >> optin >> smem_per_sm >> regs) {
    const PersistentDevice dev{int(sms), coop != 0, size_t(optin)};
    const SmLimits sm = sm_limits(smem_per_sm);
    PersistentPlan plan{};
    const PlanVerdict v = plan_persistent(
        Cell(cell), DType(dtype), H, dev,
        [&](size_t smem) { return resident_blocks_model(sm, kPersistentThreads, int(regs), smem); }, &plan);
    std::cout << verdict_name(v) << ' ' << plan.blocks << ' ' << plan.threads << ' ' << plan.units << ' '
              << plan.smem_bytes << '\n';
  }
  return 0;
}

}  // namespace

int persistent_main(int argc, char** argv) {
  const std::string cmd = argc > 2 ? argv[2] : "";
  if (cmd == "run" && argc == 5) return run_command(argv[3], argv[4]);
  if (cmd == "plan" && argc == 4) return plan_command(argv[3]);
  fail("usage: kernels persistent run <in> <out> | persistent plan <lines>");
}
