// Multi-tensor AdamW step on the CPU.
//
// The whole parameter list is cut into chunks of at most kChunkElems
// elements (a tensor smaller than that is one chunk) and at::parallel_for
// runs over the chunk list, so a thousand tiny tensors and one huge tensor
// both keep every core busy and pay for one parallel region per step.
//
// Vectorization: the build targets baseline x86-64, and the update needs
// sqrt, which GCC will not vectorize while it may set errno, so the float
// path is written with AVX2 intrinsics inside a target("avx2,fma,f16c")
// function chosen at run time from cpuid; everything else (tails, float64,
// CPUs without AVX2) runs the scalar reference loop.
#include "adamw.h"
#include "simd.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>


namespace fusedlm::cpu {
namespace {

// 32K elements is 128 KiB per fp32 stream: big enough that per-chunk
// overhead vanishes, small enough that GPT-2-sized lists give hundreds of
// chunks to balance across threads.
constexpr int64_t kChunkElems = 32768;

// Scalars of one tensor's update, rounded to the compute type the way the
// Python scalars of torch.optim.AdamW are when they meet a tensor op.
template <typename opmath_t>
struct UpdateScalars {
  opmath_t decay;            // 1 - lr * weight_decay
  opmath_t lerp_weight;      // 1 - beta1
  bool lerp_weight_small;    // torch's lerp switches formula at |weight| < 0.5
  opmath_t beta2;
  opmath_t one_minus_beta2;
  opmath_t neg_step_size;    // -lr / (1 - beta1^step)
  opmath_t bc2_sqrt;         // sqrt(1 - beta2^step)
  opmath_t eps;
  bool amsgrad;
  bool maximize;
};

// Raw pointers of tensor i of every list; all (numel) of that tensor.
struct TensorPtrs {
  void* param;            // (numel) param dtype
  const void* grad;       // (numel) param dtype
  void* exp_avg;          // (numel) state dtype
  void* exp_avg_sq;       // (numel) state dtype
  void* max_exp_avg_sq;   // (numel) state dtype, nullptr unless amsgrad
};

// Reference scalar update of elements [begin, end), also the tail and
// non-AVX2 path. Mirrors torch.optim.AdamW's single-tensor sequence of ops.
// p, g: (numel) param dtype; m, v, vmax: (numel) state dtype
template <typename p_t, typename s_t, typename opmath_t>
C10_ALWAYS_INLINE void update_scalar(p_t* p, const p_t* g, s_t* m, s_t* v, s_t* vmax,
                                     const UpdateScalars<opmath_t>& s, int64_t begin,
                                     int64_t end) {
  const opmath_t one_minus_lerp_weight = opmath_t(1) - s.lerp_weight;
  for (int64_t i = begin; i < end; ++i) {
    const opmath_t grad = s.maximize ? -static_cast<opmath_t>(g[i]) : static_cast<opmath_t>(g[i]);
    const opmath_t param = static_cast<opmath_t>(p[i]) * s.decay;
    const opmath_t m_old = static_cast<opmath_t>(m[i]);
    const opmath_t m_new = s.lerp_weight_small
                               ? m_old + s.lerp_weight * (grad - m_old)
                               : grad - (grad - m_old) * one_minus_lerp_weight;
    const opmath_t v_new =
        static_cast<opmath_t>(v[i]) * s.beta2 + (s.one_minus_beta2 * grad) * grad;
    opmath_t v_used = v_new;
    if (s.amsgrad) {
      const opmath_t vmax_old = static_cast<opmath_t>(vmax[i]);
      // torch.maximum: NaN in either operand wins.
      v_used = (vmax_old > v_new || vmax_old != vmax_old) ? vmax_old : v_new;
      vmax[i] = static_cast<s_t>(v_used);
    }
    const opmath_t denom = std::sqrt(v_used) / s.bc2_sqrt + s.eps;
    p[i] = static_cast<p_t>(param + (s.neg_step_size * m_new) / denom);
    m[i] = static_cast<s_t>(m_new);
    v[i] = static_cast<s_t>(v_new);
  }
}

#if FUSEDLM_X86
// AVX2 update of elements [begin, end) for float compute; same op order as
// update_scalar, which finishes the tail.
// p, g: (numel) param dtype; m, v, vmax: (numel) state dtype
template <typename p_t, typename s_t>
FUSEDLM_TARGET_AVX2 void update_avx2(p_t* p, const p_t* g, s_t* m, s_t* v, s_t* vmax,
                                    const UpdateScalars<float>& s, int64_t begin,
                                    int64_t end) {
  const __m256 decay = _mm256_set1_ps(s.decay);
  const __m256 lerp_weight = _mm256_set1_ps(s.lerp_weight);
  const __m256 one_minus_lerp_weight = _mm256_set1_ps(1.0f - s.lerp_weight);
  const __m256 beta2 = _mm256_set1_ps(s.beta2);
  const __m256 one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 neg_step_size = _mm256_set1_ps(s.neg_step_size);
  const __m256 bc2_sqrt = _mm256_set1_ps(s.bc2_sqrt);
  const __m256 eps = _mm256_set1_ps(s.eps);
  // Flipping the sign bit is exact negation, as -grad is in torch.
  const __m256 grad_sign = _mm256_set1_ps(s.maximize ? -0.0f : 0.0f);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 grad = _mm256_xor_ps(simd::load8(g + i), grad_sign);
    const __m256 param = _mm256_mul_ps(simd::load8(p + i), decay);
    const __m256 m_old = simd::load8(m + i);
    const __m256 diff = _mm256_sub_ps(grad, m_old);
    const __m256 m_new =
        s.lerp_weight_small ? _mm256_add_ps(m_old, _mm256_mul_ps(lerp_weight, diff))
                            : _mm256_sub_ps(grad, _mm256_mul_ps(diff, one_minus_lerp_weight));
    const __m256 v_new = _mm256_add_ps(_mm256_mul_ps(simd::load8(v + i), beta2),
                                       _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, grad), grad));
    __m256 v_used = v_new;
    if (s.amsgrad) {
      const __m256 vmax_old = simd::load8(vmax + i);
      // max_ps returns its second operand when either is NaN, which keeps a
      // NaN v_new; the blend keeps a NaN vmax_old, as torch.maximum does.
      v_used = _mm256_max_ps(vmax_old, v_new);
      v_used = _mm256_blendv_ps(v_used, vmax_old, _mm256_cmp_ps(vmax_old, vmax_old, _CMP_UNORD_Q));
      simd::store8(vmax + i, v_used);
    }
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v_used), bc2_sqrt), eps);
    simd::store8(p + i,
           _mm256_add_ps(param, _mm256_div_ps(_mm256_mul_ps(neg_step_size, m_new), denom)));
    simd::store8(m + i, m_new);
    simd::store8(v + i, v_new);
  }
  update_scalar(p, g, m, v, vmax, s, i, end);
}
#endif

