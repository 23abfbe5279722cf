// Half-precision conversions of the emulator (csrc/cuda/emu/half.h when built with -DFR_EMU_OWN_HALF, else the
// CUDA toolkit's), for tests/test_cuda_emu_runtime.py to compare with torch's.
//
//   runtime_half <in.f32> <out.bin>: for each float32 in `in`, writes __float2half_rn bits, __float2bfloat16_rn
//   bits (uint16 each), then __half2float and __bfloat162float of those (float32 each).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/compat.cuh"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  std::vector<float> x;
  for (float v; std::fread(&v, 4, 1, in) == 1;) x.push_back(v);
  std::fclose(in);
  std::vector<uint16_t> h(x.size()), b(x.size());
  std::vector<float> hf(x.size()), bf(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const __half hv = __float2half_rn(x[i]);
    const __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
    std::memcpy(&h[i], &hv, 2);
    std::memcpy(&b[i], &bv, 2);
    hf[i] = __half2float(hv);
    bf[i] = __bfloat162float(bv);
  }
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::fwrite(h.data(), 2, h.size(), out);
  std::fwrite(b.data(), 2, b.size(), out);
  std::fwrite(hf.data(), 4, hf.size(), out);
  std::fwrite(bf.data(), 4, bf.size(), out);
  std::fclose(out);
  return 0;
}
