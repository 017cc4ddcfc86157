// Building blocks of the sm_80-class flash-attention kernels (attention_fwd.cu, attention_bwd.cu):
// 16-byte cp.async tile copies into padded shared memory, ldmatrix fragment loads and
// mma.sync.m16n8k16 (float16/bfloat16 in, float32 accumulate) warp-level GEMMs. They run on
// every GPU from Ampere on (sm_80, sm_86, sm_89, sm_90).
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"): lane = 4 * g + t (g = lane / 4, t = lane % 4).
//   A (16 x 16, row-major), 4 registers of 2 elements: a0 (row g, k 2t..2t+1), a1 (row g+8,
//     k 2t..), a2 (row g, k 8+2t..), a3 (row g+8, k 8+2t..).
//   B (16 x 8, k x n), 2 registers: b0 (k 2t..2t+1, col g), b1 (k 8+2t.., col g).
//   C (16 x 8, float32), 4 values: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, same cols).
// ldmatrix.x4 loads four 8 x 8 matrices; lanes 8i..8i+7 give the row addresses of matrix i and
// each lane receives (row g, cols 2t..2t+1) of every matrix (with .trans: rows 2t..2t+1 of
// column g), which is exactly one register of the fragments above.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "philox4x32.h"

namespace fusedlm::cuda::attention {

// Elements of padding after each shared-memory row: rows then start 16 bytes apart modulo 128,
// so the 8 row addresses of an ldmatrix hit 8 different 16-byte bank groups (no conflicts), for
// every head dim used here (32..256), and the 16-byte cp.async destinations stay aligned.
constexpr int kPad = 8;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#ifndef FUSEDLM_WARP_EMULATION  // tests/cuda_emulation supplies these for CPU threads instead

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared asynchronously; with valid == false it reads nothing and
// zero-fills the 16 bytes (src-size 0), which is how tiles are padded past T and D.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)),
               "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most kPending of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem))
               : "memory");
}

// c (16 x 8) += a (16 x 16) * b (16 x 8), float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x on the special-function unit (ex2.approx.ftz: ~2 ulp, results below 2^-126 flushed to
// 0), what exp2f becomes under --use_fast_math. Without that flag (this build keeps IEEE math
// for the norms) exp2f wraps each MUFU.EX2 in a range test and two predicated multiplies for
// denormal results: five instructions per softmax element instead of one, in the kernels' most
// instruction-bound loop. Probabilities under 2^-126 of a row whose largest is 1 change nothing.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // FUSEDLM_WARP_EMULATION

// Two floats rounded to T and packed into one 32-bit register, `lo` in the low half (the
// lower column index, as the fragments and little-endian memory want).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Accumulator fragments (C layout) of one warp's rows, as the A fragments of the next GEMM:
// the float32 scores/probabilities of 16 rows x (16 kChunks) columns -> T, in registers.
template <typename T, int kChunks>
__device__ __forceinline__ void accumulators_to_a_fragments(const float (&c)[2 * kChunks][4],
                                                            uint32_t (&a)[kChunks][4]) {
#pragma unroll
  for (int kc = 0; kc < kChunks; ++kc) {
    a[kc][0] = pack2<T>(c[2 * kc][0], c[2 * kc][1]);
    a[kc][1] = pack2<T>(c[2 * kc][2], c[2 * kc][3]);
    a[kc][2] = pack2<T>(c[2 * kc + 1][0], c[2 * kc + 1][1]);
    a[kc][3] = pack2<T>(c[2 * kc + 1][2], c[2 * kc + 1][3]);
  }
}

// Copies a (kRows, kCols) tile of a row-major global matrix (rows `row_stride` elements apart,
// columns contiguous) into shared memory with rows kCols + kPad apart, asynchronously (the
// caller commits the group). Rows >= rows_valid and columns >= cols_valid are zero-filled
// without being read; `fallback` is any valid global address given to the zero-filling copies.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride,
                                                int64_t rows_valid, int cols_valid,
                                                const T* fallback, int tid) {
  constexpr int kChunksPerRow = kCols / 8;  // 16-byte chunks
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kIters = (kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int chunk = tid + it * kThreads;
    if (kChunks % kThreads == 0 || chunk < kChunks) {
      const int row = chunk / kChunksPerRow;
      const int col = (chunk % kChunksPerRow) * 8;
      const bool valid = row < rows_valid && col < cols_valid;
      const T* source = valid ? gmem + row * row_stride + col : fallback;
      cp_async_16(smem + row * (kCols + kPad) + col, source, valid);
    }
  }
}

