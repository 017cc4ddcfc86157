// The raw-pointer launchers of the CUDA kernels in csrc/cuda: the whole interface between the
// torch-facing binding layer (csrc/bindings.cpp) and the kernels. Torch-free: only the CUDA
// runtime API, so the kernels compile without torch (the fusedlm_cuda_kernels CMake target).
//
// Conventions: every launcher runs on the stream it is given (the caller's current stream),
// checks the error of every launch it makes and returns the first one (cudaSuccess otherwise);
// it never synchronizes. Tensors are passed as contiguous device pointers; shapes are in the
// comments, as everywhere in csrc/. Validation (devices, dtypes, shapes, contiguity) is the
// caller's: see csrc/checks.h and csrc/bindings.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fusedlm::cuda {

// Element types the kernels accept.
enum class DType : int8_t { kFloat64, kFloat32, kFloat16, kBFloat16 };

// ---- LayerNorm / RMSNorm (norm.cu) ------------------------------------------------------------
//
// x dtype float64/float32/float16/bfloat16; "param" dtype (of weight and bias) is x's dtype or,
// for float16/bfloat16 x, float32. float64 x needs float64 params. Statistics (mean, rstd) and
// all accumulation are float32 (float64 for float64 x): the "acc" dtype.

struct NormFwdArgs {
  const void* x;       // (M, N) x dtype
  const void* weight;  // (N) param dtype, or nullptr
  const void* bias;    // (N) param dtype, or nullptr (always nullptr for RMSNorm)
  void* y;             // (M, N) x dtype
  void* mean;          // (M) acc dtype; nullptr for RMSNorm
  void* rstd;          // (M) acc dtype
  int64_t M;
  int64_t N;           // >= 1
  double eps;
  DType x_dtype;
  DType param_dtype;   // x_dtype when there is neither weight nor bias
  bool rms;            // RMSNorm (no mean, no bias) instead of LayerNorm
};

// y = (x - mean) * rstd * weight + bias per row (RMSNorm: x * rstd * weight), with
// rstd = 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(mean(x^2) + eps)).
cudaError_t norm_fwd(const NormFwdArgs& args, cudaStream_t stream);

// Allocates `bytes` of device memory that stays valid for the kernels the launcher enqueues on
// its stream (a caching-allocator block freed after the launch is fine); nullptr on failure.
using WorkspaceAlloc = void* (*)(size_t bytes, void* context);

struct NormBwdArgs {
  const void* grad_y;  // (M, N) x dtype
  const void* x;       // (M, N) x dtype
  const void* mean;    // (M) acc dtype; nullptr for RMSNorm
  const void* rstd;    // (M) acc dtype
  const void* weight;  // (N) param dtype, or nullptr
  void* dx;            // (M, N) x dtype
  void* dweight;       // (N) param dtype, or nullptr when not wanted (must be nullptr without weight)
  void* dbias;         // (N) param dtype with a weight, acc dtype without; or nullptr when not wanted
  int64_t M;
  int64_t N;           // >= 1
  DType x_dtype;
  DType param_dtype;   // x_dtype when there is no weight
  bool rms;
  // Scratch for the per-block partial sums of dweight / dbias, requested at most once per call.
  WorkspaceAlloc alloc;
  void* alloc_context;
};

// dx, and dweight = sum over rows of grad_y * xhat, dbias = sum over rows of grad_y, reduced in
// two deterministic stages (per-block partial sums into the workspace, then a final pass).
cudaError_t norm_bwd(const NormBwdArgs& args, cudaStream_t stream);

// ---- attention (attention_fwd.cu, attention_bwd.cu) --------------------------------------------
//
// Flash attention on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async: sm_80 and newer),
// float16/bfloat16 in, float32 accumulation and statistics. Key j is visible to query i iff
// (!causal || j <= i + causal_offset) && (!windowed || j >= i + window_offset) and, with a key
// range, key_range[b][0] <= j < key_range[b][1] in batch row b (padded batches) or, per query,
// key_range[b][i][0] <= j < key_range[b][i][1] (packed documents). A query row that sees no key
// gets out = 0, lse = -inf. Soft-capping and dropout (AttentionShape) as
// fusedlm.reference.attention_fwd / attention_bwd define them. On Hopper (sm_90a kernels)
// D <= 128 runs the wgmma/TMA kernels, with every mask and score modifier, D > 128 the sm_80
// ones.
//
// Inputs are read in place through their batch, head and token strides (in elements): the
// head dim must be contiguous, D a multiple of 8 (1..256), every stride a multiple of 8 and the
// base pointer 16-byte aligned (each row is fetched with 16-byte copies). The caller copies or
// pads what does not meet that (csrc/bindings.cpp). T and the block counts fit in int32.

// A (B, H, T, D) input: base pointer and its batch, head and token strides in elements.
struct AttentionInput {
  const void* data;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t token_stride;
};

