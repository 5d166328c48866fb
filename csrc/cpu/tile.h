// What the CPU clustering and dispatch kernels share: input checks, the split of L into tiles,
// one tile of pixels with its norms and logits, the softmax steps on an (S, n) tile of logits, the
// backward pass through the normalisation, and the fixed-order sum of per-split partial results.
//
// Products run as BLAS calls on small contiguous tile tensors (at::cpu::mm_out / addmm_, which
// skip the dispatcher); the elementwise passes over a tile are the functions declared at the end,
// defined in tile.cpp and compiled per ISA. Everything is computed in acc_t = float for
// float16/bfloat16/float32 inputs and double for float64.
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
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
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

// A tile's (T, C) pixels and (S, T) logits stay in L2 for the channel counts GLNet uses.
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
// logits and their gradients (S, n).

// The softmax axis of a tile of logits: over pixels (clustering: statistics per slot, i.e. per
// row, length S) or over slots (dispatch: statistics per pixel, i.e. per column, length n).
enum class Over { Pixels, Slots };

// dst (n, C) = the transpose of src (C, n) with row stride ld: a tile of the NCHW view of x.
void transpose(const float* src, int64_t ld, int64_t n, int64_t C, float* dst);

#define GLMIX_DECLARE_TILE_KERNELS(T)                                                              \
  /* rinv[l] = 1 / max(||x_l||, eps) and the normalisation's backward coefficient proj[l] */      \
  void inverse_norms(const T* x, int64_t n, int64_t C, T* rinv, T* proj);                         \
  /* dx_l -= proj[l] <x_l, dx_l> x_l */                                                            \
  void project_out(T* dx, const T* x, int64_t n, int64_t C, const T* proj);                       \
  /* delta[l] = sum_s p[s, l] d[s, l] / sum_s p[s, l]: dispatch's delta' for D = p normalised */ \
  void slot_delta(const T* p, const T* d, int64_t S, int64_t n, T* delta);                        \
  /* m = max over the softmax axis of a[s, l] * rinv[l] */                                         \
  void softmax_max(const T* a, int64_t S, int64_t n, const T* rinv, Over over, T* m);             \
  /* a[s, l] = exp(a[s, l] * rinv[l] - shift), sum (if not null) = its sum over the axis */       \
  void softmax_exp(T* a, int64_t S, int64_t n, const T* rinv, const T* shift, Over over, T* sum); \
  /* d = p * (d - delta) * rinv: dA / r from dP, delta = rowsum(dP * P) along the axis */          \
  void softmax_backward(const T* p, T* d, int64_t S, int64_t n, const T* delta, Over over,        \
                        const T* rinv);                                                            \
  /* a[s, l] *= w[l] */                                                                            \
  void scale_columns(T* a, int64_t S, int64_t n, const T* w);                                     \
  /* a[s, c] *= w[s] */                                                                            \
  void scale_rows(T* a, int64_t S, int64_t C, const T* w);

GLMIX_DECLARE_TILE_KERNELS(float)
GLMIX_DECLARE_TILE_KERNELS(double)
#undef GLMIX_DECLARE_TILE_KERNELS

// (n, C) / (S, n) views of a flat scratch buffer sized for a full tile; contiguous, so every BLAS
// call sees the same leading dimensions. (BLAS results may depend on the alignment of the
// operands: scratch buffers are 64-byte aligned, and the views into inputs and outputs above sit
// at offsets fixed by the shapes, so results stay a function of the inputs.)
inline Tensor rows_view(const Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
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

// A small (B, S, C) operand (queries, slots, their gradient) as contiguous acc_t rows, converted
// once up front; a batch broadcast (batch stride 0) stays a single copy.
class Operand {
 public:
  Operand(const Tensor& t, at::ScalarType acc)
      : t_((t.size(0) > 1 && t.stride(0) == 0 ? t.narrow(0, 0, 1) : t).to(acc).contiguous()) {}
  Tensor operator[](int64_t b) const { return t_.select(0, t_.size(0) == 1 ? 0 : b); }  // (S, C)

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

// acc (+)= a @ b: the first contribution overwrites, so partial buffers need no zeroing.
inline void accumulate_mm(Tensor& acc, const Tensor& a, const Tensor& b, bool first) {
  if (first)
    at::cpu::mm_out(acc, a, b);
  else
    at::cpu::addmm_(acc, a, b);
}

// ---------------------------------------------------------------------------------------------
// One tile of pixels: x itself (the values, and the keys up to their norms) in acc_t, and per
// pixel 1 / max(||x_l||, eps) and the normalisation's backward coefficient.

template <typename acc_t>
class PixelTile {
 public:
  PixelTile(int64_t T, int64_t C, const at::TensorOptions& acc_opts)
      : C_(C), x_buf_(at::empty({T * C}, acc_opts)), rinv_buf_(at::empty({T}, acc_opts)),
        proj_buf_(at::empty({T}, acc_opts)) {}

  int64_t n() const { return n_; }
  const Tensor& x() const { return x_; }  // (n, C)
  const acc_t* rinv() const { return rinv_buf_.template const_data_ptr<acc_t>(); }

  template <typename scalar_t>
  void load(const Rows<scalar_t>& src, int64_t b, int64_t l0, int64_t n) {
    n_ = n;
    x_ = src.template read<acc_t>(b, l0, n, x_buf_);
    inverse_norms(x_.template const_data_ptr<acc_t>(), n, C_, rinv_buf_.template data_ptr<acc_t>(),
                  proj_buf_.template data_ptr<acc_t>());
  }

  // A (S, n) = qs_b @ x^T: the logits before the norms, which the softmax steps apply per column
  // (rinv()) in their own pass over the tile.
  void raw_logits(const Tensor& qs_b, Tensor& A) const { at::cpu::mm_out(A, qs_b, x_.t()); }

  // The key path of the backward pass, shared by clustering and dispatch. Takes
  // dA_r[s, l] = dA[s, l] / max(||x_l||, eps) (S, n); accumulates dqs (S, C) += dA_r @ x = dA @ K,
  // and writes dx (n, C) = the gradient of x through K = normalize(x):
  //   u = dA_r^T @ qs = dK / r,   dx = (dK - K <K, dK>) / r = u - x <x, u> / r^2   (GLMIX.md s. 2).
  void key_backward(const Tensor& dA_r, const Tensor& qs_b, Tensor& dqs, bool first, Tensor& dx) const {
    accumulate_mm(dqs, dA_r, x_, first);
    at::cpu::mm_out(dx, dA_r.t(), qs_b);
    project_out(dx.template data_ptr<acc_t>(), x_.template const_data_ptr<acc_t>(), n_, C_,
                proj_buf_.template const_data_ptr<acc_t>());
  }

 private:
  int64_t C_, n_ = 0;
  Tensor x_buf_, rinv_buf_, proj_buf_, x_;
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
