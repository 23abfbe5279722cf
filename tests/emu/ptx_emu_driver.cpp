// Runs one csrc/cuda/ptx.cuh test case (tests/emu/ptx_test_kernels.cuh) in the CPU emulator.
#include "ptx_test_kernels.cuh"

#include <memory>

namespace {

// Device memory of the emulator: host buffers that live until the program ends.
class EmuDevice {
 public:
  template <typename T>
  T* alloc(size_t n) {
    buffers_.emplace_back(new unsigned char[n * sizeof(T) + 1]);  // +1: a valid pointer for n == 0
    std::memset(buffers_.back().get(), 0xFF, n * sizeof(T));
    return reinterpret_cast<T*>(buffers_.back().get());
  }
  template <typename T>
  T* upload(const std::vector<T>& v) {
    T* p = alloc<T>(v.size());
    std::memcpy(p, v.data(), v.size() * sizeof(T));
    return p;
  }
  template <typename T>
  std::vector<T> download(const T* p, size_t n) {
    return std::vector<T>(p, p + n);
  }
  template <typename... KArgs, typename... Args>
  void launch(dim3 grid, dim3 block, bool cooperative, void (*kernel)(KArgs...), Args... args) {
    fr_emu::LaunchConfig cfg;
    cfg.grid = grid;
    cfg.block = block;
    cfg.cooperative = cooperative;
    fr_emu::launch(cfg, kernel, args...);
  }

 private:
  std::vector<std::unique_ptr<unsigned char[]>> buffers_;
};

}  // namespace

int main(int argc, char** argv) {
  EmuDevice dev;
  return ptx_test::run_case(dev, argc, argv);
}
