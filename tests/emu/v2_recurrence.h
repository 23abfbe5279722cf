// The persistent v2 kernels (csrc/cuda/persistent_v2_kernels.cuh) on files, for two programs: in the
// CPU emulator (v2_recurrence.cpp) and on a CUDA GPU (v2_gpu.cu). `Dev` moves buffers and launches:
//   Dev::put(host bytes) -> device pointer; Dev::get(device pointer, host bytes&) copies back;
//   Dev::launch(kernel, grid, smem bytes, args...) a cooperative launch of kV2Threads per CTA.
//
//   v2_recurrence DIR CELL DTYPE T B H REVERSE HAS_LENGTHS HAS_BIAS UNITS TILING BACKWARD
//
// CELL 0..3 (Cell), DTYPE 2 = fp16, 3 = bf16 (DType). TILING 0: MT=1 KT=2 NT=2, 1: MT=2 KT=1 NT=1.
// Reads DIR/{gx,w_hh,b_hh,h0,c0}.bin (raw 16-bit values) and DIR/lengths.bin (int64), writes
// DIR/{y,h_n,c_n,gates}.bin (16-bit) and DIR/cells.bin (fp32). BACKWARD=1 then runs the backward on
// the forward's saved tensors: reads DIR/{dy,dh_n,dc_n}.bin, writes DIR/{dgx,dgh,dh0,dc0}.bin.
// Every output and workspace starts as 0xFF bytes (NaN), so an element never written shows as NaN.
#pragma once

#include "cuda/persistent_v2_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

