// CPU kernels of the I-D-DW convolution whose kernels a 1x1 convolution predicts (see
// mmdwnet/ops/predicted_idwconv.py), forward and backward, with prediction and application
// fused:
//
//   k[b, g, i, j, h, w] = bias[g, i, j] + sum_r weight[g, i, j, r] * hidden[b, r, h, w]
//   y[b, c, h, w] = sum_{i,j} k[b, g(c), i, j, h, w] * x[b, c, h + i - K/2, w + j - K/2]
//
// The kernels are G*K*K / C times larger than the features (16x in DWNet-T). Predicted by
// a matrix product, with an inner size of only R = C/4, they are written to memory and
// read back by the gather: the product is bound by writing its output, not by its
// multiply-adds, although those are R / (C/G) times the application's (8x in DWNet).
// Here each tile of kernel values - the K taps of one kernel row by (up to) three vectors
// of positions, which may span output rows - is predicted in registers, as the
// micro-kernel of a matrix product (the R rows of `hidden` streamed, the weights
// broadcast), and applied at once to the group's C/G channels. The kernels never reach
// memory; the backward pass (predicted_backward) predicts them again the same way, a row
// at a time.
//
// bfloat16 on CPUs with AVX-512 BF16 predicts with dot products of bfloat16 pairs
// (VDPBF16PS, two rows of `hidden` per instruction); the kernel values stay float32 and
// every sum runs in float32 (float64 for double), rounded once into the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "idwconv_common.h"

