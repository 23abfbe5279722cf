// Data in and out of the emulated kernel drivers (tests/emu/kernels_*.cpp), read and written by
// tests/test_cuda_emulated.py. A file is a text header, then the arrays' raw bytes in header order:
//
//   fused_rnn-emu
//   param <name> <integer>            any number of these
//   array <name> <element bytes> <count>
//   end
//   <bytes of the first array><bytes of the second array>...
//
// Arrays are host buffers of exactly their size (so AddressSanitizer sees one element past the end).
//
// FR_INSTANCES (a define, default all): a bit mask of the (cell, dtype) kernel instances a build
// compiles, bit cell * 4 + dtype in the numbering of recurrence_params.h. The sanitizer builds
// compile only what their tests run: most of a build's time is spent instantiating kernels.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <deque>
#include <vector>

#ifndef FR_INSTANCES
#define FR_INSTANCES 0xFFFF
#endif

namespace kernels_io {

// Included after a kernel header (which brings fused_rnn's Cell, DType, __half, __nv_bfloat16).
template <typename S> constexpr fused_rnn::DType dtype_of() {
  using fused_rnn::DType;
  return std::is_same<S, double>::value ? DType::Float64
         : std::is_same<S, __half>::value ? DType::Float16
         : std::is_same<S, __nv_bfloat16>::value ? DType::BFloat16 : DType::Float32;
}
// Whether this build compiles the kernels of (C, S) (FR_INSTANCES).
template <fused_rnn::Cell C, typename S> constexpr bool built() {
  return (FR_INSTANCES >> (int(C) * 4 + int(dtype_of<S>()))) & 1;
}

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "driver: %s\n", what.c_str());
  std::exit(2);
}

// One array: `count` elements of `elem` bytes, heap-allocated at exactly that size.
struct Array {
  size_t elem = 0, count = 0;
  std::unique_ptr<unsigned char[]> bytes;
  size_t size() const { return elem * count; }
  template <typename T> T* as() { return reinterpret_cast<T*>(bytes.get()); }
};

struct File {
  std::map<std::string, int64_t> params;
  std::deque<std::pair<std::string, Array>> arrays;  // deque: references stay valid

  int64_t param(const std::string& name) const {
    auto it = params.find(name);
    if (it == params.end()) fail("missing param " + name);
    return it->second;
  }
  Array* find(const std::string& name) {
    for (auto& a : arrays)
      if (a.first == name) return &a.second;
    return nullptr;
  }
  Array& get(const std::string& name) {
    Array* a = find(name);
    if (a == nullptr) fail("missing array " + name);
    return *a;
  }
  // A new array filled with 0xFF bytes: NaN in every floating-point type, so an element the
  // kernel forgets to write shows as NaN in the comparison.
  Array& add(const std::string& name, size_t elem, size_t count) {
    Array a;
    a.elem = elem;
    a.count = count;
    a.bytes.reset(new unsigned char[a.size() ? a.size() : 1]);
    std::memset(a.bytes.get(), 0xFF, a.size());
    arrays.emplace_back(name, std::move(a));
    return arrays.back().second;
  }
};

inline File read(const char* path) {
  std::FILE* f = std::fopen(path, "rb");
  if (f == nullptr) fail(std::string("cannot open ") + path);
  File file;
  char line[512];
  if (!std::fgets(line, sizeof line, f) || std::strncmp(line, "fused_rnn-emu", 13) != 0) fail("bad header");
  std::vector<std::pair<std::string, std::pair<size_t, size_t>>> shapes;
  while (std::fgets(line, sizeof line, f)) {
    char kind[16], name[128];
    long long a = 0, b = 0;
    if (std::strncmp(line, "end", 3) == 0) break;
    const int n = std::sscanf(line, "%15s %127s %lld %lld", kind, name, &a, &b);
    if (n == 3 && std::strcmp(kind, "param") == 0)
      file.params[name] = a;
    else if (n == 4 && std::strcmp(kind, "array") == 0)
      shapes.push_back({name, {size_t(a), size_t(b)}});
    else
      fail(std::string("bad header line: ") + line);
  }
  for (auto& s : shapes) {
    Array& a = file.add(s.first, s.second.first, s.second.second);
    if (std::fread(a.bytes.get(), 1, a.size(), f) != a.size()) fail("short read of " + s.first);
  }
  std::fclose(f);
  return file;
}

inline void write(const char* path, File& file) {
  std::FILE* f = std::fopen(path, "wb");
  if (f == nullptr) fail(std::string("cannot write ") + path);
  std::fprintf(f, "fused_rnn-emu\n");
  for (auto& p : file.params) std::fprintf(f, "param %s %lld\n", p.first.c_str(), (long long)p.second);
  for (auto& a : file.arrays)
    std::fprintf(f, "array %s %zu %zu\n", a.first.c_str(), a.second.elem, a.second.count);
  std::fprintf(f, "end\n");
  for (auto& a : file.arrays) std::fwrite(a.second.bytes.get(), 1, a.second.size(), f);
  std::fclose(f);
}

// Fails unless `again` holds the same bytes as `first` in every array (race-free kernels give the
// same bits on every run).
inline void require_same(File& first, File& again, int64_t run) {
  for (auto& a : first.arrays)
    if (std::memcmp(a.second.bytes.get(), again.get(a.first).bytes.get(), a.second.size()) != 0)
      fail("run " + std::to_string(run) + " differs from run 0 in " + a.first);
}

}  // namespace kernels_io
