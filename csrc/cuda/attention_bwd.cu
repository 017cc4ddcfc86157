// Flash-attention backward for sm_80 and newer (mma.sync / ldmatrix / cp.async), FlashAttention-2's
// algorithm. Three steps:
//   1. delta = rowsum(dO * O)                                   (attention_bwd_delta_kernel)
//   2. one CTA per (key tile, kv head, column split, batch) keeps K, V and its dK, dV
//      accumulators on chip and streams the query tiles of every query head sharing the kv head
//      (so GQA sums happen in registers, deterministically):
//        S = Q K^T, P = exp(S * scale - lse), dP = dO V^T, dS = P * (dP - delta),
//        dV += P^T dO, dK += dS^T Q * scale, and (non-deterministic mode) dQ += dS K * scale with
//        float32 atomics into a workspace                     (attention_bwd_dkdv_kernel)
//   3. dQ: either the workspace rounded to the output dtype (attention_bwd_convert_dq_kernel),
//      or, deterministic, one CTA per query tile recomputing S and dP over the key tiles
//      (attention_bwd_dq_kernel).
// Head dims above 128 split the dK/dV/dQ columns over two CTAs (each recomputes S and dP over
// the full head dim) so the accumulators fit in registers. On sm_90 step 2 runs on the wgmma/TMA
// kernel of attention_bwd_sm90.cu where it applies (D <= 128).
#include "cuda/attention_sm80.cuh"
#include "cuda/attention_sm90.cuh"