namespace {

// How the prediction multiplies: `packed` is the type `hidden` and the weights are packed
// into - acc_t itself (one FMA per row of `hidden`), or, for bfloat16 with dot products,
// pairs of bfloat16 rows in one 32-bit lane (rows 2m and 2m + 1: one VDPBF16PS per pair).
template <typename acc_t>
struct Widened {
  using packed = acc_t;
  using vec = typename Vec<acc_t>::type;
  static constexpr int64_t rows_per_lane = 1;
  template <typename T>
  static packed pack(const T* p, int64_t stride, int64_t rows) {
    return to_acc<acc_t>(p[0]);
  }
  static vec step(vec acc, packed w, const packed* h) { return acc + w * load<acc_t>(h); }
};

template <typename scalar_t, typename acc_t>
struct Prediction : Widened<acc_t> {};

// bfloat16 pairs of predictor rows in VDPBF16PS, except where the build widens them to
// float32 FMAs (MMDWNET_FUSED_BF16_WIDENED: Intel Xeons, where VDPBF16PS issues on one port
// and the FMAs on two; see cpu_extension.bf16_dot_products)
#if defined(MMDWNET_BF16_DOT) && !defined(MMDWNET_FUSED_BF16_WIDENED)
#define MMDWNET_FUSED_BF16_DOT 1
template <>
struct Prediction<c10::BFloat16, float> {
  using packed = uint32_t;
  using vec = Vec<float>::type;
  static constexpr int64_t rows_per_lane = 2;
  // (p[0], p[stride]) as one lane; the missing partner of an odd last row is zero
  static packed pack(const c10::BFloat16* p, int64_t stride, int64_t rows) {
    return p[0].x | (rows > 1 ? static_cast<uint32_t>(p[stride].x) << 16 : 0u);
  }
  static vec step(vec acc, packed w, const packed* h) {
#if MMDWNET_VEC_BYTES == 64
    return (vec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(w),
                                 (__m512bh)_mm512_loadu_si512(h));
#else
    return (vec)_mm256_dpbf16_ps((__m256)acc, (__m256bh)_mm256_set1_epi32(w),
                                 (__m256bh)_mm256_loadu_si256((const __m256i*)h));
#endif
  }
};
#endif

// Vectors of positions per register tile: K x P accumulators, P loads of `hidden` and one
// broadcast weight in registers (3K + 4 of AVX-512VL's 32 vector registers for K <= 7).
// More vectors per tile: more independent chains of FMAs (or dot products, whose latency
// is longer) and fewer broadcasts per multiply.
template <int64_t K>
constexpr int64_t position_vectors() {
#ifdef __AVX512VL__
  return K <= 7 ? 3 : K <= 8 ? 2 : 1;
#else
  return 1;  // 16 vector registers
#endif
}

// fn(w0, std::integral_constant<int64_t, Q>) over a row of `tw` values from w0 on: tiles
// of P vectors of V values, then the rest in smaller tiles.
template <int64_t P, typename F>
inline void for_each_tile(int64_t w0, int64_t tw, int64_t V, F&& fn) {
  for (; w0 + P * V <= tw; w0 += P * V) fn(w0, std::integral_constant<int64_t, P>());
  if constexpr (P > 1) for_each_tile<P - 1>(w0, tw, V, fn);
}

// Lane `lane` of one sample's `hidden` (layout `lh`, R = `rows` rows) as packed rows of
// `tw` values (H of them), zeros past the map's width.
template <typename Pred, typename scalar_t>
void pack_hidden(const scalar_t* hidden, const Layout& lh, int64_t rows, int64_t lane,
                 int64_t height, int64_t width, int64_t tw, typename Pred::packed* dst) {
  const int64_t r = lane * Pred::rows_per_lane;
  for (int64_t h = 0; h < height; ++h) {
    const scalar_t* src = hidden + r * lh.c + h * lh.h;
    for (int64_t w = 0; w < width; ++w) {
      dst[h * tw + w] = Pred::pack(src + w * lh.w, lh.c, rows - r);
    }
  }
}

// The weights (G*K*K, R) as (G, K, lanes, K) - a kernel row's K weights of one lane side
// by side, as the register tile broadcasts them - and the bias widened.
template <typename Pred, typename scalar_t, typename acc_t>
void pack_weights(const scalar_t* weight, const scalar_t* bias, int64_t groups, int64_t K,
                  int64_t rows, std::vector<typename Pred::packed>& wt,
                  std::vector<acc_t>& bi) {
  constexpr int64_t per_lane = Pred::rows_per_lane;
  const int64_t lanes = (rows + per_lane - 1) / per_lane;
  wt.resize(groups * K * lanes * K);
  bi.resize(groups * K * K);
  for (int64_t gk = 0; gk < groups * K * K; ++gk) {  // gk = (g * K + i) * K + j
    const int64_t gi = gk / K, j = gk % K;
    bi[gk] = to_acc<acc_t>(bias[gk]);
    for (int64_t l = 0; l < lanes; ++l) {
      wt[(gi * lanes + l) * K + j] = Pred::pack(weight + gk * rows + l * per_lane, 1,
                                                rows - l * per_lane);
    }
  }
}

// The K x P kernel values of kernel row i at P vectors of positions, predicted from the
// packed rows `hid` (`lanes` of them, `stride` apart) with the weights `wt` ((lanes, K))
// and the bias `bias` (K): the micro-kernel of a matrix product, in registers.
template <typename Pred, int64_t K, int64_t P, typename acc_t>
inline void predict_tile(const typename Pred::packed* hid, int64_t stride, int64_t lanes,
                         const typename Pred::packed* wt, const acc_t* bias,
                         typename Vec<acc_t>::type (&k)[K][P]) {
  constexpr int64_t V = Vec<acc_t>::size;
#pragma GCC unroll 16
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t p = 0; p < P; ++p) k[j][p] = typename Vec<acc_t>::type{} + bias[j];
  }
  for (int64_t r = 0; r < lanes; ++r) {
    const typename Pred::packed* h = hid + r * stride;
    const typename Pred::packed* w = wt + r * K;
#pragma GCC unroll 16
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t p = 0; p < P; ++p) k[j][p] = Pred::step(k[j][p], w[j], h + p * V);
    }
  }
}

