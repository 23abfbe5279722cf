// The GEMMs of the fused CPU recurrence (fused_cpu_kernels.h): out (+)= x @ panel, x a few rows of
// the batch (h forward, dG_h backward, x for the input projection), the panel one block of W output
// columns of each of NG gates (or unit blocks), packed so that the k loop reads it in order.
//
//   microkernel / gemm_block   register-blocked: BB x NG vector accumulators over the whole k loop,
//                              FMAs on the accumulation type (FmaDot), or bf16 pairs with fp32 sums
//                              in the AVX512_BF16 build (Bf16PairDot, vdpbf16ps)
//   amx_gemm_block             AMX tiles, 16 rows at a time (the AVX512_BF16 build on a CPU with
//                              AMX, best_isa() == Isa::AmxBf16), on the same bf16 pair panel
//
// plus SpreadPrefetch, the lines the cell math after a GEMM touches, prefetched during it. Included
// by fused_cpu_kernels.h once per instruction set (FR_ISA_NS, FR_VEC_BYTES: the vector width; GCC
// vector extensions give the FMAs at that width; FR_BF16_DOT, FR_AMX: the bf16 build).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef FR_VEC_BYTES
#define FR_VEC_BYTES 16
#endif

namespace fused_rnn {
namespace cpu {
inline namespace FR_ISA_NS {
namespace fused {

constexpr int kVecBytes = FR_VEC_BYTES;
constexpr int kRegs = FR_VEC_BYTES == 64 ? 32 : 16;  // vector registers of the instruction set

typedef float VecF __attribute__((vector_size(kVecBytes)));
typedef double VecD __attribute__((vector_size(kVecBytes)));
template <typename A> struct VecOf;
template <> struct VecOf<float> { using type = VecF; };
template <> struct VecOf<double> { using type = VecD; };
template <typename A> constexpr int lanes() { return kVecBytes / static_cast<int>(sizeof(A)); }

// Rows of the batch per microkernel call: NG accumulators per row plus NG weight vectors must fit
// in the registers (3/4 of them for accumulators), at most 8.
template <int NG> constexpr int rows_per_block() {
  const int r = (kRegs * 3 / 4) / NG;
  return r > 8 ? 8 : r;
}

// Independent accumulator chains the k loop needs to keep both FMA pipes busy: FMA latency (4
// cycles) x 2 issued per cycle = 8. Fewer than 8 of BB x NG (B=1, the RNN, the rest rows of a
// block) and the loop waits on each FMA's result: the k loop is then split into KS interleaved
// partial sums (k = s mod KS), added at the end. BB x NG x KS accumulators plus KS broadcasts must
// fit in the registers; the weights come as memory operands of the FMAs.
template <int NG, int BB> constexpr int k_splits() {
  constexpr int chains = NG * BB;
  int ks = chains >= 8 ? 1 : (8 + chains - 1) / chains;
  while (ks > 1 && chains * ks + ks > kRegs - 1) --ks;
  return ks > 4 ? 4 : ks;
}

// How the microkernel multiplies x by the panel. FmaDot: both in A, one k per FMA (panel
// [K][NG][W]). Bf16PairDot (only in the AVX512_BF16 build, FR_BF16_DOT): bf16 x and panel, two k
// per instruction (vdpbf16ps: acc[l] += x[k] w[k][l] + x[k+1] w[k+1][l], the products exact, the
// sums in fp32), panel [K/2][NG][W][2], zero past K to a multiple of 32: half the instructions and
// half the panel's bytes of FmaDot on the fp32 copy. One vdpbf16ps a cycle on Sapphire Rapids does
// what two FMAs do: there the bytes are the gain, and AMX tiles (amx_gemm_block, on the same
// panel) the speed.
template <typename A_> struct FmaDot {
  using A = A_;                  // the sums
  using X = A_;                  // x's elements
  using P = A_;                  // the panel's
  static constexpr int kK = 1;   // k per multiply
  static constexpr int kPad = 1;  // the panel's k rows: a multiple of this
  using V = typename VecOf<A>::type;
  using WV = V;                  // one panel vector
  using XB = A;                  // x broadcast
  static WV weights(const P* w) { return *reinterpret_cast<const V*>(w); }
  static XB broadcast(const X* x, bool) { return x[0]; }
  static void madd(V& acc, const WV& w, XB x) { acc += w * x; }
};
#ifdef FR_BF16_DOT
struct Bf16PairDot {
  using A = float;
  using X = c10::BFloat16;
  using P = c10::BFloat16;
  static constexpr int kK = 2;
  static constexpr int kPad = 32;  // whole AMX tiles (amx_gemm_block): 32 k
  using V = VecF;
  using WV = __m512i;
  using XB = __m512i;
  static WV weights(const P* w) { return _mm512_load_si512(w); }
  // x[0], x[1] in every lane; `half`: x[0] is the last k (odd K), its partner 0
  static XB broadcast(const X* x, bool half) {
    uint32_t pair = x[0].x;
    if (!half) std::memcpy(&pair, x, sizeof pair);
    return _mm512_set1_epi32(static_cast<int>(pair));
  }
  static void madd(V& acc, const WV& w, const XB& x) {
    acc = reinterpret_cast<V>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), reinterpret_cast<__m512bh>(x),
                                               reinterpret_cast<__m512bh>(w)));
  }
};
#endif
// The multiply of a layer of storage type S: bf16 pairs where this build has them, else FMAs in
// the accumulation type on converted operands.
template <typename S> struct DotOf { using type = FmaDot<typename AccOf<S>::type>; };
#ifdef FR_BF16_DOT
template <> struct DotOf<c10::BFloat16> { using type = Bf16PairDot; };
#endif
// K rounded up to the panel's rows of k (Dot::kPad, a multiple of Dot::kK), zero past K.
template <typename Dot> int64_t panel_k(int64_t K) { return (K + Dot::kPad - 1) / Dot::kPad * Dot::kPad; }

// out[b, g*gstride + lane] (+)= sum_k x[b, k] * panel[k][g][lane] for b < BB, g < NG, lane < nvalid
// (+= when `accum`; otherwise, given `bias`, = bias[g*gstride + lane] + sum: one bias for every
// row). `panel` is one block of W = lanes<A>() output columns per gate, packed as Dot says
// (zero-padded). BB x NG (x KS, k_splits) accumulators stay in registers for the whole
// k loop. Never inlined: inlined into forward_impl's input projection, GCC kept the bf16 pair
// kernel's accumulators on the stack (a store after every vdpbf16ps; LSTM bf16 B=64 H=256, 2
// threads, projection inside: 42.5 -> 31.3 ms once out of line).
template <int NG, int BB, typename Dot, typename A = typename Dot::A>
__attribute__((noinline)) void microkernel(const typename Dot::X* __restrict__ x, int64_t ldx,
                                           const typename Dot::P* __restrict__ panel, int64_t K, A* __restrict__ out,
                                           int64_t ldo, int64_t gstride, int nvalid, bool accum,
                                           const A* __restrict__ bias) {
  using V = typename Dot::V;
  constexpr int W = lanes<A>();
  constexpr int KS = k_splits<NG, BB>();
  constexpr int KK = Dot::kK;
  V acc[KS][BB][NG];
  for (int s = 0; s < KS; ++s)
    for (int b = 0; b < BB; ++b)
      for (int g = 0; g < NG; ++g) acc[s][b][g] = V{};
  if (accum || bias != nullptr)
    for (int b = 0; b < BB; ++b)
      for (int g = 0; g < NG; ++g) {
        const A* o = accum ? out + b * ldo + g * gstride : bias + g * gstride;
        if (nvalid == W)
          std::memcpy(&acc[0][b][g], o, sizeof(V));
        else
          for (int l = 0; l < nvalid; ++l) acc[0][b][g][l] = o[l];
      }
  // acc_s += x[:, k..k+KK) * panel[k..k+KK) (the group kk = k / KK, all BB rows and NG gates);
  // `half`: only x[:, k] is there (the last k of an odd K)
  const auto fma_k = [&](int64_t kk, V (&acc_s)[BB][NG], bool half) __attribute__((always_inline)) {
    typename Dot::WV w[NG];
    for (int g = 0; g < NG; ++g) w[g] = Dot::weights(panel + (kk * NG + g) * W * KK);
    for (int b = 0; b < BB; ++b) {
      const auto xv = Dot::broadcast(x + b * ldx + kk * KK, half);
      for (int g = 0; g < NG; ++g) Dot::madd(acc_s[b][g], w[g], xv);
    }
  };
  const int64_t groups = K / KK;
  int64_t kk = 0;
  for (; kk + KS <= groups; kk += KS)
    for (int s = 0; s < KS; ++s) fma_k(kk + s, acc[s], false);
  for (; kk < groups; ++kk) fma_k(kk, acc[0], false);
  if (KK > 1 && K % KK != 0) fma_k(groups, acc[0], true);
  for (int s = 1; s < KS; ++s)
    for (int b = 0; b < BB; ++b)
      for (int g = 0; g < NG; ++g) acc[0][b][g] += acc[s][b][g];
  for (int b = 0; b < BB; ++b)
    for (int g = 0; g < NG; ++g) {
      A* o = out + b * ldo + g * gstride;
      if (nvalid == W)
        std::memcpy(o, &acc[0][b][g], sizeof(V));
      else
        for (int l = 0; l < nvalid; ++l) o[l] = acc[0][b][g][l];
    }
}

// The lines of [T, ...] arrays that the cell math after a GEMM reads or writes (a part's own
// units' columns of each row), prefetched a few at a time during the GEMM: `issue` before each
// microkernel call. In one burst (or in the cell math itself) they stalled on the memory: the
// cell math is bound by it (backward, B=64 H=256: ~3 ns per unit from memory, ~1 ns from cache).
struct SpreadPrefetch {
  struct Region { const char* base; int64_t rows, nseg, seg_bytes, row_bytes, lines; bool write; };  // [rows, nseg*H]
  Region r[4];
  int n = 0;
  int64_t per_call = 0, region = 0, row = 0, seg = 0, line = 0;  // the next line: region, row, segment, line in it
  const char* at = nullptr;  // the next line's address

