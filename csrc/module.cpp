// Python bindings of ambient_fast._C: plain pybind11, no torch headers (ARCHITECTURE.md).
// Tensor operands are passed as (data pointer, row stride in elements) pairs and level
// vectors as (data pointer, element stride, is float64) triples; ambient_fast/kernels/_native.py (with the op files) is the
// only caller and owns validation and lifetimes. The sampler tables are numpy arrays.
// The kernel entry points take their arguments positionally (the names document them and
// still work as keywords): matching ~20 keywords is a measurable part of a small call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "ops.h"

namespace py = pybind11;
using namespace ambient_fast;

namespace {

using RowsArg = std::pair<std::uintptr_t, std::int64_t>;
using LevelsArg = std::tuple<std::uintptr_t, std::int64_t, bool>;  // (pointer, stride, is float64)
using F64Array = py::array_t<double, py::array::c_style>;
using I64Array = py::array_t<std::int64_t, py::array::c_style>;

Rows rows(const RowsArg& r) { return Rows{r.first, r.second}; }
Levels levels(const LevelsArg& l) { return Levels{std::get<0>(l), std::get<1>(l), std::get<2>(l)}; }
Levels optional_levels(const std::optional<LevelsArg>& l) { return l ? levels(*l) : Levels{0, 0, false}; }

void check_choice(const std::string& name, const std::string& value, const char* a, const char* b) {
  AF_CHECK(value == a || value == b, name, " must be '", a, "' or '", b, "', got '", value, "'");
}

void run_step(StepOp op, const std::string& dtype, std::int64_t batch, std::int64_t numel, const RowsArg& out,
              const RowsArg& x, const RowsArg& a, const RowsArg& b, const LevelsArg& sigma,
              const LevelsArg& sigma_next, double s_noise) {
  StepArgs args{parse_dtype(dtype), batch, numel, rows(out), rows(x), rows(a), rows(b), levels(sigma), levels(sigma_next), s_noise};
  py::gil_scoped_release release;
  solver_step(op, args);
}

const double* optional_data(const std::optional<F64Array>& a, std::int64_t n, const char* name) {
  if (!a) return nullptr;
  AF_CHECK(a->ndim() == 1 && a->shape(0) == n, name, ": expected shape (", n, ",)");
  return a->data();
}

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["max_threads"] = 1;
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
  info["isa_clones"] = py::make_tuple("x86-64-v4", "x86-64-v3", "default");  // float32 streaming loops: no v4
#else
  info["isa_clones"] = py::make_tuple("default");
#endif
#if defined(__VERSION__)
  info["compiler"] = __VERSION__;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ambient_fast native CPU kernels: fused ambient loss, fused solver steps, noise-first sampler.";

  m.def(
      "ambient_loss",
      [](const std::string& dtype, std::int64_t batch, std::int64_t numel, std::uintptr_t loss,
         std::optional<RowsArg> grad, const RowsArg& pred, const RowsArg& y_t, const RowsArg& y_tmin,
         const LevelsArg& sigma, const LevelsArg& sigma_min, const std::optional<LevelsArg>& sigma_max,
         const std::optional<LevelsArg>& weight, bool check, std::uintptr_t flags, std::int64_t grad_count,
         const std::string& schedule, const std::string& target,
         bool contraction, double elig_scale, double elig_shift, bool edm_weight, double sigma_data,
         std::uintptr_t reduced) {
        check_choice("schedule", schedule, "ve", "vp");
        check_choice("target", target, "x0", "eps");
        LossArgs args{parse_dtype(dtype), batch, numel, loss, grad ? rows(*grad) : Rows{0, 0},
                      rows(pred), rows(y_t), rows(y_tmin), levels(sigma), levels(sigma_min),
                      optional_levels(sigma_max), optional_levels(weight), check, flags, grad_count,
                      LossOptions{schedule == "vp", target == "eps", contraction, elig_scale, elig_shift,
                                  edm_weight, sigma_data}, reduced};
        LossCheck result;
        {
          py::gil_scoped_release release;
          result = ambient_fast::ambient_loss(args);
        }
        return py::make_tuple(result.max_flag, result.first_bad);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("numel"), py::arg("loss"), py::arg("grad"),
      py::arg("pred"), py::arg("y_t"), py::arg("y_tmin"), py::arg("sigma"), py::arg("sigma_min"),
      py::arg("sigma_max"), py::arg("weight"), py::arg("check"), py::arg("flags"), py::arg("grad_count"), py::arg("schedule"), py::arg("target"), py::arg("contraction"),
      py::arg("elig_scale"), py::arg("elig_shift"), py::arg("edm_weight"), py::arg("sigma_data"),
      py::arg("reduced") = 0,
      R"doc(Fused per-sample ambient loss (SPEC 2), optionally with its gradient in the same pass.

Writes loss (B,) float32 (float64 for float64 storage) = m_i w_i mean_j r_ij^2 with
r = pred + b_i y_t + c_i y_tmin, and, when grad is not None, grad (B, N) in the storage
dtype = d sum_i loss_i / d pred / grad_count. Rows (pointer, row stride in elements) have N
contiguous elements each; sigma, sigma_min, sigma_max, weight are (pointer, element stride,
is_float64) triples of (B,) float32/float64 levels (sigma_max None: zeros; weight None: no
weight tensor). check: compute each row's check bits (LossFlag in ops.h: 1 = trains, larger
bits = errors), written to flags when it is a (B,) int32 buffer (0: none). Returns (max flag,
first row with an error bit or -1); (0, -1) without check. reduced: a 0-d buffer of the loss
dtype that receives sum_i loss_i / grad_count (the batch mean for grad_count = B, the sum
for 1), added in row order in float64 and rounded once; 0: none. loss may be 0 when reduced
is given (the per-sample values are then not returned). dtype: 'float32' | 'float64' | 'float16' | 'bfloat16'.
Contract: per_sample_loss_reference.)doc");

