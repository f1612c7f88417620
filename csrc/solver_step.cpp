// Fused sampler update steps on CPU (SPEC 4; EDM, Karras et al. 2022, Algorithms 1 and 2).
// Contract: ambient_fast.core.solver_step. One pass: each input element is read once and
// each output element written once; per-sample levels become per-row coefficients first.
//
//   euler:     x' = x + (sigma_next - sigma) ((x - D) / sigma)
//   heun:      x' = x + (sigma_next - sigma)/2 (d + d'),  d = (x - D)/sigma,
//              d' = (x + (sigma_next - sigma) d - D')/sigma_next; rows with sigma_next == 0
//              keep the Euler point (D' is not read there)
//   churn:     x' = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps
//   ancestral: x' = D + r^2 (x - D) + sigma_next sqrt(1 - r^2) eps,  r = sigma_next / sigma
//
// Arithmetic in float64 for float64 state and float32 otherwise, in the reference's operation
// order with contraction off: Euler and Heun are bitwise core.solver_step in every dtype
// (fp16/bf16 results are the float32 values rounded to nearest even, as torch's casts).
// Churn and ancestral agree to rounding only: their per-row noise scale uses IEEE sqrt,
// while PyTorch's vectorised CPU sqrt is not always correctly rounded.
//
// Vectorisation (GCC 12.2, -fopt-info-vec-optimized and objdump of each clone): every
// map_rows loop (5 maps x 4 storage types) is vectorised, 64-byte vectors (vdivps/vdivpd on
// zmm) in the x86-64-v4 clone, 32-byte in x86-64-v3, 16-byte in the baseline, with a
// vectorised epilogue. The float32 loops stream 3-4 arrays once and are bound by memory
// bandwidth, not by the divisions (kept to match the reference's rounding); they have no
// AVX-512 clone on purpose (AF_STREAM_CLONES in common.h): its 64-byte stores stall on 4K
// aliasing at the offsets glibc gives consecutive tensors (fp32 churn at 16x4x64x64: 47.7 ->
// 37.5 us per call).
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <variant>
#include <vector>

