// Flash-attention backward (dK, dV and the dQ accumulator) for Hopper (sm_90a), on the building
// blocks of the forward (attention_sm90.cuh). One CTA per (128-key tile, kv head, batch), three
// warpgroups: a producer whose one thread loads the K and V tiles once and streams (Q, dO) tiles
// of 64 queries, of every query head sharing the kv head, through a 2-stage TMA ring; two
// consumer warpgroups of 64 keys each that, per query tile,
//   S^T = K Q^T and dP^T = V dO^T           (wgmma, both operands from shared memory)
//   P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta)   (registers)
//   dV += P^T dO, dK += dS^T Q              (wgmma, P^T / dS^T from registers)
//   dQ += dS K                              (wgmma from shared memory: dS^T is stored there)
// and add dQ to the float32 accumulator with atomics (the launcher rounds it afterwards). dK and
// dV stay in registers over the whole GQA group, so they are written once, without atomics. At
// D = 128 the two consumers split dQ's columns (after a named barrier makes both halves of dS^T
// visible); at D = 64 each computes dQ over its own 64 keys. The deterministic backward runs
// this kernel without dQ (then attention_bwd.cu's atomic-free dQ kernel); D > 128 stays on the
// sm_80 kernels. Sliding windows and key ranges (per batch row, or per query: packed documents)
// take the bounded instances: fewer query tiles per key tile, and per-element masks.
#include <cstring>

#include "cuda/attention_sm90.cuh"

