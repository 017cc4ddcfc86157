// Multi-tensor AdamW step on the GPU: torch.optim.AdamW's arithmetic (decoupled weight decay,
// bias correction, amsgrad, maximize), the same op order as the CPU kernel
// (csrc/cpu/adamw.cpp), run by the shared multi-tensor launcher (multi_tensor_apply.cuh).
//
// Per launch: up to kMtaMaxBlocks blocks of kMtaThreads threads, each block one 64K-element
// chunk of one tensor; a thread moves 4 elements of every list per iteration as one vector
// access (8/16/32 bytes for 16-bit/float/double) when the chunk's pointers are aligned, else
// elements one at a time. Per-tensor step counts ride in the launch's table (host values or
// pointers to device step tensors); lr may be a device scalar; GradScaler's grad_scale (grads
// are divided by it and the unscaled grads stored back) and found_inf (nonzero: the block
// returns before touching anything) are read in the kernel, as torch's fused AdamW does, so a
// step under a GradScaler needs no host synchronization and can be captured in a CUDA graph.
// Optional float32 master weights for 16-bit params: the update runs on the master copy and the
// param receives its rounding.
#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "cuda/multi_tensor_apply.cuh"

#include <cmath>
#include <cstdint>
#include <vector>

namespace fusedlm::cuda {
namespace {

constexpr int kIlp = 4;  // elements per thread per iteration (one vector access per list)

// A tensor's step count: *ptr when ptr is set, else value.
struct StepRef {
  double value;
  const float* ptr;
};

template <typename O>
__device__ __forceinline__ O sqrt_of(O v) {
  if constexpr (std::is_same_v<O, float>) {
    return sqrtf(v);
  } else {
    return sqrt(v);
  }
}

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, then max_exp_avg_sqs (amsgrad), then
// master params (kMaster).
template <typename P, typename S, bool kAmsgrad, bool kMaster>
struct AdamWFunctor {
  using O = acc_type<P>;  // compute type
  static constexpr int kDepth = 4 + (kAmsgrad ? 1 : 0) + (kMaster ? 1 : 0);
  using Meta = TensorListMeta<kDepth, StepRef>;

  double lr;
  const float* lr_ptr;      // () or nullptr
  double beta1;
  double beta2;
  double weight_decay;
  O lerp_weight;            // 1 - beta1
  O one_minus_lerp_weight;  // 1 - (1 - beta1), in O like the CPU kernel
  O beta2_o;
  O one_minus_beta2;
  O eps;
  bool lerp_weight_small;   // torch's lerp switches formula at |weight| < 0.5
  bool maximize;
  const float* grad_scale;  // () or nullptr
  const float* found_inf;   // () or nullptr

  // Per-chunk scalars, computed in double from the step and lr and rounded once, as the CPU
  // kernel and torch's fused kernel do.
  struct Scalars {
    O decay;          // 1 - lr * weight_decay
    O neg_step_size;  // -lr / (1 - beta1^step)
    O bc2_sqrt;       // sqrt(1 - beta2^step)
    O scale;          // grad_scale
  };

  // One element. p: param (or master) in, updated param out; g: grad in, unscaled grad out.
  __device__ __forceinline__ void update(O& p, O& g, O& m, O& v, O& vmax,
                                         const Scalars& s) const {
    if (grad_scale != nullptr) g = g / s.scale;
    const O grad = maximize ? -g : g;
    const O param = p * s.decay;
    const O m_new = lerp_weight_small ? m + lerp_weight * (grad - m)
                                      : grad - (grad - m) * one_minus_lerp_weight;
    const O v_new = v * beta2_o + (one_minus_beta2 * grad) * grad;
    O v_used = v_new;
    if constexpr (kAmsgrad) {
      // torch.maximum: NaN in either operand wins.
      v_used = (vmax > v_new || isnan(vmax)) ? vmax : v_new;
      vmax = v_used;
    }
    const O denom = sqrt_of(v_used) / s.bc2_sqrt + eps;
    p = param + (s.neg_step_size * m_new) / denom;
    m = m_new;
    v = v_new;
  }

