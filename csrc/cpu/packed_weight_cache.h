// The packed weight panels of the fused CPU forward (fused_cpu_kernels.h), kept between calls.
//
// Why: the forward packs the gate rows of w_hh (and of w_ih when it projects x inside) into its
// microkernel's panel layout on every call, most of a short call: the op alone, fp32 LSTM, B=1, T=1
// (a decoder stepping a layer one step at a time), 1 thread, took 150 us at H=256 and 725 us at H=512
// packing, ~20 us and ~170 us from a packed panel. Inference and every decoder step of one training
// forward read the same weights, so the panel of an unchanged weight is taken from here instead.
//
// Validity: an entry is the panel of the weight [rows, cols] at one address, for one layout (gates,
// lanes and accumulation type of one instruction-set build), together with a copy of the raw weight
// bytes it was packed from. A lookup hits only when the weight's bytes equal that copy (memcmp, every
// time): a parameter's version counter does not see writes through `tensor.data`, and a freed
// weight's address can be taken by another tensor. The version counter is only a fast reject: when
// the caller knows it (kUnknownVersion otherwise, e.g. inference tensors) and it differs from the
// entry's, the entry is stale. A miss packs into a fresh entry that no other call can see; it is
// published (replacing a stale entry of the same key) only after its whole pack has finished. Calls
// hold their entry by shared_ptr, so an entry evicted meanwhile stays alive until they end.
//
// Bounded: at most kMaxEntries entries and kMaxBytes of panels and copies, least recently used
// evicted. FUSED_RNN_CPU_WEIGHT_CACHE=0 turns it off (csrc/recurrence.cpp reads it): each call
// packs into its own scratch. fused_rnn._C.cpu_weight_cache_stats() / cpu_weight_cache_clear().
//
// Header-only with one process-wide instance: the instruction-set files (pointwise_cpu_avx2.cpp,
// pointwise_cpu_avx512.cpp) include it BEFORE their target pragma, so its code is built once, for
// the baseline, whichever file the linker keeps it from.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>

namespace fused_rnn {
namespace cpu {

// A version counter that is not known (an inference tensor has none): never a reason to reject.
constexpr int64_t kUnknownVersion = -1;

// Which panel: the weight [rows = G*H, cols = K] at `data` in storage dtype `dtype` (DType), packed
// for `gates` gates in blocks of `lanes` values of `value_bytes` each (4: fp32; 2: bf16 pairs,
// fused_cpu_kernels.h Bf16PairDot), by the build of `vec_bytes`.
struct PanelKey {
  const void* data;
  int64_t rows, cols;
  int32_t dtype, gates, lanes, value_bytes, vec_bytes;
  bool operator==(const PanelKey& o) const {
    return data == o.data && rows == o.rows && cols == o.cols && dtype == o.dtype && gates == o.gates &&
           lanes == o.lanes && value_bytes == o.value_bytes && vec_bytes == o.vec_bytes;
  }
};

// One packed weight: the panel and the raw bytes of the weight it was packed from.
struct PackedWeight {
  PanelKey key;
  int64_t version;       // the weight's version counter when packed, or kUnknownVersion
  size_t weight_bytes;   // rows * cols * element size
  size_t panel_bytes;    // a multiple of 64
  void* weight_copy;     // weight_bytes
  void* panel;           // 64-byte aligned (the microkernel loads whole vectors)