namespace ambient_fast {
namespace {

// Per-row elementwise maps: operator()(x, a, b) with a, b the op's other inputs.
template <typename C>
struct Euler {
  C step, sigma;  // step = sigma_next - sigma
  AF_INLINE C operator()(C x, C denoised, C) const { return x + step * ((x - denoised) / sigma); }  // EDM order
};
template <typename C>
struct HeunCorrect {
  C step, half_step, sigma, sigma_next;
  AF_INLINE C operator()(C x, C denoised, C denoised_next) const {
    const C slope = (x - denoised) / sigma;
    const C x_euler = x + step * slope;
    const C slope_next = (x_euler - denoised_next) / sigma_next;
    return x + half_step * (slope + slope_next);
  }
};
template <typename C>
struct HeunLast {  // sigma_next == 0: the Euler point, as computed inside heun_step
  C step, sigma;
  AF_INLINE C operator()(C x, C denoised, C) const { return x + step * ((x - denoised) / sigma); }
};
template <typename C>
struct Churn {
  C noise_std;
  AF_INLINE C operator()(C x, C noise, C) const { return x + noise_std * noise; }
};
template <typename C>
struct Ancestral {
  C ratio2, noise_std;
  AF_INLINE C operator()(C x, C denoised, C noise) const {
    return (denoised + ratio2 * (x - denoised)) + noise_std * noise;
  }
};

template <typename T, int kInputs, typename Op>
AF_INLINE void map_rows(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ a,
                        const T* __restrict__ b, std::int64_t n, const Op op) {
  using C = compute_t<T>;
  for (std::int64_t j = 0; j < n; ++j) {
    const C third = kInputs == 3 ? load(b, j) : C(0);
    store(out, j, op(load(x, j), load(a, j), third));
  }
}

// One multiversioned overload per (storage type, map). float32 has no AVX-512 clone (4K
// aliasing, see AF_STREAM_CLONES); the 16-bit types and float64 keep it: their loops are
// bound by the conversions or the 8-lane divisions, where the wider vectors win (bf16 Euler
// at 16x4x64x64: 64 us with AVX-512, 103 us without).
#define AF_STEP_CHUNK(T, OP, INPUTS, CLONES)                                                  \
  CLONES void step_chunk(T* out, const T* x, const T* a, const T* b, std::int64_t n,          \
                         const OP<compute_t<T>>& op) {                                        \
    map_rows<T, INPUTS>(out, x, a, b, n, op);                                                 \
  }
#define AF_STEP_CHUNKS(T, CLONES)                                                             \
  AF_STEP_CHUNK(T, Euler, 2, CLONES)                                                          \
  AF_STEP_CHUNK(T, HeunCorrect, 3, CLONES)                                                    \
  AF_STEP_CHUNK(T, HeunLast, 2, CLONES)                                                       \
  AF_STEP_CHUNK(T, Churn, 2, CLONES)                                                          \
  AF_STEP_CHUNK(T, Ancestral, 3, CLONES)
AF_STEP_CHUNKS(float, AF_STREAM_CLONES)
AF_STEP_CHUNKS(double, AF_CLONES)
AF_STEP_CHUNKS(Half, AF_CLONES)
AF_STEP_CHUNKS(BFloat16, AF_CLONES)
#undef AF_STEP_CHUNKS
#undef AF_STEP_CHUNK

// Runs make_op(i) -> per-row map over every (row, chunk) task; make_op is evaluated once
// per row up front (levels are read on the host thread only).
template <typename T, typename MakeOp>
void run_step(const StepArgs& s, const MakeOp& make_op) {
  using Op = decltype(make_op(std::int64_t{0}));
  std::vector<Op> ops;
  ops.reserve(static_cast<std::size_t>(s.batch));
  for (std::int64_t i = 0; i < s.batch; ++i) ops.push_back(make_op(i));
  for_each_chunk(s.batch, s.numel, [&](std::int64_t i, std::int64_t begin, std::int64_t end) {
    const T* b = s.b.data != 0 ? row_ptr<T>(s.b, i) + begin : nullptr;
    std::visit(
        [&](const auto& op) {
          step_chunk(mutable_row_ptr<T>(s.out, i) + begin, row_ptr<T>(s.x, i) + begin,
                     row_ptr<T>(s.a, i) + begin, b, end - begin, op);
        },
        ops[i]);
  });
}

template <typename C>
C level(const Levels& levels, std::int64_t i) {
  return static_cast<C>(level_at(levels, i));
}

template <typename T>
void run_step_op(StepOp op, const StepArgs& s) {
  using C = compute_t<T>;
  switch (op) {
    case StepOp::euler:
      return run_step<T>(s, [&](std::int64_t i) {
        const C sigma = level<C>(s.sigma, i), sigma_next = level<C>(s.sigma_next, i);
        return std::variant<Euler<C>>(Euler<C>{sigma_next - sigma, sigma});
      });
    case StepOp::heun:
      return run_step<T>(s, [&](std::int64_t i) {
        const C sigma = level<C>(s.sigma, i), sigma_next = level<C>(s.sigma_next, i);
        const C step = sigma_next - sigma;
        using V = std::variant<HeunCorrect<C>, HeunLast<C>>;
        return sigma_next > C(0) ? V(HeunCorrect<C>{step, step * C(0.5), sigma, sigma_next})
                                 : V(HeunLast<C>{step, sigma});
      });
    case StepOp::churn:
      return run_step<T>(s, [&](std::int64_t i) {
        const C sigma = level<C>(s.sigma, i), sigma_hat = level<C>(s.sigma_next, i);
        const C noise_std = std::sqrt(std::max(sigma_hat * sigma_hat - sigma * sigma, C(0))) * static_cast<C>(s.s_noise);
        return std::variant<Churn<C>>(Churn<C>{noise_std});
      });
    case StepOp::ancestral:
      return run_step<T>(s, [&](std::int64_t i) {
        const C sigma = level<C>(s.sigma, i), sigma_next = level<C>(s.sigma_next, i);
        const C ratio = sigma_next / sigma;
        const C ratio2 = ratio * ratio;
        const C noise_std = sigma_next * std::sqrt(std::max(C(1) - ratio2, C(0)));
        return std::variant<Ancestral<C>>(Ancestral<C>{ratio2, noise_std});
      });
  }
}

}  // namespace

void solver_step(StepOp op, const StepArgs& s) {
  const char* name = op == StepOp::euler ? "euler_step"
                     : op == StepOp::heun ? "heun_step"
                     : op == StepOp::churn ? "churn_step"
                                           : "ancestral_step";
  AF_CHECK(s.batch >= 0 && s.numel >= 0, name, ": bad shape (", s.batch, ", ", s.numel, ")");
  AF_CHECK(s.batch == 0 || (s.sigma.data != 0 && s.sigma_next.data != 0), name, ": null level pointer");
  check_out_rows("out", s.out, s.batch, s.numel);
  check_rows("x", s.x, s.batch);
  check_rows("second input", s.a, s.batch);
  if (op == StepOp::heun || op == StepOp::ancestral) check_rows("third input", s.b, s.batch);
  switch (s.dtype) {
    case DType::f32: return run_step_op<float>(op, s);
    case DType::f64: return run_step_op<double>(op, s);
    case DType::f16: return run_step_op<Half>(op, s);
    case DType::bf16: return run_step_op<BFloat16>(op, s);
  }
}

}  // namespace ambient_fast
