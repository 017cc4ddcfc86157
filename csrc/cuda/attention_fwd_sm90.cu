// Flash-attention forward for Hopper (sm_90a), FlashAttention-3's structure: one CTA per
// (128-query tile, query head, batch) with three warpgroups. A producer warpgroup, whose one
// thread streams Q and the K/V tiles into 128-byte-swizzled shared memory with TMA (a 2-stage
// ring of K and of V buffers guarded by mbarriers), gives its registers to two consumer
// warpgroups of 64 query rows each (setmaxnreg). They compute S = Q K^T and O += P V with wgmma
// straight from shared memory (P from registers), keep the online softmax in registers, and
// overlap one key tile's softmax with the previous tile's P V GEMM (FA3's intra-warpgroup
// pipelining) and with the other warpgroup's GEMMs (FA3's ping-pong). Head dims up to
// 128 (64 and 128 templates; columns past D are TMA's zero fill); the rest go to the sm_80
// kernel (attention_fwd.cu), which also serves every device that is not sm_90.
#include <cstdlib>
#include <cstring>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include "cuda/attention_sm90.cuh"

namespace fusedlm::cuda {
namespace attention {
namespace sm90 {
namespace {

constexpr int kBlockM = 128;  // query rows per CTA
constexpr int kBlockN = 128;  // keys per K/V tile
constexpr int kStages = 2;    // K/V buffers in the ring
constexpr int kConsumers = 2;  // consumer warpgroups, 64 query rows each
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kSlabColumns = 64;  // 16-bit columns of one 128-byte-swizzled slab
// setmaxnreg: the producer warpgroup gives registers to the consumers.
constexpr uint32_t kProducerRegisters = 24;
constexpr uint32_t kConsumerRegisters = 240;
static_assert(register_split_fits(kProducerRegisters, kConsumerRegisters, kConsumers));
// A 128-byte swizzle takes TMA boxes at most 128 bytes wide (one slab of 16-bit columns).
static_assert(kSlabColumns * 2 <= 128);
constexpr uint32_t kRowBytes = 128;
// Named barriers 1, 2: the consumers' GEMM turns (unused where the kernel compiles empty).
[[maybe_unused]] constexpr uint32_t kTurnBarrier = 1;

// Byte offsets of the tiles and barriers in (1024-byte aligned) dynamic shared memory.
template <int kHeadDim>
struct SharedLayout {
  static constexpr int kSlabs = kHeadDim / kSlabColumns;
  static constexpr uint32_t kQSlabBytes = kBlockM * kRowBytes;   // (kBlockM, 64)
  static constexpr uint32_t kKVSlabBytes = kBlockN * kRowBytes;  // (kBlockN, 64)
  static constexpr uint32_t kQBytes = kSlabs * kQSlabBytes;      // (kSlabs, kBlockM, 64)
  static constexpr uint32_t kKVBytes = kSlabs * kKVSlabBytes;    // (kSlabs, kBlockN, 64)
  static constexpr uint32_t kQ = 0;
  static constexpr uint32_t kK = kQ + kQBytes;                   // (kStages) K tiles
  static constexpr uint32_t kV = kK + kStages * kKVBytes;        // (kStages) V tiles
  static constexpr uint32_t kBarriers = kV + kStages * kKVBytes;
  // q_full, k_full[kStages], v_full[kStages], k_empty[kStages], v_empty[kStages]
  static constexpr uint32_t kBarrierCount = 1 + 4 * kStages;
  // Per-query key ranges: the tile's outer and inner key bounds (cta_tile_key_bounds).
  static constexpr uint32_t kTileKeys = kBarriers + 8 * kBarrierCount;
  // + slack to align the dynamic shared memory's start to 1024 bytes
  static constexpr size_t kBytes = kTileKeys + 16 + kSwizzleGroupBytes;
  static_assert(kQBytes % kSwizzleGroupBytes == 0 && kKVBytes % kSwizzleGroupBytes == 0);
};

struct FwdParams {
  CUtensorMap q_map;  // (B, Hq, Tq, D) boxes of (64, kBlockM)
  CUtensorMap k_map;  // (B, Hkv, Tk, D) boxes of (64, kBlockN)
  CUtensorMap v_map;  // (B, Hkv, Tk, D) boxes of (64, kBlockN)
  AttentionFwdArgs args;
};

// grid (ceil(Tq / kBlockM) * Hq * B), kThreads threads. kWindowed: the bounded instance (a
// sliding window or key ranges: its key tiles start at the first one a row sees; the plain
// instance is the kernel without it); kPerQuery (with kWindowed): key ranges per query row
// (packed documents), each row masked by its own range; kScoreMods (with kWindowed): soft-capping
// and dropout (score_mods).
template <typename T, int kHeadDim, bool kWindowed, bool kPerQuery, bool kScoreMods>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_sm90_kernel(const __grid_constant__ FwdParams params) {
#ifdef FUSEDLM_SM90A_DEVICE
  using Layout = SharedLayout<kHeadDim>;
  constexpr int kDBlocks = kHeadDim / 8;   // 8-column blocks of the output accumulator
  constexpr int kNBlocks = kBlockN / 8;    // 8-column blocks of the score accumulator
  constexpr int kKeyChunks = kBlockN / 16;  // k steps of O += P V

  unsigned char* raw = dynamic_shared_memory();
  unsigned char* smem =
      raw + (kSwizzleGroupBytes - shared_address(raw) % kSwizzleGroupBytes) % kSwizzleGroupBytes;
  unsigned char* sQ = smem + Layout::kQ;
  unsigned char* sK = smem + Layout::kK;
  unsigned char* sV = smem + Layout::kV;
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + Layout::kBarriers);
  uint64_t* k_full = q_full + 1;
  uint64_t* v_full = k_full + kStages;
  uint64_t* k_empty = v_full + kStages;
  uint64_t* v_empty = k_empty + kStages;