  PackedWeight(const PanelKey& k, int64_t v, size_t wb, size_t pb)
      : key(k), version(v), weight_bytes(wb), panel_bytes((pb + 63) / 64 * 64),
        weight_copy(std::malloc(wb > 0 ? wb : 1)), panel(std::aligned_alloc(64, panel_bytes > 0 ? panel_bytes : 64)) {}
  ~PackedWeight() {
    std::free(weight_copy);
    std::free(panel);
  }
  PackedWeight(const PackedWeight&) = delete;
  PackedWeight& operator=(const PackedWeight&) = delete;
  bool allocated() const { return weight_copy != nullptr && panel != nullptr; }
  size_t bytes() const { return weight_bytes + panel_bytes; }
};

struct PackedWeightCacheStats {
  int64_t hits, misses, entries, bytes;
};

// Whether n bytes at a and b are equal, compared by torch's threads in parallel: this read of the
// weight and of its copy is most of what a hit costs (the op, fp32 LSTM H=256 B=1 T=1, 1 thread:
// ~95 us of 117 us; the two 1 MB arrays and the panel do not fit in one core's L2 together).
inline bool equal_bytes(const void* a, const void* b, size_t n) {
  constexpr int64_t kGrain = 128 * 1024;  // bytes per task: below this one thread compares alone
  std::atomic<bool> differ{false};
  at::parallel_for(0, static_cast<int64_t>(n), kGrain, [&](int64_t i0, int64_t i1) {
    if (!differ.load(std::memory_order_relaxed) &&
        std::memcmp(static_cast<const char*>(a) + i0, static_cast<const char*>(b) + i0, static_cast<size_t>(i1 - i0)) != 0)
      differ.store(true, std::memory_order_relaxed);
  });
  return !differ.load();
}

class PackedWeightCache {
 public:
  static constexpr size_t kMaxEntries = 8;
  static constexpr size_t kMaxBytes = size_t(256) << 20;

  // The entry packed from exactly the `weight_bytes` bytes at key.data (a hit), else nullptr (a miss).
  std::shared_ptr<const PackedWeight> find(const PanelKey& key, int64_t version, size_t weight_bytes) {
    std::shared_ptr<const PackedWeight> found;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      for (auto it = lru_.begin(); it != lru_.end(); ++it) {
        if (!((*it)->key == key)) continue;
        const int64_t v = (*it)->version;
        if (v == kUnknownVersion || version == kUnknownVersion || v == version) {
          found = *it;
          lru_.splice(lru_.begin(), lru_, it);  // most recently used first
        }
        break;
      }
    }
    // Compared outside the lock: the entry's bytes never change once published.
    if (found && found->weight_bytes == weight_bytes && equal_bytes(found->weight_copy, key.data, weight_bytes)) {
      hits_.fetch_add(1, std::memory_order_relaxed);
      return found;
    }
    misses_.fetch_add(1, std::memory_order_relaxed);
    return nullptr;
  }

  // A fresh entry for a miss to pack into (and to copy the weight's bytes into), seen by no other
  // call until publish(); nullptr when it could never be kept (over kMaxBytes) or is not allocated.
  std::shared_ptr<PackedWeight> make(const PanelKey& key, int64_t version, size_t weight_bytes, size_t panel_bytes) {
    if (weight_bytes + panel_bytes > kMaxBytes) return nullptr;
    auto e = std::make_shared<PackedWeight>(key, version, weight_bytes, panel_bytes);
    return e->allocated() ? e : nullptr;
  }

  // Makes a fully packed entry visible to later calls, in place of any entry of the same key.
  void publish(std::shared_ptr<PackedWeight> e) {
    const std::lock_guard<std::mutex> lock(mu_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if ((*it)->key == e->key) {
        bytes_ -= (*it)->bytes();
        lru_.erase(it);
        break;
      }
    }
    bytes_ += e->bytes();
    lru_.push_front(std::move(e));
    while (lru_.size() > kMaxEntries || bytes_ > kMaxBytes) {
      bytes_ -= lru_.back()->bytes();
      lru_.pop_back();  // a call still using it holds its own reference
    }
  }

  PackedWeightCacheStats stats() {
    const std::lock_guard<std::mutex> lock(mu_);
    return {hits_.load(), misses_.load(), static_cast<int64_t>(lru_.size()), static_cast<int64_t>(bytes_)};
  }

  // Drops every entry and zeroes the counters.
  void clear() {
    const std::lock_guard<std::mutex> lock(mu_);
    lru_.clear();
    bytes_ = 0;
    hits_ = 0;
    misses_ = 0;
  }

 private:
  std::mutex mu_;
  std::list<std::shared_ptr<PackedWeight>> lru_;  // most recently used first
  size_t bytes_ = 0;                              // of the entries in lru_
  std::atomic<int64_t> hits_{0}, misses_{0};
};

inline PackedWeightCache& packed_weight_cache() {
  static PackedWeightCache cache;
  return cache;
}

}  // namespace cpu
}  // namespace fused_rnn
