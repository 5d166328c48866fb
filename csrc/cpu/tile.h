// What the CPU clustering and dispatch kernels share: input checks, the split of L into tiles,
// one tile of pixels with its norms, the products on tiles, the softmax steps on an (n, S) tile of
// logits, the backward pass through the normalisation, and the fixed-order sum of per-split
// partial results.
//
// Logits tiles are pixel-major, (n, S): then every product whose result is per pixel (logits,
// dispatch's output, dx) reads both operands row-major as they lie, and runs as a oneDNN brgemm
// micro-kernel (through ATen) that multiplies in place. MKL's sgemm packs both operands of every
// call first, and at these sizes (K = C or S, about 64) the packing and its zeroing of the output
// cost about a quarter of the multiply-adds. The sums over pixels (slots, dqs, dslots) read a
// logits tile transposed: it is transposed once in L2, then multiplied the same way. float64 (the
// gradcheck dtype) goes through ATen's mm. The elementwise passes over a tile are the functions
// declared below, defined in tile.cpp and compiled per ISA. Everything is computed in acc_t =
// float for float16/bfloat16/float32 inputs and double for float64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/irange.h>

namespace glmix::cpu {

using at::Tensor;

inline at::ScalarType acc_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// Input checks. Python validates first (glmix_kernels/_validate.py); these keep a direct
// torch.ops call from reading out of bounds.

inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "glmix_kernels: ", name, " must be a CPU tensor, got ", t.device());
}

inline void check_shape(const Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "glmix_kernels: ", name, " must have shape ", want, ", got ", t.sizes());
}

inline void check_dtype(const Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "glmix_kernels: ", name, " must have dtype ", want, ", got ",
              t.scalar_type());
}

