// Channels-last depth-wise K x K convolution on CPU with one kernel set per sample
// (homogeneous dynamic D-DW-Conv) or one shared by the batch (static DW-Conv), and the
// kernel gradient for either; odd K, zero padding K / 2, stride 1 (see
// mmdwnet/ops/depthwise_conv.py).
//
// float16/bfloat16 operands accumulate in float32 and are rounded once.
//
// Layouts: input/output (B, H, W, C) memory (a channels-last (B, C, H, W) tensor), kernels
// (B, K*K, C), or (1, K*K, C) shared by the batch. The channel axis is contiguous
// everywhere, so every multiply-add is a vector operation over channels; one task is one
// output row, whose K input rows and the kernels stay in cache. The input gradient is this
// forward pass with the kernels flipped; the kernel gradient reduces over positions per
// sample.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "idwconv_common.h"  // acc_type, bfloat16 widening and rounding

namespace {

template <typename scalar_t>
void dw_forward(const scalar_t* x, const scalar_t* w, int64_t weight_batch_stride,
                const scalar_t* bias, scalar_t* out, int64_t batch, int64_t height,
                int64_t width, int64_t channels, int64_t kernel) {
  using acc_t = acc_type<scalar_t>;
  const int64_t pad = kernel / 2, taps = kernel * kernel;
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);  // one output pixel's sums, rounded once
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / height, h = bh % height;
      const scalar_t* wb = w + b * weight_batch_stride;
      for (int64_t x0 = 0; x0 < width; ++x0) {
        acc_t* __restrict__ a = acc.data();
        for (int64_t c = 0; c < channels; ++c) {
          a[c] = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
        }
        for (int64_t i = 0; i < kernel; ++i) {
          const int64_t hh = h + i - pad;
          if (hh < 0 || hh >= height) continue;
          for (int64_t j = 0; j < kernel; ++j) {
            const int64_t ww = x0 + j - pad;
            if (ww < 0 || ww >= width) continue;
            const scalar_t* __restrict__ xi = x + ((b * height + hh) * width + ww) * channels;
            const scalar_t* __restrict__ wk = wb + (i * kernel + j) * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
              a[c] += static_cast<acc_t>(wk[c]) * static_cast<acc_t>(xi[c]);
            }
          }
        }
        scalar_t* __restrict__ o = out + (bh * width + x0) * channels;
        for (int64_t c = 0; c < channels; ++c) o[c] = static_cast<scalar_t>(a[c]);
      }
    }
  });
}

// float32 or bfloat16, K in {3, 5, 7, 9}: register-blocked. A task is one output row; for
// each vector of channels and each block of PW output pixels, the PW float32 sums stay in
// registers over all K*K taps. Per kernel row, the K weight vectors are loaded once and the
// PW + K - 1 input vectors the block reads are loaded once each and used for every tap that
// reads them: PW * K multiply-adds per PW + 2K - 1 loads, where the generic loop above
// loads a sum, an input and a weight and stores the sum for every multiply-add. bfloat16
// operands are widened as they are loaded and the sums rounded once. Columns outside the
// map read a vector of zeros (a pointer select per load, no branches in the arithmetic).
#if defined(__AVX512F__)
typedef float f32vec __attribute__((vector_size(64)));
constexpr int64_t kBlockPixels = 8;  // 32 vector registers: K weights, 8 sums, inputs
#else
typedef float f32vec __attribute__((vector_size(32)));
constexpr int64_t kBlockPixels = 6;  // 16 vector registers
#endif
constexpr int64_t kLanes = sizeof(f32vec) / sizeof(float);
typedef uint32_t u32vec __attribute__((vector_size(kLanes * 4)));
typedef uint16_t u16vec __attribute__((vector_size(kLanes * 2)));

