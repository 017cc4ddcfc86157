// The only PYBIND11_MODULE of fusedlm._C. Each op's entry point validates every tensor it
// hands a kernel (device, dtype, rank, shape; see checks.h) and dispatches on the device to
// the CPU kernel (csrc/cpu) or, in a CUDA build, the CUDA kernel (csrc/cuda). Python's op
// layer (python/fusedlm/ops) calls these; users call fusedlm.* instead.
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/adamw.h"
#include "cpu/attention.h"
#include "cpu/cross_entropy.h"
#include "cpu/norm.h"
#include "cpu/rotary.h"
#include "cpu/simd.h"
#include "cpu/glu.h"

#ifdef FUSEDLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <utility>

#include "cuda/launchers.h"
#endif

namespace fusedlm {

// The torch this extension was compiled against, findable in the .so's bytes: _ext.py reads it
// before loading the module, because loading against another torch's ABI can crash.
extern "C" __attribute__((used)) const char fusedlm_build_stamp[] =
    "FUSEDLM_BUILT_FOR_TORCH=" FUSEDLM_TORCH_VERSION;

namespace {

// Ops that have a CUDA kernel in this build: exactly the entry points below that dispatch CUDA
// tensors to csrc/cuda (python/fusedlm/ops routes the "cuda" backend by this list).
const std::vector<std::string>& cuda_ops() {
  static const std::vector<std::string> ops{
#ifdef FUSEDLM_WITH_CUDA
      "attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd",
      "rms_norm_bwd", "adamw_step",
#endif
  };
  return ops;
}

void require_cpu_kernel(const at::Tensor& t, const char* name, const char* op) {
  FUSEDLM_CHECK_VALUE(t.device().is_cpu(), op, ": argument '", name, "' is on ", t.device(),
                      ", and this build of fusedlm._C has no ", t.device().type(),
                      " kernel for it");
}

// ---- CUDA glue: torch tensors -> raw pointers, the current stream, errors -> exceptions ---------
//
// Each function runs after its entry point validated the arguments (checks.h), under a guard
// for the tensors' device, on that device's current stream (c10::cuda::getCurrentCUDAStream),
// and raises with the op's name if the launcher reports a CUDA error.
#ifdef FUSEDLM_WITH_CUDA
namespace cuda_glue {

cuda::DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      FUSEDLM_CHECK_TYPE(false, "no CUDA kernel for dtype ", s);
  }
  return cuda::DType::kFloat32;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T = void>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// Scratch the launchers request (norm: per-block partial sums; attention forward: a key split's
// partial outputs; attention backward: delta and the float32 dQ accumulator): byte tensors from
// the caching allocator on the current device, all kept alive until the end of the call, so two
// requests of one call never share memory (the stream-ordered allocator makes freeing them after
// the launches safe).
struct Workspace {
  at::TensorOptions options;
  std::vector<at::Tensor> buffers;
};

void* alloc_workspace(size_t bytes, void* context) {
  auto* workspace = static_cast<Workspace*>(context);
  workspace->buffers.push_back(
      at::empty({static_cast<int64_t>(bytes)}, workspace->options.dtype(at::kByte)));
  return workspace->buffers.back().data_ptr();
}

// weight / bias (N) as the kernels read them: contiguous, float64 for float64 x (which may come
// with float32 params). Undefined when absent.
at::Tensor norm_param(const std::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  at::Tensor t = p->contiguous();
  if (x.scalar_type() == at::kDouble && t.scalar_type() != at::kDouble) t = t.to(at::kDouble);
  return t;
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Forward of both norms; mean is returned undefined for RMSNorm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x,                        // (M, N)
    const std::optional<at::Tensor>& weight,    // (N) or None
    const std::optional<at::Tensor>& bias,      // (N) or None
    double eps, bool rms, const char* op) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_fits_int32(x.size(1), "x", "normalized size");
  const at::Tensor x_c = x.contiguous();  // (M, N)
  const int64_t M = x_c.size(0);
  const int64_t N = x_c.size(1);
  const at::Tensor w = norm_param(weight, x_c);  // (N) or undefined
  const at::Tensor b = norm_param(bias, x_c);    // (N) or undefined
  const at::TensorOptions acc_opts = x_c.options().dtype(acc_dtype(x_c));
  at::Tensor y = at::empty({M, N}, x_c.options());                    // (M, N)
  at::Tensor mean = rms ? at::Tensor() : at::empty({M}, acc_opts);  // (M)
  at::Tensor rstd = at::empty({M}, acc_opts);                        // (M)
  if (M == 0) return {y, mean, rstd};
  cuda::NormFwdArgs args{};
  args.x = x_c.data_ptr();
  args.weight = ptr_or_null(w);
  args.bias = ptr_or_null(b);
  args.y = y.data_ptr();
  args.mean = ptr_or_null(mean);
  args.rstd = rstd.data_ptr();
  args.M = M;
  args.N = N;
  args.eps = eps;
  args.x_dtype = dtype_of(x_c.scalar_type());
  args.param_dtype = dtype_of(w.defined() ? w.scalar_type()
                              : b.defined() ? b.scalar_type()
                                            : x_c.scalar_type());
  args.rms = rms;
  check_cuda_status(cuda::norm_fwd(args, current_stream()), op);
  return {y, mean, rstd};
}

// Backward of both norms: dx, dweight (weight's dtype) or undefined, dbias (weight's dtype, or
// the acc dtype without a weight) or undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& grad_y,                   // (M, N)
    const at::Tensor& x,                        // (M, N)
    const at::Tensor& mean,                     // (M), undefined for RMSNorm
    const at::Tensor& rstd,                     // (M)
    const std::optional<at::Tensor>& weight,    // (N) or None
    bool has_bias, bool rms, const char* op) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_fits_int32(x.size(1), "x", "normalized size");
  const at::Tensor x_c = x.contiguous();        // (M, N)
  const at::Tensor dy_c = grad_y.contiguous();  // (M, N)
  const at::Tensor mean_c = rms ? at::Tensor() : mean.contiguous();  // (M)
  const at::Tensor rstd_c = rstd.contiguous();                       // (M)
  const int64_t M = x_c.size(0);
  const int64_t N = x_c.size(1);
  const at::Tensor w = norm_param(weight, x_c);  // (N) or undefined
  const at::ScalarType param_dtype = w.defined() ? w.scalar_type() : x_c.scalar_type();
  at::Tensor dx = at::empty({M, N}, x_c.options());  // (M, N)
  // (N) each, in the dtypes the kernels write
  at::Tensor dw = w.defined() ? at::empty({N}, x_c.options().dtype(param_dtype)) : at::Tensor();
  at::Tensor db = has_bias ? at::empty({N}, x_c.options().dtype(w.defined() ? param_dtype
                                                                             : acc_dtype(x_c)))
                           : at::Tensor();
  if (M == 0) {
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
  } else {
    Workspace workspace{x_c.options(), {}};
    cuda::NormBwdArgs args{};
    args.grad_y = dy_c.data_ptr();
    args.x = x_c.data_ptr();
    args.mean = ptr_or_null(mean_c);
    args.rstd = rstd_c.data_ptr();
    args.weight = ptr_or_null(w);
    args.dx = dx.data_ptr();
    args.dweight = ptr_or_null(dw);
    args.dbias = ptr_or_null(db);
    args.M = M;
    args.N = N;
    args.x_dtype = dtype_of(x_c.scalar_type());
    args.param_dtype = dtype_of(param_dtype);
    args.rms = rms;
    args.alloc = &alloc_workspace;
    args.alloc_context = &workspace;
    check_cuda_status(cuda::norm_bwd(args, current_stream()), op);
  }
  // float64 x with float32 params: the kernels computed in float64; round once here.
  if (dw.defined() && dw.scalar_type() != weight->scalar_type()) dw = dw.to(weight->scalar_type());
  if (db.defined() && weight.has_value() && db.scalar_type() != weight->scalar_type()) {
    db = db.to(weight->scalar_type());
  }
  return {dx, dw, db};
}

// ---- attention --------------------------------------------------------------------------------

// D rounded up to a multiple of 8: the kernels fetch rows in 16-byte pieces.
int64_t attention_padded_dim(int64_t D) { return (D + 7) / 8 * 8; }

