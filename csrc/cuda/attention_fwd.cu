// Flash-attention forward for sm_80 and newer (mma.sync / ldmatrix / cp.async), FlashAttention-2's
// algorithm: one CTA per (query tile, query head, batch); K and V tiles stream through
// double-buffered shared memory while each warp keeps its query rows' output accumulator and
// online-softmax statistics in registers. Q, K, V are read in place through their strides.
//
// Few query rows (decoding with a KV cache) leave most SMs idle: B * Hq CTAs, each walking all
// the keys. Two rewrites fill them (attention_fwd_plan): with one query row, a GQA group's query
// heads become the rows of one tile (each K/V tile read once per group, not once per head), and
// the keys of each query tile split over several CTAs (flash-decoding), whose float32 partial
// outputs and logsumexps a second kernel combines.
#include <cstdlib>
#include <cstring>

#include "cuda/attention_sm80.cuh"
#include "cuda/attention_sm90.cuh"

namespace fusedlm::cuda {
namespace attention {
namespace {

// Where the CTAs of a key-split forward put their partial results (split, then row-major).
struct KeySplit {
  int count;    // CTAs per query tile, each taking a contiguous share of its key tiles
  float* out;   // (count, B, Hq, Tq, D) this split's output, normalized by its own softmax sum
  float* lse;   // (count, B, Hq, Tq) this split's logsumexp (-inf: it saw no key)
};

template <int kHeadDim, int kBlockM, int kBlockN>
constexpr size_t fwd_shared_bytes() {
  // sQ (kBlockM rows) + double-buffered sK and sV (kBlockN rows each), rows of kHeadDim + kPad
  return size_t{2} * (kBlockM + 4 * kBlockN) * (kHeadDim + kPad);
}

// grid (ceil(Tq / kBlockM) * Hq * B), kWarps * 32 threads; each warp owns kBlockM / kWarps rows.
// kWindowed: the bounded instance (a sliding window or a key range: bounded(s)); the plain one
// keeps their code out (its per-row bounds cost the 128-row D = 128 tile 32-80 bytes of spills).
// kPerQuery (with kWindowed): per-query key ranges, whose per-row loads and CTA-wide tile bounds
// (a shared-memory hand-over and a barrier) the other bounded calls do without.
// kScoreMods (with kWindowed): soft-capping and dropout (score_mods).
// kSplitKeys: grid (ceil(Tq / kBlockM) * split.count * Hq * B); CTA `key_split` of a query tile
// takes the key_split-th share of its key tiles and writes to `split` instead of out and lse.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, bool kWindowed,
          bool kPerQuery, bool kScoreMods, bool kSplitKeys>
__global__ void __launch_bounds__(kWarps * 32)
    attention_fwd_kernel(const AttentionFwdArgs args, const KeySplit split) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kMTiles = kBlockM / (16 * kWarps);  // 16-row MMA tiles per warp
  constexpr int kNBlocks = kBlockN / 8;              // 8-column score blocks of a K tile
  constexpr int kDBlocks = kHeadDim / 8;             // 8-column output blocks
  constexpr int kStride = kHeadDim + kPad;           // shared-memory row stride (elements)
  static_assert(kMTiles >= 1 && kBlockM == 16 * kWarps * kMTiles);
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0);
  static_assert(kWindowed || (!kPerQuery && !kScoreMods));
  static_assert(!(kPerQuery && kSplitKeys));

  T* sQ = reinterpret_cast<T*>(dynamic_shared_memory());  // (kBlockM, kStride)
  T* sK = sQ + kBlockM * kStride;            // (2, kBlockN, kStride)
  T* sV = sK + 2 * kBlockN * kStride;        // (2, kBlockN, kStride)

  const AttentionShape& s = args.shape;
  const int64_t Tq = s.Tq;
  const int64_t Tk = s.Tk;
  const int D = static_cast<int>(s.D);
  const int64_t m_blocks = ceil_div(s.Tq, kBlockM);
  const int splits = kSplitKeys ? split.count : 1;
  const BlockCoordinates block = block_coordinates(m_blocks * splits, s.Hq);
  const int64_t m_block = m_blocks - 1 - block.tile / splits;  // the longest (causal) rows first
  const int key_split = kSplitKeys ? static_cast<int>(block.tile % splits) : 0;
  const int64_t h = block.head;
  const int64_t b = block.batch;
  const int64_t h_kv = h / (s.Hq / s.Hkv);
  const int64_t m0 = m_block * kBlockM;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  const T* q = head_pointer<T>(args.q, b, h);
  const T* k = head_pointer<T>(args.k, b, h_kv);
  const T* v = head_pointer<T>(args.v, b, h_kv);