namespace fusedlm::cuda {
namespace attention {
namespace {

// delta[row] = sum_d dO[row, d] * O[row, d] - grad_lse[row] (float32), one warp per
// (b, h, token) row. A gradient of lse adds grad_lse * P to dS, the same as lowering delta.
// grid (ceil(B Hq Tq / 8)), 256 threads.
template <typename T>
__global__ void __launch_bounds__(256)
    attention_bwd_delta_kernel(const AttentionInput out,             // (B, Hq, Tq, D)
                               const AttentionInput grad_out,        // (B, Hq, Tq, D)
                               const float* __restrict__ grad_lse,   // (B, Hq, Tq) or nullptr
                               float* __restrict__ delta,            // (B, Hq, Tq)
                               int64_t Hq, int64_t Tq, int D, int64_t rows) {
  const int64_t row = int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int64_t b = row / (Hq * Tq);
  const int64_t h = (row / Tq) % Hq;
  const int64_t token = row % Tq;
  const T* o = static_cast<const T*>(out.data) + b * out.batch_stride + h * out.head_stride +
               token * out.token_stride;
  const T* dout = static_cast<const T*>(grad_out.data) + b * grad_out.batch_stride +
                  h * grad_out.head_stride + token * grad_out.token_stride;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += convert<float>(o[d]) * convert<float>(dout[d]);
  acc = warp_reduce_sum(acc);
  if (lane == 0) delta[row] = grad_lse == nullptr ? acc : acc - grad_lse[row];
}

// dq = dq_accumulator rounded to T, grid-stride.
template <typename T>
__global__ void attention_bwd_convert_dq_kernel(const float* __restrict__ dq_accumulator,  // (n)
                                                T* __restrict__ dq,                         // (n)
                                                int64_t n) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dq[i] = convert<T>(dq_accumulator[i]);
  }
}

// Per-query key ranges, step 1: the keys [lo, hi) of each query tile of kBlock rows
// (tile_key_bounds' outer extent; (Tk, 0) for a tile whose rows see no key). One pass over the
// ranges. grid (B * ceil(Tq / kBlock)), one warp.
template <int kBlock>
__global__ void __launch_bounds__(32)
    attention_bwd_query_tile_keys_kernel(const AttentionShape shape,
                                         int32_t* __restrict__ query_tile_keys) {  // (B, tiles, 2)
  const int64_t tiles = ceil_div(shape.Tq, kBlock);
  const int64_t b = blockIdx.x / tiles;
  const int64_t m0 = (blockIdx.x % tiles) * kBlock;
  const TileKeyBounds bounds =
      tile_key_bounds<true>(shape, KeyBounds{0, shape.Tk}, b, m0, kBlock, threadIdx.x);
  if (threadIdx.x == 0) {  // int32: Tk fits (fits_grid)
    query_tile_keys[2 * blockIdx.x] = static_cast<int32_t>(bounds.outer.lo);
    query_tile_keys[2 * blockIdx.x + 1] = static_cast<int32_t>(bounds.outer.hi);
  }
}

// Per-query key ranges, step 2: for each key tile of kBlock keys, the query tiles [first, end)
// from the first to the last whose keys (step 1) meet it, (0, 0) when none does (the dK/dV
// kernel then runs no query tile for it, and its rows between first and end are masked). Kept
// out of the dK/dV kernel: this scan inside it cost the D = 128 instances 100-170 bytes of
// spills. grid (B * ceil(Tk / kBlock)), one warp: lanes split the query tiles.
template <int kBlock>
__global__ void __launch_bounds__(32)
    attention_bwd_query_extent_kernel(const AttentionShape shape,
                                      const int32_t* __restrict__ query_tile_keys,  // (B, m, 2)
                                      int32_t* __restrict__ query_extent) {  // (B, n, 2)
  const int64_t key_tiles = ceil_div(shape.Tk, kBlock);
  const int64_t b = blockIdx.x / key_tiles;
  const int64_t n0 = (blockIdx.x % key_tiles) * kBlock;
  const int64_t n1 = std::min<int64_t>(n0 + kBlock, shape.Tk);
  const int query_tiles = static_cast<int>(ceil_div(shape.Tq, kBlock));  // fits_grid
  const int32_t* tile_keys = query_tile_keys + 2 * b * query_tiles;
  const int lane = threadIdx.x;
  int first = query_tiles, last = -1;
  for (int m = lane; m < query_tiles; m += 32) {
    if (tile_keys[2 * m] < n1 && tile_keys[2 * m + 1] > n0) {
      first = std::min(first, m);
      last = m;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    first = std::min(first, __shfl_xor_sync(0xffffffffu, first, offset));
    last = std::max(last, __shfl_xor_sync(0xffffffffu, last, offset));
  }
  if (lane == 0) {
    query_extent[2 * blockIdx.x] = last < 0 ? 0 : first;
    query_extent[2 * blockIdx.x + 1] = last + 1;
  }
}

// Per-row softmax statistics of one warp's two query rows (g and g + 8 of its 16): lse in log2
// units (+inf for rows past Tq or that see no key, so their probabilities are 0) and delta.
struct RowStats {
  float lse_log2[2];
  float delta[2];
};

__device__ __forceinline__ RowStats load_row_stats(const float* lse, const float* delta,
                                                   int64_t row0, int64_t Tq) {
  RowStats stats;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + 8 * r;
    const float l = row < Tq ? lse[row] : INFINITY;
    stats.lse_log2[r] = l == -INFINITY ? INFINITY : l * kLog2e;
    stats.delta[r] = row < Tq ? delta[row] : 0.f;
  }
  return stats;
}

// One warp's probabilities and score gradients from its scores S and dP (C layout, 16 rows
// starting at query row0, kNBlocks * 8 keys starting at key n0), in place:
// scores <- P = exp(S * scale - lse), dp <- dS = P * (dP - delta); masked entries get 0.
// kWindowed: the bounded instance (sliding window, key range: per-row column bounds within the
// row's keys, row_key_bounds of batch row b; kPerQuery: the row's own range); the plain one
// tests each
// element against Tq, Tk and the causal limit as before windows existed (the per-row bounds
// cost the plain sm_80 D = 128 dK/dV kernel 16 bytes of spills).
// kScoreMods (bounded): scores soft-capped (dS then times 1 - tanh^2, the cap's derivative) and
// probabilities dropped: scores <- P * M, dp <- P * (M * dP / (1 - p) - delta), M the keep mask
// of flat query row flat_row0 ((b * Hq + h) * Tq + row0) and the 8 below it; dV's 1 / (1 - p)
// is the caller's.
template <int kNBlocks, bool kWindowed, bool kPerQuery, bool kScoreMods>
__device__ __forceinline__ void probabilities_and_score_grads(
    float (&scores)[kNBlocks][4], float (&dp)[kNBlocks][4], const RowStats& stats,
    float scale_log2, int64_t row0, int64_t n0, int t, bool need_mask, const AttentionShape& s,
    const KeyBounds& keys, int64_t b, const ScoreMods& mods, int64_t flat_row0) {
  if constexpr (!kWindowed) {
#pragma unroll
    for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1;
        float p = fast_exp2(scores[nb][i] * scale_log2 - stats.lse_log2[r]);
        if (need_mask) {
          const int64_t row = row0 + 8 * r;
          const int64_t col = n0 + nb * 8 + 2 * t + (i & 1);
          if (row >= s.Tq || col >= s.Tk || (s.causal && col > row + s.causal_offset)) p = 0.f;
        }
        scores[nb][i] = p;
        dp[nb][i] = p * (dp[nb][i] - stats.delta[r]);
      }
    }
  } else {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int lo = 0, hi = kNBlocks * 8;  // this row's visible columns of the tile (none past Tq)
      if (need_mask) {
        const int64_t row = row0 + 8 * r;
        visible_columns(s, row_key_bounds<kPerQuery>(s, keys, b, row), row, n0, kNBlocks * 8,
                        &lo, &hi);
        if (row >= s.Tq) hi = 0;
      }
      uint32_t keep = ~0u;  // bit 2 nb + j: element (nb, 2 r + j) kept
      if constexpr (kScoreMods) {
        if (mods.dropout) keep = dropout_row_mask<kNBlocks>(mods, flat_row0 + 8 * r, n0 + 2 * t);
      }
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int i = 2 * r + j;
          const bool kept = (keep >> (2 * nb + j) & 1u) != 0;
          float tanh_qk;  // (0 without a cap)
          float p = fast_exp2(score_log2<kScoreMods>(scores[nb][i], scale_log2, mods, &tanh_qk) -
                              stats.lse_log2[r]);
          const int col = nb * 8 + 2 * t + j;
          if (need_mask && (col < lo || col >= hi)) p = 0.f;
          if constexpr (kScoreMods) {
            const float dp_kept = kept ? dp[nb][i] * mods.keep_scale : 0.f;
            dp[nb][i] = p * (dp_kept - stats.delta[r]) * (1.f - tanh_qk * tanh_qk);
            scores[nb][i] = kept ? p : 0.f;
          } else {
            scores[nb][i] = p;
            dp[nb][i] = p * (dp[nb][i] - stats.delta[r]);
          }
        }
      }
    }
  }
}

