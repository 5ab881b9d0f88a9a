// The exact (erf) GELU and its derivative in one pass on CPU (see mmdwnet/ops/gelu_mlp.py):
// `x` is overwritten by GELU(x) = x * Phi(x) and GELU'(x) = Phi(x) + x * phi(x) is returned,
// Phi and phi being the standard normal distribution and density. Both come from the same
// exp(-x^2 / 2): Phi through erf as in Abramowitz & Stegun 7.1.26 (absolute error below
// 1.5e-7, the approximation PyTorch's own vectorised erf uses) and phi directly, so the
// derivative costs a few multiply-adds and one store more than GELU alone. PyTorch has no
// operator that returns the derivative: its backward computes erf and exp again from x.
//
// float32 only (the training path it serves); every loop is plain arithmetic the compiler
// vectorises (no calls into libm): exp by range reduction and the Cephes polynomial.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

// exp(z) for z <= 0; 0 below -87, where float32's exp leaves the normal range (no
// subnormal results, which would slow down the layers that read them on some CPUs).
inline float exp_nonpositive(float x) {
  const float z = x < -87.0f ? -87.0f : x;
  // n = round(z / ln 2) by the 1.5 * 2^23 trick (exact for |z / ln 2| < 2^22)
  const float shifter = 12582912.0f;
  const float n = (z * 1.44269504088896341f + shifter) - shifter;
  const float r = (z - n * 0.693359375f) + n * 2.12194440e-4f;  // z - n ln 2, two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

void gelu_with_derivative(float* __restrict__ x, float* __restrict__ d, int64_t n) {
  constexpr float kSqrtHalf = 0.70710678118654752f;
  constexpr float kInvSqrt2Pi = 0.39894228040143268f;
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = x[i];
      const float a = (v < 0.0f ? -v : v) * kSqrtHalf;  // |v| / sqrt(2)
      const float t = 1.0f / (1.0f + 0.3275911f * a);
      float poly = 1.061405429f;
      poly = poly * t - 1.453152027f;
      poly = poly * t + 1.421413741f;
      poly = poly * t - 0.284496736f;
      poly = poly * t + 0.254829592f;
      const float e = exp_nonpositive(-a * a);    // exp(-v^2 / 2)
      const float half_erfc = 0.5f * poly * t * e;  // 0.5 * erfc(|v| / sqrt(2))
      const float cdf = v < 0.0f ? half_erfc : 1.0f - half_erfc;  // Phi(v)
      x[i] = v * cdf;
      d[i] = cdf + v * (kInvSqrt2Pi * e);
    }
  });
}

// overwrites `input` with GELU(input); returns GELU'(input)
at::Tensor gelu_with_derivative_(at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat,
              "gelu_with_derivative_: expected a float32 CPU tensor, got ",
              input.scalar_type(), " on ", input.device());
  TORCH_CHECK(input.is_contiguous(), "gelu_with_derivative_: input must be contiguous");
  auto derivative = at::empty_like(input);
  gelu_with_derivative(input.data_ptr<float>(), derivative.data_ptr<float>(), input.numel());
  return derivative;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdwnet_cpu, m) {
  m.def("gelu_with_derivative_(Tensor(a!) self) -> Tensor", &gelu_with_derivative_);
}
