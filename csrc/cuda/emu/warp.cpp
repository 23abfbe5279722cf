// A warp: one OS thread that runs its lanes as fibers.
//
// The loop: run every runnable lane until it blocks (at a barrier or a warp collective) or exits; then, with
// no lane runnable, resolve the warp collectives whose lanes have all arrived; if none is pending, every live
// lane waits at a block-level barrier (__syncthreads or the grid sync), which the warp joins as a whole.
// Lanes therefore switch only at barriers, collectives and exit, and a lane that a collective's membermask names
// but that exited or waits elsewhere is found here and reported.
#include <cstdio>
#include <cstring>

#include "runtime.h"

namespace fr_emu {
namespace detail {

namespace {

// First instruction of every lane fiber: run the kernel, then leave for good.
void lane_main() {
  Lane& me = *tls_lane;
  fiber_started(me.warp->scheduler);
  (*me.warp->block->launch->body)();
  Context *self, *scheduler;
  TsanSync* exited;
  {
    TsanIgnore bookkeeping;  // ends before the fiber does: TSan refuses a fiber that ends inside one
    me.wait = Wait::Exited;
    self = &me.ctx;
    scheduler = &me.warp->scheduler;
    exited = &me.warp->exited_sync;
  }
  // The last thing this lane does; after it the host may free the warp, so nothing below reads the warp
  // through instrumented code (switch_context is not instrumented).
  tsan_release(exited);
  switch_context(*self, *scheduler, /*from_exits=*/true);
  __builtin_unreachable();
}

const char* wait_name(const Lane& l) {
  switch (l.wait) {
    case Wait::SyncThreads: return "__syncthreads()";
    case Wait::GridSync: return "fr_grid_sync()";
    case Wait::Collective: return op_name(l.op);
    case Wait::ClusterWait: return "barrier.cluster.wait";
    case Wait::Exited: return "exit";
    default: return "nothing (running)";
  }
}

// The value lane `j` receives from a shuffle; poison (all bits set: NaN) when the source lane is not in the
// mask, where CUDA leaves the result undefined.
uint64_t shuffle_result(const Warp& w, const Lane& j) {
  const int width = j.width, base = j.lane & ~(width - 1), last = base + width - 1;
  int src = j.lane;
  switch (j.op) {
    case Op::ShflIdx: src = base + (j.arg & (width - 1)); break;
    case Op::ShflUp: src = j.lane - j.arg >= base ? j.lane - j.arg : j.lane; break;
    case Op::ShflDown: src = j.lane + j.arg <= last ? j.lane + j.arg : j.lane; break;
    case Op::ShflXor: src = (j.lane ^ (j.arg & 31)) <= last ? j.lane ^ (j.arg & 31) : j.lane; break;
    default: break;
  }
  if (!(j.mask >> src & 1u)) return ~uint64_t{0};
  return w.lanes[src].value;
}

}  // namespace

const char* op_name(Op op) {
  switch (op) {
    case Op::ShflIdx: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    case Op::SyncWarp: return "__syncwarp";
    case Op::AllGather: return "warp_allgather";
  }
  return "?";
}

MaskRounds& Warp::rounds_for(unsigned mask) {
  for (MaskRounds& r : mask_rounds)
    if (r.mask == mask) return r;
  mask_rounds.emplace_back();
  mask_rounds.back().mask = mask;
  return mask_rounds.back();
}

unsigned Warp::live_mask() const {
  unsigned mask = 0;
  for (int i = 0; i < nlanes; ++i)
    if (lanes[i].wait != Wait::Exited) mask |= 1u << i;
  return mask;
}

namespace {

class Scheduler {
 public:
  explicit Scheduler(Warp& w) : w_(w), launch_(*w.block->launch) {}