  // Key tiles this query tile sees: all of them, or (causal) up to its last row's last key,
  // from (sliding window, key range) the tile of its first row's first key to (key range) the
  // tile of its rows' last key.
  const KeyBounds keys = kWindowed && !kPerQuery ? key_bounds(s, b) : KeyBounds{0, Tk};
  const TileKeyBounds tile_keys = cta_tile_key_bounds<kPerQuery>(
      s, keys, b, m0, kBlockM, padding_scratch<kHeadDim>(sQ));
  int64_t n_blocks = key_tile_end<kWindowed>(s, tile_keys.outer, m0, kBlockM, kBlockN);
  int64_t n_first = kWindowed ? first_key_tile(s, tile_keys.outer, m0, kBlockN) : 0;
  if constexpr (kSplitKeys) {  // this CTA's contiguous share of the tile's key tiles
    const int64_t share = ceil_div(n_blocks > n_first ? n_blocks - n_first : 0, splits);
    const int64_t begin = n_first + key_split * share;
    n_first = begin < n_blocks ? begin : n_blocks;
    n_blocks = begin + share < n_blocks ? begin + share : n_blocks;
  }

  float o[kMTiles][kDBlocks][4] = {};  // output accumulator (C layout)
  float row_max[kMTiles][2];           // running max of the scaled scores, log2 units
  float row_sum[kMTiles][2] = {};      // this thread's part of the running softmax denominator
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY;
  const float scale_log2 = static_cast<float>(s.scale) * kLog2e;
  const ScoreMods mods = kScoreMods ? score_mods_of(s) : ScoreMods{};
  const int64_t flat_row0 = (b * s.Hq + h) * Tq + m0 + warp * 16 * kMTiles + g;  // dropout's

  if (n_blocks > n_first) {
    const int64_t first0 = n_first * kBlockN;
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, q + m0 * args.q.token_stride,
                                                 args.q.token_stride, Tq - m0, D, q, tid);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k + first0 * args.k.token_stride,
                                                 args.k.token_stride, Tk - first0, D, k, tid);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV, v + first0 * args.v.token_stride,
                                                 args.v.token_stride, Tk - first0, D, v, tid);
    cp_async_commit();

    for (int64_t n = n_first; n < n_blocks; ++n) {
      const int buf = static_cast<int>((n - n_first) & 1);
      if (n + 1 < n_blocks) {  // prefetch the next K and V tiles into the other buffer
        const int64_t next0 = (n + 1) * kBlockN;
        load_tile_async<kBlockN, kHeadDim, kThreads>(
            sK + (buf ^ 1) * kBlockN * kStride, k + next0 * args.k.token_stride,
            args.k.token_stride, Tk - next0, D, k, tid);
        load_tile_async<kBlockN, kHeadDim, kThreads>(
            sV + (buf ^ 1) * kBlockN * kStride, v + next0 * args.v.token_stride,
            args.v.token_stride, Tk - next0, D, v, tid);
      }
      cp_async_commit();
      cp_async_wait<1>();  // everything but the prefetch just issued has landed
      __syncthreads();

      const T* sKb = sK + buf * kBlockN * kStride;
      const T* sVb = sV + buf * kBlockN * kStride;
      float scores[kMTiles][kNBlocks][4] = {};  // S = Q K^T for this warp's rows (C layout)
      warp_gemm_rows_rows<T, kMTiles, kNBlocks, kHeadDim>(scores, sQ, kStride,
                                                          warp * 16 * kMTiles, sKb, kStride, 0,
                                                          lane);

      // Scale to log2 units and mask: past Tk, (causal) keys after the row's last visible,
      // (sliding window) before its first and (key range) outside the row's range.
      const int64_t n0 = n * kBlockN;
      const bool need_mask =
          n0 + kBlockN > Tk || (s.causal && n0 + kBlockN - 1 > m0 + s.causal_offset) ||
          (kWindowed && ((s.windowed && n0 < m0 + kBlockM - 1 + s.window_offset) ||
                         n0 < tile_keys.inner.lo || n0 + kBlockN > tile_keys.inner.hi));
      if constexpr (!kWindowed) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              float x = scores[mt][nb][i] * scale_log2;
              if (need_mask) {
                const int64_t row = m0 + warp * 16 * kMTiles + mt * 16 + g + (i >= 2 ? 8 : 0);
                const int64_t col = n0 + nb * 8 + 2 * t + (i & 1);
                if (col >= Tk || (s.causal && col > row + s.causal_offset)) x = -INFINITY;
              }
              scores[mt][nb][i] = x;
            }
          }
        }
      } else {
        // Scale (kScoreMods: or soft-cap), then (a loop of its own, as in the sm_90a backward)
        // mask each row outside its visible columns: with the test inside the scaling loop the
        // 128-row D = 128 tile spilled 72 bytes, none this way (ptxas, sm_80).
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              scores[mt][nb][i] = score_log2<kScoreMods>(scores[mt][nb][i], scale_log2, mods);
            }
          }
        }
        if (need_mask) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              int lo = 0, hi = 0;  // this row's visible columns of the tile
              const int64_t row = m0 + warp * 16 * kMTiles + mt * 16 + g + 8 * r;
              visible_columns(s, row_key_bounds<kPerQuery>(s, keys, b, row), row, n0, kBlockN,
                              &lo, &hi);
