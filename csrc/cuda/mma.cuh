// Warp-level tensor-core products for the CUDA kernels: fragments, shared-memory fragment loads and
// mma.sync, with the per-lane fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16
// with floating point type" and "for mma.m16n8k8", .tf32).
//
//   D (16 x 8, fp32) += A (16 x K) B (K x 8)
//   - fp16 / bf16 operands: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}, K = 16;
//   - fp32 operands: 3xTF32, three mma.sync.aligned.m16n8k8.row.col.f32.tf32 (K = 8) on the hi/lo
//     split v = hi + lo of each operand (hi = tf32(v), lo = tf32(v - hi)):
//     A B ~ A_hi B_lo + A_lo B_hi + A_hi B_hi. One TF32 product rounds each operand to 11 bits
//     (relative error 2^-11 ~ 5e-4, ten times the fp32 tolerance 5e-5 of the test suite, and the
//     logits go through exp at temperatures up to ~10); the split leaves only A_lo B_lo ~ 2^-22
//     relative, fp32 level, while still running on tensor cores (CUDA-core fp32 FMA peaks several
//     times lower on sm_80/sm_90).
//
// Every function is warp-collective: all 32 lanes of a warp call it together, converged.
//
// Two implementations, one layout:
//   - nvcc (sm_80 and newer): ldmatrix and mma.sync inline PTX, cvt for conversions;
//   - GLMIX_CUDA_EMULATION (a host compiler running each CUDA thread on the CPU): plain loads at
//     the documented element positions, and the product computed per lane after fetching the rows
//     of A and columns of B it needs from the lanes that hold them with __shfl_sync. The layout
//     functions below (a_rc, b_rc, c_rc) are the single statement of the layout both follow, so
//     running the kernels under the emulation checks the kernels' use of the layout.
//
// Shared-memory tiles: 16-bit operands are stored as their bit patterns (uint16_t), fp32 operands
// as float, row-major with a leading dimension ld (elements). Bank-conflict-free choices:
//   - 16-bit tiles (ldmatrix reads 8 rows of 16 bytes per matrix): ld % 16 == 8, so the 8 rows
//     start in 8 different 16-byte bank groups (e.g. C = 64 -> ld = 72);
//   - fp32 tiles read by load_a3 / load_b3_t (lane reads row g, column t): ld % 8 == 4;
//     read by load_a3_t / load_b3 (lane reads row t, column g): ld % 16 == 8.
#pragma once

#include <cstdint>

// The tensor-core instructions need sm_80 or newer (mma.sync m16n8k16 bf16, cvt.rna.tf32, cvt.rn.bf16x2).
// Device code for an older architecture (the extension built for several) gets GLMIX_MMA_ARCH_OK 0:
// the kernels of mma_kernels.cuh compile to a trap there, and the host never launches them on such a
// device (has_tensor_cores()): the CUDA-core kernels serve it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GLMIX_MMA_ARCH_OK 0
#else
#define GLMIX_MMA_ARCH_OK 1
#endif

#ifdef GLMIX_CUDA_EMULATION
#include <cmath>
#include <cstring>
#endif

// Each build in its own namespace, so a library holding both cannot mix their definitions.
#ifndef GLMIX_CUDA_NS
#ifdef GLMIX_CUDA_EMULATION
#define GLMIX_CUDA_NS cuda_emulated_detail
#else
#define GLMIX_CUDA_NS cuda_detail
#endif
#endif

