// CPU kernel of the I-D-DW convolution whose kernels a 1x1 convolution predicts (see
// mmdwnet/ops/predicted_idwconv.py), forward pass, with prediction and application fused:
//
//   k[b, g, i, j, h, w] = bias[g, i, j] + sum_r weight[g, i, j, r] * hidden[b, r, h, w]
//   y[b, c, h, w] = sum_{i,j} k[b, g(c), i, j, h, w] * x[b, c, h + i - K/2, w + j - K/2]
//
// The kernels are G*K*K / C times larger than the features (16x in DWNet-T). Predicted by
// a matrix product, with an inner size of only R = C/4, they are written to memory and
// read back by the gather: the product is bound by writing its output, not by its
// multiply-adds, although those are R / (C/G) times the application's (8x in DWNet).
// Here each tile of kernel values - the K taps of one kernel row by one or two vectors of
// positions along an output row - is predicted in registers, as the micro-kernel of a
// matrix product (the R rows of `hidden` streamed, the weights broadcast), and applied at
// once to the group's C/G channels. The kernels never reach memory.
//
// bfloat16 on CPUs with AVX-512 BF16 predicts with dot products of bfloat16 pairs
// (VDPBF16PS, two rows of `hidden` per instruction); the kernel values stay float32 and
// every sum runs in float32 (float64 for double), rounded once into the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "idwconv_common.h"

namespace {

// How the prediction multiplies: `packed` is the type `hidden` and the weights are packed
// into - acc_t itself (one FMA per row of `hidden`), or, for bfloat16 with dot products,
// pairs of bfloat16 rows in one 32-bit lane (rows 2m and 2m + 1: one VDPBF16PS per pair).
template <typename scalar_t, typename acc_t>
struct Prediction {
  using packed = acc_t;
  static constexpr int64_t rows_per_lane = 1;
  static packed pack(const scalar_t* p, int64_t stride, int64_t rows) {
    return to_acc<acc_t>(p[0]);
  }
  using vec = typename Vec<acc_t>::type;
  static vec step(vec acc, packed w, const packed* h) { return acc + w * load<acc_t>(h); }
};

#ifdef MMDWNET_BF16_DOT
template <>
struct Prediction<c10::BFloat16, float> {
  using packed = uint32_t;
  static constexpr int64_t rows_per_lane = 2;
  // (p[0], p[stride]) as one lane; the missing partner of an odd last row is zero
  static packed pack(const c10::BFloat16* p, int64_t stride, int64_t rows) {
    return p[0].x | (rows > 1 ? static_cast<uint32_t>(p[stride].x) << 16 : 0u);
  }
  using vec = Vec<float>::type;
  static vec step(vec acc, packed w, const packed* h) {
    return (vec)_mm256_dpbf16_ps((__m256)acc, (__m256bh)_mm256_set1_epi32(w),
                                 (__m256bh)_mm256_loadu_si256((const __m256i*)h));
  }
};
#endif

// Vectors of positions per register tile: K x P accumulators, P loads of `hidden` and one
// broadcast weight in registers (2K + 3 of AVX-512VL's 32 vector registers).
template <int64_t K>
constexpr int64_t position_vectors() {
#ifdef __AVX512VL__
  return K <= 8 ? 2 : 1;
#else
  return 1;  // 16 vector registers
#endif
}

// For P vectors of positions of output row h starting at column w0 and kernel row i: the
// K x P kernel values, predicted from the packed rows `hid` (lanes of `rows` packed
// rows, `stride` apart) with the weights `wt` ((lanes, K)) and bias `bias` (K), then
// out[c] += sum_j k_j * x[c] (shifted by tap j) for the group's channels; `x` and `out`
// point at channel 0 of the zero-bordered source row and of the output row buffer.
template <typename Pred, int64_t K, int64_t P, typename acc_t>
inline void predict_apply(const typename Pred::packed* hid, int64_t stride, int64_t lanes,
                          const typename Pred::packed* wt, const acc_t* bias, const acc_t* x,
                          int64_t x_stride, acc_t* out, int64_t out_stride, int64_t cpg) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t V = Vec<acc_t>::size;
  vec k[K][P];
#pragma GCC unroll 16
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t p = 0; p < P; ++p) k[j][p] = vec{} + bias[j];
  }
  for (int64_t r = 0; r < lanes; ++r) {
    const typename Pred::packed* h = hid + r * stride;
    const typename Pred::packed* w = wt + r * K;
#pragma GCC unroll 16
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t p = 0; p < P; ++p) k[j][p] = Pred::step(k[j][p], w[j], h + p * V);
    }
  }
  for (int64_t c = 0; c < cpg; ++c) {
    for (int64_t p = 0; p < P; ++p) {
      acc_t* o = out + c * out_stride + p * V;
      const acc_t* s = x + c * x_stride + p * V;
      // two partial sums: half the length of the dependent chain of FMAs
      vec a = load<acc_t>(o), b = {};
#pragma GCC unroll 16
      for (int64_t j = 0; j < K; ++j) {
        const vec t = k[j][p] * load<acc_t>(s + j);
        if (j % 2) b += t; else a += t;
      }
      a += b;
      std::memcpy(o, &a, sizeof(a));
    }
  }
}