#pragma unroll
              for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                  const int col = nb * 8 + 2 * t + j;
                  if (col < lo || col >= hi) scores[mt][nb][2 * r + j] = -INFINITY;
                }
              }
            }
          }
        }
      }

      // Online softmax: new row max (over the 4 lanes sharing a row), rescale, exponentiate.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float m_new = row_max[mt][r];
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
            m_new = fmaxf(m_new, fmaxf(scores[mt][nb][2 * r], scores[mt][nb][2 * r + 1]));
          }
          m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 1));
          m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 2));
          // A row that has seen only masked keys keeps max -inf; subtract 0 then (no inf - inf).
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = fast_exp2(row_max[mt][r] - m_use);
          row_max[mt][r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
            const float p0 = fast_exp2(scores[mt][nb][2 * r] - m_use);
            const float p1 = fast_exp2(scores[mt][nb][2 * r + 1] - m_use);
            scores[mt][nb][2 * r] = p0;
            scores[mt][nb][2 * r + 1] = p1;
            sum += p0 + p1;
          }
          row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
          for (int db = 0; db < kDBlocks; ++db) {
            o[mt][db][2 * r] *= alpha;
            o[mt][db][2 * r + 1] *= alpha;
          }
          if constexpr (kScoreMods) {
            // Dropout: after the sum (the softmax's denominator and lse are the undropped
            // ones); the kept ones' 1 / (1 - p) is the epilogue's.
            if (mods.dropout) {
              const uint32_t keep =
                  dropout_row_mask<kNBlocks>(mods, flat_row0 + mt * 16 + 8 * r, n0 + 2 * t);
#pragma unroll
              for (int nb = 0; nb < kNBlocks; ++nb) {
                if (!(keep >> (2 * nb) & 1u)) scores[mt][nb][2 * r] = 0.f;
                if (!(keep >> (2 * nb + 1) & 1u)) scores[mt][nb][2 * r + 1] = 0.f;
              }
            }
          }
        }
      }

      // O += P V, P rounded to T as the A operand.
      uint32_t p_frag[kMTiles][kBlockN / 16][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        accumulators_to_a_fragments<T, kBlockN / 16>(scores[mt], p_frag[mt]);
      }
      warp_gemm_regs_rows<T, kMTiles, kDBlocks, kBlockN / 16>(o, p_frag, sVb, kStride, 0, 0, lane);
      __syncthreads();  // the next iteration's prefetch overwrites this buffer
    }
  }

  // Epilogue: out = O / l, lse = max + log(l) (natural log); rows that saw no key: 0 and -inf.
  // A key split writes both to its share of the float32 scratch instead.
  const int64_t head = b * s.Hq + h;
  const int64_t split_head = key_split * s.B * s.Hq + head;
  T* out = static_cast<T*>(args.out) + head * Tq * D;
  float* split_out = kSplitKeys ? split.out + split_head * Tq * D : nullptr;
  float* lse = kSplitKeys ? split.lse + split_head * Tq : args.lse + head * Tq;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int64_t row = m0 + warp * 16 * kMTiles + mt * 16 + g + 8 * r;
      if (row >= Tq) continue;
      // (kScoreMods: dropout's 1 / (1 - p) on the kept probabilities, 1 without dropout)
      const float inv = l > 0.f ? (kScoreMods ? mods.keep_scale : 1.f) / l : 0.f;