namespace fusedlm::cuda {
namespace attention {
namespace sm90 {
namespace {
namespace backward {  // its own tile constants (the forward's live in the enclosing namespace)

constexpr int kBlockN = 128;   // keys per CTA (64 per consumer warpgroup)
constexpr int kBlockM = 64;    // queries per streamed tile
constexpr int kStages = 2;     // (Q, dO) buffers in the ring
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kSlabColumns = 64;
// setmaxnreg: the producer warpgroup gives registers to the consumers.
constexpr uint32_t kProducerRegisters = 24;
constexpr uint32_t kConsumerRegisters = 240;
static_assert(register_split_fits(kProducerRegisters, kConsumerRegisters, kConsumers));
constexpr uint32_t kRowBytes = 128;
// Named barriers 1 (D = 128: both consumers) or 1, 2 (D = 64: one per consumer). Unused in the
// device passes for other architectures (the kernel is empty there).
[[maybe_unused]] constexpr uint32_t kDsBarrier = 1;

template <int kHeadDim>
struct BwdLayout {
  static constexpr int kSlabs = kHeadDim / kSlabColumns;
  static constexpr uint32_t kKVSlabBytes = kBlockN * kRowBytes;  // (kBlockN, 64)
  static constexpr uint32_t kQSlabBytes = kBlockM * kRowBytes;   // (kBlockM, 64)
  static constexpr uint32_t kKVBytes = kSlabs * kKVSlabBytes;
  static constexpr uint32_t kQBytes = kSlabs * kQSlabBytes;
  static constexpr uint32_t kDsBytes = kBlockN * kRowBytes;      // (kBlockN keys, 64 queries)
  static constexpr uint32_t kK = 0;
  static constexpr uint32_t kV = kK + kKVBytes;
  static constexpr uint32_t kQ = kV + kKVBytes;                 // (kStages) Q tiles
  static constexpr uint32_t kDO = kQ + kStages * kQBytes;       // (kStages) dO tiles
  static constexpr uint32_t kDs = kDO + kStages * kQBytes;      // (2) dS^T tiles
  static constexpr uint32_t kBarriers = kDs + 2 * kDsBytes;
  // kv_full, tile_full[kStages], tile_empty[kStages]
  static constexpr uint32_t kBarrierCount = 1 + 2 * kStages;
  static constexpr size_t kBytes = kBarriers + 8 * kBarrierCount + kSwizzleGroupBytes;
  static_assert(kQBytes % kSwizzleGroupBytes == 0 && kKVBytes % kSwizzleGroupBytes == 0);
};

struct BwdParams {
  CUtensorMap q_map;   // (B, Hq, Tq, D) boxes of (64, kBlockM)
  CUtensorMap k_map;   // (B, Hkv, Tk, D) boxes of (64, kBlockN)
  CUtensorMap v_map;   // (B, Hkv, Tk, D) boxes of (64, kBlockN)
  CUtensorMap do_map;  // (B, Hq, Tq, D) boxes of (64, kBlockM)
  AttentionBwdArgs args;
  const float* delta;     // (B, Hq, Tq)
  float* dq_accumulator;  // (B, Hq, Tq, D)
  // Per-query key ranges: for each 64-key tile, the 64-row query tiles [first, end) that meet it
  // (attention_bwd.cu's attention_bwd_query_extent_kernel<64>).
  const int32_t* query_extent;  // (B, ceil(Tk / 64), 2)
};

// The first query tile of a key tile starting at key n0: (causal) the first whose last row sees
// key n0.
[[maybe_unused]] __device__ __forceinline__ int64_t first_query_tile(const AttentionShape& s,
                                                                    int64_t n0) {
  if (!s.causal) return 0;
  const int64_t first_row = n0 - s.causal_offset;  // the first query that sees key n0
  return first_row <= 0 ? 0 : first_row / kBlockM;
}

// The 64-row query tiles [*first, *end) that a 128-key tile starting at n0 needs, given the
// causal start and (kWindowed) the sliding window's end, a batch row's key range, and
// (kPerQuery) the two 64-key tiles' query extents; empty when *first >= *end.
template <bool kWindowed, bool kPerQuery>
[[maybe_unused]] __device__ __forceinline__ void query_tiles_of_key_tile(
    const AttentionShape& s, const KeyBounds& keys, const int32_t* query_extent, int64_t b,
    int64_t n0, int64_t* first, int64_t* end) {
  *first = first_query_tile(s, n0);
  *end = ceil_div(s.Tq, kBlockM);
  if constexpr (kWindowed) {
    int64_t window_first = 0, window_end = 0;
    query_tile_range<true>(s, n0, kBlockM, kBlockN, &window_first, &window_end);
    *end = std::min(*end, window_end);
    if (n0 >= keys.hi || n0 + kBlockN <= keys.lo) *end = 0;  // outside the batch row's keys
  }
  if constexpr (kPerQuery) {
    // The union of the two 64-key tiles' extents (an empty one is (0, 0)).
    const int64_t key_tiles = ceil_div(s.Tk, 64);
    const int64_t tile = n0 / 64;
    const int32_t* extent = query_extent + 2 * (b * key_tiles + tile);
    int first_meeting = extent[0], end_meeting = extent[1];
    if (tile + 1 < key_tiles && extent[3] > extent[2]) {
      first_meeting = end_meeting > first_meeting ? std::min(first_meeting, extent[2]) : extent[2];
      end_meeting = std::max(end_meeting, extent[3]);
    }
    *first = std::max<int64_t>(*first, first_meeting);
    *end = std::min<int64_t>(*end, end_meeting);
  }
}

// grid (ceil(Tk / kBlockN) * Hkv * B), kThreads threads.
// kDq: also dQ (into the accumulator); without, dK and dV only (the deterministic backward,
// whose dQ is attention_bwd.cu's atomic-free kernel). kWindowed: the bounded instance (a
// sliding window or key ranges; the plain one keeps their code out); kPerQuery (with kWindowed):
// per-query key ranges; kScoreMods (with kWindowed): soft-capping and dropout (score_mods).
template <typename T, int kHeadDim, bool kDq, bool kWindowed, bool kPerQuery, bool kScoreMods>
__global__ void __launch_bounds__(kThreads, 1)
    attention_bwd_sm90_kernel(const __grid_constant__ BwdParams params) {
#ifdef FUSEDLM_SM90A_DEVICE
  using Layout = BwdLayout<kHeadDim>;
  constexpr int kDBlocks = kHeadDim / 8;  // 8-column blocks of dK, dV
  constexpr int kQBlocks = kBlockM / 8;   // 8-column blocks of S^T, dP^T (queries)
  constexpr int kQueryChunks = kBlockM / 16;  // k steps of dV += P^T dO, dK += dS^T Q
  constexpr bool kSplitDq = kHeadDim == 128;  // consumers split dQ's columns (else its keys)
  constexpr int kDqKeys = kSplitDq ? kBlockN : kBlockN / kConsumers;

  unsigned char* raw = dynamic_shared_memory();
  unsigned char* smem =
      raw + (kSwizzleGroupBytes - shared_address(raw) % kSwizzleGroupBytes) % kSwizzleGroupBytes;
  unsigned char* sK = smem + Layout::kK;
  unsigned char* sV = smem + Layout::kV;
  unsigned char* sQ = smem + Layout::kQ;
  unsigned char* sDO = smem + Layout::kDO;
  unsigned char* sDs = smem + Layout::kDs;
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem + Layout::kBarriers);
  uint64_t* tile_full = kv_full + 1;
  uint64_t* tile_empty = tile_full + kStages;