  void run() {
    Block& block = *w_.block;
    tls_block_idx = block.idx;
    tls_block_dim = launch_.block;
    tls_grid_dim = launch_.grid;
    init_thread_context(w_.scheduler);
    w_.stacks.allocate(w_.nlanes, /*guard_pages=*/launch_.threads_per_wave <= 16384);
    // One TSan identity per lane, or one for the warp (then races between its lanes are not reported; those
    // between warps and blocks still are). launch.cpp decides which warps get which.
    char name[96];
    std::snprintf(name, sizeof name, "block (%u,%u,%u) warp %d", block.idx.x, block.idx.y, block.idx.z, w_.index);
    void* warp_fiber = w_.tsan_fiber_per_lane ? nullptr : create_tsan_fiber(name);
    for (int i = 0; i < w_.nlanes; ++i) {
      Lane& lane = w_.lanes[i];
      init_fiber(lane.ctx, w_.stacks.stack(i), Stacks::kStackSize,
                 w_.tsan_fiber_per_lane ? create_tsan_fiber(lane.name) : warp_fiber, &lane_main);
    }
    for (;;) {
      if (const unsigned exited = run_lanes()) block.lanes_exited(exited);
      if (w_.live_mask() == 0) break;
      if (resolve_collectives()) continue;
      if (wait_at_cluster_barrier()) continue;
      wait_at_block_barrier();
    }
    tsan_acquire(&w_.exited_sync);  // the lanes' writes, for the host thread that joins this one
    if (w_.tsan_fiber_per_lane)
      for (int i = 0; i < w_.nlanes; ++i) destroy_tsan_fiber(w_.lanes[i].ctx.tsan_fiber);
    else
      destroy_tsan_fiber(warp_fiber);
  }

 private:
  // Runs each runnable lane until it blocks or exits; returns how many exited.
  unsigned run_lanes() {
    unsigned exited = 0;
    for (int i = 0; i < w_.nlanes; ++i) {
      Lane& lane = w_.lanes[i];
      if (lane.wait != Wait::Runnable) continue;
      tls_thread_idx = lane.tid;
      tls_lane = &lane;
      switch_context(w_.scheduler, lane.ctx);
      tls_lane = nullptr;
      if (lane.wait == Wait::Exited) ++exited;
      launch_.progress.fetch_add(1, std::memory_order_relaxed);
    }
    return exited;
  }

  [[noreturn]] void mask_error(const Lane& l, int named, const char* why) {
    const Block& b = *w_.block;
    fail("block (%u,%u,%u) warp %d: lane %d (thread %u) calls %s(mask 0x%08x) at %s:%d, but the mask names lane "
         "%d, which %s", b.idx.x, b.idx.y, b.idx.z, w_.index, l.lane, l.linear_tid, op_name(l.op), l.mask, l.file,
         l.line, named, why);
  }

  // Every lane named in l's mask must wait at the same collective with the same mask (and width / size).
  void check_group(const Lane& l) {
    char why[256];
    for (int j = 0; j < 32; ++j) {
      if (!(l.mask >> j & 1u)) continue;
      if (j >= w_.nlanes) {
        std::snprintf(why, sizeof why, "does not exist (this warp has %d lanes)", w_.nlanes);
        mask_error(l, j, why);
      }
      const Lane& o = w_.lanes[j];
      if (o.wait == Wait::Exited) mask_error(l, j, "has exited");
      const bool same = o.wait == Wait::Collective && o.op == l.op && o.mask == l.mask && o.width == l.width &&
                        o.bytes == l.bytes;
      if (!same) {
        std::snprintf(why, sizeof why, "waits at %s%s at %s:%d", wait_name(o),
                      o.wait == Wait::Collective && o.mask != l.mask ? " with another mask" : "", o.file, o.line);
        mask_error(l, j, why);
      }
    }
  }