#pragma unroll
      for (int db = 0; db < kDBlocks; ++db) {
        const int col = db * 8 + 2 * t;
        if (col >= D) continue;
        if constexpr (kSplitKeys) {
          split_out[row * D + col] = o[mt][db][2 * r] * inv;
          split_out[row * D + col + 1] = o[mt][db][2 * r + 1] * inv;
        } else {
          *reinterpret_cast<uint32_t*>(out + row * D + col) =
              pack2<T>(o[mt][db][2 * r] * inv, o[mt][db][2 * r + 1] * inv);
        }
      }
      if (t == 0) lse[row] = l > 0.f ? row_max[mt][r] * kLn2 + logf(l) : -INFINITY;
    }
  }
}

// out (rows, D) and lse (rows) from a key split's partial results (KeySplit), rows = B * Hq * Tq:
// lse = log(sum_i exp(lse_i)), out = sum_i exp(lse_i - lse) * out_i, rounded to T once as the
// unsplit kernel rounds. Rows no split saw a key for: 0 and -inf, as unsplit.
// grid (ceil(rows / kCombineWarps)), kCombineWarps * 32 threads: a warp per row, lanes over
// the columns (and over the splits for the logsumexp).
constexpr int kCombineWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32)
    attention_fwd_combine_kernel(const KeySplit split, int64_t rows, int D,
                                 T* out,      // (rows, D)
                                 float* lse)  // (rows)
{
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kCombineWarps + threadIdx.x / 32;
  if (row >= rows) return;  // (whole warps: a row is one warp's)
  float max_lse = -INFINITY;
  for (int i = lane; i < split.count; i += 32) max_lse = fmaxf(max_lse, split.lse[i * rows + row]);
  for (int offset = 16; offset > 0; offset /= 2) {
    max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
  }
  float sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int i = lane; i < split.count; i += 32) sum += expf(split.lse[i * rows + row] - max_lse);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const float total = max_lse == -INFINITY ? -INFINITY : max_lse + logf(sum);
  if (lane == 0) lse[row] = total;
  for (int col = 2 * lane; col < D; col += 64) {
    float a0 = 0.f, a1 = 0.f;
    for (int i = 0; total != -INFINITY && i < split.count; ++i) {
      const float weight = expf(split.lse[i * rows + row] - total);  // 0: a split with no key
      const float* part = split.out + (i * rows + row) * D + col;
      a0 += weight * part[0];
      a1 += weight * part[1];
    }
    *reinterpret_cast<uint32_t*>(out + row * D + col) = pack2<T>(a0, a1);
  }
}

// The forward with each 64-row query tile's keys split over `splits` CTAs, then combined.
template <typename T, int kHeadDim, int kBlockN, int kWarps>
cudaError_t launch_fwd_split(const AttentionFwdArgs& args, int splits, cudaStream_t stream) {
  constexpr int kBlockM = 64;
  const AttentionShape& s = args.shape;
  constexpr size_t bytes = fwd_shared_bytes<kHeadDim, kBlockM, kBlockN>();
  // (never per query: attention_fwd_plan splits no per-query call)
  auto kernel = pick_instance(s, [](auto windowed, auto, auto mods) {
    return attention_fwd_kernel<T, kHeadDim, kBlockM, kBlockN, kWarps,
                                decltype(windowed)::value, false, decltype(mods)::value, true>;
  });
  FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(kernel, bytes));
  const int64_t blocks = ceil_div(s.Tq, kBlockM) * splits * s.Hq * s.B;
  if (!fits_grid(s, blocks)) return cudaErrorInvalidValue;
  const int64_t rows = s.B * s.Hq * s.Tq;
  const size_t out_floats = static_cast<size_t>(splits) * static_cast<size_t>(rows * s.D);
  const size_t lse_floats = static_cast<size_t>(splits) * static_cast<size_t>(rows);
  auto* scratch = static_cast<float*>(
      args.alloc((out_floats + lse_floats) * sizeof(float), args.alloc_context));
  if (scratch == nullptr) return cudaErrorMemoryAllocation;
  const KeySplit split{splits, scratch, scratch + out_floats};
  FUSEDLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kWarps * 32, bytes, stream)(args, split);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  auto combine = attention_fwd_combine_kernel<T>;
  FUSEDLM_LAUNCH(combine, static_cast<unsigned>(ceil_div(rows, kCombineWarps)),
                 kCombineWarps * 32, 0, stream)(split, rows, static_cast<int>(s.D),
                                                static_cast<T*>(args.out), args.lse);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

