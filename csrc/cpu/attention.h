// Flash-attention (tiled, online softmax) on the CPU. Memory is O(T) per
// (batch, head): no T x T score matrix is ever materialised.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fusedlm::cpu {

// Key j is visible to query i iff (!causal || j <= i + causal_offset) and
// (!window_offset || j >= i + *window_offset) (local / sliding-window attention) and, given
// key_range (B, 2) int32 contiguous, key_range[b][0] <= j < key_range[b][1] in batch row b
// (padded batches: the keys outside the range are padding).
//   causal_offset = Tk - Tq  -> bottom-right alignment (FlashAttention, fusedlm.attention)
//   causal_offset = 0        -> top-left alignment (torch SDPA is_causal)
//   window_offset = Tk - Tq - (W - 1) with causal -> each query sees its last W keys
// A query row that sees no key gets out = 0 and lse = -inf.
// softcap > 0 caps each score s = scale * q.k at softcap * tanh(s / softcap) before the mask
// and the softmax (Gemma 2's attn_logit_softcapping); 0: no capping.
// dropout_p in [0, 1) drops each probability after the softmax with probability dropout_p and
// scales the rest by 1 / (1 - dropout_p), by the Philox stream keyed by dropout_seed's 64 bits
// (cpu/philox.h: the same elements as the reference and the Triton kernels); lse stays the
// softmax's.
//
// q:   (B, Hq, Tq, D)   any strides
// k:   (B, Hkv, Tk, D)  any strides, Hq % Hkv == 0
// v:   (B, Hkv, Tk, D)  any strides
// returns out: (B, Hq, Tq, D) contiguous, dtype of q
//         lse: (B, Hq, Tq) contiguous, float32 (float64 when q is float64), natural log
// dtypes: float64, float32, bfloat16, float16 (low precision computed in float32).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale, bool causal,
                                                 int64_t causal_offset,
                                                 std::optional<int64_t> window_offset,
                                                 const std::optional<at::Tensor>& key_range,
                                                 double softcap = 0.0, double dropout_p = 0.0,
                                                 int64_t dropout_seed = 0);

// grad_out: (B, Hq, Tq, D) any strides; out, lse as returned by attention_fwd; grad_lse:
// (B, Hq, Tq) the gradient of lse, or none (lse unused); softcap and dropout as the forward's.
// returns dq: (B, Hq, Tq, D), dk: (B, Hkv, Tk, D), dv: (B, Hkv, Tk, D), contiguous,
//         dtypes of q, k, v. dk/dv sum over the Hq / Hkv query heads sharing a kv head.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    int64_t causal_offset, std::optional<int64_t> window_offset,
    const std::optional<at::Tensor>& key_range,
    const std::optional<at::Tensor>& grad_lse, double softcap = 0.0, double dropout_p = 0.0,
    int64_t dropout_seed = 0);

}  // namespace fusedlm::cpu
