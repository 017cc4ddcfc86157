// Cross-entropy over class logits on the CPU: the language-model loss and its gradient in one
// pass over the logits each, without torch's float32 copy and log-softmax tensor.
//
// Layout: rows are split across threads with at::parallel_for; each row is converted into a
// per-thread acc_t buffer (float, or double for float64 logits; any strides), where the row
// max and the exp(x - shift) sum run through softmax_rows.h's AVX-512 / AVX2 / portable
// versions. The logsumexp is kept as row_max + log_sum so that the backward's
// exp((x - row_max) - log_sum) keeps full precision where the logits are large.
#include "cross_entropy.h"
#include "softmax_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fusedlm::cpu {
namespace {

// Rows per task are chosen so one task touches at least this many elements.
constexpr int64_t kGrainElems = 32768;

int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1));
}

// buf (V) = row (V, stride) as acc_t.
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* row, int64_t stride, int64_t V, acc_t* buf) {
  if (stride == 1) {
    for (int64_t i = 0; i < V; ++i) buf[i] = static_cast<acc_t>(row[i]);
  } else {
    for (int64_t i = 0; i < V; ++i) buf[i] = static_cast<acc_t>(row[i * stride]);
  }
}

// sum(buf) in double, over four chains: the label-smoothing term's mean logit. A float running
// sum over a row of 32768 logits of -11.3 was 2e-4 off (2.3e-3 in the loss): each add of an
// equal value rounds the same way. The four chains keep the adds pipelined.
template <typename acc_t>
double wide_sum(const acc_t* buf, int64_t V) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= V; i += 4) {
    s0 += buf[i];
    s1 += buf[i + 1];
    s2 += buf[i + 2];
    s3 += buf[i + 3];
  }
  for (; i < V; ++i) s0 += buf[i];
  return (s0 + s1) + (s2 + s3);
}

template <typename scalar_t, typename acc_t>
void forward(const at::Tensor& logits, const int64_t* target, int64_t ignore_index,
             acc_t smoothing, acc_t z_loss, acc_t* loss, acc_t* row_max, acc_t* log_sum) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t stride_n = logits.stride(0), stride_v = logits.stride(1);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // The first row (in row order) whose target is neither a class nor ignore_index, N if none:
  // the entry point raises for it after the loop (its loss is NaN meanwhile).
  std::atomic<int64_t> first_bad{N};
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(V);
    acc_t* buf = buffer.data();
    for (int64_t n = begin; n < end; ++n) {
      load_row(x + n * stride_n, stride_v, V, buf);
      const acc_t max = rows::row_max(buf, V);
      // A row of -inf keeps a finite shift, so its sum is 0 (log_sum -inf), not NaN.
      const acc_t shift = max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : max;
      const int64_t t = target[n];
      const bool valid = t != ignore_index, in_range = t >= 0 && t < V;
      const acc_t x_target = in_range ? buf[t] : acc_t(0);
      // (before exp_shift_sum overwrites buf)
      const double x_mean = smoothing != 0 ? wide_sum(buf, V) / static_cast<double>(V) : 0.0;
      const acc_t ls = std::log(rows::exp_shift_sum(buf, V, shift));
      // Each term is small next to the logits: the loss keeps digits the logsumexp would round.
      acc_t value = (1 - smoothing) * (shift - x_target) + ls;
      if (smoothing != 0) value += smoothing * static_cast<acc_t>(shift - x_mean);
      if (z_loss != 0) value += z_loss * (shift + ls) * (shift + ls);
      if (valid && !in_range) {
        int64_t seen = first_bad.load();
        while (n < seen && !first_bad.compare_exchange_weak(seen, n)) {
        }
      }
      loss[n] = valid ? (in_range ? value : nan) : acc_t(0);
      row_max[n] = shift;
      log_sum[n] = ls;
    }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK_INDEX(bad == N, "fusedlm: argument 'target' holds a class index outside [0, ", V,
                    ") that is not ignore_index (", ignore_index, "): ",
                    target[std::min(bad, N - 1)], " at row ", bad);
}

template <typename scalar_t, typename acc_t>
void backward(const at::Tensor& grad_loss, const at::Tensor& logits, const int64_t* target,
              const acc_t* row_max, const acc_t* log_sum, int64_t ignore_index, acc_t smoothing,
              acc_t z_loss, scalar_t* dx) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t stride_n = logits.stride(0), stride_v = logits.stride(1);
  const int64_t stride_g = grad_loss.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const acc_t uniform = smoothing / static_cast<acc_t>(V);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(V);
    acc_t* buf = buffer.data();
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* out = dx + n * V;  // (may be the row of x itself: x is read whole first)
      const int64_t t = target[n];
      if (t == ignore_index) {  // exact zeros, whatever the row's softmax holds
        for (int64_t i = 0; i < V; ++i) out[i] = scalar_t(0);
        continue;
      }
      const bool in_range = t >= 0 && t < V;
      const acc_t grad = in_range ? g[n * stride_g] : std::numeric_limits<acc_t>::quiet_NaN();
      load_row(x + n * stride_n, stride_v, V, buf);
      const acc_t max = row_max[n];
      for (int64_t i = 0; i < V; ++i) buf[i] -= max;
      rows::exp_shift_sum(buf, V, log_sum[n]);  // buf = softmax, exp((x - max) - log_sum)
      // d(z * lse^2)/dx = 2 z lse softmax: the z-loss scales the softmax (exactly 1 without
      // it, even where lse is infinite)
      const acc_t scale = z_loss != 0 ? 1 + 2 * z_loss * (max + log_sum[n]) : acc_t(1);
      for (int64_t i = 0; i < V; ++i) {
        out[i] = static_cast<scalar_t>(grad * (buf[i] * scale - uniform));
      }
      if (in_range) {
        out[t] = static_cast<scalar_t>(grad * (buf[t] * scale - uniform - (1 - smoothing)));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                                 const at::Tensor& target,
                                                                 int64_t ignore_index,
                                                                 double label_smoothing,
                                                                 double z_loss) {
  const auto stat_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = logits.options().dtype(stat_type);
  at::Tensor loss = at::empty({logits.size(0)}, options);
  at::Tensor row_max = at::empty({logits.size(0)}, options);
  at::Tensor log_sum = at::empty({logits.size(0)}, options);
  const at::Tensor targets = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_fwd", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        forward<scalar_t, acc_t>(logits, targets.const_data_ptr<int64_t>(), ignore_index,
                                 static_cast<acc_t>(label_smoothing), static_cast<acc_t>(z_loss),
                                 loss.data_ptr<acc_t>(),
                                 row_max.data_ptr<acc_t>(), log_sum.data_ptr<acc_t>());
      });
  return {loss, row_max, log_sum};
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& row_max,
                             const at::Tensor& log_sum, int64_t ignore_index,
                             double label_smoothing, const std::optional<at::Tensor>& out,
                             double z_loss) {
  at::Tensor dlogits = out.has_value() ? *out : at::empty(logits.sizes(), logits.options());
  const at::Tensor targets = target.contiguous();
  const at::Tensor maxes = row_max.contiguous(), sums = log_sum.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_bwd", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        backward<scalar_t, acc_t>(grad_loss, logits, targets.const_data_ptr<int64_t>(),
                                  maxes.const_data_ptr<acc_t>(), sums.const_data_ptr<acc_t>(),
                                  ignore_index, static_cast<acc_t>(label_smoothing),
                                  static_cast<acc_t>(z_loss), dlogits.data_ptr<scalar_t>());
      });
  return dlogits;
}

}  // namespace fusedlm::cpu
