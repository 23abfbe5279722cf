// Runs one csrc/cuda/ptx.cuh test case (tests/emu/ptx_test_kernels.cuh) on a CUDA GPU: the same
// kernels, input and output files as the emulated driver (ptx_emu_driver.cpp), so the fragment
// tables the emulation follows are checked against the hardware.
#include "ptx_test_kernels.cuh"

#include <tuple>

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "ptx golden: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(3);
  }
}

class GpuDevice {
 public:
  ~GpuDevice() {
    for (void* p : buffers_) cudaFree(p);
  }
  template <typename T>
  T* alloc(size_t n) {
    void* p = nullptr;
    check(cudaMalloc(&p, n * sizeof(T) + 16), "cudaMalloc");
    check(cudaMemset(p, 0xFF, n * sizeof(T)), "cudaMemset");  // poison: unwritten outputs read as NaN
    buffers_.push_back(p);
    return static_cast<T*>(p);
  }
  template <typename T>
  T* upload(const std::vector<T>& v) {
    T* p = alloc<T>(v.size());
    check(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy to device");
    return p;
  }
  template <typename T>
  std::vector<T> download(const T* p, size_t n) {
    std::vector<T> v(n);
    check(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
    return v;
  }
  template <typename... KArgs, typename... Args>
  void launch(dim3 grid, dim3 block, bool cooperative, void (*kernel)(KArgs...), Args... args) {
    if (cooperative) {
      // the flag kernels spin on each other: every block must be resident at once
      std::tuple<KArgs...> exact(args...);  // the kernel's own parameter types, as the launch reads them
      std::apply(
          [&](auto&... a) {
            void* ptrs[] = {static_cast<void*>(&a)...};
            check(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs, 0, nullptr),
                  "cudaLaunchCooperativeKernel");
          },
          exact);
    } else {
      kernel<<<grid, block>>>(args...);
      check(cudaGetLastError(), "launch");
    }
    check(cudaDeviceSynchronize(), "kernel");
  }

 private:
  std::vector<void*> buffers_;
};

}  // namespace

int main(int argc, char** argv) {
  GpuDevice dev;
  return ptx_test::run_case(dev, argc, argv);
}