// Updates elements [begin, end) of one tensor.
template <typename p_t, typename s_t>
void update_range(const TensorPtrs& t, const UpdateScalars<at::opmath_type<p_t>>& s,
                  int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<p_t>;
  auto* p = static_cast<p_t*>(t.param);                  // (numel)
  const auto* g = static_cast<const p_t*>(t.grad);       // (numel)
  auto* m = static_cast<s_t*>(t.exp_avg);                // (numel)
  auto* v = static_cast<s_t*>(t.exp_avg_sq);             // (numel)
  auto* vmax = static_cast<s_t*>(t.max_exp_avg_sq);      // (numel) or nullptr
#if FUSEDLM_X86
  if constexpr (std::is_same_v<opmath_t, float>) {
    if (cpu_has_avx2()) {
      update_avx2(p, g, m, v, vmax, s, begin, end);
      return;
    }
  }
#endif
  update_scalar(p, g, m, v, vmax, s, begin, end);
}

// One tensor's update: its pointers, scalars and the typed kernel. The
// scalars are stored in both widths so one struct fits every dtype.
struct TensorJob {
  TensorPtrs ptrs;
  UpdateScalars<float> scalars_f;
  UpdateScalars<double> scalars_d;
  void (*run)(const TensorJob& job, int64_t begin, int64_t end);
};

template <typename p_t, typename s_t>
void run_job(const TensorJob& job, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<at::opmath_type<p_t>, double>) {
    update_range<p_t, s_t>(job.ptrs, job.scalars_d, begin, end);
  } else {
    update_range<p_t, s_t>(job.ptrs, job.scalars_f, begin, end);
  }
}

// The typed kernel for a (param dtype, state dtype) pair; states are float32
// or the param's own dtype.
template <typename p_t>
auto pick_run_for_param(at::ScalarType state_dtype, int64_t index) {
  if (state_dtype == c10::CppTypeToScalarType<p_t>::value) return &run_job<p_t, p_t>;
  TORCH_CHECK_VALUE(state_dtype == at::kFloat, "fusedlm: adamw_step: state tensors of param ",
                    index, " must be float32 or the param's dtype, got ", state_dtype);
  return &run_job<p_t, float>;
}

