// Host emulation of the CUDA execution model, for running the device code of csrc/cuda/ on CPU
// tensors (the "cuda_emulated" backend; docs/emulation.md). Included instead of the CUDA runtime
// when GLMIX_CUDA_EMULATION is defined; the kernels compile unchanged with the host compiler.
//
// Every CUDA thread of a block is a fiber with its own stack; blocks run one after another. A
// fiber runs until it reaches __syncthreads, a warp shuffle or its end. The scheduler resumes the
// fibers in a chosen order (forward, reverse or seeded random; redrawn at every barrier), so a
// kernel whose result depends on that order has a race. It stops with an error on a barrier
// that not every thread reaches, on threads waiting at different barriers, and on shuffles with a
// partial mask or from a divergent warp. Shared memory is filled with NaN before each block.
// Nothing here includes ATen or the CUDA runtime: the scheduler lives in emulation.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace glmix::emu {

// The built-in variables of the fiber running now (the scheduler sets them at every switch).
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Builtins g_builtins;

// The order in which the fibers of a block run between two barriers, and the blocks of a grid.
enum class Order : int { Forward = 0, Reverse = 1, Random = 2 };
void set_order(Order order, uint64_t seed);

void syncthreads(const char* file, int line);
void* dynamic_smem();

// A warp exchange: each lane offers `bits` (at most 8 bytes) and gets lane src_lane's.
enum class Shuffle { Xor, Index, Down };
uint64_t warp_exchange(uint64_t bits, unsigned mask, Shuffle kind, int arg, const char* file, int line);

template <typename T>
T shuffle(unsigned mask, T v, Shuffle kind, int arg, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(bits, mask, kind, arg, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Runs body(arg) as every thread of every block of the grid; throws (from the calling thread,
// never from a fiber) when a detector fires or the launch is invalid.
void run(dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* arg);

}  // namespace glmix::emu

// ---------------------------------------------------------------------------------------------
// The CUDA spellings the kernels use.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory cannot be refilled with NaN before each block: the kernels take all their
// shared memory through GLMIX_DYNAMIC_SMEM.
#define __shared__ static_assert(false, "emulation: declare shared memory with GLMIX_DYNAMIC_SMEM");

#define threadIdx (::glmix::emu::g_builtins.thread_idx)
#define blockIdx (::glmix::emu::g_builtins.block_idx)
#define blockDim (::glmix::emu::g_builtins.block_dim)
#define gridDim (::glmix::emu::g_builtins.grid_dim)

#define __syncthreads() ::glmix::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) \
  ::glmix::emu::shuffle(mask, v, ::glmix::emu::Shuffle::Xor, lane_mask, __FILE__, __LINE__)
#define __shfl_sync(mask, v, src) ::glmix::emu::shuffle(mask, v, ::glmix::emu::Shuffle::Index, src, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta) \
  ::glmix::emu::shuffle(mask, v, ::glmix::emu::Shuffle::Down, delta, __FILE__, __LINE__)

#define GLMIX_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::glmix::emu::dynamic_smem())

// CUDA's device min/max, for the integer and float arguments the kernels pass.
using std::max;
using std::min;
