// LayerNorm and RMSNorm over the last dimension on the CPU, statistics in
// float32 (float64 for float64 input).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fusedlm::cpu {

// x:      (M, N)  any dtype of float64/float32/bfloat16/float16
// weight: (N) or None, dtype of x or float32
// bias:   (N) or None, dtype of weight
// returns y: (M, N) dtype of x; mean, rstd: (M) float32 (float64 for float64 x)
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);

// grad_y: (M, N); x, mean, rstd, weight as in layer_norm_fwd.
// returns dx: (M, N) dtype of x; dweight: (N) dtype of weight or None; dbias: (N) or None,
//         in weight's dtype, or float32 (float64 for float64 x) when there is no weight
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool has_bias);

// x: (M, N); weight: (N) or None. returns y: (M, N), rstd: (M) float32 (float64 for float64 x)
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                double eps);

// returns dx: (M, N) dtype of x; dweight: (N) dtype of weight or None
std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight);

}  // namespace fusedlm::cpu
