// Entry points of ambient_fast._C (bound in module.cpp). Every entry point checks its
// arguments first (AF_CHECK -> ValueError) and runs without the GIL.
#pragma once

#include "common.h"

namespace ambient_fast {

// ---- ambient_loss.cpp (SPEC 2) ----------------------------------------------------------
struct LossOptions {
  bool vp = false;           // schedule "vp" (else "ve")
  bool eps = false;          // target "eps" (else "x0")
  bool contraction = false;  // eligible corrupt rows use sigma_min = 0 in the coefficients
  double elig_scale = 1.0;   // mask: sigma > elig_scale * sigma_min + elig_shift
  double elig_shift = 0.0;
  bool edm_weight = false;   // lambda_EDM weight when no weight tensor is given
  double sigma_data = 0.5;
};

// Per-sample check flags (the kernel pass is also the input check). Bit values are mirrored
// in ambient_fast/kernels/ambient_loss.py (FLAG_*); keep them in sync.
enum LossFlag : std::int32_t {
  kTrained = 1,          // the row trains (not an error)
  kPredBad = 2,          // pred holds NaN/Inf in this row
  kYtBad = 4,            // y_t holds NaN/Inf
  kYtminBad = 8,         // y_tmin holds NaN/Inf
  kSigmaBad = 16,        // sigma not finite, <= 0, or >= 1 for VP
  kSigmaMinBad = 32,     // sigma_min not finite, < 0, or >= 1 for VP
  kSigmaMaxBad = 64,     // sigma_max not finite or < 0
  kWeightBad = 128,      // weight not finite
  kCoeffOverflow = 256,  // b, c or w not finite in the compute type (extreme levels)
  kLossOverflow = 512,   // the loss is not finite although every input is
  kGradOverflow = 1024,  // d loss / d pred overflows the storage type (near the sigma_min pole)
};

struct LossArgs {
  DType dtype;            // storage type of pred, y_t, y_tmin and grad
  std::int64_t batch;     // B
  std::int64_t numel;     // N elements per sample
  std::uintptr_t loss;    // out (B,) float32, float64 for float64 storage; 0: only `reduced`
  Rows grad;              // out (B, N) d sum_i loss_i / d pred / grad_count, storage type; data 0 = none
  Rows pred, y_t, y_tmin; // (B, N)
  Levels sigma, sigma_min;  // (B,)
  Levels sigma_max;       // (B,); data 0: zeros (no locality rule)
  Levels weight;          // (B,); data 0: no weight tensor
  bool check;             // compute the LossFlag bits (else rows that do not train are not read)
  std::uintptr_t flags;   // out (B,) int32 LossFlag bits when checking, or 0 (only the summary is returned)
  std::int64_t grad_count = 1;  // the gradient is divided by this (B for a mean over the batch)
  LossOptions options;
  std::uintptr_t reduced = 0;   // out 0-d (compute type) sum_i loss_i / grad_count, or 0: not reduced
};

struct LossCheck {
  std::int32_t max_flag = 0;     // max over rows of the flags (>= 2: some error bit is set)
  std::int64_t first_bad = -1;   // first row with an error bit, -1 if none
};

LossCheck ambient_loss(const LossArgs& args);

// ---- solver_step.cpp (SPEC 4) -----------------------------------------------------------
enum class StepOp { euler, heun, churn, ancestral };

struct StepArgs {
  DType dtype;                    // storage type of every operand
  std::int64_t batch, numel;      // (B, N)
  Rows out;                       // (B, N) output
  Rows x;                         // (B, N) state
  Rows a;                         // euler/heun/ancestral: denoised; churn: noise
  Rows b;                         // heun: denoised_next; ancestral: noise; else unused
  Levels sigma;                   // (B,)
  Levels sigma_next;              // (B,) (churn: sigma_hat)
  double s_noise = 1.0;           // churn only
};

void solver_step(StepOp op, const StepArgs& args);

// ---- noise_first.cpp (SPEC 3) -----------------------------------------------------------
struct NoiseFirstTables {
  std::int64_t n;                       // dataset size
  const double* threshold_sorted;       // (n,) ascending
  const std::int64_t* threshold_order;  // (n,) dataset index of each sorted threshold
  const double* threshold_by_index;     // (n,) thresholds in dataset order (locality only)
  const double* sigma_max_sorted;       // (n,) ascending, or nullptr: no locality rule
  const std::int64_t* sigma_max_order;  // (n,) or nullptr
};

struct NoiseFirstDraw {
  std::uint64_t key;         // stream key of (seed, epoch)
  std::uint64_t first_slot;  // global slot of the first draw
  std::int64_t count;        // slots first_slot .. first_slot + count - 1
  double P_mean, P_std;      // ln sigma ~ N(P_mean, P_std^2)
  std::int64_t max_attempts; // sigma redraws per slot before giving up
  std::int64_t* indices;     // out (count,)
  double* sigmas;            // out (count,)
};

// Stable argsort: sorted[i] = values[order[i]], ties in index order.
void sort_levels(const double* values, std::int64_t n, double* sorted, std::int64_t* order);
void noise_first_draw(const NoiseFirstTables& tables, const NoiseFirstDraw& draw);

}  // namespace ambient_fast