  __device__ __forceinline__ void operator()(int64_t chunk_size, const Meta& meta) const {
    if (found_inf != nullptr && *found_inf != 0.f) return;
    const int t = meta.block_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * chunk_size;
    const int64_t left = meta.numel[t] - begin;
    const int64_t n = left < chunk_size ? left : chunk_size;
    const StepRef step_ref = meta.extra[t];
    const double step = step_ref.ptr != nullptr ? static_cast<double>(*step_ref.ptr) : step_ref.value;
    const double lr_value = lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr;
    const double bias_correction1 = 1.0 - pow(beta1, step);
    const double bias_correction2 = 1.0 - pow(beta2, step);
    Scalars s;
    s.decay = static_cast<O>(1.0 - lr_value * weight_decay);
    s.neg_step_size = static_cast<O>(-(lr_value / bias_correction1));
    s.bc2_sqrt = static_cast<O>(sqrt(bias_correction2));
    s.scale = grad_scale != nullptr ? static_cast<O>(*grad_scale) : O(1);

    P* param = static_cast<P*>(meta.ptrs[0][t]) + begin;          // (n)
    P* grad = static_cast<P*>(meta.ptrs[1][t]) + begin;           // (n)
    S* exp_avg = static_cast<S*>(meta.ptrs[2][t]) + begin;        // (n)
    S* exp_avg_sq = static_cast<S*>(meta.ptrs[3][t]) + begin;     // (n)
    S* max_exp_avg_sq = nullptr;                                  // (n) when amsgrad
    float* master = nullptr;                                      // (n) when kMaster
    if constexpr (kAmsgrad) max_exp_avg_sq = static_cast<S*>(meta.ptrs[4][t]) + begin;
    if constexpr (kMaster) master = static_cast<float*>(meta.ptrs[kAmsgrad ? 5 : 4][t]) + begin;
    const bool store_grad = grad_scale != nullptr;

    const bool vectorized = n % kIlp == 0 && is_aligned_dev(param, sizeof(P) * kIlp) &&
                            is_aligned_dev(grad, sizeof(P) * kIlp) &&
                            is_aligned_dev(exp_avg, sizeof(S) * kIlp) &&
                            is_aligned_dev(exp_avg_sq, sizeof(S) * kIlp) &&
                            (!kAmsgrad || is_aligned_dev(max_exp_avg_sq, sizeof(S) * kIlp)) &&
                            (!kMaster || is_aligned_dev(master, sizeof(float) * kIlp));
    if (vectorized) {
      using PP = Pack<P, kIlp>;
      using SP = Pack<S, kIlp>;
      using FP = Pack<float, kIlp>;
      for (int64_t i = threadIdx.x; i * kIlp < n; i += blockDim.x) {
        PP pv;
        FP mv_master;
        if constexpr (kMaster) {
          mv_master = reinterpret_cast<const FP*>(master)[i];
        } else {
          pv = reinterpret_cast<const PP*>(param)[i];
        }
        PP gv = reinterpret_cast<const PP*>(grad)[i];
        SP mv = reinterpret_cast<const SP*>(exp_avg)[i];
        SP vv = reinterpret_cast<const SP*>(exp_avg_sq)[i];
        SP xv;
        if constexpr (kAmsgrad) xv = reinterpret_cast<const SP*>(max_exp_avg_sq)[i];
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          O p_k;
          if constexpr (kMaster) {
            p_k = static_cast<O>(mv_master.v[k]);
          } else {
            p_k = convert<O>(pv.v[k]);
          }
          O g_k = convert<O>(gv.v[k]);
          O m_k = convert<O>(mv.v[k]);
          O v_k = convert<O>(vv.v[k]);
          O x_k = O(0);
          if constexpr (kAmsgrad) x_k = convert<O>(xv.v[k]);
          update(p_k, g_k, m_k, v_k, x_k, s);
          pv.v[k] = convert<P>(p_k);
          if constexpr (kMaster) mv_master.v[k] = static_cast<float>(p_k);
          gv.v[k] = convert<P>(g_k);
          mv.v[k] = convert<S>(m_k);
          vv.v[k] = convert<S>(v_k);
          if constexpr (kAmsgrad) xv.v[k] = convert<S>(x_k);
        }
        reinterpret_cast<PP*>(param)[i] = pv;
        if constexpr (kMaster) reinterpret_cast<FP*>(master)[i] = mv_master;
        if (store_grad) reinterpret_cast<PP*>(grad)[i] = gv;
        reinterpret_cast<SP*>(exp_avg)[i] = mv;
        reinterpret_cast<SP*>(exp_avg_sq)[i] = vv;
        if constexpr (kAmsgrad) reinterpret_cast<SP*>(max_exp_avg_sq)[i] = xv;
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        O p_k;
        if constexpr (kMaster) {
          p_k = static_cast<O>(master[i]);
        } else {
          p_k = convert<O>(param[i]);
        }
        O g_k = convert<O>(grad[i]);
        O m_k = convert<O>(exp_avg[i]);
        O v_k = convert<O>(exp_avg_sq[i]);
        O x_k = O(0);
        if constexpr (kAmsgrad) x_k = convert<O>(max_exp_avg_sq[i]);
        update(p_k, g_k, m_k, v_k, x_k, s);
        param[i] = convert<P>(p_k);
        if constexpr (kMaster) master[i] = static_cast<float>(p_k);
        if (store_grad) grad[i] = convert<P>(g_k);
        exp_avg[i] = convert<S>(m_k);
        exp_avg_sq[i] = convert<S>(v_k);
        if constexpr (kAmsgrad) max_exp_avg_sq[i] = convert<S>(x_k);
      }
    }
  }