// Stores one warp's C-layout values (16 rows from row0, kNBlocks * 8 columns) into a row-major
// shared tile as T, two elements per 32-bit store.
template <typename T, int kNBlocks>
__device__ __forceinline__ void store_accumulators(T* smem, int stride, int row0,
                                                   const float (&c)[kNBlocks][4], int g, int t) {
#pragma unroll
  for (int nb = 0; nb < kNBlocks; ++nb) {
    *reinterpret_cast<uint32_t*>(smem + (row0 + g) * stride + nb * 8 + 2 * t) =
        pack2<T>(c[nb][0], c[nb][1]);
    *reinterpret_cast<uint32_t*>(smem + (row0 + g + 8) * stride + nb * 8 + 2 * t) =
        pack2<T>(c[nb][2], c[nb][3]);
  }
}

// Writes one warp's C-layout accumulator (16 rows from row0, columns col0 + 8 kNBlocks) times
// `factor` as T into a contiguous (rows, D) matrix; rows >= rows_valid and columns >= D skipped.
template <typename T, int kNBlocks>
__device__ __forceinline__ void write_rows(T* dst, int64_t row0, int64_t rows_valid, int col0,
                                           int D, const float (&c)[kNBlocks][4], float factor,
                                           int g, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    if (row >= rows_valid) continue;
#pragma unroll
    for (int nb = 0; nb < kNBlocks; ++nb) {
      const int col = col0 + nb * 8 + 2 * t;
      if (col < D) {
        *reinterpret_cast<uint32_t*>(dst + row * D + col) =
            pack2<T>(c[nb][2 * r] * factor, c[nb][2 * r + 1] * factor);
      }
    }
  }
}

template <int kHeadDim, int kBlock>
constexpr size_t dkdv_shared_bytes() {
  // sK, sV (kBlock rows) + double-buffered sQ, sdO (kBlock rows) + sP, sdS (kBlock x kBlock)
  return size_t{2} * (6 * kBlock * (kHeadDim + kPad) + 2 * kBlock * (kBlock + kPad));
}

// grid (ceil(Tk / kBlock) * Hkv * kHeadDim / kOutDim * B), kWarps * 32 threads, kBlock = 16 kWarps
// keys and queries per tile. The "head" coordinate is kv head * splits + split; the split owns
// output columns [split * kOutDim, (split + 1) * kOutDim).
// kWindowed, kPerQuery, kScoreMods: as for attention_fwd_kernel.
template <typename T, int kHeadDim, int kWarps, int kOutDim, bool kAtomicDq, bool kWindowed,
          bool kPerQuery, bool kScoreMods>
