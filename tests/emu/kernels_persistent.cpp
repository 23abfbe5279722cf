// Runs the persistent forward and backward kernels on CPU threads under the emulator, chosen and laid
// out by the plan of csrc/cuda/persistent_plan.h computed for a fake device, as csrc/recurrence.cpp +
// persistent.cu would on a GPU: persistent_v2_kernels.cuh, launched through persistent.cu's own
// persistent_v2_launch.cuh, where plan_persistent_v2 fits the layer; where it does not, the per-step
// kernels run (the pointwise driver, kernels_pointwise.cpp). Driven by tests/test_cuda_emulated.py:
//
//   kernels persistent run <in> <out>   inputs and params from <in> (kernels_io.h), outputs to <out>;
//                                       params "verdict" (PlanVerdict: 0 = the kernels ran), "tiling",
//                                       "math", "units", "grid_x", "grid_y" say what ran; param
//                                       "allow_tf32" picks fp32's math. Any other verdict writes no
//                                       arrays: the caller runs the per-step kernels instead
//   kernels persistent plan2 <lines>    one plan per line "cell dtype H B proj sms coop optin
//                                       smem_per_sm regs_per_thread compute_capability allow_tf32", printed as
//                                       "verdict tiling units k_tiles grid_x grid_y smem_forward
//                                       smem_backward"
//
// FR_INSTANCES (kernels_io.h) also selects the v2 instances compiled.
#ifdef FR_INSTANCES
#define FR_V2_INSTANCES FR_INSTANCES
#endif
// FR_PERSISTENT_V2_LAUNCH (a define) replaces the launch header, and with it the kernel header beside
// it, by a copy (one copied tree of csrc/), for the mutation tests.
#ifdef FR_PERSISTENT_V2_LAUNCH
#include FR_PERSISTENT_V2_LAUNCH
#else
#include "cuda/persistent_v2_launch.cuh"
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

// One forward (and, when `save`, one backward) of the layer in `in`, every output and workspace freshly
// poisoned, with recurrence.cpp's arrays and parameters: forward(params, work) and backward(params, work)
// launch the kernels (and may add their own workspace to `work`).
template <Cell C, typename S, typename Forward, typename Backward>
File run(File& in, Forward&& forward, Backward&& backward) {
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
  const int64_t* len = lengths ? lengths->as<int64_t>() : nullptr;
  const PersistentForwardParams fwd{C, dtype, T, B, H, reverse, len, ptr(&in.get("gx")), ptr(&in.get("w_hh")),
                                    ptr(b_hh), ptr(&in.get("h0")), ptr(c0), ptr(&y), ptr(&h_n), ptr(c_n),
                                    ptr(gates), ptr(cells)};
  forward(fwd, work);
  if (!save) return out;

  // As csrc/recurrence.cpp: dgh is dgx except for the GRU.
  Array& dgx = out.add("dgx", s, T * B * GH);
  Array* dgh = C == Cell::GRU ? &out.add("dgh", s, T * B * GH) : &dgx;
  Array& dh0 = out.add("dh0", s, B * H);
  Array* dc0 = lstm ? &out.add("dc0", s, B * H) : nullptr;
  const PersistentBackwardParams bwd{C, dtype, T, B, H, reverse, len, ptr(&in.get("w_hh")), ptr(&in.get("dy")),
                                     ptr(&in.get("dh_n")), lstm ? ptr(&in.get("dc_n")) : nullptr, ptr(gates),
                                     ptr(cells), ptr(&y), ptr(&in.get("h0")), ptr(c0), ptr(&dgx), ptr(dgh),
                                     ptr(&dh0), ptr(dc0)};
  backward(bwd, work);
  return out;
}

// The cooperative launches of launch_v2_forward / launch_v2_backward, on the emulator.
struct EmuV2Launch {
  fr_emu::Device dev;
  int regs_per_thread;
  template <typename Params>
  void operator()(void (*kernel)(Params, cuda::PersistentV2Layout), dim3 grid, size_t smem, const Params& p,
                  const cuda::PersistentV2Layout& lay) const {
    fr_emu::LaunchConfig cfg;
    cfg.grid = grid;
    cfg.block = dim3(unsigned(kV2Threads));
    cfg.dynamic_smem = smem;
    cfg.cooperative = true;
    cfg.device = dev;
    cfg.regs_per_thread = regs_per_thread;
    cfg.stall_seconds = 60;
    fr_emu::launch(cfg, kernel, p, lay);
  }
};

