// Channels-last depth-wise K x K convolution on CPU with one kernel set per sample
// (homogeneous dynamic D-DW-Conv), and the kernel gradient for per-sample or shared
// kernels; odd K, zero padding K / 2, stride 1 (see mmdwnet/ops/depthwise_conv.py).
//
// float16/bfloat16 operands accumulate in float32 and are rounded once.
//
// Layouts: input/output (B, H, W, C) memory (a channels-last (B, C, H, W) tensor), kernels
// (B, K*K, C). The channel axis is contiguous everywhere, so every
// multiply-add is a vector operation over channels; one task is one output row, whose
// K input rows and the kernels stay in cache. The input gradient is this forward pass
// with the kernels flipped; the kernel gradient reduces over positions per sample.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

// float32 accumulation for float16/bfloat16 operands (double stays double)
template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double,
                                           float>::type;

template <typename scalar_t>
void dw_forward(const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* out,
                int64_t batch, int64_t height, int64_t width, int64_t channels,
                int64_t kernel) {
  using acc_t = acc_type<scalar_t>;
  const int64_t pad = kernel / 2, taps = kernel * kernel;
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);  // one output pixel's sums, rounded once
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / height, h = bh % height;
      const scalar_t* wb = w + b * taps * channels;
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
  TORCH_CHECK(weight.dim() == 3 && weight.is_contiguous() && weight.size(0) == b &&
                  weight.size(1) == kernel * kernel && weight.size(2) == c,
              "mmdwnet_cpu: weight must be contiguous (B, K*K, C)");
  TORCH_CHECK(kernel % 2 == 1, "mmdwnet_cpu: kernel size must be odd");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c && bias->is_contiguous(),
                "mmdwnet_cpu: bias must be contiguous (C)");
  }
  auto out = at::empty_like(input, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdwnet_cpu_depthwise_forward",
      [&] {
    dw_forward<scalar_t>(input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                         has_bias ? bias->data_ptr<scalar_t>() : nullptr,
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