  const AttentionBwdArgs& args = params.args;
  const AttentionShape& s = args.shape;
  const int64_t Tq = s.Tq;
  const int64_t Tk = s.Tk;
  const int64_t n_blocks = ceil_div(Tk, kBlockN);
  const BlockCoordinates block = block_coordinates(n_blocks, s.Hkv);
  const int64_t n0 = block.tile * kBlockN;
  const int64_t h_kv = block.head;
  const int64_t b = block.batch;
  const int64_t group = s.Hq / s.Hkv;
  // The query tiles this key tile needs: from the causal start to the end, (bounded) only those
  // inside the window, the batch row's key range, or (per query) the tiles whose rows meet it.
  const KeyBounds keys = kWindowed && !kPerQuery ? key_bounds(s, b) : KeyBounds{0, Tk};
  int64_t m_first = 0, m_end = 0;
  query_tiles_of_key_tile<kWindowed, kPerQuery>(s, keys, params.query_extent, b, n0, &m_first,
                                                &m_end);
  const int64_t m_count = std::max<int64_t>(m_end - m_first, 0);
  const int64_t tiles = group * m_count;  // (query head, query tile) pairs, head-major
  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;

  if (tid == 0) {
    mbarrier_init(kv_full, 1);
    for (int stage = 0; stage < kStages; ++stage) {
      mbarrier_init(tile_full + stage, 1);
      mbarrier_init(tile_empty + stage, 128 * kConsumers);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    registers_decrease<kProducerRegisters>();
    if (tid != 0 || tiles == 0) return;
    const int key0 = static_cast<int>(n0);
    const int kvh = static_cast<int>(h_kv);
    const int qb = static_cast<int>(b);
    mbarrier_arrive_expect_tx(kv_full, 2 * Layout::kKVBytes);
    for (int slab = 0; slab < Layout::kSlabs; ++slab) {
      tma_load_4d(sK + slab * Layout::kKVSlabBytes, &params.k_map, slab * kSlabColumns, key0, kvh,
                  qb, kv_full);
      tma_load_4d(sV + slab * Layout::kKVSlabBytes, &params.v_map, slab * kSlabColumns, key0, kvh,
                  qb, kv_full);
    }
    for (int64_t it = 0; it < tiles; ++it) {
      const int stage = static_cast<int>(it % kStages);
      const uint32_t phase = static_cast<uint32_t>(it / kStages) & 1u;
      const int h = static_cast<int>(h_kv * group + it / m_count);
      const int row0 = static_cast<int>((m_first + it % m_count) * kBlockM);
      mbarrier_wait(tile_empty + stage, phase ^ 1u);
      mbarrier_arrive_expect_tx(tile_full + stage, 2 * Layout::kQBytes);
      for (int slab = 0; slab < Layout::kSlabs; ++slab) {
        const uint32_t offset = stage * Layout::kQBytes + slab * Layout::kQSlabBytes;
        tma_load_4d(sQ + offset, &params.q_map, slab * kSlabColumns, row0, h, qb,
                    tile_full + stage);
        tma_load_4d(sDO + offset, &params.do_map, slab * kSlabColumns, row0, h, qb,
                    tile_full + stage);
      }
    }
    return;
  }

  // Consumers: warpgroup c owns keys 64 c .. 64 c + 63 of the tile; warp w of it keys
  // 16 w .. 16 w + 15 of those (rows of the accumulators); queries are the columns.
  registers_increase<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int warp = (tid / 32) % 4;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int key_row0 = consumer * 64 + warp * 16;  // key of g = 0 in the tile
  const float scale = static_cast<float>(s.scale);
  const float scale_log2 = scale * kLog2e;
  const ScoreMods mods = kScoreMods ? score_mods_of(s) : ScoreMods{};

  float dk[kHeadDim / 2] = {};  // (64 keys, kHeadDim) per warpgroup, accumulator layout
  float dv[kHeadDim / 2] = {};
  float st[kBlockM / 2];        // S^T, then P^T
  float dpt[kBlockM / 2];       // dP^T, then dS^T
  float dq[kSlabColumns / 2];   // (64 queries, 64 columns) of dQ
  uint32_t p[kQueryChunks][4];   // P^T, T, A layout
  uint32_t ds[kQueryChunks][4];  // dS^T, T, A layout

  if (tiles > 0) mbarrier_wait(kv_full, 0);
  for (int64_t it = 0; it < tiles; ++it) {
    const int stage = static_cast<int>(it % kStages);
    const int64_t h = h_kv * group + it / m_count;
    const int64_t m0 = (m_first + it % m_count) * kBlockM;
    const unsigned char* q_tile = sQ + stage * Layout::kQBytes;
    const unsigned char* do_tile = sDO + stage * Layout::kQBytes;
    unsigned char* ds_tile = sDs + (it & 1) * Layout::kDsBytes;

    // S^T = K Q^T, dP^T = V dO^T: all K-major, the k-th 16-column step 32 bytes into a slab;
    // one wgmma group each.
    auto issue_keys_times_queries = [&](float (&acc)[kBlockM / 2], const unsigned char* keys,
                                        const unsigned char* queries) {
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t step = (kk % 4) * 32;
        const uint32_t key_offset = (kk / 4) * Layout::kKVSlabBytes + consumer * 64 * kRowBytes;
        const uint32_t query_offset = (kk / 4) * Layout::kQSlabBytes;
        wgmma_ss<T, kBlockM, 0, 0>(
            acc, make_smem_descriptor(keys + key_offset + step, 16, kSwizzleGroupBytes),
            make_smem_descriptor(queries + query_offset + step, 16, kSwizzleGroupBytes), kk > 0);
      }
      warpgroup_commit();
    };
    mbarrier_wait(tile_full + stage, static_cast<uint32_t>(it / kStages) & 1u);
    fence_accumulators(st);
    fence_accumulators(dpt);
    warpgroup_fence();
    issue_keys_times_queries(st, sK, q_tile);
    issue_keys_times_queries(dpt, sV, do_tile);

    // This thread's query columns: their lse (log2 units; -inf: the row sees no key) and delta.
    const float* lse_row = args.lse + (b * s.Hq + h) * Tq;
    const float* delta_row = params.delta + (b * s.Hq + h) * Tq;
    float lse_log2[kQBlocks][2];
    float delta[kQBlocks][2];
#pragma unroll
    for (int qb = 0; qb < kQBlocks; ++qb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t q = m0 + qb * 8 + 2 * t + e;
        lse_log2[qb][e] = q < Tq ? lse_row[q] * kLog2e : -INFINITY;
        delta[qb][e] = q < Tq ? delta_row[q] : 0.f;
      }
    }
    // (Bounded: a window's edge crossing the warp's 16 keys and this query tile, a batch row's
    // key range cutting the key tile, or per-query ranges, which are masked everywhere.)
    const int64_t warp_key0 = n0 + key_row0;
    const bool need_mask =
        m0 + kBlockM > Tq || n0 + kBlockN > Tk ||
        (s.causal && warp_key0 + 15 > m0 + s.causal_offset) ||
        (kWindowed &&
         (kPerQuery || (s.windowed && warp_key0 < m0 + kBlockM - 1 + s.window_offset) ||
          n0 < keys.lo || n0 + kBlockN > keys.hi));

