// Cross-entropy over class logits on the CPU, in float32 (float64 for float64 logits).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fusedlm::cpu {

// logits: (N, V) any strides, float64/float32/bfloat16/float16
// target: (N) int64 contiguous
// returns loss, row_max, log_sum: (N) float32 (float64 for float64 logits); loss is
//   (1 - s) * (row_max - x[target]) + s * (row_max - mean(x)) + log_sum + z_loss * lse^2, 0
//   where target is ignore_index; lse (logsumexp) = row_max + log_sum. A target outside [0, V) that is not
//   ignore_index raises (c10::IndexError, as torch's CPU cross_entropy does).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                                 const at::Tensor& target,
                                                                 int64_t ignore_index,
                                                                 double label_smoothing,
                                                                 double z_loss);

// grad_loss: (N) any stride (0 for a reduced loss), dtype of row_max
// logits, target, row_max, log_sum: as in and from cross_entropy_fwd
// out: (N, V) contiguous, dtype of logits, or none; may be logits itself (each row is read
//   whole before it is written): the gradient then replaces the logits
// returns dlogits (out, or a new tensor): (N, V) contiguous, dtype of logits:
//   grad_loss * ((1 + 2 z_loss lse) softmax(x) - (1 - s) onehot(target) - s / V), 0 on
//   ignored rows
at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& row_max,
                             const at::Tensor& log_sum, int64_t ignore_index,
                             double label_smoothing, const std::optional<at::Tensor>& out,
                             double z_loss);

}  // namespace fusedlm::cpu
