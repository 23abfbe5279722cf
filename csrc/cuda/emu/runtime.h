// The emulator's internal state: a launch owns blocks, a block owns warps, a warp owns up to 32 lanes.
//
//   launch.cpp   launch_impl: checks, co-residency, blocks in waves, the grid barrier, the deadlock watchdog
//   block.cpp    the block barrier (__syncthreads, and a block's arrival at the grid barrier), shared memory
//   cluster.cpp  thread block clusters: the cluster barrier, shared memory of the cluster's other blocks
//   warp.cpp     the warp's OS thread: runs its lanes until all block, resolves warp collectives, waits at
//                block/grid barriers
//   lane.cpp     what a lane calls (__syncthreads, shuffles, votes, __syncwarp, ...): record the request, switch
//                to the warp thread, pick up the result
//   fiber.cpp    stacks and context switches, registered with ThreadSanitizer and AddressSanitizer
//
// Who touches what: a lane writes only its own Lane record and reads the launch's constant data; its warp
// thread (the "scheduler", same OS thread) reads lane records between switches and writes results into them;
// warps of a block meet only at the block barrier (mutex + condition variable), blocks only at the grid barrier.
//
// ThreadSanitizer sees lanes as fibers whose switches carry no ordering. All runtime bookkeeping runs inside a
// TsanIgnore scope, so the happens-before TSan sees between lanes is exactly the explicit release/acquire pairs
// the barriers add (TsanSync objects below) — the ordering CUDA guarantees, nothing more.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define FR_EMU_RUNTIME_SOURCE  // cuda_emu.h: the runtime needs no half-precision types
#include "cuda_emu.h"
#include "fiber.h"

namespace fr_emu {
namespace detail {

[[noreturn]] void exit_now(int code);  // ends the process with `code` at once
constexpr int kDeadlockExit = 86;
constexpr int kMisuseExit = 87;

// An address used only as a ThreadSanitizer synchronisation object (release/acquire on it).
struct TsanSync {
  char byte = 0;
};

// What a lane is doing from its warp thread's point of view.
enum class Wait : unsigned char { Runnable, SyncThreads, GridSync, Collective, ClusterWait, Exited };

// Warp collectives; lanes named in each other's masks must wait at the same op with the same mask.
enum class Op : unsigned char { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp, AllGather };
const char* op_name(Op op);

struct Warp;
struct Block;
struct Launch;
struct Cluster;

struct Lane {
  Context ctx;
  Warp* warp = nullptr;
  int lane = 0;              // index in the warp, 0..31
  unsigned linear_tid = 0;   // threadIdx linearised (x fastest)
  uint3 tid{};
  char name[64] = {};        // "block (x,y,z) thread (x,y,z)": the TSan fiber name
  Wait wait = Wait::Runnable;
  const char* file = "";     // where it waits
  int line = 0;
  // A pending warp collective.
  Op op = Op::SyncWarp;
  unsigned mask = 0;
  uint64_t value = 0;        // shuffle value / vote predicate
  int arg = 0, width = 32;   // shuffle source lane, delta or lane mask; segment width
  const void* mine = nullptr;  // allgather: this lane's deposit, the lane's receive buffer, their size
  void* out = nullptr;
  size_t bytes = 0;
  uint64_t result = 0;       // written by the warp thread when the collective resolves
  // The TSan model of __threadfence (lane.cpp): the address of the lane's last atomic, and whether a fence
  // has run since which later atomics release at.
  const void* last_atomic = nullptr;
  bool fenced = false;
  // The cluster barrier: whether the lane has arrived and not yet waited, and the phase it arrived at.
  bool cluster_arrived = false;
  uint64_t cluster_phase = 0;
};

// The TSan objects of one membermask's __syncwarp/allgather rounds. Round r uses objects[r % 2]: a lane that
// already left round r cannot reach round r + 2 before every lane of round r has acquired (that needs another
// resolution, which waits until all lanes have run), so no lane acquires a later round's releases.
struct MaskRounds {
  unsigned mask = 0;
  uint64_t rounds = 0;
  TsanSync objects[2];
};

struct Warp {
  Block* block = nullptr;
  int index = 0;
  int nlanes = 0;            // a block whose size is not a multiple of 32 has a short last warp
  Lane lanes[32];
  Context scheduler;         // the OS thread's own stack, which runs the loop in warp.cpp
  Stacks stacks;
  std::deque<MaskRounds> mask_rounds;  // stable addresses; a few distinct masks per kernel
  TsanSync exited_sync;      // every lane releases here on exit; the warp thread acquires (then join -> host)
  bool tsan_fiber_per_lane = true;  // else its lanes share one TSan identity (kTsanIdentities, fiber.h)
  std::thread thread;

