// Noise-level-first batch sampling (SPEC 3): for each batch slot draw sigma from the EDM
// log-normal, then a dataset index uniformly among the samples eligible at that sigma.
// The numpy implementation in ambient_fast/data/sampler.py computes the same stream bit for
// bit; keep the two in step (tests/test_noise_first_sampler.py checks it).
//
// Tables (built once by sort_levels, a parallel LSD radix argsort; O(n) memory, no
// per-sigma index lists):
//   threshold_sorted/order: t_i = scale*sigma_min_i + shift (-inf where sigma_min_i == 0),
//       sorted ascending with ties in index order; the samples eligible through the sigma_min
//       rule are the prefix A = {t < sigma}, found by one binary search per slot (16 slots'
//       searches run in lockstep so their cache misses overlap).
//   sigma_max_sorted/order (locality, optional): the samples with sigma < sigma_max_i are
//       the suffix L = {sigma_max > sigma} of a second sorted array.
// Index draw, uniform over A u L without materialising it: k uniform in [0, |A| + |L|);
// k < |A| picks A[k]; otherwise L[k - |A|], rejected (redraw k) when that sample is also in
// A, so each member of the union has probability 1/(|A| + |L|) per trial (acceptance >= 1/2).
// If A u L is empty, sigma is redrawn.
//
// Random stream: counter-based, so every slot is independent of the others and of the
// thread count. With mix64 the SplitMix64 finaliser and G = 0x9E3779B97F4A7C15 (mod 2^64):
//   key           = mix64(mix64(seed) + (epoch + 1) G)          (computed in Python)
//   slot_key      = mix64(key ^ mix64(slot + G))
//   bits(c)       = mix64(slot_key + (c + 1) G)
//   sigma, try a  : u = ((bits(a << 32) >> 11) + 0.5) 2^-53,
//                   sigma = exp(P_mean + P_std ndtri(u))
//   index, try a, trial t >= 1: k = floor(bits((a << 32) | t) (|A| + |L|) / 2^64)
// The slot hash enters through a xor (not an additive offset), so the streams of two epochs
// or seeds share no runs of slots.
// exp, log and ndtri (Wichura's AS241) are written out below with +, -, *, /, sqrt, frexp,
// ldexp and rint only, all correctly rounded, and the build disables contraction, so numpy
// reproduces every bit.
#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace ambient_fast {
namespace {

constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline std::uint64_t stream_bits(std::uint64_t slot_key, std::uint64_t counter) {
  return mix64(slot_key + (counter + 1) * kGolden);
}

inline double uniform_open(std::uint64_t bits) {  // in (0, 1), 53 bits
  return (static_cast<double>(bits >> 11) + 0.5) * 0x1p-53;
}

inline std::uint64_t mulhi64(std::uint64_t a, std::uint64_t b) {
  return static_cast<std::uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}

// Natural log for positive finite normal x (fdlibm e_log.c polynomial, < 1 ulp).
double log_fd(double x) {
  constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  constexpr double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01, Lg3 = 2.857142874366239149e-01,
                   Lg4 = 2.222219843214978396e-01, Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                   Lg7 = 1.479819860511658591e-01;
  int exponent;
  double m = std::frexp(x, &exponent);  // x = m 2^exponent, m in [0.5, 1)
  if (m < 0.70710678118654752440) {     // bring m into [sqrt(1/2), sqrt(2))
    m = m * 2.0;
    exponent -= 1;
  }
  const double k = exponent;
  const double f = m - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
  const double t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
  const double r = t2 + t1;
  const double hfsq = 0.5 * f * f;
  return k * ln2_hi - ((hfsq - (s * (hfsq + r) + k * ln2_lo)) - f);
}

// e^x for |x| < 700 (fdlibm e_exp.c, < 1 ulp).
double exp_fd(double x) {
  constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10,
                   inv_ln2 = 1.44269504088896338700e+00;
  constexpr double P1 = 1.66666666666666019037e-01, P2 = -2.77777777770155933842e-03, P3 = 6.61375632143793436117e-05,
                   P4 = -1.65339022054652515390e-06, P5 = 4.13813679705723846039e-08;
  const double k = std::nearbyint(x * inv_ln2);
  const double hi = x - k * ln2_hi;
  const double lo = k * ln2_lo;
  const double r = hi - lo;
  const double t = r * r;
  const double c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))));
  const double y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);
  return std::ldexp(y, static_cast<int>(k));
}