// A (B, H, T, D) attention input as the CUDA kernels read it: the tensor itself when its head dim
// is contiguous, its other strides are multiples of 8 elements and its data 16-byte aligned;
// otherwise a contiguous copy (zero-padded to `padded_dim` columns when D is not a multiple of 8).
at::Tensor attention_readable(const at::Tensor& t, int64_t padded_dim) {
  if (t.size(3) != padded_dim) {
    // constant_pad_nd keeps a channels-last-like input's layout (heads innermost: head dim
    // strided), which the kernels cannot read; .contiguous() is free for every other input.
    return at::constant_pad_nd(t, {0, padded_dim - t.size(3)}, 0).contiguous();
  }
  bool readable = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int dim = 0; dim < 3; ++dim) {
    readable = readable && (t.size(dim) == 1 || t.stride(dim) % 8 == 0);  // size 1: never used
  }
  return readable ? t : t.clone(at::MemoryFormat::Contiguous);  // clone: fresh, aligned storage
}

cuda::AttentionInput attention_input(const at::Tensor& t) {  // (B, H, T, D), readable
  auto stride = [&](int dim) { return t.size(dim) == 1 ? int64_t{0} : t.stride(dim); };
  return cuda::AttentionInput{t.data_ptr(), stride(0), stride(1), stride(2)};
}

void check_attention_cuda(const at::Tensor& q, const at::Tensor& k, const char* op) {
  FUSEDLM_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                     ": the CUDA attention kernels take float16 or bfloat16, got ",
                     q.scalar_type(), " for argument 'q' (use backend='triton' or 'torch')");
  check_fits_int32(q.size(2), "q", "sequence length");
  check_fits_int32(k.size(2), "k", "sequence length");
  const int64_t query_tiles = (q.size(2) + 63) / 64;  // the kernels' smallest query tile is 64
  const int64_t key_tiles = (k.size(2) + 15) / 16;     // and their smallest key tile 16
  FUSEDLM_CHECK_VALUE(std::max(query_tiles * q.size(1), key_tiles * 2 * k.size(1)) * q.size(0) <=
                          std::numeric_limits<int32_t>::max(),
                      op, ": B * H * T = ", q.size(0), " * ", q.size(1), " * ", q.size(2),
                      " is over the CUDA kernels' grid limit");
}

cuda::AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k, int64_t padded_dim,
                                     double scale, bool causal, int64_t causal_offset,
                                     std::optional<int64_t> window_offset,
                                     const std::optional<at::Tensor>& key_range, double softcap,
                                     double dropout_p,
                                     const std::optional<at::Tensor>& dropout_seed) {
  cuda::AttentionShape shape{};
  shape.B = q.size(0);
  shape.Hq = q.size(1);
  shape.Hkv = k.size(1);
  shape.Tq = q.size(2);
  shape.Tk = k.size(2);
  shape.D = padded_dim;
  shape.scale = scale;
  shape.causal = causal;
  shape.causal_offset = causal_offset;
  shape.windowed = window_offset.has_value();
  // Past [-Tq, Tk] the window hides every key or none: clamped, as the kernels require.
  shape.window_offset = std::clamp<int64_t>(window_offset.value_or(0), -q.size(2), k.size(2));
  // (B, 2) or (B, Tq, 2) int32 contiguous on q's device (attention_key_range made it so); the
  // kernels clamp.
  shape.key_range = key_range.has_value() ? key_range->const_data_ptr<int32_t>() : nullptr;
  shape.key_range_per_query = key_range.has_value() && key_range->dim() == 3;
  shape.dtype = dtype_of(q.scalar_type());
  shape.softcap = softcap;      // (checked: 0 or finite and positive)
  shape.dropout_p = dropout_p;  // (checked: in [0, 1)) and its seed (checked: one int64 on
                                // q's device), which the kernels read
  shape.dropout_seed = dropout_p > 0 ? dropout_seed->const_data_ptr<int64_t>() : nullptr;
  return shape;
}

// Drops the zero columns a padded head dim added.
at::Tensor attention_unpad(const at::Tensor& t, int64_t D) {
  return t.size(3) == D ? t : t.narrow(3, 0, D).contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q,  // (B, Hq, Tq, D)
                                                 const at::Tensor& k,  // (B, Hkv, Tk, D)
                                                 const at::Tensor& v,  // (B, Hkv, Tk, D)
                                                 double scale, bool causal,
                                                 int64_t causal_offset,
                                                 std::optional<int64_t> window_offset,
                                                 // (B, 2) or (B, Tq, 2) int32 contiguous,
                                                 // q's device
                                                 const std::optional<at::Tensor>& key_range,
                                                 double softcap, double dropout_p,
                                                 // (1) int64, q's device; with dropout only
                                                 const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "attention_fwd";
  check_attention_cuda(q, k, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t D = q.size(3);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.numel() == 0) {  // no key to see: zeros and -inf (or empty)
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {at::zeros(q.sizes(), q.options()), lse};
  }
  const int64_t Dp = attention_padded_dim(D);
  const at::Tensor q_r = attention_readable(q, Dp);
  const at::Tensor k_r = attention_readable(k, Dp);
  const at::Tensor v_r = attention_readable(v, Dp);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), Dp}, q.options());  // (B, Hq, Tq, Dp)
  cuda::AttentionFwdArgs args{};
  args.shape = attention_shape(q, k, Dp, scale, causal, causal_offset, window_offset, key_range,
                               softcap, dropout_p, dropout_seed);
  args.q = attention_input(q_r);
  args.k = attention_input(k_r);
  args.v = attention_input(v_r);
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  Workspace workspace{q.options(), {}};
  args.alloc = &alloc_workspace;
  args.alloc_context = &workspace;
  check_cuda_status(cuda::attention_fwd(args, current_stream()), op);
  return {attention_unpad(out, D), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out,  // (B, Hq, Tq, D)
    const at::Tensor& q,         // (B, Hq, Tq, D)
    const at::Tensor& k,         // (B, Hkv, Tk, D)
    const at::Tensor& v,         // (B, Hkv, Tk, D)
    const at::Tensor& out,       // (B, Hq, Tq, D)
    const at::Tensor& lse,       // (B, Hq, Tq) float32
    double scale, bool causal, int64_t causal_offset, std::optional<int64_t> window_offset,
    const std::optional<at::Tensor>& key_range,  // (B, 2), (B, Tq, 2) int32, q's device
    const std::optional<at::Tensor>& grad_lse,  // (B, Hq, Tq) float32, or none
    double softcap, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {  // (1) int64, q's device; dropout only
  const char* op = "attention_bwd";
  check_attention_cuda(q, k, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t D = q.size(3);
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  const int64_t Dp = attention_padded_dim(D);
  const at::Tensor q_r = attention_readable(q, Dp);
  const at::Tensor k_r = attention_readable(k, Dp);
  const at::Tensor v_r = attention_readable(v, Dp);
  const at::Tensor out_r = attention_readable(out, Dp);
  const at::Tensor grad_out_r = attention_readable(grad_out, Dp);
  const at::Tensor lse_c = lse.contiguous();  // (B, Hq, Tq)
  const at::Tensor grad_lse_c =               // (B, Hq, Tq) or undefined
      grad_lse.has_value() ? grad_lse->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dq = at::empty({q.size(0), q.size(1), q.size(2), Dp}, q.options());  // (B, Hq, Tq, Dp)
  at::Tensor dk = at::empty({k.size(0), k.size(1), k.size(2), Dp}, k.options());  // (B, Hkv, Tk, Dp)
  at::Tensor dv = at::empty({v.size(0), v.size(1), v.size(2), Dp}, v.options());  // (B, Hkv, Tk, Dp)
  Workspace workspace{q.options(), {}};
  cuda::AttentionBwdArgs args{};
  args.shape = attention_shape(q, k, Dp, scale, causal, causal_offset, window_offset, key_range,
                               softcap, dropout_p, dropout_seed);
  args.q = attention_input(q_r);
  args.k = attention_input(k_r);
  args.v = attention_input(v_r);
  args.out = attention_input(out_r);
  args.grad_out = attention_input(grad_out_r);
  args.lse = lse_c.data_ptr<float>();
  args.grad_lse = grad_lse_c.defined() ? grad_lse_c.data_ptr<float>() : nullptr;
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  // torch.use_deterministic_algorithms(True) asks for bitwise-reproducible gradients.
  args.deterministic = at::globalContext().deterministicAlgorithms();
  args.alloc = &alloc_workspace;
  args.alloc_context = &workspace;
  check_cuda_status(cuda::attention_bwd(args, current_stream()), op);
  return {attention_unpad(dq, D), attention_unpad(dk, D), attention_unpad(dv, D)};
}

// One AdamW step over CUDA tensors: one launcher call per (param dtype, state dtype) group.
void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize, const std::vector<at::Tensor>& master_params,
                const std::vector<at::Tensor>& step_tensors,
                const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (size_t i = 0; i < params.size(); ++i) check_fits_chunked_index(params[i], "params", i);
  cuda::AdamWHyper hyper{};
  hyper.lr = lr;
  hyper.lr_ptr = nullptr;
  if (lr_tensor.has_value()) {
    if (lr_tensor->device().is_cpu()) {
      hyper.lr = lr_tensor->item<double>();
      FUSEDLM_CHECK_VALUE(hyper.lr >= 0 && std::isfinite(hyper.lr),
                          "argument 'lr_tensor' must be finite and >= 0, got ", hyper.lr);
    } else {
      hyper.lr_ptr = lr_tensor->data_ptr<float>();
    }
  }
  hyper.beta1 = beta1;
  hyper.beta2 = beta2;
  hyper.eps = eps;
  hyper.weight_decay = weight_decay;
  hyper.amsgrad = amsgrad;
  hyper.maximize = maximize;
  hyper.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  hyper.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  // Tensors grouped by (param dtype, state dtype), in a fixed order.
  std::map<std::pair<int, int>, std::vector<cuda::AdamWTensor>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    cuda::AdamWTensor t{};
    t.param = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.master = master_params.empty() ? nullptr : master_params[i].data_ptr<float>();
    t.numel = params[i].numel();
    t.step = step_tensors.empty() ? steps[i] : 0.0;
    t.step_ptr = step_tensors.empty() ? nullptr : step_tensors[i].data_ptr<float>();
    const std::pair<int, int> key{static_cast<int>(params[i].scalar_type()),
                                  static_cast<int>(exp_avgs[i].scalar_type())};
    groups[key].push_back(t);
  }
  const cudaStream_t stream = current_stream();
  for (const auto& [key, tensors] : groups) {
    check_cuda_status(
        cuda::adamw_step(dtype_of(static_cast<at::ScalarType>(key.first)),
                         dtype_of(static_cast<at::ScalarType>(key.second)), tensors.data(),
                         static_cast<int64_t>(tensors.size()), hyper, stream),
        "adamw_step");
  }
}

}  // namespace cuda_glue
#endif  // FUSEDLM_WITH_CUDA

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

