// Fused ambient loss on CPU (SPEC 2): per-sample loss, optionally with d loss_i / d pred in
// the same pass. Contract: ambient_fast.core.loss.per_sample_loss_reference.
//
//   r_ij   = pred_ij + b_i y_t_ij + c_i y_tmin_ij          (a_i = 1 in every SPEC 2 row)
//   loss_i = m_i w_i mean_j r_ij^2
//   grad_ij = m_i (2 w_i / N) r_ij                          (gradient of sum_i loss_i)
//
// Per sample, in the compute type (float64 for float64 storage, float32 otherwise) and with
// the reference's operation order: the mask m_i (sigma_min == 0, sigma > scale*sigma_min +
// shift, or sigma < sigma_max), the coefficients (b_i, c_i) of the SPEC 2 table at the
// effective sigma_min (0 for contraction and locality rows), the weight w_i (tensor, EDM
// lambda at the VE-equivalent sigma, or 1). Rows with m_i = 0 are never read: their loss
// and gradient are exactly 0, whatever the data or sigma <= sigma_min. The residual r_ij is
// bitwise the reference's for VE (VP coefficients use IEEE sqrt, PyTorch's vectorised sqrt
// may differ by an ulp); the sum differs only in order (16 float32 lanes per chunk of 8192
// elements, chunk partials added in float64, fixed order: results do not depend on the
// thread count or the ISA clone).
//
// Vectorisation (GCC 12.2, -fopt-info-vec-optimized and objdump of each clone): the
// 16-lane loop of sum_squares is vectorised for all four storage types, with and without the
// gradient store. float32/float64: 64-byte vectors (vmulps/vaddps on zmm) in the x86-64-v4
// clone, 32-byte in x86-64-v3, 16-byte in the baseline. bf16/fp16: widened with vpmovzxwd +
// vpslld (fp16 adds the exponent fix-up as vpternlogd/vpcmp selects), 32-byte float math in
// both v3 and v4 (GCC picks V16HI for the 16 x 16-bit loads), gradient narrowed with
// vpermt2w. fp16 only vectorises with -fno-trapping-math: without it GCC will not if-convert
// the subnormal/inf selects ("control flow in loop"). No FMA anywhere (-ffp-contract=off).
// The remainder loop (under 16 elements) keeps an in-order float64 sum.
#include "ops.h"

#include <cmath>
#include <vector>

namespace ambient_fast {
namespace {

template <typename C>
struct LossRow {
  bool train;
  C b, c, w;
};

// Mask, coefficients and weight of one sample, mirroring per_sample_loss_reference.
template <typename C>
LossRow<C> loss_row(double sigma, double sigma_min, double sigma_max, const double* weight,
                    const LossOptions& opt) {
  const C s = static_cast<C>(sigma), sm = static_cast<C>(sigma_min), smax = static_cast<C>(sigma_max);
  const bool clean_rule = s < smax;
  const bool train = sm == C(0) || s > static_cast<C>(opt.elig_scale) * sm + static_cast<C>(opt.elig_shift) || clean_rule;
  if (!train) return {false, C(0), C(0), C(0)};
  // Effective sigma_min: 0 for contraction and for rows trained as clean by locality.
  const C e = (opt.contraction || clean_rule) ? C(0) : sm;
  const C denom = s * s - e * e;
  C b, c;
  if (!opt.vp && !opt.eps) {
    b = e * e / denom;
    c = -(s * s) / denom;
  } else if (!opt.vp && opt.eps) {
    b = -s / denom;
    c = s / denom;
  } else if (opt.vp && !opt.eps) {
    b = e * e * std::sqrt(C(1) - s * s) / denom;
    c = -(s * s) * std::sqrt(C(1) - e * e) / denom;
  } else {
    b = -s * (C(1) - e * e) / denom;
    c = s * std::sqrt(C(1) - e * e) * std::sqrt(C(1) - s * s) / denom;
  }
  C w = C(1);
  if (weight != nullptr) {
    w = static_cast<C>(*weight);
  } else if (opt.edm_weight) {
    // lambda_EDM at the VE-equivalent level (SPEC 1: sigma = s / sqrt(1 - s^2) for VP).
    const C s_ve = opt.vp ? s / std::sqrt(C(1) - s * s) : s;
    const C sd = static_cast<C>(opt.sigma_data);
    const C sd2 = static_cast<C>(opt.sigma_data * opt.sigma_data);
    w = (s_ve * s_ve + sd2) / ((s_ve * sd) * (s_ve * sd));
  }
  return {true, b, c, w};
}

constexpr int kLanes = 16;  // independent accumulators: one zmm (fp32) per step, and ILP

template <typename T, bool kGrad>
AF_INLINE double sum_squares(const T* __restrict__ pred, const T* __restrict__ y_t, const T* __restrict__ y_tmin,
                             T* __restrict__ grad, std::int64_t n, compute_t<T> b, compute_t<T> c,
                             compute_t<T> k) {
  using C = compute_t<T>;
  C lane[kLanes] = {};
  std::int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const C r = (load(pred, j + l) + b * load(y_t, j + l)) + c * load(y_tmin, j + l);
      lane[l] += r * r;
      if constexpr (kGrad) store(grad, j + l, k * r);
    }
  }
  double total = 0;
  for (int l = 0; l < kLanes; ++l) total += lane[l];
  for (; j < n; ++j) {
    const C r = (load(pred, j) + b * load(y_t, j)) + c * load(y_tmin, j);
    total += static_cast<double>(r * r);
    if constexpr (kGrad) store(grad, j, k * r);
  }
  return total;
}

