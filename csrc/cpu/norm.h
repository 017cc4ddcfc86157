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

// The residual add fused in front of the norms: h = x + residual, rounded once to
// residual's dtype, is normalized and returned.
// x:        (M, N) dtype of residual, or bfloat16/float16 beside a float32 residual
// residual: (M, N) float64/float32/bfloat16/float16
// weight, bias as in layer_norm_fwd, against residual's dtype
// returns y, h: (M, N) dtype of residual; mean, rstd: (M) float32 (float64 for float64)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);

// grad_y: (M, N); grad_h: (M, N) or None (zero); h, mean, rstd, weight from add_layer_norm_fwd.
// returns dh: (M, N) dtype of h, the gradient of both x and residual (the norm's plus grad_h,
//         rounded once); dweight, dbias as layer_norm_bwd
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> add_layer_norm_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias);

// returns y, h: (M, N) dtype of residual; rstd: (M)
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    double eps);

// returns dh: (M, N) dtype of h; dweight: (N) dtype of weight or None
std::tuple<at::Tensor, std::optional<at::Tensor>> add_rms_norm_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight);

}  // namespace fusedlm::cpu
