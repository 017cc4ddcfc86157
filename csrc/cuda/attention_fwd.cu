// Flash-attention forward for sm_80 and newer (mma.sync / ldmatrix / cp.async), FlashAttention-2's
// algorithm: one CTA per (query tile, query head, batch); K and V tiles stream through
// double-buffered shared memory while each warp keeps its query rows' output accumulator and
// online-softmax statistics in registers. Q, K, V are read in place through their strides.
#include "cuda/attention_sm80.cuh"
#include "cuda/attention_sm90.cuh"

namespace fusedlm::cuda {
namespace attention {
namespace {

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
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, bool kWindowed,
          bool kPerQuery>
__global__ void __launch_bounds__(kWarps * 32)
    attention_fwd_kernel(const AttentionFwdArgs args) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kMTiles = kBlockM / (16 * kWarps);  // 16-row MMA tiles per warp
  constexpr int kNBlocks = kBlockN / 8;              // 8-column score blocks of a K tile
  constexpr int kDBlocks = kHeadDim / 8;             // 8-column output blocks
  constexpr int kStride = kHeadDim + kPad;           // shared-memory row stride (elements)
  static_assert(kMTiles >= 1 && kBlockM == 16 * kWarps * kMTiles);
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0);
  static_assert(kWindowed || !kPerQuery);

  T* sQ = reinterpret_cast<T*>(dynamic_shared_memory());  // (kBlockM, kStride)
  T* sK = sQ + kBlockM * kStride;            // (2, kBlockN, kStride)
  T* sV = sK + 2 * kBlockN * kStride;        // (2, kBlockN, kStride)

  const AttentionShape& s = args.shape;
  const int64_t Tq = s.Tq;
  const int64_t Tk = s.Tk;
  const int D = static_cast<int>(s.D);
  const int64_t m_blocks = ceil_div(s.Tq, kBlockM);
  const BlockCoordinates block = block_coordinates(m_blocks, s.Hq);
  const int64_t m_block = m_blocks - 1 - block.tile;  // the longest (causal) rows start first
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
  const int64_t n_blocks = key_tile_end<kWindowed>(s, tile_keys.outer, m0, kBlockM, kBlockN);
  const int64_t n_first = kWindowed ? first_key_tile(s, tile_keys.outer, m0, kBlockN) : 0;

  float o[kMTiles][kDBlocks][4] = {};  // output accumulator (C layout)
  float row_max[kMTiles][2];           // running max of the scaled scores, log2 units
  float row_sum[kMTiles][2] = {};      // this thread's part of the running softmax denominator
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY;
  const float scale_log2 = static_cast<float>(s.scale) * kLog2e;

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
        // Scale, then (a loop of its own, as in the sm_90a backward) mask each row outside its
        // visible columns: with the test inside the scaling loop the 128-row D = 128 tile
        // spilled 72 bytes, none this way (ptxas, sm_80).
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
            for (int i = 0; i < 4; ++i) scores[mt][nb][i] *= scale_log2;
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
  T* out = static_cast<T*>(args.out) + (b * s.Hq + h) * Tq * D;
  float* lse = args.lse + (b * s.Hq + h) * Tq;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int64_t row = m0 + warp * 16 * kMTiles + mt * 16 + g + 8 * r;
      if (row >= Tq) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int db = 0; db < kDBlocks; ++db) {
        const int col = db * 8 + 2 * t;
        if (col < D) {
          *reinterpret_cast<uint32_t*>(out + row * D + col) =
              pack2<T>(o[mt][db][2 * r] * inv, o[mt][db][2 * r + 1] * inv);
        }
      }
      if (t == 0) lse[row] = l > 0.f ? row_max[mt][r] * kLn2 + logf(l) : -INFINITY;
    }
  }
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps>
cudaError_t launch_fwd(const AttentionFwdArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  constexpr size_t bytes = fwd_shared_bytes<kHeadDim, kBlockM, kBlockN>();
  auto kernel =
      per_query(s) ? attention_fwd_kernel<T, kHeadDim, kBlockM, kBlockN, kWarps, true, true>
      : bounded(s) ? attention_fwd_kernel<T, kHeadDim, kBlockM, kBlockN, kWarps, true, false>
                   : attention_fwd_kernel<T, kHeadDim, kBlockM, kBlockN, kWarps, false, false>;
  FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(kernel, bytes));
  const int64_t blocks = ceil_div(s.Tq, kBlockM) * s.Hq * s.B;
  if (!fits_grid(s, blocks)) return cudaErrorInvalidValue;
  FUSEDLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kWarps * 32, bytes, stream)(args);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace
}  // namespace attention

cudaError_t attention_fwd(const AttentionFwdArgs& args, cudaStream_t stream) {
  using namespace attention;
  const AttentionShape& s = args.shape;
  if (!valid_shape(s)) return cudaErrorInvalidValue;
  // Hopper: the wgmma/TMA kernel where it applies (FUSEDLM_ATTENTION_SM90=require: wherever it
  // can).
  const cudaError_t hopper = sm90::attention_fwd_sm90(args, stream);
  if (hopper != cudaErrorNotSupported || sm90::sm90_required()) return hopper;
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
        return short_queries ? launch_fwd<T, 32, 64, 64, 4>(args, stream)
                             : launch_fwd<T, 32, 128, 64, 4>(args, stream);
      case 64:
        return short_queries ? launch_fwd<T, 64, 64, 64, 4>(args, stream)
                             : launch_fwd<T, 64, 128, 64, 4>(args, stream);
      case 96:
        return short_queries ? launch_fwd<T, 96, 64, 64, 4>(args, stream)
                             : launch_fwd<T, 96, 128, 64, 4>(args, stream);
      case 128:
        return !short_queries && fwd_shared_bytes<128, 128, 64>() <= max_bytes
                   ? launch_fwd<T, 128, 128, 64, 4>(args, stream)
                   : launch_fwd<T, 128, 64, 64, 4>(args, stream);
      case 192:
        return fwd_shared_bytes<192, 64, 64>() <= max_bytes
                   ? launch_fwd<T, 192, 64, 64, 4>(args, stream)
                   : launch_fwd<T, 192, 64, 32, 4>(args, stream);
      default:
        return launch_fwd<T, 256, 64, 32, 4>(args, stream);
    }
  });
}

}  // namespace fusedlm::cuda
