// The persistent v2 kernels on a CUDA GPU, with the emulated tests' files and arguments
// (tests/emu/v2_recurrence.h): the same cases run against the same float64 reference, and with
// $FR_V2_REPEAT > 1 each kernel is launched that many times and the median µs per step printed
// together with whether every repeat wrote the same bytes (bitwise repeatability). The budget's
// tilings are compiled in (FR_V2_BUDGET_TILINGS) for timing at benchmarks/PERSISTENT_V2.md's shapes.
#define FR_V2_BUDGET_TILINGS 1
#include "v2_recurrence.h"

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "v2_gpu: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(3);
  }
}

class GpuDevice {
 public:
  ~GpuDevice() {
    for (void* p : buffers_) cudaFree(p);
  }
  void* fresh(size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc");
    check(cudaMemset(p, 0xFF, bytes), "cudaMemset");  // poison: unwritten outputs read as NaN
    buffers_.push_back(p);
    return p;
  }
  void* put(const std::vector<unsigned char>& host) {
    void* p = fresh(host.size());
    check(cudaMemcpy(p, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy to device");
    return p;
  }
  void get(const void* p, std::vector<unsigned char>& host) {
    check(cudaMemcpy(host.data(), p, host.size(), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
  }
  void fill(void* p, size_t bytes, int value) { check(cudaMemset(p, value, bytes), "cudaMemset"); }
  // A cooperative launch (every CTA resident: the flag waits spin on each other); returns milliseconds.
  template <typename... KArgs, typename... Args>
  float launch(void (*kernel)(KArgs...), dim3 grid, size_t smem, Args... args) {
    const void* k = reinterpret_cast<const void*>(kernel);
    check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "shared memory limit");
    std::tuple<KArgs...> exact(args...);
    cudaEvent_t start, stop;
    check(cudaEventCreate(&start), "event");
    check(cudaEventCreate(&stop), "event");
    check(cudaEventRecord(start), "event");
    std::apply(
        [&](auto&... a) {
          void* ptrs[] = {static_cast<void*>(&a)...};
          check(cudaLaunchCooperativeKernel(k, grid, dim3(fused_rnn::kV2Threads), ptrs, smem, nullptr),
                "cudaLaunchCooperativeKernel");
        },
        exact);
    check(cudaEventRecord(stop), "event");
    check(cudaEventSynchronize(stop), "kernel");
    float ms = 0.f;
    check(cudaEventElapsedTime(&ms, start, stop), "event time");
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return ms;
  }

 private:
  std::vector<void*> buffers_;
};

}  // namespace

int main(int argc, char** argv) {
  GpuDevice dev;
  return v2_driver::run_main(dev, argc, argv);
}