template <typename scalar_t, int64_t K>
void predicted_forward(const scalar_t* input, const Layout& lx, const scalar_t* hidden,
                       const Layout& lh, const scalar_t* weight, const scalar_t* bias,
                       scalar_t* out, const Layout& lo, int64_t batch, int64_t channels,
                       int64_t groups, int64_t rows, int64_t height, int64_t width) {
  using acc_t = acc_type<scalar_t>;
  using Pred = Prediction<scalar_t, acc_t>;
  using packed = typename Pred::packed;
  constexpr int64_t V = Vec<acc_t>::size, P = position_vectors<K>(), top = K / 2;
  constexpr int64_t per_lane = Pred::rows_per_lane;
  const int64_t cpg = channels / groups, lanes = (rows + per_lane - 1) / per_lane;
  const int64_t tw = (width + V - 1) / V * V;  // packed rows: whole vectors, zeros past W
  const int64_t ph = height + K - 1, pw = width + K - 1 + V;
  // `hidden` as (B, lanes, H, tw) and the weights as (G, K, lanes, K): a kernel row's K
  // weights of one lane side by side, as the register tile broadcasts them
  std::vector<packed> hid(batch * lanes * height * tw, packed(0));
  std::vector<packed> wt(groups * K * lanes * K);
  std::vector<acc_t> bi(groups * K * K);
  at::parallel_for(0, batch * lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nl = begin; nl < end; ++nl) {
      const int64_t n = nl / lanes, r = nl % lanes * per_lane;
      for (int64_t h = 0; h < height; ++h) {
        const scalar_t* src = hidden + n * lh.b + r * lh.c + h * lh.h;
        packed* dst = hid.data() + (nl * height + h) * tw;
        for (int64_t w = 0; w < width; ++w) {
          dst[w] = Pred::pack(src + w * lh.w, lh.c, rows - r);
        }
      }
    }
  });
  for (int64_t gk = 0; gk < groups * K * K; ++gk) {  // gk = (g * K + i) * K + j
    const int64_t gi = gk / K, j = gk % K;
    bi[gk] = to_acc<acc_t>(bias[gk]);
    for (int64_t l = 0; l < lanes; ++l) {
      wt[(gi * lanes + l) * K + j] = Pred::pack(weight + gk * rows + l * per_lane, 1,
                                                rows - l * per_lane);
    }
  }
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(cpg * ph * pw, acc_t(0)), row(cpg * tw);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t n = bg / groups, g = bg % groups;
      pad_planes(input + lx.group(n, g, cpg), lx, padded.data(), cpg, height, width, top, ph,
                 pw);
      scalar_t* o = out + lo.group(n, g, cpg);
      for (int64_t h = 0; h < height; ++h) {
        std::fill(row.begin(), row.end(), acc_t(0));
        // kernel rows whose source row lies in the map (the others multiply zeros)
        for (int64_t i = std::max<int64_t>(0, top - h);
             i < std::min<int64_t>(K, height + top - h); ++i) {
          const packed* hp = hid.data() + n * lanes * height * tw + h * tw;
          const packed* wp = wt.data() + (g * K + i) * lanes * K;
          const acc_t* bp = bi.data() + (g * K + i) * K;
          const acc_t* xp = padded.data() + (h + i) * pw;
          int64_t w0 = 0;
          for (; w0 + P * V <= tw; w0 += P * V) {
            predict_apply<Pred, K, P>(hp + w0, height * tw, lanes, wp, bp, xp + w0, ph * pw,
                                      row.data() + w0, tw, cpg);
          }
          if (w0 < tw) {  // one vector left
            predict_apply<Pred, K, 1>(hp + w0, height * tw, lanes, wp, bp, xp + w0, ph * pw,
                                      row.data() + w0, tw, cpg);
          }
        }
        for (int64_t c = 0; c < cpg; ++c) {
          const acc_t* t = row.data() + c * tw;
          scalar_t* orow = o + c * lo.c + h * lo.h;
          for (int64_t w0 = 0; w0 < width; w0 += V) {
            store_strided<scalar_t, acc_t>(orow + w0 * lo.w, lo.w, load<acc_t>(t + w0),
                                           std::min(V, width - w0));
          }
        }
      }
    }
  });
}