  // The own columns [u0, u1) of each of nseg segments (H apart) of each row of block [B, nseg*H]
  // (`write`: lines the cell math writes, fetched for ownership).
  template <typename T>
  void add(const T* block, int64_t B, int64_t nseg, int64_t H, int64_t u0, int64_t u1, bool write = false) {
    if (block == nullptr || u1 <= u0) return;
    const int64_t lines = ((u1 - u0) * static_cast<int64_t>(sizeof(T)) + 63) / 64;
    r[n++] = {reinterpret_cast<const char*>(block + u0), B, nseg, H * static_cast<int64_t>(sizeof(T)),
              nseg * H * static_cast<int64_t>(sizeof(T)), lines, write};
    if (n == 1) at = r[0].base;
  }
  // Spread all lines over `calls` calls of issue().
  void plan(int64_t calls) {
    int64_t total = 0;
    for (int i = 0; i < n; ++i) total += r[i].rows * r[i].nseg * r[i].lines;
    per_call = (total + calls - 1) / std::max<int64_t>(calls, 1);
  }
  // The next per_call lines; the address steps along, line by line, segment by segment, row by row.
  void issue() {
    for (int64_t i = 0; i < per_call && region < n; ++i) {
      const Region& g = r[region];
      if (g.write)
        __builtin_prefetch(at + line * 64, 1, 2);
      else
        __builtin_prefetch(at + line * 64, 0, 2);
      if (++line < g.lines) continue;
      line = 0;
      if (++seg < g.nseg) {
        at += g.seg_bytes;
        continue;
      }
      seg = 0;
      if (++row < g.rows) {
        at += g.row_bytes - (g.nseg - 1) * g.seg_bytes;  // from the last segment to the next row's first
        continue;
      }
      row = 0;
      if (++region < n) at = r[region].base;
    }
  }
};

// K chunk of gemm_block: the panel's slice, KC x NG x W values, ~32 KB, stays in L1 (48 KB here)
// while every block of rows_per_block rows passes over it. Measured at B=64 (1 thread, AVX-512,
// LSTM): 128 x 4 x 16 fp32 runs the GEMM ~8 % faster than 64 (each chunk re-reads and re-writes
// the accumulators) and than no cut (each row block streams the whole panel from L2 at H=512).
// AVX2 (Zen 3, 32 KB L1) takes 64 KB slices, 512 x 4 x 8 fp32: LSTM fp32 T=100, 2 threads, no-grad,
// projection inside, interleaved medians, 32 -> 64 KB: H=512 B=8 47.6 -> 41.2 ms, B=32 217 -> 205,
// B=64 304 -> 282, GRU H=512 B=64 210 -> 195, H=1024 2-3 % (H <= 256: one slice either way).
// A whole number of the Dot's k groups.
constexpr int64_t kChunkBytes = kVecBytes == 32 ? 65536 : 32768;
template <int NG, typename Dot> int64_t k_chunk(int64_t B, int64_t K) {
  const int64_t slice = kChunkBytes / (NG * lanes<typename Dot::A>() * static_cast<int64_t>(sizeof(typename Dot::P)));
  return B <= rows_per_block<NG>() ? K : std::max<int64_t>(16, slice / Dot::kK * Dot::kK);
}
// Microkernel calls of one gemm_block (for SpreadPrefetch::plan).
template <int NG, typename Dot> int64_t gemm_calls(int64_t B, int64_t K) {
  const int64_t KC = k_chunk<NG, Dot>(B, K);
  return (K + KC - 1) / KC * ((B + rows_per_block<NG>() - 1) / rows_per_block<NG>());
}

// All B rows against one panel block, K cut into chunks (k_chunk). `pf`: prefetches to issue
// along the way (or nullptr). `bias` (not with ACCUM): the sums of every row start from it, as
// microkernel's.
template <int NG, bool ACCUM, typename Dot, typename A = typename Dot::A>
void gemm_block(const typename Dot::X* x, int64_t ldx, int64_t B, const typename Dot::P* panel, int64_t K, A* out,
                int64_t ldo, int64_t gstride, int nvalid, SpreadPrefetch* pf = nullptr, const A* bias = nullptr) {
  constexpr int BB = rows_per_block<NG>();
  constexpr int W = lanes<A>();
  const int64_t KC = k_chunk<NG, Dot>(B, K);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const bool accum = ACCUM || k0 > 0;
    const A* init = accum ? nullptr : bias;
    const auto* xk = x + k0;
    const auto* pk = panel + k0 * NG * W;  // k0 is a whole number of k groups of NG * W * kK values
    int64_t b = 0;
    for (; b + BB <= B; b += BB) {
      if (pf != nullptr) pf->issue();
      microkernel<NG, BB, Dot>(xk + b * ldx, ldx, pk, kc, out + b * ldo, ldo, gstride, nvalid, accum, init);
    }
    const int rest = static_cast<int>(B - b);
    if (rest > 0 && pf != nullptr) pf->issue();
    const auto* xr = xk + b * ldx;
    A* outr = out + b * ldo;
#define FR_REST(n) \
  case n: if constexpr (n < BB) microkernel<NG, n, Dot>(xr, ldx, pk, kc, outr, ldo, gstride, nvalid, accum, init); break;
    switch (rest) {
      FR_REST(1) FR_REST(2) FR_REST(3) FR_REST(4) FR_REST(5) FR_REST(6) FR_REST(7)
      default: break;
    }
#undef FR_REST
  }
}

