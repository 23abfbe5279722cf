// Thread block clusters (sm_90): the cluster barrier and the mapping of shared memory between the blocks of a
// cluster (distributed shared memory), for ptx.cuh's cluster wrappers.
//
// The barrier is split as barrier.cluster.arrive.release / barrier.cluster.wait.acquire: arrive never blocks;
// wait returns once every thread of the cluster has arrived at the lane's phase (threads that exited count as
// arrived). Under ThreadSanitizer, arrive releases the lane's history to the phase's object and wait acquires
// it, the ordering the .release/.acquire qualifiers give. Two objects by phase parity suffice: no lane can
// arrive at phase g + 2 before every lane of phase g has waited (phase g + 1 needs their arrivals).
#include "runtime.h"

namespace fr_emu {
namespace detail {

namespace {
Lane& current(const char* what) {
  Lane* lane = tls_lane;
  if (!lane) fail("%s called outside a kernel launch (fr_emu::launch)", what);
  return *lane;
}
}  // namespace

void Cluster::arrive(Launch& launch) {
  std::lock_guard<std::mutex> lock(mutex);
  ++arrived;
  complete_if_all_arrived(launch);
}

void Cluster::lanes_exited(Launch& launch, unsigned count, bool block_done) {
  std::lock_guard<std::mutex> lock(mutex);
  exited += count;
  blocks_exited += block_done ? 1 : 0;
  complete_if_all_arrived(launch);
}

void Cluster::complete_if_all_arrived(Launch& launch) {
  if (arrived == 0 || arrived + exited < nthreads) return;
  arrived = 0;
  generation.fetch_add(1, std::memory_order_relaxed);
  launch.progress.fetch_add(1, std::memory_order_relaxed);
  cv.notify_all();
}

void Cluster::wait_past(uint64_t phase) {
  std::unique_lock<std::mutex> lock(mutex);
  cv.wait(lock, [&] { return generation.load(std::memory_order_relaxed) > phase; });
}

unsigned cluster_rank() { return current("%cluster_ctarank").warp->block->cluster_rank; }

unsigned cluster_size() { return current("%cluster_nctarank").warp->block->launch->cluster_size; }

void cluster_arrive(const char* file, int line) {
  Lane& me = current("barrier.cluster.arrive");
  TsanIgnore bookkeeping;
  if (me.cluster_arrived)
    fail("barrier.cluster.arrive (%s:%d): %s arrives again before waiting for its previous arrival", file, line,
         me.name);
  Cluster& cluster = *me.warp->block->cluster;
  me.cluster_phase = cluster.generation.load(std::memory_order_relaxed);  // cannot complete before this arrival
  me.cluster_arrived = true;
  tsan_release(&cluster.sync_objects[me.cluster_phase % 2]);
  TsanIgnore no_sync(/*sync=*/true);  // the mutex inside must not order the lanes that take it
  cluster.arrive(*me.warp->block->launch);
}

void cluster_wait(const char* file, int line) {
  Lane& me = current("barrier.cluster.wait");
  TsanIgnore bookkeeping;
  if (!me.cluster_arrived)
    fail("barrier.cluster.wait (%s:%d): %s waits without having arrived (barrier.cluster.arrive)", file, line,
         me.name);
  Cluster& cluster = *me.warp->block->cluster;
  if (cluster.generation.load(std::memory_order_relaxed) <= me.cluster_phase) {
    me.wait = Wait::ClusterWait;
    me.file = file;
    me.line = line;
    TsanIgnorePause pause;
    switch_context(me.ctx, me.warp->scheduler);
  }
  me.cluster_arrived = false;
  tsan_acquire(&cluster.sync_objects[me.cluster_phase % 2]);
}

void* map_shared_rank(const void* p, unsigned rank, const char* file, int line) {
  Lane& me = current("mapa");
  TsanIgnore bookkeeping(/*sync=*/true);
  Block& mine = *me.warp->block;
  Cluster& cluster = *mine.cluster;
  if (rank >= cluster.blocks.size())
    fail("mapa (%s:%d): %s maps shared memory to rank %u of a cluster of %zu blocks", file, line, me.name, rank,
         cluster.blocks.size());
  Block& target = *cluster.blocks[rank];
  {
    std::lock_guard<std::mutex> lock(target.mutex);
    if (target.exited == target.nthreads)
      fail("mapa (%s:%d): %s maps shared memory of rank %u, whose threads have all exited (its shared memory is "
           "gone: a cluster barrier before exit keeps it)", file, line, me.name, rank);
  }
  const char* q = static_cast<const char*>(p);
  const char* dyn = static_cast<const char*>(mine.dynamic_smem);
  if (dyn && q >= dyn && q < dyn + mine.launch->cfg.dynamic_smem)
    return static_cast<char*>(target.dynamic_smem) + (q - dyn);
  const void* key = nullptr;
  size_t bytes = 0, offset = 0;
  {
    std::lock_guard<std::mutex> lock(mine.smem_mutex);
    for (const Block::Site& s : mine.static_smem) {
      const char* m = static_cast<const char*>(s.memory);
      if (q >= m && q < m + s.bytes) {
        key = s.key;
        bytes = s.bytes;
        offset = size_t(q - m);
      }
    }
  }
  if (!key) fail("mapa (%s:%d): %s maps %p, which is not in its block's shared memory", file, line, me.name, p);
  return static_cast<char*>(target.static_shared(bytes, key)) + offset;
}

}  // namespace detail
}  // namespace fr_emu
