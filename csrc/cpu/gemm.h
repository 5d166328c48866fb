// The CPU kernels' products on row-major pointers with leading dimensions: oneDNN brgemm
// micro-kernels for float (through ATen), ATen's CPU mm otherwise.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include "passes.h"

namespace glmix::cpu {

using at::Tensor;

// Products on row-major pointers with leading dimensions; the first contribution to an
// accumulator overwrites it (accumulate = false), so no buffer needs zeroing. What brgemm does
// not cover goes through ATen's CPU mm on views of the same memory (its BLAS entry points are
// not exported).

template <typename T>
Tensor matrix(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

inline void mm(const Tensor& a, const Tensor& b, Tensor c, bool accumulate) {
  if (accumulate)
    at::cpu::addmm_(c, a, b);
  else
    at::cpu::mm_out(c, a, b);
}

// c (m, n) (+)= a (m, k) @ b (k, n)
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
             bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
    return;
  }
#endif
  mm(matrix(a, m, k, lda), matrix(b, k, n, ldb), matrix(c, m, n, ldc), accumulate);
}

// c (m, n) (+)= a^T @ b for a (k, m), b (k, n): a sum over the k pixels of a tile. In float, a
// goes through a transpose into per-thread scratch (cheap: the tile is in L2) and then brgemm.
template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
             bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) {
    thread_local std::vector<float> at_buf;
    at_buf.resize(std::max<size_t>(at_buf.size(), m * k));
    transpose(a, lda, m, k, at_buf.data(), k);  // (m, k) = a^T
    return gemm_nn(m, n, k, at_buf.data(), k, b, ldb, c, ldc, accumulate);
  }
#endif
  mm(matrix(a, k, m, lda).t(), matrix(b, k, n, ldb), matrix(c, m, n, ldc), accumulate);
}

}  // namespace glmix::cpu