  const AttentionFwdArgs& args = params.args;
  const AttentionShape& s = args.shape;
  const int64_t Tq = s.Tq;
  const int64_t Tk = s.Tk;
  const int64_t m_blocks = ceil_div(Tq, kBlockM);
  const BlockCoordinates block = block_coordinates(m_blocks, s.Hq);
  const int64_t m_block = m_blocks - 1 - block.tile;  // the longest (causal) rows start first
  const int64_t h = block.head;
  const int64_t b = block.batch;
  const int64_t h_kv = h / (s.Hq / s.Hkv);
  const int64_t m0 = m_block * kBlockM;
  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;

  // Key tiles this query tile sees: all of them, or (causal) up to its last row's last key,
  // from (sliding window, key range) the tile of its first row's first key to (key range) the
  // tile of its rows' last key (per-query ranges: warp 0 reduces the tile's rows for every warp,
  // producer and consumers). The pipeline counts tiles from 0 (stages, phases, turns): its tile
  // n is key tile n_first + n, and n_blocks counts them.
  const KeyBounds keys = kWindowed && !kPerQuery ? key_bounds(s, b) : KeyBounds{0, Tk};
  const TileKeyBounds tile_keys = cta_tile_key_bounds<kPerQuery>(
      s, keys, b, m0, kBlockM, reinterpret_cast<int*>(smem + Layout::kTileKeys));
  if (tid == 0) {
    mbarrier_init(q_full, 1);
    for (int stage = 0; stage < kStages; ++stage) {
      mbarrier_init(k_full + stage, 1);
      mbarrier_init(v_full + stage, 1);
      mbarrier_init(k_empty + stage, 128 * kConsumers);
      mbarrier_init(v_empty + stage, 128 * kConsumers);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int64_t n_first = kWindowed ? first_key_tile(s, tile_keys.outer, m0, kBlockN) : 0;
  const int64_t n_blocks = std::max<int64_t>(
      0, key_tile_end<kWindowed>(s, tile_keys.outer, m0, kBlockM, kBlockN) - n_first);

  if (warpgroup == 0) {  // producer
    registers_decrease<kProducerRegisters>();
    if (tid != 0 || n_blocks == 0) return;
    const int qm = static_cast<int>(m0);
    const int qh = static_cast<int>(h);
    const int kvh = static_cast<int>(h_kv);
    const int qb = static_cast<int>(b);
    mbarrier_arrive_expect_tx(q_full, Layout::kQBytes);
    for (int slab = 0; slab < Layout::kSlabs; ++slab) {
      tma_load_4d(sQ + slab * Layout::kQSlabBytes, &params.q_map, slab * kSlabColumns, qm, qh, qb,
                  q_full);
    }
    // K and V tiles in order; a buffer is refilled once both consumers released it (K tiles
    // are released a tile earlier than V tiles, so K runs ahead).
    for (int64_t n = 0; n < n_blocks; ++n) {
      const int stage = static_cast<int>(n % kStages);
      const uint32_t phase = static_cast<uint32_t>(n / kStages) & 1u;
      const int key0 = static_cast<int>((n_first + n) * kBlockN);
      unsigned char* k_tile = sK + stage * Layout::kKVBytes;
      unsigned char* v_tile = sV + stage * Layout::kKVBytes;
      mbarrier_wait(k_empty + stage, phase ^ 1u);
      mbarrier_arrive_expect_tx(k_full + stage, Layout::kKVBytes);
      for (int slab = 0; slab < Layout::kSlabs; ++slab) {
        tma_load_4d(k_tile + slab * Layout::kKVSlabBytes, &params.k_map, slab * kSlabColumns,
                    key0, kvh, qb, k_full + stage);
      }
      mbarrier_wait(v_empty + stage, phase ^ 1u);
      mbarrier_arrive_expect_tx(v_full + stage, Layout::kKVBytes);
      for (int slab = 0; slab < Layout::kSlabs; ++slab) {
        tma_load_4d(v_tile + slab * Layout::kKVSlabBytes, &params.v_map, slab * kSlabColumns,
                    key0, kvh, qb, v_full + stage);
      }
    }
    return;
  }

  // Consumers: warpgroup c (0 or 1) owns query rows 64 c .. 64 c + 63 of the tile; warp w of it
  // rows 16 w .. 16 w + 15 of those (the wgmma accumulator layout, attention_sm90.cuh).
  registers_increase<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = consumer * 64 + ((tid / 32) % 4) * 16;  // row of g = 0 in the tile

  float o[kHeadDim / 2] = {};  // (64, kHeadDim) per warpgroup, accumulator layout
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g, g + 8; log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the denominators
  float scores[kBlockN / 2];                  // S, then P, of the current key tile (float32)
  uint32_t p[kKeyChunks][4];                  // P of the previous key tile, T, A layout
  const float scale_log2 = static_cast<float>(s.scale) * kLog2e;
  const ScoreMods mods = kScoreMods ? score_mods_of(s) : ScoreMods{};

  // Waits until key tile n's K (or V) has landed. Before the fence of the GEMMs that read it:
  // a wait loop between two wgmmas is a divergent path, over which ptxas serializes them.
  auto wait_keys = [&](int64_t n) {
    mbarrier_wait(k_full + n % kStages, static_cast<uint32_t>(n / kStages) & 1u);
  };
  auto wait_values = [&](int64_t n) {
    mbarrier_wait(v_full + n % kStages, static_cast<uint32_t>(n / kStages) & 1u);
  };

  // S = Q K^T for key tile n, issued as one wgmma group (not waited for): both operands
  // K-major, the k-th 16-column step 32 bytes into a 64-column slab.
  auto issue_scores = [&](int64_t n) {
    const int stage = static_cast<int>(n % kStages);
    const unsigned char* k_tile = sK + stage * Layout::kKVBytes;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t slab = kk / 4;
      const uint32_t step = (kk % 4) * 32;
      const uint64_t q_desc = make_smem_descriptor(
          sQ + slab * Layout::kQSlabBytes + consumer * 64 * kRowBytes + step, 16,
          kSwizzleGroupBytes);
      const uint64_t k_desc =
          make_smem_descriptor(k_tile + slab * Layout::kKVSlabBytes + step, 16, kSwizzleGroupBytes);
      wgmma_ss<T, kBlockN, 0, 0>(scores, q_desc, k_desc, kk > 0);
    }
    warpgroup_commit();
  };

  // O += P V for key tile n, P from registers, V MN-major (keys = k; slabs of 64 head-dim
  // columns LBO apart), the k-th 16-key step 16 rows into the tile; one group, not waited for.
  auto issue_output = [&](int64_t n) {
    const int stage = static_cast<int>(n % kStages);
    const unsigned char* v_tile = sV + stage * Layout::kKVBytes;
#pragma unroll
    for (int kc = 0; kc < kKeyChunks; ++kc) {
      const uint64_t v_desc = make_smem_descriptor(v_tile + kc * 16 * kRowBytes,
                                                   Layout::kKVSlabBytes, kSwizzleGroupBytes);
      wgmma_rs_transposed_b<T, kHeadDim>(o, p[kc], v_desc);
    }
    warpgroup_commit();
  };

  // Scores of tile n (landed) -> probabilities in place: scale to log2 units, mask (past Tk,
  // causal: keys after the row's last visible, bounded: outside the window or the row's key
  // range), new row max over the 4 lanes sharing a row, exponentiate; alpha: the factors the
  // output accumulated so far must be rescaled by. tile_keys.inner (the keys every row of the
  // CTA's tile sees) decides which tiles skip the key-range mask.
  auto softmax = [&](int64_t n, float (&alpha)[2]) {
    const int64_t n0 = (n_first + n) * kBlockN;
    const int64_t rows0 = m0 + consumer * 64;  // this consumer's first row
    const bool need_mask =
        n0 + kBlockN > Tk || (s.causal && n0 + kBlockN - 1 > rows0 + s.causal_offset) ||
        (kWindowed && ((s.windowed && n0 < rows0 + 63 + s.window_offset) ||
                       n0 < tile_keys.inner.lo || n0 + kBlockN > tile_keys.inner.hi));
    if constexpr (!kWindowed) {
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float x = scores[4 * nb + i] * scale_log2;
          if (need_mask) {
            const int64_t row = m0 + warp_row0 + g + (i >= 2 ? 8 : 0);
            const int64_t col = n0 + nb * 8 + 2 * t + (i & 1);
            if (col >= Tk || (s.causal && col > row + s.causal_offset)) x = -INFINITY;
          }
          scores[4 * nb + i] = x;
        }
      }
    } else {  // per-row int32 column bounds (visible_columns), as in the sm_80 kernel
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        int lo = 0, hi = kBlockN;
        if (need_mask) {
          const int64_t row = m0 + warp_row0 + g + 8 * r;
          visible_columns(s, row_key_bounds<kPerQuery>(s, keys, b, row), row, n0, kBlockN, &lo,
                          &hi);
        }
#pragma unroll
        for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float x = score_log2<kScoreMods>(scores[4 * nb + 2 * r + j], scale_log2, mods);
            const int col = nb * 8 + 2 * t + j;
            if (need_mask && (col < lo || col >= hi)) x = -INFINITY;
            scores[4 * nb + 2 * r + j] = x;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m_new = row_max[r];
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb) {
        m_new = fmaxf(m_new, fmaxf(scores[4 * nb + 2 * r], scores[4 * nb + 2 * r + 1]));
      }
      m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 1));
      m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 2));
      // A row that has seen only masked keys keeps max -inf; subtract 0 then (no inf - inf).
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = fast_exp2(row_max[r] - m_use);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb) {
        const float p0 = fast_exp2(scores[4 * nb + 2 * r] - m_use);
        const float p1 = fast_exp2(scores[4 * nb + 2 * r + 1] - m_use);
        scores[4 * nb + 2 * r] = p0;
        scores[4 * nb + 2 * r + 1] = p1;
        sum += p0 + p1;
      }
      row_sum[r] = row_sum[r] * alpha[r] + sum;
      if constexpr (kScoreMods) {
        // Dropout: after the sum (the softmax's denominator and lse are the undropped ones);
        // the kept ones' 1 / (1 - p) is the epilogue's.
        if (mods.dropout) {
          const int64_t flat_row = (b * s.Hq + h) * Tq + m0 + warp_row0 + g + 8 * r;
          const uint32_t keep = dropout_row_mask<kNBlocks>(mods, flat_row, n0 + 2 * t);
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
            if (!(keep >> (2 * nb) & 1u)) scores[4 * nb + 2 * r] = 0.f;
            if (!(keep >> (2 * nb + 1) & 1u)) scores[4 * nb + 2 * r + 1] = 0.f;
          }
        }
      }
    }
  };

  auto rescale_output = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int db = 0; db < kDBlocks; ++db) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[4 * db + i] *= alpha[i / 2];
    }
  };

  auto probabilities_to_registers = [&] {
#pragma unroll
    for (int kc = 0; kc < kKeyChunks; ++kc) {
      p[kc][0] = pack2<T>(scores[8 * kc + 0], scores[8 * kc + 1]);
      p[kc][1] = pack2<T>(scores[8 * kc + 2], scores[8 * kc + 3]);
      p[kc][2] = pack2<T>(scores[8 * kc + 4], scores[8 * kc + 5]);
      p[kc][3] = pack2<T>(scores[8 * kc + 6], scores[8 * kc + 7]);
    }
  };

  // Ping-pong: the two consumer warpgroups take turns issuing their GEMMs (named barrier
  // kTurnBarrier + c is consumer c's turn), so one's softmax runs under the other's GEMMs.
  // Consumer 0 goes first; each issues n_blocks + 1 times, and consumer 1's last hand-over is
  // skipped (nobody would take it: a barrier must not be left with pending arrivals).
  int turns_left = static_cast<int>(n_blocks) + 1;
  auto take_turn = [&] { named_barrier_sync(kTurnBarrier + consumer, 256); };
  auto pass_turn = [&] {
    --turns_left;
    named_barrier_arrive(kTurnBarrier + (1 - consumer), 256, consumer == 0 || turns_left > 0);
  };

  // FlashAttention-3's intra-warpgroup overlap: the S GEMM of tile n and the P V GEMM of tile
  // n - 1 are in flight together, and tile n's softmax runs while the second one still does.
  if (n_blocks > 0) {
    float alpha[2];
    named_barrier_arrive(kTurnBarrier, 256, consumer == 1);  // consumer 0 starts
    mbarrier_wait(q_full, 0);
    wait_keys(0);
    take_turn();
    warpgroup_fence();
    fence_accumulators(scores);
    issue_scores(0);
    pass_turn();
    warpgroup_wait<0>();
    fence_accumulators(scores);
    mbarrier_arrive(k_empty + 0);
    softmax(0, alpha);
    probabilities_to_registers();
    for (int64_t n = 1; n < n_blocks; ++n) {
      fence_accumulators(scores);
      fence_accumulators(o);
      wait_keys(n);
      wait_values(n - 1);
      fence_registers(p);
      take_turn();
      warpgroup_fence();
      issue_scores(n);
      issue_output(n - 1);
      pass_turn();
      warpgroup_wait<1>();  // S of tile n has landed; P V of tile n - 1 may still run
      fence_accumulators(scores);
      mbarrier_arrive(k_empty + n % kStages);
      softmax(n, alpha);
      warpgroup_wait<0>();
      fence_accumulators(o);
      mbarrier_arrive(v_empty + (n - 1) % kStages);
      rescale_output(alpha);
      probabilities_to_registers();
    }
    fence_accumulators(o);
    wait_values(n_blocks - 1);
    fence_registers(p);
    take_turn();
    warpgroup_fence();
    issue_output(n_blocks - 1);
    pass_turn();
    warpgroup_wait<0>();
    fence_accumulators(o);
    mbarrier_arrive(v_empty + (n_blocks - 1) % kStages);
  }

  // Epilogue: out = O / l, lse = max + log(l) (natural log); rows that saw no key: 0 and -inf.
  const int D = static_cast<int>(s.D);
  T* out = static_cast<T*>(args.out) + (b * s.Hq + h) * Tq * D;
  float* lse = args.lse + (b * s.Hq + h) * Tq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t row = m0 + warp_row0 + g + 8 * r;
    if (row >= Tq) continue;
    // (kScoreMods: dropout's 1 / (1 - p) on the kept probabilities, 1 without dropout)
    const float inv = l > 0.f ? (kScoreMods ? mods.keep_scale : 1.f) / l : 0.f;