// x (B, L, C) floating, qs (B, S, C) in the accumulation dtype; returns S.
inline int64_t check_x_qs(const Tensor& x, const Tensor& qs) {
  check_cpu(x, "x");
  check_cpu(qs, "qs");
  TORCH_CHECK(x.dim() == 3, "glmix_kernels: x must be (B, L, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "glmix_kernels: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(qs.dim() == 3 && qs.size(0) == x.size(0) && qs.size(1) >= 1 && qs.size(2) == x.size(2),
              "glmix_kernels: qs must be (B, S, C) = (", x.size(0), ", S, ", x.size(2), "), got ", qs.sizes());
  check_dtype(qs, "qs", acc_dtype(x.scalar_type()));
  return qs.size(1);
}

// ---------------------------------------------------------------------------------------------
// The partition of L: tiles of `tile` pixels, grouped into at most `max_splits` splits per batch
// element. One task handles one split, tile after tile. The partition depends on the shapes only,
// never on the thread count, so every reduction over pixels (within a split in tile order, then
// across splits in split order) is bitwise reproducible.

// A tile's (T, C) pixels and (T, S) logits stay in L2 for the channel counts GLNet uses (512 pixels
// measured best at C = 64; 256 and 1024 were 2-10% slower).
inline int64_t tile_pixels(int64_t C) {
  return C <= 64 ? 512 : C <= 128 ? 256 : 128;
}

// Enough splits to feed many cores when B is small, few enough that the (B, splits, S, C)
// partial results stay a small multiple of the outputs.
constexpr int64_t kMaxSplits = 16;

struct Splits {
  int64_t L, tile, per_split, count;

  Splits(int64_t L_, int64_t C, int64_t max_splits) : L(L_), tile(tile_pixels(C)) {
    const int64_t tiles = (L + tile - 1) / tile;
    per_split = std::max<int64_t>(1, (tiles + max_splits - 1) / max_splits);
    count = (tiles + per_split - 1) / per_split;
  }
  int64_t begin(int64_t j) const { return j * per_split * tile; }
  int64_t end(int64_t j) const { return std::min(L, (j + 1) * per_split * tile); }
};

// fn(b, j) for every batch element b and split j, in parallel.
template <typename F>
void parallel_splits(int64_t B, const Splits& sp, const F& fn) {
  at::parallel_for(0, B * sp.count, 1, [&](int64_t begin, int64_t end) {
    for (const auto i : c10::irange(begin, end)) fn(i / sp.count, i % sp.count);
  });
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes, for T = float and double (tile.cpp). Tiles are row-major: x and dx (n, C),
// logits and their gradients (n, S) with row stride ld (two (n, S) blocks may share the rows of
// one (n, 2S) buffer).

// The softmax axis of a tile of logits: over pixels (clustering: statistics per slot, i.e. per
// column) or over slots (dispatch: statistics per pixel, i.e. per row).
enum class Over { Pixels, Slots };

// dst (n, C) = the transpose of src (C, n) with row stride ld: a tile of the NCHW view of x.
void transpose(const float* src, int64_t ld, int64_t n, int64_t C, float* dst);

#define GLMIX_DECLARE_TILE_KERNELS(T)                                                               \
  /* rinv[l] = 1 / max(||x_l||, eps) and the normalisation's backward coefficient proj[l] */       \
  void inverse_norms(const T* x, int64_t n, int64_t C, T* rinv, T* proj);                          \
  /* dx_l -= proj[l] <x_l, dx_l> x_l */                                                             \
  void project_out(T* dx, const T* x, int64_t n, int64_t C, const T* proj);                        \
  /* clustering, per tile: m[s] = max_l a[l, s] rinv[l]; then a[l, s] = exp(a[l, s] rinv[l] -     \
     shift[s]) and sum[s] = its sum over the tile's pixels */                                       \
  void column_max(const T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* m);              \
  void exp_columns(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, const T* shift, T* sum); \
  /* dispatch: each row of a a[l, :] rinv[l] replaced by its softmax; lse[l] its log-sum-exp */    \
  void softmax_rows(T* a, int64_t n, int64_t S, int64_t ld, const T* rinv, T* lse);                \
  /* Both backwards, from raw logits a (before the norms) and dP in d: a becomes                   \
     P = exp(a rinv - lse) and d becomes dA / r = P (dP - delta) rinv. Over::Pixels: lse and delta \
     per slot (delta given); Over::Slots: per pixel, delta = sum_s P dP / sum_s P computed here. */ \
  void softmax_backward(T* a, int64_t lda, T* d, int64_t ldd, int64_t n, int64_t S, const T* rinv, \
                        const T* lse, const T* delta, Over over);                                  \
  /* a[s, c] *= w[s] */                                                                             \
  void scale_rows(T* a, int64_t S, int64_t C, const T* w);

GLMIX_DECLARE_TILE_KERNELS(float)
GLMIX_DECLARE_TILE_KERNELS(double)
#undef GLMIX_DECLARE_TILE_KERNELS

// (rows, cols) contiguous view of a flat scratch buffer sized for a full tile. (BLAS results may
// depend on the alignment of the operands: scratch buffers are 64-byte aligned, and the views
// into inputs and outputs sit at offsets fixed by the shapes, so results stay a function of the
// inputs.)
inline Tensor rows_view(const Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---------------------------------------------------------------------------------------------
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
    transpose(a, lda, m, k, at_buf.data());  // (m, k) = a^T
    return gemm_nn(m, n, k, at_buf.data(), k, b, ldb, c, ldc, accumulate);
  }
#endif
  mm(matrix(a, k, m, lda).t(), matrix(b, k, n, ldb), matrix(c, m, n, ldc), accumulate);
}

// ---------------------------------------------------------------------------------------------
// Reading (B, L, C) tensors of any strides and dtype a tile of rows at a time.

template <typename scalar_t>
struct Rows {
  Tensor t;
  const scalar_t* data;
  int64_t sb, sl, sc, C;

  explicit Rows(const Tensor& t_)
      : t(t_), data(t_.const_data_ptr<scalar_t>()), sb(t_.stride(0)), sl(t_.stride(1)), sc(t_.stride(2)),
        C(t_.size(2)) {}

  // Rows l0 .. l0 + n of batch element b as an (n, C) contiguous acc_t matrix: the tensor's own
  // memory when it already holds such rows (float32 x in the channels-last layout GLNet passes,
  // float64 in gradcheck), so the tile costs no copy; else gathered into buf.
  template <typename acc_t>
  Tensor read(int64_t b, int64_t l0, int64_t n, const Tensor& buf) const {
    if (std::is_same_v<scalar_t, acc_t> && sc == 1 && sl == C) return t.select(0, b).narrow(0, l0, n);
    Tensor rows = rows_view(buf, n, C);
    gather(b, l0, n, rows.template data_ptr<acc_t>());
    return rows;
  }

  // dst (n, C) contiguous = rows l0 .. l0 + n of batch element b. Rows with contiguous channels
  // copy as they are; the float32 NCHW view (strides (C*L, 1, L)) goes through transpose(); any
  // other layout is transposed in blocks of 16 pixels, so each source cache line is read once
  // and the 16 destination rows being filled stay in L1.
  template <typename acc_t>
  void gather(int64_t b, int64_t l0, int64_t n, acc_t* dst) const {
    const scalar_t* src = data + b * sb + l0 * sl;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (sl == 1) return transpose(src, sc, n, C, dst);
    }
    if (sc == 1) {
      for (const auto l : c10::irange(n)) {
        const scalar_t* row = src + l * sl;
        acc_t* out = dst + l * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(row[c]);
      }
      return;
    }
    constexpr int64_t kBlock = 16;
    for (int64_t lb = 0; lb < n; lb += kBlock) {
      const int64_t le = std::min(n, lb + kBlock);
      for (const auto c : c10::irange(C))
        for (int64_t l = lb; l < le; ++l) dst[l * C + c] = static_cast<acc_t>(src[l * sl + c * sc]);
    }
  }
};

// A small (B, R, K) operand (queries, slots, their gradient, transposed or stacked) as
// contiguous acc_t rows, converted once up front; a batch broadcast (batch stride 0) stays a
// single copy.
class Operand {
 public:
  Operand(const Tensor& t, at::ScalarType acc)
      : t_((t.size(0) > 1 && t.stride(0) == 0 ? t.narrow(0, 0, 1) : t).to(acc).contiguous()) {}
  template <typename T>
  const T* at(int64_t b) const {  // (R, K), row stride K
    return t_.const_data_ptr<T>() + (t_.size(0) == 1 ? 0 : b) * t_.size(1) * t_.size(2);
  }