namespace v2_driver {

using namespace fused_rnn;
using namespace fused_rnn::cuda;

inline std::vector<unsigned char> read_file(const std::string& path, size_t bytes) {
  std::vector<unsigned char> v(bytes);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), 1, bytes, f) != bytes) {
    std::fprintf(stderr, "v2_recurrence: cannot read %zu bytes from %s\n", bytes, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

inline void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "v2_recurrence: cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

// How many times to launch each kernel ($FR_V2_REPEAT, GPU timing; default 1).
inline int repeats() {
  const char* r = std::getenv("FR_V2_REPEAT");
  return r && std::atoi(r) > 1 ? std::atoi(r) : 1;
}

// Launches `repeat` times (flags zeroed before each) and prints the median time per step when
// timed; returns whether every repeat wrote the same bytes into `out` (bitwise repeatability).
template <class Dev, class Launch>
bool repeat_launch(Dev& dev, const char* what, int64_t T, void* flags, size_t flag_bytes, void* out,
                   size_t out_bytes, Launch&& launch) {
  const int n = repeats();
  std::vector<float> ms;
  std::vector<unsigned char> first(out_bytes), again(out_bytes);
  bool same = true;
  for (int r = 0; r < n; ++r) {
    dev.fill(flags, flag_bytes, 0);
    ms.push_back(launch());
    dev.get(out, r == 0 ? first : again);
    same = same && (r == 0 || first == again);
  }
  if (n > 1) {
    std::sort(ms.begin(), ms.end());
    std::printf("%s_us_per_step %.4f repeatable %d\n", what, 1000.0 * ms[ms.size() / 2] / double(T), int(same));
  }
  return same;
}

template <Cell C, typename S, int MT, int KT, int NT, class Dev>
void run(Dev& dev, const std::string& dir, int64_t T, int64_t B, int64_t H, bool reverse, bool has_lengths,
         bool has_bias, int units, bool backward) {
  constexpr int64_t G = gates_of<C>();
  const bool lstm = C == Cell::LSTM, saved = C == Cell::LSTM || C == Cell::GRU;
  const int k_tiles = int((H + 15) / 16);
  const int64_t Hs = 16 * int64_t(k_tiles);
  const unsigned grid_x = unsigned((H + units - 1) / units), grid_y = unsigned((B + 8 * NT - 1) / (8 * NT));
  const dim3 grid(grid_x, grid_y, 1);
  const size_t n_flags = size_t(grid_x) * grid_y * sizeof(unsigned);
  auto in = [&](const char* name, size_t bytes) { return dev.put(read_file(dir + "/" + name + ".bin", bytes)); };
  const size_t bh = size_t(B * H) * 2, tbh = size_t(T * B * H) * 2, tbgh = size_t(T * B * G * H) * 2;

  PersistentForwardParams p{};
  p.cell = C;
  p.dtype = std::is_same<S, __half>::value ? DType::Float16 : DType::BFloat16;
  p.T = T;
  p.B = B;
  p.H = H;
  p.reverse = reverse;
  p.lengths = has_lengths ? static_cast<const int64_t*>(in("lengths", size_t(B) * 8)) : nullptr;
  p.gx = in("gx", tbgh);
  p.w_hh = in("w_hh", size_t(G * H * H) * 2);
  p.b_hh = has_bias ? in("b_hh", size_t(G * H) * 2) : nullptr;
  p.h0 = in("h0", bh);
  p.c0 = lstm ? in("c0", bh) : nullptr;
  p.y = dev.fresh(tbh);  // every output starts as 0xFF bytes: NaN where never written
  p.h_n = dev.fresh(bh);
  p.c_n = lstm ? dev.fresh(bh) : nullptr;
  p.gates = saved ? dev.fresh(size_t(T * B * 4 * H) * 2) : nullptr;
  p.cells = lstm ? dev.fresh(size_t(T * B * H) * 4) : nullptr;
  void* h_buf = dev.fresh(size_t(2 * B * Hs) * 2);
  void* flags = dev.fresh(n_flags);
  const PersistentV2Layout fwd{units, k_tiles, static_cast<unsigned*>(flags), nullptr, h_buf};
  repeat_launch(dev, "forward", T, flags, n_flags, p.y, tbh, [&] {
    return dev.launch(persistent_v2_forward_kernel<C, S, MT, KT, NT>, grid, v2_forward_smem_bytes(MT, NT, k_tiles, sizeof(S)),
                      p, fwd);
  });

  auto out = [&](const char* name, const void* ptr, size_t bytes) {
    std::vector<unsigned char> host(bytes);
    dev.get(ptr, host);
    write_file(dir + "/" + name + ".bin", host.data(), bytes);
  };
  out("y", p.y, tbh);
  out("h_n", p.h_n, bh);
  if (lstm) out("c_n", p.c_n, bh);
  if (saved) out("gates", p.gates, size_t(T * B * 4 * H) * 2);
  if (lstm) out("cells", p.cells, size_t(T * B * H) * 4);
  if (!backward) return;

  PersistentBackwardParams q{};
  q.cell = C;
  q.dtype = p.dtype;
  q.T = T;
  q.B = B;
  q.H = H;
  q.reverse = reverse;
  q.lengths = p.lengths;
  q.w_hh = p.w_hh;
  q.dy = in("dy", tbh);
  q.dh_n = in("dh_n", bh);
  q.dc_n = lstm ? in("dc_n", bh) : nullptr;
  q.gates = p.gates;
  q.cells = p.cells;
  q.y = p.y;
  q.h0 = p.h0;
  q.c0 = p.c0;
  q.dgx = dev.fresh(tbgh);
  q.dgh = C == Cell::GRU ? dev.fresh(tbgh) : q.dgx;  // a separate d gh only where it differs
  q.dh0 = dev.fresh(bh);
  q.dc0 = lstm ? dev.fresh(bh) : nullptr;
  float* partials = static_cast<float*>(dev.fresh(size_t(2) * grid_x * grid_y * 8 * NT * Hs * 4));
  const PersistentV2Layout bwd{units, k_tiles, static_cast<unsigned*>(flags), partials, nullptr};
  repeat_launch(dev, "backward", T, flags, n_flags, q.dgx, tbgh, [&] {
    return dev.launch(persistent_v2_backward_kernel<C, S, MT, KT, NT>, grid, v2_backward_smem_bytes(MT, NT, sizeof(S)), q,
                      bwd);
  });
  out("dgx", q.dgx, tbgh);
  if (C == Cell::GRU) out("dgh", q.dgh, tbgh);
  out("dh0", q.dh0, bh);
  if (lstm) out("dc0", q.dc0, bh);
}

// Tilings (MT, KT, NT): 0 and 1 for the emulated tests; with FR_V2_BUDGET_TILINGS (the GPU program)
// also those of benchmarks/PERSISTENT_V2.md: 2 (B=16 H=768), 3 (B=64 H=512, 4 batch groups),
// 4 (B=16 H=1024). Tiling 0 is also B=16 H=256's.
template <Cell C, typename S, class Dev>
void run_tiling(Dev& dev, int tiling, const std::string& dir, int64_t T, int64_t B, int64_t H, bool rev, bool len,
                bool bias, int units, bool backward) {
  switch (tiling) {
    case 0: return run<C, S, 1, 2, 2>(dev, dir, T, B, H, rev, len, bias, units, backward);
    case 1: return run<C, S, 2, 1, 1>(dev, dir, T, B, H, rev, len, bias, units, backward);
#ifdef FR_V2_BUDGET_TILINGS
    case 2: return run<C, S, 2, 6, 2>(dev, dir, T, B, H, rev, len, bias, units, backward);
    case 3: return run<C, S, 4, 4, 2>(dev, dir, T, B, H, rev, len, bias, units, backward);
    case 4: return run<C, S, 2, 8, 2>(dev, dir, T, B, H, rev, len, bias, units, backward);
#endif
    default: std::fprintf(stderr, "v2_recurrence: no tiling %d in this build\n", tiling); std::exit(2);
  }
}

template <typename S, class Dev>
void run_cell(Dev& dev, int cell, int tiling, const std::string& dir, int64_t T, int64_t B, int64_t H, bool rev,
              bool len, bool bias, int units, bool backward) {
  dispatch_cell(static_cast<Cell>(cell), [&](auto c) {
    run_tiling<decltype(c)::value, S>(dev, tiling, dir, T, B, H, rev, len, bias, units, backward);
  });
}

template <class Dev>
int run_main(Dev& dev, int argc, char** argv) {
  if (argc != 13) {
    std::fprintf(stderr, "usage: %s DIR CELL DTYPE T B H REVERSE HAS_LENGTHS HAS_BIAS UNITS TILING BACKWARD\n",
                 argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int cell = std::atoi(argv[2]), dtype = std::atoi(argv[3]);
  const int64_t T = std::atoll(argv[4]), B = std::atoll(argv[5]), H = std::atoll(argv[6]);
  const bool rev = std::atoi(argv[7]) != 0, len = std::atoi(argv[8]) != 0, bias = std::atoi(argv[9]) != 0;
  const int units = std::atoi(argv[10]), tiling = std::atoi(argv[11]);
  const bool backward = std::atoi(argv[12]) != 0;
  if (dtype == int(DType::Float16))
    run_cell<__half>(dev, cell, tiling, dir, T, B, H, rev, len, bias, units, backward);
  else
    run_cell<__nv_bfloat16>(dev, cell, tiling, dir, T, B, H, rev, len, bias, units, backward);
  return 0;
}

}  // namespace v2_driver
