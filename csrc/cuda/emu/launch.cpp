// fr_emu::launch: check the configuration as the CUDA runtime would, run the blocks (all at once for a
// cooperative launch, in waves otherwise), watch for a launch that stops making progress.
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "runtime.h"

namespace fr_emu {
namespace detail {

void fail(const char* format, ...) {
  std::fflush(stdout);
  std::fputs("fr_emu: error: ", stderr);
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  exit_now(kMisuseExit);
}

void exit_now(int code) {
  // Other threads may hold locks or wait forever: no destructors, no atexit. exit_group directly, because
  // ThreadSanitizer's _exit would replace the code with its own when the calling fiber is in a TsanIgnore scope.
  syscall(SYS_exit_group, code);
  _exit(code);
}

namespace {

// A non-cooperative grid runs in waves of at most this many threads (the GPU guarantees nothing about which
// blocks run together, so any wave size is faithful). Bounds the OS threads and stacks alive at once; 96 warps
// keep warp threads + one TSan fiber per warp within ThreadSanitizer's precise range (kTsanIdentities).
constexpr unsigned kMaxThreadsPerWave = 3072;

void note_once(const char* format, unsigned a, int b) {
  static std::atomic<bool> said{false};
  if (!said.exchange(true)) std::fprintf(stderr, format, a, b);
}

struct Residency {
  unsigned per_sm;
  const char* limit;
};

// How many blocks of this launch fit on one SM, and which resource limits it (the CUDA occupancy rules:
// threads are allocated per warp, registers per warp in units of 256, shared memory per block plus the 1 KB the
// hardware reserves per block on sm_80 and later).
Residency blocks_per_sm(const LaunchConfig& cfg, unsigned threads_per_block, size_t smem_per_block) {
  const Device& d = cfg.device;
  const unsigned warps = (threads_per_block + 31) / 32;
  Residency r{static_cast<unsigned>(d.max_blocks_per_sm), "blocks per SM"};
  auto limit = [&](unsigned n, const char* what) {
    if (n < r.per_sm) r = Residency{n, what};
  };
  limit(static_cast<unsigned>(d.max_threads_per_sm) / (warps * 32), "threads per SM");
  limit(static_cast<unsigned>(d.smem_per_sm / (smem_per_block + 1024)), "shared memory per SM");
  if (cfg.regs_per_thread > 0) {
    const unsigned regs_per_warp = (static_cast<unsigned>(cfg.regs_per_thread) * 32 + 255) / 256 * 256;
    limit(static_cast<unsigned>(d.regs_per_sm) / (regs_per_warp * warps), "registers per SM");
  }
  return r;
}

const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

const char* wait_text(const Lane& l, char* buf, size_t n) {
  switch (l.wait) {
    case Wait::Exited: return "exited";
    case Wait::Runnable: return "running (no barrier reached: an endless loop?)";
    case Wait::SyncThreads: std::snprintf(buf, n, "wait at __syncthreads() %s:%d", base_name(l.file), l.line); break;
    case Wait::GridSync: std::snprintf(buf, n, "wait at fr_grid_sync() %s:%d", base_name(l.file), l.line); break;
    case Wait::ClusterWait:
      std::snprintf(buf, n, "wait at barrier.cluster.wait (phase %llu) %s:%d",
                    static_cast<unsigned long long>(l.cluster_phase), base_name(l.file), l.line);
      break;
    case Wait::Collective:
      std::snprintf(buf, n, "wait at %s(mask 0x%08x) %s:%d", op_name(l.op), l.mask, base_name(l.file), l.line);
      break;
  }
  return buf;
}

// Which threads wait where, in runs of consecutive threads that wait at the same place; then exit 86.
[[noreturn]] void report_deadlock(Launch& launch, double seconds) {
  TsanIgnore reading_other_threads_state(/*sync=*/true);
  std::fflush(stdout);
  std::fprintf(stderr,
               "fr_emu: deadlock: no barrier progress for %.1f s (LaunchConfig::stall_seconds); grid (%u,%u,%u) of "
               "blocks (%u,%u,%u)%s; where the threads are:\n",
               seconds, launch.grid.x, launch.grid.y, launch.grid.z, launch.block.x, launch.block.y, launch.block.z,
               launch.cfg.cooperative ? ", cooperative" : "");
  for (Block* b : launch.running) {
    std::fprintf(stderr, "  block (%u,%u,%u):", b->idx.x, b->idx.y, b->idx.z);
    if (b->pending != Barrier::None)
      std::fprintf(stderr, " [%u of %u threads arrived at its barrier, %u exited]", b->arrived, b->nthreads, b->exited);
    std::fputc('\n', stderr);
    const Lane* run_first = nullptr;
    char text[256], first_text[256];
    auto flush = [&](const Lane* last) {
      if (run_first)
        std::fprintf(stderr, "    threads %u-%u: %s\n", run_first->linear_tid, last->linear_tid, first_text);
    };
    const Lane* prev = nullptr;
    for (auto& w : b->warps)
      for (int i = 0; i < w->nlanes; ++i) {
        const Lane& l = w->lanes[i];
        const char* t = wait_text(l, text, sizeof text);
        if (!run_first || std::strcmp(t, first_text) != 0) {
          flush(prev);
          run_first = &l;
          std::snprintf(first_text, sizeof first_text, "%s", t);
        }
        prev = &l;
      }
    flush(prev);
  }
  if (launch.cfg.cooperative)
    std::fprintf(stderr, "  grid sync: %u of %u blocks arrived\n", launch.grid_blocks_arrived, launch.nblocks);
  std::fflush(stderr);
  exit_now(kDeadlockExit);
}

uint3 block_index(const dim3& grid, unsigned linear) {
  return uint3{linear % grid.x, linear / grid.x % grid.y, linear / (grid.x * grid.y)};
}

// The block at position `order` of the launch order: cluster by cluster (clusters x fastest), each cluster's
// blocks by rank (x fastest), so that a cluster's blocks are consecutive and always run in the same wave.
// Without clusters (1x1x1) this is the linear block order.
uint3 block_in_launch_order(const dim3& grid, const dim3& cluster, unsigned order, unsigned* rank) {
  const unsigned size = cluster.x * cluster.y * cluster.z;
  const dim3 clusters(grid.x / cluster.x, grid.y / cluster.y, grid.z / cluster.z);
  const uint3 c = block_index(clusters, order / size), r = block_index(cluster, order % size);
  *rank = order % size;
  return uint3{c.x * cluster.x + r.x, c.y * cluster.y + r.y, c.z * cluster.z + r.z};
}

// Runs blocks [first, first + count) to completion: one OS thread per warp, all started before any is waited for.
void run_wave(Launch& launch, unsigned first, unsigned count) {
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::unique_ptr<Cluster>> clusters;  // `count` is a whole number of clusters
  unsigned nwarps = 0;
  for (unsigned b = first; b < first + count; ++b) {
    unsigned rank = 0;
    const uint3 idx = block_in_launch_order(launch.grid, launch.cfg.cluster, b, &rank);
    blocks.push_back(std::make_unique<Block>(&launch, idx, launch.threads_per_block));
    if (rank == 0) clusters.push_back(std::make_unique<Cluster>());
    Cluster& cluster = *clusters.back();
    blocks.back()->cluster = &cluster;
    blocks.back()->cluster_rank = rank;
    cluster.blocks.push_back(blocks.back().get());
    cluster.nthreads += launch.threads_per_block;
    launch.running.push_back(blocks.back().get());
    nwarps += static_cast<unsigned>(blocks.back()->warps.size());
  }
  // TSan identities (kTsanIdentities): one per warp thread, plus one per lane for the first `per_lane` warps
  // and one per warp for the others. Kernels run the same code in every warp, so a race between the lanes of
  // one warp shows in the first warps too.
  const int budget = kTsanIdentities - 2 * static_cast<int>(nwarps);
  const unsigned per_lane = budget > 0 ? static_cast<unsigned>(budget / 31) : 0;
  if (tsan_enabled() && budget < 0)
    note_once("fr_emu: note: %u warps at once are more than ThreadSanitizer tracks precisely (%d threads and "
              "fibers): some races may go unreported; use fewer blocks or threads\n", nwarps, kTsanIdentities);
  unsigned index = 0;
  for (auto& b : blocks)
    for (auto& w : b->warps) w->tsan_fiber_per_lane = index++ < per_lane;
  launch.warps_running.store(nwarps);
  for (auto& b : blocks)
    for (auto& w : b->warps) {
      Warp* warp = w.get();
      warp->thread = std::thread([warp] { warp->run(); });
    }

  // The watchdog: the launching thread waits for the warps and ends the program when none makes progress.
  using Clock = std::chrono::steady_clock;
  uint64_t seen = launch.progress.load(std::memory_order_relaxed);
  Clock::time_point last = Clock::now();
  {
    std::unique_lock<std::mutex> lock(launch.done_mutex);
    while (launch.warps_running.load() > 0) {
      launch.done_cv.wait_for(lock, std::chrono::milliseconds(20));
      const uint64_t now_seen = launch.progress.load(std::memory_order_relaxed);
      const Clock::time_point now = Clock::now();
      if (now_seen != seen) {
        seen = now_seen;
        last = now;
      } else if (std::chrono::duration<double>(now - last).count() > launch.cfg.stall_seconds) {
        report_deadlock(launch, std::chrono::duration<double>(now - last).count());
      }
    }
  }
  for (auto& b : blocks)
    for (auto& w : b->warps) w->thread.join();
  launch.running.clear();
}

}  // namespace

void Launch::check_coresident(size_t smem_per_block) const {
  if (!cfg.cooperative) return;
  const Residency r = blocks_per_sm(cfg, threads_per_block, smem_per_block);
  const unsigned long long most = static_cast<unsigned long long>(r.per_sm) * cfg.device.sm_count;
  if (nblocks > most)
    fail("cooperative launch refused (cudaErrorCooperativeLaunchTooLarge): %u blocks of %u threads with %zu bytes "
         "of shared memory cannot all be resident: at most %u per SM (limited by %s) x %d SMs = %llu",
         nblocks, threads_per_block, smem_per_block, r.per_sm, r.limit, cfg.device.sm_count, most);
}

void Launch::block_arrived_at_grid() {
  std::lock_guard<std::mutex> lock(grid_mutex);
  if (++grid_blocks_arrived < nblocks) return;
  grid_blocks_arrived = 0;
  grid_generation.fetch_add(1, std::memory_order_relaxed);
  progress.fetch_add(1, std::memory_order_relaxed);
  grid_cv.notify_all();
}

void Launch::wait_grid(uint64_t generation) {
  std::unique_lock<std::mutex> lock(grid_mutex);
  grid_cv.wait(lock, [&] { return grid_generation.load(std::memory_order_relaxed) != generation; });
}

void Launch::warp_finished() {
  {
    std::lock_guard<std::mutex> lock(done_mutex);
    warps_running.fetch_sub(1);
  }
  done_cv.notify_one();
}

void launch_impl(const LaunchConfig& cfg, const std::function<void()>& body) {
  if (tls_lane) fail("fr_emu::launch called from inside a kernel (dynamic parallelism is not emulated)");
  Launch launch;
  launch.cfg = cfg;
  launch.body = &body;
  launch.grid = cfg.grid;
  launch.block = cfg.block;
  const dim3 g = cfg.grid, b = cfg.block;
  const unsigned long long threads = 1ull * b.x * b.y * b.z, blocks = 1ull * g.x * g.y * g.z;
  if (threads == 0 || threads > 1024 || b.z > 64)
    fail("invalid block (%u,%u,%u): 1 to 1024 threads, z at most 64 (cudaErrorInvalidConfiguration)", b.x, b.y, b.z);
  if (blocks == 0 || g.y > 65535 || g.z > 65535 || blocks > 0xffffffffull)
    fail("invalid grid (%u,%u,%u) (cudaErrorInvalidConfiguration)", g.x, g.y, g.z);
  if (cfg.dynamic_smem > cfg.device.smem_per_block_optin)
    fail("%zu bytes of dynamic shared memory, more than the device's opt-in limit of %zu per block",
         cfg.dynamic_smem, cfg.device.smem_per_block_optin);
  const dim3 c = cfg.cluster;
  const unsigned long long csize = 1ull * c.x * c.y * c.z;
  if (csize == 0 || g.x % c.x || g.y % c.y || g.z % c.z)
    fail("cluster (%u,%u,%u) does not divide the grid (%u,%u,%u) (cudaErrorInvalidClusterSize)", c.x, c.y, c.z, g.x,
         g.y, g.z);
  if (csize > (cfg.non_portable_cluster_size ? 16u : 8u))
    fail("cluster (%u,%u,%u) of %llu blocks: at most 8 (16 with cudaFuncAttributeNonPortableClusterSizeAllowed) "
         "(cudaErrorClusterOutOfResources)", c.x, c.y, c.z, csize);
  launch.threads_per_block = static_cast<unsigned>(threads);
  launch.nblocks = static_cast<unsigned>(blocks);
  launch.cluster_size = static_cast<unsigned>(csize);
  launch.check_coresident(cfg.dynamic_smem);
  // A wave holds whole clusters: the blocks of a cluster run together, as the GPU guarantees.
  const unsigned by_threads = std::max(1u, kMaxThreadsPerWave / launch.threads_per_block);
  const unsigned wave = cfg.cooperative ? launch.nblocks
                        : std::min(launch.nblocks, std::max(1u, by_threads / launch.cluster_size) * launch.cluster_size);
  launch.threads_per_wave = wave * launch.threads_per_block;
  for (unsigned first = 0; first < launch.nblocks; first += wave)
    run_wave(launch, first, std::min(wave, launch.nblocks - first));
}

}  // namespace detail
}  // namespace fr_emu