// One multiversioned overload per storage type; grad == nullptr selects the loss-only loop.
#define AF_LOSS_CHUNK(T)                                                                         \
  AF_CLONES double loss_chunk(const T* pred, const T* y_t, const T* y_tmin, T* grad, std::int64_t n, \
                              compute_t<T> b, compute_t<T> c, compute_t<T> k) {                   \
    return grad == nullptr ? sum_squares<T, false>(pred, y_t, y_tmin, grad, n, b, c, k)          \
                           : sum_squares<T, true>(pred, y_t, y_tmin, grad, n, b, c, k);          \
  }
AF_LOSS_CHUNK(float)
AF_LOSS_CHUNK(double)
AF_LOSS_CHUNK(Half)
AF_LOSS_CHUNK(BFloat16)
#undef AF_LOSS_CHUNK

template <typename T>
void run_loss(const LossArgs& a) {
  using C = compute_t<T>;
  const std::int64_t batch = a.batch, numel = a.numel;
  const bool with_grad = a.grad.data != 0;
  std::vector<LossRow<C>> rows(static_cast<std::size_t>(batch));
  const auto* sigma = reinterpret_cast<const double*>(a.sigma);
  const auto* sigma_min = reinterpret_cast<const double*>(a.sigma_min);
  const auto* sigma_max = reinterpret_cast<const double*>(a.sigma_max);
  const auto* weight = reinterpret_cast<const double*>(a.weight);
  for (std::int64_t i = 0; i < batch; ++i) {
    rows[i] = loss_row<C>(sigma[i], sigma_min[i], sigma_max[i], weight ? weight + i : nullptr, a.options);
  }
  const std::int64_t per_row = chunks_per_row(numel);
  std::vector<double> partial(static_cast<std::size_t>(batch * per_row), 0.0);
  for_each_chunk(batch, numel, [&](std::int64_t i, std::int64_t begin, std::int64_t end) {
    const LossRow<C>& row = rows[i];
    T* grad = with_grad ? mutable_row_ptr<T>(a.grad, i) + begin : nullptr;
    if (!row.train) {
      if (with_grad) std::memset(static_cast<void*>(grad), 0, static_cast<std::size_t>(end - begin) * sizeof(T));
      return;
    }
    const C k = (row.w + row.w) / static_cast<C>(numel);
    partial[i * per_row + begin / kChunk] =
        loss_chunk(row_ptr<T>(a.pred, i) + begin, row_ptr<T>(a.y_t, i) + begin, row_ptr<T>(a.y_tmin, i) + begin,
                   grad, end - begin, row.b, row.c, k);
  });
  auto* loss = reinterpret_cast<C*>(a.loss);
  for (std::int64_t i = 0; i < batch; ++i) {
    double total = 0;
    for (std::int64_t t = 0; t < per_row; ++t) total += partial[i * per_row + t];
    loss[i] = rows[i].train ? rows[i].w * static_cast<C>(total / static_cast<double>(numel)) : C(0);
  }
}

}  // namespace

void ambient_loss(const LossArgs& a) {
  AF_CHECK(a.batch >= 0, "ambient_loss: batch must be >= 0, got ", a.batch);
  AF_CHECK(a.numel >= 1, "ambient_loss: each sample needs at least one element, got ", a.numel);
  AF_CHECK(a.batch == 0 || (a.loss != 0 && a.sigma != 0 && a.sigma_min != 0 && a.sigma_max != 0),
           "ambient_loss: null loss or level pointer");
  check_rows("pred", a.pred, a.batch);
  check_rows("y_t", a.y_t, a.batch);
  check_rows("y_tmin", a.y_tmin, a.batch);
  if (a.grad.data != 0) check_out_rows("grad", a.grad, a.batch, a.numel);
  AF_CHECK(a.options.sigma_data > 0, "ambient_loss: sigma_data must be > 0, got ", a.options.sigma_data);
  AF_CHECK(a.options.elig_scale >= 1 && a.options.elig_shift >= 0,
           "ambient_loss: eligibility needs scale >= 1 and shift >= 0, got ", a.options.elig_scale, ", ",
           a.options.elig_shift);
  switch (a.dtype) {
    case DType::f32: return run_loss<float>(a);
    case DType::f64: return run_loss<double>(a);
    case DType::f16: return run_loss<Half>(a);
    case DType::bf16: return run_loss<BFloat16>(a);
  }
}

}  // namespace ambient_fast