// acc[mt][nb] (16 x 8) += A[a_row0 + 16 mt + i][0:kK] . B[b_row0 + 8 nb + j][0:kK] for one warp:
// "rows times rows", A and B both row-major in shared memory (e.g. S = Q K^T, dP = dO V^T).
template <typename T, int kMTiles, int kNBlocks, int kK>
__device__ __forceinline__ void warp_gemm_rows_rows(float (&acc)[kMTiles][kNBlocks][4],
                                                    const T* sA, int a_stride, int a_row0,
                                                    const T* sB, int b_stride, int b_row0,
                                                    int lane) {
  static_assert(kNBlocks % 2 == 0 && kK % 16 == 0);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      ldmatrix_x4(a[mt],
                  sA + (a_row0 + 16 * mt + (lane & 15)) * a_stride + 16 * kk + (lane >> 4) * 8);
    }
#pragma unroll
    for (int np = 0; np < kNBlocks / 2; ++np) {
      // matrices: (rows 0-7, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 0-7), (rows 8-15, k 8-15)
      uint32_t b[4];
      ldmatrix_x4(b, sB + (b_row0 + 16 * np + (lane & 7) + ((lane >> 4) << 3)) * b_stride +
                         16 * kk + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc[mt][nb] (16 x 8) += A_mt (registers, 16 x 16 kChunks) . B[b_row0 + k][b_col0 + 8 nb + j]:
// A from registers, B row-major (k x n) in shared memory read transposed (e.g. O += P V,
// dQ += dS K).
template <typename T, int kMTiles, int kNBlocks, int kChunks>
__device__ __forceinline__ void warp_gemm_regs_rows(float (&acc)[kMTiles][kNBlocks][4],
                                                    const uint32_t (&a)[kMTiles][kChunks][4],
                                                    const T* sB, int b_stride, int b_row0,
                                                    int b_col0, int lane) {
  static_assert(kNBlocks % 2 == 0);
#pragma unroll
  for (int kc = 0; kc < kChunks; ++kc) {
#pragma unroll
    for (int np = 0; np < kNBlocks / 2; ++np) {
      // matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (b_row0 + 16 * kc + (lane & 15)) * b_stride + b_col0 + 16 * np +
                               (lane >> 4) * 8);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt][kc], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt][kc], b[2], b[3]);
      }
    }
  }
}

