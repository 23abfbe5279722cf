// The emulated kernel drivers as one program (tests/test_cuda_emulated.py builds it in each mode; its
// translation units compile in parallel):
//   kernels pointwise ...    the per-step kernels (kernels_pointwise.cpp)
//   kernels persistent ...   the persistent kernels and their plan (kernels_persistent.cpp)
#include <cstdio>
#include <cstring>

int pointwise_main(int argc, char** argv);
int persistent_main(int argc, char** argv);

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "pointwise") == 0) return pointwise_main(argc, argv);
  if (argc > 1 && std::strcmp(argv[1], "persistent") == 0) return persistent_main(argc, argv);
  std::fprintf(stderr, "usage: kernels pointwise|persistent ...\n");
  return 2;
}
