// Runs the persistent v2 kernels (csrc/cuda/persistent_v2_kernels.cuh) in the CPU emulator.
//
//   v2_recurrence DIR CELL DTYPE T B H REVERSE HAS_LENGTHS HAS_BIAS UNITS TILING BACKWARD
//
// CELL 0..3 (Cell), DTYPE 2 = fp16, 3 = bf16 (DType). TILING 0: MT=1 KT=2 NT=2, 1: MT=2 KT=1 NT=1.
// Reads DIR/{gx,w_hh,b_hh,h0,c0}.bin (raw 16-bit values) and DIR/lengths.bin (int64), writes
// DIR/{y,h_n,c_n,gates}.bin (16-bit) and DIR/cells.bin (fp32). BACKWARD=1 then runs the backward on
// the forward's saved tensors: reads DIR/{dy,dh_n,dc_n}.bin, writes DIR/{dgx,dgh,dh0,dc0}.bin.
// Every output and workspace starts as 0xFF bytes (NaN), so an element never written shows as NaN.
// Built with -DFR_V2_MUTABLE, the planted bug of the kernels' FR_PERSISTENT_V2_MUTATION comes from
// $FR_V2_MUTATION (one build for every mutation test).
#ifdef FR_V2_MUTABLE
int fr_v2_mutation = 0;
#define FR_PERSISTENT_V2_MUTATION fr_v2_mutation
#endif
#include "cuda/persistent_v2_kernels.cuh"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace fused_rnn;
using namespace fused_rnn::cuda;