__global__ void __launch_bounds__(kWarps * 32)
    attention_bwd_dkdv_kernel(const AttentionBwdArgs args,
                              const float* __restrict__ delta,   // (B, Hq, Tq)
                              float* __restrict__ dq_accumulator,  // (B, Hq, Tq, D) or null
                              // (B, ceil(Tk / kBlock), 2) with per-query key ranges, else null
                              const int32_t* __restrict__ query_extent) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlock = 16 * kWarps;
  constexpr int kSplits = kHeadDim / kOutDim;
  constexpr int kStride = kHeadDim + kPad;
  constexpr int kPStride = kBlock + kPad;
  constexpr int kNBlocks = kBlock / 8;   // 8-key score blocks per query row slab
  constexpr int kOBlocks = kOutDim / 8;  // 8-column output blocks
  constexpr int kDqCols = 32;            // dQ columns per atomic pass (bounds registers)
  static_assert(kHeadDim % kOutDim == 0 && kOutDim % kDqCols == 0);
  static_assert(kWindowed || (!kPerQuery && !kScoreMods));

  T* sK = reinterpret_cast<T*>(dynamic_shared_memory());  // (kBlock, kStride)
  T* sV = sK + kBlock * kStride;             // (kBlock, kStride)
  T* sQ = sV + kBlock * kStride;             // (2, kBlock, kStride)
  T* sdO = sQ + 2 * kBlock * kStride;        // (2, kBlock, kStride)
  T* sP = sdO + 2 * kBlock * kStride;        // (kBlock, kPStride): P, queries x keys
  T* sdS = sP + kBlock * kPStride;           // (kBlock, kPStride): dS, queries x keys

  const AttentionShape& s = args.shape;
  const int64_t Tq = s.Tq;
  const int64_t Tk = s.Tk;
  const int D = static_cast<int>(s.D);
  const int64_t group = s.Hq / s.Hkv;
  const BlockCoordinates block = block_coordinates(ceil_div(Tk, kBlock), s.Hkv * kSplits);
  const int64_t n0 = block.tile * kBlock;
  const int split = static_cast<int>(block.head % kSplits);
  const int64_t h_kv = block.head / kSplits;
  const int64_t b = block.batch;
  const int col0 = split * kOutDim;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const float scale = static_cast<float>(s.scale);
  const float scale_log2 = scale * kLog2e;
  const ScoreMods mods = kScoreMods ? score_mods_of(s) : ScoreMods{};

  const T* k = head_pointer<T>(args.k, b, h_kv);
  const T* v = head_pointer<T>(args.v, b, h_kv);

  // Query tiles that see any key of this tile: from the first row i with n0 <= i + offset (to,
  // under a sliding window, the last with i + window_offset <= the tile's last key). With a
  // key range, of the tile's keys inside it (none: no query tile, zero gradients); with
  // per-query ranges, from the first to the last query tile whose keys meet the tile's
  // (query_extent).
  int64_t m_block_min = 0, m_block_end = 0;
  const KeyBounds keys = kWindowed && !kPerQuery ? key_bounds(s, b) : KeyBounds{0, Tk};
  if (!kWindowed) {
    query_tile_range<false>(s, n0, kBlock, kBlock, &m_block_min, &m_block_end);
  } else {
    const int64_t first_key = std::max(n0, keys.lo);
    const int64_t key_end = std::min(n0 + kBlock, keys.hi);
    if (first_key < key_end) {
      query_tile_range<true>(s, first_key, kBlock, key_end - first_key, &m_block_min,
                             &m_block_end);
    }
    if constexpr (kPerQuery) {
      const int32_t* extent = query_extent + 2 * (b * ceil_div(Tk, kBlock) + block.tile);
      m_block_min = std::max<int64_t>(m_block_min, extent[0]);
      m_block_end = std::min<int64_t>(m_block_end, extent[1]);
    }
  }
  // Every row's keys, as far as the tile masks go: per-query ranges (their rows vary from one
  // query tile to the next) always mask.
  const KeyBounds inner_keys = kPerQuery ? KeyBounds{Tk, 0} : keys;
  const int64_t per_head = std::max<int64_t>(0, m_block_end - m_block_min);
  const int64_t iterations = group * per_head;  // (query head of the group, query tile) pairs

  // The query-side pointers of iteration `it`.
  auto query_head = [&](int64_t it) { return h_kv * group + it / per_head; };
  auto query_row0 = [&](int64_t it) { return (m_block_min + it % per_head) * kBlock; };
  auto load_query_tiles = [&](int64_t it, int buf) {
    const int64_t h = query_head(it);
    const int64_t m0 = query_row0(it);
    const T* q = head_pointer<T>(args.q, b, h);
    const T* dout = head_pointer<T>(args.grad_out, b, h);
    load_tile_async<kBlock, kHeadDim, kThreads>(sQ + buf * kBlock * kStride,
                                                q + m0 * args.q.token_stride,
                                                args.q.token_stride, Tq - m0, D, q, tid);
    load_tile_async<kBlock, kHeadDim, kThreads>(sdO + buf * kBlock * kStride,
                                                dout + m0 * args.grad_out.token_stride,
                                                args.grad_out.token_stride, Tq - m0, D, dout, tid);
  };

  float dk[kOBlocks][4] = {};  // this warp's 16 keys x kOutDim columns (C layout)
  float dv[kOBlocks][4] = {};

  if (iterations > 0) {
    load_tile_async<kBlock, kHeadDim, kThreads>(sK, k + n0 * args.k.token_stride,
                                                args.k.token_stride, Tk - n0, D, k, tid);
    load_tile_async<kBlock, kHeadDim, kThreads>(sV, v + n0 * args.v.token_stride,
                                                args.v.token_stride, Tk - n0, D, v, tid);
    load_query_tiles(0, 0);
    cp_async_commit();

    for (int64_t it = 0; it < iterations; ++it) {
      const int buf = static_cast<int>(it & 1);
      if (it + 1 < iterations) load_query_tiles(it + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();

      const T* sQb = sQ + buf * kBlock * kStride;
      const T* sdOb = sdO + buf * kBlock * kStride;
      const int64_t h = query_head(it);
      const int64_t m0 = query_row0(it);
      const int64_t row0 = m0 + warp * 16 + g;  // this thread's first query row

      // Phase A, warps over query rows: S = Q K^T and dP = dO V^T for the warp's 16 rows.
      float scores[1][kNBlocks][4] = {};
      float dp[1][kNBlocks][4] = {};
      warp_gemm_rows_rows<T, 1, kNBlocks, kHeadDim>(scores, sQb, kStride, warp * 16, sK,
                                                    kStride, 0, lane);
      warp_gemm_rows_rows<T, 1, kNBlocks, kHeadDim>(dp, sdOb, kStride, warp * 16, sV, kStride,
                                                    0, lane);
      const RowStats stats = load_row_stats(args.lse + (b * s.Hq + h) * Tq,
                                            delta + (b * s.Hq + h) * Tq, row0, Tq);
      const bool need_mask =
          tile_needs_mask<kWindowed>(s, inner_keys, m0, kBlock, n0, kBlock);
      probabilities_and_score_grads<kNBlocks, kWindowed, kPerQuery, kScoreMods>(
          scores[0], dp[0], stats, scale_log2, row0, n0, t, need_mask, s, keys, b, mods,
          (b * s.Hq + h) * Tq + row0);
      store_accumulators<T, kNBlocks>(sP, kPStride, warp * 16, scores[0], g, t);
      store_accumulators<T, kNBlocks>(sdS, kPStride, warp * 16, dp[0], g, t);

      if constexpr (kAtomicDq) {
        // dQ[rows, split columns] += dS K * scale, straight from the dS registers.
        uint32_t ds_frag[1][kBlock / 16][4];
        accumulators_to_a_fragments<T, kBlock / 16>(dp[0], ds_frag[0]);
        float* dq_rows = dq_accumulator + (b * s.Hq + h) * Tq * D;
#pragma unroll
        for (int c = 0; c < kOutDim; c += kDqCols) {
          const int c0 = col0 + c;
          float dq[1][kDqCols / 8][4] = {};
          warp_gemm_regs_rows<T, 1, kDqCols / 8, kBlock / 16>(dq, ds_frag, sK, kStride, 0, c0,
                                                              lane);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int64_t row = row0 + 8 * r;
            if (row >= Tq) continue;
#pragma unroll
            for (int nb = 0; nb < kDqCols / 8; ++nb) {
              const int col = c0 + nb * 8 + 2 * t;
              if (col < D) {
                atomicAdd(dq_rows + row * D + col, dq[0][nb][2 * r] * scale);
                atomicAdd(dq_rows + row * D + col + 1, dq[0][nb][2 * r + 1] * scale);
              }
            }
          }
        }
      }
      __syncthreads();

      // Phase B, warps over key rows: dV += P^T dO, dK += dS^T Q (this split's columns).
      warp_gemm_cols_cols<T, kOBlocks, kBlock / 16>(dv, sP, kPStride, warp * 16, sdOb, kStride,
                                                    col0, lane);
      warp_gemm_cols_cols<T, kOBlocks, kBlock / 16>(dk, sdS, kPStride, warp * 16, sQb, kStride,
                                                    col0, lane);
      __syncthreads();  // sP, sdS and this query buffer are rewritten by the next iterations
    }
  }

  // Keys no query sees (causal) get zero gradients: the loop above did not run for them.
  const int64_t kv_offset = (b * s.Hkv + h_kv) * Tk * D;
  write_rows<T, kOBlocks>(static_cast<T*>(args.dk) + kv_offset, n0 + warp * 16, Tk, col0, D, dk,
                          scale, g, t);
  // (dropout: dV = (P * M)^T dO / (1 - p))
  write_rows<T, kOBlocks>(static_cast<T*>(args.dv) + kv_offset, n0 + warp * 16, Tk, col0, D, dv,
                          kScoreMods ? mods.keep_scale : 1.f, g, t);
}