// predict_tile, then out[c] += sum_j k_j * x[c] (shifted by tap j) for the group's
// channels; `x[p]` points at channel 0 of the zero-bordered source of vector p, `out` at
// channel 0 of the output planes.
template <typename Pred, int64_t K, int64_t P, typename acc_t>
inline void predict_apply(const typename Pred::packed* hid, int64_t stride, int64_t lanes,
                          const typename Pred::packed* wt, const acc_t* bias,
                          const acc_t* const (&x)[P], int64_t x_stride, acc_t* out,
                          int64_t out_stride, int64_t cpg) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t V = Vec<acc_t>::size;
  vec k[K][P];
  predict_tile<Pred, K, P, acc_t>(hid, stride, lanes, wt, bias, k);
  for (int64_t c = 0; c < cpg; ++c) {
    for (int64_t p = 0; p < P; ++p) {
      acc_t* o = out + c * out_stride + p * V;
      const acc_t* s = x[p] + c * x_stride;
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

// The forward pass: one task per (sample, group), the group's output built in float32
// (float64) planes and rounded once. Each kernel row sweeps a block of output rows as one
// run of positions, so that every tile has P vectors - not only those along a row: at
// DWNet-T's last stages a row is one or two vectors, which left 7 or 14 sums per tile, too
// few to hide the dot products' latency. On an AMD EPYC (Zen 4, 2 threads, batch 16, the
// 12 layers of DWNet-T, medians of 6 alternating runs) this took bfloat16 from 105.8 to
// 78.7 ms and float32 from 150.9 to 136.7 ms.
template <typename scalar_t, int64_t K>
void predicted_forward(const scalar_t* input, const Layout& lx, const scalar_t* hidden,
                       const Layout& lh, const scalar_t* weight, const scalar_t* bias,
                       scalar_t* out, const Layout& lo, int64_t batch, int64_t channels,
                       int64_t groups, int64_t rows, int64_t height, int64_t width,
                       const acc_type<scalar_t>* scale, const acc_type<scalar_t>* shift,
                       bool relu) {
  using acc_t = acc_type<scalar_t>;
  using Pred = Prediction<scalar_t, acc_t>;
  using packed = typename Pred::packed;
  constexpr int64_t V = Vec<acc_t>::size, P = position_vectors<K>(), top = K / 2;
  constexpr int64_t per_lane = Pred::rows_per_lane;
  const int64_t cpg = channels / groups, lanes = (rows + per_lane - 1) / per_lane;
  const int64_t tw = (width + V - 1) / V * V;  // packed rows: whole vectors, zeros past W
  const int64_t ph = height + K - 1, pw = width + K - 1 + V, plane = height * tw;
  std::vector<packed> hid(batch * lanes * plane, packed(0)), wt;  // (B, lanes, H, tw)
  std::vector<acc_t> bi;
  // rows of output a block: the K kernel rows sweep a block's packed `hidden` while it is
  // in the L1 cache (16 KiB of it), in tiles of P vectors where a multiple of P fits
  const int64_t fit = std::max<int64_t>(1, (16 << 10) / (lanes * tw * int64_t(sizeof(packed))));
  const int64_t block = std::max<int64_t>(P, fit / P * P);
  at::parallel_for(0, batch * lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nl = begin; nl < end; ++nl) {
      pack_hidden<Pred>(hidden + nl / lanes * lh.b, lh, rows, nl % lanes, height, width, tw,
                        hid.data() + nl * height * tw);
    }
  });
  pack_weights<Pred>(weight, bias, groups, K, rows, wt, bi);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    // the group's output planes (cpg, H, tw) in float32 (float64), rounded once at the end
    std::vector<acc_t> padded(cpg * ph * pw, acc_t(0)), acc(cpg * plane);
    PlanarInput<scalar_t> x(input, lx, channels, height, width);  // channels-last: NCHW
    PlanarOutput<scalar_t> y(out, lo, channels, height, width);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t n = bg / groups, g = bg % groups;
      const auto xs = x.group(n, g, cpg);
      pad_planes(xs.first, xs.second, padded.data(), cpg, height, width, top, ph, pw);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const packed* hp = hid.data() + n * lanes * plane;
      for (int64_t b0 = 0; b0 < height; b0 += block) {
        const int64_t b1 = std::min(height, b0 + block);
        for (int64_t i = 0; i < K; ++i) {
          // kernel row i over the block's output rows whose source row h + i - K/2 lies
          // in the map (the others multiply zeros), as one run of positions: tiles of P
          // vectors that may span rows (7x7 maps have one vector a row)
          const int64_t h0 = std::max<int64_t>(b0, top - i);
          const int64_t h1 = std::min<int64_t>(b1, height + top - i);
          const packed* wp = wt.data() + (g * K + i) * lanes * K;
          const acc_t* bp = bi.data() + (g * K + i) * K;
          int64_t h = h0, w = 0;  // where the tile's next vector lies
          for_each_tile<P>(h0 * tw, std::max(h0, h1) * tw, V, [&](int64_t q, auto vectors) {
            constexpr int64_t Q = decltype(vectors)::value;
            const acc_t* src[Q];
            for (int64_t p = 0; p < Q; ++p) {
              src[p] = padded.data() + (h + i) * pw + w;
              w += V;
              if (w == tw) w = 0, ++h;
            }
            predict_apply<Pred, K, Q>(hp + q, plane, lanes, wp, bp, src, ph * pw,
                                      acc.data() + q, plane, cpg);
          });
        }
      }
      const auto ys = y.group(n, g, cpg);
      store_planes(acc.data(), cpg, height, width, tw, plane, ys.first, ys.second,
                   scale ? scale + g * cpg : nullptr, shift ? shift + g * cpg : nullptr, relu);
    }
    y.flush();
  });
}

