// What a lane calls: the barrier and warp-collective intrinsics of cuda_emu.h.
//
// Each records its request in the lane's own record, switches to its warp thread (warp.cpp), and continues
// when the warp thread has resolved the request. Barriers that order memory in CUDA (__syncthreads, the grid
// sync, __syncwarp, and warp_allgather like it) release the lane's history to a TSan object before blocking and
// acquire it after: every lane of the round then happens-after every lane's arrival. Shuffles and votes order
// nothing in CUDA, so they add nothing.
#include "runtime.h"

namespace fr_emu {
namespace detail {

thread_local uint3 tls_thread_idx{};
thread_local uint3 tls_block_idx{};
thread_local uint3 tls_block_dim{};
thread_local uint3 tls_grid_dim{};
thread_local Lane* tls_lane = nullptr;

namespace {

Lane& current(const char* what) {
  Lane* lane = tls_lane;
  if (!lane) fail("%s called outside a kernel launch (fr_emu::launch)", what);
  return *lane;
}

// Hands the lane to its warp thread until the request is resolved. Called inside a TsanIgnore scope, which is
// paused across the switch (switch_context itself is not instrumented).
void wait_for_warp(Lane& me, Wait wait, const char* file, int line) {
  me.wait = wait;
  me.file = file;
  me.line = line;
  TsanIgnorePause pause;
  switch_context(me.ctx, me.warp->scheduler);
}

void check_mask(const Lane& me, unsigned mask, const char* what, const char* file, int line) {
  if (!(mask >> me.lane & 1u))
    fail("%s (%s:%d): lane %d (%s) calls it with mask 0x%08x, which does not name the lane itself", what, file, line,
         me.lane, me.name, mask);
}

// A warp collective; `round`: its TSan object when the collective orders memory (__syncwarp, allgather).
void collective(Lane& me, Op op, unsigned mask, const char* file, int line, TsanSync* round) {
  check_mask(me, mask, op_name(op), file, line);
  me.op = op;
  me.mask = mask;
  if (round) tsan_release(round);
  wait_for_warp(me, Wait::Collective, file, line);
  if (round) tsan_acquire(round);
}

TsanSync* round_of(Lane& me, unsigned mask) {
  MaskRounds& r = me.warp->rounds_for(mask);
  return &r.objects[r.rounds % 2];
}

}  // namespace

void syncthreads(const char* file, int line) {
  Lane& me = current("__syncthreads()");
  TsanIgnore bookkeeping;
  Block& block = *me.warp->block;
  TsanSync* round = &block.sync_objects[block.generation.load(std::memory_order_relaxed) % 2];
  tsan_release(round);
  wait_for_warp(me, Wait::SyncThreads, file, line);
  tsan_acquire(round);
}

void grid_sync(const char* file, int line) {
  Lane& me = current("fr_grid_sync()");
  TsanIgnore bookkeeping;
  Launch& launch = *me.warp->block->launch;
  if (!launch.cfg.cooperative)
    fail("fr_grid_sync() at %s:%d in a launch that is not cooperative (%s): the grid group is only valid in a "
         "cooperative launch (cudaLaunchCooperativeKernel)", file, line, me.name);
  TsanSync* round = &launch.grid_sync_objects[launch.grid_generation.load(std::memory_order_relaxed) % 2];
  tsan_release(round);
  wait_for_warp(me, Wait::GridSync, file, line);
  tsan_acquire(round);
}

void syncwarp(unsigned mask, const char* file, int line) {
  Lane& me = current("__syncwarp()");
  TsanIgnore bookkeeping;
  me.width = 32;
  me.bytes = 0;
  collective(me, Op::SyncWarp, mask, file, line, round_of(me, mask));
}

uint64_t shuffle(unsigned mask, uint64_t value, Shuffle kind, int arg, int width, const char* file, int line) {
  static const Op ops[] = {Op::ShflIdx, Op::ShflUp, Op::ShflDown, Op::ShflXor};
  const Op op = ops[static_cast<int>(kind)];
  Lane& me = current(op_name(op));
  TsanIgnore bookkeeping;
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("%s (%s:%d): width %d is not a power of two in [1, 32]", op_name(op), file, line, width);
  me.value = value;
  me.arg = arg;
  me.width = width;
  me.bytes = 0;
  collective(me, op, mask, file, line, nullptr);
  return me.result;
}

unsigned vote(unsigned mask, bool predicate, Vote kind, const char* file, int line) {
  static const Op ops[] = {Op::Ballot, Op::Any, Op::All};
  const Op op = ops[static_cast<int>(kind)];
  Lane& me = current(op_name(op));
  TsanIgnore bookkeeping;
  me.value = predicate;
  me.width = 32;
  me.bytes = 0;
  collective(me, op, mask, file, line, nullptr);
  return static_cast<unsigned>(me.result);
}

unsigned active_mask() {
  Lane& me = current("__activemask()");
  TsanIgnore bookkeeping;
  return me.warp->live_mask();
}

void* shared_static(size_t bytes, const void* site) {
  return current("FR_SHARED_ARRAY").warp->block->static_shared(bytes, site);
}

void* shared_dynamic() {
  Lane& me = current("FR_SHARED_DYNAMIC");
  return me.warp->block->dynamic_smem;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wtsan"  // "atomic_thread_fence is not supported with -fsanitize=thread": see below
#endif
// ThreadSanitizer ignores fences. The usual pattern — write data; __threadfence(); atomic flag store ... atomic
// flag load; __threadfence(); read data — is modelled with the atomics' addresses: a fence acquires what was
// released at the lane's last atomic, and from then on the lane's atomics release its history at their
// address. (From then on: a little more ordering than CUDA promises, for writes after the fence.)
void fence() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  Lane* me = tls_lane;
  if (!me) return;
  TsanIgnore bookkeeping;
  if (me->last_atomic) tsan_acquire(me->last_atomic);
  me->fenced = true;
}

void atomic_touched(const void* address) {
  Lane* me = tls_lane;
  if (!me) return;
  TsanIgnore bookkeeping;
  if (me->fenced) tsan_release(address);
  me->last_atomic = address;
}

}  // namespace detail

void warp_allgather(unsigned mask, const void* mine, size_t bytes, void* out, const char* file, int line) {
  using namespace detail;
  Lane& me = current("fr_emu::warp_allgather");
  TsanIgnore bookkeeping;
  me.mine = mine;
  me.out = out;
  me.bytes = bytes;
  me.width = 32;
  collective(me, Op::AllGather, mask, file, line, round_of(me, mask));
}

int lane_id() { return detail::current("fr_emu::lane_id").lane; }

}  // namespace fr_emu
