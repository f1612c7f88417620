// Shared pieces of the native CPU kernels (ambient_fast._C): argument checks, storage
// dtypes with in-register fp16/bf16 conversion, raw-buffer row views, ISA multiversioning
// and the OpenMP task split.
//
// No torch headers: operands arrive as raw data pointers (Python ints) plus row strides,
// validated by ambient_fast/kernels/_native.py, which keeps the tensors alive for the call.
// See ARCHITECTURE.md.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ambient_fast {

// Argument check in the spirit of TORCH_CHECK: throws std::invalid_argument, which pybind11
// turns into a Python ValueError carrying the message.
#define AF_CHECK(cond, ...)                                                            \
  do {                                                                                 \
    if (!(cond)) throw std::invalid_argument(::ambient_fast::detail::concat(__VA_ARGS__)); \
  } while (0)

namespace detail {
inline void append(std::string&) {}
template <typename T, typename... Rest>
void append(std::string& out, const T& first, const Rest&... rest) {
  if constexpr (std::is_convertible_v<T, std::string>) {
    out += first;
  } else {
    out += std::to_string(first);
  }
  append(out, rest...);
}
template <typename... Args>
std::string concat(const Args&... args) {
  std::string out;
  append(out, args...);
  return out;
}
}  // namespace detail

// Hot loops are compiled once per ISA level and picked at load time through an ifunc
// (GCC target_clones): AVX-512 (x86-64-v4), AVX2 (x86-64-v3), and the build baseline.
// Floating-point contraction is off for the whole build (setup.py: -ffp-contract=off), so
// every clone rounds exactly like the scalar code and like the PyTorch reference.
//
// AF_STREAM_CLONES (AVX2 and the baseline, no AVX-512) is for the float32 streaming loops (the
// loss pass and the solver steps: a few loads, a store, a handful of flops per element). They
// are bound by memory, and AVX-512 buys them nothing there; it does cost them "4K aliasing": when
// the output is 64-128 bytes ahead of an input modulo 4096, which is exactly where glibc puts
// consecutive equal-sized tensors (each 1 MiB block is 64 bytes further along the page), the
// 64-byte stores make the following loads wait. Measured (Zen 5, fp32 churn x + s*noise,
// 262,144 elements, 1 thread): AVX-512 34.7 us with unrelated offsets, 44.2 us at +64 bytes;
// AVX2 34.0 us at every offset; aten's addcmul 34.4 us. Results do not depend on the clone.
// The 16-bit and float64 loops keep AF_CLONES: they are bound by conversions or divisions,
// where AVX-512 wins by more than the aliasing costs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define AF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define AF_STREAM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define AF_CLONES
#define AF_STREAM_CLONES
#endif
#define AF_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------
// Storage dtypes. fp16 and bf16 are plain 16-bit payloads converted to float per element
// with integer/bit operations only, so the conversions vectorise on any ISA level (no F16C
// or AVX512-FP16 needed) and no upcast copy of an operand is ever made.
// ---------------------------------------------------------------------------------------
enum class DType { f32, f64, f16, bf16 };

inline DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::f32;
  if (name == "float64") return DType::f64;
  if (name == "float16") return DType::f16;
  if (name == "bfloat16") return DType::bf16;
  AF_CHECK(false, "unsupported dtype '", name, "' (expected float32, float64, float16 or bfloat16)");
  return DType::f32;
}

struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

AF_INLINE float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
AF_INLINE std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE binary16 -> binary32, exact for every input (subnormals via an exact int->float
// conversion, so the result does not depend on the FTZ/DAZ flags).
AF_INLINE float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  const std::uint32_t normal_exponent = exponent == 0x1fu ? 0xffu : exponent + 112u;
  const float normal = bits_to_float((normal_exponent << 23) | (mantissa << 13));
  const float subnormal = static_cast<float>(static_cast<std::int32_t>(mantissa)) * 0x1p-24f;
  const float magnitude = exponent == 0 ? subnormal : normal;
  return bits_to_float(float_to_bits(magnitude) | sign);
}

// binary32 -> binary16, round to nearest even, overflow to +-inf: the same bits as PyTorch's
// .to(torch.float16) for every non-NaN input; NaN becomes the quiet NaN 0x7e00 (with sign).
AF_INLINE std::uint16_t float_to_half(float f) {
  const std::uint32_t u = float_to_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  // Overflow / inf / NaN.
  const std::uint32_t special = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Result is a half subnormal or zero: let the float adder round at the 2^-24 position.
  const std::uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const std::uint32_t small = float_to_bits(bits_to_float(a) + bits_to_float(denorm_magic)) - denorm_magic;
  // Normal half: rebias the exponent and round the mantissa to nearest even.
  const std::uint32_t odd = (a >> 13) & 1u;
  const std::uint32_t normal = (a + (static_cast<std::uint32_t>(15 - 127) << 23) + 0xfffu + odd) >> 13;
  const std::uint32_t magnitude = a >= (143u << 23) ? special : (a < (113u << 23) ? small : normal);
  return static_cast<std::uint16_t>(magnitude | sign);
}

