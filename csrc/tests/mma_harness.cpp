// Host runner for the tensor-core device code under GLMIX_CUDA_EMULATION (the mma test kernels of
// mma_test_kernels.cuh, the forward kernels): each CUDA thread a std::thread, blocks one after
// another, __syncthreads a block barrier, __shfl_sync through a per-warp exchange array between
// two warp barriers, dynamic shared memory one buffer refilled with NaN per block. Just enough of
// the CUDA execution model for these kernels; tests/test_mma.py builds and drives it.
//
//   mma_harness bf16|f16   stdin: a (256 u16), b (256 u16), b3 (128 u16), c (128 f32)
//                          stdout: d_n, d_t, d_chain (128 f32 each), frag (32 x 12 u32)
//   mma_harness f32        stdin: a (256 f32), b (128 f32), c (128 f32)
//                          stdout: d_n, d_t, d_1x (128 f32 each), frag (32 x 6 u32)
//   mma_harness convert    stdin: n, then n f32
//                          stdout: bf16 and f16 bits (n u16 each), tf32 bits (n u32), and the
//                          65536 f16 bit patterns as f32
//   mma_harness {cluster,dispatch}_fwd_{bf16,f16}   the forward kernels of mma_kernels.cuh (see below;
//                          C above 256: the wide forwards)
//   mma_harness {cluster,dispatch}_bwd_wide_{bf16,f16}   the wide backward kernels (see below)
//   mma_harness {cluster,dispatch}_bwd_{bf16,f16}   the fused backward (fused_bwd_mma; see below)
// MMA_HARNESS_ORDER=0..4 sets the order fibers resume in (fiber::order).
//   mma_harness ldsm       stdout: the row addresses of the GPU build's ldmatrix loads, per lane
//                          (i32 row, col): A "n", A "t", B "n", B "t" (32 x 2 each)
#include <ucontext.h>
#include <algorithm>
#include <array>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#define GLMIX_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Dynamic shared memory: one buffer, refilled with NaN before each launch.
alignas(16) float g_smem[65536];
#define GLMIX_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(g_smem)

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
using std::max;
using std::min;

// Fibers: every CUDA thread of a block is a ucontext fiber, resumed round-robin by run_grid. A
// fiber yields only at a barrier (__syncthreads, and the two warp barriers of a shuffle), where it
// waits until every participant has arrived.
namespace fiber {
ucontext_t scheduler;
std::vector<ucontext_t> ctx;
std::vector<char> finished;
unsigned current = 0;
unsigned long progress = 0;  // arrivals, releases and finished fibers: a round without any is a deadlock
void (*body)(void*) = nullptr;
void* body_arg = nullptr;
// The order fibers resume in, every round: 0 forward, 1 alternately reverse and forward, 2 random
// (seeded); 3 and 4 run one warp at a time (lowest, highest first) until all its threads wait at
// __syncthreads, so a warp runs far ahead of the others, as a missing block barrier needs to show.
// A kernel whose result depends on the order has a race.
int order = 0;
std::vector<char> at_block_barrier;
std::mt19937 rng(0);
void yield() { swapcontext(&ctx[current], &scheduler); }
void entry() {
  body(body_arg);
  finished[current] = 1;  // then back to the scheduler through uc_link
  ++progress;
}

struct Barrier {
  unsigned n = 0, arrived = 0, generation = 0;
  void wait() {
    const unsigned gen = generation;
    ++progress;
    if (++arrived == n) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == gen) yield();
  }
};
Barrier block_bar;
std::vector<Barrier> warp_bars;
std::vector<std::array<uint64_t, 32>> exchange;
}  // namespace fiber

inline void __syncthreads() {
  fiber::at_block_barrier[threadIdx.x] = 1;
  fiber::block_bar.wait();
  fiber::at_block_barrier[threadIdx.x] = 0;
}