// Wichura (1988) AS241 PPND16 rational approximations, coefficients highest degree first.
constexpr double kCentralNum[] = {2.5090809287301226727e+3, 3.3430575583588128105e+4, 6.7265770927008700853e+4,
                                  4.5921953931549871457e+4, 1.3731693765509461125e+4, 1.9715909503065514427e+3,
                                  1.3314166789178437745e+2, 3.3871328727963666080e+0};
constexpr double kCentralDen[] = {5.2264952788528545610e+3, 2.8729085735721942674e+4, 3.9307895800092710610e+4,
                                  2.1213794301586595867e+4, 5.3941960214247511077e+3, 6.8718700749205790830e+2,
                                  4.2313330701600911252e+1, 1.0};
constexpr double kTailNum[] = {7.74545014278341407640e-4, 2.27238449892691845833e-2, 2.41780725177450611770e-1,
                               1.27045825245236838258e+0, 3.64784832476320460504e+0, 5.76949722146069140550e+0,
                               4.63033784615654529590e+0, 1.42343711074968357734e+0};
constexpr double kTailDen[] = {1.05075007164441684324e-9, 5.47593808499534494600e-4, 1.51986665636164571966e-2,
                               1.48103976427480074590e-1, 6.89767334985100004550e-1, 1.67638483018380384940e+0,
                               2.05319162663775882187e+0, 1.0};
constexpr double kFarNum[] = {2.01033439929228813265e-7, 2.71155556874348757815e-5, 1.24266094738807843860e-3,
                              2.65321895265761230930e-2, 2.96560571828504891230e-1, 1.78482653991729133580e+0,
                              5.46378491116411436990e+0, 6.65790464350110377720e+0};
constexpr double kFarDen[] = {2.04426310338993978564e-15, 1.42151175831644588870e-7, 1.84631831751005468180e-5,
                              7.86869131145613259100e-4, 1.48753612908506148525e-2, 1.36929880922735805310e-1,
                              5.99832206555887937690e-1, 1.0};

// ((c0 x + c1) x + c2) x + ...: the evaluation order the numpy twin repeats.
template <std::size_t N>
double horner(const double (&c)[N], double x) {
  double acc = c[0] * x + c[1];
  for (std::size_t i = 2; i < N; ++i) acc = acc * x + c[i];
  return acc;
}

// Standard normal quantile (AS241), about 1e-16 relative.
double ndtri(double p) {
  const double q = p - 0.5;
  if (std::fabs(q) <= 0.425) {
    const double r = 0.180625 - q * q;
    return q * horner(kCentralNum, r) / horner(kCentralDen, r);
  }
  const double r = std::sqrt(-log_fd(q < 0 ? p : 1.0 - p));
  const double x = r <= 5.0 ? horner(kTailNum, r - 1.6) / horner(kTailDen, r - 1.6)
                            : horner(kFarNum, r - 5.0) / horner(kFarDen, r - 5.0);
  return q < 0 ? -x : x;
}

// Sort key with the order of doubles (NaN excluded; -0.0 and +0.0 get one key, as they
// compare equal).
inline std::uint64_t order_key(double v) {
  if (v == 0.0) v = 0.0;
  std::uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u >> 63) ? ~u : (u | (std::uint64_t{1} << 63));
}

// Slots are drawn in groups whose binary searches run in lockstep: the probe sequence
// depends only on the table size, so the group's kGroup cache misses per level are in flight
// together instead of one after another (the tables of a 10^8 dataset are 800 MB).
constexpr int kGroup = 16;