  void resolve(Lane& l) {
    const unsigned mask = l.mask;
    unsigned ballot = 0;
    for (int j = 0; j < 32; ++j)
      if ((mask >> j & 1u) && w_.lanes[j].value) ballot |= 1u << j;
    for (int j = 0; j < 32; ++j) {
      if (!(mask >> j & 1u)) continue;
      Lane& o = w_.lanes[j];
      switch (o.op) {
        case Op::ShflIdx: case Op::ShflUp: case Op::ShflDown: case Op::ShflXor:
          o.result = shuffle_result(w_, o);
          break;
        case Op::Ballot: o.result = ballot; break;
        case Op::Any: o.result = ballot != 0; break;
        case Op::All: o.result = ballot == mask; break;
        case Op::AllGather:
          for (int k = 0; k < 32; ++k)
            if (mask >> k & 1u)
              std::memcpy(static_cast<char*>(o.out) + k * o.bytes, w_.lanes[k].mine, o.bytes);
          break;
        case Op::SyncWarp: break;
      }
    }
    if (l.op == Op::SyncWarp || l.op == Op::AllGather) ++w_.rounds_for(mask).rounds;
    for (int j = 0; j < 32; ++j)
      if (mask >> j & 1u) w_.lanes[j].wait = Wait::Runnable;
  }

  bool resolve_collectives() {
    bool any = false;
    for (int i = 0; i < w_.nlanes; ++i) {
      Lane& l = w_.lanes[i];
      if (l.wait != Wait::Collective) continue;
      check_group(l);
      resolve(l);
      any = true;
    }
    return any;
  }

  // Lanes that wait at the cluster barrier: the warp thread sleeps until the earliest phase they wait for has
  // completed, then lets those lanes run (each acquires the phase's releases itself). Checked before the block
  // barrier: a lane past its cluster wait may be one the block barrier needs.
  bool wait_at_cluster_barrier() {
    bool any = false;
    uint64_t earliest = 0;
    for (int i = 0; i < w_.nlanes; ++i) {
      const Lane& l = w_.lanes[i];
      if (l.wait != Wait::ClusterWait) continue;
      earliest = any && earliest < l.cluster_phase ? earliest : l.cluster_phase;
      any = true;
    }
    if (!any) return false;
    Cluster& cluster = *w_.block->cluster;
    cluster.wait_past(earliest);
    const uint64_t done = cluster.generation.load(std::memory_order_relaxed);
    for (int i = 0; i < w_.nlanes; ++i) {
      Lane& l = w_.lanes[i];
      if (l.wait == Wait::ClusterWait && l.cluster_phase < done) l.wait = Wait::Runnable;
    }
    return true;
  }

  // Every live lane now waits at __syncthreads or at the grid sync: the warp arrives with all of them.
  void wait_at_block_barrier() {
    const Lane* first = nullptr;
    unsigned count = 0;
    for (int i = 0; i < w_.nlanes; ++i) {
      const Lane& l = w_.lanes[i];
      if (l.wait == Wait::Exited) continue;
      if (first && l.wait != first->wait) {
        const Block& b = *w_.block;
        fail("block (%u,%u,%u) warp %d: lane %d waits at %s (%s:%d) while lane %d waits at %s (%s:%d)", b.idx.x,
             b.idx.y, b.idx.z, w_.index, first->lane, wait_name(*first), first->file, first->line, l.lane,
             wait_name(l), l.file, l.line);
      }
      if (!first) first = &l;
      ++count;
    }
    const Barrier kind = first->wait == Wait::GridSync ? Barrier::GridSync : Barrier::SyncThreads;
    w_.block->arrive_and_wait(kind, count, first->file, first->line);
    for (int i = 0; i < w_.nlanes; ++i)
      if (w_.lanes[i].wait != Wait::Exited) w_.lanes[i].wait = Wait::Runnable;
  }

  Warp& w_;
  Launch& launch_;
};

}  // namespace

void Warp::run() {
  {
    // The scheduler's accesses are bookkeeping: TSan must not see them (they would be reported as races
    // between the warp thread and its lanes, which it switches between without ordering).
    TsanIgnore bookkeeping;
    Scheduler(*this).run();
  }
  block->launch->warp_finished();
}

}  // namespace detail
}  // namespace fr_emu
