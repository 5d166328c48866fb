// Small deliberately broken kernels that each detector of the emulation must catch, run by
// tests/test_emulation.py through glmix_emulated::selftest(name). Built only with the emulation.
#define GLMIX_CUDA_EMULATION 1
#include <string>
#include <vector>

#include <torch/library.h>

#include "../device.cuh"
#include "../host.cuh"
#include "../launch.cuh"

namespace glmix {
namespace GLMIX_CUDA_NS {
namespace selftest {

constexpr int kN = 64;  // threads per block

// out[t] = the value thread t + 1 wrote to shared memory; `sync` orders the write and the read.
__global__ void neighbour(float* out, bool sync) {
  GLMIX_DYNAMIC_SMEM(float, sh);
  const int t = threadIdx.x;
  sh[t] = static_cast<float>(t);
  if (sync) __syncthreads();
  out[t] = sh[(t + 1) % kN];
}

// Writes one element past its output: the sentinel margin catches it.
__global__ void one_past(float* out) { out[threadIdx.x + 1] = 1.f; }

// Reads shared memory nobody wrote: NaN.
__global__ void uninitialised(float* out) {
  GLMIX_DYNAMIC_SMEM(float, sh);
  __syncthreads();
  out[threadIdx.x] = sh[threadIdx.x];
}

// Half of the block leaves before the barrier the other half waits at.
__global__ void early_exit(float* out) {
  if (threadIdx.x >= kN / 2) return;
  __syncthreads();
  out[threadIdx.x] = 0.f;
}

// The two halves of the block wait at different barriers.
__global__ void split_barrier(float* out) {
  if (threadIdx.x < kN / 2)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 0.f;
}

// A shuffle with half the warp in its mask.
__global__ void partial_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffu, 1.f, 1); }

// Half of each warp shuffles, the other half does not.
__global__ void divergent_warp(float* out) {
  float v = 1.f;
  if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// The shuffles working: out[t] = sum of the lane numbers of t's warp, then lane t ^ 5's value.
__global__ void warp_sums(float* out) {
  const float s = warp_sum(static_cast<float>(threadIdx.x & 31));
  const float idx = __shfl_sync(0xffffffffu, static_cast<float>(threadIdx.x), (threadIdx.x & 31) ^ 5);
  out[threadIdx.x] = s * 1000.f + idx;
}

at::Tensor run(const std::string& name) {
  const DeviceGuard guard(at::Device(at::kCPU));
  at::Tensor out = empty_output({kN}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const size_t smem = kN * sizeof(float);
  const dim3 one(1), block(kN);
  if (name == "race")
    launch(neighbour, one, block, smem, 0, o, false);
  else if (name == "no_race")
    launch(neighbour, one, block, smem, 0, o, true);
  else if (name == "one_past")
    launch(one_past, one, block, 0, 0, o);
  else if (name == "uninitialised")
    launch(uninitialised, one, block, smem, 0, o);
  else if (name == "early_exit")
    launch(early_exit, one, block, 0, 0, o);
  else if (name == "split_barrier")
    launch(split_barrier, one, block, 0, 0, o);
  else if (name == "partial_mask")
    launch(partial_mask, one, block, 0, 0, o);
  else if (name == "divergent_warp")
    launch(divergent_warp, one, block, 0, 0, o);
  else if (name == "warp_sums")
    launch(warp_sums, one, block, 0, 0, o);
  else
    TORCH_CHECK(false, "selftest: unknown kernel '", name, "'");
  return out.clone();
}

}  // namespace selftest
}  // namespace GLMIX_CUDA_NS
}  // namespace glmix

TORCH_LIBRARY_FRAGMENT(glmix_emulated, m) {
  m.def("selftest(str name) -> Tensor",
        [](c10::string_view name) { return glmix::GLMIX_CUDA_NS::selftest::run(std::string(name)); });
  // The tensor-core kernels' split of L, {chunk length, chunks}, on the emulated device (its single
  // SM; sm_count = 0) or on a device of sm_count SMs: tests/test_emulation.py checks that small test
  // grids split.
  m.def("mma_chunks(int L, int tile, int blocks_per_chunk, int sm_count=0) -> int[]",
        [](int64_t L, int64_t tile, int64_t blocks_per_chunk, int64_t sm_count) {
          auto dev = glmix::GLMIX_CUDA_NS::device_props();
          if (sm_count > 0) dev.sm_count = sm_count;
          const auto ch = glmix::plan::plan_mma_chunks(L, static_cast<int>(tile), blocks_per_chunk, dev);
          return std::vector<int64_t>{ch.len, ch.n};
        });
  // The backward's kernels at C channels on a device offering smem_optin bytes per block
  // (mma_bwd_kernels, which use_mma_bwd asks): "narrow", "wide" or "cuda_cores". The emulated
  // device is an H100.
  m.def("mma_bwd_kernels(int C, bool fp32, bool dispatch, int smem_optin) -> str",
        [](int64_t C, bool fp32, bool dispatch, int64_t smem_optin) {
          using glmix::GLMIX_CUDA_NS::BwdKernels;
          const BwdKernels k =
              glmix::GLMIX_CUDA_NS::mma_bwd_kernels(C, fp32, dispatch, static_cast<size_t>(smem_optin));
          return std::string(k == BwdKernels::kNarrow ? "narrow" : k == BwdKernels::kWide ? "wide" : "cuda_cores");
        });
  // Whether the backward takes the fused kernel (fused_bwd_applies) on the emulated device or on one
  // of sm_count SMs, where it takes the tensor-core backward at all (fp16/bf16, or fp32).
  m.def("fused_bwd(int B, int L, int S, int C, bool fp32, bool dispatch, int sm_count=0) -> bool",
        [](int64_t B, int64_t L, int64_t S, int64_t C, bool fp32, bool dispatch, int64_t sm_count) {
          auto dev = glmix::GLMIX_CUDA_NS::device_props();
          if (sm_count > 0) dev.sm_count = sm_count;
          return glmix::GLMIX_CUDA_NS::fused_bwd_applies(B, L, S, C, fp32, dispatch, dev);
        });
  // The same for the forward (use_mma_fwd's shared-memory test).
  m.def("mma_fwd_fits(int C, bool fp32, bool dispatch, int smem_optin) -> bool",
        [](int64_t C, bool fp32, bool dispatch, int64_t smem_optin) {
          return glmix::GLMIX_CUDA_NS::mma_fwd_fits(C, fp32, dispatch, static_cast<size_t>(smem_optin));
        });
}
