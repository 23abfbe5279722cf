// Exact-fp32 candidates for the persistent kernels, measured in the CPU emulator: the error of a
// [16 x K] . [K x 8] product (one warp, the shape of one mma tile row of a step) computed
//   tf32x1 — one mma.m16n8k8.tf32 per k-step, operands rounded with cvt.rna.tf32 (what TF32 mode does),
//   tf32x3 — x = big + small, big = tf32(x), small = tf32(x - big); small.big + big.small + big.big,
//   ffma   — a sequential fp32 fmaf chain per output (a register-tiled FFMA kernel's arithmetic),
// against the float64 product. Prints "method max_rel rms_rel" with errors relative to sum_k |a b|.
//   v2_fp32_accuracy K SEED
// The emulated MMA adds each instruction's 8 products in double and rounds once; a tensor core
// accumulates with its own (truncating) alignment, so the GPU must repeat this measurement.
#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

FR_DEVICE float as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// A [16][K], Bm [K][8] row-major fp32; out [3][16][8]: tf32x1, tf32x3, ffma.
FR_KERNEL void fp32_product_kernel(const float* A, const float* Bm, float* out, int K) {
  const int lane = int(threadIdx.x), g = lane / 4, t = lane % 4;
  float d1[4] = {}, d3[4] = {};
  for (int k0 = 0; k0 < K; k0 += 8) {
    float av[4], bv[2];
    for (int i = 0; i < 4; ++i) av[i] = A[(g + 8 * (i & 1)) * K + k0 + t + 4 * (i >> 1)];  // a[i] = A[g+8(i&1)][t+4(i>>1)]
    for (int i = 0; i < 2; ++i) bv[i] = Bm[(k0 + t + 4 * i) * 8 + g];                       // b[i] = B[t+4i][g]
    uint32_t a_big[4], a_small[4], b_big[2], b_small[2];
    for (int i = 0; i < 4; ++i) {
      a_big[i] = fr_ptx::cvt_tf32(av[i]);
      a_small[i] = fr_ptx::cvt_tf32(av[i] - as_float(a_big[i]));
    }
    for (int i = 0; i < 2; ++i) {
      b_big[i] = fr_ptx::cvt_tf32(bv[i]);
      b_small[i] = fr_ptx::cvt_tf32(bv[i] - as_float(b_big[i]));
    }
    fr_ptx::mma_m16n8k8_tf32(d1, a_big, b_big, d1);
    fr_ptx::mma_m16n8k8_tf32(d3, a_small, b_big, d3);  // the small terms first, then the large one
    fr_ptx::mma_m16n8k8_tf32(d3, a_big, b_small, d3);
    fr_ptx::mma_m16n8k8_tf32(d3, a_big, b_big, d3);
  }
  for (int i = 0; i < 4; ++i) {  // c[i] = C[g + 8(i>>1)][2t + (i&1)]
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float f = 0.f;
    for (int k = 0; k < K; ++k) f = fmaf(A[row * K + k], Bm[k * 8 + col], f);
    out[0 * 128 + row * 8 + col] = d1[i];
    out[1 * 128 + row * 8 + col] = d3[i];
    out[2 * 128 + row * 8 + col] = f;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int K = argc > 1 ? std::atoi(argv[1]) : 512;
  const unsigned seed = argc > 2 ? unsigned(std::atoi(argv[2])) : 0u;
  if (K <= 0 || K % 8) {
    std::fprintf(stderr, "K must be a positive multiple of 8\n");
    return 2;
  }
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> A(16 * size_t(K)), Bm(size_t(K) * 8), out(3 * 128, NAN);
  for (float& v : A) v = normal(rng);
  for (float& v : Bm) v = normal(rng);

  fr_emu::LaunchConfig cfg;
  cfg.grid = dim3(1, 1, 1);
  cfg.block = dim3(32, 1, 1);
  fr_emu::launch(cfg, fp32_product_kernel, A.data(), Bm.data(), out.data(), K);

  const char* names[3] = {"tf32x1", "tf32x3", "ffma"};
  for (int m = 0; m < 3; ++m) {
    double max_rel = 0, sum_sq = 0;
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 8; ++c) {
        double exact = 0, mag = 0;
        for (int k = 0; k < K; ++k) {
          exact += double(A[r * K + k]) * double(Bm[k * 8 + c]);
          mag += std::fabs(double(A[r * K + k]) * double(Bm[k * 8 + c]));
        }
        const double rel = std::fabs(double(out[m * 128 + r * 8 + c]) - exact) / mag;
        max_rel = rel > max_rel ? rel : max_rel;
        sum_sq += rel * rel;
      }
    std::printf("%s %.3e %.3e\n", names[m], max_rel, std::sqrt(sum_sq / 128));
  }
  return 0;
}