// key_range (B, 2) or (B, Tq, 2) integers, or None: checked, and made the contiguous int32
// the kernels read.
std::optional<at::Tensor> attention_key_range(const std::optional<at::Tensor>& key_range,
                                              const at::Tensor& q) {
  if (!key_range.has_value() || !key_range->defined()) return std::nullopt;
  const at::Tensor& range = *key_range;
  FUSEDLM_CHECK_VALUE(range.dim() == 2 || range.dim() == 3,
                      "argument 'key_range' must be 2-D (B, 2) or 3-D (B, Tq, 2), got ",
                      range.dim(), "-D");
  FUSEDLM_CHECK_TYPE(at::isIntegralType(range.scalar_type(), /*includeBool=*/false),
                     "argument 'key_range' must hold integers, got ", range.scalar_type());
  const bool per_query = range.dim() == 3;
  FUSEDLM_CHECK_VALUE(range.size(0) == q.size(0) && (!per_query || range.size(1) == q.size(2)) &&
                          range.size(-1) == 2,
                      "argument 'key_range' must have shape (B, 2) = (", q.size(0),
                      ", 2) or (B, Tq, 2) = (", q.size(0), ", ", q.size(2), ", 2), got ",
                      range.sizes());
  check_same_device(range, "key_range", q, "q");
  // The kernels clamp int32 values themselves; wider starts/ends past int32 mean "past every
  // key" (or before all), which clamping to [0, int32 max] keeps.
  if (range.scalar_type() == at::kInt) return range.contiguous();
  return range.clamp(0, std::numeric_limits<int32_t>::max()).to(at::kInt).contiguous();
}

// softcap: 0 (no capping) or a finite positive cap.
void check_softcap(double softcap) {
  check_finite(softcap, "softcap");
  FUSEDLM_CHECK_VALUE(softcap >= 0, "argument 'softcap' must be >= 0 (0: no capping), got ",
                      softcap);
}

// dropout_p in [0, 1) (0: none) and, with dropout, its seed: one int64 element on q's device
// (any value: its 64 bits key the Philox stream). The CUDA kernels read it from device memory,
// so that a seed drawn on the device inside a captured CUDA graph gives each replay a new mask.
void check_dropout(double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                   const at::Tensor& q) {
  FUSEDLM_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1,
                      "argument 'dropout_p' must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0) return;  // (the seed is not read)
  FUSEDLM_CHECK_VALUE(dropout_seed.has_value() && dropout_seed->defined(),
                      "argument 'dropout_seed' must be a one-element int64 tensor when "
                      "dropout_p > 0, got None");
  FUSEDLM_CHECK_TYPE(dropout_seed->scalar_type() == at::kLong,
                     "argument 'dropout_seed' must be int64, got ", dropout_seed->scalar_type());
  FUSEDLM_CHECK_VALUE(dropout_seed->numel() == 1,
                      "argument 'dropout_seed' must have one element, got shape ",
                      dropout_seed->sizes());
  check_same_device(*dropout_seed, "dropout_seed", q, "q");
}

// The seed the CPU kernels take (0 without dropout).
int64_t cpu_dropout_seed(double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  return dropout_p > 0 ? dropout_seed->item<int64_t>() : 0;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale, bool causal,
                                                 int64_t causal_offset,
                                                 std::optional<int64_t> window_offset,
                                                 const std::optional<at::Tensor>& key_range,
                                                 double softcap, double dropout_p,
                                                 // (1) int64, q's device; dropout only
                                                 const std::optional<at::Tensor>& dropout_seed) {
  check_attention_inputs(q, k, v);
  check_finite(scale, "scale");
  check_softcap(softcap);
  check_dropout(dropout_p, dropout_seed, q);
  const std::optional<at::Tensor> key_ranges = attention_key_range(key_range, q);
#ifdef FUSEDLM_WITH_CUDA
  if (q.is_cuda()) {
    return cuda_glue::attention_fwd(q, k, v, scale, causal, causal_offset, window_offset,
                                    key_ranges, softcap, dropout_p, dropout_seed);
  }
#endif
  require_cpu_kernel(q, "q", "attention_fwd");
  return cpu::attention_fwd(q, k, v, scale, causal, causal_offset, window_offset, key_ranges,
                            softcap, dropout_p, cpu_dropout_seed(dropout_p, dropout_seed));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    int64_t causal_offset, std::optional<int64_t> window_offset,
    const std::optional<at::Tensor>& key_range, const std::optional<at::Tensor>& grad_lse,
    double softcap, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {  // (1) int64, q's device; dropout only
  check_attention_inputs(q, k, v);
  const std::optional<at::Tensor> key_ranges = attention_key_range(key_range, q);
  check_finite(scale, "scale");
  check_softcap(softcap);
  check_dropout(dropout_p, dropout_seed, q);
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
  if (grad_lse.has_value()) {
    check_defined(*grad_lse, "grad_lse");
    check_shape(*grad_lse, "grad_lse", q.sizes().slice(0, 3));
    check_same_dtype(*grad_lse, "grad_lse", lse, "lse");
    check_same_device(*grad_lse, "grad_lse", q, "q");
  }
#ifdef FUSEDLM_WITH_CUDA
  if (q.is_cuda()) {
    return cuda_glue::attention_bwd(grad_out, q, k, v, out, lse, scale, causal, causal_offset,
                                    window_offset, key_ranges, grad_lse, softcap, dropout_p,
                                    dropout_seed);
  }
#endif
  require_cpu_kernel(q, "q", "attention_bwd");
  return cpu::attention_bwd(grad_out, q, k, v, out, lse, scale, causal, causal_offset,
                            window_offset, key_ranges, grad_lse, softcap, dropout_p,
                            cpu_dropout_seed(dropout_p, dropout_seed));
}

// ---- LayerNorm / RMSNorm --------------------------------------------------------------------

// x_name: what the norm's input is called in the entry point (x; residual or h for the
// residual-add norms), for the messages.
void check_norm_input(const at::Tensor& x, const char* x_name = "x") {
  check_dim(x, x_name, 2);  // (M, N)
  check_floating(x, x_name);
  FUSEDLM_CHECK_VALUE(x.size(1) > 0, "argument '", x_name,
                      "' must have a non-empty normalized dimension");
  check_fits_index(x, x_name);
}

void check_norm_param(const std::optional<at::Tensor>& param, const char* name,
                      const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const char* x_name = "x") {
  if (!param.has_value()) return;
  const at::Tensor& p = *param;
  check_dim(p, name, 1);
  check_shape(p, name, {x.size(1)});
  check_same_device(p, name, x, x_name);
  if (weight.has_value()) {
    check_same_dtype(p, name, *weight, "weight");
  } else {
    FUSEDLM_CHECK_TYPE(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat,
                       "argument '", name, "' must have the dtype of '", x_name, "' (",
                       x.scalar_type(), ") or float32, got ", p.scalar_type());
  }
}

void check_stats(const at::Tensor& stat, const char* name, const at::Tensor& x,
                 const char* x_name = "x") {
  check_dim(stat, name, 1);
  check_shape(stat, name, {x.size(0)});
  check_same_device(stat, name, x, x_name);
  FUSEDLM_CHECK_TYPE(stat.scalar_type() == (x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
                     "argument '", name, "' must be float32 (float64 for float64 ", x_name,
                     "), got ", stat.scalar_type());
}

void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, const char* x_name = "x") {
  check_defined(grad_y, "grad_y");
  check_shape(grad_y, "grad_y", x.sizes());
  check_same_dtype(grad_y, "grad_y", x, x_name);
  check_same_device(grad_y, "grad_y", x, x_name);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_norm_input(x);
  check_norm_param(weight, "weight", x, std::nullopt);
  check_norm_param(bias, "bias", x, weight);
  FUSEDLM_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "argument 'eps' must be finite and >= 0, got ", eps);
#ifdef FUSEDLM_WITH_CUDA
  if (x.is_cuda()) return cuda_glue::norm_fwd(x, weight, bias, eps, false, "layer_norm_fwd");
#endif
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
#ifdef FUSEDLM_WITH_CUDA
  if (x.is_cuda()) {
    auto [dx, dw, db] =
        cuda_glue::norm_bwd(grad_y, x, mean, rstd, weight, has_bias, false, "layer_norm_bwd");
    return {dx, dw.defined() ? std::optional<at::Tensor>(dw) : std::nullopt,
            db.defined() ? std::optional<at::Tensor>(db) : std::nullopt};
  }
#endif
  require_cpu_kernel(x, "x", "layer_norm_bwd");
  return cpu::layer_norm_bwd(grad_y, x, mean, rstd, weight, has_bias);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight,
                                                double eps) {
  check_norm_input(x);
  check_norm_param(weight, "weight", x, std::nullopt);
  FUSEDLM_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "argument 'eps' must be finite and >= 0, got ", eps);