template <int kHeadDim, int kBlockN, int kWarps>
constexpr size_t dq_shared_bytes() {
  // sQ, sdO (16 kWarps rows) + double-buffered sK, sV (kBlockN rows)
  return size_t{2} * (2 * 16 * kWarps + 4 * kBlockN) * (kHeadDim + kPad);
}

// Deterministic dQ: grid (ceil(Tq / (16 kWarps)) * Hq * B). Each warp owns 16 query rows, streams
// the key tiles its rows see, recomputes S, P, dP and dS, and accumulates dQ = dS K * scale.
template <typename T, int kHeadDim, int kBlockN, int kWarps, bool kWindowed, bool kPerQuery,
          bool kScoreMods>
__global__ void __launch_bounds__(kWarps * 32)
    attention_bwd_dq_kernel(const AttentionBwdArgs args,
                            const float* __restrict__ delta) {  // (B, Hq, Tq)
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = 16 * kWarps;
  constexpr int kStride = kHeadDim + kPad;
  constexpr int kNBlocks = kBlockN / 8;
  constexpr int kDBlocks = kHeadDim / 8;

  T* sQ = reinterpret_cast<T*>(dynamic_shared_memory());  // (kBlockM, kStride)
  T* sdO = sQ + kBlockM * kStride;           // (kBlockM, kStride)
  T* sK = sdO + kBlockM * kStride;           // (2, kBlockN, kStride)
  T* sV = sK + 2 * kBlockN * kStride;        // (2, kBlockN, kStride)

  const AttentionShape& s = args.shape;
  const int64_t Tq = s.Tq;
  const int64_t Tk = s.Tk;
  const int D = static_cast<int>(s.D);
  const int64_t m_blocks = ceil_div(Tq, kBlockM);
  const BlockCoordinates block = block_coordinates(m_blocks, s.Hq);
  const int64_t m0 = (m_blocks - 1 - block.tile) * kBlockM;  // the longest (causal) rows first
  const int64_t h = block.head;
  const int64_t b = block.batch;
  const int64_t h_kv = h / (s.Hq / s.Hkv);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const float scale = static_cast<float>(s.scale);
  const float scale_log2 = scale * kLog2e;

  const T* q = head_pointer<T>(args.q, b, h);
  const T* dout = head_pointer<T>(args.grad_out, b, h);
  const T* k = head_pointer<T>(args.k, b, h_kv);
  const T* v = head_pointer<T>(args.v, b, h_kv);

  const KeyBounds keys = kWindowed && !kPerQuery ? key_bounds(s, b) : KeyBounds{0, Tk};
  const TileKeyBounds tile_keys = cta_tile_key_bounds<kPerQuery>(
      s, keys, b, m0, kBlockM, padding_scratch<kHeadDim>(sQ));
  const int64_t n_blocks = key_tile_end<kWindowed>(s, tile_keys.outer, m0, kBlockM, kBlockN);
  const int64_t n_first = kWindowed ? first_key_tile(s, tile_keys.outer, m0, kBlockN) : 0;
  const int64_t row0 = m0 + warp * 16 + g;
  const ScoreMods mods = kScoreMods ? score_mods_of(s) : ScoreMods{};

  float dq[1][kDBlocks][4] = {};
  if (n_blocks > n_first) {
    const int64_t first0 = n_first * kBlockN;
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, q + m0 * args.q.token_stride,
                                                 args.q.token_stride, Tq - m0, D, q, tid);
    load_tile_async<kBlockM, kHeadDim, kThreads>(sdO, dout + m0 * args.grad_out.token_stride,
                                                 args.grad_out.token_stride, Tq - m0, D, dout, tid);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k + first0 * args.k.token_stride,
                                                 args.k.token_stride, Tk - first0, D, k, tid);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV, v + first0 * args.v.token_stride,
                                                 args.v.token_stride, Tk - first0, D, v, tid);
    cp_async_commit();
    const RowStats stats = load_row_stats(args.lse + (b * s.Hq + h) * Tq,
                                          delta + (b * s.Hq + h) * Tq, row0, Tq);

    for (int64_t n = n_first; n < n_blocks; ++n) {
      const int buf = static_cast<int>((n - n_first) & 1);
      if (n + 1 < n_blocks) {
        const int64_t next0 = (n + 1) * kBlockN;
        load_tile_async<kBlockN, kHeadDim, kThreads>(
            sK + (buf ^ 1) * kBlockN * kStride, k + next0 * args.k.token_stride,
            args.k.token_stride, Tk - next0, D, k, tid);
        load_tile_async<kBlockN, kHeadDim, kThreads>(
            sV + (buf ^ 1) * kBlockN * kStride, v + next0 * args.v.token_stride,
            args.v.token_stride, Tk - next0, D, v, tid);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();

      const T* sKb = sK + buf * kBlockN * kStride;
      const T* sVb = sV + buf * kBlockN * kStride;
      const int64_t n0 = n * kBlockN;
      float scores[1][kNBlocks][4] = {};
      float dp[1][kNBlocks][4] = {};
      warp_gemm_rows_rows<T, 1, kNBlocks, kHeadDim>(scores, sQ, kStride, warp * 16, sKb, kStride,
                                                    0, lane);
      warp_gemm_rows_rows<T, 1, kNBlocks, kHeadDim>(dp, sdO, kStride, warp * 16, sVb, kStride, 0,
                                                    lane);
      const bool need_mask =
          tile_needs_mask<kWindowed>(s, tile_keys.inner, m0, kBlockM, n0, kBlockN);
      probabilities_and_score_grads<kNBlocks, kWindowed, kPerQuery, kScoreMods>(
          scores[0], dp[0], stats, scale_log2, row0, n0, t, need_mask, s, keys, b, mods,
          (b * s.Hq + h) * Tq + row0);
      uint32_t ds_frag[1][kBlockN / 16][4];
      accumulators_to_a_fragments<T, kBlockN / 16>(dp[0], ds_frag[0]);
      warp_gemm_regs_rows<T, 1, kDBlocks, kBlockN / 16>(dq, ds_frag, sKb, kStride, 0, 0, lane);
      __syncthreads();
    }
  }
  write_rows<T, kDBlocks>(static_cast<T*>(args.dq) + (b * s.Hq + h) * Tq * D, m0 + warp * 16, Tq,
                          0, D, dq[0], scale, g, t);
}