 private:
  Tensor t_;
};

// dst[i] = src[i] converted to the output dtype.
template <typename acc_t, typename scalar_t>
void store(const acc_t* src, scalar_t* dst, int64_t n) {
  for (const auto i : c10::irange(n)) dst[i] = static_cast<scalar_t>(src[i]);
}

// Where a tile writes its (n, C) rows l0 .. l0 + n of batch element b of a contiguous (B, L, C)
// output: the output itself when it is in acc_t, else buf (from result_buffer, numel >= n * C),
// converted by flush_rows.
template <typename acc_t, typename scalar_t>
Tensor result_buffer(int64_t numel, const at::TensorOptions& acc_opts) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return Tensor();
  return at::empty({numel}, acc_opts);
}

template <typename acc_t, typename scalar_t>
Tensor result_rows(const Tensor& out, int64_t b, int64_t l0, int64_t n, const Tensor& buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return out.select(0, b).narrow(0, l0, n);
  return rows_view(buf, n, out.size(2));
}

template <typename acc_t, typename scalar_t>
void flush_rows(const Tensor& rows, Tensor& out, int64_t b, int64_t l0) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>)
    store(rows.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>() + (b * out.size(1) + l0) * out.size(2), rows.numel());
}

// ---------------------------------------------------------------------------------------------
// One tile of pixels: x itself (the values, and the keys up to their norms) in acc_t, and per
// pixel 1 / max(||x_l||, eps) and the normalisation's backward coefficient.

template <typename acc_t>
class PixelTile {
 public:
  PixelTile(int64_t T, int64_t C, const at::TensorOptions& acc_opts)
      : C_(C), x_buf_(at::empty({T * C}, acc_opts)), stats_(at::empty({2, T}, acc_opts)) {}

  int64_t n() const { return n_; }
  const acc_t* x() const { return x_; }  // (n, C)
  const acc_t* rinv() const { return stats_.template const_data_ptr<acc_t>(); }
  const acc_t* proj() const { return rinv() + stats_.size(1); }

  template <typename scalar_t>
  void load(const Rows<scalar_t>& src, int64_t b, int64_t l0, int64_t n) {
    n_ = n;
    x_view_ = src.template read<acc_t>(b, l0, n, x_buf_);
    x_ = x_view_.template const_data_ptr<acc_t>();
    acc_t* stats = stats_.template data_ptr<acc_t>();
    inverse_norms(x_, n, C_, stats, stats + stats_.size(1));
  }

  // out (n, N) = x @ w for w (C, N): the logits before the norms for w = qs^T (the softmax steps
  // apply the norms per row), and beside them any other product with x (dP, for w = [qs^T | G^T]).
  void times(const acc_t* w, int64_t N, acc_t* out) const { gemm_nn(n_, N, C_, x_, C_, w, N, out, N, false); }

  // The key path of the backward pass, shared by clustering and dispatch. Takes
  // dA_r = dA / max(||x_l||, eps) (n, S) with row stride ld (softmax_backward); accumulates
  // dqs (S, C) += dA_r^T @ x = dA^T @ K and writes dx (n, C) = the gradient of x through
  // K = normalize(x):  u = dA_r @ qs = dK / r,  dx = (dK - K <K, dK>) / r = u - x <x, u> / r^2
  // (docs/math.md#normalisation), with <x, u> taken from the rounded u, so that what cancels (all of it
  // for C = 1) cancels to rounding.
  void key_backward(const acc_t* dA_r, int64_t ld, int64_t S, const acc_t* qs_b, acc_t* dqs, bool first,
                    acc_t* dx) const {
    gemm_tn(S, C_, n_, dA_r, ld, x_, C_, dqs, C_, !first);
    gemm_nn(n_, C_, S, dA_r, ld, qs_b, C_, dx, C_, false);
    project_out(dx, x_, n_, C_, proj());
  }

 private:
  int64_t C_, n_ = 0;
  Tensor x_buf_, stats_, x_view_;  // stats_: rinv, proj
  const acc_t* x_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// out (B, S, C) = sum over splits of partial (B, splits, S, C), split after split: the same
// order whatever the thread count.
template <typename acc_t, typename scalar_t>
void sum_splits(const Tensor& partial, Tensor& out) {
  const int64_t B = partial.size(0), J = partial.size(1), SC = partial.size(2) * partial.size(3);
  const acc_t* p = partial.const_data_ptr<acc_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> sum(SC);
    for (const auto b : c10::irange(b0, b1)) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (const auto j : c10::irange(J)) {
        const acc_t* pj = p + (b * J + j) * SC;
        for (const auto e : c10::irange(SC)) sum[e] += pj[e];
      }
      store(sum.data(), o + b * SC, SC);
    }
  });
}

}  // namespace glmix::cpu