#ifdef FUSEDLM_WITH_CUDA
  if (x.is_cuda()) {
    auto [y, mean, rstd] = cuda_glue::norm_fwd(x, weight, std::nullopt, eps, true, "rms_norm_fwd");
    return {y, rstd};
  }
#endif
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
#ifdef FUSEDLM_WITH_CUDA
  if (x.is_cuda()) {
    auto [dx, dw, db] =
        cuda_glue::norm_bwd(grad_y, x, at::Tensor(), rstd, weight, false, true, "rms_norm_bwd");
    return {dx, dw.defined() ? std::optional<at::Tensor>(dw) : std::nullopt};
  }
#endif
  require_cpu_kernel(x, "x", "rms_norm_bwd");
  return cpu::rms_norm_bwd(grad_y, x, rstd, weight);
}

// ---- residual add + LayerNorm / RMSNorm (CPU kernels only: CUDA tensors take the Triton ones)

void check_residual_pair(const at::Tensor& x, const at::Tensor& residual) {
  check_norm_input(residual, "residual");
  check_dim(x, "x", 2);  // (M, N)
  check_floating(x, "x");
  check_shape(x, "x", residual.sizes());
  check_same_device(x, "x", residual, "residual");
  const at::ScalarType xt = x.scalar_type();
  FUSEDLM_CHECK_TYPE(xt == residual.scalar_type() ||
                         (residual.scalar_type() == at::kFloat &&
                          (xt == at::kBFloat16 || xt == at::kHalf)),
                     "argument 'x' must have the dtype of 'residual' (", residual.scalar_type(),
                     "), or be bfloat16/float16 beside a float32 'residual', got ", xt);
}

void check_grad_h(const std::optional<at::Tensor>& grad_h, const at::Tensor& h) {
  if (!grad_h.has_value()) return;
  check_shape(*grad_h, "grad_h", h.sizes());
  check_same_dtype(*grad_h, "grad_h", h, "h");
  check_same_device(*grad_h, "grad_h", h, "h");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_residual_pair(x, residual);
  check_norm_param(weight, "weight", residual, std::nullopt, "residual");
  check_norm_param(bias, "bias", residual, weight, "residual");
  FUSEDLM_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "argument 'eps' must be finite and >= 0, got ", eps);
  require_cpu_kernel(residual, "residual", "add_layer_norm_fwd");
  return cpu::add_layer_norm_fwd(x, residual, weight, bias, eps);
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> add_layer_norm_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias) {
  check_norm_input(h, "h");
  check_grad_y(grad_y, h, "h");
  check_grad_h(grad_h, h);
  check_stats(mean, "mean", h, "h");
  check_stats(rstd, "rstd", h, "h");
  check_norm_param(weight, "weight", h, std::nullopt, "h");
  require_cpu_kernel(h, "h", "add_layer_norm_bwd");
  return cpu::add_layer_norm_bwd(grad_y, grad_h, h, mean, rstd, weight, has_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    double eps) {
  check_residual_pair(x, residual);
  check_norm_param(weight, "weight", residual, std::nullopt, "residual");
  FUSEDLM_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "argument 'eps' must be finite and >= 0, got ", eps);
  require_cpu_kernel(residual, "residual", "add_rms_norm_fwd");
  return cpu::add_rms_norm_fwd(x, residual, weight, eps);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> add_rms_norm_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight) {
  check_norm_input(h, "h");
  check_grad_y(grad_y, h, "h");
  check_grad_h(grad_h, h);
  check_stats(rstd, "rstd", h, "h");
  check_norm_param(weight, "weight", h, std::nullopt, "h");
  require_cpu_kernel(h, "h", "add_rms_norm_bwd");
  return cpu::add_rms_norm_bwd(grad_y, grad_h, h, rstd, weight);
}

// ---- cross-entropy (CPU kernels only: CUDA tensors take the Triton ones) ---------------------

at::ScalarType stat_type_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& target,
                                const char* op) {
  check_dim(logits, "logits", 2);  // (N, V)
  check_floating(logits, "logits");
  FUSEDLM_CHECK_VALUE(logits.size(1) > 0, "argument 'logits' must have at least one class");
  check_fits_index(logits, "logits");
  check_fits_strides(logits, "logits");
  check_defined(target, "target");
  check_dim(target, "target", 1);
  check_shape(target, "target", {logits.size(0)});
  FUSEDLM_CHECK_TYPE(target.scalar_type() == at::kLong, "argument 'target' must be int64, got ",
                     target.scalar_type());
  check_same_device(target, "target", logits, "logits");
  require_cpu_kernel(logits, "logits", op);
}

void check_row_stat(const at::Tensor& stat, const char* name, const at::Tensor& logits) {
  check_defined(stat, name);
  check_dim(stat, name, 1);
  check_shape(stat, name, {logits.size(0)});
  check_same_device(stat, name, logits, "logits");
  FUSEDLM_CHECK_TYPE(stat.scalar_type() == stat_type_of(logits), "argument '", name,
                     "' must be float32 (float64 for float64 logits), got ", stat.scalar_type());
}

void check_loss_weights(double label_smoothing, double z_loss) {
  FUSEDLM_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1,
                      "argument 'label_smoothing' must be in [0, 1], got ", label_smoothing);
  FUSEDLM_CHECK_VALUE(std::isfinite(z_loss) && z_loss >= 0,
                      "argument 'z_loss' must be a finite number >= 0, got ", z_loss);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                                 const at::Tensor& target,
                                                                 int64_t ignore_index,
                                                                 double label_smoothing,
                                                                 double z_loss) {
  check_cross_entropy_inputs(logits, target, "cross_entropy_fwd");
  check_loss_weights(label_smoothing, z_loss);
  return cpu::cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss);
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& row_max,
                             const at::Tensor& log_sum, int64_t ignore_index,
                             double label_smoothing, const std::optional<at::Tensor>& out,
                             double z_loss) {
  check_cross_entropy_inputs(logits, target, "cross_entropy_bwd");
  check_row_stat(grad_loss, "grad_loss", logits);  // (any stride: 0 for a reduced loss)
  check_row_stat(row_max, "row_max", logits);
  check_row_stat(log_sum, "log_sum", logits);
  check_loss_weights(label_smoothing, z_loss);
  if (out.has_value()) {  // (N, V) contiguous; the logits themselves, or apart from them
    check_dim(*out, "out", 2);
    check_shape(*out, "out", {logits.size(0), logits.size(1)});
    check_same_dtype(*out, "out", logits, "logits");
    check_same_device(*out, "out", logits, "logits");
    FUSEDLM_CHECK_VALUE(out->is_contiguous(), "argument 'out' must be contiguous");
    const at::MemOverlapStatus overlap = at::get_overlap_status(*out, logits);
    FUSEDLM_CHECK_VALUE(overlap == at::MemOverlapStatus::Full || overlap == at::MemOverlapStatus::No,
                        "argument 'out' must be the logits themselves or not overlap them");
  }
  return cpu::cross_entropy_bwd(grad_loss, logits, target, row_max, log_sum, ignore_index,
                                label_smoothing, out, z_loss);
}