inline f32vec load_vec(const float* p) {
  f32vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32vec load_vec(const c10::BFloat16* p) {
  u16vec half;
  std::memcpy(&half, p, sizeof(half));
  return widen_bf16<f32vec, u32vec>(half);
}

inline void store_vec(float* p, f32vec v) { std::memcpy(p, &v, sizeof(v)); }

inline void store_vec(c10::BFloat16* p, f32vec v) {
  const u16vec half = round_bf16<u16vec, u32vec>(v);
  std::memcpy(p, &half, sizeof(half));
}

template <int64_t K, typename scalar_t>
void dw_forward_blocked(const scalar_t* x, const scalar_t* w, int64_t weight_batch_stride,
                        const scalar_t* bias, scalar_t* out, int64_t batch, int64_t height,
                        int64_t width, int64_t channels) {
  constexpr int64_t pad = K / 2, PW = kBlockPixels;
  const int64_t vec_channels = channels / kLanes * kLanes;
  alignas(64) static const scalar_t zeros[kLanes] = {};
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / height, h = bh % height;
      const scalar_t* wb = w + b * weight_batch_stride;
      const scalar_t* xb = x + b * height * width * channels;
      scalar_t* o = out + bh * width * channels;
      // channels inner: a block's loads and stores run along whole pixels, in memory order
      for (int64_t w0 = 0; w0 < width; w0 += PW) {
        for (int64_t c = 0; c < vec_channels; c += kLanes) {
          const f32vec b0 = bias != nullptr ? load_vec(bias + c) : f32vec{};
          f32vec acc[PW];
#pragma GCC unroll 16
          for (int64_t p = 0; p < PW; ++p) acc[p] = b0;
          for (int64_t i = 0; i < K; ++i) {
            const int64_t hh = h + i - pad;
            if (hh < 0 || hh >= height) continue;
            const scalar_t* row = xb + hh * width * channels + c;
            f32vec wv[K];
#pragma GCC unroll 16
            for (int64_t j = 0; j < K; ++j) wv[j] = load_vec(wb + (i * K + j) * channels + c);
            // input column w0 + q - pad feeds output pixel p through tap j = q - p
#pragma GCC unroll 32
            for (int64_t q = 0; q < PW + K - 1; ++q) {
              const int64_t col = w0 + q - pad;
              const f32vec xv = load_vec(col >= 0 && col < width ? row + col * channels : zeros);
#pragma GCC unroll 16
              for (int64_t p = 0; p < PW; ++p) {
                const int64_t j = q - p;
                if (j >= 0 && j < K) acc[p] += wv[j] * xv;
              }
            }
          }
          const int64_t np = std::min(PW, width - w0);
          for (int64_t p = 0; p < np; ++p) store_vec(o + (w0 + p) * channels + c, acc[p]);
        }
      }
      // channels past the last whole vector
      for (int64_t x0 = 0; x0 < width && vec_channels < channels; ++x0) {
        for (int64_t c = vec_channels; c < channels; ++c) {
          float a = bias != nullptr ? static_cast<float>(bias[c]) : 0.0f;
          for (int64_t i = 0; i < K; ++i) {
            const int64_t hh = h + i - pad;
            if (hh < 0 || hh >= height) continue;
            for (int64_t j = 0; j < K; ++j) {
              const int64_t ww = x0 + j - pad;
              if (ww < 0 || ww >= width) continue;
              a += static_cast<float>(wb[(i * K + j) * channels + c]) *
                   static_cast<float>(xb[(hh * width + ww) * channels + c]);
            }
          }
          o[x0 * channels + c] = static_cast<scalar_t>(a);
        }
      }
    }
  });
}

// whether dw_forward_blocked has a kernel for K and the dtype (depthwise_conv.py's _blocked
// says the same)
bool blocked_forward(int64_t kernel, at::ScalarType dtype) {
  return (dtype == at::kFloat || dtype == at::kBFloat16) &&
         (kernel == 3 || kernel == 5 || kernel == 7 || kernel == 9);
}

// Runs fn(std::integral_constant<int64_t, K>()) for a kernel size of the register-blocked
// kernels (3, 5, 7 or 9: blocked_forward holds)
template <typename F>
void with_register_blocked_size(int64_t kernel, F&& fn) {
  switch (kernel) {
    case 3: return fn(std::integral_constant<int64_t, 3>());
    case 5: return fn(std::integral_constant<int64_t, 5>());
    case 7: return fn(std::integral_constant<int64_t, 7>());
    default: return fn(std::integral_constant<int64_t, 9>());
  }
}

template <typename scalar_t>
void dw_forward_blocked(const scalar_t* x, const scalar_t* w, int64_t weight_batch_stride,
                        const scalar_t* bias, scalar_t* out, int64_t batch, int64_t height,
                        int64_t width, int64_t channels, int64_t kernel) {
  with_register_blocked_size(kernel, [&](auto k) {
    dw_forward_blocked<decltype(k)::value>(x, w, weight_batch_stride, bias, out, batch, height,
                                           width, channels);
  });
}