  MaskRounds& rounds_for(unsigned mask);
  unsigned live_mask() const;
  void run();                // the OS thread's body (warp.cpp)
};

enum class Barrier : unsigned char { None, SyncThreads, GridSync };

struct Block {
  Launch* launch = nullptr;
  uint3 idx{};
  unsigned nthreads = 0;
  Cluster* cluster = nullptr;  // every block has one (of one block when the launch has no clusters)
  unsigned cluster_rank = 0;
  std::vector<std::unique_ptr<Warp>> warps;

  // Shared memory: the dynamic buffer (allocated at block start) and the static sites (allocated at first use).
  void* dynamic_smem = nullptr;
  std::mutex smem_mutex;
  struct Site {
    const void* key;
    void* memory;
    size_t bytes;
  };
  std::vector<Site> static_smem;
  size_t static_smem_bytes = 0;

  // The block barrier. A block-level barrier completes when every thread that has not exited has arrived
  // (exited threads count as arrived, as on sm_70+); all waiting threads must wait at the same kind.
  std::mutex mutex;
  std::condition_variable cv;
  Barrier pending = Barrier::None;
  unsigned arrived = 0, exited = 0;
  const char* pending_file = "";
  int pending_line = 0;
  std::atomic<uint64_t> generation{0};  // completed __syncthreads rounds; round g uses sync_objects[g % 2]
  TsanSync sync_objects[2];

  Block(Launch* launch, uint3 idx, unsigned nthreads);
  ~Block();
  // Called by a warp thread whose live lanes all wait at `kind`; returns when the barrier completed.
  void arrive_and_wait(Barrier kind, unsigned count, const char* file, int line);
  void lanes_exited(unsigned count);
  void* static_shared(size_t bytes, const void* key);

 private:
  bool complete_if_all_arrived(std::unique_lock<std::mutex>& lock);
};

// A thread block cluster: its blocks by rank and its barrier. The barrier is split (arrive, then wait): a phase
// completes when every thread of the cluster has arrived or exited; a lane waits for the phase it arrived at.
struct Cluster {
  std::vector<Block*> blocks;  // by rank
  unsigned nthreads = 0;
  std::mutex mutex;
  std::condition_variable cv;
  unsigned arrived = 0, exited = 0;
  std::atomic<uint64_t> generation{0};  // completed phases; phase g releases/acquires sync_objects[g % 2]
  TsanSync sync_objects[2];
  unsigned blocks_exited = 0;           // blocks all of whose threads exited (their shared memory is gone)

  void arrive(Launch& launch);          // under the lane's bookkeeping scope
  void lanes_exited(Launch& launch, unsigned count, bool block_done);
  void wait_past(uint64_t phase);       // blocks the warp thread until phase `phase` completed

 private:
  void complete_if_all_arrived(Launch& launch);
};

struct Launch {
  LaunchConfig cfg;
  const std::function<void()>* body = nullptr;
  dim3 grid, block;
  unsigned threads_per_block = 0, nblocks = 0;
  unsigned cluster_size = 1;          // blocks per cluster; blocks run in launch order cluster by cluster
  unsigned threads_per_wave = 0;      // blocks alive at once x threads per block
  std::vector<Block*> running;        // the blocks of the current wave (for the deadlock report)

  // The grid barrier: completes when every block of the grid has arrived. A block whose threads all exited
  // never arrives, so a block that skips fr_grid_sync() deadlocks the launch as on the GPU.
  std::mutex grid_mutex;
  std::condition_variable grid_cv;
  unsigned grid_blocks_arrived = 0;
  std::atomic<uint64_t> grid_generation{0};
  TsanSync grid_sync_objects[2];

  std::atomic<uint64_t> progress{0};  // bumped whenever a lane blocks, exits or a barrier completes
  std::atomic<unsigned> warps_running{0};
  std::mutex done_mutex;
  std::condition_variable done_cv;

  void block_arrived_at_grid();
  void wait_grid(uint64_t generation);
  void warp_finished();
  // Refuses (exit 87) a cooperative grid that could not be resident with `smem_per_block` bytes per block.
  void check_coresident(size_t smem_per_block) const;
};

// The lane running on this OS thread (set by its warp thread before every switch into a lane).
extern thread_local Lane* tls_lane;

}  // namespace detail
}  // namespace fr_emu