// ---- rotary embeddings and GLUs (CPU kernels only: CUDA tensors take the Triton ones) --------

// An angle table as the CPU kernel reads it: (B or 1, T, R/2) contiguous in x's compute dtype.
at::Tensor angle_table(const at::Tensor& t, const at::Tensor& x) {
  const at::Tensor table = t.to(stat_type_of(x)).contiguous();
  return t.dim() == 2 ? table.unsqueeze(0) : table;
}

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool interleaved, bool conjugate) {
  check_dim(x, "x", 4);  // (B, H, T, D)
  check_floating(x, "x");
  check_fits_index(x, "x");
  check_fits_strides(x, "x");
  check_defined(cos, "cos");
  FUSEDLM_CHECK_VALUE(cos.dim() == 2 || cos.dim() == 3,
                      "argument 'cos' must be 2-D (T, R/2) or 3-D (B, T, R/2), got shape ",
                      cos.sizes());
  check_floating(cos, "cos");
  check_same_device(cos, "cos", x, "x");
  FUSEDLM_CHECK_VALUE(cos.size(-2) == x.size(2), "argument 'cos' has ", cos.size(-2),
                      " positions but 'x' has T = ", x.size(2));
  FUSEDLM_CHECK_VALUE(cos.dim() == 2 || cos.size(0) == x.size(0) || cos.size(0) == 1,
                      "argument 'cos' has ", cos.size(0), " batch rows but 'x' has B = ",
                      x.size(0), " (one row is shared by all)");
  FUSEDLM_CHECK_VALUE(cos.size(-1) >= 1 && 2 * cos.size(-1) <= x.size(3),
                      "argument 'cos' must have between 1 and D/2 = ", x.size(3) / 2,
                      " angles per position, got ", cos.size(-1));
  check_defined(sin, "sin");
  check_shape(sin, "sin", cos.sizes());
  check_floating(sin, "sin");
  check_same_device(sin, "sin", x, "x");
  require_cpu_kernel(x, "x", "rotary_embedding");
  return cpu::rotary_embedding(x, angle_table(cos, x), angle_table(sin, x), interleaved,
                               conjugate);
}

void check_glu_operand(const at::Tensor& t, const char* name, const at::Tensor& gate) {
  check_dim(t, name, 2);  // (N, I)
  check_shape(t, name, gate.sizes());
  check_same_dtype(t, name, gate, "gate");
  check_same_device(t, name, gate, "gate");
  check_fits_strides(t, name);
}

// The gate's activation of glu_fwd/bwd, by name.
cpu::GluActivation glu_activation(const std::string& activation) {
  if (activation == "silu") return cpu::GluActivation::silu;
  if (activation == "gelu") return cpu::GluActivation::gelu;
  FUSEDLM_CHECK_VALUE(activation == "gelu_tanh",
                      "argument 'activation' must be 'silu', 'gelu' or 'gelu_tanh', got '",
                      activation, "'");
  return cpu::GluActivation::gelu_tanh;
}

at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up, const std::string& activation) {
  const cpu::GluActivation act = glu_activation(activation);
  check_dim(gate, "gate", 2);
  check_floating(gate, "gate");
  check_fits_index(gate, "gate");
  check_fits_strides(gate, "gate");
  check_glu_operand(up, "up", gate);
  require_cpu_kernel(gate, "gate", "glu_fwd");
  return cpu::glu_fwd(gate, up, act);
}

std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                           const at::Tensor& up, const std::string& activation) {
  const cpu::GluActivation act = glu_activation(activation);
  check_dim(gate, "gate", 2);
  check_floating(gate, "gate");
  check_fits_index(gate, "gate");
  check_fits_strides(gate, "gate");
  check_glu_operand(up, "up", gate);
  check_glu_operand(grad_out, "grad_out", gate);
  require_cpu_kernel(gate, "gate", "glu_bwd");
  return cpu::glu_bwd(grad_out, gate, up, act);
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

// The extensions over the CPU kernel's arguments (master weights, device step counts, a device
// lr, GradScaler's grad_scale / found_inf) on the CPU: done around cpu::adamw_step with tensor
// ops, same semantics as the CUDA kernel (which handles them in the kernel).
void adamw_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs,
                    const std::vector<at::Tensor>& exp_avg_sqs,
                    const std::vector<at::Tensor>& max_exp_avg_sqs,
                    const std::vector<double>& steps, double lr, double beta1, double beta2,
                    double eps, double weight_decay, bool amsgrad, bool maximize,
                    const std::vector<at::Tensor>& master_params,
                    const std::vector<at::Tensor>& step_tensors,
                    const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  if (found_inf.has_value() && found_inf->item<double>() != 0) return;
  if (lr_tensor.has_value()) {
    lr = lr_tensor->item<double>();
    FUSEDLM_CHECK_VALUE(lr >= 0 && std::isfinite(lr),
                        "argument 'lr_tensor' must be finite and >= 0, got ", lr);
  }
  std::vector<double> step_values = steps;  // [n]
  if (!step_tensors.empty()) {
    step_values.clear();
    for (size_t i = 0; i < step_tensors.size(); ++i) {
      const double step = step_tensors[i].item<double>();
      FUSEDLM_CHECK_VALUE(step >= 1 && std::isfinite(step), "argument 'step_tensors[", i,
                          "]' must be finite and >= 1, got ", step);
      step_values.push_back(step);
    }
  }
  if (grad_scale.has_value()) {
    // In place, as torch's fused AdamW stores the unscaled grads; a 0-d divisor keeps the grad's
    // dtype (computed in float32, rounded once).
    const at::Tensor scale = grad_scale->reshape({});
    for (const at::Tensor& g : grads) g.div_(scale);
  }
  if (master_params.empty()) {
    cpu::adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_values, lr, beta1,
                    beta2, eps, weight_decay, amsgrad, maximize);
    return;
  }
  std::vector<at::Tensor> grads_f32;  // [n] float32 copies for the float32 master update
  grads_f32.reserve(grads.size());
  for (const at::Tensor& g : grads) grads_f32.push_back(g.to(at::kFloat).contiguous());
  cpu::adamw_step(master_params, grads_f32, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_values,
                  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize);
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(master_params[i]);
}

void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize, const std::vector<at::Tensor>& master_params,
                const std::vector<at::Tensor>& step_tensors,
                const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
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
  if (step_tensors.empty()) {
    FUSEDLM_CHECK_VALUE(steps.size() == params.size(), "argument 'steps' has ", steps.size(),
                        " entries but 'params' has ", params.size());
  } else {
    FUSEDLM_CHECK_VALUE(steps.empty(), "arguments 'steps' and 'step_tensors' exclude each other; "
                        "'steps' must be empty when 'step_tensors' is given");
    FUSEDLM_CHECK_VALUE(step_tensors.size() == params.size(), "argument 'step_tensors' has ",
                        step_tensors.size(), " tensors but 'params' has ", params.size());
    for (size_t i = 0; i < step_tensors.size(); ++i) {
      const std::string where = "step_tensors[" + std::to_string(i) + "]";
      check_scalar_tensor(step_tensors[i], where.c_str(), params[i].device(), false, true);
    }
  }
  if (!master_params.empty()) {
    FUSEDLM_CHECK_VALUE(master_params.size() == params.size(), "argument 'master_params' has ",
                        master_params.size(), " tensors but 'params' has ", params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string where = "master_params[" + std::to_string(i) + "]";
      const at::Tensor& m = master_params[i];
      check_defined(m, where.c_str());
      FUSEDLM_CHECK_TYPE(params[i].scalar_type() == at::kBFloat16 ||
                             params[i].scalar_type() == at::kHalf,
                         "master weights are for bfloat16/float16 params; params[", i, "] is ",
                         params[i].scalar_type());
      FUSEDLM_CHECK_TYPE(m.scalar_type() == at::kFloat, "argument '", where,
                         "' must be float32, got ", m.scalar_type());
      FUSEDLM_CHECK_TYPE(exp_avgs[i].scalar_type() == at::kFloat, "with master weights the states "
                         "must be float32; exp_avgs[", i, "] is ", exp_avgs[i].scalar_type());
      FUSEDLM_CHECK_VALUE(m.sizes() == params[i].sizes(), "argument '", where, "' has shape ",
                          m.sizes(), " but params[", i, "] has ", params[i].sizes());
      FUSEDLM_CHECK_VALUE(m.is_contiguous(), "argument '", where, "' must be contiguous");
      check_same_device(m, where.c_str(), params[i], "params");
    }
  }
  if (!params.empty()) {
    const at::Device device = params[0].device();
    // A device lr is read by the kernel as float32; a CPU one is read on the host.
    const bool lr_on_device = lr_tensor.has_value() && lr_tensor->defined() &&
                              !lr_tensor->device().is_cpu();
    check_scalar_tensor(lr_tensor, "lr_tensor", device, true, lr_on_device);
    check_scalar_tensor(grad_scale, "grad_scale", device, false, true);
    check_scalar_tensor(found_inf, "found_inf", device, false, true);
  }
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
#ifdef FUSEDLM_WITH_CUDA
  if (params[0].is_cuda()) {
    cuda_glue::adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                          beta2, eps, weight_decay, amsgrad, maximize, master_params,
                          step_tensors, lr_tensor, grad_scale, found_inf);
    return;
  }
