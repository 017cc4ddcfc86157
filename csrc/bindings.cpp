// The only PYBIND11_MODULE of fusedlm._C. Each op's entry point validates every tensor it
// hands a kernel (device, dtype, rank, shape; see checks.h) and dispatches on the device to
// the CPU kernel (csrc/cpu) or, in a CUDA build, the CUDA kernel (csrc/cuda). Python's op
// layer (python/fusedlm/ops) calls these; users call fusedlm.* instead.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/adamw.h"
#include "cpu/attention.h"
#include "cpu/norm.h"

namespace fusedlm {

// The torch this extension was compiled against, findable in the .so's bytes: _ext.py reads it
// before loading the module, because loading against another torch's ABI can crash.
extern "C" __attribute__((used)) const char fusedlm_build_stamp[] =
    "FUSEDLM_BUILT_FOR_TORCH=" FUSEDLM_TORCH_VERSION;

namespace {

// Ops that have a CUDA kernel in this build; the CUDA issue fills this in.
const std::vector<std::string>& cuda_ops() {
  static const std::vector<std::string> ops{};
  return ops;
}

void require_cpu_kernel(const at::Tensor& t, const char* name, const char* op) {
  FUSEDLM_CHECK_VALUE(t.device().is_cpu(), op, ": argument '", name, "' is on ", t.device(),
                      ", and this build of fusedlm._C has no ", t.device().type(),
                      " kernel for it");
}

// ---- attention ------------------------------------------------------------------------------

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_dim(q, "q", 4);  // (B, Hq, Tq, D)
  check_dim(k, "k", 4);  // (B, Hkv, Tk, D)
  check_dim(v, "v", 4);  // (B, Hkv, Tk, D)
  check_floating(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  FUSEDLM_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                      "batch sizes differ: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  FUSEDLM_CHECK_VALUE(k.sizes() == v.sizes(), "argument 'v' must have the shape of 'k' ",
                      k.sizes(), ", got ", v.sizes());
  FUSEDLM_CHECK_VALUE(k.size(3) == q.size(3), "argument 'k' has head dim ", k.size(3),
                      " but 'q' has ", q.size(3));
  FUSEDLM_CHECK_VALUE(q.size(3) <= 256, "head dim D = ", q.size(3),
                      " is over the supported maximum of 256");
  FUSEDLM_CHECK_VALUE(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0,
                      "the number of query heads (", q.size(1),
                      ") must be a multiple of the number of key/value heads (", k.size(1), ")");
  check_fits_index(q, "q");
  check_fits_index(k, "k");
  check_fits_index(v, "v");
  check_fits_strides(q, "q");
  check_fits_strides(k, "k");
  check_fits_strides(v, "v");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale, bool causal,
                                                 int64_t causal_offset) {
  check_attention_inputs(q, k, v);
  check_finite(scale, "scale");
  require_cpu_kernel(q, "q", "attention_fwd");
  return cpu::attention_fwd(q, k, v, scale, causal, causal_offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    int64_t causal_offset) {
  check_attention_inputs(q, k, v);
  check_finite(scale, "scale");
  check_defined(grad_out, "grad_out");
  check_defined(out, "out");
  check_defined(lse, "lse");
  check_shape(grad_out, "grad_out", q.sizes());
  check_shape(out, "out", q.sizes());
  check_shape(lse, "lse", q.sizes().slice(0, 3));
  check_fits_strides(grad_out, "grad_out");
  check_fits_strides(out, "out");
  check_same_dtype(grad_out, "grad_out", q, "q");
  check_same_dtype(out, "out", q, "q");
  FUSEDLM_CHECK_TYPE(lse.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
                     "argument 'lse' must be float32 (float64 for float64 inputs), got ",
                     lse.scalar_type());
  check_same_device(grad_out, "grad_out", q, "q");
  check_same_device(out, "out", q, "q");
  check_same_device(lse, "lse", q, "q");
  require_cpu_kernel(q, "q", "attention_bwd");
  return cpu::attention_bwd(grad_out, q, k, v, out, lse, scale, causal, causal_offset);
}

// ---- LayerNorm / RMSNorm --------------------------------------------------------------------

void check_norm_input(const at::Tensor& x) {
  check_dim(x, "x", 2);  // (M, N)
  check_floating(x, "x");
  FUSEDLM_CHECK_VALUE(x.size(1) > 0, "argument 'x' must have a non-empty normalized dimension");
  check_fits_index(x, "x");
}

void check_norm_param(const std::optional<at::Tensor>& param, const char* name,
                      const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  if (!param.has_value()) return;
  const at::Tensor& p = *param;
  check_dim(p, name, 1);
  check_shape(p, name, {x.size(1)});
  check_same_device(p, name, x, "x");
  if (weight.has_value()) {
    check_same_dtype(p, name, *weight, "weight");
  } else {
    FUSEDLM_CHECK_TYPE(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat,
                       "argument '", name, "' must have the dtype of 'x' (", x.scalar_type(),
                       ") or float32, got ", p.scalar_type());
  }
}

void check_stats(const at::Tensor& stat, const char* name, const at::Tensor& x) {
  check_dim(stat, name, 1);
  check_shape(stat, name, {x.size(0)});
  check_same_device(stat, name, x, "x");
  FUSEDLM_CHECK_TYPE(stat.scalar_type() == (x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
                     "argument '", name, "' must be float32 (float64 for float64 x), got ",
                     stat.scalar_type());
}

void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x) {
  check_defined(grad_y, "grad_y");
  check_shape(grad_y, "grad_y", x.sizes());
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", x, "x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_norm_input(x);
  check_norm_param(weight, "weight", x, std::nullopt);
  check_norm_param(bias, "bias", x, weight);
  FUSEDLM_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "argument 'eps' must be finite and >= 0, got ", eps);
  require_cpu_kernel(x, "x", "layer_norm_fwd");
  return cpu::layer_norm_fwd(x, weight, bias, eps);
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool has_bias) {
  check_norm_input(x);
  check_grad_y(grad_y, x);
  check_stats(mean, "mean", x);
  check_stats(rstd, "rstd", x);
  check_norm_param(weight, "weight", x, std::nullopt);
  require_cpu_kernel(x, "x", "layer_norm_bwd");
  return cpu::layer_norm_bwd(grad_y, x, mean, rstd, weight, has_bias);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                double eps) {
  check_norm_input(x);
  check_norm_param(weight, "weight", x, std::nullopt);
  FUSEDLM_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "argument 'eps' must be finite and >= 0, got ", eps);
  require_cpu_kernel(x, "x", "rms_norm_fwd");
  return cpu::rms_norm_fwd(x, weight, eps);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight) {
  check_norm_input(x);
  check_grad_y(grad_y, x);
  check_stats(rstd, "rstd", x);
  check_norm_param(weight, "weight", x, std::nullopt);
  require_cpu_kernel(x, "x", "rms_norm_bwd");
  return cpu::rms_norm_bwd(grad_y, x, rstd, weight);
}

