// The CUDA kernels' launch planning (csrc/cuda/plan.h), plain C++ shared by the GPU build and the
// emulation: over a grid of shapes and devices, the tiles fit the accumulators and the shared
// memory, and the chunks cover L exactly with whole tiles. Exit status 0 when every check holds.
#include <cstdio>

#include "cuda/plan.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, long long L, long long S, long long C) {
  if (ok) return;
  ++failures;
  std::printf("FAILED: %s (L=%lld S=%lld C=%lld)\n", what, L, S, C);
}

void expect_split(bool ok, const char* what, long long L, long long blocks) {
  if (ok) return;
  ++failures;
  std::printf("FAILED: %s (L=%lld, %lld blocks per chunk)\n", what, L, blocks);
}

size_t smem_of(int TL, int TS, int ld) {  // cluster_bwd_chunk's carve
  glmix::plan::SmemCount s;
  s.take(TL * ld).take(TL * ld).take(TS * ld).take(TS * ld).take(TS * TL).take(TS * TL);
  s.take(TL).take(TL).take(TL).take(TS).take(TS);
  return s.bytes();
}

}  // namespace

int main() {
  using namespace glmix::plan;
  const Device devices[] = {{227 * 1024, 1}, {227 * 1024, 132}, {48 * 1024, 8}};
  const int budget = 16 * kThreads;
  for (const Device& dev : devices)
    for (long long C : {1, 3, 64, 300, 1024})
      for (long long S : {1, 5, 64, 65, 256})
        for (long long L : {1, 37, 64, 1000, 100000}) {
          bool ok = false;
          const Tiles t = plan_tiles(S, C, budget, dev, smem_of, ok);
          expect(ok && smem_of(t.TL, t.TS, t.ld) <= dev.smem_optin, "tiles fit shared memory", L, S, C);
          expect(t.TL * C <= budget && t.TS * C <= budget && t.TS <= S, "tiles fit the accumulators", L, S, C);
          expect(static_cast<long long>(t.nst) * t.TS >= S && (t.nst - 1LL) * t.TS < S, "slot tiles cover S", L, S, C);
          for (const Chunks ch : {plan_chunks(L, t.TL, 2, dev), plan_dispatch_fwd_chunks(L, t.TL, 2, dev),
                                  plan_mma_chunks(L, t.TL, 2, dev), plan_mma_chunks(L, t.TL, 128, dev)}) {
            expect(ch.len % t.TL == 0 && ch.n >= 1 && ch.n <= (L + t.TL - 1) / t.TL, "whole tiles per chunk", L, S, C);
            expect(ch.len * ch.n >= L && ch.len * (ch.n - 1) < L, "chunks cover L, none empty", L, S, C);
          }
          expect(plan_chunks(L, t.TL, 1, dev).n <= kMaxChunks, "at most kMaxChunks chunks", L, S, C);
        }
  // The tensor-core split: one chunk once a chunk's blocks fill an H100's 132 SMs (glnet_4g stage 3,
  // B = 128: 128 blocks per chunk, twice and four times that with the backward's channel chunks),
  // four blocks per SM below; the emulation's single SM splits the tests' small grids.
  const Device h100{227 * 1024, 132}, emulated{227 * 1024, 1};
  for (long long blocks : {128, 256, 512})
    expect_split(plan_mma_chunks(196, 64, blocks, h100).n == 1, "one chunk when the batch fills the SMs", 196, blocks);
  expect_split(plan_mma_chunks(3136, 64, 16, h100).n == plan_chunks(3136, 64, 16, h100).n &&
                   plan_chunks(3136, 64, 16, h100).n > 1,
               "four blocks per SM below a wave", 3136, 16);
  for (long long blocks : {1, 2})
    expect_split(plan_mma_chunks(150, 64, blocks, emulated).n >= 2, "the emulation splits small grids", 150, blocks);
  std::printf("%s\n", failures == 0 ? "test_cuda_plan: all checks passed" : "test_cuda_plan: failures");
  return failures == 0 ? 0 : 1;
}