#endif
  require_cpu_kernel(params[0], "params", "adamw_step");
  adamw_step_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
                 eps, weight_decay, amsgrad, maximize, master_params, step_tensors, lr_tensor,
                 grad_scale, found_inf);
}

// ---- autograd for eager calls ----------------------------------------------------------------
//
// The autograd.Function of the norms and attention in C++, for the eager calls that
// python/fusedlm/ops routes to this extension (the "cpu" and "cuda" backends): the entry points
// above, as the registered custom ops (what torch.compile records) and the Python
// autograd.Function (the other backends) call them, without that Function's apply and Python
// backward callback, which cost more than the kernels on small inputs (benchmarks/NOTES.md,
// per-call overhead). None (an optional tensor) is no input of a node; saved, it is an
// undefined tensor. As on the Python path, the gradients have no second derivative: under
// create_graph=True a first backward works and differentiating its result raises.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// grads as once_differentiable returns them: when the backward itself is recorded
// (create_graph=True) and a grad it received requires grad, each output is an alias whose
// grad_fn raises if anything differentiates through it.
variable_list once_differentiable(variable_list grads, const variable_list& received) {
  const bool recorded = at::GradMode::is_enabled();
  bool differentiable = false;
  for (const auto& g : received) {
    differentiable = differentiable || (g.defined() && g.requires_grad());
  }
  if (!recorded || !differentiable) return grads;
  variable_list aliases;
  aliases.reserve(grads.size());
  for (const auto& g : grads) {
    aliases.push_back(g.defined() ? g.detach().requires_grad_(true) : at::Tensor());
  }
  torch::autograd::DelayedError error(
      "trying to differentiate twice a function that was marked with @once_differentiable",
      static_cast<int64_t>(aliases.size()));
  return error(std::move(aliases));
}

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,  // (M, N)
                            const std::optional<at::Tensor>& weight,    // (N) or None
                            const std::optional<at::Tensor>& bias,      // (N) or None
                            double eps) {
    auto [y, mean, rstd] = layer_norm_fwd(x, weight, bias, eps);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["bias_dtype"] =
        bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    at::Tensor dx, dweight, dbias;
    {
      at::NoGradGuard no_grad;
      auto [dx_, dw, db] = layer_norm_bwd(grads[0], saved[0], saved[2], saved[3],
                                          optional_tensor(saved[1]), bias_dtype >= 0);
      dx = dx_;
      dweight = dw.value_or(at::Tensor());
      dbias = db.value_or(at::Tensor());
      if (dbias.defined() && dbias.scalar_type() != static_cast<at::ScalarType>(bias_dtype)) {
        dbias = dbias.to(static_cast<at::ScalarType>(bias_dtype));  // (no weight: float32)
      }
    }
    auto out = once_differentiable({dx, dweight, dbias}, grads);
    out.push_back(at::Tensor());  // eps
    return out;
  }
};

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,  // (M, N)
                            const std::optional<at::Tensor>& weight,    // (N) or None
                            double eps) {
    auto [y, rstd] = rms_norm_fwd(x, weight, eps);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dx, dweight;
    {
      at::NoGradGuard no_grad;
      auto [dx_, dw] = rms_norm_bwd(grads[0], saved[0], saved[2], optional_tensor(saved[1]));
      dx = dx_;
      dweight = dw.value_or(at::Tensor());
    }
    auto out = once_differentiable({dx, dweight}, grads);
    out.push_back(at::Tensor());  // eps
    return out;
  }
};

// The residual-add norms: outputs y and h, both differentiable; mean/rstd are saved, not
// returned. As the Python Function: no materialized zero gradients (an h or y nothing reads
// hands the backward an undefined tensor), dx in x's dtype (a 16-bit branch beside a float32
// stream), dresidual = dh.
void save_add_norm_context(AutogradContext* ctx, const at::Tensor& x) {
  ctx->set_materialize_grads(false);
  ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
}

variable_list add_norm_grads(AutogradContext* ctx, const at::Tensor& dh, at::Tensor dweight,
                             at::Tensor dbias, const variable_list& received) {
  const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
  const at::Tensor dx = dh.defined() && dh.scalar_type() != x_dtype ? dh.to(x_dtype) : dh;
  auto out = once_differentiable({dx, dh, std::move(dweight), std::move(dbias)}, received);
  out.push_back(at::Tensor());  // eps
  return out;
}

struct AddLayerNormFunction : public torch::autograd::Function<AddLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,  // (M, N)
                               const at::Tensor& residual,                // (M, N)
                               const std::optional<at::Tensor>& weight,   // (N) or None
                               const std::optional<at::Tensor>& bias,     // (N) or None
                               double eps) {
    auto [y, h, mean, rstd] = add_layer_norm_fwd(x, residual, weight, bias, eps);
    ctx->save_for_backward({h, weight.value_or(at::Tensor()), mean, rstd});
    save_add_norm_context(ctx, x);
    ctx->saved_data["bias_dtype"] =
        bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {  // only h is read downstream: the norm passes no gradient
      return add_norm_grads(ctx, grads[1], at::Tensor(), at::Tensor(), grads);
    }
    const auto saved = ctx->get_saved_variables();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    at::Tensor dh, dweight, dbias;
    {
      at::NoGradGuard no_grad;
      auto [dh_, dw, db] = add_layer_norm_bwd(grads[0], optional_tensor(grads[1]), saved[0],
                                              saved[2], saved[3], optional_tensor(saved[1]),
                                              bias_dtype >= 0);
      dh = dh_;
      dweight = dw.value_or(at::Tensor());
      dbias = db.value_or(at::Tensor());
      if (dbias.defined() && dbias.scalar_type() != static_cast<at::ScalarType>(bias_dtype)) {
        dbias = dbias.to(static_cast<at::ScalarType>(bias_dtype));  // (no weight: float32)
      }
    }
    return add_norm_grads(ctx, dh, dweight, dbias, grads);
  }
};