// out[q] = #{i : a[i] < x[q]} (kStrict) or #{i : a[i] <= x[q]}, a sorted ascending, n >= 1.
template <bool kStrict>
void count_below(const double* a, std::int64_t n, const double* x, std::int64_t* out, int size) {
  std::int64_t base[kGroup] = {};
  for (std::int64_t len = n; len > 1;) {
    const std::int64_t half = len / 2;
    for (int q = 0; q < size; ++q) {
      const double probe = a[base[q] + half];
      base[q] += (kStrict ? probe < x[q] : probe <= x[q]) ? half : 0;
    }
    len -= half;
  }
  for (int q = 0; q < size; ++q) out[q] = base[q] + ((kStrict ? a[base[q]] < x[q] : a[base[q]] <= x[q]) ? 1 : 0);
}

// Draws slots first .. first + size - 1 (size <= kGroup); false if a slot ran out of attempts.
bool draw_group(const NoiseFirstTables& t, const NoiseFirstDraw& d, std::int64_t first, int size) {
  std::uint64_t slot_key[kGroup], attempt[kGroup] = {};
  double sigma[kGroup];
  std::int64_t in_a[kGroup], in_l[kGroup] = {};
  int pending[kGroup];
  for (int q = 0; q < size; ++q) {
    slot_key[q] = mix64(d.key ^ mix64(d.first_slot + static_cast<std::uint64_t>(first + q) + kGolden));
    pending[q] = q;
  }
  int remaining = size;
  while (remaining > 0) {
    double level[kGroup];
    std::int64_t below[kGroup], at_most[kGroup];
    for (int p = 0; p < remaining; ++p) {
      const int q = pending[p];
      if (attempt[q] >= static_cast<std::uint64_t>(d.max_attempts)) return false;
      const double u = uniform_open(stream_bits(slot_key[q], attempt[q] << 32));
      level[p] = sigma[q] = exp_fd(d.P_mean + d.P_std * ndtri(u));
    }
    count_below<true>(t.threshold_sorted, t.n, level, below, remaining);
    if (t.sigma_max_sorted != nullptr) count_below<false>(t.sigma_max_sorted, t.n, level, at_most, remaining);
    int still = 0;
    for (int p = 0; p < remaining; ++p) {
      const int q = pending[p];
      in_a[q] = below[p];
      in_l[q] = t.sigma_max_sorted != nullptr ? t.n - at_most[p] : 0;
      if (in_a[q] + in_l[q] == 0) {  // nothing eligible at this sigma: redraw sigma
        ++attempt[q];
        pending[still++] = q;
        continue;
      }
      // Terminates with probability 1: each trial accepts with probability >= 1/2.
      const auto total = static_cast<std::uint64_t>(in_a[q] + in_l[q]);
      for (std::uint64_t trial = 1;; ++trial) {
        const auto k = static_cast<std::int64_t>(mulhi64(stream_bits(slot_key[q], (attempt[q] << 32) | trial), total));
        std::int64_t index;
        if (k < in_a[q]) {
          index = t.threshold_order[k];
        } else {
          index = t.sigma_max_order[t.n - in_l[q] + (k - in_a[q])];
          if (t.threshold_by_index[index] < sigma[q]) continue;  // also in A: counted there
        }
        d.indices[first + q] = index;
        d.sigmas[first + q] = sigma[q];
        break;
      }
    }
    remaining = still;
  }
  return true;
}

}  // namespace