namespace {

std::vector<unsigned char> read_file(const std::string& path, size_t bytes) {
  std::vector<unsigned char> v(bytes);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), 1, bytes, f) != bytes) {
    std::fprintf(stderr, "v2_forward: cannot read %zu bytes from %s\n", bytes, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "v2_forward: cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

std::vector<unsigned char> poisoned(size_t bytes) { return std::vector<unsigned char>(bytes, 0xFF); }

template <Cell C, typename S, int MT, int KT, int NT>
void run(const std::string& dir, int64_t T, int64_t B, int64_t H, bool reverse, bool has_lengths, bool has_bias,
         int units, bool backward) {
  constexpr int64_t G = gates_of<C>();
  const bool lstm = C == Cell::LSTM;
  auto gx = read_file(dir + "/gx.bin", size_t(T * B * G * H) * 2);
  auto w = read_file(dir + "/w_hh.bin", size_t(G * H * H) * 2);
  auto bias = has_bias ? read_file(dir + "/b_hh.bin", size_t(G * H) * 2) : std::vector<unsigned char>();
  auto h0 = read_file(dir + "/h0.bin", size_t(B * H) * 2);
  auto c0 = lstm ? read_file(dir + "/c0.bin", size_t(B * H) * 2) : std::vector<unsigned char>();
  auto lengths = has_lengths ? read_file(dir + "/lengths.bin", size_t(B) * 8) : std::vector<unsigned char>();

  const int k_tiles = int((H + 15) / 16);
  const int64_t Hs = 16 * int64_t(k_tiles);
  auto y = poisoned(size_t(T * B * H) * 2), h_n = poisoned(size_t(B * H) * 2), c_n = poisoned(size_t(B * H) * 2);
  const bool saved = C != Cell::RNN_TANH && C != Cell::RNN_RELU;
  auto gates = poisoned(saved ? size_t(T * B * 4 * H) * 2 : 0);
  auto cells = poisoned(lstm ? size_t(T * B * H) * 4 : 0);
  auto h_buf = poisoned(size_t(2 * B * Hs) * 2);
  const unsigned grid_x = unsigned((H + units - 1) / units), grid_y = unsigned((B + 8 * NT - 1) / (8 * NT));
  std::vector<unsigned> flags(size_t(grid_x) * grid_y, 0u);

  PersistentForwardParams p{};
  p.cell = C;
  p.dtype = std::is_same<S, __half>::value ? DType::Float16 : DType::BFloat16;
  p.T = T;
  p.B = B;
  p.H = H;
  p.reverse = reverse;
  p.lengths = has_lengths ? reinterpret_cast<const int64_t*>(lengths.data()) : nullptr;
  p.gx = gx.data();
  p.w_hh = w.data();
  p.b_hh = has_bias ? bias.data() : nullptr;
  p.h0 = h0.data();
  p.c0 = lstm ? c0.data() : nullptr;
  p.y = y.data();
  p.h_n = h_n.data();
  p.c_n = lstm ? c_n.data() : nullptr;
  p.gates = saved ? gates.data() : nullptr;
  p.cells = lstm ? cells.data() : nullptr;
  p.h_buf = h_buf.data();
  p.c_state = nullptr;  // v2 keeps c in registers

  fr_emu::LaunchConfig cfg;
  cfg.grid = dim3(grid_x, grid_y, 1);
  cfg.block = dim3(kV2Threads, 1, 1);
  cfg.dynamic_smem = v2_forward_smem_bytes<MT, NT>(k_tiles);
  cfg.cooperative = true;  // no grid barrier, but the flag waits need every CTA resident, as on the GPU
  cfg.stall_seconds = 60;
  fr_emu::launch(cfg, persistent_v2_forward_kernel<C, S, MT, KT, NT>, p,
                 PersistentV2Layout{units, k_tiles, flags.data(), nullptr});

  write_file(dir + "/y.bin", y.data(), y.size());
  write_file(dir + "/h_n.bin", h_n.data(), h_n.size());
  if (lstm) write_file(dir + "/c_n.bin", c_n.data(), c_n.size());
  if (saved) write_file(dir + "/gates.bin", gates.data(), gates.size());
  if (lstm) write_file(dir + "/cells.bin", cells.data(), cells.size());
  if (!backward) return;

  auto dy = read_file(dir + "/dy.bin", size_t(T * B * H) * 2);
  auto dh_n = read_file(dir + "/dh_n.bin", size_t(B * H) * 2);
  auto dc_n = lstm ? read_file(dir + "/dc_n.bin", size_t(B * H) * 2) : std::vector<unsigned char>();
  auto dgx = poisoned(size_t(T * B * G * H) * 2);
  auto dgh = C == Cell::GRU ? poisoned(dgx.size()) : std::vector<unsigned char>();  // else dgh is dgx
  auto dh0 = poisoned(size_t(B * H) * 2), dc0 = poisoned(size_t(B * H) * 2);
  auto partials = poisoned(size_t(2) * grid_x * grid_y * 8 * NT * Hs * 4);
  std::vector<unsigned> bwd_flags(size_t(grid_x) * grid_y, 0u);

  PersistentBackwardParams q{};
  q.cell = C;
  q.dtype = p.dtype;
  q.T = T;
  q.B = B;
  q.H = H;
  q.reverse = reverse;
  q.lengths = p.lengths;
  q.w_hh = w.data();
  q.dy = dy.data();
  q.dh_n = dh_n.data();
  q.dc_n = lstm ? dc_n.data() : nullptr;
  q.gates = saved ? gates.data() : nullptr;
  q.cells = lstm ? cells.data() : nullptr;
  q.y = y.data();
  q.h0 = h0.data();
  q.c0 = lstm ? c0.data() : nullptr;
  q.dgx = dgx.data();
  q.dgh = C == Cell::GRU ? dgh.data() : dgx.data();
  q.dh0 = dh0.data();
  q.dc0 = lstm ? dc0.data() : nullptr;
  cfg.dynamic_smem = v2_backward_smem_bytes<MT, NT>();
  fr_emu::launch(cfg, persistent_v2_backward_kernel<C, S, MT, KT, NT>, q,
                 PersistentV2Layout{units, k_tiles, bwd_flags.data(), reinterpret_cast<float*>(partials.data())});

  write_file(dir + "/dgx.bin", dgx.data(), dgx.size());
  if (C == Cell::GRU) write_file(dir + "/dgh.bin", dgh.data(), dgh.size());
  write_file(dir + "/dh0.bin", dh0.data(), dh0.size());
  if (lstm) write_file(dir + "/dc0.bin", dc0.data(), dc0.size());
}

template <Cell C, typename S>
void run_tiling(int tiling, const std::string& dir, int64_t T, int64_t B, int64_t H, bool rev, bool len, bool bias,
                int units, bool backward) {
  if (tiling == 0)
    run<C, S, 1, 2, 2>(dir, T, B, H, rev, len, bias, units, backward);
  else
    run<C, S, 2, 1, 1>(dir, T, B, H, rev, len, bias, units, backward);
}

template <typename S>
void run_cell(int cell, int tiling, const std::string& dir, int64_t T, int64_t B, int64_t H, bool rev, bool len,
              bool bias, int units, bool backward) {
  dispatch_cell(static_cast<Cell>(cell), [&](auto c) {
    run_tiling<decltype(c)::value, S>(tiling, dir, T, B, H, rev, len, bias, units, backward);
  });
}

}  // namespace

int main(int argc, char** argv) {
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
#ifdef FR_V2_MUTABLE
  if (const char* m = std::getenv("FR_V2_MUTATION")) fr_v2_mutation = std::atoi(m);
#endif
  if (dtype == int(DType::Float16))
    run_cell<__half>(cell, tiling, dir, T, B, H, rev, len, bias, units, backward);
  else
    run_cell<__nv_bfloat16>(cell, tiling, dir, T, B, H, rev, len, bias, units, backward);
  return 0;
}
