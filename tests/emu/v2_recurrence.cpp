// The persistent v2 kernels in the CPU emulator (tests/test_cuda_persistent_v2.py); arguments and
// files as tests/emu/v2_recurrence.h says. Device memory is host memory of exactly the asked size
// (AddressSanitizer sees any overrun), filled with 0xFF bytes.
//
// Built with -DFR_V2_MUTABLE, the planted bug of the kernels' FR_PERSISTENT_V2_MUTATION comes from
// $FR_V2_MUTATION (one build for every mutation test).
#ifdef FR_V2_MUTABLE
int fr_v2_mutation = 0;
#define FR_PERSISTENT_V2_MUTATION fr_v2_mutation
#endif
#include "v2_recurrence.h"

#include <cstring>
#include <memory>

namespace {

class EmuDevice {
 public:
  void* fresh(size_t bytes) {
    buffers_.emplace_back(new unsigned char[bytes ? bytes : 1]);
    std::memset(buffers_.back().get(), 0xFF, bytes);
    return buffers_.back().get();
  }
  void* put(const std::vector<unsigned char>& host) {
    void* p = fresh(host.size());
    std::memcpy(p, host.data(), host.size());
    return p;
  }
  void get(const void* p, std::vector<unsigned char>& host) { std::memcpy(host.data(), p, host.size()); }
  void fill(void* p, size_t bytes, int value) { std::memset(p, value, bytes); }
  // A cooperative launch: the kernels have no grid barrier, but their flag waits need every CTA resident.
  template <typename... KArgs, typename... Args>
  float launch(void (*kernel)(KArgs...), dim3 grid, size_t smem, Args... args) {
    fr_emu::LaunchConfig cfg;
    cfg.grid = grid;
    cfg.block = dim3(fused_rnn::kV2Threads, 1, 1);
    cfg.dynamic_smem = smem;
    cfg.cooperative = true;
    cfg.stall_seconds = 60;
    fr_emu::launch(cfg, kernel, args...);
    return 0.f;  // no timing in the emulator
  }

 private:
  std::vector<std::unique_ptr<unsigned char[]>> buffers_;
};

}  // namespace

int main(int argc, char** argv) {
#ifdef FR_V2_MUTABLE
  if (const char* m = std::getenv("FR_V2_MUTATION")) fr_v2_mutation = std::atoi(m);
#endif
  EmuDevice dev;
  return v2_driver::run_main(dev, argc, argv);
}
