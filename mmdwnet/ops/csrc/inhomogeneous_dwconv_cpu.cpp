// CPU kernels of the inhomogeneous dynamic depth-wise convolution (see
// mmdwnet/ops/inhomogeneous_dwconv.py for the definition and the PyTorch fallback).
//
//   y[b, c, h, w] = sum_{i,j} w[b, g(c), i, j, h, w] * x[b, c, h + i - K/2, w + j - K/2]
//
// Input/output (B, C, H, W) and kernels (B, G, K, K, H, W), all contiguous. One task per
// (sample, group) plane: its K*K kernel maps are streamed once, while the C/G channel
// planes of the group stay in cache over the K*K offsets; the innermost loop runs along a
// row and vectorises. Operators are registered under torch.ops.mmdwnet_cpu (no Python
// bindings needed, so the extension compiles quickly).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

struct Offset {
  int64_t k, dy, dx, h0, h1, w0, w1;  // output region [h0, h1) x [w0, w1) reads row h + dy
};

std::vector<Offset> offsets(int64_t kernel, int64_t height, int64_t width) {
  std::vector<Offset> out;
  const int64_t pad = kernel / 2;
  for (int64_t i = 0; i < kernel; ++i) {
    for (int64_t j = 0; j < kernel; ++j) {
      const int64_t dy = i - pad, dx = j - pad;
      const int64_t h0 = std::max<int64_t>(0, -dy), h1 = std::min(height, height - dy);
      const int64_t w0 = std::max<int64_t>(0, -dx), w1 = std::min(width, width - dx);
      if (h0 < h1 && w0 < w1) out.push_back({i * kernel + j, dy, dx, h0, h1, w0, w1});
    }
  }
  return out;
}

void check(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mmdwnet_cpu: `", name, "` must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, "mmdwnet_cpu: `", name, "` must be ", dim, "-D, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "mmdwnet_cpu: `", name, "` must be contiguous");
}

// transposed == false: out[p] = sum_k w_k[p] * src[p + d_k]            (forward)
// transposed == true:  out[p + d_k] += w_k[p] * src[p]  (gradient w.r.t. the input)
template <typename scalar_t>
void shift_accumulate(const scalar_t* src, const scalar_t* weight, scalar_t* out,
                      int64_t batch, int64_t channels, int64_t groups, int64_t kernel,
                      int64_t height, int64_t width, bool transposed) {
  const int64_t cpg = channels / groups, plane = height * width;
  const auto offs = offsets(kernel, height, width);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const scalar_t* wt = weight + bg * kernel * kernel * plane;
      const scalar_t* s = src + bg * cpg * plane;  // (b, g) -> first channel of the group
      scalar_t* o = out + bg * cpg * plane;
      std::fill(o, o + cpg * plane, scalar_t(0));
      for (const Offset& f : offs) {
        const scalar_t* wk = wt + f.k * plane;
        const int64_t shift = f.dy * width + f.dx;
        // forward: out[p] += w[p] * src[p + d]; transposed: out[p + d] += w[p] * src[p]
        const int64_t src_shift = transposed ? 0 : shift, out_shift = transposed ? shift : 0;
        for (int64_t c = 0; c < cpg; ++c) {
          const scalar_t* sc = s + c * plane;
          scalar_t* oc = o + c * plane;
          for (int64_t h = f.h0; h < f.h1; ++h) {
            const int64_t row = h * width;
            const scalar_t* __restrict__ wr = wk + row;
            scalar_t* __restrict__ orow = oc + row + out_shift;
            const scalar_t* __restrict__ srow = sc + row + src_shift;
#pragma omp simd
            for (int64_t w = f.w0; w < f.w1; ++w) orow[w] += wr[w] * srow[w];
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void weight_gradient(const scalar_t* grad_out, const scalar_t* input, scalar_t* grad_weight,
                     int64_t batch, int64_t channels, int64_t groups, int64_t kernel,
                     int64_t height, int64_t width) {
  const int64_t cpg = channels / groups, plane = height * width;
  const auto offs = offsets(kernel, height, width);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      scalar_t* gw = grad_weight + bg * kernel * kernel * plane;
      const scalar_t* go = grad_out + bg * cpg * plane;
      const scalar_t* x = input + bg * cpg * plane;
      std::fill(gw, gw + kernel * kernel * plane, scalar_t(0));  // out-of-map taps stay 0
      for (const Offset& f : offs) {
        scalar_t* gk = gw + f.k * plane;
        const int64_t shift = f.dy * width + f.dx;
        for (int64_t c = 0; c < cpg; ++c) {
          for (int64_t h = f.h0; h < f.h1; ++h) {
            const int64_t row = h * width;
            scalar_t* __restrict__ grow = gk + row;
            const scalar_t* __restrict__ gorow = go + c * plane + row;
            const scalar_t* __restrict__ xrow = x + c * plane + row + shift;
#pragma omp simd
            for (int64_t w = f.w0; w < f.w1; ++w) grow[w] += gorow[w] * xrow[w];
          }
        }
      }
    }
  });
}

at::Tensor forward_or_grad_input(const at::Tensor& src, const at::Tensor& weight,
                                 bool transposed) {
  check(src, 4, transposed ? "grad_output" : "input");
  check(weight, 6, "weight");
  TORCH_CHECK(src.scalar_type() == weight.scalar_type(), "mmdwnet_cpu: dtype mismatch");
  const int64_t b = src.size(0), c = src.size(1), h = src.size(2), w = src.size(3);
  const int64_t g = weight.size(1), k = weight.size(2);
  TORCH_CHECK(weight.size(0) == b && weight.size(3) == k && weight.size(4) == h &&
                  weight.size(5) == w && g > 0 && c % g == 0,
              "mmdwnet_cpu: weight shape does not match the input");
  auto out = at::empty_like(src);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "mmdwnet_cpu_shift_accumulate", [&] {
    shift_accumulate<scalar_t>(src.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), b, c, g, k, h, w, transposed);
  });
  return out;
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight) {
  return forward_or_grad_input(input, weight, false);
}

at::Tensor grad_input(const at::Tensor& grad_output, const at::Tensor& weight) {
  return forward_or_grad_input(grad_output, weight, true);
}

at::Tensor grad_weight(const at::Tensor& grad_output, const at::Tensor& input, int64_t groups,
                       int64_t kernel) {
  check(grad_output, 4, "grad_output");
  check(input, 4, "input");
  const int64_t b = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  TORCH_CHECK(groups > 0 && c % groups == 0, "mmdwnet_cpu: groups must divide channels");
  auto out = at::empty({b, groups, kernel, kernel, h, w}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "mmdwnet_cpu_weight_gradient", [&] {
    weight_gradient<scalar_t>(grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), b, c, groups, kernel, h, w);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdwnet_cpu, m) {
  m.def("inhomogeneous_dwconv2d(Tensor input, Tensor weight) -> Tensor", &forward);
  m.def("inhomogeneous_dwconv2d_grad_input(Tensor grad_output, Tensor weight) -> Tensor",
        &grad_input);
  m.def("inhomogeneous_dwconv2d_grad_weight(Tensor grad_output, Tensor input, int groups, "
        "int kernel_size) -> Tensor",
        &grad_weight);
}