// ---- AdamW ----------------------------------------------------------------------------------

void check_tensor_list(const std::vector<at::Tensor>& list, const char* name,
                       const std::vector<at::Tensor>& params, bool is_state) {
  FUSEDLM_CHECK_VALUE(list.size() == params.size(), "argument '", name, "' has ", list.size(),
                      " tensors but 'params' has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    const std::string where = std::string(name) + "[" + std::to_string(i) + "]";
    check_defined(t, where.c_str());
    FUSEDLM_CHECK_VALUE(t.sizes() == p.sizes(), "argument '", where, "' has shape ", t.sizes(),
                        " but params[", i, "] has ", p.sizes());
    check_same_device(t, where.c_str(), p, "params");
    FUSEDLM_CHECK_VALUE(t.is_contiguous(), "argument '", where, "' must be contiguous");
    FUSEDLM_CHECK_VALUE(!t.is_sparse(), "argument '", where, "' is sparse; AdamW does not support sparse tensors");
    if (is_state) {
      FUSEDLM_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == p.scalar_type(),
                         "argument '", where, "' must be float32 or the dtype of its parameter (",
                         p.scalar_type(), "), got ", t.scalar_type());
    } else {
      check_same_dtype(t, where.c_str(), p, "params");
    }
  }
}

void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize) {
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string where = "params[" + std::to_string(i) + "]";
    check_defined(params[i], where.c_str());
    check_floating(params[i], where.c_str());
    FUSEDLM_CHECK_VALUE(params[i].is_contiguous(), "argument '", where, "' must be contiguous");
    check_same_device(params[i], where.c_str(), params[0], "params[0]");
    check_fits_index(params[i], where.c_str());
  }
  check_tensor_list(grads, "grads", params, false);
  check_tensor_list(exp_avgs, "exp_avgs", params, true);
  check_tensor_list(exp_avg_sqs, "exp_avg_sqs", params, true);
  if (amsgrad) {
    check_tensor_list(max_exp_avg_sqs, "max_exp_avg_sqs", params, true);
  }
  // The kernel reads every state tensor of param i with the element type of exp_avgs[i]:
  // a float32 exp_avgs[i] with a 16-bit exp_avg_sqs[i] would be read and written past its end.
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string avg = "exp_avgs[" + std::to_string(i) + "]";
    const std::string sq = "exp_avg_sqs[" + std::to_string(i) + "]";
    check_same_dtype(exp_avg_sqs[i], sq.c_str(), exp_avgs[i], avg.c_str());
    if (amsgrad) {
      const std::string mx = "max_exp_avg_sqs[" + std::to_string(i) + "]";
      check_same_dtype(max_exp_avg_sqs[i], mx.c_str(), exp_avgs[i], avg.c_str());
    }
  }
  if (!amsgrad) {
    FUSEDLM_CHECK_VALUE(max_exp_avg_sqs.empty(),
                        "argument 'max_exp_avg_sqs' must be empty when amsgrad is False");
  }
  FUSEDLM_CHECK_VALUE(steps.size() == params.size(), "argument 'steps' has ", steps.size(),
                      " entries but 'params' has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    FUSEDLM_CHECK_VALUE(steps[i] >= 1 && std::isfinite(steps[i]), "argument 'steps[", i,
                        "]' must be finite and >= 1, got ", steps[i]);
  }
  FUSEDLM_CHECK_VALUE(lr >= 0, "argument 'lr' must be >= 0, got ", lr);
  FUSEDLM_CHECK_VALUE(eps >= 0, "argument 'eps' must be >= 0, got ", eps);
  FUSEDLM_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "argument 'beta1' must be in [0, 1), got ", beta1);
  FUSEDLM_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "argument 'beta2' must be in [0, 1), got ", beta2);
  FUSEDLM_CHECK_VALUE(weight_decay >= 0, "argument 'weight_decay' must be >= 0, got ", weight_decay);
  if (params.empty()) return;
  require_cpu_kernel(params[0], "params", "adamw_step");
  cpu::adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
                  eps, weight_decay, amsgrad, maximize);
}

}  // namespace
}  // namespace fusedlm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedlm's C++/CUDA kernels. Use fusedlm.* (python/fusedlm) rather than this module.";

  m.def("torch_version", [] { return std::string(FUSEDLM_TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("built_with_cuda", [] {
#ifdef FUSEDLM_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether csrc/cuda was compiled into this build.");
  m.def("cuda_ops", &fusedlm::cuda_ops, "Names of the ops that have a CUDA kernel in this build.");

  m.def("attention_fwd", &fusedlm::attention_fwd,
        "Flash-attention forward.\n"
        "q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), any strides. Key j is visible to query i iff\n"
        "not causal or j <= i + causal_offset. Returns out (B, Hq, Tq, D) in q's dtype and\n"
        "lse (B, Hq, Tq) float32 (float64 for float64 inputs).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("causal"),
        py::arg("causal_offset"));
  m.def("attention_bwd", &fusedlm::attention_bwd,
        "Flash-attention backward: recomputes the probabilities from lse. Returns dq, dk, dv\n"
        "in the shapes and dtypes of q, k, v (dk, dv summed over the query heads of a kv head).",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("scale"), py::arg("causal"), py::arg("causal_offset"));
  m.def("layer_norm_fwd", &fusedlm::layer_norm_fwd,
        "LayerNorm over the last dim. x (M, N); weight, bias (N) or None (dtype of x or float32).\n"
        "Returns y (M, N) in x's dtype, mean and rstd (M) in float32 (float64 for float64 x).",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_bwd", &fusedlm::layer_norm_bwd,
        "LayerNorm backward. Returns dx (M, N), dweight (N) or None, dbias (N) or None.",
        py::arg("grad_y"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("has_bias"));
  m.def("rms_norm_fwd", &fusedlm::rms_norm_fwd,
        "RMSNorm over the last dim. x (M, N); weight (N) or None. Returns y (M, N), rstd (M).",
        py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_bwd", &fusedlm::rms_norm_bwd,
        "RMSNorm backward. Returns dx (M, N) and dweight (N) or None.", py::arg("grad_y"),
        py::arg("x"), py::arg("rstd"), py::arg("weight"));
  m.def("adamw_step", &fusedlm::adamw_step,
        "One AdamW step over a whole list of tensors, in place (torch.optim.AdamW's arithmetic).\n"
        "steps[i] is param i's step count after this step's increment.",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"),
        py::arg("maximize"));
}