// Rows of `hidden` per register tile of the weight gradient: K x RB accumulators, RB
// vectors of `hidden` and one of the kernels' gradient (4K + 4 of 32 registers for K <= 7).
template <int64_t K>
constexpr int64_t row_block() {
#ifdef __AVX512VL__
  return K <= 7 ? 3 : 1;
#else
  return K <= 3 ? 3 : 1;  // 16 vector registers
#endif
}

template <typename acc_t>
inline acc_t hsum(typename Vec<acc_t>::type v) {
  acc_t s = 0;
  for (int64_t l = 0; l < Vec<acc_t>::size; ++l) s += v[l];
  return s;
}

// The backward pass, fused the same way. One task per sample; for each group, kernel row
// i and output row h whose source row s = h + i - K/2 lies in the map, along the row:
//   k_j[w]   = the kernels, predicted again as in the forward pass
//   gx[c, s, w'] += sum_j k_j[w' - dx_j] * g[c, h, w' - dx_j]     (a gather along row s)
//   gk_j[w]  = sum_c g[c, h, w] * x[c, s, w + dx_j]               (the kernels' gradient)
//   grad_hidden[r, h, w] += sum_j weight[g, i, j, r] * gk_j[w]
//   grad_weight[g, i, j, r] += sum_w gk_j[w] * hidden[r, h, w], grad_bias[..] += sum_w gk_j[w]
// with dx_j = j - K/2. Only one row of kernels and one (K, H*W) plane of their gradient
// exist at a time; the weight gradients are summed in registers over the plane of a
// (sample, group, kernel row), then per thread, then over threads. g, gx and `hidden` are
// widened to acc_t.
template <typename scalar_t, int64_t K>
void predicted_backward(const scalar_t* grad_out, const Layout& lg, const scalar_t* input,
                        const Layout& lx, const scalar_t* hidden, const Layout& lh,
                        const scalar_t* weight, const scalar_t* bias, scalar_t* grad_input,
                        const Layout& lgx, scalar_t* grad_hidden, const Layout& lgh,
                        acc_type<scalar_t>* grad_weight_bias, int64_t batch, int64_t channels,
                        int64_t groups, int64_t rows, int64_t height, int64_t width) {
  using acc_t = acc_type<scalar_t>;
  using vec = typename Vec<acc_t>::type;
  using Pred = Widened<acc_t>;
  constexpr int64_t V = Vec<acc_t>::size, P = position_vectors<K>(), RB = row_block<K>();
  constexpr int64_t top = K / 2, before = K - 1 - top;  // zero columns before a row of k, g
  const int64_t cpg = channels / groups, R = rows, tw = (width + V - 1) / V * V;
  const int64_t plane = height * tw;  // planes of hid, gh and gx
  const int64_t ph = height + K - 1, pw = width + K - 1 + V;  // x, zero-bordered
  const int64_t kw = before + tw + top + V;  // rows of k and g: zeros before and after
  const int64_t gh_ = height + before;       // rows of the g planes (g at row h + before)
  std::vector<acc_t> wt, bi;
  pack_weights<Pred>(weight, bias, groups, K, R, wt, bi);
  std::mutex lock;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hid(R * plane, acc_t(0)), gh(R * plane), x(cpg * ph * pw, acc_t(0));
    std::vector<acc_t> g(cpg * gh_ * kw, acc_t(0)), gx(cpg * plane), kb(K * kw, acc_t(0));
    std::vector<acc_t> gk(K * plane), gwb(groups * K * K * (R + 1), 0);
    // channels-last maps as NCHW planes, a sample at a time
    PlanarInput<scalar_t> xin(input, lx, channels, height, width);
    PlanarInput<scalar_t> gin(grad_out, lg, channels, height, width);
    PlanarOutput<scalar_t> gxout(grad_input, lgx, channels, height, width);
    PlanarInput<scalar_t> hin(hidden, lh, R, height, width);
    PlanarOutput<scalar_t> ghout(grad_hidden, lgh, R, height, width);
    for (int64_t n = begin; n < end; ++n) {
      const auto hs = hin.group(n, 0, R);
      for (int64_t r = 0; r < R; ++r) {
        pack_hidden<Pred>(hs.first, hs.second, R, r, height, width, tw, hid.data() + r * plane);
      }
      std::fill(gh.begin(), gh.end(), acc_t(0));
      for (int64_t gr = 0; gr < groups; ++gr) {
        const auto xs = xin.group(n, gr, cpg), gs = gin.group(n, gr, cpg);
        pad_planes(xs.first, xs.second, x.data(), cpg, height, width, top, ph, pw);
        pad_planes(gs.first, gs.second, g.data(), cpg, height, width, before, gh_, kw);
        std::fill(gx.begin(), gx.end(), acc_t(0));
        for (int64_t i = 0; i < K; ++i) {
          const acc_t* wp = wt.data() + (gr * K + i) * R * K;
          const acc_t* bp = bi.data() + (gr * K + i) * K;
          // output rows whose source row s = h + i - K/2 lies in the map
          const int64_t h0 = std::max<int64_t>(0, top - i);
          const int64_t h1 = std::min<int64_t>(height, height + top - i);
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t s = h + i - top;
            const acc_t* hp = hid.data() + h * tw;
            // the kernels of row h (lanes past the width hold the bias: g is zero there)
            for_each_tile<P>(0, tw, V, [&](int64_t w0, auto vectors) {
              constexpr int64_t Q = decltype(vectors)::value;
              vec k[K][Q];
              predict_tile<Pred, K, Q, acc_t>(hp + w0, plane, R, wp, bp, k);
#pragma GCC unroll 16
              for (int64_t j = 0; j < K; ++j) {
                for (int64_t p = 0; p < Q; ++p) {
                  std::memcpy(kb.data() + j * kw + before + w0 + p * V, &k[j][p], sizeof(vec));
                }
              }
            });
            for (int64_t w = 0; w < tw; w += V) {
              vec gkv[K] = {};
              for (int64_t c = 0; c < cpg; ++c) {
                const acc_t* gc = g.data() + (c * gh_ + h + before) * kw;
                // gx row s: k and g at w' - dx_j, column w' + K - 1 - j of their rows
                acc_t* o = gx.data() + c * plane + s * tw + w;
                vec a = load<acc_t>(o), b = {};
#pragma GCC unroll 16
                for (int64_t j = 0; j < K; ++j) {
                  const int64_t col = w + K - 1 - j;
                  const vec t = load<acc_t>(kb.data() + j * kw + col) * load<acc_t>(gc + col);
                  if (j % 2) b += t; else a += t;
                }
                a += b;
                std::memcpy(o, &a, sizeof(a));
                // the kernels' gradient: g at w times x at row s, column w + dx_j
                const vec gv = load<acc_t>(gc + before + w);
                const acc_t* xc = x.data() + (c * ph + h + i) * pw + w;
#pragma GCC unroll 16
                for (int64_t j = 0; j < K; ++j) gkv[j] += gv * load<acc_t>(xc + j);
              }
#pragma GCC unroll 16
              for (int64_t j = 0; j < K; ++j) {
                std::memcpy(gk.data() + j * plane + h * tw + w, &gkv[j], sizeof(vec));
              }
            }
          }
          // over the rows h0..h1 at once (positions q, whole vectors):
          // grad_hidden[r, q] += sum_j weight[g, i, j, r] * gk_j[q], P vectors at a time
          const int64_t q0 = h0 * tw, q1 = h1 * tw;
          auto hidden_grad = [&](int64_t q, auto vectors) {
            constexpr int64_t Q = decltype(vectors)::value;
            vec gkv[K][Q];
#pragma GCC unroll 16
            for (int64_t j = 0; j < K; ++j) {
              for (int64_t p = 0; p < Q; ++p) {
                gkv[j][p] = load<acc_t>(gk.data() + j * plane + q + p * V);
              }
            }
            acc_t* d = gh.data() + q;
            for (int64_t r = 0; r < R; ++r, d += plane) {
              const acc_t* wr = wp + r * K;
              vec a[Q], b[Q] = {};
              for (int64_t p = 0; p < Q; ++p) a[p] = load<acc_t>(d + p * V);
#pragma GCC unroll 16
              for (int64_t j = 0; j < K; ++j) {
                const vec wv = vec{} + wr[j];  // one broadcast for the Q vectors
                for (int64_t p = 0; p < Q; ++p) {
                  if (j % 2) b[p] += wv * gkv[j][p]; else a[p] += wv * gkv[j][p];
                }
              }
              for (int64_t p = 0; p < Q; ++p) {
                a[p] += b[p];
                std::memcpy(d + p * V, &a[p], sizeof(vec));
              }
            }
          };
          for_each_tile<P>(q0, q1, V, hidden_grad);
          // grad_weight[g, i, j, r] += sum_q gk_j[q] * hidden[r, q], RB rows r at a time
          // in registers; grad_bias[g, i, j] += sum_q gk_j[q]
          acc_t* gw = gwb.data() + (gr * K + i) * K * (R + 1);  // (K, R + 1)
          auto weight_grad = [&](int64_t r0, auto rows_) {
            constexpr int64_t Q = decltype(rows_)::value;
            vec t[K][Q] = {};
            for (int64_t q = q0; q < q1; q += V) {
              vec hv[Q];
              for (int64_t u = 0; u < Q; ++u) {
                hv[u] = load<acc_t>(hid.data() + (r0 + u) * plane + q);
              }
#pragma GCC unroll 16
              for (int64_t j = 0; j < K; ++j) {
                const vec gv = load<acc_t>(gk.data() + j * plane + q);
                for (int64_t u = 0; u < Q; ++u) t[j][u] += gv * hv[u];
              }
            }
            for (int64_t j = 0; j < K; ++j) {
              for (int64_t u = 0; u < Q; ++u) gw[j * (R + 1) + r0 + u] += hsum<acc_t>(t[j][u]);
            }
          };
          int64_t r0 = 0;
          for (; r0 + RB <= R; r0 += RB) weight_grad(r0, std::integral_constant<int64_t, RB>());
          for (; r0 < R; ++r0) weight_grad(r0, std::integral_constant<int64_t, 1>());
          for (int64_t j = 0; j < K; ++j) {
            vec t = {};
            for (int64_t q = q0; q < q1; q += V) t += load<acc_t>(gk.data() + j * plane + q);
            gw[j * (R + 1) + R] += hsum<acc_t>(t);
          }
        }
        const auto gxs = gxout.group(n, gr, cpg);
        store_planes(gx.data(), cpg, height, width, tw, plane, gxs.first, gxs.second);
      }
      const auto ghs = ghout.group(n, 0, R);
      store_planes(gh.data(), R, height, width, tw, plane, ghs.first, ghs.second);
    }
    gxout.flush();
    ghout.flush();
    std::lock_guard<std::mutex> guard(lock);
    for (size_t q = 0; q < gwb.size(); ++q) grad_weight_bias[q] += gwb[q];
  });
}

