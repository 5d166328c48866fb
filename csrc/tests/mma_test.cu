// The mma test kernels for the GPU: scripts/cuda_compile_check.sh compiles this file for each
// architecture it checks and counts the tensor-core instructions of each kernel.
#include "mma_test_kernels.cuh"

namespace glmix {
namespace mma_test {
template __global__ void mma_tile_test<Bf16>(const uint16_t*, const uint16_t*, const uint16_t*, const float*, float*,
                                             float*, float*, uint32_t*);
template __global__ void mma_tile_test<F16>(const uint16_t*, const uint16_t*, const uint16_t*, const float*, float*,
                                            float*, float*, uint32_t*);
}  // namespace mma_test
}  // namespace glmix
