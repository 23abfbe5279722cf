// The fused CPU recurrence: the whole time loop of one layer and direction in ONE parallel region
// (at::parallel_for, torch's own thread pool), the CPU twin of the persistent GPU kernel.
//
// Each part (one per thread) owns a slice of hidden units — blocks of W units, W = one vector of
// the accumulation type — and packs all gate rows of w_hh for them into the panel its microkernel
// reads, so the slice stays in that core's L2 for all T steps. The forward packs once per call, or
// not at all when an earlier call packed the same weight bytes (packed_weight_cache.h). Per step:
//
//   forward   1. gh[:, own gate columns] = h_prev @ w_hh[own rows].T   (register-blocked FMA, or
//                AMX tiles for bf16 where the CPU has them)
//             2. the cell math of recurrence_step.h (forward_row) on the own units: gates never
//                leave the thread except what the backward saves (LSTM and GRU in fp32 / bf16: on
//                whole vectors, lstm_forward_vec / gru_forward_vec, right after each block's GEMM)
//             3. one barrier: everyone's h is written before anyone's next GEMM reads it
//   backward  1. backward_row on the own units: dG at t (all gates), the direct part of dh_prev
//             2. one barrier: every dG at t is written
//             3. dh_prev[:, own units] += dG_h[t] @ w_hh[:, own units]   (the same microkernel)
//
// During each FMA GEMM the lines that the cell math after it reads and writes are prefetched a few
// at a time (SpreadPrefetch): gx and y forward, the next step's saved gates, dy, cells backward.
//
// bf16 (S) keeps h, dG_h and the panels in bf16 where the build multiplies bf16 (Bf16PairDot, AMX);
// elsewhere they are converted to fp32 (the accumulation type A) for the FMAs. The sums, gh, dh and
// the LSTM's cell state are fp32 throughout.
//
// h is double-buffered ([2, B, H]), so one barrier per step suffices: step k reads buffer k%2 and
// writes buffer (k+1)%2, which nobody reads before the barrier. d w_hh / d b_hh are single large
// GEMMs after the loop (csrc/recurrence.cpp). A packed batch's backward reads the saved tensors in
// their compact layout and writes d gx so (compact_rows.h; FusedBackwardParams::saved_rows).
// The GEMMs are fused_gemm.h's: FMA microkernels, and for bf16 on a CPU with AMX, tiles. Included
// once per instruction set (FR_ISA_NS) with FR_VEC_BYTES, the vector width of that set (and
// FR_BF16_DOT, FR_AMX in the bf16 build, fused_cpu_avx512bf16.cpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "fused_gemm.h"
#include "packed_weight_cache.h"