// Whether the fused kernels run for this kernel size and dtype: the forward pass for any
// floating dtype; the backward pass too, except for bfloat16 in builds with AVX-512 BF16
// dot products (cpu_extension.bf16_dot_products), where the predict-then-gather backward
// (oneDNN's bfloat16 matrix products, twice the float32 rate or more with AMX, and the
// gathers' dot products) is faster than this kernel.
bool predicted_applies(int64_t kernel, at::ScalarType dtype, bool backward) {
#ifdef MMDWNET_BF16_DOT
  if (backward && dtype == at::kBFloat16) return false;
#endif
  return with_blocked_size(kernel, [](auto) {});
}

// y in the memory format of `input` (NCHW or channels-last; others are made NCHW);
// `hidden` may have any strides. `scale` and `shift` (C, float32 - float64 for double),
// where given, map each channel of y affinely before it is rounded (an inference
// BatchNorm), and `relu` applies a ReLU last.
at::Tensor predicted_idwconv2d(const at::Tensor& input_, const at::Tensor& hidden_,
                               const at::Tensor& weight_, const at::Tensor& bias_,
                               int64_t kernel, const c10::optional<at::Tensor>& scale_,
                               const c10::optional<at::Tensor>& shift_, bool relu) {
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
  const auto acc = input_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale_.has_value() == shift_.has_value(),
              "mmdwnet_cpu: `scale` and `shift` come together");
  at::Tensor scale, shift;
  if (scale_.has_value()) {
    scale = scale_->contiguous();
    shift = shift_->contiguous();
    TORCH_CHECK(scale.device().is_cpu() && shift.device().is_cpu() && scale.dim() == 1 &&
                    shift.dim() == 1 && scale.size(0) == c && shift.size(0) == c &&
                    scale.scalar_type() == acc && shift.scalar_type() == acc,
                "mmdwnet_cpu: `scale` and `shift` must be (C) CPU tensors of ", acc);
  }
  const at::Tensor input = is_nchw_or_channels_last(input_) ? input_ : input_.contiguous();
  const at::Tensor weight = weight_.contiguous(), bias = bias_.contiguous();
  auto out = at::empty_like(input, at::MemoryFormat::Preserve);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdwnet_cpu_predicted_idwconv2d", [&] {
    const bool done = with_blocked_size(kernel, [&](auto size) {
      predicted_forward<scalar_t, decltype(size)::value>(
          input.data_ptr<scalar_t>(), Layout(input), hidden_.data_ptr<scalar_t>(),
          Layout(hidden_), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), Layout(out), b, c, g, r, h, w,
          scale.defined() ? scale.data_ptr<acc_type<scalar_t>>() : nullptr,
          shift.defined() ? shift.data_ptr<acc_type<scalar_t>>() : nullptr, relu);
    });
    TORCH_CHECK(done, "mmdwnet_cpu: predicted_idwconv2d has no kernel for kernel_size ",
                kernel, " (see predicted_idwconv2d_applies)");
  });
  return out;
}

