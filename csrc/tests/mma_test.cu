// The tensor-core kernels for the GPU, outside the extension: the mma test kernels, and the
// tensor-core forward kernels (also in the extension). scripts/cuda_compile_check.sh
// compiles this file for each architecture it checks and reports each kernel's resources and
// tensor-core instructions.
#include "../cuda/mma_kernels.cuh"
#include "mma_test_kernels.cuh"

namespace glmix {
namespace mma_test {
template __global__ void mma_tile_test<Bf16>(const uint16_t*, const uint16_t*, const uint16_t*, const float*, float*,
                                             float*, float*, uint32_t*);
template __global__ void mma_tile_test<F16>(const uint16_t*, const uint16_t*, const uint16_t*, const float*, float*,
                                            float*, float*, uint32_t*);
}  // namespace mma_test
}  // namespace glmix

namespace glmix {
namespace GLMIX_CUDA_NS {
namespace tc {
#define GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(E, CP)                                                                  \
  template __global__ void cluster_fwd_chunk_mma<E, CP>(const uint16_t*, int64_t, int64_t, int64_t, const float*, \
                                                        int64_t, int64_t, int64_t, int, int, int, int64_t, int,   \
                                                        float*, float*, float*);
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(Bf16, 16)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(Bf16, 32)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(Bf16, 64)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(Bf16, 128)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(Bf16, 256)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(F16, 16)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(F16, 32)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(F16, 64)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(F16, 128)
GLMIX_INSTANTIATE_CLUSTER_FWD_MMA(F16, 256)
#define GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(E, CP)                                                                     \
  template __global__ void dispatch_fwd_mma<E, CP>(const uint16_t*, int64_t, int64_t, int64_t, const float*, int64_t, \
                                                   int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t,      \
                                                   int64_t, int, int, int, uint16_t*, float*);
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(Bf16, 16)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(Bf16, 32)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(Bf16, 64)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(Bf16, 128)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(Bf16, 256)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(F16, 16)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(F16, 32)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(F16, 64)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(F16, 128)
GLMIX_INSTANTIATE_DISPATCH_FWD_MMA(F16, 256)
}  // namespace tc
}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