  m.def(
      "euler_step",
      [](const std::string& dtype, std::int64_t batch, std::int64_t numel, const RowsArg& out, const RowsArg& x,
         const RowsArg& denoised, const LevelsArg& sigma, const LevelsArg& sigma_next) {
        run_step(StepOp::euler, dtype, batch, numel, out, x, denoised, RowsArg{0, 0}, sigma, sigma_next, 1.0);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("numel"), py::arg("out"), py::arg("x"),
      py::arg("denoised"), py::arg("sigma"), py::arg("sigma_next"),
      R"doc(out = x + (sigma_next - sigma) (x - denoised) / sigma (SPEC 4), one pass.

Operands are (pointer, row stride) pairs of (B, N) rows of one storage dtype; sigma and
sigma_next are (pointer, element stride, is_float64) triples of (B,) float32/float64 levels. Contract: core.solver_step.euler_step.)doc");

  m.def(
      "heun_step",
      [](const std::string& dtype, std::int64_t batch, std::int64_t numel, const RowsArg& out, const RowsArg& x,
         const RowsArg& denoised, const RowsArg& denoised_next, const LevelsArg& sigma, const LevelsArg& sigma_next) {
        run_step(StepOp::heun, dtype, batch, numel, out, x, denoised, denoised_next, sigma, sigma_next, 1.0);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("numel"), py::arg("out"), py::arg("x"),
      py::arg("denoised"), py::arg("denoised_next"), py::arg("sigma"), py::arg("sigma_next"),
      R"doc(Heun's second stage (SPEC 4) from x, D(x, sigma) and D(x_euler, sigma_next), one pass.

Rows with sigma_next == 0 return the Euler point and do not read denoised_next.
Contract: core.solver_step.heun_step.)doc");

  m.def(
      "churn_step",
      [](const std::string& dtype, std::int64_t batch, std::int64_t numel, const RowsArg& out, const RowsArg& x,
         const RowsArg& noise, const LevelsArg& sigma, const LevelsArg& sigma_hat, double S_noise) {
        run_step(StepOp::churn, dtype, batch, numel, out, x, noise, RowsArg{0, 0}, sigma, sigma_hat, S_noise);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("numel"), py::arg("out"), py::arg("x"),
      py::arg("noise"), py::arg("sigma"), py::arg("sigma_hat"), py::arg("S_noise"),
      R"doc(out = x + sqrt(max(sigma_hat^2 - sigma^2, 0)) S_noise noise (SPEC 4), one pass.

Contract: core.solver_step.churn_step.)doc");

  m.def(
      "ancestral_step",
      [](const std::string& dtype, std::int64_t batch, std::int64_t numel, const RowsArg& out, const RowsArg& x,
         const RowsArg& denoised, const RowsArg& noise, const LevelsArg& sigma, const LevelsArg& sigma_next) {
        run_step(StepOp::ancestral, dtype, batch, numel, out, x, denoised, noise, sigma, sigma_next, 1.0);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("numel"), py::arg("out"), py::arg("x"),
      py::arg("denoised"), py::arg("noise"), py::arg("sigma"), py::arg("sigma_next"),
      R"doc(out = D + r^2 (x - D) + sigma_next sqrt(1 - r^2) noise, r = sigma_next / sigma (SPEC 5).

Contract: core.solver_step.ancestral_step.)doc");

  m.def(
      "sort_levels",
      [](py::array_t<double, py::array::c_style> values) {
        AF_CHECK(values.ndim() == 1, "sort_levels: expected a 1-D array");
        const std::int64_t n = values.shape(0);
        F64Array sorted(n);
        I64Array order(n);
        const double* in = values.data();
        double* out_sorted = sorted.mutable_data();
        std::int64_t* out_order = order.mutable_data();
        {
          py::gil_scoped_release release;
          ambient_fast::sort_levels(in, n, out_sorted, out_order);
        }
        return py::make_tuple(sorted, order);
      },
      py::arg("values").noconvert(),
      R"doc(Stable argsort of a float64 (n,) array: returns (sorted float64 (n,), order int64 (n,))
with sorted = values[order] and ties in index order (numpy's argsort(kind='stable')).
Parallel with OpenMP; NaN is rejected.)doc");

  m.def(
      "noise_first_draw",
      [](F64Array threshold_sorted, I64Array threshold_order, std::optional<F64Array> threshold_by_index,
         std::optional<F64Array> sigma_max_sorted, std::optional<I64Array> sigma_max_order, std::uint64_t key,
         std::uint64_t first_slot, std::int64_t count, double P_mean, double P_std, std::int64_t max_attempts) {
        AF_CHECK(threshold_sorted.ndim() == 1 && threshold_order.ndim() == 1 &&
                     threshold_order.shape(0) == threshold_sorted.shape(0),
                 "noise_first_draw: threshold tables must be 1-D of equal length");
        AF_CHECK(sigma_max_sorted.has_value() == sigma_max_order.has_value(),
                 "noise_first_draw: give both sigma_max tables or neither");
        const std::int64_t n = threshold_sorted.shape(0);
        AF_CHECK(!sigma_max_order || (sigma_max_order->ndim() == 1 && sigma_max_order->shape(0) == n),
                 "noise_first_draw: sigma_max_order: expected shape (", n, ",)");
        AF_CHECK(count >= 0, "noise_first_draw: count must be >= 0, got ", count);
        NoiseFirstTables tables{n,
                                threshold_sorted.data(),
                                threshold_order.data(),
                                optional_data(threshold_by_index, n, "threshold_by_index"),
                                optional_data(sigma_max_sorted, n, "sigma_max_sorted"),
                                sigma_max_order ? sigma_max_order->data() : nullptr};
        I64Array indices(count);
        F64Array sigmas(count);
        NoiseFirstDraw draw{key, first_slot, count, P_mean, P_std, max_attempts, indices.mutable_data(),
                            sigmas.mutable_data()};
        {
          py::gil_scoped_release release;
          ambient_fast::noise_first_draw(tables, draw);
        }
        return py::make_tuple(indices, sigmas);
      },
      py::arg("threshold_sorted").noconvert(), py::arg("threshold_order").noconvert(),
      py::arg("threshold_by_index").noconvert(), py::arg("sigma_max_sorted").noconvert(),
      py::arg("sigma_max_order").noconvert(), py::arg("key"), py::arg("first_slot"), py::arg("count"),
      py::arg("P_mean"), py::arg("P_std"), py::arg("max_attempts"),
      R"doc(Noise-level-first draws for slots first_slot .. first_slot + count - 1 (SPEC 3).

Returns (indices int64 (count,), sigmas float64 (count,)). Tables come from sort_levels
(thresholds scale*sigma_min + shift with -inf for sigma_min == 0; sigma_max tables and the
thresholds in index order only with the locality rule, else None). The stream is described
at the top of csrc/noise_first.cpp; ambient_fast.data.sampler has the numpy twin.)doc");

  m.def("build_info", &build_info,
        R"doc(Build facts for diagnostics and benchmark reports: OpenMP on/off, its thread count,
the ISA clones compiled into the hot loops, and the compiler version string.)doc");
}