// The dK/dV kernel instance for the call's masks and score modifiers (pick_instance).
template <typename T, int kHeadDim, int kWarps, int kOutDim, bool kAtomicDq>
auto dkdv_kernel_for(const AttentionShape& s) {
  return pick_instance(s, [](auto windowed, auto per_query, auto mods) {
    return attention_bwd_dkdv_kernel<T, kHeadDim, kWarps, kOutDim, kAtomicDq,
                                     decltype(windowed)::value, decltype(per_query)::value,
                                     decltype(mods)::value>;
  });
}

// One backward with the dK/dV kernel of (kHeadDim, kWarps, kOutDim) and the deterministic dQ
// kernel of (kHeadDim, kDqBlockN, 4 warps).
template <typename T, int kHeadDim, int kWarps, int kOutDim, int kDqBlockN>
cudaError_t launch_bwd(const AttentionBwdArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  constexpr int kSplits = kHeadDim / kOutDim;
  constexpr int kBlock = 16 * kWarps;
  constexpr int kDqWarps = 4;
  const int64_t dkdv_blocks = ceil_div(s.Tk, kBlock) * s.Hkv * kSplits * s.B;
  const int64_t dq_blocks = ceil_div(s.Tq, 16 * kDqWarps) * s.Hq * s.B;
  if (!fits_grid(s, std::max(dkdv_blocks, dq_blocks))) return cudaErrorInvalidValue;

  const int64_t rows = s.B * s.Hq * s.Tq;
  auto* delta = static_cast<float*>(args.alloc(sizeof(float) * rows, args.alloc_context));
  if (delta == nullptr) return cudaErrorMemoryAllocation;
  auto delta_kernel = attention_bwd_delta_kernel<T>;
  FUSEDLM_LAUNCH(delta_kernel, static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, stream)(
      args.out, args.grad_out, args.grad_lse, delta, s.Hq, s.Tq, static_cast<int>(s.D), rows);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();

  // Per-query key ranges: which query tiles meet each key tile of kBlock keys, in two steps
  // (for the dK/dV kernel below, sm_80's or, at kBlock = 64, the sm_90a one).
  int32_t* query_extent = nullptr;
  if (per_query(s)) {
    const int64_t query_tiles = s.B * ceil_div(s.Tq, kBlock);
    const int64_t key_tiles = s.B * ceil_div(s.Tk, kBlock);
    if (!fits_grid(s, std::max(query_tiles, key_tiles))) return cudaErrorInvalidValue;
    auto* query_tile_keys = static_cast<int32_t*>(
        args.alloc(sizeof(int32_t) * 2 * (query_tiles + key_tiles), args.alloc_context));
    if (query_tile_keys == nullptr) return cudaErrorMemoryAllocation;
    query_extent = query_tile_keys + 2 * query_tiles;
    auto tile_keys_kernel = attention_bwd_query_tile_keys_kernel<kBlock>;
    FUSEDLM_LAUNCH(tile_keys_kernel, static_cast<unsigned>(query_tiles), 32, 0, stream)(
        s, query_tile_keys);
    FUSEDLM_RETURN_IF_LAUNCH_FAILED();
    auto extent_kernel = attention_bwd_query_extent_kernel<kBlock>;
    FUSEDLM_LAUNCH(extent_kernel, static_cast<unsigned>(key_tiles), 32, 0, stream)(
        s, query_tile_keys, query_extent);
    FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  }

  const auto dkdv_grid = static_cast<unsigned>(dkdv_blocks);
  constexpr size_t dkdv_bytes = dkdv_shared_bytes<kHeadDim, kBlock>();
  if (args.deterministic) {
    // dK, dV: on the Hopper kernel where it applies (no atomics there), else sm_80's.
    const cudaError_t hopper =
        sm90::attention_bwd_sm90(args, delta, nullptr, query_extent, kBlock, stream);
    if (hopper != cudaErrorNotSupported || sm90::sm90_required()) {
      FUSEDLM_RETURN_IF_ERROR(hopper);
    } else {
      auto dkdv = dkdv_kernel_for<T, kHeadDim, kWarps, kOutDim, false>(s);
      FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(dkdv, dkdv_bytes));
      FUSEDLM_LAUNCH(dkdv, dkdv_grid, kWarps * 32, dkdv_bytes, stream)(args, delta, nullptr,
                                                                       query_extent);
      FUSEDLM_RETURN_IF_LAUNCH_FAILED();
    }

    auto dq = pick_instance(s, [](auto windowed, auto per_query, auto mods) {
      return attention_bwd_dq_kernel<T, kHeadDim, kDqBlockN, kDqWarps, decltype(windowed)::value,
                                     decltype(per_query)::value, decltype(mods)::value>;
    });
    constexpr size_t dq_bytes = dq_shared_bytes<kHeadDim, kDqBlockN, kDqWarps>();
    FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(dq, dq_bytes));
    FUSEDLM_LAUNCH(dq, static_cast<unsigned>(dq_blocks), kDqWarps * 32, dq_bytes, stream)(args,
                                                                                       delta);
    FUSEDLM_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  }

  const int64_t dq_numel = rows * s.D;
  auto* dq_accumulator =
      static_cast<float*>(args.alloc(sizeof(float) * dq_numel, args.alloc_context));
  if (dq_accumulator == nullptr) return cudaErrorMemoryAllocation;
  FUSEDLM_RETURN_IF_ERROR(
      cudaMemsetAsync(dq_accumulator, 0, sizeof(float) * dq_numel, stream));
  // Hopper: dK, dV and the dQ accumulator on the wgmma/TMA kernel where it applies.
  const cudaError_t hopper =
      sm90::attention_bwd_sm90(args, delta, dq_accumulator, query_extent, kBlock, stream);
  if (hopper != cudaErrorNotSupported || sm90::sm90_required()) {
    FUSEDLM_RETURN_IF_ERROR(hopper);
  } else {
    auto dkdv = dkdv_kernel_for<T, kHeadDim, kWarps, kOutDim, true>(s);
    FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(dkdv, dkdv_bytes));
    FUSEDLM_LAUNCH(dkdv, dkdv_grid, kWarps * 32, dkdv_bytes, stream)(args, delta,
                                                                     dq_accumulator,
                                                                     query_extent);
    FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  }
  const int64_t convert_blocks = std::min<int64_t>(ceil_div(dq_numel, 256), kMaxGridBlocks);
  auto convert_kernel = attention_bwd_convert_dq_kernel<T>;
  FUSEDLM_LAUNCH(convert_kernel, static_cast<unsigned>(convert_blocks), 256, 0, stream)(
      dq_accumulator, static_cast<T*>(args.dq), dq_numel);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace
}  // namespace attention

