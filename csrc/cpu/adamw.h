// Multi-tensor AdamW step on the CPU: one call updates a whole parameter list.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fusedlm::cpu {

// All lists have one entry per parameter (max_exp_avg_sqs only when amsgrad,
// otherwise empty). Tensor i of every list has the same shape; each tensor is
// contiguous. params/grads: float64, float32, bfloat16 or float16 (grads dtype
// of params); states: float32, or the param's dtype. steps[i] is the step
// count of param i after this step's increment (1 on the first step).
// Updates params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs in place with
// torch.optim.AdamW's arithmetic (decoupled weight decay, bias correction),
// computed in float32 (float64 for float64 params).
void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize);

}  // namespace fusedlm::cpu