namespace fused_rnn {
namespace cpu {
inline namespace FR_ISA_NS {
namespace fused {

// Scratch blocks kept by each thread between calls (at most kKeep, the largest). Freed and
// allocated again per call, the multi-MB panels went back to the OS (glibc trims the top of the
// heap) and every call faulted them in again: B=1 H=512 with the input projection, ~2000 page
// faults, ~3 ms of a 4 ms call at T=1. The cost: the last calls' scratch stays allocated.
struct ScratchCache {
  static constexpr size_t kKeep = 8;
  std::vector<std::pair<size_t, void*>> blocks;  // (bytes, 64-byte aligned block), free
  ~ScratchCache() {
    for (auto& b : blocks) std::free(b.second);
  }
  // A free block of at least `bytes` (the smallest), or a new one; `bytes` becomes its size.
  void* take(size_t& bytes) {
    size_t best = blocks.size();
    for (size_t i = 0; i < blocks.size(); ++i)
      if (blocks[i].first >= bytes && (best == blocks.size() || blocks[i].first < blocks[best].first)) best = i;
    if (best == blocks.size()) return std::aligned_alloc(64, bytes);
    void* p = blocks[best].second;
    bytes = blocks[best].first;
    blocks.erase(blocks.begin() + static_cast<int64_t>(best));
    return p;
  }
  void give(void* p, size_t bytes) {
    blocks.emplace_back(bytes, p);
    if (blocks.size() <= kKeep) return;
    const auto smallest = std::min_element(blocks.begin(), blocks.end());
    std::free(smallest->second);
    blocks.erase(smallest);
  }
};
inline ScratchCache& scratch_cache() {
  static thread_local ScratchCache cache;
  return cache;
}

// 64-byte aligned scratch of one call, from and back to the constructing thread's ScratchCache.
template <typename T> struct Buffer {
  T* p = nullptr;
  size_t bytes;
  explicit Buffer(int64_t n) : bytes(((static_cast<size_t>(n > 0 ? n : 1) * sizeof(T)) + 63) / 64 * 64) {
    p = static_cast<T*>(scratch_cache().take(bytes));
    TORCH_CHECK(p != nullptr, "fused_rnn: out of memory for the CPU recurrence's workspace");
  }
  ~Buffer() { scratch_cache().give(p, bytes); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return p; }
};

// The step barrier: a monotonic count of parts that finished a step. A part's wait ends when all
// `parts` finished step k. It spins briefly, then yields, so that on an oversubscribed machine a
// waiting thread gives its core to the one it waits for.
struct StepBarrier {
  std::atomic<int64_t> done{0};
  void arrive_and_wait(int64_t my_parts, int64_t target) {
    done.fetch_add(my_parts, std::memory_order_acq_rel);
    for (int spin = 0; done.load(std::memory_order_acquire) < target; ++spin) {
      if (spin < 4000) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
};

// How the hidden units are split: `blocks` blocks of W units; part p owns blocks
// [block_begin(p), block_begin(p + 1)).
struct Split {
  int64_t H, W, blocks, parts;
  Split(int64_t H_, int64_t W_) : H(H_), W(W_), blocks((H_ + W_ - 1) / W_) {
    parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  }
  int64_t block_begin(int64_t p) const { return p * blocks / parts; }
  int nvalid(int64_t blk) const { return static_cast<int>(std::min(W, H - blk * W)); }
};

// x (S, [rows, cols] row-major) as the GEMM's x operand (X, Dot::X): itself when S is X, else
// converted into `scratch` (bf16/fp16 -> fp32).
template <typename S, typename X> const X* as_operand(const S* x, int64_t n, X* scratch) {
  if constexpr (std::is_same<S, X>::value) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = Conv<S>::load(x[i]);
    return scratch;
  }
}
// One value of a weight (S) as the panel holds it (P): as it is, or converted.
template <typename P, typename S> P panel_value(S v) {
  if constexpr (std::is_same<S, P>::value)
    return v;
  else
    return static_cast<P>(Conv<S>::load(v));
}

// W values of storage type S from / to unaligned memory as one fp32 vector (kOn: this S has it):
// float as it is; bf16 widened (it is the top half of an fp32) and rounded to nearest even, NaN to
// 0x7FC0 — c10::BFloat16's rounding, bitwise the scalar Conv's.
template <typename S> struct VecIo { static constexpr bool kOn = false; };
template <> struct VecIo<float> {
  static constexpr bool kOn = true;
  FR_HD static VecF load(const float* q) {
    VecF v;
    std::memcpy(&v, q, sizeof v);
    return v;
  }
  FR_HD static void store(float* q, const VecF& v) { std::memcpy(q, &v, sizeof v); }
};
template <> struct VecIo<c10::BFloat16> {
  static constexpr bool kOn = true;
  typedef uint16_t V16 __attribute__((vector_size(kVecBytes / 2)));
  typedef uint32_t VU __attribute__((vector_size(kVecBytes)));
  FR_HD static VecF load(const c10::BFloat16* q) {
    V16 half;
    std::memcpy(&half, q, sizeof half);
    const VU bits = __builtin_convertvector(half, VU) << 16;
    VecF v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
  FR_HD static void store(c10::BFloat16* q, const VecF& v) {
    VU bits;
    std::memcpy(&bits, &v, sizeof bits);
    const VU nan = reinterpret_cast<VU>(v != v);
    const VU rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const V16 half = __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), V16);
    std::memcpy(q, &half, sizeof half);
  }
};

// dst[u] = S(src[u] + bias[u]) for u in [u0, u1) (no bias: nullptr), whole vectors where VecIo has them.
template <typename S, typename A>
inline void add_bias_rounded(const A* src, const S* bias, S* dst, int64_t u0, int64_t u1) {
  int64_t u = u0;
  if constexpr (VecIo<S>::kOn && std::is_same<A, float>::value) {
    constexpr int64_t W = lanes<float>();
    for (; u + W <= u1; u += W) {
      const VecF v = VecIo<float>::load(src + u) + (bias != nullptr ? VecIo<S>::load(bias + u) : VecF{});
      VecIo<S>::store(dst + u, v);
    }
  }
  for (; u < u1; ++u) dst[u] = Conv<S>::store(src[u] + (bias != nullptr ? Conv<S>::load(bias[u]) : A(0)));
}

// The LSTM cell math on one vector of W hidden units [u, u + W) of a valid batch row b, fp32 math
// on fp32 or bf16 storage, right after the GEMM wrote their gh (still in L1): the vector twin of
// lstm_forward_loop (recurrence_step.h), with the lanes of lstm_step_forward (cell_math.h) as one
// vector. When `save` is false nothing but the state and y is written.
template <typename S> inline void lstm_forward_vec(const ForwardStepParams& p, int64_t b, int64_t u, bool save) {
  using IO = VecIo<S>;
  const int64_t H = p.H, GH = 4 * H;
  const S* gx = static_cast<const S*>(p.gx) + b * GH + u;
  const float* gh = static_cast<const float*>(p.gh) + b * GH + u;
  const S* bias = static_cast<const S*>(p.b_hh) + u;
  VecF pre[4];
  for (int g = 0; g < 4; ++g)
    pre[g] = IO::load(gx + g * H) + VecIo<float>::load(gh + g * H) + IO::load(bias + g * H);
  float* c = static_cast<float*>(p.c) + b * H + u;
  VecF i, f, g, o, cn, hn;
  lstm_step_forward<VecF>(pre[0], pre[1], pre[2], pre[3], VecIo<float>::load(c), i, f, g, o, cn, hn);
  VecIo<float>::store(c, cn);
  IO::store(static_cast<S*>(p.y) + b * p.Hout + u, hn);
  IO::store(static_cast<S*>(p.h) + b * p.Hout + u, hn);
  if (save) {
    VecIo<float>::store(static_cast<float*>(p.cells) + b * H + u, cn);
    const VecF saved[4] = {i, f, g, o};
    for (int k = 0; k < 4; ++k) IO::store(static_cast<S*>(p.gates) + b * GH + k * H + u, saved[k]);
  }
}

// The GRU cell math on one vector of W hidden units [u, u + W) of a valid batch row b, as
// lstm_forward_vec: the vector twin of gru_forward_loop (recurrence_step.h), h_prev read from the
// step's input state (the row loop reads it from h, copied there first).
template <typename S>
inline void gru_forward_vec(const ForwardStepParams& p, int64_t b, int64_t u, const S* h_prev, bool save) {
  using IO = VecIo<S>;
  const int64_t H = p.H, GH = 3 * H;
  const S* gx = static_cast<const S*>(p.gx) + b * GH + u;
  const float* gh = static_cast<const float*>(p.gh) + b * GH + u;
  const S* bias = static_cast<const S*>(p.b_hh) + u;
  VecF gh_b[3];
  for (int g = 0; g < 3; ++g) gh_b[g] = VecIo<float>::load(gh + g * H) + IO::load(bias + g * H);
  VecF r, z, n, hn;
  gru_step_forward<VecF>(IO::load(gx), IO::load(gx + H), IO::load(gx + 2 * H), gh_b[0], gh_b[1], gh_b[2],
                         IO::load(h_prev + b * p.Hout + u), r, z, n, hn);
  IO::store(static_cast<S*>(p.y) + b * p.Hout + u, hn);
  IO::store(static_cast<S*>(p.h) + b * p.Hout + u, hn);
  if (save) {
    const VecF saved[4] = {r, z, n, gh_b[2]};
    for (int k = 0; k < 4; ++k) IO::store(static_cast<S*>(p.gates) + b * 4 * H + k * H + u, saved[k]);
  }
}

// rows x cols of x (row-major) into the first rows of `padded` (row stride ld >= cols, zero past cols:
// set once when it was allocated), which it returns: a tile operand (amx_gemm_block) where x is not one.
template <typename X> const X* padded_rows(const X* x, int64_t rows, int64_t cols, X* padded, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(padded + r * ld, x + r * cols, sizeof(X) * cols);
  return padded;
}

// Step k of T visits t = k (or T-1-k when reverse); pointers to x[t] of a [T, ...] array.
template <typename T> T* at_step(T* base, int64_t t, int64_t stride) { return base == nullptr ? nullptr : base + t * stride; }

// Packs the gate rows of the own unit blocks [blk0, blk1) of w (S [G*H, K] row-major) into
// panel[blk][k / KK][g][l][k % KK] = w[g*H + blk*W + l, k] (KK = Dot::kK; zero past the last unit
// and at the k that rounds K up to a whole group): the layout the microkernel reads, for w_hh
// (K = H) and w_ih (K = I) alike. Gate by gate: k by k over the W rows of one gate (W streams the
// hardware prefetcher follows) took ~0.9 ns per value at H=256; over all G*W rows at once ~1.3 ns,
// and row by row (writes G*W apart) ~2.5 ns. At H=512 it is bound by the memory (the matrix read,
// the panel written): a W x W register transpose gained nothing there and <10 % at H=256.
template <int G, typename Dot, typename S>
void pack_gate_rows(const S* w, int64_t K, const Split& split, int64_t blk0, int64_t blk1, typename Dot::P* panel) {
  using P = typename Dot::P;
  constexpr int KK = Dot::kK;
  const int64_t H = split.H, W = split.W, Kp = panel_k<Dot>(K);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    P* pb = panel + blk * Kp * G * W;
    const int nv = split.nvalid(blk);
    for (int g = 0; g < G; ++g) {
      const S* rows = w + (g * H + blk * W) * K;  // rows[l * K + k], l < nv
      for (int64_t k = 0; k < Kp; ++k) {
        P* dst = pb + ((k / KK) * G + g) * W * KK + k % KK;
        const int n = k < K ? nv : 0;
        for (int l = 0; l < n; ++l) dst[l * KK] = panel_value<P>(rows[l * K + k]);
        for (int64_t l = n; l < W; ++l) dst[l * KK] = P(0);
      }
    }
  }
}

// The panel of one weight [G*H, K] for this call, from the packed-weight cache
// (packed_weight_cache.h): an entry an earlier call packed from the same bytes (nothing to pack), a
// fresh entry this call packs and publishes after its parallel region, or, with the cache off or a
// weight too large to keep, scratch of this call. `w` nullptr: no weight (an empty panel).
template <int G, typename S, typename Dot> class WeightPanel {
  using P = typename Dot::P;

 public:
  WeightPanel(const S* w, const Split& split, int64_t K, DType dtype, bool use_cache, int64_t version)
      : w_(w), K_(K) {
    const int64_t elems = w == nullptr ? 0 : split.blocks * panel_k<Dot>(K) * G * split.W;
    if (w != nullptr && use_cache) {
      const PanelKey key{w, G * split.H, K, static_cast<int32_t>(dtype), G, static_cast<int32_t>(split.W),
                         static_cast<int32_t>(sizeof(P)), kVecBytes};
      const size_t weight_bytes = static_cast<size_t>(G * split.H * K) * sizeof(S);
      PackedWeightCache& cache = packed_weight_cache();
      hit_ = cache.find(key, version, weight_bytes);
      if (hit_) {
        panel_ = static_cast<P*>(hit_->panel);
        return;
      }
      fresh_ = cache.make(key, version, weight_bytes, static_cast<size_t>(elems) * sizeof(P));
      if (fresh_) {
        panel_ = static_cast<P*>(fresh_->panel);
        return;
      }
    }
    scratch_ = std::make_unique<Buffer<P>>(elems);
    panel_ = scratch_->get();
  }
  // Packs the gate rows of the own unit blocks [blk0, blk1) (pack_gate_rows) and, into a fresh
  // entry, copies their raw rows; nothing on a hit.
  void pack_own(const Split& split, int64_t blk0, int64_t blk1) {
    if (hit_ || w_ == nullptr) return;
    pack_gate_rows<G, Dot>(w_, K_, split, blk0, blk1, panel_);
    if (!fresh_) return;
    const int64_t u0 = blk0 * split.W, u1 = std::min(split.H, blk1 * split.W);
    for (int g = 0; g < G && u1 > u0; ++g) {
      const int64_t first = (g * split.H + u0) * K_;
      std::memcpy(static_cast<S*>(fresh_->weight_copy) + first, w_ + first, sizeof(S) * (u1 - u0) * K_);
    }
  }
  // After every part's pack_own has returned: later calls may take the fresh entry.
  void publish() {
    if (fresh_) packed_weight_cache().publish(std::move(fresh_));
  }
  const P* get() const { return panel_; }

 private:
  const S* w_;
  int64_t K_;
  std::shared_ptr<const PackedWeight> hit_;
  std::shared_ptr<PackedWeight> fresh_;
  std::unique_ptr<Buffer<P>> scratch_;
  P* panel_ = nullptr;
};

// Steps per chunk of the input projection (FusedForwardParams::x): the chunk's gx, [Tc, B, G*H] in
// S, is written by the parts' projection GEMMs and read back by the cell math of the next Tc steps;
// sized to stay in the L2 of the cores (2 MB each here, next to the packed w_hh and w_ih slices):
// ~512 KB in all, so each part's share is a fraction of its L2. Larger Tc amortises each w_ih
// panel's pass over more rows (B=1: Tc rows per pass), smaller keeps gx hot; at B=64 H=512 fp32
// one step is already 512 KB (Tc = 1). Measured (LSTM fp32, T=100, 2 threads, whole op): B=64
// H=512 Tc 1 / 4 / 8: 112 / 113 / 125 ms; B=64 H=256 Tc 1-6 and B=8 H=256 Tc 15-32 alike within
// the noise (~5 %). FUSED_RNN_CPU_PROJ_CHUNK=<steps> overrides it (tests use small chunks to cover
// partial and many chunks).
inline int64_t projection_chunk(int64_t T, int64_t B, int64_t GH, int64_t elem_bytes) {
  constexpr int64_t kChunkBytes = 512 * 1024;
  int64_t tc = kChunkBytes / std::max<int64_t>(1, B * GH * elem_bytes);
  if (const char* env = std::getenv("FUSED_RNN_CPU_PROJ_CHUNK")) tc = std::atoll(env);
  return std::max<int64_t>(1, std::min(tc, T));
}

template <Cell C, typename S> void forward_impl(const FusedForwardParams& q) {
  using A = typename AccOf<S>::type;
  using Dot = typename DotOf<S>::type;
  using X = typename Dot::X;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr int W = lanes<A>();
  const int64_t T = q.T, B = q.step.B, H = q.step.H, GH = G * H;
  // fp32 and bf16 LSTM and GRU: the cell math runs per block of W units right after that block's
  // GEMM, on whole vectors (lstm_forward_vec, gru_forward_vec); otherwise per row over the own units
  // after all GEMMs.
  constexpr bool kVecCell =
      (C == Cell::LSTM || C == Cell::GRU) && VecIo<S>::kOn && std::is_same<A, float>::value && W > 1;
  const Split split(H, W);
  const S* w_hh = static_cast<const S*>(q.w_hh);
  S* y = static_cast<S*>(q.y);
  // gx given ([T, B, G*H]), or computed here chunk by chunk from x into a [Tc, B, G*H] buffer:
  // each part projects its own gate columns only, which only its own cell math reads, so the
  // projection needs no barrier. Step t's gx is at `gx + (t - chunk's first t) * B * GH`.
  const bool project = q.x != nullptr;
  const int64_t I = q.I, Tc = project ? projection_chunk(T, B, GH, sizeof(S)) : T;
  const int64_t Hp = panel_k<Dot>(H), Ip = panel_k<Dot>(I);  // the panels' k rows
  // bf16 with AMX: the recurrent GEMM on tiles (amx_gemm_block), 16 rows of h at a time: gh has Bp
  // rows, and each part copies h per step into its zero-padded [Bp, Hp] tile operand unless h is one.
  constexpr bool kTileType = kTileOperand<X>;
  const bool amx = on_tiles<X>(B);
  const int64_t Bp = amx ? tile_rows(B) : B;
  const bool pad_h = amx && (Bp != B || Hp != H);
  const S* x_in = static_cast<const S*>(q.x);
  const S* b_ih = static_cast<const S*>(q.b_ih);
  Buffer<S> gx_chunk(project ? Tc * B * GH : 0);
  const int64_t chunk_rows = amx ? tile_rows(Tc * B) : Tc * B;  // whole tiles of rows with AMX
  Buffer<A> gx_chunk_acc(project && !std::is_same<S, A>::value ? chunk_rows * GH : 0);  // the GEMM's A result
  // b_ih in A: the projection GEMM's sums start from it (no pass over gx to add it; bf16 still
  // passes over it once to round). AMX tiles start from zero: there the pass adds b_ih.
  const bool bias_in_gemm = project && b_ih != nullptr && !amx;
  Buffer<A> b_ih_acc(bias_in_gemm && !std::is_same<S, A>::value ? GH : 0);
  const A* b_ih_sums = bias_in_gemm ? as_operand<S, A>(b_ih, GH, b_ih_acc.get()) : nullptr;
  // [block][k][g][W] (pairs: [block][k / 2][g][W][2]) of w_hh (k < Hp) and of w_ih (k < Ip, with x),
  // each part packs its own blocks
  WeightPanel<G, S, Dot> panel(w_hh, split, H, q.step.dtype, q.cache_weights, q.w_hh_version);
  WeightPanel<G, S, Dot> panel_ih(project ? static_cast<const S*>(q.w_ih) : nullptr, split, I, q.step.dtype,
                                q.cache_weights, q.w_ih_version);
  const S* gx = project ? gx_chunk.get() : static_cast<const S*>(q.gx);
  // Without save, one step of gates/cells is scratch (only each part's own columns are touched).
  Buffer<S> gates_scratch(q.save || (C != Cell::LSTM && C != Cell::GRU) ? 0 : B * 4 * H);
  Buffer<A> cells_scratch(q.save || C != Cell::LSTM ? 0 : B * H);
  S* gates = q.save ? static_cast<S*>(q.gates) : gates_scratch.get();
  A* cells = q.save ? static_cast<A*>(q.cells) : cells_scratch.get();

  Buffer<S> hbuf(2 * B * H);                   // the state, double-buffered
  Buffer<A> gh(Bp * GH);                       // h_prev @ w_hh.T, each part its own columns
  std::memcpy(hbuf.get(), q.h0, sizeof(S) * B * H);
  StepBarrier barrier;

  at::parallel_for(0, split.parts, 1, [&](int64_t p0, int64_t p1) {
    const int64_t blk0 = split.block_begin(p0), blk1 = split.block_begin(p1);
    const int64_t u0 = blk0 * W, u1 = std::min(H, blk1 * W);
    panel.pack_own(split, blk0, blk1);
    panel_ih.pack_own(split, blk0, blk1);
#ifdef FR_AMX
    const AmxTiles tiles(amx);
#endif
    std::unique_ptr<X[]> h_acc(std::is_same<S, X>::value ? nullptr : new X[B * H]);
    std::unique_ptr<X[]> h_tiles(pad_h ? new X[Bp * Hp]() : nullptr);
    std::unique_ptr<X[]> x_acc(project && !std::is_same<S, X>::value ? new X[Tc * B * I] : nullptr);
    // AMX: the chunk's rows of x as a tile operand, zero-padded to [chunk_rows, Ip], where they are not one
    const bool pad_x = project && amx && (Ip != I || (Tc * B) % 16 != 0 || (T % Tc) * B % 16 != 0);
    std::unique_ptr<X[]> x_tiles(pad_x ? new X[chunk_rows * Ip]() : nullptr);
    ForwardStepParams p = q.step;
    p.gh = gh.get();
    int64_t chunk_t0 = 0;  // the smallest t of the current chunk (its rows of x are contiguous)
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = q.reverse ? T - 1 - k : k;
      if (project && k % Tc == 0) {  // gx of the next tc steps, own gate columns, + b_ih, rounded to S
        const int64_t tc = std::min(Tc, T - k), rows = tc * B;
        chunk_t0 = q.reverse ? t - tc + 1 : t;
        const X* xa = as_operand<S, X>(x_in + chunk_t0 * B * I, rows * I, x_acc.get());
        A* out = std::is_same<S, A>::value ? reinterpret_cast<A*>(gx_chunk.get()) : gx_chunk_acc.get();
        if constexpr (kTileType) {
#ifdef FR_AMX
          if (amx) {
            int64_t ldx = I;
            if (pad_x) {
              xa = padded_rows(xa, rows, I, x_tiles.get(), Ip);
              ldx = Ip;
            }
            for (int64_t blk = blk0; blk < blk1; ++blk)
              amx_gemm_block<G, false>(xa, ldx, rows, tile_rows(rows), panel_ih.get() + blk * Ip * G * W, Ip,
                                       out + blk * W, GH, H, split.nvalid(blk));
          }
#endif
        }
        for (int64_t blk = blk0; !amx && blk < blk1; ++blk)
          gemm_block<G, false, Dot>(xa, I, rows, panel_ih.get() + blk * Ip * G * W, I, out + blk * W, GH, H,
                                    split.nvalid(blk), nullptr, b_ih_sums != nullptr ? b_ih_sums + blk * W : nullptr);
        if (amx || !std::is_same<S, A>::value)  // + b_ih where the GEMM did not start from it, rounded to S
          for (int64_t r = 0; r < rows; ++r)
            for (int g = 0; g < G; ++g) {
              const int64_t j0 = r * GH + g * H;
              const S* bias = amx && b_ih != nullptr ? b_ih + g * H : nullptr;
              add_bias_rounded<S>(out + j0, bias, gx_chunk.get() + j0, u0, u1);
            }
      }
      const S* gx_t = project ? gx + (t - chunk_t0) * B * GH : gx + t * B * GH;
      const S* h_prev = hbuf.get() + (k & 1) * B * H;
      S* h_next = hbuf.get() + ((k + 1) & 1) * B * H;
      const X* x = as_operand<S, X>(h_prev, B * H, h_acc.get());
      int64_t ldx = H;
      if (pad_h) {  // the tile operand: h's rows, zero columns to Hp (set once), rows past B unused
        x = padded_rows(x, B, H, h_tiles.get(), Hp);
        ldx = Hp;
      }
      p.t = t;
      p.gx = gx_t;
      p.y = y + t * B * H;
      p.h = h_next;
      p.gates = at_step(gates, q.save ? t : 0, B * 4 * H);
      p.cells = at_step(cells, q.save ? t : 0, B * H);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int nv = split.nvalid(blk);
        const int64_t u = blk * W;
        const auto* w_blk = panel.get() + blk * Hp * G * W;
        if constexpr (kTileType) {
#ifdef FR_AMX
          // (without SpreadPrefetch: its bursts cost more than they save next to a GEMM this short)
          if (amx) amx_gemm_block<G, false>(x, ldx, B, Bp, w_blk, Hp, gh.get() + blk * W, GH, H, nv);
#endif
        }
        if (!amx) {
          SpreadPrefetch pf;  // what the cell math of these units reads and writes, during their GEMM
          pf.add(gx_t, B, G, H, u, u + nv);
          pf.add(y + t * B * H, B, 1, H, u, u + nv, true);
          if (q.save) {
            pf.add(at_step(gates, t, B * 4 * H), B, 4, H, u, u + nv, true);
            pf.add(at_step(cells, t, B * H), B, 1, H, u, u + nv, true);
          }
          pf.plan(gemm_calls<G, Dot>(B, H));
          gemm_block<G, false, Dot>(x, ldx, B, w_blk, H, gh.get() + blk * W, GH, H, nv, &pf);
        }
        if constexpr (kVecCell) {  // the cell math of this block while its gh is in L1
          for (int64_t b = 0; b < B; ++b) {
            if (nv == W && row_valid(p.lengths, b, t)) {
              if constexpr (C == Cell::LSTM)
                lstm_forward_vec<S>(p, b, u, q.save);
              else
                gru_forward_vec<S>(p, b, u, h_prev, q.save);
            } else {
              std::memcpy(h_next + b * H + u, h_prev + b * H + u, sizeof(S) * nv);  // frozen rows keep it
              forward_row<C, S>(p, b, u, u + nv);
            }
          }
        }
      }
      if constexpr (!kVecCell) {
        for (int64_t b = 0; b < B; ++b) {
          std::memcpy(h_next + b * H + u0, h_prev + b * H + u0, sizeof(S) * (u1 - u0));  // frozen rows keep it
          forward_row<C, S>(p, b, u0, u1);
        }
      }
      barrier.arrive_and_wait(p1 - p0, split.parts * (k + 1));
    }
  });
  panel.publish();
  panel_ih.publish();
  std::memcpy(q.h_n, hbuf.get() + (T & 1) * B * H, sizeof(S) * B * H);
}

template <Cell C, typename S> void backward_impl(const FusedBackwardParams& q) {
  using A = typename AccOf<S>::type;
  using Dot = typename DotOf<S>::type;
  using X = typename Dot::X;
  using P = typename Dot::P;
  constexpr int G = static_cast<int>(gates_of<C>());
  constexpr int W = lanes<A>();
  constexpr int KK = Dot::kK;
  const int64_t T = q.step.T, B = q.step.B, H = q.step.H, GH = G * H, GHp = panel_k<Dot>(GH);
  const Split split(H, W);
  const S* w_hh = static_cast<const S*>(q.w_hh);
  A* dh = static_cast<A*>(q.step.dh);
  // bf16 with AMX: dh_prev's GEMM on tiles (amx_gemm_block, adding), dG_h copied per step into a
  // zero-padded [Bp, GHp] tile operand unless it is one.
  constexpr bool kTileType = kTileOperand<X>;
  const bool amx = on_tiles<X>(B);
  const int64_t Bp = amx ? tile_rows(B) : B;
  const bool pad_dg = amx && (Bp != B || GHp != GH);

  // dh_prev's GEMM reads NB unit blocks per panel, [group][r / KK][NB][W][r % KK] = w_hh[r, (group*NB
  // + j)*W + l] (NB weight vectors per broadcast of dG instead of 1: the load ports, not the FMAs,
  // bounded the one-block kernel); a part's blocks past its last whole group, and a partial block,
  // go one by one as [block][r / KK][W][r % KK]. r runs to GHp, zero past G*H.
  constexpr int NB = 4;
  Buffer<P> panel(split.blocks * GHp * W);
  const bool compact = q.saved_rows != nullptr, ring = compact || q.dgh_n != nullptr;
  Buffer<S> dgx_step(compact && C == Cell::GRU ? B * GH : 0);  // each part writes and reads its own units
  StepBarrier barrier;
  at::parallel_for(0, split.parts, 1, [&](int64_t p0, int64_t p1) {
    const int64_t blk0 = split.block_begin(p0), blk1 = split.block_begin(p1);
    const int64_t u0 = blk0 * W, u1 = std::min(H, blk1 * W);
    const int64_t whole = blk1 - blk0 - (split.nvalid(blk1 - 1) < W ? 1 : 0);  // blocks of W valid units
    const int64_t grouped_end = blk0 + whole / NB * NB;                        // blocks in groups of NB
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const bool grouped = blk < grouped_end;
      const int64_t first = grouped ? blk0 + (blk - blk0) / NB * NB : blk, j = blk - first, nb = grouped ? NB : 1;
      P* pb = panel.get() + first * GHp * W;
      const int nv = split.nvalid(blk);
      for (int64_t r = 0; r < GHp; ++r)
        for (int l = 0; l < W; ++l)
          pb[((r / KK * nb + j) * W + l) * KK + r % KK] =
              l < nv && r < GH ? panel_value<P>(w_hh[r * H + blk * W + l]) : P(0);
    }
#ifdef FR_AMX
    const AmxTiles tiles(amx);
#endif
    std::unique_ptr<X[]> dg_acc(std::is_same<S, X>::value ? nullptr : new X[B * GH]);
    std::unique_ptr<X[]> dg_tiles(pad_dg ? new X[Bp * GHp]() : nullptr);
    BackwardStepParams p = q.step;
    // The saved rows of step t: [B, ...] blocks at t (padded), or those of the compact layout, each
    // step's valid rows contiguous from its first one (compact: the first valid row and their count).
    const auto step_span = [&](int64_t t) -> std::pair<int64_t, int64_t> {
      if (!compact) return {t * B, B};
      int64_t first = 0, n = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r = q.saved_rows[t * B + b];
        if (r >= 0 && n++ == 0) first = r;
      }
      return {first, n};
    };
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t t = q.step.reverse ? T - 1 - k : k;
      const int64_t prev = q.step.reverse ? t + 1 : t - 1;
      const bool has_prev = prev >= 0 && prev < T;
      const int64_t at = compact ? 0 : t, at_prev = compact ? 0 : prev;  // compact: saved_rows say where
      p.t = t;
      p.dy = static_cast<const S*>(q.dy) + t * B * H;
      p.gates = at_step(static_cast<const S*>(q.gates), at, B * 4 * H);
      p.cells = at_step(static_cast<const A*>(q.cells), at, B * H);
      p.cells_prev = has_prev ? at_step(static_cast<const A*>(q.cells), at_prev, B * H) : nullptr;
      p.y = static_cast<const S*>(q.y) + at * B * H;
      p.y_prev = has_prev ? static_cast<const S*>(q.y) + at_prev * B * H : nullptr;
      p.saved_rows = compact ? q.saved_rows + t * B : nullptr;
      p.saved_rows_prev = compact && has_prev ? q.saved_rows + prev * B : nullptr;
      // With dgh_n or compact the full dG_h lives for two steps only: this step's GEMM reads buffer
      // k % 2 after the barrier, and step k - 2 writes it again only after the barrier of step k - 1,
      // which no part passes before its GEMM of step k has returned.
      p.dgh = static_cast<S*>(q.dgh) + (ring ? k % 2 : t) * B * GH;
      // compact: dG_x at t in a [B, G*H] block first (the GRU's own; dG_h's for the others), copied
      // below to the valid rows' places
      p.dgx = !compact ? static_cast<S*>(q.dgx) + t * B * GH : C == Cell::GRU ? dgx_step.get() : p.dgh;
      for (int64_t b = 0; b < B; ++b) backward_row<C, S>(p, b, u0, u1);
      for (int64_t b = 0; compact && b < B; ++b) {
        const int64_t r = q.saved_rows[t * B + b];
        if (r < 0) continue;
        for (int g = 0; g < G; ++g)
          std::memcpy(static_cast<S*>(q.dgx) + r * GH + g * H + u0, static_cast<const S*>(p.dgx) + b * GH + g * H + u0,
                      sizeof(S) * (u1 - u0));
      }
      if (q.dgh_n != nullptr)  // the n column of the own units, kept for d w_hh and d b_hh
        for (int64_t b = 0; b < B; ++b) {
          const int64_t r = compact ? q.saved_rows[t * B + b] : t * B + b;
          if (r >= 0)
            std::memcpy(static_cast<S*>(q.dgh_n) + r * H + u0, static_cast<S*>(p.dgh) + b * GH + 2 * H + u0,
                        sizeof(S) * (u1 - u0));
        }
      if (k == 0 && !q.need_dh0) break;  // the last GEMM gives only d h0 (each part's own rows: no barrier)
      barrier.arrive_and_wait(p1 - p0, split.parts * (T - k));
      const X* x = as_operand<S, X>(static_cast<const S*>(p.dgh), B * GH, dg_acc.get());
      if constexpr (kTileType) {
#ifdef FR_AMX
        if (amx) {
          int64_t ldx = GH;
          if (pad_dg) {  // the tile operand: dG_h's rows, zero columns to GHp (set once)
            x = padded_rows(x, B, GH, dg_tiles.get(), GHp);
            ldx = GHp;
          }
          for (int64_t blk = blk0; blk < grouped_end; blk += NB)
            amx_gemm_block<NB, true>(x, ldx, B, Bp, panel.get() + blk * GHp * W, GHp, dh + blk * W, H, W, W);
          for (int64_t blk = grouped_end; blk < blk1; ++blk)
            amx_gemm_block<1, true>(x, ldx, B, Bp, panel.get() + blk * GHp * W, GHp, dh + blk * W, H, 0,
                                    split.nvalid(blk));
          continue;
        }
#endif
      }
      SpreadPrefetch pf;  // what the next step's cell math reads, arriving during this step's GEMM
      if (has_prev) {
        const int64_t prev2 = q.step.reverse ? prev + 1 : prev - 1;  // the next step's c_prev (else c0, small)
        const auto [g0, gn] = step_span(prev);
        if (gn > 0) pf.add(at_step(static_cast<const S*>(q.gates), g0, 4 * H), gn, 4, H, u0, u1);
        pf.add(static_cast<const S*>(q.dy) + prev * B * H, B, 1, H, u0, u1);
        if (prev2 >= 0 && prev2 < T) {
          const auto [c_first, cn] = step_span(prev2);
          if (cn > 0) pf.add(at_step(static_cast<const A*>(q.cells), c_first, H), cn, 1, H, u0, u1);
        }
        pf.plan((grouped_end - blk0) / NB * gemm_calls<NB, Dot>(B, GH) +
                (blk1 - grouped_end) * gemm_calls<1, Dot>(B, GH));
      }
      for (int64_t blk = blk0; blk < grouped_end; blk += NB)
        gemm_block<NB, true, Dot>(x, GH, B, panel.get() + blk * GHp * W, GH, dh + blk * W, H, W, W, &pf);
      for (int64_t blk = grouped_end; blk < blk1; ++blk)
        gemm_block<1, true, Dot>(x, GH, B, panel.get() + blk * GHp * W, GH, dh + blk * W, H, 0, split.nvalid(blk),
                                 &pf);
    }
  });
}

}  // namespace fused

void fused_forward(const FusedForwardParams& q) {
  dispatch_dtype(q.step.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(q.step.cell, [&](auto c) { fused::forward_impl<decltype(c)::value, S>(q); });
  });
}

void fused_backward(const FusedBackwardParams& q) {
  dispatch_dtype(q.step.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_cell(q.step.cell, [&](auto c) { fused::backward_impl<decltype(c)::value, S>(q); });
  });
}

}  // inline namespace FR_ISA_NS
}  // namespace cpu
}  // namespace fused_rnn