#pragma unroll
    for (int db = 0; db < kDBlocks; ++db) {
      const int col = db * 8 + 2 * t;
      if (col < D) {
        *reinterpret_cast<uint32_t*>(out + row * D + col) =
            pack2<T>(o[4 * db + 2 * r] * inv, o[4 * db + 2 * r + 1] * inv);
      }
    }
    if (t == 0) lse[row] = l > 0.f ? row_max[r] * kLn2 + logf(l) : -INFINITY;
  }
#endif  // FUSEDLM_SM90A_DEVICE
}

template <typename T, int kHeadDim>
cudaError_t launch_fwd_sm90(const AttentionFwdArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  FwdParams params;
  std::memset(&params, 0, sizeof(params));
  params.args = args;
  // A layout TMA cannot describe is not an error: the sm_80 kernel reads it instead.
  if (encode_input(&params.q_map, s, args.q, s.Hq, s.Tq, kBlockM) != cudaSuccess ||
      encode_input(&params.k_map, s, args.k, s.Hkv, s.Tk, kBlockN) != cudaSuccess ||
      encode_input(&params.v_map, s, args.v, s.Hkv, s.Tk, kBlockN) != cudaSuccess) {
    return cudaErrorNotSupported;
  }
  constexpr size_t bytes = SharedLayout<kHeadDim>::kBytes;
  auto kernel = pick_instance(s, [](auto windowed, auto per_query, auto mods) {
    return attention_fwd_sm90_kernel<T, kHeadDim, decltype(windowed)::value,
                                     decltype(per_query)::value, decltype(mods)::value>;
  });
  FUSEDLM_RETURN_IF_ERROR(prepare_shared_memory(kernel, bytes));
  const int64_t blocks = ceil_div(s.Tq, kBlockM) * s.Hq * s.B;
  if (!fits_grid(s, blocks)) return cudaErrorInvalidValue;
  FUSEDLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, bytes, stream)(params);
  FUSEDLM_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

