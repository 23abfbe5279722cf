// Lane fibers: stacks, context switches, and their registration with ThreadSanitizer and AddressSanitizer.
//
// A warp's OS thread runs its lanes as ucontext fibers. Both sanitizers need to know about every switch:
// TSan keeps one logical thread per fiber (so races between lanes of one warp are seen), and a switch is
// registered with the flag that makes it carry no happens-before — ordering between lanes comes only from the
// barriers (runtime.h). ASan must learn the stack it is switching to, or it reports stack accesses of one
// fiber as overflows of another.
#pragma once

#include <ucontext.h>

#include <cstddef>

#if defined(__SANITIZE_THREAD__)
#define FR_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FR_EMU_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define FR_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FR_EMU_ASAN 1
#endif
#endif

namespace fr_emu {
namespace detail {

// One execution context: a lane fiber, or a warp thread's own stack.
struct Context {
  ucontext_t uc;
  void* tsan_fiber = nullptr;
  const void* stack_bottom = nullptr;  // for ASan's fiber switch
  size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
};

// Makes `self` describe the calling OS thread's own context (the warp thread before it starts lanes).
void init_thread_context(Context& self);
// Makes `ctx` a fresh fiber on `stack` that calls entry() when first switched to. entry must never return: it
// ends with switch_context(..., /*from_exits=*/true). `tsan_fiber`: the ThreadSanitizer identity it runs as
// (from create_tsan_fiber; several contexts may share one).
void init_fiber(Context& ctx, void* stack, size_t size, void* tsan_fiber, void (*entry)());
// A new ThreadSanitizer fiber (nullptr without TSan). Created by the warp thread before any lane runs, it
// inherits the launching thread's history (the kernel's inputs) and nothing later.
void* create_tsan_fiber(const char* name);
void destroy_tsan_fiber(void* fiber);
// ThreadSanitizer (clang 16, and g++ 12's) tracks at most 256 threads and fibers at once with full precision:
// beyond that, threads share its clock slots and races between them go unseen. This many TSan identities are
// left to the emulator (the rest: the process's own threads).
constexpr int kTsanIdentities = 240;
// Switches from the running context `from` to `to`; returns when something switches back to `from`.
// from_exits: `from` will never run again (ASan frees its fake stack).
void switch_context(Context& from, Context& to, bool from_exits = false);
// Completes ASan's bookkeeping at a fiber's first instruction; records the stack it came from in `from`.
void fiber_started(Context& from);

// The stacks of a warp's lanes: one mapping, a guard page below each stack (a stack overflow faults).
class Stacks {
 public:
  Stacks() = default;
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  ~Stacks();
  void allocate(int count, bool guard_pages);
  void* stack(int i) const;
  // Kernel frames are small; AddressSanitizer's redzones make them larger. Sanitizers also pay per mapped
  // byte (shadow memory), so the stacks stay as small as is safe.
#ifdef FR_EMU_ASAN
  static constexpr size_t kStackSize = 256 * 1024;
#else
  static constexpr size_t kStackSize = 64 * 1024;
#endif

 private:
  char* base_ = nullptr;
  size_t bytes_ = 0, stride_ = 0;
};

// ThreadSanitizer: while alive, the calling fiber's memory accesses (and, with sync=true, its
// synchronisation) are invisible to TSan. Runtime bookkeeping runs in these scopes; no-ops without TSan.
class TsanIgnore {
 public:
  explicit TsanIgnore(bool sync = false);
  ~TsanIgnore();
  TsanIgnore(const TsanIgnore&) = delete;
  TsanIgnore& operator=(const TsanIgnore&) = delete;

 private:
  [[maybe_unused]] bool sync_;
};
constexpr bool tsan_enabled() {
#ifdef FR_EMU_TSAN
  return true;
#else
  return false;
#endif
}
// Suspends the enclosing TsanIgnore for a context switch: lanes of one warp may share one TSan identity
// (kTsanIdentities), whose ignore count must not carry a suspended lane's scope into the next lane's code.
class TsanIgnorePause {
 public:
  TsanIgnorePause();
  ~TsanIgnorePause();
  TsanIgnorePause(const TsanIgnorePause&) = delete;
  TsanIgnorePause& operator=(const TsanIgnorePause&) = delete;
};
void tsan_release(const void* address);
void tsan_acquire(const void* address);
// ASan: marks a range addressable again (a dead fiber's stack keeps its frames' redzones poisoned).
void asan_unpoison(const void* address, size_t size);

}  // namespace detail
}  // namespace fr_emu
