// A block: its barrier (__syncthreads, and the block's arrival at the grid barrier) and its shared memory.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "runtime.h"

namespace fr_emu {
namespace detail {

namespace {
const char* barrier_name(Barrier kind) { return kind == Barrier::GridSync ? "fr_grid_sync()" : "__syncthreads()"; }

// Shared memory is one exact-size heap allocation per buffer, so that AddressSanitizer reports even a
// one-element overrun; filled with 0xFF bytes (NaN in every floating-point format) so that a read of memory no
// thread wrote shows up as a wrong result.
void* allocate_shared(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 16, bytes ? bytes : 1) != 0) fail("cannot allocate %zu bytes of shared memory", bytes);
  std::memset(p, 0xFF, bytes);
  return p;
}
}  // namespace

Block::Block(Launch* l, uint3 block_idx, unsigned n) : launch(l), idx(block_idx), nthreads(n) {
  if (launch->cfg.dynamic_smem) dynamic_smem = allocate_shared(launch->cfg.dynamic_smem);
  const dim3 dims = launch->block;
  for (unsigned first = 0; first < nthreads; first += 32) {
    auto warp = std::make_unique<Warp>();
    warp->block = this;
    warp->index = static_cast<int>(first / 32);
    warp->nlanes = static_cast<int>(nthreads - first < 32 ? nthreads - first : 32);
    for (int i = 0; i < warp->nlanes; ++i) {
      Lane& lane = warp->lanes[i];
      lane.warp = warp.get();
      lane.lane = i;
      lane.linear_tid = first + i;
      lane.tid = uint3{lane.linear_tid % dims.x, lane.linear_tid / dims.x % dims.y, lane.linear_tid / (dims.x * dims.y)};
      std::snprintf(lane.name, sizeof lane.name, "block (%u,%u,%u) thread (%u,%u,%u)", idx.x, idx.y, idx.z,
                    lane.tid.x, lane.tid.y, lane.tid.z);
    }
    warps.push_back(std::move(warp));
  }
}

Block::~Block() {
  std::free(dynamic_smem);
  for (Site& s : static_smem) std::free(s.memory);
}

void* Block::static_shared(size_t bytes, const void* key) {
  // Called by lanes of every warp of the block; the mutex orders the allocation, TSan must not see it (it
  // would order the lanes that take it, which CUDA does not).
  TsanIgnore bookkeeping(/*sync=*/true);
  std::lock_guard<std::mutex> lock(smem_mutex);
  for (const Site& s : static_smem) {
    if (s.key != key) continue;
    if (s.bytes != bytes) fail("FR_SHARED_ARRAY: one site asked for %zu and for %zu bytes", s.bytes, bytes);
    return s.memory;
  }
  static_smem_bytes += bytes;
  const LaunchConfig& cfg = launch->cfg;
  const size_t total = static_smem_bytes + cfg.dynamic_smem;
  if (total > cfg.device.smem_per_block_optin)
    fail("block needs %zu bytes of shared memory (%zu static + %zu dynamic), more than the device's %zu per block",
         total, static_smem_bytes, cfg.dynamic_smem, cfg.device.smem_per_block_optin);
  launch->check_coresident(total);  // the static size is known only now
  static_smem.push_back(Site{key, allocate_shared(bytes), bytes});
  return static_smem.back().memory;
}

void Block::arrive_and_wait(Barrier kind, unsigned count, const char* file, int line) {
  std::unique_lock<std::mutex> lock(mutex);
  if (pending != Barrier::None && pending != kind)
    fail("block (%u,%u,%u): threads wait at %s (%s:%d) and at %s (%s:%d) at once", idx.x, idx.y, idx.z,
         barrier_name(pending), pending_file, pending_line, barrier_name(kind), file, line);
  if (pending == Barrier::None) {
    pending_file = file;
    pending_line = line;
  }
  pending = kind;
  arrived += count;
  if (kind == Barrier::SyncThreads) {
    const uint64_t round = generation.load(std::memory_order_relaxed);
    if (!complete_if_all_arrived(lock))
      cv.wait(lock, [&] { return generation.load(std::memory_order_relaxed) != round; });
  } else {
    // The grid cannot complete this round before this block arrives, so the round read here is the one waited for.
    const uint64_t round = launch->grid_generation.load(std::memory_order_relaxed);
    complete_if_all_arrived(lock);
    lock.unlock();
    launch->wait_grid(round);
  }
}

void Block::lanes_exited(unsigned count) {
  bool done;
  {
    std::unique_lock<std::mutex> lock(mutex);
    exited += count;
    done = exited == nthreads;
    complete_if_all_arrived(lock);
  }
  cluster->lanes_exited(*launch, count, done);  // lock order: block, then cluster (never both held)
}

bool Block::complete_if_all_arrived(std::unique_lock<std::mutex>&) {
  if (pending == Barrier::None || arrived == 0 || arrived + exited < nthreads) return false;
  const Barrier kind = pending;
  pending = Barrier::None;
  arrived = 0;
  launch->progress.fetch_add(1, std::memory_order_relaxed);
  if (kind == Barrier::SyncThreads) {
    generation.fetch_add(1, std::memory_order_relaxed);
    cv.notify_all();
  } else {
    launch->block_arrived_at_grid();  // lock order: block, then grid (the grid never takes a block's lock)
  }
  return true;
}

}  // namespace detail
}  // namespace fr_emu
