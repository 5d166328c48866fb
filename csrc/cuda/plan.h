// Host planning of the CUDA kernels' launches: tile sizes and the split of L into chunks. Plain
// C++ on plain numbers (the device's properties come in as arguments), shared by the GPU build and
// the emulation (GLMIX_CUDA_EMULATION), and tested on its own.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace glmix::plan {

constexpr int kThreads = 256;     // threads per block, every kernel
constexpr int kMaxTile = 64;      // at most 64 pixels and 64 slots per tile
constexpr int kMaxChunks = 1024;  // chunks per batch element (cluster_fwd_combine's shared memory)

// What the planning needs to know of the device.
struct Device {
  size_t smem_optin;  // bytes of dynamic shared memory a block may opt in to
  int64_t sm_count;
};

// Counts the floats a kernel carves from its dynamic shared memory, in the kernel's order.
struct SmemCount {
  size_t n = 0;
  SmemCount& take(int k) {
    n += static_cast<size_t>(k);
    return *this;
  }
  size_t bytes() const { return n * sizeof(float); }
};

// Tile sizes: TL pixels and TS slots per tile, powers of two up to 64 (TS also at most S), with
// TL * C and TS * C within `budget` (the register accumulators' reach, ACC * kThreads); ld is the
// shared-memory row length C | 1; nst the number of slot tiles.
struct Tiles {
  int TL, TS, nst, ld;
};

inline int pow2_tile(int C, int budget) {
  int t = kMaxTile;
  while (t > 1 && t * C > budget) t >>= 1;
  return t;
}

// Shrinks the tiles until smem_bytes(TL, TS, ld) fits the device's opt-in limit; ok is false when
// even 1 x 1 tiles do not fit.
template <typename F>
inline Tiles plan_tiles(int64_t S, int64_t C, int budget, const Device& dev, F smem_bytes, bool& ok) {
  Tiles t;
  t.ld = static_cast<int>(C) | 1;
  t.TL = pow2_tile(static_cast<int>(C), budget);
  t.TS = static_cast<int>(std::min<int64_t>(pow2_tile(static_cast<int>(C), budget), S));
  while (smem_bytes(t.TL, t.TS, t.ld) > dev.smem_optin && (t.TL > 1 || t.TS > 1)) {
    if (t.TL >= t.TS && t.TL > 1)
      t.TL >>= 1;
    else
      t.TS >>= 1;
  }
  ok = smem_bytes(t.TL, t.TS, t.ld) <= dev.smem_optin;
  t.nst = static_cast<int>((S + t.TS - 1) / t.TS);
  return t;
}

// A split of L into chunks of whole pixel tiles.
struct Chunks {
  int64_t len;  // pixels per chunk, a multiple of TL
  int n;        // number of chunks, each non-empty
};

inline Chunks chunks_of_len(int64_t L, int64_t len) { return {len, static_cast<int>((L + len - 1) / len)}; }

// For the split-L kernels: enough chunks for about four blocks per SM in all (each chunk runs
// blocks_per_chunk blocks), at most one per tile and kMaxChunks.
inline Chunks plan_chunks(int64_t L, int TL, int64_t blocks_per_chunk, const Device& dev) {
  const int64_t ntiles = (L + TL - 1) / TL;
  const int64_t target = 4 * dev.sm_count;
  int64_t n = (target + blocks_per_chunk - 1) / std::max<int64_t>(blocks_per_chunk, 1);
  n = std::max<int64_t>(1, std::min<int64_t>({n, ntiles, kMaxChunks}));
  return chunks_of_len(L, ((ntiles + n - 1) / n) * TL);
}

// For the tensor-core split-L kernels (one or two blocks per SM): one chunk per batch element once
// a chunk's blocks alone fill the SMs (at least 7/8 of them), since each further chunk adds a round
// of fp32 partials (B * S * C, written and read) for at most the last 1/8 of the SMs. Grids of
// fewer than kFillBlocks blocks per chunk (small batches, and the emulation's single SM) keep
// plan_chunks' four blocks per SM: they are latency-bound, and their partials small.
constexpr int64_t kFillBlocks = 32;

inline Chunks plan_mma_chunks(int64_t L, int TL, int64_t blocks_per_chunk, const Device& dev) {
  const bool fills = blocks_per_chunk >= kFillBlocks && 8 * blocks_per_chunk >= 7 * dev.sm_count;
  return fills ? chunks_of_len(L, ((L + TL - 1) / TL) * TL) : plan_chunks(L, TL, blocks_per_chunk, dev);
}

// For dispatch_fwd, which reduces over slots only: chunks of up to kMaxTilesPerBlock tiles, so one
// load of qs and slots serves several tiles when one slot tile holds all S, with about four blocks
// per SM in all over the batch's B chunk rows.
constexpr int64_t kMaxTilesPerBlock = 8;

inline Chunks plan_dispatch_fwd_chunks(int64_t L, int TL, int64_t B, const Device& dev) {
  const int64_t ntiles = (L + TL - 1) / TL;
  const int64_t target = std::max<int64_t>(4 * dev.sm_count, 1);
  const int64_t per_block = std::max<int64_t>(1, std::min<int64_t>(kMaxTilesPerBlock, ntiles * B / target));
  return chunks_of_len(L, per_block * TL);
}

}  // namespace glmix::plan
