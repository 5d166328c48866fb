// The host side's few contacts with the CUDA runtime, so that cluster.cu and dispatch.cu compile
// unchanged for the GPU (nvcc) and for the emulation (the host compiler, GLMIX_CUDA_EMULATION):
// the stream, the device guard, the device's properties, allocation of outputs and workspaces, and
// launch(), the one way every kernel is launched.
#pragma once

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../checks.h"
#include "device.cuh"
#include "plan.h"

#ifndef GLMIX_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace glmix {
namespace GLMIX_CUDA_NS {

inline View view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

#ifndef GLMIX_CUDA_EMULATION

constexpr at::DeviceType kDevice = at::kCUDA;
constexpr const char* kBackend = "cuda";
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }

inline plan::Device device_props() {
  const auto* p = at::cuda::getCurrentDeviceProperties();
  return {p->sharedMemPerBlockOptin, p->multiProcessorCount};
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

inline at::Tensor empty_workspace(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// The tensor-core kernels (mma_kernels.cuh) need sm_80 or newer.
inline bool has_tensor_cores() { return at::cuda::getCurrentDeviceProperties()->major >= 8; }

// Above 48 KB of dynamic shared memory a kernel must opt in. The attribute stays set, so it is set
// once per kernel and device (again only for a larger size), not at every launch.
inline void opt_in_smem(const void* kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> set;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = set[{kernel, device}];
  if (smem <= have) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  have = smem;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, Stream stream, A&&... args) {
  opt_in_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#else  // GLMIX_CUDA_EMULATION

constexpr at::DeviceType kDevice = at::kCPU;
constexpr const char* kBackend = "cuda_emulated";
using Stream = int;

inline Stream current_stream() { return 0; }

// An H100's shared memory, and a single SM: the chunk planning then splits L into few chunks of
// several tiles each, so small test shapes take every path (several blocks per launch, several
// tiles per block).
inline plan::Device device_props() { return {227 * 1024, 1}; }

inline bool has_tensor_cores() { return true; }  // the emulation implements mma.cuh's layout

}  // namespace GLMIX_CUDA_NS

namespace emu {
// Outputs and workspaces of the op in progress sit before (workspaces also after) a margin of a
// sentinel byte pattern, their own elements NaN; check_margins() raises if a kernel wrote over a
// margin. (Outputs start their storage: torch.compile's fake tensors say so.) In
// emulation_host.cpp.
at::Tensor guarded_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool leading_margin);
void check_margins();
void end_op();
}  // namespace emu

namespace GLMIX_CUDA_NS {

// Scopes one op: the guarded buffers of its outputs are forgotten when it returns.
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
  ~DeviceGuard() { emu::end_op(); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return emu::guarded_empty(sizes, options, false);
}

inline at::Tensor empty_workspace(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return emu::guarded_empty(sizes, options, true);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, Stream, A&&... args) {
  TORCH_CHECK(smem <= device_props().smem_optin, "CUDA emulation: ", smem, " bytes of shared memory requested");
  struct Call {
    void (*kernel)(P...);
    std::tuple<P...> params;
  } call{kernel, std::tuple<P...>(std::forward<A>(args)...)};
  emu::run(
      grid, block, smem,
      [](void* c) {
        auto* call = static_cast<Call*>(c);
        std::apply(call->kernel, call->params);
      },
      &call);
  emu::check_margins();
}

#endif  // GLMIX_CUDA_EMULATION

// Host functions of this build: name##_cuda, or name##_cuda_emulated.
#ifdef GLMIX_CUDA_EMULATION
#define GLMIX_CUDA_FN(name) name##_cuda_emulated
#else
#define GLMIX_CUDA_FN(name) name##_cuda
#endif

}  // namespace GLMIX_CUDA_NS
}  // namespace glmix

// float32, float16, bfloat16 only: float64 never reaches these kernels (checked before), so no
// double instantiation is compiled.
#define GLMIX_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
