// Gated linear units, act(gate) * up, on the CPU, computed in float32 (float64 for float64
// inputs): SwiGLU (act = silu) and GeGLU (act = gelu, exact or tanh-approximated).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fusedlm::cpu {

// The gate's activation:
//   silu       g * sigmoid(g)
//   gelu       g * Phi(g), Phi the standard normal CDF (torch's F.gelu, approximate="none")
//   gelu_tanh  0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3)
//              (F.gelu(approximate="tanh"))
enum class GluActivation { silu, gelu, gelu_tanh };

// gate, up: (N, I) any strides, one float dtype
// returns (N, I) contiguous, their dtype: act(gate) * up
at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up, GluActivation activation);

// grad_out: (N, I) any strides, the dtype of gate; gate, up: as in glu_fwd
// returns dgate, dup: (N, I) contiguous, gate's dtype:
//   dgate = grad_out * up * act'(gate), dup = grad_out * act(gate)
std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                           const at::Tensor& up, GluActivation activation);

}  // namespace fusedlm::cpu
