// The CUDA host and device code of cluster.cu compiled by the host compiler under the emulation
// (csrc/cuda/emulation.h): the "cuda_emulated" backend.
#define GLMIX_CUDA_EMULATION 1
#include "../cluster.cu"