#ifndef FUSEDLM_WARP_EMULATION
cudaError_t encode_tile_map(CUtensorMap* map, DType dtype, const void* base,
                            const uint64_t (&dims)[4], const uint64_t (&strides_bytes)[3],
                            uint32_t box_rows) {
  // The driver's own type for the version asked for below (cudaTypedefs.h), so the call's
  // arguments cannot drift from the entry point's.
  using Encode = PFN_cuTensorMapEncodeTiled_v12000;
  // The driver entry point, looked up once (the extension does not link libcuda itself).
  static Encode encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      function = nullptr;
    }
    return reinterpret_cast<Encode>(function);
  }();
  if (encode == nullptr) {
    cudaGetLastError();  // the failed lookup is not an error of the launch that follows
    return cudaErrorNotSupported;
  }
  const cuuint64_t global_dims[4] = {dims[0], dims[1], dims[2], dims[3]};
  const cuuint64_t global_strides[3] = {strides_bytes[0], strides_bytes[1], strides_bytes[2]};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kSlabColumns), box_rows, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                            : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult result = encode(map, type, 4, const_cast<void*>(base), global_dims,
                                 global_strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorNotSupported;
}
#endif

// FUSEDLM_ATTENTION_SM90: unset or "1" takes the sm_90a kernel where it applies, "0" never (to
// compare the two paths on one GPU), "require" makes the forward fail where it does not apply
// (the GPU tests use it to prove which kernel ran).
static const char* sm90_setting() {
  const char* setting = std::getenv("FUSEDLM_ATTENTION_SM90");
  return setting == nullptr ? "1" : setting;
}

bool sm90_required() { return std::strcmp(sm90_setting(), "require") == 0; }

// Whether this build and device run the sm_90a kernel: compiled for sm_90a (FUSEDLM_SM90A_KERNELS
// from CMake), a compute capability 9.0 device, and not turned off.
bool sm90_enabled() {
#if defined(FUSEDLM_SM90A_KERNELS) || defined(FUSEDLM_WARP_EMULATION)
  if (std::strcmp(sm90_setting(), "0") == 0) return false;
  int device = 0;
  int major = 0;
  int minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // not an error of any launch: the sm_80 kernel runs instead
    return false;
  }
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

cudaError_t attention_fwd_sm90(const AttentionFwdArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  if (!valid_shape(s) || s.D > 128 || !sm90_enabled()) {
    return cudaErrorNotSupported;
  }
  return dispatch_half_types(s.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return s.D <= 64 ? launch_fwd_sm90<T, 64>(args, stream) : launch_fwd_sm90<T, 128>(args, stream);
  });
}

}  // namespace sm90
}  // namespace attention
}  // namespace fusedlm::cuda
