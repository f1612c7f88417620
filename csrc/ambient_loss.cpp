// Fused ambient loss on CPU (SPEC 2): per-sample loss, optionally with d loss_i / d pred in
// the same pass. Contract: ambient_fast.core.loss.per_sample_loss_reference.
//
//   r_ij   = pred_ij + b_i y_t_ij + c_i y_tmin_ij          (a_i = 1 in every SPEC 2 row)
//   loss_i = m_i w_i mean_j r_ij^2
//   grad_ij = m_i (2 w_i / N) r_ij                          (gradient of sum_i loss_i)
//   reduced = sum_i loss_i / grad_count                      (optional: batch mean or sum)
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
// clone (float64 only: float32 has no AVX-512 clone, see AF_LOSS_CHUNK), 32-byte in
// x86-64-v3, 16-byte in the baseline. bf16/fp16: widened with vpmovzxwd + vpslld (fp16 adds
// the exponent fix-up as vpternlogd/vpcmp selects), 32-byte float math in both v3 and v4
// (GCC picks V16HI for the 16 x 16-bit loads), gradient narrowed with vpermt2w. The 16
// accumulators are the same in every clone, so are the sums. fp16 only vectorises with -fno-trapping-math: without it GCC will not if-convert
// the subnormal/inf selects ("control flow in loop"). No FMA anywhere (-ffp-contract=off).
// The remainder loop (under 16 elements) keeps an in-order float64 sum.
//
// Checks in the same pass (LossArgs::flags != 0): each row gets LossFlag bits. Levels are
// checked per row (finite, sigma > 0, sigma_min >= 0, sigma_max >= 0, VP levels < 1, finite
// coefficients and weight). The data of a training row is not checked separately: any NaN/Inf
// input makes its residual, hence its chunk's sum of squares, non-finite, and only then (the
// error path) is the chunk scanned to say which input it was or that the loss overflowed.
// Rows that do not train are scanned for NaN/Inf (integer max of the magnitude bits, which
// vectorises without reassociating floats). The gradient can only overflow the storage type
// where k sqrt(sum r^2) reaches its largest finite value; only such chunks are re-read.
#include "ops.h"

#include <cfloat>
#include <cmath>
#include <vector>