// whether the fused kernel runs for this kernel size (any floating dtype)
bool predicted_applies(int64_t kernel) {
  return with_blocked_size(kernel, [](auto) {});
}

// y in the memory format of `input` (NCHW or channels-last; others are made NCHW);
// `hidden` may have any strides
at::Tensor predicted_idwconv2d(const at::Tensor& input_, const at::Tensor& hidden_,
                               const at::Tensor& weight_, const at::Tensor& bias_,
                               int64_t kernel) {
  TORCH_CHECK(input_.device().is_cpu() && input_.dim() == 4 && hidden_.device().is_cpu() &&
                  hidden_.dim() == 4,
              "mmdwnet_cpu: `input` and `hidden` must be 4-D CPU tensors");
  TORCH_CHECK(input_.scalar_type() == hidden_.scalar_type() &&
                  weight_.scalar_type() == input_.scalar_type() &&
                  bias_.scalar_type() == input_.scalar_type(),
              "mmdwnet_cpu: dtype mismatch");
  const int64_t b = input_.size(0), c = input_.size(1), h = input_.size(2), w = input_.size(3);
  const int64_t r = hidden_.size(1), kk = kernel * kernel;
  TORCH_CHECK(hidden_.size(0) == b && hidden_.size(2) == h && hidden_.size(3) == w,
              "mmdwnet_cpu: `hidden` must be (B, R, H, W) with the input's B, H, W");
  TORCH_CHECK(weight_.dim() == 2 && weight_.size(1) == r && weight_.size(0) % kk == 0 &&
                  weight_.size(0) > 0 && c % (weight_.size(0) / kk) == 0 &&
                  bias_.dim() == 1 && bias_.size(0) == weight_.size(0),
              "mmdwnet_cpu: `weight` must be (G*K*K, R) with G dividing the channels, "
              "and `bias` (G*K*K)");
  const int64_t g = weight_.size(0) / kk;
  const at::Tensor input = is_nchw_or_channels_last(input_) ? input_ : input_.contiguous();
  const at::Tensor weight = weight_.contiguous(), bias = bias_.contiguous();
  auto out = at::empty_like(input, at::MemoryFormat::Preserve);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdwnet_cpu_predicted_idwconv2d", [&] {
    const bool done = with_blocked_size(kernel, [&](auto size) {
      predicted_forward<scalar_t, decltype(size)::value>(
          input.data_ptr<scalar_t>(), Layout(input), hidden_.data_ptr<scalar_t>(),
          Layout(hidden_), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), Layout(out), b, c, g, r, h, w);
    });
    TORCH_CHECK(done, "mmdwnet_cpu: predicted_idwconv2d has no kernel for kernel_size ",
                kernel, " (see predicted_idwconv2d_applies)");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdwnet_cpu, m) {
  m.def("predicted_idwconv2d_applies(int kernel_size) -> bool", &predicted_applies);
  m.def("predicted_idwconv2d(Tensor input, Tensor hidden, Tensor weight, Tensor bias, "
        "int kernel_size) -> Tensor",
        &predicted_idwconv2d);
}