AF_INLINE float bf16_to_float(std::uint16_t b) { return bits_to_float(static_cast<std::uint32_t>(b) << 16); }

// binary32 -> bfloat16, round to nearest even: the same bits as PyTorch's .to(torch.bfloat16)
// for every non-NaN input; NaN stays a quiet NaN (sign and top payload bits kept).
AF_INLINE std::uint16_t float_to_bf16(float f) {
  const std::uint32_t u = float_to_bits(f);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<std::uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded);
}

// Compute type: float64 for float64 storage, float32 for everything else.
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename Compute<T>::type;

AF_INLINE float load(const float* p, std::int64_t i) { return p[i]; }
AF_INLINE double load(const double* p, std::int64_t i) { return p[i]; }
AF_INLINE float load(const Half* p, std::int64_t i) { return half_to_float(p[i].bits); }
AF_INLINE float load(const BFloat16* p, std::int64_t i) { return bf16_to_float(p[i].bits); }

AF_INLINE void store(float* p, std::int64_t i, float v) { p[i] = v; }
AF_INLINE void store(double* p, std::int64_t i, double v) { p[i] = v; }
AF_INLINE void store(Half* p, std::int64_t i, float v) { p[i].bits = float_to_half(v); }
AF_INLINE void store(BFloat16* p, std::int64_t i, float v) { p[i].bits = float_to_bf16(v); }

// ---------------------------------------------------------------------------------------
// Operands: (B, N) row views. Each sample's N elements are contiguous; consecutive samples
// are `row_stride` elements apart (any value >= 0: batch slices and expanded rows work
// without a copy). Everything else is made row-contiguous by the Python caller.
// ---------------------------------------------------------------------------------------
struct Rows {
  std::uintptr_t data;
  std::int64_t row_stride;
};

template <typename T>
AF_INLINE const T* row_ptr(const Rows& r, std::int64_t i) {
  return reinterpret_cast<const T*>(r.data) + i * r.row_stride;
}
template <typename T>
AF_INLINE T* mutable_row_ptr(const Rows& r, std::int64_t i) {
  return reinterpret_cast<T*>(r.data) + i * r.row_stride;
}

// Per-sample levels (B,): float32 or float64 with any element stride (a column of a (B, K+1)
// table, a stride-0 expansion); data 0 reads as all zeros (e.g. no sigma_max).
struct Levels {
  std::uintptr_t data;
  std::int64_t stride;
  bool f64;
};

AF_INLINE double level_at(const Levels& l, std::int64_t i) {
  if (l.data == 0) return 0.0;
  return l.f64 ? reinterpret_cast<const double*>(l.data)[i * l.stride]
               : static_cast<double>(reinterpret_cast<const float*>(l.data)[i * l.stride]);
}

inline void check_rows(const char* name, const Rows& r, std::int64_t batch) {
  AF_CHECK(batch == 0 || r.data != 0, name, ": null data pointer");
  AF_CHECK(r.row_stride >= 0, name, ": row stride must be >= 0, got ", r.row_stride);
}

inline void check_out_rows(const char* name, const Rows& r, std::int64_t batch, std::int64_t numel) {
  check_rows(name, r, batch);
  AF_CHECK(batch <= 1 || r.row_stride >= numel, name, ": output rows overlap (row stride ", r.row_stride,
           " < ", numel, " elements per sample)");
}

// Work split: every sample row is cut into chunks of at most kChunk elements and the
// (row, chunk) tasks are handed out to OpenMP threads dynamically (a preempted thread on a
// shared machine does not stall the others), so both large batches and a single huge sample
// use every core. Results never depend on the schedule: partial sums are stored per task.
// 8192 elements: a chunk's three fp32 input streams (96 KiB) stay in L2, and B=128x3x32x32
// still gives 128 tasks. Problems under 2^15 elements run on the calling thread.
constexpr std::int64_t kChunk = 8192;
constexpr std::int64_t kMinParallelElements = 1 << 15;

inline std::int64_t chunks_per_row(std::int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Calls body(row, begin, end) for every chunk of a (batch, numel) problem.
template <typename Body>
void for_each_chunk(std::int64_t batch, std::int64_t numel, const Body& body) {
  const std::int64_t per_row = chunks_per_row(numel);
  const std::int64_t tasks = batch * per_row;
#pragma omp parallel for schedule(dynamic) if (batch * numel >= kMinParallelElements)
  for (std::int64_t task = 0; task < tasks; ++task) {
    const std::int64_t row = task / per_row;
    const std::int64_t begin = (task % per_row) * kChunk;
    const std::int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    body(row, begin, end);
  }
}

}  // namespace ambient_fast