// The gradients w.r.t. input, hidden, and weight and bias together (`grad_weight_bias`,
// (G*K*K, R + 1) of the accumulation type, zeroed; the bias is its last column), written
// in place; `grad_input` and `grad_hidden` NCHW or channels-last.
void predicted_idwconv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& hidden, const at::Tensor& weight_,
                                  const at::Tensor& bias_, int64_t kernel,
                                  const at::Tensor& grad_input, const at::Tensor& grad_hidden,
                                  const at::Tensor& grad_weight_bias) {
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_input.sizes() == input.sizes() &&
                  grad_hidden.sizes() == hidden.sizes() && input.dim() == 4 &&
                  hidden.dim() == 4 && is_nchw_or_channels_last(grad_input) &&
                  is_nchw_or_channels_last(grad_hidden),
              "mmdwnet_cpu: gradients must have the shapes of their operands, NCHW or "
              "channels-last");
  const int64_t b = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t r = hidden.size(1), g = weight_.size(0) / (kernel * kernel);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_weight_bias.is_contiguous() && grad_weight_bias.scalar_type() == acc &&
                  grad_weight_bias.dim() == 2 && grad_weight_bias.size(0) == weight_.size(0) &&
                  grad_weight_bias.size(1) == r + 1,
              "mmdwnet_cpu: `grad_weight_bias` must be (G*K*K, R + 1), contiguous, ", acc);
  const at::Tensor weight = weight_.contiguous(), bias = bias_.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdwnet_cpu_predicted_backward", [&] {
    const bool done = with_blocked_size(kernel, [&](auto size) {
      predicted_backward<scalar_t, decltype(size)::value>(
          grad_output.data_ptr<scalar_t>(), Layout(grad_output), input.data_ptr<scalar_t>(),
          Layout(input), hidden.data_ptr<scalar_t>(), Layout(hidden),
          weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
          grad_input.data_ptr<scalar_t>(), Layout(grad_input),
          grad_hidden.data_ptr<scalar_t>(), Layout(grad_hidden),
          grad_weight_bias.data_ptr<acc_type<scalar_t>>(), b, c, g, r, h, w);
    });
    TORCH_CHECK(done, "mmdwnet_cpu: predicted_idwconv2d has no kernel for kernel_size ",
                kernel, " (see predicted_idwconv2d_applies)");
  });
}