struct AttentionShape {
  int64_t B;
  int64_t Hq;
  int64_t Hkv;            // Hq % Hkv == 0: query head h reads kv head h / (Hq / Hkv)
  int64_t Tq;
  int64_t Tk;
  int64_t D;              // multiple of 8, <= 256
  double scale;           // multiplies q . k
  bool causal;
  int64_t causal_offset;  // Tk - Tq for bottom-right alignment, 0 for top-left
  bool windowed;          // sliding window: keys before i + window_offset are hidden
  int64_t window_offset;  // in [-Tq, Tk] (the caller clamps; past that it hides all or none)
  // (B, 2) int32 [start, end) of each batch row's keys (the rest is padding), or with
  // key_range_per_query (B, Tq, 2) of each query row's (packed documents), device memory; or
  // nullptr for all Tk keys. Any values: the kernels clamp them to [0, Tk].
  const int32_t* key_range;
  bool key_range_per_query;
  DType dtype;            // kFloat16 or kBFloat16
  // Score modifiers (score_mods: the kScoreMods kernel instances), both 0 for none:
  double softcap;         // > 0: each score s = scale * q.k becomes softcap * tanh(s / softcap)
  double dropout_p;  // in [0, 1): probabilities dropped after the softmax (lse keeps them),
                     // the rest scaled by 1 / (1 - dropout_p); the Philox stream of
                     // csrc/philox4x32.h keyed by the 64 bits of *dropout_seed decides which.
  // (1) int64 in device memory, read by the kernels (nullptr without dropout): a seed drawn on
  // the device, so that a captured CUDA graph draws a new one, and so a new mask, each replay.
  const int64_t* dropout_seed;
};

struct AttentionFwdArgs {
  AttentionShape shape;
  AttentionInput q;  // (B, Hq, Tq, D)
  AttentionInput k;  // (B, Hkv, Tk, D)
  AttentionInput v;  // (B, Hkv, Tk, D)
  void* out;         // (B, Hq, Tq, D) contiguous, dtype
  float* lse;        // (B, Hq, Tq) contiguous, natural log
  // Scratch for the float32 partial outputs when the keys are split over CTAs (few query rows:
  // decoding), requested at most once per call; nullptr: never split.
  WorkspaceAlloc alloc;
  void* alloc_context;
};

// out = softmax(q k^T * scale) v per (batch, query head), and its logsumexp.
cudaError_t attention_fwd(const AttentionFwdArgs& args, cudaStream_t stream);

// How attention_fwd runs a call with few query rows (decoding with a KV cache), for tests and
// benchmarks: the shape the kernels see once the query heads of a GQA group are packed into rows
// (one query row, see attention_fwd.cu), and how many CTAs split each query tile's keys (1: none).
// FUSEDLM_ATTENTION_DECODE=0 turns both off.
struct AttentionFwdPlan {
  AttentionShape shape;
  bool heads_packed;
  int key_splits;
};
AttentionFwdPlan attention_fwd_plan(const AttentionFwdArgs& args, int sm_count);

struct AttentionBwdArgs {
  AttentionShape shape;
  AttentionInput q;         // (B, Hq, Tq, D)
  AttentionInput k;         // (B, Hkv, Tk, D)
  AttentionInput v;         // (B, Hkv, Tk, D)
  AttentionInput out;       // (B, Hq, Tq, D) as returned by attention_fwd
  AttentionInput grad_out;  // (B, Hq, Tq, D)
  const float* lse;         // (B, Hq, Tq) contiguous, as returned by attention_fwd
  const float* grad_lse;    // (B, Hq, Tq) contiguous: the gradient of lse, or nullptr (unused)
  void* dq;                 // (B, Hq, Tq, D) contiguous, dtype
  void* dk;                 // (B, Hkv, Tk, D) contiguous, dtype; summed over the query heads
  void* dv;                 // (B, Hkv, Tk, D) contiguous, dtype;   that share each kv head
  // Deterministic: dq by a second kernel that recomputes the probabilities (no atomics, about
  // 1.4x the backward's FLOPs); otherwise dq is accumulated with float32 atomics.
  bool deterministic;
  // Scratch (delta = rowsum(grad_out * out), the float32 dq accumulator when not
  // deterministic, and the query extents of per-query key ranges), requested at most three
  // times per call.
  WorkspaceAlloc alloc;
  void* alloc_context;
};

// dq, dk, dv of attention_fwd (the flash-attention backward: probabilities recomputed from lse).
cudaError_t attention_bwd(const AttentionBwdArgs& args, cudaStream_t stream);

// ---- AdamW (adamw.cu) -------------------------------------------------------------------------

// One parameter of a multi-tensor AdamW step; every pointer addresses `numel` contiguous elements.
struct AdamWTensor {
  void* param;            // (numel) param dtype
  void* grad;             // (numel) param dtype; overwritten with the unscaled grad when grad_scale
  void* exp_avg;          // (numel) state dtype
  void* exp_avg_sq;       // (numel) state dtype
  void* max_exp_avg_sq;   // (numel) state dtype when amsgrad, else nullptr
  float* master;          // (numel) float32 master weights, or nullptr (then every tensor has none)
  int64_t numel;
  double step;            // the step count after this step's increment, when step_ptr is nullptr
  const float* step_ptr;  // () float32 device step count (after the increment), or nullptr
};

struct AdamWHyper {
  double lr;
  const float* lr_ptr;      // () float32 device learning rate that replaces lr, or nullptr
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool amsgrad;
  bool maximize;
  const float* grad_scale;  // () float32 device: grads are divided by it (and stored back), or nullptr
  const float* found_inf;   // () float32 device: when nonzero the step changes nothing, or nullptr
};

// One AdamW step (torch.optim.AdamW's arithmetic) over `count` tensors that share param_dtype and
// state_dtype (the param's dtype or float32) and either all have master weights or none (master
// weights: 16-bit params with float32 states; the update runs on the master copy and the param
// gets its rounding). Each tensor's step count is *step_ptr when set, else step. Computed in
// float32 (float64 for float64 params), in a handful of launches of one multi-tensor kernel.
cudaError_t adamw_step(DType param_dtype, DType state_dtype, const AdamWTensor* tensors,
                       int64_t count, const AdamWHyper& hyper, cudaStream_t stream);

}  // namespace fusedlm::cuda