// grad_w[b, k, c] = sum_{h, w} grad_out[b, h, w, c] * x[b, h + dy_k, w + dx_k, c]
template <typename scalar_t>
void dw_weight_grad(const scalar_t* grad_out, const scalar_t* x, scalar_t* grad_w,
                    int64_t batch, int64_t height, int64_t width, int64_t channels,
                    int64_t kernel) {
  using acc_t = acc_type<scalar_t>;
  const int64_t pad = kernel / 2, taps = kernel * kernel;
  const int64_t block = 64;  // channels per task, so that small batches still split
  const int64_t blocks = (channels + block - 1) / block;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(taps * block);  // (K*K, block) sums, rounded once
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * block;
      const int64_t nc = std::min(block, channels - c0);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t h = 0; h < height; ++h) {
        for (int64_t x0 = 0; x0 < width; ++x0) {
          const scalar_t* __restrict__ g = grad_out + ((b * height + h) * width + x0) * channels + c0;
          for (int64_t i = 0; i < kernel; ++i) {
            const int64_t hh = h + i - pad;
            if (hh < 0 || hh >= height) continue;
            for (int64_t j = 0; j < kernel; ++j) {
              const int64_t ww = x0 + j - pad;
              if (ww < 0 || ww >= width) continue;
              const scalar_t* __restrict__ xi = x + ((b * height + hh) * width + ww) * channels + c0;
              acc_t* __restrict__ a = sums.data() + (i * kernel + j) * block;
#pragma omp simd
              for (int64_t c = 0; c < nc; ++c) {
                a[c] += static_cast<acc_t>(g[c]) * static_cast<acc_t>(xi[c]);
              }
            }
          }
        }
      }
      scalar_t* out = grad_w + b * taps * channels + c0;
      for (int64_t k = 0; k < taps; ++k) {
        for (int64_t c = 0; c < nc; ++c) {
          out[k * channels + c] = static_cast<scalar_t>(sums[k * block + c]);
        }
      }
    }
  });
}

// dw_weight_grad with the sums in registers: one task is one sample, one vector of
// channels and one kernel row i, and holds the K sums of that row's taps while it runs
// over the map (grad_out loaded once per pixel for K multiply-adds, each input vector once
// per tap; columns outside the map read a vector of zeros). The summation order per tap
// is that of dw_weight_grad (equal results). That scalar form kept each tap's sums in
// memory, a load and a store per multiply-add: on an AMD EPYC (2 threads, batch 16, K = 7,
// medians of 8 interleaved) DW-T's kernel gradients took 21.0 / 9.5 / 4.2 / 1.6 ms a layer
// with it at stages 1-4 in float32 and 6.5 / 3.1 / 1.3 / 0.55 ms with this one (bfloat16:
// 16.3 / 9.3 / 5.3 / 1.9 against 9.1 / 4.8 / 2.2 / 0.8 ms).
template <int64_t K, typename scalar_t>
void dw_weight_grad_blocked(const scalar_t* grad_out, const scalar_t* x, scalar_t* grad_w,
                            int64_t batch, int64_t height, int64_t width, int64_t channels) {
  constexpr int64_t pad = K / 2;
  const int64_t vecs = channels / kLanes;  // channels % kLanes == 0 (blocked_weight_grad)
  alignas(64) static const scalar_t zeros[kLanes] = {};
  // consecutive tasks share a sample's channel vector, which stays in cache between them
  at::parallel_for(0, batch * vecs * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % K, v = task / K % vecs, b = task / (K * vecs);
      const int64_t c = v * kLanes;
      const scalar_t* gb = grad_out + b * height * width * channels + c;
      const scalar_t* xb = x + b * height * width * channels + c;
      f32vec acc[K];
#pragma GCC unroll 16
      for (int64_t j = 0; j < K; ++j) acc[j] = f32vec{};
      const int64_t h0 = std::max<int64_t>(0, pad - i);
      const int64_t h1 = std::min<int64_t>(height, height + pad - i);
      for (int64_t h = h0; h < h1; ++h) {
        const scalar_t* grow = gb + h * width * channels;
        const scalar_t* xrow = xb + (h + i - pad) * width * channels;
        for (int64_t w = 0; w < width; ++w) {
          const f32vec g = load_vec(grow + w * channels);
#pragma GCC unroll 16
          for (int64_t j = 0; j < K; ++j) {
            const int64_t col = w + j - pad;
            acc[j] += g * load_vec(col >= 0 && col < width ? xrow + col * channels : zeros);
          }
        }
      }
      scalar_t* out = grad_w + (b * K * K + i * K) * channels + c;
#pragma GCC unroll 16
      for (int64_t j = 0; j < K; ++j) store_vec(out + j * channels, acc[j]);
    }
  });
}