// key_splits > 1 (64-row tiles only, from attention_fwd_plan): launch_fwd_split.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps>
cudaError_t launch_fwd(const AttentionFwdArgs& args, int key_splits, cudaStream_t stream) {
  if constexpr (kBlockM == 64) {
    if (key_splits > 1) {
      return launch_fwd_split<T, kHeadDim, kBlockN, kWarps>(args, key_splits, stream);
    }
  }
  const AttentionShape& s = args.shape;
  constexpr size_t bytes = fwd_shared_bytes<kHeadDim, kBlockM, kBlockN>();
  auto kernel = pick_instance(s, [](auto windowed, auto per_query, auto mods) {
    return attention_fwd_kernel<T, kHeadDim, kBlockM, kBlockN, kWarps,
                                decltype(windowed)::value, decltype(per_query)::value,
                                decltype(mods)::value, false>;
  });
  FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(kernel, bytes));
  const int64_t blocks = ceil_div(s.Tq, kBlockM) * s.Hq * s.B;
  if (!fits_grid(s, blocks)) return cudaErrorInvalidValue;
  FUSEDLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kWarps * 32, bytes, stream)(args,
                                                                                   KeySplit{});
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

// ---- decoding: query heads packed into rows, keys split over CTAs --------------------------------

// With one query row and GQA, the group's query heads read the same keys and values: they become
// the Tq = Hq / Hkv rows of one kv head's query tile. q's heads are read as rows through its head
// stride; out (B, Hq, 1, D) and lse (B, Hq, 1) are the same memory as (B, Hkv, group, D) and
// (B, Hkv, group). Only where every packed row sees exactly the keys the one row saw: causal
// hiding nothing (bottom-right: the last row sees every key), a window hiding nothing, a key
// range per batch row (or per query, which for one row is the same array).
AttentionFwdArgs with_query_heads_as_rows(const AttentionFwdArgs& args) {
  const AttentionShape& s = args.shape;
  const int64_t group = s.Hq / s.Hkv;
  if (s.Tq != 1 || group == 1 || (s.causal && s.causal_offset < s.Tk - 1) ||
      (s.windowed && s.window_offset > 0)) {
    return args;
  }
  AttentionFwdArgs packed = args;
  packed.shape.Hq = s.Hkv;
  packed.shape.Tq = group;
  packed.shape.causal = false;
  packed.shape.causal_offset = s.Tk - group;
  packed.shape.windowed = false;
  packed.shape.window_offset = 0;
  packed.shape.key_range_per_query = false;
  packed.q.token_stride = args.q.head_stride;
  packed.q.head_stride = args.q.head_stride * group;
  return packed;
}

// Keys each query row can see at most (for sizing a split; per-row key ranges are on the device
// and not looked at): all Tk, or what a sliding window leaves.
int64_t visible_key_span(const AttentionShape& s) {
  if (!s.windowed) return s.Tk;
  // rows i see keys from i + window_offset, to i + causal_offset (causal) or the last
  const int64_t first = s.window_offset > 0 ? s.window_offset : 0;
  const int64_t last = s.causal ? s.Tq - 1 + s.causal_offset : s.Tk - 1;
  const int64_t span = (last < s.Tk - 1 ? last : s.Tk - 1) - first + 1;
  return span < 1 ? 1 : span;
}

// CTAs per 64-row query tile (1: no split). Splitting pays where the unsplit grid leaves SMs idle
// and there are keys to share: up to two CTAs per SM in all (what the 64-row tiles' shared memory
// and registers allow at D <= 128), each split keeping at least kMinKeysPerSplit keys (fewer and
// the combine kernel's launch costs more than the split saves), at most kMaxKeySplits.
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int kMaxKeySplits = 64;

