// The CPU kernels' partition of L into pixel tiles and chunks of tiles (plan_chunks), and the
// parallel loop over (batch element, chunk).
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

namespace glmix::cpu {

// The partition of L: tiles of `tile` pixels, grouped into at most `max_chunks` chunks per batch
// element. One task handles one chunk, tile after tile. The partition depends on the shapes only,
// never on the thread count, so every reduction over pixels (within a chunk in tile order, then
// across chunks in chunk order) is bitwise reproducible.

// A tile's (T, C) pixels and (T, S) logits stay in L2 for the channel counts GLNet uses (512 pixels
// measured best at C = 64; 256 and 1024 were 2-10% slower).
inline int64_t tile_pixels(int64_t C) { return C <= 64 ? 512 : C <= 128 ? 256 : 128; }

// Enough chunks to feed many cores when B is small, few enough that the (B, chunks, S, C)
// partial results stay a small multiple of the outputs.
constexpr int64_t kMaxChunks = 16;

struct Chunks {
  int64_t L, tile, tiles_per_chunk, n;

  int64_t begin(int64_t j) const { return j * tiles_per_chunk * tile; }
  int64_t end(int64_t j) const { return std::min(L, (j + 1) * tiles_per_chunk * tile); }
};

inline Chunks plan_chunks(int64_t L, int64_t C, int64_t max_chunks) {
  Chunks ch{L, tile_pixels(C), 0, 0};
  const int64_t tiles = (L + ch.tile - 1) / ch.tile;
  ch.tiles_per_chunk = std::max<int64_t>(1, (tiles + max_chunks - 1) / max_chunks);
  ch.n = (tiles + ch.tiles_per_chunk - 1) / ch.tiles_per_chunk;
  return ch;
}

// fn(b, j) for every batch element b and chunk j, in parallel.
template <typename F>
void parallel_chunks(int64_t B, const Chunks& ch, const F& fn) {
  at::parallel_for(0, B * ch.n, 1, [&](int64_t begin, int64_t end) {
    for (const auto i : c10::irange(begin, end)) fn(i / ch.n, i % ch.n);
  });
}

}  // namespace glmix::cpu
