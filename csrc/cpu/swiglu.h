// SwiGLU, silu(gate) * up, on the CPU, computed in float32 (float64 for float64 inputs).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fusedlm::cpu {

// gate, up: (N, I) any strides, one float dtype
// returns (N, I) contiguous, their dtype: silu(gate) * up = gate * sigmoid(gate) * up
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);

// grad_out: (N, I) any strides, the dtype of gate; gate, up: as in swiglu_fwd
// returns dgate, dup: (N, I) contiguous, gate's dtype:
//   dgate = grad_out * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))),
//   dup = grad_out * silu(gate)
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                              const at::Tensor& up);

}  // namespace fusedlm::cpu