// whether dw_weight_grad_blocked has a kernel for K, the dtype and the channels
bool blocked_weight_grad(int64_t kernel, at::ScalarType dtype, int64_t channels) {
  return blocked_forward(kernel, dtype) && channels % kLanes == 0;
}

template <typename scalar_t>
void dw_weight_grad_blocked(const scalar_t* grad_out, const scalar_t* x, scalar_t* grad_w,
                            int64_t batch, int64_t height, int64_t width, int64_t channels,
                            int64_t kernel) {
  with_register_blocked_size(kernel, [&](auto k) {
    dw_weight_grad_blocked<decltype(k)::value>(grad_out, x, grad_w, batch, height, width,
                                               channels);
  });
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4, "mmdwnet_cpu: `", name,
              "` must be a 4-D CPU tensor");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "mmdwnet_cpu: `", name,
              "` must be channels-last");
}

// input (B, C, H, W) channels-last; weight (B, K*K, C) contiguous; bias (C) or undefined
at::Tensor depthwise_forward(const at::Tensor& input, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, int64_t kernel) {
  check_input(input, "input");
  const int64_t b = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  TORCH_CHECK(weight.dim() == 3 && weight.is_contiguous() &&
                  (weight.size(0) == b || weight.size(0) == 1) &&
                  weight.size(1) == kernel * kernel && weight.size(2) == c,
              "mmdwnet_cpu: weight must be contiguous (B, K*K, C), or (1, K*K, C) for "
              "kernels shared by the batch");
  TORCH_CHECK(kernel % 2 == 1, "mmdwnet_cpu: kernel size must be odd");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c && bias->is_contiguous(),
                "mmdwnet_cpu: bias must be contiguous (C)");
  }
  auto out = at::empty_like(input, at::MemoryFormat::ChannelsLast);
  const int64_t weight_batch_stride = weight.size(0) == 1 ? 0 : kernel * kernel * c;
  if (blocked_forward(kernel, input.scalar_type())) {
    if (input.scalar_type() == at::kFloat) {
      dw_forward_blocked(input.data_ptr<float>(), weight.data_ptr<float>(), weight_batch_stride,
                         has_bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(),
                         b, h, w, c, kernel);
    } else {
      using bf16 = c10::BFloat16;
      dw_forward_blocked(input.data_ptr<bf16>(), weight.data_ptr<bf16>(), weight_batch_stride,
                         has_bias ? bias->data_ptr<bf16>() : nullptr, out.data_ptr<bf16>(),
                         b, h, w, c, kernel);
    }
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdwnet_cpu_depthwise_forward",
      [&] {
    dw_forward<scalar_t>(input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                         weight_batch_stride, has_bias ? bias->data_ptr<scalar_t>() : nullptr,
                         out.data_ptr<scalar_t>(), b, h, w, c, kernel);
  });
  return out;
}

// returns per-sample kernel gradients (B, K*K, C)
at::Tensor depthwise_weight_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                 int64_t kernel) {
  check_input(grad_output, "grad_output");
  check_input(input, "input");
  const int64_t b = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  auto out = at::empty({b, kernel * kernel, c}, input.options().memory_format(
                                                       at::MemoryFormat::Contiguous));
  if (blocked_weight_grad(kernel, input.scalar_type(), c)) {
    if (input.scalar_type() == at::kFloat) {
      dw_weight_grad_blocked(grad_output.data_ptr<float>(), input.data_ptr<float>(),
                             out.data_ptr<float>(), b, h, w, c, kernel);
    } else {
      using bf16 = c10::BFloat16;
      dw_weight_grad_blocked(grad_output.data_ptr<bf16>(), input.data_ptr<bf16>(),
                             out.data_ptr<bf16>(), b, h, w, c, kernel);
    }
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdwnet_cpu_depthwise_weight_grad",
      [&] {
    dw_weight_grad<scalar_t>(grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), b, h, w, c, kernel);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdwnet_cpu, m) {
  m.def("depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int kernel_size) -> Tensor",
        &depthwise_forward);
  m.def("depthwise_conv2d_weight_grad(Tensor grad_output, Tensor input, int kernel_size) -> Tensor",
        &depthwise_weight_grad);
}