cudaError_t attention_bwd(const AttentionBwdArgs& args, cudaStream_t stream) {
  using namespace attention;
  const AttentionShape& s = args.shape;
  if (!valid_shape(s) || args.alloc == nullptr) return cudaErrorInvalidValue;
  // (kHeadDim, kWarps, kOutDim, kDqBlockN): 64 x 64 tiles with 4 warps up to D = 128; 32 x 32
  // tiles with 2 warps and the output columns split over two CTAs above, so that the dK and dV
  // accumulators stay in registers and shared memory stays under an A100's 163 KiB. Devices with
  // 99 KiB (sm_86, sm_89) get half the tiles at D >= 128.
  size_t max_bytes = 0;
  FUSEDLM_RETURN_IF_ERROR(max_shared_bytes(&max_bytes));
  auto fits = [&](size_t dkdv_bytes, size_t dq_bytes) {
    return dkdv_bytes <= max_bytes && dq_bytes <= max_bytes;
  };
  return dispatch_half_types(s.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (padded_head_dim(s.D)) {
      case 32:
        return launch_bwd<T, 32, 4, 32, 64>(args, stream);
      case 64:
        return launch_bwd<T, 64, 4, 64, 64>(args, stream);
      case 96:
        return launch_bwd<T, 96, 4, 96, 64>(args, stream);
      case 128:
        return fits(dkdv_shared_bytes<128, 64>(), dq_shared_bytes<128, 64, 4>())
                   ? launch_bwd<T, 128, 4, 128, 64>(args, stream)
                   : launch_bwd<T, 128, 2, 128, 32>(args, stream);
      case 192:
        return fits(dkdv_shared_bytes<192, 32>(), dq_shared_bytes<192, 32, 4>())
                   ? launch_bwd<T, 192, 2, 96, 32>(args, stream)
                   : launch_bwd<T, 192, 2, 96, 16>(args, stream);
      default:
        return fits(dkdv_shared_bytes<256, 32>(), dq_shared_bytes<256, 32, 4>())
                   ? launch_bwd<T, 256, 2, 128, 32>(args, stream)
                   : launch_bwd<T, 256, 1, 128, 16>(args, stream);
    }
  });
}

}  // namespace fusedlm::cuda