struct AddRmsNormFunction : public torch::autograd::Function<AddRmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,  // (M, N)
                               const at::Tensor& residual,                // (M, N)
                               const std::optional<at::Tensor>& weight,   // (N) or None
                               double eps) {
    auto [y, h, rstd] = add_rms_norm_fwd(x, residual, weight, eps);
    ctx->save_for_backward({h, weight.value_or(at::Tensor()), rstd});
    save_add_norm_context(ctx, x);
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {
      auto out = add_norm_grads(ctx, grads[1], at::Tensor(), at::Tensor(), grads);
      out.erase(out.begin() + 3);  // (no bias)
      return out;
    }
    const auto saved = ctx->get_saved_variables();
    at::Tensor dh, dweight;
    {
      at::NoGradGuard no_grad;
      auto [dh_, dw] = add_rms_norm_bwd(grads[0], optional_tensor(grads[1]), saved[0], saved[2],
                                        optional_tensor(saved[1]));
      dh = dh_;
      dweight = dw.value_or(at::Tensor());
    }
    auto out = add_norm_grads(ctx, dh, dweight, at::Tensor(), grads);
    out.erase(out.begin() + 3);  // (no bias)
    return out;
  }
};

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q,  // (B, Hq, Tq, D)
                            const at::Tensor& k,                        // (B, Hkv, Tk, D)
                            const at::Tensor& v,                        // (B, Hkv, Tk, D)
                            double scale, bool causal, int64_t causal_offset,
                            std::optional<int64_t> window_offset,
                            const std::optional<at::Tensor>& key_range,  // (B, 2), (B, Tq, 2)
                            double softcap, double dropout_p,
                            const std::optional<at::Tensor>& dropout_seed) {  // (1) int64
    auto [out, lse] = attention_fwd(q, k, v, scale, causal, causal_offset, window_offset,
                                    key_range, softcap, dropout_p, dropout_seed);
    // (the seed too: the backward regenerates the same dropout mask)
    ctx->save_for_backward({q, k, v, out, lse, key_range.value_or(at::Tensor()),
                            dropout_seed.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["causal_offset"] = causal_offset;
    ctx->saved_data["window_offset"] =
        window_offset.has_value() ? c10::IValue(*window_offset) : c10::IValue();
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["dropout_p"] = dropout_p;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const c10::IValue& window = ctx->saved_data["window_offset"];
    at::Tensor dq, dk, dv;
    {
      at::NoGradGuard no_grad;
      std::tie(dq, dk, dv) = attention_bwd(
          grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
          ctx->saved_data["scale"].toDouble(), ctx->saved_data["causal"].toBool(),
          ctx->saved_data["causal_offset"].toInt(),
          window.isNone() ? std::nullopt : std::optional<int64_t>(window.toInt()),
          optional_tensor(saved[5]), std::nullopt, ctx->saved_data["softcap"].toDouble(),
          ctx->saved_data["dropout_p"].toDouble(), optional_tensor(saved[6]));
    }
    auto out = once_differentiable({dq, dk, dv}, grads);
    // scale, causal, causal_offset, window_offset, key_range, softcap, dropout_p, dropout_seed:
    // no gradient
    out.resize(11);
    return out;
  }
};

// act(gate) * up; the backward recomputes the activation from the saved gate (as the Python
// Function: the output is not saved).
struct GluFunction : public torch::autograd::Function<GluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate,  // (N, I)
                            const at::Tensor& up,                         // (N, I)
                            const std::string& activation) {
    at::Tensor out = glu_fwd(gate, up, activation);
    ctx->save_for_backward({gate, up});
    ctx->saved_data["activation"] = activation;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dgate, dup;
    {
      at::NoGradGuard no_grad;
      std::tie(dgate, dup) =
          glu_bwd(grads[0], saved[0], saved[1], ctx->saved_data["activation"].toStringRef());
    }
    auto out = once_differentiable({dgate, dup}, grads);
    out.push_back(at::Tensor());  // activation
    return out;
  }
};

// The rotation of x; its backward rotates the gradient the other way (a rotation's transpose).
// cos and sin take no gradient here: calls whose tables require grad run the torch reference.
struct RotaryEmbeddingFunction : public torch::autograd::Function<RotaryEmbeddingFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,  // (B, H, T, D)
                            const at::Tensor& cos,  // (T, R/2) or (B or 1, T, R/2)
                            const at::Tensor& sin,  // as cos
                            bool interleaved, bool conjugate) {
    at::Tensor out = rotary_embedding(x, cos, sin, interleaved, conjugate);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["conjugate"] = conjugate;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dx;
    {
      at::NoGradGuard no_grad;
      dx = rotary_embedding(grads[0], saved[0], saved[1], ctx->saved_data["interleaved"].toBool(),
                            !ctx->saved_data["conjugate"].toBool());
    }
    auto out = once_differentiable({dx}, grads);
    out.insert(out.end(), 4, at::Tensor());  // cos, sin, interleaved, conjugate
    return out;
  }
};

at::Tensor rotary_embedding_autograd(const at::Tensor& x, const at::Tensor& cos,
                                     const at::Tensor& sin, bool interleaved) {
  return RotaryEmbeddingFunction::apply(x, cos, sin, interleaved, false);
}

at::Tensor glu_autograd(const at::Tensor& gate, const at::Tensor& up,
                        const std::string& activation) {
  return GluFunction::apply(gate, up, activation);
}

at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              double scale, bool causal, int64_t causal_offset,
                              std::optional<int64_t> window_offset,
                              const std::optional<at::Tensor>& key_range, double softcap,
                              double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  return AttentionFunction::apply(q, k, v, scale, causal, causal_offset, window_offset,
                                  key_range, softcap, dropout_p, dropout_seed);
}

at::Tensor layer_norm_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
  return LayerNormFunction::apply(x, weight, bias, eps);
}