  __device__ static __forceinline__ bool is_aligned_dev(const void* p, size_t bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
  }
};

template <typename P, typename S, bool kAmsgrad, bool kMaster>
cudaError_t adamw_typed(const AdamWTensor* tensors, int64_t count, const AdamWHyper& h,
                        cudaStream_t stream) {
  using Functor = AdamWFunctor<P, S, kAmsgrad, kMaster>;
  using O = typename Functor::O;
  using Entry = TensorListEntry<Functor::kDepth, StepRef>;
  std::vector<Entry> entries(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const AdamWTensor& t = tensors[i];
    if ((kAmsgrad && t.max_exp_avg_sq == nullptr) || (kMaster != (t.master != nullptr))) {
      return cudaErrorInvalidValue;
    }
    Entry& e = entries[static_cast<size_t>(i)];
    e.ptrs[0] = t.param;
    e.ptrs[1] = t.grad;
    e.ptrs[2] = t.exp_avg;
    e.ptrs[3] = t.exp_avg_sq;
    if constexpr (kAmsgrad) e.ptrs[4] = t.max_exp_avg_sq;
    if constexpr (kMaster) e.ptrs[kAmsgrad ? 5 : 4] = t.master;
    e.numel = t.numel;
    e.extra = StepRef{t.step, t.step_ptr};
  }
  // Scalars computed in double like torch's Python scalars, then rounded once (as the CPU kernel).
  const double lerp_weight = 1.0 - h.beta1;
  Functor f;
  f.lr = h.lr;
  f.lr_ptr = h.lr_ptr;
  f.beta1 = h.beta1;
  f.beta2 = h.beta2;
  f.weight_decay = h.weight_decay;
  f.lerp_weight = static_cast<O>(lerp_weight);
  f.one_minus_lerp_weight = O(1) - static_cast<O>(lerp_weight);
  f.beta2_o = static_cast<O>(h.beta2);
  f.one_minus_beta2 = static_cast<O>(1.0 - h.beta2);
  f.eps = static_cast<O>(h.eps);
  f.lerp_weight_small = std::abs(static_cast<O>(lerp_weight)) < O(0.5);
  f.maximize = h.maximize;
  f.grad_scale = h.grad_scale;
  f.found_inf = h.found_inf;
  return multi_tensor_apply(entries.data(), count, f, stream);
}

template <typename P, typename S>
cudaError_t adamw_with_flags(const AdamWTensor* tensors, int64_t count, const AdamWHyper& h,
                             bool master, cudaStream_t stream) {
  if (master) {
    if constexpr (std::is_same_v<S, float> &&
                  (std::is_same_v<P, __half> || std::is_same_v<P, __nv_bfloat16>)) {
      return h.amsgrad ? adamw_typed<P, S, true, true>(tensors, count, h, stream)
                       : adamw_typed<P, S, false, true>(tensors, count, h, stream);
    } else {
      return cudaErrorInvalidValue;  // master weights: 16-bit params with float32 states only
    }
  }
  return h.amsgrad ? adamw_typed<P, S, true, false>(tensors, count, h, stream)
                   : adamw_typed<P, S, false, false>(tensors, count, h, stream);
}

template <typename P>
cudaError_t adamw_for_param(DType state_dtype, DType own_dtype, const AdamWTensor* tensors,
                            int64_t count, const AdamWHyper& h, bool master,
                            cudaStream_t stream) {
  if (state_dtype == own_dtype) return adamw_with_flags<P, P>(tensors, count, h, master, stream);
  if constexpr (!std::is_same_v<P, float>) {
    if (state_dtype == DType::kFloat32) {
      return adamw_with_flags<P, float>(tensors, count, h, master, stream);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t adamw_step(DType param_dtype, DType state_dtype, const AdamWTensor* tensors,
                       int64_t count, const AdamWHyper& hyper, cudaStream_t stream) {
  if (count <= 0) return count == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const bool master = tensors[0].master != nullptr;
  switch (param_dtype) {
    case DType::kFloat64:
      return adamw_for_param<double>(state_dtype, param_dtype, tensors, count, hyper, master,
                                     stream);
    case DType::kFloat32:
      return adamw_for_param<float>(state_dtype, param_dtype, tensors, count, hyper, master,
                                    stream);
    case DType::kFloat16:
      return adamw_for_param<__half>(state_dtype, param_dtype, tensors, count, hyper, master,
                                     stream);
    case DType::kBFloat16:
      return adamw_for_param<__nv_bfloat16>(state_dtype, param_dtype, tensors, count, hyper,
                                            master, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedlm::cuda