// Whether operands of type X have a tile form in this build (bf16 in the AMX build), and whether a
// GEMM of `rows` rows of the batch runs it on this CPU (best_isa() == Isa::AmxBf16;
// FUSED_RNN_CPU_ISA=avx512_bf16 turns it off). Below 4 rows a 16-row tile is mostly padding and
// the pair microkernel is faster (LSTM bf16 T=100, 2 threads, op alone, interleaved medians, AMX /
// pairs: B=1 H=256 forward 1.58 / 0.75 ms, B=1 H=512 forward+backward 17.1 / 7.9, B=2 H=512
// forward+backward 16.5 / 12.3; B=4 alike; B=8 H=512 forward+backward 19.6 / 31.4).
#ifdef FR_AMX
constexpr int64_t kTileMinRows = 4;
template <typename X> constexpr bool kTileOperand = std::is_same<X, c10::BFloat16>::value;
template <typename X> bool on_tiles(int64_t rows) {
  return kTileOperand<X> && rows >= kTileMinRows && best_isa() == Isa::AmxBf16;
}
#else
template <typename X> constexpr bool kTileOperand = false;
template <typename X> bool on_tiles(int64_t) { return false; }
#endif
// Rows of the batch in whole 16-row tiles.
inline int64_t tile_rows(int64_t rows) { return (rows + 15) / 16 * 16; }