int key_splits(const AttentionShape& s, int sm_count) {
  if (s.Tq > 64 || per_query(s) || sm_count <= 0) return 1;
  const int64_t ctas = s.B * s.Hq;  // one 64-row tile per head
  const int64_t slots = int64_t{2} * sm_count;
  if (ctas >= sm_count) return 1;
  const int64_t by_keys = visible_key_span(s) / kMinKeysPerSplit;
  int64_t splits = slots / ctas;
  splits = splits < by_keys ? splits : by_keys;
  splits = splits < kMaxKeySplits ? splits : kMaxKeySplits;
  return splits > 1 ? static_cast<int>(splits) : 1;
}

}  // namespace
}  // namespace attention

AttentionFwdPlan attention_fwd_plan(const AttentionFwdArgs& args, int sm_count) {
  using namespace attention;
  // FUSEDLM_ATTENTION_DECODE=0: neither rewrite (to time the plain kernel on the same build)
  const char* setting = std::getenv("FUSEDLM_ATTENTION_DECODE");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return {args.shape, false, 1};
  const AttentionFwdArgs packed = with_query_heads_as_rows(args);
  const int splits = args.alloc != nullptr ? key_splits(packed.shape, sm_count) : 1;
  return AttentionFwdPlan{packed.shape, packed.shape.Hq != args.shape.Hq, splits};
}

cudaError_t attention_fwd(const AttentionFwdArgs& original, cudaStream_t stream) {
  using namespace attention;
  if (!valid_shape(original.shape)) return cudaErrorInvalidValue;
  int sm_count = 0;
  FUSEDLM_RETURN_IF_ERROR(current_sm_count(&sm_count));
  const AttentionFwdPlan plan = attention_fwd_plan(original, sm_count);
  const AttentionFwdArgs args = plan.heads_packed ? with_query_heads_as_rows(original) : original;
  const AttentionShape& s = args.shape;
  const int splits = plan.key_splits;
  // Hopper: the wgmma/TMA kernel where it applies (FUSEDLM_ATTENTION_SM90=require: wherever it
  // can), except where the keys split: its 128-row tiles would leave the same SMs idle.
  if (splits == 1 || sm90::sm90_required()) {
    const cudaError_t hopper = sm90::attention_fwd_sm90(args, stream);
    if (hopper != cudaErrorNotSupported || sm90::sm90_required()) return hopper;
  }
  // (kHeadDim, kBlockM, kBlockN, kWarps): 128 x 64 tiles with 4 warps (2 MMA row tiles each) up
  // to D = 128 (FlashAttention-2's sm80 choice for D = 128); 64-row tiles above, whose
  // double-buffered K/V tiles must fit the 163 KiB an A100 CTA can have. Devices with 99 KiB
  // (sm_86, sm_89) get 64-row tiles at D = 128 and 32-key tiles at D = 192. At most 64 query
  // rows (short prompts, decoding with a KV cache) take 64-row tiles: a 128-row tile would be
  // mostly empty rows.
  size_t max_bytes = 0;
  FUSEDLM_RETURN_IF_ERROR(max_shared_bytes(&max_bytes));
  const bool short_queries = s.Tq <= 64;
  return dispatch_half_types(s.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (padded_head_dim(s.D)) {
      case 32:
        return short_queries ? launch_fwd<T, 32, 64, 64, 4>(args, splits, stream)
                             : launch_fwd<T, 32, 128, 64, 4>(args, splits, stream);
      case 64:
        return short_queries ? launch_fwd<T, 64, 64, 64, 4>(args, splits, stream)
                             : launch_fwd<T, 64, 128, 64, 4>(args, splits, stream);
      case 96:
        return short_queries ? launch_fwd<T, 96, 64, 64, 4>(args, splits, stream)
                             : launch_fwd<T, 96, 128, 64, 4>(args, splits, stream);
      case 128:
        return !short_queries && fwd_shared_bytes<128, 128, 64>() <= max_bytes
                   ? launch_fwd<T, 128, 128, 64, 4>(args, splits, stream)
                   : launch_fwd<T, 128, 64, 64, 4>(args, splits, stream);
      case 192:
        return fwd_shared_bytes<192, 64, 64>() <= max_bytes
                   ? launch_fwd<T, 192, 64, 64, 4>(args, splits, stream)
                   : launch_fwd<T, 192, 64, 32, 4>(args, splits, stream);
      default:
        return launch_fwd<T, 256, 64, 32, 4>(args, splits, stream);
    }
  });
}

}  // namespace fusedlm::cuda