namespace glmix {
namespace GLMIX_CUDA_NS {
namespace mma {

// Operand element types (tags).
struct F16 {};
struct Bf16 {};
struct Tf32 {};

template <class E>
struct Shape;  // K of one mma and elements per 32-bit register
template <>
struct Shape<F16> {
  static constexpr int K = 16, kPerReg = 2;
};
template <>
struct Shape<Bf16> {
  static constexpr int K = 16, kPerReg = 2;
};
template <>
struct Shape<Tf32> {
  static constexpr int K = 8, kPerReg = 1;
};

// A: 16 x K, four registers per lane; B: K x 8, two registers; C/D: 16 x 8 fp32, four per lane.
template <class E>
struct FragA {
  uint32_t r[4];
};
template <class E>
struct FragB {
  uint32_t r[2];
};
struct FragC {
  float r[4];
};
// fp32 operands as their 3xTF32 split.
struct FragA3 {
  FragA<Tf32> hi, lo;
};
struct FragB3 {
  FragB<Tf32> hi, lo;
};

// ---------------------------------------------------------------------------------------------
// The documented layouts. groupID g = lane >> 2, threadID_in_group t = lane & 3; element i of a
// fragment sits in register i / kPerReg, the lower-numbered element in the low half.
struct RC {
  int row, col;
};

// A, 16-bit (i < 8): row g for a0, a1, a4, a5, else g + 8; column 2t + (i & 1), + 8 for i >= 4.
// A, tf32 (i < 4): row g for a0, a2, else g + 8; column t, + 4 for a2, a3.
template <class E>
__host__ __device__ constexpr RC a_rc(int lane, int i) {
  return Shape<E>::K == 16 ? RC{(lane >> 2) + ((i >> 1) & 1) * 8, (lane & 3) * 2 + (i & 1) + (i >> 2) * 8}
                           : RC{(lane >> 2) + (i & 1) * 8, (lane & 3) + (i >> 1) * 4};
}
// B, 16-bit (i < 4): row 2t + (i & 1), + 8 for i >= 2; column g. B, tf32 (i < 2): row t + 4 i; column g.
template <class E>
__host__ __device__ constexpr RC b_rc(int lane, int i) {
  return Shape<E>::K == 16 ? RC{(lane & 3) * 2 + (i & 1) + (i >> 1) * 8, lane >> 2} : RC{(lane & 3) + i * 4, lane >> 2};
}
// C/D (i < 4): row g for c0, c1, else g + 8; column 2t + (i & 1).
__host__ __device__ constexpr RC c_rc(int lane, int i) {
  return {(lane >> 2) + (i >> 1) * 8, (lane & 3) * 2 + (i & 1)};
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

// ---------------------------------------------------------------------------------------------
// Conversions: fp32 -> 16-bit (round to nearest even) and back, fp32 -> tf32 (round to nearest,
// ties away, as cvt.rna.tf32.f32).

#ifdef GLMIX_CUDA_EMULATION

inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

inline uint16_t to_bits(float v, Bf16) {
  const uint32_t u = bits_of(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bits(uint16_t h, Bf16) { return float_of(static_cast<uint32_t>(h) << 16); }

inline uint16_t to_bits(float v, F16) {
  const uint32_t u = bits_of(v);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u)  // below 2^-14: a subnormal in steps of 2^-24 (exact scaling, then RNE)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(float_of(a) * 16777216.0f)));
  const uint32_t r = a - (112u << 23);  // rebias the exponent from 127 to 15
  return static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
}
inline float from_bits(uint16_t h, F16) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return float_of(sign | bits_of(static_cast<float>(m) * 5.9604644775390625e-8f));  // m 2^-24
  if (e == 31) return float_of(sign | 0x7f800000u | (m << 13));
  return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint32_t to_tf32(float v) {
  const uint32_t u = bits_of(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf, NaN
  return (u + 0x1000u) & 0xffffe000u;
}
// What the tensor core reads of a tf32 register: the top 19 bits.
inline float tf32_value(uint32_t r) { return float_of(r & 0xffffe000u); }

template <class E>
inline uint32_t pack2(float lo, float hi, E e) {
  return to_bits(lo, e) | (static_cast<uint32_t>(to_bits(hi, e)) << 16);
}

#else  // nvcc

__device__ __forceinline__ uint32_t pack2(float lo, float hi, Bf16) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, F16) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ uint16_t to_bits(float v, Bf16 e) { return static_cast<uint16_t>(pack2(v, 0.f, e)); }
__device__ __forceinline__ uint16_t to_bits(float v, F16 e) { return static_cast<uint16_t>(pack2(v, 0.f, e)); }
__device__ __forceinline__ float from_bits(uint16_t h, Bf16) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
__device__ __forceinline__ float from_bits(uint16_t h, F16) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float tf32_value(uint32_t r) { return __uint_as_float(r & 0xffffe000u); }

#endif

// v = hi + lo with hi = tf32(v) and lo = tf32(v - hi) (v - hi is exact in fp32).
__device__ __forceinline__ void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(v);
  lo = to_tf32(v - tf32_value(hi));
}

// ---------------------------------------------------------------------------------------------
// Products: d += a b.

#ifdef GLMIX_CUDA_EMULATION

// Element i of register value r (its half i % kPerReg) as a float.
inline float element(uint32_t r, int half, Bf16 e) { return from_bits(static_cast<uint16_t>(r >> (16 * half)), e); }
inline float element(uint32_t r, int half, F16 e) { return from_bits(static_cast<uint16_t>(r >> (16 * half)), e); }
inline float element(uint32_t r, int, Tf32) { return tf32_value(r); }

// Lane (g, t) owns D rows g and g + 8 at columns 2t and 2t + 1. The layout puts all of A's rows g
// and g + 8 in the four lanes of group g, and B's column n in the four lanes of group n; fetch
// them register by register (every lane shuffles the same register at each step), then take the
// dot products in fp32 (the 16-bit and tf32 products are exact in fp32; the sums round).
template <class E>
__device__ inline void mma(FragC& d, const FragA<E>& a, const FragB<E>& b) {
  constexpr int K = Shape<E>::K, P = Shape<E>::kPerReg;
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  float arow[2][K], bcol[2][K];
  // Two registers per shuffle (64-bit shuffles are CUDA's too).
  for (int q = 0; q < 4; ++q) {
    const int src = 4 * g + q;
    for (int r = 0; r < 4; r += 2) {
      const uint64_t v2 = __shfl_sync(0xffffffffu, a.r[r] | (static_cast<uint64_t>(a.r[r + 1]) << 32), src);
      for (int rr = 0; rr < 2; ++rr)
        for (int h = 0; h < P; ++h) {
          const RC rc = a_rc<E>(src, (r + rr) * P + h);
          arow[rc.row == g ? 0 : 1][rc.col] = element(static_cast<uint32_t>(v2 >> (32 * rr)), h, E{});
        }
    }
  }
  for (int j = 0; j < 2; ++j) {
    for (int q = 0; q < 4; ++q) {
      const int src = 4 * (2 * t + j) + q;
      const uint64_t v2 = __shfl_sync(0xffffffffu, b.r[0] | (static_cast<uint64_t>(b.r[1]) << 32), src);
      for (int rr = 0; rr < 2; ++rr)
        for (int h = 0; h < P; ++h)
          bcol[j][b_rc<E>(src, rr * P + h).row] = element(static_cast<uint32_t>(v2 >> (32 * rr)), h, E{});
    }
  }
  for (int i = 0; i < 4; ++i) {
    float s = 0.f;
    for (int k = 0; k < K; ++k) s = std::fma(arow[i >> 1][k], bcol[i & 1][k], s);
    d.r[i] += s;
  }
}

#else  // nvcc

__device__ __forceinline__ void mma(FragC& d, const FragA<Bf16>& a, const FragB<Bf16>& b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}
__device__ __forceinline__ void mma(FragC& d, const FragA<F16>& a, const FragB<F16>& b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}
__device__ __forceinline__ void mma(FragC& d, const FragA<Tf32>& a, const FragB<Tf32>& b) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}

#endif

// 3xTF32: the small cross terms first, so they are not lost against the large one.
#ifdef GLMIX_CUDA_EMULATION
// The same sums as three calls, with a third of the shuffles fewer (each moves a register's hi
// and lo together): the emulation's time goes into its shuffles.
inline void mma(FragC& d, const FragA3& a, const FragB3& b) {
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  float arow[2][2][8], bcol[2][2][8];  // [hi, lo][row g, g + 8 | column j][k]
  for (int q = 0; q < 4; ++q) {
    const int src = 4 * g + q;
    for (int r = 0; r < 4; ++r) {
      const uint64_t v = __shfl_sync(0xffffffffu, a.hi.r[r] | (static_cast<uint64_t>(a.lo.r[r]) << 32), src);
      const RC rc = a_rc<Tf32>(src, r);
      for (int p = 0; p < 2; ++p)
        arow[p][rc.row == g ? 0 : 1][rc.col] = tf32_value(static_cast<uint32_t>(v >> (32 * p)));
    }
  }
  for (int j = 0; j < 2; ++j)
    for (int q = 0; q < 4; ++q) {
      const int src = 4 * (2 * t + j) + q;
      for (int r = 0; r < 2; ++r) {
        const uint64_t v = __shfl_sync(0xffffffffu, b.hi.r[r] | (static_cast<uint64_t>(b.lo.r[r]) << 32), src);
        const int k = b_rc<Tf32>(src, r).row;
        for (int p = 0; p < 2; ++p) bcol[p][j][k] = tf32_value(static_cast<uint32_t>(v >> (32 * p)));
      }
    }
  constexpr int parts[3][2] = {{1, 0}, {0, 1}, {0, 0}};  // (A, B): lo hi, hi lo, hi hi
  for (const auto& ab : parts)
    for (int i = 0; i < 4; ++i) {
      float s = 0.f;
      for (int k = 0; k < 8; ++k) s = std::fma(arow[ab[0]][i >> 1][k], bcol[ab[1]][i & 1][k], s);
      d.r[i] += s;
    }
}
#else
__device__ __forceinline__ void mma(FragC& d, const FragA3& a, const FragB3& b) {
  mma(d, a.lo, b.hi);
  mma(d, a.hi, b.lo);
  mma(d, a.hi, b.hi);
}
#endif

// ---------------------------------------------------------------------------------------------
// Fragment loads from shared memory. `tile` points at element (0, 0) of the operand's block; the
// operand is either stored as it is multiplied ("n": A[m][k] at tile[m * ld + k], B as its
// transpose, B[k][n] at tile[n * ld + k], i.e. both row-major in K) or transposed ("t":
// A[m][k] at tile[k * ld + m], B[k][n] at tile[k * ld + n]).

// Fragment element i of A (kIsA) or B, as a_rc / b_rc give it.
template <class E, bool kIsA>
__host__ __device__ constexpr RC frag_rc(int lane, int i) {
  return kIsA ? a_rc<E>(lane, i) : b_rc<E>(lane, i);
}
// Where element (row, col) of an operand sits in its tile: row-major or transposed.
__device__ __forceinline__ int stored_at(RC rc, int ld, bool row_major) {
  return row_major ? rc.row * ld + rc.col : rc.col * ld + rc.row;
}

#ifdef GLMIX_CUDA_EMULATION

// The 16-bit fragments element by element (two per register, the lower-numbered in the low half).
template <class E, bool kIsA, int N>
__device__ inline void gather16(uint32_t (&r)[N], const uint16_t* tile, int ld, bool row_major) {
  const int lane = lane_id();
  for (int k = 0; k < N; ++k)
    r[k] = tile[stored_at(frag_rc<E, kIsA>(lane, 2 * k), ld, row_major)] |
           (static_cast<uint32_t>(tile[stored_at(frag_rc<E, kIsA>(lane, 2 * k + 1), ld, row_major)]) << 16);
}
// A is stored as multiplied (A[m][k] row-major) unless kTrans; B as its transpose unless kTrans.
template <class E, bool kTrans>
__device__ inline void load_a16(FragA<E>& a, const uint16_t* tile, int ld) {
  gather16<E, true>(a.r, tile, ld, !kTrans);
}
template <class E, bool kTrans>
__device__ inline void load_b16(FragB<E>& b, const uint16_t* tile, int ld) {
  gather16<E, false>(b.r, tile, ld, kTrans);
}

#endif

// ldmatrix loads 8x8 matrices of 16-bit elements; for matrix j, lanes 8j..8j+7 give the addresses
// of its 8 rows, and lane l receives register j = elements (l / 4, 2 (l % 4) + h), h = 0, 1 (with
// .trans: (2 (l % 4) + h, l / 4)). The row start lane l supplies, as (row, col) in the stored tile:
//   A "n": matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) are a0a1,
//          a2a3, a4a5, a6a7: row m = l % 16, column k = 8 (l / 16);
//   A "t" (.trans, stored k-major): the same matrices: row k = l % 8 + 8 (l / 16),
//          column m = 8 ((l / 8) % 2);
//   B "n" (.x2, stored n-major): matrices (n 0-7, k 0-7), (n 0-7, k 8-15) are b0b1, b2b3:
//          row n = l % 8, column k = 8 ((l / 8) % 2) (lanes 16-31 are ignored);
//   B "t" (.x2.trans, stored k-major): row k = l % 16, column 0.
// tests/test_mma.py checks these against a model of ldmatrix and the mma layouts above.
__host__ __device__ constexpr RC ldsm_a_row(int lane, bool trans) {
  return trans ? RC{(lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8} : RC{lane & 15, (lane >> 4) * 8};
}
__host__ __device__ constexpr RC ldsm_b_row(int lane, bool trans) {
  return trans ? RC{lane & 15, 0} : RC{lane & 7, ((lane >> 3) & 1) * 8};
}

#ifndef GLMIX_CUDA_EMULATION

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix of N (4 or 2) 8x8 matrices, transposed when kTrans, from this lane's row start p.
template <int N, bool kTrans>
__device__ __forceinline__ void ldsm(uint32_t (&r)[N], const uint16_t* p) {
  const uint32_t a = smem_u32(p);
  if constexpr (N == 4 && kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
  else if constexpr (N == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
  else if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a)
                 : "memory");
}
template <class E, bool kTrans>
__device__ __forceinline__ void load_a16(FragA<E>& a, const uint16_t* tile, int ld) {
  const RC rc = ldsm_a_row(lane_id(), kTrans);
  ldsm<4, kTrans>(a.r, tile + rc.row * ld + rc.col);
}
template <class E, bool kTrans>
__device__ __forceinline__ void load_b16(FragB<E>& b, const uint16_t* tile, int ld) {
  const RC rc = ldsm_b_row(lane_id(), kTrans);
  ldsm<2, kTrans>(b.r, tile + rc.row * ld + rc.col);
}

#endif

template <class E>
__device__ __forceinline__ void load_a(FragA<E>& a, const uint16_t* tile, int ld) {
  load_a16<E, false>(a, tile, ld);
}
template <class E>
__device__ __forceinline__ void load_a_t(FragA<E>& a, const uint16_t* tile, int ld) {
  load_a16<E, true>(a, tile, ld);
}
template <class E>
__device__ __forceinline__ void load_b(FragB<E>& b, const uint16_t* tile, int ld) {
  load_b16<E, false>(b, tile, ld);
}
template <class E>
__device__ __forceinline__ void load_b_t(FragB<E>& b, const uint16_t* tile, int ld) {
  load_b16<E, true>(b, tile, ld);
}

// fp32 operands (16 x 8 A, 8 x 8 B), split for 3xTF32 as they are loaded; plain loads on both builds.
template <bool kIsA, int N>
__device__ __forceinline__ void gather3(uint32_t (&hi)[N], uint32_t (&lo)[N], const float* tile, int ld,
                                        bool row_major) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < N; ++i) split_tf32(tile[stored_at(frag_rc<Tf32, kIsA>(lane, i), ld, row_major)], hi[i], lo[i]);
}
__device__ __forceinline__ void load_a(FragA3& a, const float* tile, int ld) {
  gather3<true>(a.hi.r, a.lo.r, tile, ld, true);
}
__device__ __forceinline__ void load_a_t(FragA3& a, const float* tile, int ld) {
  gather3<true>(a.hi.r, a.lo.r, tile, ld, false);
}
__device__ __forceinline__ void load_b(FragB3& b, const float* tile, int ld) {
  gather3<false>(b.hi.r, b.lo.r, tile, ld, false);
}
__device__ __forceinline__ void load_b_t(FragB3& b, const float* tile, int ld) {
  gather3<false>(b.hi.r, b.lo.r, tile, ld, true);
}

// ---------------------------------------------------------------------------------------------
// Accumulators.

__device__ __forceinline__ void zero(FragC& c) {
#pragma unroll
  for (int i = 0; i < 4; ++i) c.r[i] = 0.f;
}

// The A operand (16 x 16, 16-bit) made of two adjacent 16 x 8 accumulator blocks (columns 0-7 in
// c0, 8-15 in c1), without a trip through shared memory: the accumulator layout puts rows g and
// g + 8 at columns 2t, 2t + 1 in the same lane as A's a0a1 / a2a3 (c0) and a4a5 / a6a7 (c1).
template <class E>
__device__ __forceinline__ FragA<E> a_from_c(const FragC& c0, const FragC& c1) {
  FragA<E> a;
  a.r[0] = pack2(c0.r[0], c0.r[1], E{});
  a.r[1] = pack2(c0.r[2], c0.r[3], E{});
  a.r[2] = pack2(c1.r[0], c1.r[1], E{});
  a.r[3] = pack2(c1.r[2], c1.r[3], E{});
  return a;
}

// The same operand as hi + lo, both 16-bit (lo = the rounding error of hi): a product with the
// pair keeps the accumulators' fp32 values to about 2^-16 (bf16) or 2^-22 (fp16) relative.
template <class E>
__device__ __forceinline__ void split_a_from_c(const FragC& c0, const FragC& c1, FragA<E>& hi, FragA<E>& lo) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const FragC& c = r < 2 ? c0 : c1;
    const float v0 = c.r[2 * (r & 1)], v1 = c.r[2 * (r & 1) + 1];
    hi.r[r] = pack2(v0, v1, E{});
    lo.r[r] = pack2(v0 - from_bits(static_cast<uint16_t>(hi.r[r]), E{}),
                    v1 - from_bits(static_cast<uint16_t>(hi.r[r] >> 16), E{}), E{});
  }
}

