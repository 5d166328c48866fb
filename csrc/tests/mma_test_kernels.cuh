// Test kernels for csrc/cuda/mma.cuh: one warp multiplies a 16x16 by a 16x8 tile through the
// fragment functions, and writes each lane's fragment registers so a test can check the layout
// itself. Device code only: nvcc builds it for the GPU (the compile check counts its tensor-core
// instructions), a host compiler builds it under the emulation for tests/test_mma.py.
#pragma once

#include "../cuda/mma.cuh"

// All shared memory is dynamic (the emulation refills it with NaN before each block).
#ifndef GLMIX_DYNAMIC_SMEM
#define GLMIX_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace glmix {
namespace mma_test {

using namespace GLMIX_CUDA_NS::mma;

constexpr int kLd16 = 24;            // 16-bit tiles: ld % 16 == 8 (conflict-free ldmatrix)
constexpr int kLd32 = 20;            // fp32 tiles: ld % 8 == 4 (conflict-free row-major fragment reads)
constexpr int kFragWords = 12;       // per lane: A "n" (4), B "n" (2), A "t" (4), B "t" (2)
constexpr int kTile16 = 16 * kLd16;  // elements of one 16-row 16-bit tile
constexpr int kTile32 = 16 * kLd32;
constexpr int kSmem16 = 5 * kTile16 * 2;  // dynamic shared memory bytes of mma_tile_test
constexpr int kSmem32 = 4 * kTile32 * 4;  // and of mma3_tile_test

__device__ inline void load_c(FragC& d, const float* c) {  // c: 16 x 8 row-major
  for (int i = 0; i < 4; ++i) {
    const RC rc = c_rc(lane_id(), i);
    d.r[i] = c[rc.row * 8 + rc.col];
  }
}
__device__ inline void store_c8(const FragC& d, float* out) { store_c(d, out, 8); }

template <class Frag>
__device__ inline void record(const Frag& f, uint32_t* out) {
  for (unsigned i = 0; i < sizeof(f.r) / sizeof(f.r[0]); ++i) out[i] = f.r[i];
}

// 16-bit operands as bit patterns. a: A (16 x 16, A[m][k] at a[m * 16 + k]); b: [B1 | B2]
// (16 x 16, B[k][n] at b[k * 16 + n]); b3: B3 (16 x 8, at b3[k * 8 + n]); c: C (16 x 8).
// Writes d_n = A B1 + C through the "n" loads, d_t = A B1 + C through the "t" loads (each operand
// staged in shared memory in the storage order that load reads), d_chain = E(A [B1 | B2]) B3
// with the accumulators turned into an A operand in registers, and frag[lane * kFragWords + j].
template <class E>
__global__ void __launch_bounds__(32)
    mma_tile_test(const uint16_t* a, const uint16_t* b, const uint16_t* b3, const float* c, float* d_n, float* d_t,
                  float* d_chain, uint32_t* frag) {
  GLMIX_DYNAMIC_SMEM(float, smem);
  uint16_t* a_n = reinterpret_cast<uint16_t*>(smem);  // 16-byte aligned rows: kLd16 * 2 = 48 bytes
  uint16_t* a_t = a_n + kTile16;
  uint16_t* b_n = a_t + kTile16;
  uint16_t* b_t = b_n + kTile16;
  uint16_t* b3_t = b_t + kTile16;
  const int lane = lane_id();
  for (int i = lane; i < 256; i += 32) {
    const int r = i / 16, k = i % 16;
    a_n[r * kLd16 + k] = a[i];  // A[r][k], m-major
    a_t[k * kLd16 + r] = a[i];  // k-major
    b_t[r * kLd16 + k] = b[i];  // B[r][k] (k the column here), k-major
    b_n[k * kLd16 + r] = b[i];  // n-major
  }
  for (int i = lane; i < 128; i += 32) b3_t[(i / 8) * kLd16 + i % 8] = b3[i];
  __syncthreads();

  FragA<E> fa, ta;
  FragB<E> fb, tb, fb2, fb3;
  load_a(fa, a_n, kLd16);
  load_b(fb, b_n, kLd16);
  load_a_t(ta, a_t, kLd16);
  load_b_t(tb, b_t, kLd16);
  uint32_t* f = frag + lane * kFragWords;
  record(fa, f);
  record(fb, f + 4);
  record(ta, f + 6);
  record(tb, f + 10);

  FragC d;
  load_c(d, c);
  mma(d, fa, fb);
  store_c8(d, d_n);
  load_c(d, c);
  mma(d, ta, tb);
  store_c8(d, d_t);

  load_b(fb2, b_n + 8 * kLd16, kLd16);  // B2: n 8..15
  load_b_t(fb3, b3_t, kLd16);
  FragC p0, p1, e;
  zero(p0);
  zero(p1);
  zero(e);
  mma(p0, fa, fb);
  mma(p1, fa, fb2);
  mma(e, a_from_c<E>(p0, p1), fb3);
  store_c8(e, d_chain);
}

// fp32 operands, 3xTF32 over K = 16 in two k8 steps. a: A (16 x 16), b: B (16 x 8, B[k][n] at
// b[k * 8 + n]), c: C. Writes d_n (the "n" loads), d_t (the "t" loads), d_1x (one TF32 product
// per step, hi parts only: what the split avoids), and per lane the hi parts of the first step's
// fragments, frag[lane * 6 + j]: A (4), B (2).
__global__ void __launch_bounds__(32) mma3_tile_test(const float* a, const float* b, const float* c, float* d_n,
                                                     float* d_t, float* d_1x, uint32_t* frag) {
  GLMIX_DYNAMIC_SMEM(float, smem);
  float* a_n = smem;
  float* a_t = a_n + kTile32;
  float* b_n = a_t + kTile32;  // 8 rows used
  float* b_t = b_n + kTile32;
  const int lane = lane_id();
  for (int i = lane; i < 256; i += 32) {
    const int r = i / 16, k = i % 16;
    a_n[r * kLd32 + k] = a[i];
    a_t[k * kLd32 + r] = a[i];
  }
  for (int i = lane; i < 128; i += 32) {
    const int k = i / 8, n = i % 8;
    b_t[k * kLd32 + n] = b[i];
    b_n[n * kLd32 + k] = b[i];
  }
  __syncthreads();

  FragC dn, dt, d1;
  load_c(dn, c);
  load_c(dt, c);
  load_c(d1, c);
  for (int k0 = 0; k0 < 16; k0 += 8) {
    FragA3 fa, ta;
    FragB3 fb, tb;
    load_a(fa, a_n + k0, kLd32);
    load_b(fb, b_n + k0, kLd32);
    load_a_t(ta, a_t + k0 * kLd32, kLd32);
    load_b_t(tb, b_t + k0 * kLd32, kLd32);
    if (k0 == 0) {
      record(fa.hi, frag + lane * 6);
      record(fb.hi, frag + lane * 6 + 4);
    }
    mma(dn, fa, fb);
    mma(dt, ta, tb);
    mma(d1, fa.hi, fb.hi);
  }
  store_c8(dn, d_n);
  store_c8(dt, d_t);
  store_c8(d1, d_1x);
}

}  // namespace mma_test
}  // namespace glmix