#ifdef FR_AMX
// AMX (the bf16 build on a CPU with tiles, best_isa() == Isa::AmxBf16). One tile configuration for
// all: 16 rows of 64 bytes — 16 x 32 bf16 of x (A), 16 k pairs x 16 columns of the pair panel (B),
// 16 x 16 fp32 sums (C). Loaded by each thread for its part of the parallel region, released after.
struct AmxTiles {
  bool on;
  explicit AmxTiles(bool use) : on(use) {
    if (!on) return;
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {};
      uint8_t rows[16] = {};
    } cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  ~AmxTiles() {
    if (on) _tile_release();
  }
};

// out[b, g*gstride + l] (+)= sum_k x[b, k] * w_g[k][l] for b < B, g < NG (<= 4), l < nvalid (+= when
// ACCUM), with x bf16 [Bp, Kp] (Bp = B rounded up to 16, row stride ldx, Kp a multiple of 32, zero
// past the real K and finite everywhere: a padding column meets a zero weight) and the pair panel
// (Kp/2 rows of NG x 64 bytes, Bf16PairDot) of NG gates of one unit block (forward) or of NG unit
// blocks (backward, gstride = 16). Per 16 rows, C tiles 0..NG-1 sum over the k tiles, the A tile (4)
// shared by them, B tiles (5-7) in turn. Stored straight into `out` (which then needs Bp rows: the
// rows past B are scratch) when NG whole blocks are written; through `tmp` when adding, or when a
// block has fewer than 16 valid units (the tile's columns past them belong to the next gate, maybe
// another part's).
template <int NG, bool ACCUM>
void amx_gemm_block(const c10::BFloat16* x, int64_t ldx, int64_t B, int64_t Bp, const c10::BFloat16* panel,
                    int64_t Kp, float* out, int64_t ldo, int64_t gstride, int nvalid) {
  static_assert(NG >= 1 && NG <= 4, "C tiles 0-3");
  const int64_t bstride = NG * 64;  // bytes from one k pair of the panel to the next
  for (int64_t b0 = 0; b0 < Bp; b0 += 16) {
    _tile_zero(0);
    if constexpr (NG > 1) _tile_zero(1);
    if constexpr (NG > 2) _tile_zero(2);
    if constexpr (NG > 3) _tile_zero(3);
    for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
      const c10::BFloat16* w = panel + k0 * NG * 16;  // k pair k0/2, gate 0
      _tile_loadd(4, x + b0 * ldx + k0, ldx * 2);
      _tile_loadd(5, w, bstride);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (NG > 1) {
        _tile_loadd(6, w + 32, bstride);
        _tile_dpbf16ps(1, 4, 6);
      }
      if constexpr (NG > 2) {
        _tile_loadd(7, w + 64, bstride);
        _tile_dpbf16ps(2, 4, 7);
      }
      if constexpr (NG > 3) {
        _tile_loadd(5, w + 96, bstride);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    if (!ACCUM && nvalid == 16) {
      float* o = out + b0 * ldo;
      _tile_stored(0, o, ldo * 4);
      if constexpr (NG > 1) _tile_stored(1, o + gstride, ldo * 4);
      if constexpr (NG > 2) _tile_stored(2, o + 2 * gstride, ldo * 4);
      if constexpr (NG > 3) _tile_stored(3, o + 3 * gstride, ldo * 4);
      continue;
    }
    alignas(64) float tmp[NG][16][16];
    _tile_stored(0, tmp[0], 64);
    if constexpr (NG > 1) _tile_stored(1, tmp[1], 64);
    if constexpr (NG > 2) _tile_stored(2, tmp[2], 64);
    if constexpr (NG > 3) _tile_stored(3, tmp[3], 64);
    for (int g = 0; g < NG; ++g)
      for (int64_t r = 0; r < 16 && b0 + r < B; ++r) {
        float* o = out + (b0 + r) * ldo + g * gstride;
        for (int l = 0; l < nvalid; ++l) o[l] = ACCUM ? o[l] + tmp[g][r][l] : tmp[g][r][l];
      }
  }
}
#endif

}  // namespace fused
}  // inline namespace FR_ISA_NS
}  // namespace cpu
}  // namespace fused_rnn
