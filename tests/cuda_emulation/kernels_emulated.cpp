// csrc/cuda's launchers and kernels (attention, LayerNorm/RMSNorm, AdamW), unchanged, compiled
// for the CPU emulation of warp_emulation.h, behind a C ABI that tests/cuda_emulation calls
// through ctypes. Build: g++ -std=c++20 -O1 -shared -fPIC -I<repo>/csrc -I<cuda>/include.
#include <algorithm>

#include "warp_emulation.h"

#include "cuda/adamw.cu"
#include "cuda/attention_bwd.cu"
#include "cuda/attention_bwd_sm90.cu"
#include "cuda/attention_fwd.cu"
#include "cuda/attention_fwd_sm90.cu"
#include "cuda/norm.cu"

// The CUDA runtime calls the launchers make, answered for the emulated device: an H100's 227 KiB
// of opt-in shared memory per block unless emulated_configure says otherwise.
static int emulated_max_shared_bytes = 232448;
// Compute capability 10 * major + minor: 80 runs the sm_80 kernels everywhere; 90 lets the
// launchers take the Hopper (sm_90a) forward where it applies.
static int emulated_compute_capability = 80;
// The score modifiers (soft-capping, dropout) of the attention calls: emulated_set_score_mods.
static double emulated_softcap = 0.0;
static double emulated_dropout_p = 0.0;
// The seed the kernels read from "device" memory (AttentionShape::dropout_seed).
static int64_t emulated_dropout_seed = 0;