template <class T>
T __shfl_sync(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "mma_harness: partial shuffle mask\n");
    std::abort();
  }
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  fiber::exchange[w][lane] = bits;
  fiber::warp_bars[w].wait();
  bits = fiber::exchange[w][src & 31];
  fiber::warp_bars[w].wait();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int m) {
  return __shfl_sync(mask, v, static_cast<int>(threadIdx.x % 32) ^ m);
}

#include "../cuda/mma_kernels.cuh"
#include "mma_test_kernels.cuh"

static_assert(glmix::mma_test::kSmem16 <= sizeof(g_smem) && glmix::mma_test::kSmem32 <= sizeof(g_smem));

namespace {

// Runs kernel() as every thread of every block (blocks one after another); threads a multiple of 32.
template <class F>
void run_grid(Dim3 grid, unsigned threads, F&& kernel) {
  fiber::body = [](void* k) { (*static_cast<std::remove_reference_t<F>*>(k))(); };
  fiber::body_arg = &kernel;
  gridDim = grid;
  blockDim = {threads, 1, 1};
  std::vector<std::vector<char>> stacks(threads, std::vector<char>(256 * 1024));
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::fill(std::begin(g_smem), std::end(g_smem), std::numeric_limits<float>::quiet_NaN());
        fiber::block_bar = {threads, 0, 0};
        fiber::warp_bars.assign(threads / 32, {32, 0, 0});
        fiber::exchange.assign(threads / 32, {});
        fiber::ctx.assign(threads, {});
        fiber::finished.assign(threads, 0);
        fiber::at_block_barrier.assign(threads, 0);
        for (unsigned t = 0; t < threads; ++t) {
          getcontext(&fiber::ctx[t]);
          fiber::ctx[t].uc_stack.ss_sp = stacks[t].data();
          fiber::ctx[t].uc_stack.ss_size = stacks[t].size();
          fiber::ctx[t].uc_link = &fiber::scheduler;
          makecontext(&fiber::ctx[t], fiber::entry, 0);
        }
        for (unsigned left = threads; left > 0;) {
          const unsigned long before = fiber::progress;
          if (fiber::order == 1) std::reverse(order.begin(), order.end());
          if (fiber::order == 2) std::shuffle(order.begin(), order.end(), fiber::rng);
          int only_warp = -1;  // orders 3 and 4: the first warp (in their order) with a thread to run
          if (fiber::order >= 3)
            for (unsigned i = 0; i < threads / 32 && only_warp < 0; ++i) {
              const unsigned w = fiber::order == 3 ? i : threads / 32 - 1 - i;
              for (unsigned t = 32 * w; t < 32 * w + 32; ++t)
                if (!fiber::finished[t] && !fiber::at_block_barrier[t]) only_warp = static_cast<int>(w);
            }
          for (unsigned t : order) {
            if (fiber::finished[t] || (only_warp >= 0 && t / 32 != static_cast<unsigned>(only_warp))) continue;
            fiber::current = t;
            threadIdx = {t, 0, 0};
            blockIdx = {x, y, z};
            swapcontext(&fiber::scheduler, &fiber::ctx[t]);
            left -= fiber::finished[t];
          }
          if (left > 0 && fiber::progress == before) {
            std::fprintf(stderr, "mma_harness: deadlock (threads wait at barriers that never fill)\n");
            std::abort();
          }
        }
      }
}
template <class F>
void run_warp(F&& kernel) {
  run_grid({1, 1, 1}, 32, kernel);
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
  run_warp([&] {
    glmix::mma_test::mma3_tile_test(a.data(), b.data(), c.data(), dn.data(), dt.data(), d1.data(), frag.data());
  });
  write(dn), write(dt), write(d1), write(frag);
}