// The tf32 A operand (16 x 8) of one accumulator block, split for 3xTF32, its columns permuted:
// lane (g, t) holds the block's columns 2t and 2t + 1 (rows g, g + 8) where A's layout has columns
// t and t + 4, so A's column t stands for the block's column 2t and t + 4 for 2t + 1. A product is
// a sum over its columns in any order: load B with its rows permuted alike (load_b3_t_pairs).
__device__ __forceinline__ FragA3 a3_from_c(const FragC& c) {
  constexpr int src[4] = {0, 2, 1, 3};  // A's (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)
  FragA3 a;
#pragma unroll
  for (int i = 0; i < 4; ++i) split_tf32(c.r[src[i]], a.hi.r[i], a.lo.r[i]);
  return a;
}
// B (8 x 8, fp32 stored k-major: B[k][n] at tile[k * ld + n]) with rows 2t, 2t + 1 where the tf32
// layout has rows t, t + 4: the partner of a3_from_c. Bank-conflict-free for ld % 32 == 4.
__device__ __forceinline__ void load_b3_t_pairs(FragB3& b, const float* tile, int ld) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < 2; ++i) split_tf32(tile[(2 * (lane & 3) + i) * ld + (lane >> 2)], b.hi.r[i], b.lo.r[i]);
}

// tile[row * ld + col] = c for the lane's four elements.
__device__ __forceinline__ void store_c(const FragC& c, float* tile, int ld) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const RC rc = c_rc(lane, i);
    tile[rc.row * ld + rc.col] = c.r[i];
  }
}

// A warp's 16 x CP accumulator tiles into rows row0.. of a row-major fp32 array with rows of ld
// elements: only the first `rows` rows and the first `cols` columns (the tile may pad both).
template <int CP>
__device__ __forceinline__ void store_rows(const FragC (&acc)[CP / 8], float* out, int64_t row0, int rows, int ld,
                                           int cols) {
  const int lane = lane_id();
#pragma unroll
  for (int j = 0; j < CP / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const RC rc = c_rc(lane, i);
      const int c = 8 * j + rc.col;
      if (rc.row < rows && c < cols) out[(row0 + rc.row) * ld + c] = acc[j].r[i];
    }
}

// Reductions over an accumulator row: the four lanes of a group hold its eight columns.
__device__ __forceinline__ float row_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float row_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

}  // namespace mma
}  // namespace GLMIX_CUDA_NS
}  // namespace glmix
