// Lane fibers and their sanitizer registration (fiber.h).
#include "fiber.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

// The sanitizers' fiber and annotation interfaces, declared here rather than through <sanitizer/*.h> so that
// g++ and clang++ see the same declarations; the sanitizer runtimes define them.
extern "C" {
#ifdef FR_EMU_TSAN
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
#endif
#ifdef FR_EMU_ASAN
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif
}

namespace fr_emu {
namespace detail {

#ifdef FR_EMU_TSAN
constexpr unsigned kTsanSwitchNoSync = 1;  // __tsan_switch_to_fiber_no_sync: the switch orders nothing
#endif

void init_thread_context(Context& self) {
#ifdef FR_EMU_TSAN
  self.tsan_fiber = __tsan_get_current_fiber();
#else
  (void)self;
#endif
}

void init_fiber(Context& ctx, void* stack, size_t size, void* tsan_fiber, void (*entry)()) {
  if (getcontext(&ctx.uc) != 0) {
    std::perror("fr_emu: getcontext");
    std::exit(87);
  }
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
  ctx.stack_bottom = stack;
  ctx.stack_size = size;
  ctx.tsan_fiber = tsan_fiber;
}

void* create_tsan_fiber(const char* name) {
#ifdef FR_EMU_TSAN
  void* fiber = __tsan_create_fiber(0);
  __tsan_set_fiber_name(fiber, name);
  return fiber;
#else
  (void)name;
  return nullptr;
#endif
}

void destroy_tsan_fiber(void* fiber) {
#ifdef FR_EMU_TSAN
  if (fiber) __tsan_destroy_fiber(fiber);
#else
  (void)fiber;
#endif
}

// Not instrumented by TSan: it runs at the very end of a lane, after its last ordering point (warp.cpp).
__attribute__((no_sanitize("thread"))) void switch_context(Context& from, Context& to, bool from_exits) {
#ifdef FR_EMU_TSAN
  __tsan_switch_to_fiber(to.tsan_fiber, kTsanSwitchNoSync);
#endif
#ifdef FR_EMU_ASAN
  __sanitizer_start_switch_fiber(from_exits ? nullptr : &from.asan_fake_stack, to.stack_bottom, to.stack_size);
#else
  (void)from_exits;
#endif
  swapcontext(&from.uc, &to.uc);
#ifdef FR_EMU_ASAN
  __sanitizer_finish_switch_fiber(from.asan_fake_stack, nullptr, nullptr);
#endif
}

void fiber_started(Context& from) {
#ifdef FR_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &from.stack_bottom, &from.stack_size);
#else
  (void)from;
#endif
}

void Stacks::allocate(int count, bool guard_pages) {
  const size_t page = 4096;
  stride_ = kStackSize + (guard_pages ? page : 0);
  bytes_ = stride_ * static_cast<size_t>(count);
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "fr_emu: error: cannot map %zu bytes of lane stacks\n", bytes_);
    std::exit(87);
  }
  base_ = static_cast<char*>(p);
  if (guard_pages)  // stacks grow down: the guard is the lowest page of each slot
    for (int i = 0; i < count; ++i) mprotect(base_ + stride_ * i, page, PROT_NONE);
}

void* Stacks::stack(int i) const { return base_ + stride_ * (i + 1) - kStackSize; }

Stacks::~Stacks() {
  if (!base_) return;
  asan_unpoison(base_, bytes_);  // the next mapping at this address must not inherit dead frames' redzones
  munmap(base_, bytes_);
}

TsanIgnore::TsanIgnore(bool sync) : sync_(sync) {
#ifdef FR_EMU_TSAN
  __tsan_ignore_thread_begin();
  if (sync_) AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#endif
}

TsanIgnore::~TsanIgnore() {
#ifdef FR_EMU_TSAN
  if (sync_) AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  __tsan_ignore_thread_end();
#endif
}

TsanIgnorePause::TsanIgnorePause() {
#ifdef FR_EMU_TSAN
  __tsan_ignore_thread_end();
#endif
}

TsanIgnorePause::~TsanIgnorePause() {
#ifdef FR_EMU_TSAN
  __tsan_ignore_thread_begin();
#endif
}

void tsan_release(const void* address) {
#ifdef FR_EMU_TSAN
  __tsan_release(const_cast<void*>(address));
#else
  (void)address;
#endif
}

void tsan_acquire(const void* address) {
#ifdef FR_EMU_TSAN
  __tsan_acquire(const_cast<void*>(address));
#else
  (void)address;
#endif
}

void asan_unpoison(const void* address, size_t size) {
#ifdef FR_EMU_ASAN
  __asan_unpoison_memory_region(address, size);
#else
  (void)address;
  (void)size;
#endif
}

}  // namespace detail
}  // namespace fr_emu
