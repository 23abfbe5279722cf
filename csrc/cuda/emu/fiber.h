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
// ends with switch_context(..., /*from_exits=*/true).
void init_fiber(Context& ctx, void* stack, size_t size, const char* name, void (*entry)());
// Switches from the running context `from` to `to`; returns when something switches back to `from`.
// from_exits: `from` will never run again (ASan frees its fake stack).
void switch_context(Context& from, Context& to, bool from_exits = false);
// Completes ASan's bookkeeping at a fiber's first instruction; records the stack it came from in `from`.
void fiber_started(Context& from);
void destroy_fiber(Context& ctx);

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
  bool sync_;
};
void tsan_release(const void* address);
void tsan_acquire(const void* address);
// ASan: marks a range addressable again (a dead fiber's stack keeps its frames' redzones poisoned).
void asan_unpoison(const void* address, size_t size);

}  // namespace detail
}  // namespace fr_emu