decltype(&run_job<float, float>) pick_run(at::ScalarType param_dtype,
                                          at::ScalarType state_dtype, int64_t index) {
  switch (param_dtype) {
    case at::kDouble:
      return pick_run_for_param<double>(state_dtype, index);
    case at::kFloat:
      return pick_run_for_param<float>(state_dtype, index);
    case at::kBFloat16:
      return pick_run_for_param<c10::BFloat16>(state_dtype, index);
    case at::kHalf:
      return pick_run_for_param<c10::Half>(state_dtype, index);
    default:
      TORCH_CHECK_TYPE(false, "fusedlm: adamw_step: params[", index,
                       "] must be float64, float32, bfloat16 or float16, got ", param_dtype);
  }
  return nullptr;
}

template <typename opmath_t>
UpdateScalars<opmath_t> make_scalars(double step, double lr, double beta1, double beta2,
                                     double eps, double weight_decay, bool amsgrad,
                                     bool maximize) {
  // Computed in double like the Python scalars, then rounded once.
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const double lerp_weight = 1.0 - beta1;
  UpdateScalars<opmath_t> s;
  s.decay = static_cast<opmath_t>(1.0 - lr * weight_decay);
  s.lerp_weight = static_cast<opmath_t>(lerp_weight);
  s.lerp_weight_small = std::abs(static_cast<opmath_t>(lerp_weight)) < opmath_t(0.5);
  s.beta2 = static_cast<opmath_t>(beta2);
  s.one_minus_beta2 = static_cast<opmath_t>(1.0 - beta2);
  s.neg_step_size = static_cast<opmath_t>(-(lr / bias_correction1));
  s.bc2_sqrt = static_cast<opmath_t>(std::sqrt(bias_correction2));
  s.eps = static_cast<opmath_t>(eps);
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  return s;
}

void check_list(const std::vector<at::Tensor>& list, const char* name, size_t expected) {
  TORCH_CHECK_VALUE(list.size() == expected, "fusedlm: adamw_step: argument '", name, "' has ",
                    list.size(), " tensors, expected ", expected);
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].is_contiguous(), "fusedlm: adamw_step: argument '", name, "[", i,
                      "]' must be contiguous");
  }
}

// A contiguous run [begin, end) of tensor `job`'s elements.
struct Chunk {
  int64_t job;
  int64_t begin;
  int64_t end;
};

}  // namespace

void adamw_step(const std::vector<at::Tensor>& params,           // [n] each (numel_i)
                const std::vector<at::Tensor>& grads,            // [n] each (numel_i)
                const std::vector<at::Tensor>& exp_avgs,         // [n] each (numel_i)
                const std::vector<at::Tensor>& exp_avg_sqs,      // [n] each (numel_i)
                const std::vector<at::Tensor>& max_exp_avg_sqs,  // [n] if amsgrad, else []
                const std::vector<double>& steps,                // [n]
                double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize) {
  const size_t n = params.size();
  check_list(params, "params", n);
  check_list(grads, "grads", n);
  check_list(exp_avgs, "exp_avgs", n);
  check_list(exp_avg_sqs, "exp_avg_sqs", n);
  check_list(max_exp_avg_sqs, "max_exp_avg_sqs", amsgrad ? n : 0);
  TORCH_CHECK_VALUE(steps.size() == n, "fusedlm: adamw_step: argument 'steps' has ",
                    steps.size(), " entries, expected ", n);

  std::vector<TensorJob> jobs;  // [n]
  std::vector<Chunk> chunks;    // [sum_i ceil(numel_i / kChunkElems)]
  jobs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    TensorJob job;
    job.ptrs = {params[i].data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(),
                exp_avg_sqs[i].data_ptr(), amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr};
    job.scalars_f = make_scalars<float>(steps[i], lr, beta1, beta2, eps, weight_decay, amsgrad,
                                        maximize);
    job.scalars_d = make_scalars<double>(steps[i], lr, beta1, beta2, eps, weight_decay,
                                         amsgrad, maximize);
    job.run = pick_run(params[i].scalar_type(), exp_avgs[i].scalar_type(),
                       static_cast<int64_t>(i));
    const int64_t job_index = static_cast<int64_t>(jobs.size());
    jobs.push_back(job);
    for (int64_t begin = 0; begin < numel; begin += kChunkElems) {
      chunks.push_back({job_index, begin, std::min(numel, begin + kChunkElems)});
    }
  }
  if (chunks.empty()) return;

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const TensorJob& job = jobs[chunk.job];
      job.run(job, chunk.begin, chunk.end);
    }
  });
}

}  // namespace fusedlm::cpu