void convert() {
  namespace m = glmix::GLMIX_CUDA_NS::mma;
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

// stdin: B, L, C, S, chunk_len, x strides (b, l, c), x storage elements (int64 each), x storage
// (u16), qs (B, S, C f32). stdout: ws_m, ws_l (B x nchunks x S f32), ws_acc (B x nchunks x S x C).
template <class E, int CP>
void cluster_fwd_cp(const std::vector<int64_t>& h, const std::vector<uint16_t>& x, const std::vector<float>& qs) {
  namespace k = glmix::GLMIX_CUDA_NS::tc;
  const int64_t B = h[0], L = h[1], C = h[2], S = h[3], len = h[4];
  const int nch = static_cast<int>((L + len - 1) / len);
  std::vector<float> m(B * nch * S), l(B * nch * S), acc(B * nch * S * C);
  if (k::cluster_fwd_mma_smem(CP) > sizeof(g_smem)) std::abort();
  const Dim3 grid{static_cast<unsigned>((S + k::kMmaRows - 1) / k::kMmaRows), static_cast<unsigned>(nch),
                  static_cast<unsigned>(B)};
  run_grid(grid, k::kMmaThreads, [&] {
    k::cluster_fwd_chunk_mma<E, CP>(x.data(), h[5], h[6], h[7], qs.data(), S * C, C, 1, static_cast<int>(L),
                                    static_cast<int>(S), static_cast<int>(C), len, nch, m.data(), l.data(), acc.data());
  });
  write(m), write(l), write(acc);
}

// The same through cluster_fwd_chunk_wide_mma (C above 256): a block per slot tile and channel block.
template <class E>
void cluster_fwd_wide(const std::vector<int64_t>& h, const std::vector<uint16_t>& x, const std::vector<float>& qs) {
  namespace k = glmix::GLMIX_CUDA_NS::tc;
  const int64_t B = h[0], L = h[1], C = h[2], S = h[3], len = h[4];
  const int nch = static_cast<int>((L + len - 1) / len);
  std::vector<float> m(B * nch * S), l(B * nch * S), acc(B * nch * S * C);
  if (k::fwd_wide_mma_smem<E>() > sizeof(g_smem)) std::abort();
  const int nst = static_cast<int>((S + k::kMmaRows - 1) / k::kMmaRows);
  const Dim3 grid{static_cast<unsigned>(nst * k::wide_blocks(static_cast<int>(C), false)), static_cast<unsigned>(nch),
                  static_cast<unsigned>(B)};
  run_grid(grid, k::kMmaThreads, [&] {
    k::cluster_fwd_chunk_wide_mma<E>(x.data(), h[5], h[6], h[7], qs.data(), S * C, C, 1, static_cast<int>(L),
                                     static_cast<int>(S), static_cast<int>(C), len, nch, m.data(), l.data(),
                                     acc.data());
  });
  write(m), write(l), write(acc);
}

template <class E>
void cluster_fwd() {
  const auto h = read<int64_t>(9);
  const auto x = read<uint16_t>(h[8]);
  const auto qs = read<float>(h[0] * h[3] * h[2]);
  switch (glmix::GLMIX_CUDA_NS::tc::padded_channels(static_cast<int>(h[2]))) {
    case 16:
      return cluster_fwd_cp<E, 16>(h, x, qs);
    case 32:
      return cluster_fwd_cp<E, 32>(h, x, qs);
    case 64:
      return cluster_fwd_cp<E, 64>(h, x, qs);
    case 128:
      return cluster_fwd_cp<E, 128>(h, x, qs);
    case 256:
      return cluster_fwd_cp<E, 256>(h, x, qs);
    default:
      return cluster_fwd_wide<E>(h, x, qs);
  }
}

// stdin: B, L, C, S, tiles_per_block, x strides (3), x storage elements (int64 each), x storage
// (u16), qs (B, S, C f32), slots (B, S, C u16). stdout: out (B, L, C u16), lse (B, L f32).
template <class E, int CP>
void dispatch_fwd_cp(const std::vector<int64_t>& h, const std::vector<uint16_t>& x, const std::vector<float>& qs,
                     const std::vector<uint16_t>& sl) {
  namespace k = glmix::GLMIX_CUDA_NS::tc;
  const int64_t B = h[0], L = h[1], C = h[2], S = h[3], tpb = h[4];
  std::vector<uint16_t> out(B * L * C);
  std::vector<float> lse(B * L);
  if (k::dispatch_fwd_mma_smem(CP) > sizeof(g_smem)) std::abort();
  const int64_t ntiles = (L + 63) / 64;
  const Dim3 grid{static_cast<unsigned>((ntiles + tpb - 1) / tpb), static_cast<unsigned>(B), 1};
  run_grid(grid, k::kMmaThreads, [&] {
    k::dispatch_fwd_mma<E, CP>(x.data(), h[5], h[6], h[7], qs.data(), S * C, C, 1, sl.data(), S * C, C, 1, L,
                               static_cast<int>(S), static_cast<int>(C), static_cast<int>(tpb), out.data(), lse.data());
  });
  write(out), write(lse);
}

// The same through dispatch_fwd_wide_mma (C above 256).
template <class E>
void dispatch_fwd_wide(const std::vector<int64_t>& h, const std::vector<uint16_t>& x, const std::vector<float>& qs,
                       const std::vector<uint16_t>& sl) {
  namespace k = glmix::GLMIX_CUDA_NS::tc;
  const int64_t B = h[0], L = h[1], C = h[2], S = h[3], tpb = h[4];
  std::vector<uint16_t> out(B * L * C);
  std::vector<float> lse(B * L);
  if (k::fwd_wide_mma_smem<E>() > sizeof(g_smem)) std::abort();
  const int64_t ntiles = (L + 63) / 64;
  const Dim3 grid{static_cast<unsigned>((ntiles + tpb - 1) / tpb), static_cast<unsigned>(B), 1};
  run_grid(grid, k::kMmaThreads, [&] {
    k::dispatch_fwd_wide_mma<E>(x.data(), h[5], h[6], h[7], qs.data(), S * C, C, 1, sl.data(), S * C, C, 1, L,
                                static_cast<int>(S), static_cast<int>(C), static_cast<int>(tpb), out.data(),
                                lse.data());
  });
  write(out), write(lse);
}

template <class E>
void dispatch_fwd() {
  const auto h = read<int64_t>(9);
  const auto x = read<uint16_t>(h[8]);
  const auto qs = read<float>(h[0] * h[3] * h[2]);
  const auto sl = read<uint16_t>(h[0] * h[3] * h[2]);
  switch (glmix::GLMIX_CUDA_NS::tc::padded_channels(static_cast<int>(h[2]))) {
    case 16:
      return dispatch_fwd_cp<E, 16>(h, x, qs, sl);
    case 32:
      return dispatch_fwd_cp<E, 32>(h, x, qs, sl);
    case 64:
      return dispatch_fwd_cp<E, 64>(h, x, qs, sl);
    case 128:
      return dispatch_fwd_cp<E, 128>(h, x, qs, sl);
    case 256:
      return dispatch_fwd_cp<E, 256>(h, x, qs, sl);
    default:
      return dispatch_fwd_wide<E>(h, x, qs, sl);
  }
}

// stdin: B, L, C, S, chunk_len, x strides (3), x storage elements (int64 each), x storage (u16),
// qs (B, S, C f32), then the clustering's G (B, S, C u16), lse and delta (B, S f32 each), or the
// dispatch's grad (B, L, C u16), slots (B, S, C u16) and lse (B, L f32). The wide backward
// (pixel_bwd_wide_mma, then slot_bwd_wide_mma over chunks of chunk_len pixels). stdout: dx (B, L,
// C u16), the partial dqs (B, nchunks, S, C f32) and the dispatch's partial dslots (the same).
template <class E, bool kDispatch>
void bwd_wide() {
  namespace k = glmix::GLMIX_CUDA_NS::tc;
  const auto h = read<int64_t>(9);
  const int64_t B = h[0], L = h[1], C = h[2], S = h[3], len = h[4];
  const auto x = read<uint16_t>(h[8]);
  const auto qs = read<float>(B * S * C);
  const auto g = read<uint16_t>(B * (kDispatch ? L : S) * C);
  const auto sl = read<uint16_t>(kDispatch ? B * S * C : 0);
  const auto lse = read<float>(B * (kDispatch ? L : S));
  const auto delta = read<float>(kDispatch ? 0 : B * S);
  const int nch = static_cast<int>((L + len - 1) / len);
  std::vector<uint16_t> dx(B * L * C);
  std::vector<float> dl(B * L), dq(B * nch * S * C), dv(kDispatch ? B * nch * S * C : 0);
  const std::vector<float> kmean(B * C, 0.f);  // dqs uncentred: the ops' tests cover the centring
  if (k::bwd_wide_mma_smem<E>(kDispatch) > sizeof(g_smem)) std::abort();
  const k::Rows<uint16_t> xr{x.data(), h[5], h[6], h[7]}, gr{g.data(), (kDispatch ? L : S) * C, C, 1};
  const k::Rows<uint16_t> slr{sl.data(), S * C, C, 1};
  const k::Rows<float> qr{qs.data(), S * C, C, 1};
  const float* stat1 = kDispatch ? dl.data() : delta.data();
  run_grid({static_cast<unsigned>((L + 63) / 64), static_cast<unsigned>(B), 1}, k::kMmaThreads, [&] {
    k::pixel_bwd_wide_mma<E, kDispatch>(gr, xr, qr, slr, lse.data(), stat1, L, static_cast<int>(S), static_cast<int>(C),
                                        1, dx.data(), dl.data());
  });
  const int ncc = k::bwd_channel_chunks(static_cast<int>(C), false, !kDispatch, true);
  const Dim3 grid{static_cast<unsigned>((S + k::kMmaRows - 1) / k::kMmaRows * ncc), static_cast<unsigned>(nch),
                  static_cast<unsigned>(B)};
  run_grid(grid, k::kMmaThreads, [&] {
    k::slot_bwd_wide_mma<E, kDispatch>(gr, xr, qr, slr, lse.data(), stat1, static_cast<int>(L), static_cast<int>(S),
                                       static_cast<int>(C), len, nch, kmean.data(), dq.data(), dv.data());
  });
  write(dx), write(dq), write(dv);
}

// stdin: B, L, C, S, x strides (3), x storage elements (int64 each), x storage (u16), qs (B, S, C
// f32), then the clustering's G (B, S, C u16), lse and delta (B, S f32), or the dispatch's grad
// (B, L, C u16), slots (B, S, C u16), lse (B, L f32). stdout: dx (B, L, C u16), dqs (B, S, C f32),
// the dispatch's dslots (B, S, C u16). fused_bwd_mma, a block per batch element (S, C <= 64).
template <class E, bool kDispatch, int CP>
void fused_bwd_cp(const std::vector<int64_t>& h, const std::vector<uint16_t>& x, const std::vector<float>& qs) {
  namespace k = glmix::GLMIX_CUDA_NS::tc;
  const int64_t B = h[0], L = h[1], C = h[2], S = h[3];
  const auto g = read<uint16_t>(kDispatch ? B * L * C : B * S * C);
  const auto sl = read<uint16_t>(kDispatch ? B * S * C : 0);
  const auto st0 = read<float>(kDispatch ? B * L : B * S);
  const auto st1 = read<float>(kDispatch ? 0 : B * S);
  std::vector<uint16_t> dx(B * L * C), dv(B * S * C);
  std::vector<float> dq(B * S * C);
  const std::vector<float> kmean(B * C, 0.f);  // dqs uncentred: the ops' tests cover the centring
  if (k::fused_bwd_mma_smem<E>(CP, kDispatch) > sizeof(g_smem)) std::abort();
  const k::Rows<uint16_t> xr{x.data(), h[4], h[5], h[6]}, gr{g.data(), (kDispatch ? L : S) * C, C, 1},
      sr{sl.data(), S * C, C, 1};
  const k::Rows<float> qr{qs.data(), S * C, C, 1};
  run_grid({static_cast<unsigned>(B), 1, 1}, k::kMmaThreads, [&] {
    k::fused_bwd_mma<E, CP, kDispatch>(gr, xr, qr, sr, st0.data(), st1.data(), L, static_cast<int>(S),
                                       static_cast<int>(C), kmean.data(), dx.data(), dq.data(), dv.data());
  });
  write(dx), write(dq);
  if (kDispatch) write(dv);
}

template <class E, bool kDispatch>
void fused_bwd() {
  const auto h = read<int64_t>(8);
  const auto x = read<uint16_t>(h[7]);
  const auto qs = read<float>(h[0] * h[3] * h[2]);
  switch (glmix::GLMIX_CUDA_NS::tc::padded_channels(static_cast<int>(h[2]))) {
    case 16:
      return fused_bwd_cp<E, kDispatch, 16>(h, x, qs);
    case 32:
      return fused_bwd_cp<E, kDispatch, 32>(h, x, qs);
    default:
      return fused_bwd_cp<E, kDispatch, 64>(h, x, qs);
  }
}

void ldsm() {
  namespace m = glmix::GLMIX_CUDA_NS::mma;
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
  if (const char* o = std::getenv("MMA_HARNESS_ORDER")) fiber::order = std::atoi(o);
  if (kind == "bf16")
    tile16<glmix::GLMIX_CUDA_NS::mma::Bf16>();
  else if (kind == "f16")
    tile16<glmix::GLMIX_CUDA_NS::mma::F16>();
  else if (kind == "f32")
    tile32();
  else if (kind == "convert")
    convert();
  else if (kind == "ldsm")
    ldsm();
  else if (kind == "cluster_fwd_bf16")
    cluster_fwd<glmix::GLMIX_CUDA_NS::mma::Bf16>();
  else if (kind == "cluster_fwd_f16")
    cluster_fwd<glmix::GLMIX_CUDA_NS::mma::F16>();
  else if (kind == "dispatch_fwd_bf16")
    dispatch_fwd<glmix::GLMIX_CUDA_NS::mma::Bf16>();
  else if (kind == "dispatch_fwd_f16")
    dispatch_fwd<glmix::GLMIX_CUDA_NS::mma::F16>();
  else if (kind == "cluster_bwd_wide_bf16")
    bwd_wide<glmix::GLMIX_CUDA_NS::mma::Bf16, false>();
  else if (kind == "cluster_bwd_wide_f16")
    bwd_wide<glmix::GLMIX_CUDA_NS::mma::F16, false>();
  else if (kind == "dispatch_bwd_wide_bf16")
    bwd_wide<glmix::GLMIX_CUDA_NS::mma::Bf16, true>();
  else if (kind == "dispatch_bwd_wide_f16")
    bwd_wide<glmix::GLMIX_CUDA_NS::mma::F16, true>();
  else if (kind == "cluster_bwd_bf16")
    fused_bwd<glmix::GLMIX_CUDA_NS::mma::Bf16, false>();
  else if (kind == "cluster_bwd_f16")
    fused_bwd<glmix::GLMIX_CUDA_NS::mma::F16, false>();
  else if (kind == "dispatch_bwd_bf16")
    fused_bwd<glmix::GLMIX_CUDA_NS::mma::Bf16, true>();
  else if (kind == "dispatch_bwd_f16")
    fused_bwd<glmix::GLMIX_CUDA_NS::mma::F16, true>();
  else {
    std::fprintf(stderr,
                 "usage: mma_harness bf16|f16|f32|convert|ldsm|{cluster,dispatch}_{fwd,bwd,bwd_wide}_{bf16,f16}\n");
    return 2;
  }
  return 0;
}