    warpgroup_wait<1>();  // S^T has landed
    fence_accumulators(st);
#pragma unroll
    for (int qb = 0; qb < kQBlocks; ++qb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float l = lse_log2[qb][i & 1];
        // exp2f, not fast_exp2: with the bare ex2 ptxas schedules more exponentials in flight
        // and the D = 128 consumer, already at its 240-register cap, spills 16-24 bytes more
        // (ptxas, sm_90a); here the GEMMs, not the exponentials, bound the loop.
        st[4 * qb + i] =
            l == -INFINITY ? 0.f
                           : exp2f(score_log2<kScoreMods>(st[4 * qb + i], scale_log2, mods) - l);
      }
    }
    if (need_mask) {
      // Per query column: which of the warp's 16 keys it sees ([lo, hi): visible_columns with
      // the query as the "row"), then its element in each of the two key rows g, g + 8. (A
      // loop of its own, after the exponentials: with the test inside theirs the D = 128
      // consumers spilled 20-36 bytes, none this way; ptxas, sm_90a.)
#pragma unroll
      for (int qb = 0; qb < kQBlocks; ++qb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t q = m0 + qb * 8 + 2 * t + e;
          int lo = 0, hi = 0;
          if (q < Tq) {
            visible_columns(s, row_key_bounds<kPerQuery>(s, keys, b, q), q, warp_key0, 16, &lo,
                            &hi);
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int key = g + 8 * r;
            if (key < lo || key >= hi) st[4 * qb + 2 * r + e] = 0.f;
          }
        }
      }
    }
    warpgroup_wait<0>();  // dP^T has landed
    fence_accumulators(dpt);
    if constexpr (kScoreMods) {
      // Dropout: P^T * M (dV's 1 / (1 - p) is the epilogue's), dS^T = P^T * (M * dP^T / (1 - p)
      // - delta); a cap: dS^T times 1 - tanh^2, the tanh recovered from P (S^T is gone):
      // capped score (log2 units) = log2(P) + lse.
      static_assert(kBlockM / 2 <= 32);
      uint32_t keep = ~0u;  // bit i: element i of st kept
      if (mods.dropout) {
        // (a loop not unrolled: one Philox state live at a time, as dropout_row_mask)
        keep = 0;
        const int64_t flat_row0 = (b * s.Hq + h) * Tq + m0 + 2 * t;
#pragma unroll 1
        for (int i = 0; i < kBlockM / 2; ++i) {  // i = 4 qb + 2 r + e
          const int qb = i / 4, r = (i / 2) % 2, e = i % 2;
          keep |= static_cast<uint32_t>(dropout_keep(mods, flat_row0 + qb * 8 + e,
                                                     warp_key0 + g + 8 * r))
                  << i;
        }
      }
#pragma unroll
      for (int qb = 0; qb < kQBlocks; ++qb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int i = 4 * qb + 2 * r + e;
            const float p = st[i];
            const bool kept = (keep >> i & 1u) != 0;
            float cap_slope = 1.f;  // d(capped score) / d(scale q.k)
            if (mods.tanh_per_score != 0.f && p > 0.f) {
              const float tanh_qk = (log2f(p) + lse_log2[qb][e]) / mods.softcap_log2;
              cap_slope = fmaxf(1.f - tanh_qk * tanh_qk, 0.f);
            }
            const float dp_kept = kept ? dpt[i] * mods.keep_scale : 0.f;
            dpt[i] = p * (dp_kept - delta[qb][e]) * cap_slope;
            st[i] = kept ? p : 0.f;
          }
        }
      }
    } else {
#pragma unroll
      for (int qb = 0; qb < kQBlocks; ++qb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          dpt[4 * qb + i] = st[4 * qb + i] * (dpt[4 * qb + i] - delta[qb][i & 1]);
        }
      }
    }