void sort_levels(const double* values, std::int64_t n, double* sorted, std::int64_t* order) {
  AF_CHECK(n >= 0, "sort_levels: n must be >= 0, got ", n);
  for (std::int64_t i = 0; i < n; ++i) AF_CHECK(!std::isnan(values[i]), "sort_levels: NaN at index ", i);
  // LSD radix sort of (order-preserving key, index), 11-bit digits, each pass stable: the
  // result is the stable argsort. Per pass, each thread counts its block, the offsets are
  // laid out digit-major, thread-minor, and each thread scatters its block in order.
  // Passes whose digit is the same for every key are skipped.
  constexpr int kBits = 11;
  constexpr std::int64_t kBuckets = std::int64_t{1} << kBits;
  std::vector<std::uint64_t> key(static_cast<std::size_t>(n)), key_next(static_cast<std::size_t>(n));
  std::vector<std::int64_t> index_next(static_cast<std::size_t>(n));
  std::int64_t* index = order;  // the output doubles as one of the two index buffers
  std::int64_t* index_other = index_next.data();
#ifdef _OPENMP
  const int max_threads = n >= 65536 ? omp_get_max_threads() : 1;
#else
  const int max_threads = 1;
#endif
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(max_threads) * kBuckets);
#pragma omp parallel for schedule(static) num_threads(max_threads)
  for (std::int64_t i = 0; i < n; ++i) {
    key[i] = order_key(values[i]);
    index[i] = i;
  }
  for (int shift = 0; shift < 64; shift += kBits) {
    bool skip = false;
#pragma omp parallel num_threads(max_threads)
    {
#ifdef _OPENMP
      const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
#else
      const int thread = 0, threads = 1;
#endif
      const std::int64_t begin = n * thread / threads, end = n * (thread + 1) / threads;
      std::int64_t* count = offsets.data() + thread * kBuckets;
      std::fill(count, count + kBuckets, 0);
      for (std::int64_t i = begin; i < end; ++i) ++count[(key[i] >> shift) & (kBuckets - 1)];
#pragma omp barrier
#pragma omp single
      {
        std::int64_t total = 0;
        for (std::int64_t digit = 0; digit < kBuckets; ++digit) {
          std::int64_t in_digit = 0;
          for (int t = 0; t < threads; ++t) {
            const std::int64_t c = offsets[t * kBuckets + digit];
            offsets[t * kBuckets + digit] = total;
            total += c;
            in_digit += c;
          }
          skip = skip || in_digit == n;
        }
      }
      if (!skip) {
        for (std::int64_t i = begin; i < end; ++i) {
          const std::int64_t pos = count[(key[i] >> shift) & (kBuckets - 1)]++;
          key_next[pos] = key[i];
          index_other[pos] = index[i];
        }
      }
    }
    if (!skip) {
      key.swap(key_next);
      std::swap(index, index_other);
    }
  }
  if (index != order) std::copy(index, index + n, order);
#pragma omp parallel for schedule(static) num_threads(max_threads)
  for (std::int64_t i = 0; i < n; ++i) sorted[i] = values[order[i]];
}

void noise_first_draw(const NoiseFirstTables& t, const NoiseFirstDraw& d) {
  AF_CHECK(t.n >= 1, "noise_first_draw: empty dataset");
  AF_CHECK(d.count >= 0, "noise_first_draw: count must be >= 0, got ", d.count);
  AF_CHECK(d.max_attempts >= 1 && d.max_attempts <= (std::int64_t{1} << 32),
           "noise_first_draw: max_attempts must be in [1, 2^32], got ", d.max_attempts);
  AF_CHECK(t.sigma_max_sorted == nullptr || t.threshold_by_index != nullptr,
           "noise_first_draw: locality needs the thresholds in index order");
  const std::int64_t groups = (d.count + kGroup - 1) / kGroup;
  std::atomic<bool> exhausted{false};
#pragma omp parallel for schedule(dynamic, 16) if (d.count >= 4096)
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t first = g * kGroup;
    const int size = static_cast<int>(std::min<std::int64_t>(kGroup, d.count - first));
    if (!draw_group(t, d, first, size)) exhausted.store(true, std::memory_order_relaxed);
  }
  if (exhausted.load()) {
    throw std::runtime_error("noise_first_draw: no eligible sample in " + std::to_string(d.max_attempts) +
                             " sigma draws for some slot; the eligible set is (almost) never reachable");
  }
}

}  // namespace ambient_fast