// whether the fused kernels take bfloat16 operands in AVX-512 BF16 dot products
bool fused_bf16_dot_products() {
#ifdef MMDWNET_FUSED_BF16_DOT
  return true;
#else
  return false;
#endif
}

// bytes of the vectors along a row of the map (cpu_extension.vector_bytes)
int64_t vector_bytes() { return MMDWNET_VEC_BYTES; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdwnet_cpu, m) {
  m.def("vector_bytes() -> int", &vector_bytes);
  m.def("fused_bf16_dot_products() -> bool", &fused_bf16_dot_products);
  m.def("predicted_idwconv2d_applies(int kernel_size, ScalarType dtype, bool backward) -> bool",
        &predicted_applies);
  m.def("predicted_idwconv2d(Tensor input, Tensor hidden, Tensor weight, Tensor bias, "
        "int kernel_size, Tensor? scale=None, Tensor? shift=None, bool relu=False) -> Tensor",
        &predicted_idwconv2d);
  m.def("predicted_idwconv2d_backward(Tensor grad_output, Tensor input, Tensor hidden, "
        "Tensor weight, Tensor bias, int kernel_size, Tensor(a!) grad_input, "
        "Tensor(b!) grad_hidden, Tensor(c!) grad_weight_bias) -> ()",
        &predicted_idwconv2d_backward);
}