#pragma unroll
    for (int kc = 0; kc < kQueryChunks; ++kc) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        p[kc][r] = pack2<T>(st[8 * kc + 2 * r], st[8 * kc + 2 * r + 1]);
        ds[kc][r] = pack2<T>(dpt[8 * kc + 2 * r], dpt[8 * kc + 2 * r + 1]);
      }
    }

    // dS^T (keys, queries) into shared memory, 128-byte swizzled: the A of dQ = dS K.
#pragma unroll
    for (int qb = 0; qb < (kDq ? kQBlocks : 0); ++qb) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t offset = (key_row0 + g + 8 * r) * kRowBytes + (qb * 8 + 2 * t) * 2;
        const uint32_t swizzled = offset ^ (((offset >> 7) & 7u) << 4);
        store_shared_for_async(ds_tile + swizzled,
                               pack2<T>(dpt[4 * qb + 2 * r], dpt[4 * qb + 2 * r + 1]));
      }
    }
    fence_view_async_shared();

    // dV += P^T dO, dK += dS^T Q: B MN-major (queries = k; slabs of 64 head-dim columns).
    fence_accumulators(dv);
    fence_accumulators(dk);
    fence_registers(p);
    fence_registers(ds);
    warpgroup_fence();
#pragma unroll
    for (int kc = 0; kc < kQueryChunks; ++kc) {
      wgmma_rs_transposed_b<T, kHeadDim>(
          dv, p[kc],
          make_smem_descriptor(do_tile + kc * 16 * kRowBytes, Layout::kQSlabBytes,
                               kSwizzleGroupBytes));
    }