// acc[nb] (16 x 8) += sum over k < 16 kChunks of A[k][a_col0 + i] * B[k][b_col0 + 8 nb + j]:
// "columns times columns", both row-major (k x .) in shared memory, both read transposed
// (e.g. dV += P^T dO, dK += dS^T Q, where k runs over the query rows).
template <typename T, int kNBlocks, int kChunks>
__device__ __forceinline__ void warp_gemm_cols_cols(float (&acc)[kNBlocks][4], const T* sA,
                                                    int a_stride, int a_col0, const T* sB,
                                                    int b_stride, int b_col0, int lane) {
  static_assert(kNBlocks % 2 == 0);
#pragma unroll
  for (int kc = 0; kc < kChunks; ++kc) {
    // A^T fragment from the transposed matrices (k 0-7, m 0-7), (k 0-7, m 8-15),
    // (k 8-15, m 0-7), (k 8-15, m 8-15): registers a0..a3 of the A layout.
    uint32_t a[4];
    ldmatrix_x4_trans(a, sA + (16 * kc + (lane & 7) + ((lane >> 4) << 3)) * a_stride + a_col0 +
                             ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int np = 0; np < kNBlocks / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (16 * kc + (lane & 15)) * b_stride + b_col0 + 16 * np +
                               (lane >> 4) * 8);
      mma_16816<T>(acc[2 * np], a, b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// The head dim a kernel instance is compiled for: D rounded up to one of the tuned sizes
// (columns past D are zero-filled in shared memory and never written back).
inline int padded_head_dim(int64_t D) {
  return D <= 32 ? 32 : D <= 64 ? 64 : D <= 96 ? 96 : D <= 128 ? 128 : D <= 192 ? 192 : 256;
}

// The most dynamic shared memory one block may have on the current device: 227 KiB on H100,
// 163 KiB on A100, 99 KiB on sm_86/sm_89 (the launchers pick smaller tiles there).
inline cudaError_t max_shared_bytes(size_t* bytes) {
  int device = 0;
  FUSEDLM_RETURN_IF_ERROR(cudaGetDevice(&device));
  int value = 0;
  FUSEDLM_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  *bytes = static_cast<size_t>(value);
  return cudaSuccess;
}

// Raises the kernel's dynamic shared memory limit to `bytes` (needed above 48 KiB), or fails
// with cudaErrorInvalidConfiguration when the device has less than that per block.
template <typename Kernel>
cudaError_t prepare_shared_memory(Kernel kernel, size_t bytes) {
  size_t max_bytes = 0;
  FUSEDLM_RETURN_IF_ERROR(max_shared_bytes(&max_bytes));
  if (bytes > max_bytes) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Calls f(T{}) with T the CUDA element type of dtype (float16 or bfloat16 only).
template <typename F>
cudaError_t dispatch_half_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

// Element (b, h, 0, 0) of a (B, H, T, D) input.
template <typename T>
__device__ __forceinline__ const T* head_pointer(const AttentionInput& in, int64_t b, int64_t h) {
  return static_cast<const T*>(in.data) + b * in.batch_stride + h * in.head_stride;
}

// The shapes the launchers take: nonempty (empty ones are the caller's: zeros, -inf or empty
// results without a kernel), D a multiple of 8 up to 256, whole GQA groups, a window offset in
// [-Tq, Tk].
inline bool valid_shape(const AttentionShape& s) {
  return s.B > 0 && s.Hq > 0 && s.Hkv > 0 && s.Tq > 0 && s.Tk > 0 && s.D % 8 == 0 && s.D >= 8 &&
         s.D <= 256 && s.Hq % s.Hkv == 0 &&
         (!s.windowed || (s.window_offset >= -s.Tq && s.window_offset <= s.Tk));
}

// Whether a call has score modifiers (soft-capping, dropout): the kScoreMods instances, bounded
// ones (kWindowed) with the per-score code of both, which every other instance keeps out.
inline bool score_mods(const AttentionShape& s) { return s.softcap > 0 || s.dropout_p > 0; }

// Whether a call takes the bounded kernel instances (kWindowed): a sliding window, a key range
// (per-query ranges: the kPerQuery instances, which are bounded ones too) or score modifiers.
inline bool bounded(const AttentionShape& s) {
  return s.windowed || s.key_range != nullptr || score_mods(s);
}
inline bool per_query(const AttentionShape& s) {
  return s.key_range != nullptr && s.key_range_per_query;
}

// The kernel instance a call takes: `pick(windowed, per_query, score_mods)`, each flag a
// std::bool_constant, returns it (plain, bounded, per-query; the bounded and per-query ones
// with or without score modifiers).
template <typename Pick>
auto pick_instance(const AttentionShape& s, Pick&& pick) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (per_query(s)) return score_mods(s) ? pick(Yes{}, Yes{}, Yes{}) : pick(Yes{}, Yes{}, No{});
  if (bounded(s)) return score_mods(s) ? pick(Yes{}, No{}, Yes{}) : pick(Yes{}, No{}, No{});
  return pick(No{}, No{}, No{});
}

// The score modifiers' constants, worked out once per thread in the kScoreMods instances. (Handed
// to the kernels as a parameter instead, read from the constant bank, ptxas's spills of the
// D = 128 instances moved both ways and summed a little more: benchmarks/NOTES.md,
// thirty-fourth session.)
struct ScoreMods {
  float softcap_log2;         // softcap * log2(e): a capped score in log2 units is this * tanh
  float tanh_per_score;       // scale / softcap: tanh's argument per unit of q.k (0: no cap)
  bool dropout;
  uint32_t keep_threshold;    // a probability is kept iff its Philox word >= this
  float keep_scale;           // 1 / (1 - dropout_p) (1 without dropout)
  const int64_t* seed;         // AttentionShape::dropout_seed: read at each use (dropout_seed)
  uint64_t counters_per_row;  // ceil(Tk / 4): Philox counters per query row
};

__device__ __forceinline__ ScoreMods score_mods_of(const AttentionShape& s) {
  ScoreMods m;
  const bool capped = s.softcap > 0;
  m.softcap_log2 = capped ? static_cast<float>(s.softcap) * kLog2e : 0.f;
  m.tanh_per_score = capped ? static_cast<float>(s.scale / s.softcap) : 0.f;
  m.dropout = s.dropout_p > 0;
  m.keep_threshold = dropout_threshold(s.dropout_p);
  m.keep_scale = static_cast<float>(1.0 / (1.0 - s.dropout_p));
  m.seed = s.dropout_seed;
  m.counters_per_row = static_cast<uint64_t>((s.Tk + 3) / 4);
  return m;
}

// A score q.k in log2 units: times scale * log2(e) or, kScoreMods with a cap, soft-capped:
// softcap * tanh(scale * q.k / softcap) * log2(e). With a cap, *tanh_value gets the tanh (the
// backward's 1 - tanh^2), else 0.
template <bool kScoreMods>
__device__ __forceinline__ float score_log2(float qk, float scale_log2, const ScoreMods& mods,
                                            float* tanh_value = nullptr) {
  if constexpr (kScoreMods) {
    if (mods.tanh_per_score != 0.f) {
      const float tanh_qk = tanhf(qk * mods.tanh_per_score);
      if (tanh_value != nullptr) *tanh_value = tanh_qk;
      return mods.softcap_log2 * tanh_qk;
    }
  }
  if (tanh_value != nullptr) *tanh_value = 0.f;
  return qk * scale_log2;
}

// The dropout seed (device memory: a CUDA graph's replays may draw it anew), loaded where it is
// used. A copy of the kernel parameter's pointer costs no register (ptxas reads it from the
// parameter bank again); a seed loaded once and held across the key loop costs two, and the
// sm_80 dK/dV kernels' spills grew by 80-90 bytes when it was. The load is volatile so that it
// is not hoisted into that register either (one L1 hit beside Philox's ten rounds).
__device__ __forceinline__ uint64_t dropout_seed(const ScoreMods& mods) {
#ifdef __CUDA_ARCH__
  uint64_t seed;
  asm volatile("ld.global.nc.u64 %0, [%1];" : "=l"(seed) : "l"(mods.seed));
  return seed;
#else
  return static_cast<uint64_t>(*mods.seed);
#endif
}

// Whether the probabilities of keys col and col + 1 (col even: one Philox counter holds both)
// of flat query row `row` ((b * Hq + h) * Tq + i) are kept.
__device__ __forceinline__ void dropout_keep_pair(const ScoreMods& mods, int64_t row, int64_t col,
                                                  bool* keep0, bool* keep1) {
  uint32_t words[4];
  philox4x32(dropout_seed(mods),
             static_cast<uint64_t>(row) * mods.counters_per_row + static_cast<uint64_t>(col) / 4,
             words);
  const bool upper = (col & 2) != 0;  // col % 4 is 0 or 2
  *keep0 = (upper ? words[2] : words[0]) >= mods.keep_threshold;
  *keep1 = (upper ? words[3] : words[1]) >= mods.keep_threshold;
}

// The keep mask of one thread's elements of a C-layout row (keys col0 + 8 nb + j, j = 0, 1,
// col0 even) of flat query row `row`: bit 2 nb + j. A loop not unrolled, so that one Philox
// state is live at a time: unrolled, the generator's calls interleave and the kernels spill.
template <int kNBlocks>
__device__ __forceinline__ uint32_t dropout_row_mask(const ScoreMods& mods, int64_t row,
                                                     int64_t col0) {
  static_assert(kNBlocks <= 16);
  uint32_t mask = 0;
#pragma unroll 1
  for (int nb = 0; nb < kNBlocks; ++nb) {
    bool keep0, keep1;
    dropout_keep_pair(mods, row, col0 + 8 * nb, &keep0, &keep1);
    mask |= (static_cast<uint32_t>(keep0) | static_cast<uint32_t>(keep1) << 1) << (2 * nb);
  }
  return mask;
}

// Whether the probability of key col of flat query row `row` is kept.
__device__ __forceinline__ bool dropout_keep(const ScoreMods& mods, int64_t row, int64_t col) {
  uint32_t words[4];
  philox4x32(dropout_seed(mods),
             static_cast<uint64_t>(row) * mods.counters_per_row + static_cast<uint64_t>(col) / 4,
             words);
  const int word = static_cast<int>(col & 3);
  const uint32_t value = word == 0 ? words[0] : word == 1 ? words[1] : word == 2 ? words[2]
                                                                                 : words[3];
  return value >= mods.keep_threshold;
}

// Batch row b's keys [lo, hi): its key range clamped to the sequence, or all Tk keys. Not for
// per-query ranges (row_key_bounds).
struct KeyBounds {
  int64_t lo;
  int64_t hi;
};

__device__ __forceinline__ KeyBounds key_bounds(const AttentionShape& s, int64_t b) {
  if (s.key_range == nullptr) return KeyBounds{0, s.Tk};
  const int64_t end = s.key_range[2 * b + 1], start = s.key_range[2 * b];
  const int64_t hi = end < 0 ? 0 : (end > s.Tk ? s.Tk : end);
  const int64_t lo = start < 0 ? 0 : (start > hi ? hi : start);
  return KeyBounds{lo, hi};
}

// Query `row`'s keys [lo, hi): kPerQuery, its own key range (clamped to the sequence; none past
// Tq), else its batch row's `keys`. kPerQuery is a template parameter of the kernels (their
// per-query instances), so the other bounded instances keep their registers.
template <bool kPerQuery>
__device__ __forceinline__ KeyBounds row_key_bounds(const AttentionShape& s, const KeyBounds& keys,
                                                    int64_t b, int64_t row) {
  if constexpr (!kPerQuery) return keys;
  if (row >= s.Tq) return KeyBounds{0, 0};
  // Clamped in int32 (Tk fits: fits_grid): in the forward's unrolled mask loop, int64 clamps of
  // the rows' ranges cost the 128-row D = 128 tile ~50 more bytes of spills.
  const int32_t* range = s.key_range + 2 * (b * s.Tq + row);
  const int hi = std::min(std::max(range[1], 0), static_cast<int>(s.Tk));
  const int lo = std::min(std::max(range[0], 0), hi);
  return KeyBounds{lo, hi};
}

// The keys of a tile of query rows: no row sees a key outside `outer` (its loops' bounds), and
// every row of the sequence sees all of `inner` as far as the causal / window limits let it
// (tiles inside it need no key-range mask). One range for the batch row: both are it.
struct TileKeyBounds {
  KeyBounds outer;
  KeyBounds inner;
};

// TileKeyBounds of the query rows [m0, m0 + rows) of batch row b, computed by each warp alone
// (its lanes split the rows; shuffles combine them), so no shared memory or barrier is needed.
// Rows past Tq and rows with no key widen nothing; a row of the sequence with no key leaves
// no tile unmasked.
template <bool kPerQuery>
__device__ __forceinline__ TileKeyBounds tile_key_bounds(const AttentionShape& s,
                                                         const KeyBounds& keys, int64_t b,
                                                         int64_t m0, int rows, int lane) {
  if constexpr (!kPerQuery) return TileKeyBounds{keys, keys};
  // int32: Tk fits (fits_grid), and the shuffles move one register.
  const int tk = static_cast<int>(s.Tk);
  int outer_lo = tk, outer_hi = 0, inner_lo = 0, inner_hi = tk;
  for (int r = lane; r < rows; r += 32) {
    const int64_t row = m0 + r;
    if (row >= s.Tq) break;
    const KeyBounds own = row_key_bounds<true>(s, keys, b, row);
    if (own.lo < own.hi) {
      outer_lo = std::min(outer_lo, static_cast<int>(own.lo));
      outer_hi = std::max(outer_hi, static_cast<int>(own.hi));
      inner_lo = std::max(inner_lo, static_cast<int>(own.lo));
      inner_hi = std::min(inner_hi, static_cast<int>(own.hi));
    } else {
      inner_lo = tk;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    outer_lo = std::min(outer_lo, __shfl_xor_sync(0xffffffffu, outer_lo, offset));
    outer_hi = std::max(outer_hi, __shfl_xor_sync(0xffffffffu, outer_hi, offset));
    inner_lo = std::max(inner_lo, __shfl_xor_sync(0xffffffffu, inner_lo, offset));
    inner_hi = std::min(inner_hi, __shfl_xor_sync(0xffffffffu, inner_hi, offset));
  }
  return TileKeyBounds{KeyBounds{outer_lo, outer_hi}, KeyBounds{inner_lo, inner_hi}};
}

// tile_key_bounds for a whole CTA: warp 0 reduces the rows and hands the bounds to every warp
// through `scratch` (4 int32 of shared memory) at a __syncthreads that every thread must reach.
// (Every warp reducing alone puts the shuffle loop in each warp's code, which cost the 128-row
// D = 128 forwards spills: sm_80 124 -> 72 bytes of spill stores, sm_90a 108 -> 0; ptxas.)
template <bool kPerQuery>
__device__ __forceinline__ TileKeyBounds cta_tile_key_bounds(const AttentionShape& s,
                                                             const KeyBounds& keys, int64_t b,
                                                             int64_t m0, int rows, int* scratch) {
  if constexpr (!kPerQuery) return TileKeyBounds{keys, keys};
  if (threadIdx.x < 32) {
    const TileKeyBounds bounds = tile_key_bounds<true>(s, keys, b, m0, rows, threadIdx.x);
    if (threadIdx.x == 0) {
      scratch[0] = static_cast<int>(bounds.outer.lo);
      scratch[1] = static_cast<int>(bounds.outer.hi);
      scratch[2] = static_cast<int>(bounds.inner.lo);
      scratch[3] = static_cast<int>(bounds.inner.hi);
    }
  }
  __syncthreads();
  return TileKeyBounds{KeyBounds{scratch[0], scratch[1]}, KeyBounds{scratch[2], scratch[3]}};
}

// 4 int32 of shared memory for cta_tile_key_bounds in a tile's padding: the kPad elements after
// the first row of a (rows, kCols + kPad) tile, which no tile load writes and no ldmatrix reads
// (so the kernels' shared-memory sizes, and the tiles that fit a device, stay as they are).
template <int kCols, typename T>
__device__ __forceinline__ int* padding_scratch(T* tile) {
  static_assert(kPad * sizeof(T) >= 4 * sizeof(int) && (kCols * sizeof(T)) % 16 == 0);
  return reinterpret_cast<int*>(tile + kCols);
}

// Whether some row of the query tile [m0, m0 + block_m) may not see every key of the key tile
// [n0, n0 + block_n) its loop reaches: past Tq or Tk, the causal diagonal, (kWindowed) the
// sliding window's edge or a key range's edge.
template <bool kWindowed>
__device__ __forceinline__ bool tile_needs_mask(const AttentionShape& s, const KeyBounds& inner,
                                                int64_t m0, int64_t block_m, int64_t n0,
                                                int64_t block_n) {
  return m0 + block_m > s.Tq || n0 + block_n > s.Tk ||
         (s.causal && n0 + block_n - 1 > m0 + s.causal_offset) ||
         (kWindowed && ((s.windowed && n0 < m0 + block_m - 1 + s.window_offset) ||
                        n0 < inner.lo || n0 + block_n > inner.hi));
}

// The columns [*lo, *hi) of the key tile [n0, n0 + block_n) that query `row` sees, relative to
// n0: inside the row's keys (row_key_bounds), up to the causal limit, from the sliding window's
// start.
// Worked out once per row in int64 so the per-element test is two int32 compares (an int64
// test per element costs the sm_80 forward's 128-row tiles registers: spills).
__device__ __forceinline__ void visible_columns(const AttentionShape& s, const KeyBounds& keys,
                                                int64_t row, int64_t n0, int block_n, int* lo,
                                                int* hi) {
  int64_t end = keys.hi;
  if (s.causal) end = std::min<int64_t>(end, row + s.causal_offset + 1);
  const int64_t begin = std::max<int64_t>(keys.lo, s.windowed ? row + s.window_offset : 0);
  *hi = static_cast<int>(std::min<int64_t>(std::max<int64_t>(end - n0, 0), block_n));
  *lo = static_cast<int>(std::min<int64_t>(std::max<int64_t>(begin - n0, 0), block_n));
}

// The end (exclusive) of the key tiles (of `block_n` keys) the query tile [m0, m0 + block_m)
// sees: all of them, or (causal) up to its last row's last key and (kWindowed) up to its rows'
// last key (`outer`: a key range's end, clamped to Tk). Its first: first_key_tile.
template <bool kWindowed>
__device__ __forceinline__ int64_t key_tile_end(const AttentionShape& s, const KeyBounds& outer,
                                                int64_t m0, int64_t block_m, int64_t block_n) {
  int64_t end = ceil_div(s.Tk, block_n);
  if (s.causal) {
    const int64_t last_visible = std::min(m0 + block_m, s.Tq) - 1 + s.causal_offset;
    end = last_visible < 0 ? 0 : std::min(end, last_visible / block_n + 1);
  }
  if (kWindowed) end = std::min(end, ceil_div(outer.hi, block_n));
  return end;
}

// The first key tile (of `block_n` keys) a query tile starting at row m0 sees: the tile of its
// first row's first visible key (past the sliding window's start and the key range's).
__device__ __forceinline__ int64_t first_key_tile(const AttentionShape& s, const KeyBounds& keys,
                                                  int64_t m0, int64_t block_n) {
  const int64_t window_start = s.windowed ? std::max<int64_t>(0, m0 + s.window_offset) : 0;
  return std::max<int64_t>(window_start, keys.lo) / block_n;
}

// Query tiles (of `block_m` rows) that see a key of the tile [n0, n0 + block_n): from the first
// whose last row is past the causal limit's start to (sliding window) the last whose first row
// is before the window's end; empty when first >= end. kWindowed: whether the window is taken.
template <bool kWindowed>
__device__ __forceinline__ void query_tile_range(const AttentionShape& s, int64_t n0,
                                                 int64_t block_m, int64_t block_n,
                                                 int64_t* first, int64_t* end) {
  *first = s.causal ? std::max<int64_t>(0, n0 - s.causal_offset) / block_m : 0;
  *end = ceil_div(s.Tq, block_m);
  if (kWindowed && s.windowed) {
    const int64_t last_row = n0 + block_n - 1 - s.window_offset;  // the last query seeing a key
    *end = last_row < 0 ? 0 : std::min<int64_t>(*end, last_row / block_m + 1);
  }
}

// The launches use one-dimensional grids (2^31 - 1 blocks, unlike the 65535 of y and z, so any
// batch x heads fits): the block count must fit, and so must T in int32.
inline bool fits_grid(const AttentionShape& s, int64_t blocks) {
  constexpr int64_t kMaxInt = 2147483647;
  return s.Tq <= kMaxInt && s.Tk <= kMaxInt && blocks <= kMaxInt;
}

// Splits a one-dimensional block index into (tile, head, batch), tile fastest: the CTAs that run
// together work on one head's tiles and share its K/V (or Q/dO) in L2.
struct BlockCoordinates {
  int64_t tile;
  int64_t head;
  int64_t batch;
};

__device__ __forceinline__ BlockCoordinates block_coordinates(int64_t tiles, int64_t heads) {
  const int64_t index = blockIdx.x;
  return BlockCoordinates{index % tiles, (index / tiles) % heads, index / (tiles * heads)};
}

}  // namespace fusedlm::cuda::attention