// Through persistent.cu's own launch code: each launch's workspace one poisoned allocation of the plan's
// size, as recurrence.cpp allocates it, its flags zeroed before the launch as persistent.cu does.
template <Cell C, typename S> File run_v2(File& in, const EmuV2Launch& launcher, const PersistentV2Plan& plan) {
  auto workspace = [&](File& work, bool backward) {
    Array& bytes = work.add(backward ? "workspace_backward" : "workspace_forward", 1,
                            v2_workspace_offsets(plan, backward).total);
    const cuda::V2Workspace ws = cuda::v2_workspace_at(plan, backward, bytes.bytes.get());
    std::memset(ws.flags, 0, plan.flag_bytes);
    return ws;
  };
  return run<C, S>(
      in,
      [&](const PersistentForwardParams& p, File& work) {
        cuda::launch_v2_forward(p, plan, workspace(work, false), launcher);
      },
      [&](const PersistentBackwardParams& p, File& work) {
        cuda::launch_v2_backward(p, plan, workspace(work, true), launcher);
      });
}

// The fake device's v2 occupancy: one model for the forward's and the backward's shared memory.
auto v2_resident(const SmLimits& sm, int regs) {
  return [sm, regs](int, size_t smem_forward, size_t smem_backward) {
    const int f = resident_blocks_model(sm, kV2Threads, regs, smem_forward);
    const int b = resident_blocks_model(sm, kV2Threads, regs, smem_backward);
    return f < b ? f : b;
  };
}

// Runs `f(first)` `repeats` times, requiring the same bits each time.
template <typename Run>
File run_repeated(int64_t repeats, Run&& f) {
  File first = f();
  for (int64_t r = 1; r < repeats; ++r) {
    File again = f();
    kernels_io::require_same(first, again, r);
  }
  return first;
}

int run_command(const char* in_path, const char* out_path) {
  File in = kernels_io::read(in_path);
  const Cell cell = Cell(in.param("cell"));
  const DType dtype = DType(in.param("dtype"));
  fr_emu::Device dev;
  dev.sm_count = int(in.param("sms"));
  dev.smem_per_block_optin = size_t(in.param("smem_optin"));
  dev.smem_per_sm = size_t(in.param("smem_per_sm"));
  const int cc = int(in.param("compute_capability"));
  const PersistentDevice pdev{dev.sm_count, true, dev.smem_per_block_optin, cc};
  const SmLimits sm = sm_limits(in.param("smem_per_sm"));
  const int64_t repeats = in.param("repeats");
  File first;
  // as recurrence.cpp + persistent.cu: the persistent kernels where the plan fits the layer
  PersistentV2Plan v2;
  const int v2_regs = int(in.param("v2_regs"));
  const bool allow_tf32 = in.param("allow_tf32") != 0;  // torch.backends.cuda.matmul.allow_tf32, for fp32
  const PlanVerdict verdict = plan_persistent_v2(cell, dtype, in.param("H"), in.param("B"), false, pdev,
                                                 v2_resident(sm, v2_regs), &v2, allow_tf32);
  if (verdict == PlanVerdict::Persistent) {
    const EmuV2Launch launcher{dev, v2_regs};
    bool ran = false;  // dispatch_v2 calls nothing for the instances FR_INSTANCES leaves out
    cuda::dispatch_v2(cell, dtype, v2.math, v2.tiling, [&](auto c, auto s, auto, auto) {
      first = run_repeated(repeats, [&] { return run_v2<decltype(c)::value, decltype(s)>(in, launcher, v2); });
      ran = true;
    });
    if (!ran) fail("this build leaves these kernels out (FR_INSTANCES)");
    first.params["tiling"] = v2.tiling;
    first.params["math"] = int(v2.math);
    first.params["units"] = v2.units;
    first.params["grid_x"] = v2.grid_x;
    first.params["grid_y"] = v2.grid_y;
  }
  first.params["verdict"] = int(verdict);
  kernels_io::write(out_path, first);
  return 0;
}

int plan2_command(const char* path) {
  std::ifstream lines(path);
  int cell, dtype, proj, coop, cc, tf32;
  long long H, B, sms, optin, smem_per_sm, regs;
  while (lines >> cell >> dtype >> H >> B >> proj >> sms >> coop >> optin >> smem_per_sm >> regs >> cc >> tf32) {
    const PersistentDevice dev{int(sms), coop != 0, size_t(optin), cc};
    PersistentV2Plan plan;
    const PlanVerdict v = plan_persistent_v2(Cell(cell), DType(dtype), H, B, proj != 0, dev,
                                             v2_resident(sm_limits(smem_per_sm), int(regs)), &plan, tf32 != 0);
    std::cout << verdict_name(v) << ' ' << plan.tiling << ' ' << plan.units << ' ' << plan.k_tiles << ' '
              << plan.grid_x << ' ' << plan.grid_y << ' ' << plan.smem_forward << ' ' << plan.smem_backward << '\n';
  }
  return 0;
}

}  // namespace

int persistent_main(int argc, char** argv) {
  const std::string cmd = argc > 2 ? argv[2] : "";
  if (cmd == "run" && argc == 5) return run_command(argv[3], argv[4]);
  if (cmd == "plan2" && argc == 4) return plan2_command(argv[3]);
  fail("usage: kernels persistent run <in> <out> | persistent plan2 <lines>");
}