namespace ambient_fast {
namespace {

template <typename C>
struct LossRow {
  bool train;
  C b, c, w;
  std::int32_t flags;
};

// Mask, coefficients and weight of one sample, mirroring per_sample_loss_reference; with
// `check`, the level bits of LossFlag.
template <typename C>
LossRow<C> loss_row(double sigma, double sigma_min, double sigma_max, const double* weight,
                    const LossOptions& opt, bool check) {
  std::int32_t flags = 0;
  if (check) {
    if (!(std::isfinite(sigma) && sigma > 0) || (opt.vp && sigma >= 1)) flags |= kSigmaBad;
    if (!(std::isfinite(sigma_min) && sigma_min >= 0) || (opt.vp && sigma_min >= 1)) flags |= kSigmaMinBad;
    if (!(std::isfinite(sigma_max) && sigma_max >= 0)) flags |= kSigmaMaxBad;
    if (weight != nullptr && !std::isfinite(*weight)) flags |= kWeightBad;
  }
  const C s = static_cast<C>(sigma), sm = static_cast<C>(sigma_min), smax = static_cast<C>(sigma_max);
  const bool clean_rule = s < smax;
  const bool train = sm == C(0) || s > static_cast<C>(opt.elig_scale) * sm + static_cast<C>(opt.elig_shift) || clean_rule;
  if (!train) return {false, C(0), C(0), C(0), flags};
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
  if (check && !(std::isfinite(b) && std::isfinite(c) && std::isfinite(w))) flags |= kCoeffOverflow;
  return {true, b, c, w, flags | kTrained};
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

// Magnitude bits of each storage type: a value is NaN or Inf exactly when its bits with the
// sign cleared are >= those of +Inf.
template <typename T>
struct Magnitude;
template <>
struct Magnitude<float> {
  using U = std::uint32_t;
  static constexpr U mask = 0x7fffffffu, inf = 0x7f800000u;
  static constexpr double max_finite = FLT_MAX;
};
template <>
struct Magnitude<double> {
  using U = std::uint64_t;
  static constexpr U mask = 0x7fffffffffffffffull, inf = 0x7ff0000000000000ull;
  static constexpr double max_finite = DBL_MAX;
};
template <>
struct Magnitude<Half> {
  using U = std::uint16_t;
  static constexpr U mask = 0x7fffu, inf = 0x7c00u;
  static constexpr double max_finite = 65504.0;
};
template <>
struct Magnitude<BFloat16> {
  using U = std::uint16_t;
  static constexpr U mask = 0x7fffu, inf = 0x7f80u;
  static constexpr double max_finite = 3.3895313892515355e38;
};

template <typename T>
AF_INLINE bool any_nonfinite(const T* __restrict__ p, std::int64_t n) {
  using M = Magnitude<T>;
  typename M::U largest = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    typename M::U u;
    std::memcpy(&u, p + j, sizeof u);
    u &= M::mask;
    largest = u > largest ? u : largest;
  }
  return largest >= M::inf;
}

// One multiversioned overload per storage type; grad == nullptr selects the loss-only loop.
// float32 has no AVX-512 clone (4K aliasing of the gradient stores, see AF_STREAM_CLONES);
// the 16-bit types and float64 keep it (bound by the conversions: bf16 at 16x4x64x64, 82 us
// with AVX-512, 103 us without).
#define AF_LOSS_CHUNK(T, CLONES)                                                                 \
  CLONES double loss_chunk(const T* pred, const T* y_t, const T* y_tmin, T* grad, std::int64_t n, \
                           compute_t<T> b, compute_t<T> c, compute_t<T> k) {                      \
    return grad == nullptr ? sum_squares<T, false>(pred, y_t, y_tmin, grad, n, b, c, k)          \
                           : sum_squares<T, true>(pred, y_t, y_tmin, grad, n, b, c, k);          \
  }                                                                                              \
  AF_CLONES bool nonfinite_chunk(const T* p, std::int64_t n) { return any_nonfinite<T>(p, n); }
AF_LOSS_CHUNK(float, AF_STREAM_CLONES)
AF_LOSS_CHUNK(double, AF_CLONES)
AF_LOSS_CHUNK(Half, AF_CLONES)
AF_LOSS_CHUNK(BFloat16, AF_CLONES)
#undef AF_LOSS_CHUNK

template <typename T>
std::int32_t input_bits(const T* pred, const T* y_t, const T* y_tmin, std::int64_t n) {
  return (nonfinite_chunk(pred, n) ? kPredBad : 0) | (nonfinite_chunk(y_t, n) ? kYtBad : 0) |
         (nonfinite_chunk(y_tmin, n) ? kYtminBad : 0);
}

template <typename T>
LossCheck run_loss(const LossArgs& a) {
  using C = compute_t<T>;
  const std::int64_t batch = a.batch, numel = a.numel;
  const bool with_grad = a.grad.data != 0;
  const bool check = a.check;
  std::vector<LossRow<C>> rows(static_cast<std::size_t>(batch));
  const bool has_weight = a.weight.data != 0;
  for (std::int64_t i = 0; i < batch; ++i) {
    const double w = has_weight ? level_at(a.weight, i) : 0.0;
    rows[i] = loss_row<C>(level_at(a.sigma, i), level_at(a.sigma_min, i), level_at(a.sigma_max, i),
                          has_weight ? &w : nullptr, a.options, check);
  }
  const std::int64_t per_row = chunks_per_row(numel);
  std::vector<double> partial(static_cast<std::size_t>(batch * per_row), 0.0);
  std::vector<std::int32_t> chunk_flags(check ? static_cast<std::size_t>(batch * per_row) : 0, 0);
  const C divisor = static_cast<C>(numel) * static_cast<C>(a.grad_count);
  for_each_chunk(batch, numel, [&](std::int64_t i, std::int64_t begin, std::int64_t end) {
    const LossRow<C>& row = rows[i];
    T* grad = with_grad ? mutable_row_ptr<T>(a.grad, i) + begin : nullptr;
    const T* pred = row_ptr<T>(a.pred, i) + begin;
    const T* y_t = row_ptr<T>(a.y_t, i) + begin;
    const T* y_tmin = row_ptr<T>(a.y_tmin, i) + begin;
    const std::int64_t n = end - begin;
    const std::int64_t task = i * per_row + begin / kChunk;
    if (!row.train) {
      if (with_grad) std::memset(static_cast<void*>(grad), 0, static_cast<std::size_t>(n) * sizeof(T));
      if (check) chunk_flags[task] = input_bits(pred, y_t, y_tmin, n);
      return;
    }
    const C k = (row.w + row.w) / divisor;
    const double total = loss_chunk(pred, y_t, y_tmin, grad, n, row.b, row.c, k);
    partial[task] = total;
    if (!check) return;
    // Error path only: a non-finite sum names its input (or is an overflow of finite data).
    if (!std::isfinite(total)) {
      const std::int32_t bits = input_bits(pred, y_t, y_tmin, n);
      chunk_flags[task] = bits != 0 ? bits : (row.flags > kTrained ? 0 : kLossOverflow);
    } else if (with_grad && std::abs(static_cast<double>(k)) * std::sqrt(total) >= Magnitude<T>::max_finite &&
               nonfinite_chunk(grad, n)) {
      chunk_flags[task] = kGradOverflow;  // |grad_ij| <= k sqrt(sum_j r_ij^2): re-read only here
    }
  });
  // Without a loss buffer (only the reduction is wanted) the per-sample values stay here.
  std::vector<C> own_loss(a.loss == 0 ? static_cast<std::size_t>(batch) : 0);
  auto* loss = a.loss != 0 ? reinterpret_cast<C*>(a.loss) : own_loss.data();
  auto* flags = reinterpret_cast<std::int32_t*>(a.flags);
  LossCheck result;
  double loss_sum = 0;
  for (std::int64_t i = 0; i < batch; ++i) {
    double total = 0;
    for (std::int64_t t = 0; t < per_row; ++t) total += partial[i * per_row + t];
    loss[i] = rows[i].train ? rows[i].w * static_cast<C>(total / static_cast<double>(numel)) : C(0);
    loss_sum += static_cast<double>(loss[i]);
    if (!check) continue;
    std::int32_t bits = rows[i].flags;
    for (std::int64_t t = 0; t < per_row; ++t) bits |= chunk_flags[i * per_row + t];
    if (!std::isfinite(loss[i]) && bits <= kTrained) bits |= kLossOverflow;  // finite inputs, loss overflows
    if (flags != nullptr) flags[i] = bits;
    if (bits > result.max_flag) result.max_flag = bits;
    if (bits >= 2 && result.first_bad < 0) result.first_bad = i;
  }
  // The batch mean (grad_count = B) or sum (1), in row order in float64, rounded once.
  if (a.reduced != 0) *reinterpret_cast<C*>(a.reduced) = static_cast<C>(loss_sum / static_cast<double>(a.grad_count));
  return result;
}

}  // namespace

LossCheck ambient_loss(const LossArgs& a) {
  AF_CHECK(a.batch >= 0, "ambient_loss: batch must be >= 0, got ", a.batch);
  AF_CHECK(a.numel >= 1, "ambient_loss: each sample needs at least one element, got ", a.numel);
  AF_CHECK(a.batch == 0 || ((a.loss != 0 || a.reduced != 0) && a.sigma.data != 0 && a.sigma_min.data != 0),
           "ambient_loss: null level pointer, or neither a loss nor a reduced output");
  AF_CHECK(a.grad_count >= 1, "ambient_loss: grad_count must be >= 1, got ", a.grad_count);
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
  return {};
}

}  // namespace ambient_fast