#pragma unroll
    for (int kc = 0; kc < kQueryChunks; ++kc) {
      wgmma_rs_transposed_b<T, kHeadDim>(
          dk, ds[kc],
          make_smem_descriptor(q_tile + kc * 16 * kRowBytes, Layout::kQSlabBytes,
                               kSwizzleGroupBytes));
    }
    warpgroup_commit();

    if constexpr (!kDq) {
      warpgroup_wait<0>();
      fence_accumulators(dv);
      fence_accumulators(dk);
      mbarrier_arrive(tile_empty + stage);  // Q and dO of this stage are no longer read
      continue;
    }

    // dQ (64 queries, 64 columns) = dS K over kDqKeys keys: dS^T MN-major as A, K MN-major as B.
    // Both consumers' dS^T (split) or this one's (keys split) must be in shared memory.
    if constexpr (kSplitDq) {
      named_barrier_sync(kDsBarrier, 256);
    } else {
      named_barrier_sync(kDsBarrier + consumer, 128);
    }
    const uint32_t dq_key0 = kSplitDq ? 0 : consumer * 64;
    const uint32_t dq_column_slab = kSplitDq ? consumer : 0;
    fence_accumulators(dq);
    warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < kDqKeys / 16; ++kk) {
      const uint32_t key_offset = (dq_key0 + kk * 16) * kRowBytes;
      wgmma_ss<T, kSlabColumns, 1, 1>(
          dq, make_smem_descriptor(ds_tile + key_offset, 16, kSwizzleGroupBytes),
          make_smem_descriptor(sK + dq_column_slab * Layout::kKVSlabBytes + key_offset,
                               Layout::kKVSlabBytes, kSwizzleGroupBytes),
          kk > 0);
    }
    warpgroup_commit();
    // The dV/dK group was the last reader of this stage's Q and dO (dQ reads dS^T and K): hand
    // the stage back to the producer while the dQ group still runs.
    warpgroup_wait<1>();
    fence_accumulators(dv);
    fence_accumulators(dk);
    mbarrier_arrive(tile_empty + stage);
    warpgroup_wait<0>();
    fence_accumulators(dq);

    // dQ += scale * dS K: rows are queries (warp w: 16 w + g, + 8), columns this slab's.
    float* dq_rows = params.dq_accumulator + (b * s.Hq + h) * Tq * s.D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t q = m0 + warp * 16 + g + 8 * r;
      if (q >= Tq) continue;