extern "C" {
cudaError_t cudaGetLastError(void) {
  return emu::fault().empty() ? cudaSuccess : cudaErrorLaunchFailure;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = emulated_max_shared_bytes;
  } else if (attr == cudaDevAttrMultiProcessorCount) {
    *value = 132;
  } else if (attr == cudaDevAttrComputeCapabilityMajor) {
    *value = emulated_compute_capability / 10;
  } else if (attr == cudaDevAttrComputeCapabilityMinor) {
    *value = emulated_compute_capability % 10;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
}

namespace {

fusedlm::cuda::AttentionInput input(const void* data, const int64_t* strides) {
  return fusedlm::cuda::AttentionInput{data, strides[0], strides[1], strides[2]};
}

// shape: B, Hq, Hkv, Tq, Tk, D, causal, causal_offset, windowed, window_offset,
// key_range_per_query; dtype 0 float16, 1 bfloat16.
fusedlm::cuda::AttentionShape make_shape(const int64_t* shape, double scale, int dtype) {
  fusedlm::cuda::AttentionShape s{};
  s.B = shape[0];
  s.Hq = shape[1];
  s.Hkv = shape[2];
  s.Tq = shape[3];
  s.Tk = shape[4];
  s.D = shape[5];
  s.causal = shape[6] != 0;
  s.causal_offset = shape[7];
  s.windowed = shape[8] != 0;
  s.window_offset = shape[9];
  s.key_range_per_query = shape[10] != 0;
  s.scale = scale;
  s.dtype = dtype == 0 ? fusedlm::cuda::DType::kFloat16 : fusedlm::cuda::DType::kBFloat16;
  s.softcap = emulated_softcap;
  s.dropout_p = emulated_dropout_p;
  // (nullptr without dropout: a kernel reading it then faults)
  s.dropout_seed = emulated_dropout_p > 0 ? &emulated_dropout_seed : nullptr;
  return s;
}

struct Scratch {
  std::vector<std::vector<unsigned char>> buffers;
};

void* allocate(size_t bytes, void* context) {
  auto* scratch = static_cast<Scratch*>(context);
  // Garbage, as from a caching allocator: a kernel relying on zeroed scratch shows.
  scratch->buffers.emplace_back(bytes + 16, static_cast<unsigned char>(0x7f));
  auto address = reinterpret_cast<uintptr_t>(scratch->buffers.back().data());
  return reinterpret_cast<void*>((address + 15) / 16 * 16);
}

}  // namespace

extern "C" {

// late_copies: cp.async lands at the wait (1) or at issue (0); schedule: 0 lockstep, 1 warps
// first to last, 2 warps last to first (warp_emulation.h); max_shared_bytes: the device's opt-in
// shared memory per block (232448 H100, 166912 A100, 101376 sm_86/sm_89). For the calls after,
// which have no score modifiers until emulated_set_score_mods.
void emulated_configure(int late_copies, int schedule, int max_shared_bytes) {
  emulated_max_shared_bytes = max_shared_bytes;
  emulated_softcap = emulated_dropout_p = 0.0;
  emulated_dropout_seed = 0;
  emu::fault().clear();
  emu::late_copies() = late_copies != 0;
  emu::schedule() = static_cast<emu::Schedule>(schedule);
}

// The attention calls' soft-capping and dropout (AttentionShape's softcap, dropout_p,
// dropout_seed), for the calls after; all 0: none.
void emulated_set_score_mods(double softcap, double dropout_p, int64_t dropout_seed) {
  emulated_softcap = softcap;
  emulated_dropout_p = dropout_p;
  emulated_dropout_seed = dropout_seed;
}

// 80 (sm_80 kernels, the default) or 90 (Hopper forward where it applies), for the calls after.
void emulated_set_compute_capability(int capability) { emulated_compute_capability = capability; }

// The fault that failed the last launch ("" when none), e.g. a shared-memory access out of range.
const char* emulated_fault() { return emu::fault().c_str(); }

// Strides: 3 per tensor (batch, head, token), in elements. Returns the cudaError_t.
// hopper: 0 the launcher the bindings call (attention_fwd), 1 the sm_90a kernel alone
// (cudaErrorNotSupported when it does not apply). key_range: (B, 2) int32, (B, Tq, 2) when
// shape says per query, or null.
int emulated_attention_fwd(const int64_t* shape, double scale, int dtype, int hopper,
                           const void* q, const int64_t* q_strides, const void* k,
                           const int64_t* k_strides, const void* v, const int64_t* v_strides,
                           void* out, float* lse, const int32_t* key_range) {
  fusedlm::cuda::AttentionFwdArgs args{};
  args.shape = make_shape(shape, scale, dtype);
  args.shape.key_range = key_range;
  args.q = input(q, q_strides);
  args.k = input(k, k_strides);
  args.v = input(v, v_strides);
  args.out = out;
  args.lse = lse;
  Scratch scratch;
  args.alloc = &allocate;
  args.alloc_context = &scratch;
  return static_cast<int>(hopper ? fusedlm::cuda::attention::sm90::attention_fwd_sm90(args, nullptr)
                                  : fusedlm::cuda::attention_fwd(args, nullptr));
}

// attention_fwd_plan for a call of `shape` (with a key range when has_key_range) on a device of
// sm_count SMs: the shape the kernels see (B, Hq, Hkv, Tq, Tk, causal, causal_offset, windowed,
// window_offset, key_range_per_query) to plan[0..9], whether the query heads were packed into
// rows to plan[10], the key splits to plan[11].
void emulated_attention_fwd_plan(const int64_t* shape, int has_key_range, int sm_count,
                                 int64_t* plan) {
  static const int32_t any_key_range[2] = {0, 0};  // only its presence is looked at
  fusedlm::cuda::AttentionFwdArgs args{};
  args.shape = make_shape(shape, 1.0, 0);
  args.shape.key_range = has_key_range ? any_key_range : nullptr;
  args.alloc = &allocate;  // (a plan allocates nothing)
  const fusedlm::cuda::AttentionFwdPlan p = fusedlm::cuda::attention_fwd_plan(args, sm_count);
  const fusedlm::cuda::AttentionShape& s = p.shape;
  const int64_t values[12] = {s.B, s.Hq, s.Hkv, s.Tq, s.Tk, s.causal, s.causal_offset,
                              s.windowed, s.window_offset, s.key_range_per_query,
                              p.heads_packed, p.key_splits};
  std::copy(values, values + 12, plan);
}

int emulated_attention_bwd(const int64_t* shape, double scale, int dtype, int deterministic, const void* q, const int64_t* q_strides,
                           const void* k, const int64_t* k_strides, const void* v,
                           const int64_t* v_strides, const void* out, const int64_t* out_strides,
                           const void* grad_out, const int64_t* grad_out_strides,
                           const float* lse, void* dq, void* dk, void* dv,
                           const int32_t* key_range, const float* grad_lse) {
  Scratch scratch;
  fusedlm::cuda::AttentionBwdArgs args{};
  args.shape = make_shape(shape, scale, dtype);
  args.shape.key_range = key_range;
  args.q = input(q, q_strides);
  args.k = input(k, k_strides);
  args.v = input(v, v_strides);
  args.out = input(out, out_strides);
  args.grad_out = input(grad_out, grad_out_strides);
  args.lse = lse;
  args.grad_lse = grad_lse;
  args.dq = dq;
  args.dk = dk;
  args.dv = dv;
  args.deterministic = deterministic != 0;
  args.alloc = &allocate;
  args.alloc_context = &scratch;
  return static_cast<int>(fusedlm::cuda::attention_bwd(args, nullptr));
}

// LayerNorm / RMSNorm: dtype codes 0 float16, 1 bfloat16, 2 float32, 3 float64.
static fusedlm::cuda::DType dtype_of(int code) {
  using fusedlm::cuda::DType;
  return code == 0 ? DType::kFloat16 : code == 1 ? DType::kBFloat16 : code == 2 ? DType::kFloat32
                                                                      : DType::kFloat64;
}

int emulated_norm_fwd(const void* x, const void* weight, const void* bias, void* y, void* mean,
                      void* rstd, int64_t M, int64_t N, double eps, int x_dtype, int param_dtype,
                      int rms) {
  fusedlm::cuda::NormFwdArgs args{};
  args.x = x;
  args.weight = weight;
  args.bias = bias;
  args.y = y;
  args.mean = mean;
  args.rstd = rstd;
  args.M = M;
  args.N = N;
  args.eps = eps;
  args.x_dtype = dtype_of(x_dtype);
  args.param_dtype = dtype_of(param_dtype);
  args.rms = rms != 0;
  return static_cast<int>(fusedlm::cuda::norm_fwd(args, nullptr));
}

int emulated_norm_bwd(const void* grad_y, const void* x, const void* mean, const void* rstd,
                      const void* weight, void* dx, void* dweight, void* dbias, int64_t M,
                      int64_t N, int x_dtype, int param_dtype, int rms) {
  Scratch scratch;
  fusedlm::cuda::NormBwdArgs args{};
  args.grad_y = grad_y;
  args.x = x;
  args.mean = mean;
  args.rstd = rstd;
  args.weight = weight;
  args.dx = dx;
  args.dweight = dweight;
  args.dbias = dbias;
  args.M = M;
  args.N = N;
  args.x_dtype = dtype_of(x_dtype);
  args.param_dtype = dtype_of(param_dtype);
  args.rms = rms != 0;
  args.alloc = &allocate;
  args.alloc_context = &scratch;
  return static_cast<int>(fusedlm::cuda::norm_bwd(args, nullptr));
}

// AdamW over `count` tensors: pointer arrays (`masters` null for none), numels, one step count.
int emulated_adamw_step(int param_dtype, int state_dtype, int count, void** params, void** grads,
                        void** exp_avgs, void** exp_avg_sqs, void** max_exp_avg_sqs,
                        void** masters, const int64_t* numels, double step, double lr, double beta1,
                        double beta2, double eps, double weight_decay, int amsgrad, int maximize,
                        const float* grad_scale, const float* found_inf) {
  std::vector<fusedlm::cuda::AdamWTensor> tensors(count);
  for (int i = 0; i < count; ++i) {
    tensors[i].param = params[i];
    tensors[i].grad = grads[i];
    tensors[i].exp_avg = exp_avgs[i];
    tensors[i].exp_avg_sq = exp_avg_sqs[i];
    tensors[i].max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i] : nullptr;
    tensors[i].master = masters == nullptr ? nullptr : static_cast<float*>(masters[i]);
    tensors[i].numel = numels[i];
    tensors[i].step = step;
    tensors[i].step_ptr = nullptr;
  }
  fusedlm::cuda::AdamWHyper hyper{};
  hyper.lr = lr;
  hyper.lr_ptr = nullptr;
  hyper.beta1 = beta1;
  hyper.beta2 = beta2;
  hyper.eps = eps;
  hyper.weight_decay = weight_decay;
  hyper.amsgrad = amsgrad != 0;
  hyper.maximize = maximize != 0;
  hyper.grad_scale = grad_scale;
  hyper.found_inf = found_inf;
  return static_cast<int>(fusedlm::cuda::adamw_step(dtype_of(param_dtype), dtype_of(state_dtype),
                                                    tensors.data(), count, hyper, nullptr));
}

}  // extern "C"
