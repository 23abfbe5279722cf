// Memory for the CPU ops' large [T, B, ...] tensors (y, gates, cells, gx, d gx, ...), recycled between
// calls instead of going back to the C library.
//
// Why: glibc hands a large block freed by one training step back to the kernel (it trims the top of
// its heap, or unmaps a block above its mmap threshold), and the next step's tensors of the same sizes
// are page-faulted in again, each page zeroed by the kernel first. Measured (LSTM fp32 T=100 B=64
// H=256, forward + backward, 2 threads, one process running only that layer): ~17,000 page faults per
// step, ~20 ms of 113. Blocks freed here wait in a pool for the next request of their size.
//
// A block of at least kMinBytes comes from the pool when one of the same size class (a multiple of
// kClassBytes) is free, else from the C library; when its tensor dies it goes back to the pool, which
// keeps at most kMaxPoolBytes (the least recently freed blocks beyond that are freed). Smaller
// requests, and every request when FUSED_RNN_CPU_RECYCLE=0, take torch's default CPU allocator.
// The tensors are ordinary CPU tensors (resizable, shareable); only where their memory comes from
// differs. Deleters can run on any thread: the pool is behind a mutex (held across fork()).
// Each block handed out and given back is reported as torch's own CPU allocator reports its memory
// (c10::profiledCPUMemoryReporter), so that torch.profiler's memory view (profile_memory=True)
// counts these tensors: live while a tensor holds the block, freed once it is back in the pool (as
// the CUDA caching allocator's allocated/reserved split).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <utility>

namespace fused_rnn {
namespace cpu {

class RecyclingAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;      // below this the heap reuses memory itself
  static constexpr size_t kClassBytes = size_t(64) << 10;   // sizes are rounded up to this
  static constexpr size_t kMaxPoolBytes = size_t(512) << 20;

  static RecyclingAllocator& get() {
    static RecyclingAllocator* instance = new RecyclingAllocator();  // never destroyed: tensors may outlive statics
    return *instance;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t bytes = (n + kClassBytes - 1) / kClassBytes * kClassBytes;
    void* p = take(bytes);
    if (p == nullptr) p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "fused_rnn: out of memory allocating ", bytes, " bytes");
    c10::profiledCPUMemoryReporter().New(p, bytes);
    return {p, new Block{p, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // (blocks, bytes) waiting in the pool (tests).
  std::pair<int64_t, int64_t> pooled() {
    const std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(free_.size()), static_cast<int64_t>(free_bytes_)};
  }
  // Frees every pooled block.
  void release() {
    const std::lock_guard<std::mutex> lock(mu_);
    for (auto& b : free_) std::free(b.first);
    free_.clear();
    free_bytes_ = 0;
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };

  RecyclingAllocator() {
    // fork() while another thread holds mu_ would leave it locked in the child: hold it across fork.
    pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); }, [] { get().mu_.unlock(); });
  }

  void* take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {  // most recently freed first
      if (it->second != bytes) continue;
      void* p = it->first;
      free_bytes_ -= bytes;
      free_.erase(it);
      return p;
    }
    return nullptr;
  }

  static void give_back(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    c10::profiledCPUMemoryReporter().Delete(block->p);
    get().put(block->p, block->bytes);
    delete block;
  }

  void put(void* p, size_t bytes) {
    const std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_front(p, bytes);
    free_bytes_ += bytes;
    while (free_bytes_ > kMaxPoolBytes) {
      free_bytes_ -= free_.back().second;
      std::free(free_.back().first);
      free_.pop_back();
    }
  }

  std::mutex mu_;
  std::list<std::pair<void*, size_t>> free_;  // (block, bytes), most recently freed first
  size_t free_bytes_ = 0;
};

}  // namespace cpu

// An uninitialised [T, B, ...] tensor of an op (output or internal): on the CPU from the recycling
// allocator above (FUSED_RNN_CPU_RECYCLE=0 turns it off), else at::empty.
// Like at::empty it is NaN-filled under torch's deterministic mode with fill_uninitialized_memory.
inline at::Tensor empty_large(c10::IntArrayRef sizes, const at::TensorOptions& opts) {
  const char* env = std::getenv("FUSED_RNN_CPU_RECYCLE");
  if (!opts.device().is_cpu() || (env != nullptr && std::string(env) == "0")) return at::empty(sizes, opts);
  at::Tensor t = at::detail::empty_generic(sizes, &cpu::RecyclingAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       c10::typeMetaToScalarType(opts.dtype()), c10::nullopt);
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory())
    at::native::fill_empty_deterministic_(t);
  return t;
}

}  // namespace fused_rnn