#pragma unroll
      for (int db = 0; db < kSlabColumns / 8; ++db) {
        // two adjacent columns (both < D or both past it: D is a multiple of 8), one 8-byte
        // atomic (sm_90's vector atomicAdd)
        const int64_t col = dq_column_slab * kSlabColumns + db * 8 + 2 * t;
        if (col < s.D) {
          atomicAdd(reinterpret_cast<float2*>(dq_rows + q * s.D + col),
                    make_float2(scale * dq[4 * db + 2 * r], scale * dq[4 * db + 2 * r + 1]));
        }
      }
    }
  }

  // dK = scale * dS^T Q, dV = P^T dO (dropout: / (1 - p)), summed over the group's query heads:
  // written once.
  const int D = static_cast<int>(s.D);
  const float dv_factor = kScoreMods ? mods.keep_scale : 1.f;
  T* dk_out = static_cast<T*>(args.dk) + (b * s.Hkv + h_kv) * Tk * D;
  T* dv_out = static_cast<T*>(args.dv) + (b * s.Hkv + h_kv) * Tk * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = n0 + key_row0 + g + 8 * r;
    if (key >= Tk) continue;
#pragma unroll
    for (int db = 0; db < kDBlocks; ++db) {
      const int col = db * 8 + 2 * t;
      if (col < D) {
        *reinterpret_cast<uint32_t*>(dk_out + key * D + col) =
            pack2<T>(scale * dk[4 * db + 2 * r], scale * dk[4 * db + 2 * r + 1]);
        *reinterpret_cast<uint32_t*>(dv_out + key * D + col) =
            pack2<T>(dv_factor * dv[4 * db + 2 * r], dv_factor * dv[4 * db + 2 * r + 1]);
      }
    }
  }
#endif  // FUSEDLM_SM90A_DEVICE
}

template <typename T, int kHeadDim, bool kDq>
cudaError_t launch_bwd_sm90(const AttentionBwdArgs& args, const float* delta,
                            float* dq_accumulator, const int32_t* query_extent,
                            cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  BwdParams params;
  std::memset(&params, 0, sizeof(params));
  params.args = args;
  params.delta = delta;
  params.dq_accumulator = dq_accumulator;
  params.query_extent = query_extent;
  if (encode_input(&params.q_map, s, args.q, s.Hq, s.Tq, kBlockM) != cudaSuccess ||
      encode_input(&params.k_map, s, args.k, s.Hkv, s.Tk, kBlockN) != cudaSuccess ||
      encode_input(&params.v_map, s, args.v, s.Hkv, s.Tk, kBlockN) != cudaSuccess ||
      encode_input(&params.do_map, s, args.grad_out, s.Hq, s.Tq, kBlockM) != cudaSuccess) {
    return cudaErrorNotSupported;
  }
  constexpr size_t bytes = BwdLayout<kHeadDim>::kBytes;
  auto kernel = pick_instance(s, [](auto windowed, auto per_query, auto mods) {
    return attention_bwd_sm90_kernel<T, kHeadDim, kDq, decltype(windowed)::value,
                                     decltype(per_query)::value, decltype(mods)::value>;
  });
  FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(kernel, bytes));
  const int64_t blocks = ceil_div(s.Tk, kBlockN) * s.Hkv * s.B;
  if (!fits_grid(s, blocks)) return cudaErrorInvalidValue;
  FUSEDLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, bytes, stream)(params);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace backward
}  // namespace

cudaError_t attention_bwd_sm90(const AttentionBwdArgs& args, const float* delta,
                               float* dq_accumulator, const int32_t* query_extent,
                               int query_extent_block, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  // Per-query ranges need the extents of 64-key tiles (what the sm_80 dK/dV tiles are wherever
  // the device has an H100's shared memory).
  if (!valid_shape(s) || s.D > 128 || !sm90_enabled() ||
      (per_query(s) && (query_extent == nullptr || query_extent_block != 64))) {
    return cudaErrorNotSupported;
  }
  using backward::launch_bwd_sm90;
  return dispatch_half_types(s.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (dq_accumulator == nullptr) {
      return s.D <= 64
                 ? launch_bwd_sm90<T, 64, false>(args, delta, nullptr, query_extent, stream)
                 : launch_bwd_sm90<T, 128, false>(args, delta, nullptr, query_extent, stream);
    }
    return s.D <= 64
               ? launch_bwd_sm90<T, 64, true>(args, delta, dq_accumulator, query_extent, stream)
               : launch_bwd_sm90<T, 128, true>(args, delta, dq_accumulator, query_extent, stream);
  });
}

}  // namespace sm90
}  // namespace attention
}  // namespace fusedlm::cuda
