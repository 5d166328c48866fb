// Host runner for csrc/tests/mma_test_kernels.cuh under GLMIX_CUDA_EMULATION: one warp as 32
// std::threads, __shfl_sync through an exchange array between two barriers, __syncthreads a
// barrier. Just enough of the CUDA execution model for one-warp kernels; tests/test_mma.py builds
// and drives it.
//
//   mma_harness bf16|f16   stdin: a (256 u16), b (256 u16), b3 (128 u16), c (128 f32)
//                          stdout: d_n, d_t, d_chain (128 f32 each), frag (32 x 12 u32)
//   mma_harness f32        stdin: a (256 f32), b (128 f32), c (128 f32)
//                          stdout: d_n, d_t, d_1x (128 f32 each), frag (32 x 6 u32)
//   mma_harness convert    stdin: n, then n f32
//                          stdout: bf16 and f16 bits (n u16 each), tf32 bits (n u32), and the
//                          65536 f16 bit patterns as f32
//   mma_harness ldsm       stdout: the row addresses of the GPU build's ldmatrix loads, per lane
//                          (i32 row, col): A "n", A "t", B "n", B "t" (32 x 2 each)
#include <algorithm>
#include <barrier>
#include <iterator>
#include <limits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#define GLMIX_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
// Dynamic shared memory: one buffer, refilled with NaN before each launch.
alignas(16) float g_smem[4096];
#define GLMIX_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(g_smem)

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx;

namespace warp {
std::barrier<>* bar = nullptr;
uint32_t exchange[32];
}  // namespace warp

inline void __syncthreads() { warp::bar->arrive_and_wait(); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "mma_harness: partial shuffle mask\n");
    std::abort();
  }
  std::memcpy(&warp::exchange[threadIdx.x], &v, 4);
  warp::bar->arrive_and_wait();
  T r;
  std::memcpy(&r, &warp::exchange[src & 31], 4);
  warp::bar->arrive_and_wait();
  return r;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int m) {
  return __shfl_sync(mask, v, static_cast<int>(threadIdx.x) ^ m);
}

#include "mma_test_kernels.cuh"

static_assert(glmix::mma_test::kSmem16 <= sizeof(g_smem) && glmix::mma_test::kSmem32 <= sizeof(g_smem));

namespace {

template <class F>
void run_warp(F&& kernel) {
  std::fill(std::begin(g_smem), std::end(g_smem), std::numeric_limits<float>::quiet_NaN());
  std::barrier<> bar(32);
  warp::bar = &bar;
  std::vector<std::thread> lanes;
  for (unsigned l = 0; l < 32; ++l)
    lanes.emplace_back([&, l] {
      threadIdx.x = l;
      kernel();
    });
  for (auto& t : lanes) t.join();
}

template <class T>
std::vector<T> read(size_t n) {
  std::vector<T> v(n);
  if (std::fread(v.data(), sizeof(T), n, stdin) != n) {
    std::fprintf(stderr, "mma_harness: short input\n");
    std::exit(2);
  }
  return v;
}
template <class T>
void write(const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

template <class E>
void tile16() {
  auto a = read<uint16_t>(256), b = read<uint16_t>(256), b3 = read<uint16_t>(128);
  auto c = read<float>(128);
  std::vector<float> dn(128), dt(128), dc(128);
  std::vector<uint32_t> frag(32 * glmix::mma_test::kFragWords);
  run_warp([&] {
    glmix::mma_test::mma_tile_test<E>(a.data(), b.data(), b3.data(), c.data(), dn.data(), dt.data(), dc.data(),
                                      frag.data());
  });
  write(dn), write(dt), write(dc), write(frag);
}

void tile32() {
  auto a = read<float>(256), b = read<float>(128), c = read<float>(128);
  std::vector<float> dn(128), dt(128), d1(128);
  std::vector<uint32_t> frag(32 * 6);
  run_warp([&] { glmix::mma_test::mma3_tile_test(a.data(), b.data(), c.data(), dn.data(), dt.data(), d1.data(),
                                                 frag.data()); });
  write(dn), write(dt), write(d1), write(frag);
}

void convert() {
  namespace m = glmix::cuda_detail::mma;
  const auto n = read<uint32_t>(1)[0];
  const auto v = read<float>(n);
  std::vector<uint16_t> bf(n), hf(n);
  std::vector<uint32_t> tf(n);
  for (uint32_t i = 0; i < n; ++i) {
    bf[i] = m::to_bits(v[i], m::Bf16{});
    hf[i] = m::to_bits(v[i], m::F16{});
    tf[i] = m::to_tf32(v[i]);
  }
  std::vector<float> from(65536);
  for (uint32_t h = 0; h < 65536; ++h) from[h] = m::from_bits(static_cast<uint16_t>(h), m::F16{});
  write(bf), write(hf), write(tf), write(from);
}

void ldsm() {
  namespace m = glmix::cuda_detail::mma;
  std::vector<int32_t> out;
  for (int which = 0; which < 4; ++which)
    for (int lane = 0; lane < 32; ++lane) {
      const bool trans = which & 1;
      const m::RC rc = which < 2 ? m::ldsm_a_row(lane, trans) : m::ldsm_b_row(lane, trans);
      out.push_back(rc.row);
      out.push_back(rc.col);
    }
  write(out);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string kind = argc > 1 ? argv[1] : "";
  if (kind == "bf16")
    tile16<glmix::cuda_detail::mma::Bf16>();
  else if (kind == "f16")
    tile16<glmix::cuda_detail::mma::F16>();
  else if (kind == "f32")
    tile32();
  else if (kind == "convert")
    convert();
  else if (kind == "ldsm")
    ldsm();
  else {
    std::fprintf(stderr, "usage: mma_harness bf16|f16|f32|convert|ldsm\n");
    return 2;
  }
  return 0;
}