at::Tensor rms_norm_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             double eps) {
  return RmsNormFunction::apply(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_autograd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  auto out = AddLayerNormFunction::apply(x, residual, weight, bias, eps);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_autograd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    double eps) {
  auto out = AddRmsNormFunction::apply(x, residual, weight, eps);
  return {out[0], out[1]};
}

// Adds `amount` to every step count and returns the new values: what torch.optim's
// `torch._foreach_add_(steps, 1)` followed by a host read of each count does, without a
// dispatcher call per tensor (on the CPU those cost ~2.5 us each, most of a GPT-2-sized
// optimizer step's host time). Counts are one-element tensors (torch.optim keeps them as
// float32, or float64 under a float64 default dtype, on the CPU); others go through add_/item.
std::vector<double> increment_steps(const std::vector<at::Tensor>& steps, double amount) {
  std::vector<double> values;  // [n]
  values.reserve(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& t = steps[i];
    const std::string where = "steps[" + std::to_string(i) + "]";
    check_defined(t, where.c_str());
    FUSEDLM_CHECK_VALUE(t.numel() == 1, "argument '", where,
                        "' must be a one-element step count, got shape ", t.sizes());
    if (t.is_cpu() && t.layout() == at::kStrided && t.scalar_type() == at::kFloat) {
      float* count = t.data_ptr<float>();
      *count = static_cast<float>(*count + amount);  // float32 + python 1, as foreach_add_ rounds
      values.push_back(*count);
      if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    } else if (t.is_cpu() && t.layout() == at::kStrided && t.scalar_type() == at::kDouble) {
      double* count = t.data_ptr<double>();
      *count += amount;
      values.push_back(*count);
      if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    } else {
      t.add_(amount);
      values.push_back(t.item<double>());
    }
  }
  return values;
}

constexpr const char* kCpuIsaNames[] = {"generic", "avx2", "avx512"};

std::string cpu_isa() {
  return kCpuIsaNames[cpu::cpu_isa_in_use().load(std::memory_order_relaxed)];
}

// Caps the CPU kernels at `name` (generic, avx2 or avx512), which must not exceed what the
// CPU has. Returns the previous setting.
std::string set_cpu_isa(const std::string& name) {
  int level = -1;
  for (int i = 0; i < 3; ++i) {
    if (name == kCpuIsaNames[i]) level = i;
  }
  FUSEDLM_CHECK_VALUE(level >= 0, "argument 'name' must be one of generic, avx2, avx512, got '",
                      name, "'");
  const int detected = static_cast<int>(cpu::cpu_isa_detected());
  FUSEDLM_CHECK_VALUE(level <= detected, "argument 'name' asks for ", name,
                      " but this CPU's best is ", kCpuIsaNames[detected]);
  return kCpuIsaNames[cpu::cpu_isa_in_use().exchange(level)];
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
  m.def("cuda_architectures", [] {
#ifdef FUSEDLM_CUDA_ARCHITECTURES
    return std::string(FUSEDLM_CUDA_ARCHITECTURES);
#else
    return std::string();
#endif
  }, "The CUDA architectures compiled in, comma-separated as CMake names them (\"80,90a-real\": "
     "\"-real\" is machine code only, \"-virtual\" PTX only, neither both); empty without CUDA.");
  m.def("cpu_isa", &fusedlm::cpu_isa,
        "Instruction set the CPU kernels use: 'avx512', 'avx2' or 'generic' (portable C++).");
  m.def("cpu_isa_detected", [] { return std::string(fusedlm::kCpuIsaNames[static_cast<int>(
                                     fusedlm::cpu::cpu_isa_detected())]); },
        "The best instruction set this CPU has that the CPU kernels have code for.");
  m.def("set_cpu_isa", &fusedlm::set_cpu_isa, py::arg("name"),
        "Cap the CPU kernels at 'generic', 'avx2' or 'avx512' (at most cpu_isa_detected());\n"
        "returns the previous setting. FUSEDLM_CPU_ISA sets it when the extension loads.");

  m.def("attention_fwd", &fusedlm::attention_fwd,
        "Flash-attention forward.\n"
        "q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), any strides. Key j is visible to query i iff\n"
        "(not causal or j <= i + causal_offset) and (window_offset is None or\n"
        "j >= i + window_offset) and, given key_range (B, 2) integers on q's device,\n"
        "key_range[b, 0] <= j < key_range[b, 1] in batch row b (with key_range (B, Tq, 2):\n"
        "key_range[b, i, 0] <= j < key_range[b, i, 1]). Returns out (B, Hq, Tq, D) in\n"
        "q's dtype and lse (B, Hq, Tq) float32 (float64 for float64 inputs). softcap > 0\n"
        "caps each score s = scale * q.k at softcap * tanh(s / softcap) first (Gemma 2).\n"
        "dropout_p in [0, 1) drops probabilities after the softmax by the Philox stream of\n"
        "dropout_seed (fusedlm.reference.attention_dropout_keep), a one-element int64 tensor\n"
        "on q's device (read by the kernels: a CUDA graph's replays may draw it anew), scaling\n"
        "the rest by 1 / (1 - dropout_p).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("causal"),
        py::arg("causal_offset"), py::arg("window_offset") = py::none(),
        py::arg("key_range") = py::none(), py::arg("softcap") = 0.0,
        py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = py::none());
  m.def("attention_bwd", &fusedlm::attention_bwd,
        "Flash-attention backward: recomputes the probabilities from lse. Returns dq, dk, dv\n"
        "in the shapes and dtypes of q, k, v (dk, dv summed over the query heads of a kv head).\n"
        "grad_lse (B, Hq, Tq) in lse's dtype, or None: the gradient of lse, when it was used.",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("scale"), py::arg("causal"), py::arg("causal_offset"),
        py::arg("window_offset") = py::none(), py::arg("key_range") = py::none(),
        py::arg("grad_lse") = py::none(), py::arg("softcap") = 0.0,
        py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = py::none());
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
  m.def("add_layer_norm_fwd", &fusedlm::add_layer_norm_fwd,
        "The residual add fused into LayerNorm: h = x + residual (rounded once to residual's\n"
        "dtype) and y = LayerNorm(h). x (M, N) in residual's dtype, or bfloat16/float16 beside a\n"
        "float32 residual. Returns y, h (M, N) in residual's dtype, mean and rstd (M).",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("add_layer_norm_bwd", &fusedlm::add_layer_norm_bwd,
        "add_layer_norm_fwd's backward. grad_h (M, N) or None is h's own gradient. Returns dh\n"
        "(M, N) in h's dtype (the gradient of x and residual), dweight and dbias (N) or None.",
        py::arg("grad_y"), py::arg("grad_h"), py::arg("h"), py::arg("mean"), py::arg("rstd"),
        py::arg("weight"), py::arg("has_bias"));
  m.def("add_rms_norm_fwd", &fusedlm::add_rms_norm_fwd,
        "The residual add fused into RMSNorm. Returns y, h (M, N) in residual's dtype, rstd (M).",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm_bwd", &fusedlm::add_rms_norm_bwd,
        "add_rms_norm_fwd's backward. Returns dh (M, N) in h's dtype and dweight (N) or None.",
        py::arg("grad_y"), py::arg("grad_h"), py::arg("h"), py::arg("rstd"), py::arg("weight"));
  m.def("attention_autograd", &fusedlm::attention_autograd,
        "attention_fwd's out with a C++ autograd node whose backward runs attention_bwd (eager\n"
        "calls of the cpu and cuda backends; no second derivative). softcap, dropout_p and\n"
        "dropout_seed as attention_fwd's; the backward regenerates the dropout mask.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("causal"),
        py::arg("causal_offset"), py::arg("window_offset") = py::none(),
        py::arg("key_range") = py::none(), py::arg("softcap") = 0.0,
        py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = py::none());
  m.def("rotary_embedding_autograd", &fusedlm::rotary_embedding_autograd,
        "rotary_embedding's out (conjugate false) with a C++ autograd node whose backward\n"
        "rotates the gradient back (eager calls of the cpu backend; no gradient for cos and\n"
        "sin; no second derivative).",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("interleaved"));
  m.def("glu_autograd", &fusedlm::glu_autograd,
        "glu_fwd's out with a C++ autograd node whose backward runs glu_bwd (eager calls of\n"
        "the cpu backend; no second derivative).",
        py::arg("gate"), py::arg("up"), py::arg("activation"));
  m.def("layer_norm_autograd", &fusedlm::layer_norm_autograd,
        "layer_norm_fwd's y with a C++ autograd node whose backward runs layer_norm_bwd (eager\n"
        "calls of the cpu and cuda backends; no second derivative).",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("rms_norm_autograd", &fusedlm::rms_norm_autograd,
        "rms_norm_fwd's y with a C++ autograd node whose backward runs rms_norm_bwd.",
        py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_layer_norm_autograd", &fusedlm::add_layer_norm_autograd,
        "add_layer_norm_fwd's y and h with a C++ autograd node whose backward runs\n"
        "add_layer_norm_bwd (eager calls of the cpu backend; no second derivative).",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("add_rms_norm_autograd", &fusedlm::add_rms_norm_autograd,
        "add_rms_norm_fwd's y and h with a C++ autograd node whose backward runs\n"
        "add_rms_norm_bwd.",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("increment_steps", &fusedlm::increment_steps,
        "Adds 'amount' to each one-element step count tensor in place (float32/float64 CPU\n"
        "counts without a dispatcher call) and returns the new values as floats.",
        py::arg("steps"), py::arg("amount"));
  m.def("cross_entropy_fwd", &fusedlm::cross_entropy_fwd,
        "Cross-entropy of each row. logits (N, V) any strides, float; target (N) int64.\n"
        "Returns loss, row_max, log_sum (N) in float32 (float64 for float64 logits); loss 0\n"
        "where target == ignore_index, NaN where it is outside [0, V); z_loss adds\n"
        "z_loss * logsumexp^2 to each row's loss.",
        py::arg("logits"), py::arg("target"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss") = 0.0);
  m.def("cross_entropy_bwd", &fusedlm::cross_entropy_bwd,
        "Cross-entropy backward. grad_loss (N) any stride -> dlogits (N, V) in the logits'\n"
        "dtype, written into 'out' when given: an (N, V) contiguous tensor that is the logits\n"
        "themselves (the gradient replaces them) or does not overlap them.",
        py::arg("grad_loss"), py::arg("logits"), py::arg("target"), py::arg("row_max"),
        py::arg("log_sum"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("out") = py::none(), py::arg("z_loss") = 0.0);
  m.def("rotary_embedding", &fusedlm::rotary_embedding,
        "Rotary position embeddings. x (B, H, T, D) any strides; cos, sin (T, R/2) or\n"
        "(B or 1, T, R/2), R <= D. Returns (B, H, T, D) contiguous in x's dtype: the first R features\n"
        "rotated pairwise, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), pairs (i, i + R/2) or\n"
        "(2i, 2i + 1) when interleaved, sin negated when conjugate (the backward); the rest\n"
        "copied. Computed in float32 (float64 for float64 x).",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("interleaved"),
        py::arg("conjugate"));
  m.def("glu_fwd", &fusedlm::glu_fwd,
        "Gated linear unit act(gate) * up, activation 'silu' (SwiGLU), 'gelu' (exact, erf) or\n"
        "'gelu_tanh' (torch's approximate='tanh'). gate, up (N, I) any strides, one float dtype\n"
        "-> (N, I) contiguous, computed in float32 (float64 for float64 inputs).",
        py::arg("gate"), py::arg("up"), py::arg("activation"));
  m.def("glu_bwd", &fusedlm::glu_bwd,
        "Gated linear unit backward. grad_out, gate, up (N, I) any strides -> dgate =\n"
        "grad_out * up * act'(gate), dup = grad_out * act(gate), (N, I) contiguous in gate's\n"
        "dtype.",
        py::arg("grad_out"), py::arg("gate"), py::arg("up"), py::arg("activation"));
  m.def("adamw_step", &fusedlm::adamw_step,
        "One AdamW step over a whole list of tensors, in place (torch.optim.AdamW's arithmetic).\n"
        "steps[i] is param i's step count after this step's increment.\n"
        "Keyword-only extensions (CPU and CUDA, same semantics):\n"
        "  master_params: float32 master weights of bfloat16/float16 params (float32 states): the\n"
        "    update runs on them and params get their rounding.\n"
        "  step_tensors: one-element float32 step counts on the params' device (after the\n"
        "    increment), instead of 'steps' (which must then be empty).\n"
        "  lr_tensor: a one-element lr tensor (float32 on the params' device, or on the CPU) that\n"
        "    replaces 'lr'; read in the kernel, so the step can be captured in a CUDA graph.\n"
        "  grad_scale, found_inf: GradScaler's one-element float32 tensors, as torch's fused AdamW\n"
        "    takes them: grads are divided by grad_scale in place (the unscaled grads are stored\n"
        "    back); nothing changes when found_inf is nonzero (step counts are the caller's).",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"),
        py::arg("maximize"), py::kw_only(), py::arg("master_params") = py::list(),
        py::arg("step_tensors") = py::list(), py::arg("lr_tensor") = py::none(),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none());
}
