// CPU kernels of the inhomogeneous dynamic depth-wise convolution (see
// mmdwnet/ops/inhomogeneous_dwconv.py for the definition and the PyTorch fallback).
//
//   y[b, c, h, w] = sum_{i,j} w[b, g(c), i, j, h, w] * x[b, c, h + i - K/2, w + j - K/2]
//
// Input/output (B, C, H, W), NCHW-contiguous or channels-last, and kernels
// (B, G, K, K, H, W), contiguous. One task per
// (sample, group) plane: its K*K kernel maps are streamed once, while the C/G channel
// planes of the group stay in cache over the K*K offsets; the innermost loop runs along a
// row and vectorises. Operators are registered under torch.ops.mmdwnet_cpu (no Python
// bindings needed, so the extension compiles quickly).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "idwconv_common.h"

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
// For float16/bfloat16 the group's source planes are widened once and the sums run in a
// float32 buffer that is rounded once at the end; the kernels are widened as they stream.
template <typename scalar_t>
void shift_accumulate(const scalar_t* src, const scalar_t* weight, scalar_t* out,
                      int64_t batch, int64_t channels, int64_t groups, int64_t kernel,
                      int64_t height, int64_t width, bool transposed) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool wide = std::is_same<scalar_t, acc_t>::value;
  const int64_t cpg = channels / groups, plane = height * width;
  const auto offs = offsets(kernel, height, width);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> src_buf(wide ? 0 : cpg * plane), out_buf(wide ? 0 : cpg * plane);
    for (int64_t bg = begin; bg < end; ++bg) {
      const scalar_t* wt = weight + bg * kernel * kernel * plane;
      const acc_t* s;  // (b, g) -> first channel of the group
      acc_t* o;
      if constexpr (wide) {
        s = src + bg * cpg * plane;
        o = out + bg * cpg * plane;
      } else {
        widen(src + bg * cpg * plane, src_buf.data(), cpg * plane);
        s = src_buf.data();
        o = out_buf.data();
      }
      std::fill(o, o + cpg * plane, acc_t(0));
      for (const Offset& f : offs) {
        const scalar_t* wk = wt + f.k * plane;
        const int64_t shift = f.dy * width + f.dx;
        // forward: out[p] += w[p] * src[p + d]; transposed: out[p + d] += w[p] * src[p]
        const int64_t src_shift = transposed ? 0 : shift, out_shift = transposed ? shift : 0;
        for (int64_t c = 0; c < cpg; ++c) {
          const acc_t* sc = s + c * plane;
          acc_t* oc = o + c * plane;
          for (int64_t h = f.h0; h < f.h1; ++h) {
            const int64_t row = h * width;
            const scalar_t* __restrict__ wr = wk + row;
            acc_t* __restrict__ orow = oc + row + out_shift;
            const acc_t* __restrict__ srow = sc + row + src_shift;
#pragma omp simd
            for (int64_t w = f.w0; w < f.w1; ++w) {
              orow[w] += to_acc<acc_t>(wr[w]) * srow[w];
            }
          }
        }
      }
      if constexpr (!wide) {
        scalar_t* dst = out + bg * cpg * plane;
        for (int64_t i = 0; i < cpg * plane; ++i) dst[i] = static_cast<scalar_t>(o[i]);
      }
    }
  });
}

// grad_w[b, g, k, p] = sum_{c in g} grad_out[b, c, p] * x[b, c, p + d_k]; each kernel row
// is summed over the group's channels in acc_t registers/buffer and stored once.
template <typename scalar_t>
void weight_gradient(const scalar_t* grad_out, const scalar_t* input, scalar_t* grad_weight,
                     int64_t batch, int64_t channels, int64_t groups, int64_t kernel,
                     int64_t height, int64_t width) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool wide = std::is_same<scalar_t, acc_t>::value;
  const int64_t cpg = channels / groups, plane = height * width;
  const auto offs = offsets(kernel, height, width);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go_buf(wide ? 0 : cpg * plane), x_buf(wide ? 0 : cpg * plane);
    std::vector<acc_t> row_buf(width);
    for (int64_t bg = begin; bg < end; ++bg) {
      scalar_t* gw = grad_weight + bg * kernel * kernel * plane;
      const acc_t *go, *x;
      if constexpr (wide) {
        go = grad_out + bg * cpg * plane;
        x = input + bg * cpg * plane;
      } else {
        widen(grad_out + bg * cpg * plane, go_buf.data(), cpg * plane);
        widen(input + bg * cpg * plane, x_buf.data(), cpg * plane);
        go = go_buf.data();
        x = x_buf.data();
      }
      std::fill(gw, gw + kernel * kernel * plane, scalar_t(0));  // out-of-map taps stay 0
      for (const Offset& f : offs) {
        scalar_t* gk = gw + f.k * plane;
        const int64_t shift = f.dy * width + f.dx;
        for (int64_t h = f.h0; h < f.h1; ++h) {
          const int64_t row = h * width;
          acc_t* __restrict__ acc = wide ? reinterpret_cast<acc_t*>(gk + row) : row_buf.data();
          if constexpr (!wide) std::fill(acc + f.w0, acc + f.w1, acc_t(0));
          for (int64_t c = 0; c < cpg; ++c) {
            const acc_t* __restrict__ gorow = go + c * plane + row;
            const acc_t* __restrict__ xrow = x + c * plane + row + shift;
#pragma omp simd
            for (int64_t w = f.w0; w < f.w1; ++w) acc[w] += gorow[w] * xrow[w];
          }
          if constexpr (!wide) {
            for (int64_t w = f.w0; w < f.w1; ++w) gk[row + w] = static_cast<scalar_t>(acc[w]);
          }
        }
      }
    }
  });
}

// Register-blocked kernels for the common kernel sizes, used for the forward pass and the
// kernel gradient. The group's channel planes are first copied (widened to acc_t) into
// zero-padded planes, so that no tap needs a bounds check along a row; then each vector of
// outputs is summed over all K*K taps (and, for the kernel gradient, over the group's
// channels) in registers and stored once. The plain loops above load and store the
// output at every tap; these load little more than the operands. GCC's vector extensions
// spell the vectors out (Vec: 32 or 64 bytes, as the build chooses; see idwconv_common.h).

// Rows of the output tile of the gathers below, whose rows hold `row_size` floats: the
// whole map where the tile fits in 192 KiB (half of L2 on current CPUs), so that each kernel
// map streams through once from top to bottom; at least 8 rows.
inline int64_t tile_rows(int64_t height, int64_t row_size) {
  return std::max<int64_t>(8, std::min<int64_t>(height, (48 << 10) / row_size));
}

// The loop nest the two gathers share: output tiles of R rows; in each, for every kernel
// row i, the output rows h whose source row (h + dy_i, or h - dy_i) lies in the map.
// Calls begin() before a tile, row(h0, i, h, src_row, kernel_row) for each such pair -
// h0 the tile's first row, src_row the padded source row of output row h for kernel row i
// (tap j then reads column offset j, or K - 1 - j), kernel_row the row of the kernel maps
// it reads - and end(h0, h1) after the tile.
template <int64_t K, bool transposed, typename Begin, typename Row, typename End>
inline void for_each_tile_row(int64_t height, int64_t R, Begin&& begin, Row&& row, End&& end) {
  constexpr int64_t top = K / 2;
  for (int64_t h0 = 0; h0 < height; h0 += R) {
    const int64_t h1 = std::min(height, h0 + R);
    begin();
    for (int64_t i = 0; i < K; ++i) {
      const int64_t shift = transposed ? i - top : top - i;
      const int64_t r0 = std::max(h0, shift), r1 = std::min(h1, height + shift);
      const int64_t src_row = transposed ? K - 1 - i : i;
      for (int64_t h = r0; h < r1; ++h) row(h0, i, h, src_row, transposed ? h - shift : h);
    }
    end(h0, h1);
  }
}

// The forward pass and the input gradient, both as gathers over the K*K taps:
//   forward:    out[c, h, w] = sum_{i,j} w_ij[h, w] * x[c, h + dy_i, w + dx_j]
//   transposed: out[c, h, w] = sum_{i,j} (w_ij * g_c)[h - dy_i, w - dx_j]
// with dy_i = i - K/2, dx_j = j - K/2. The group's source planes (x, or the output
// gradient g) are copied once into zero-bordered planes. The output is built a tile of R
// rows at a time in a small buffer: for each kernel row i, the K kernel vectors a position
// needs (j = 0..K-1) are loaded once into registers and applied to every channel of the
// group. So the kernel maps are read once, K planes at a time, each along its rows
// (sequential streams the prefetchers follow), and each output vector is loaded and
// stored once per kernel row. The transposed pass reads the kernels at shifted columns:
// it first copies the K kernel rows into zero-bordered rows.
template <typename scalar_t, int64_t K, bool transposed>
void gather_blocked(const scalar_t* src, const Layout& in, const scalar_t* weight,
                    scalar_t* out, const Layout& lo, int64_t batch, int64_t channels,
                    int64_t groups, int64_t height, int64_t width) {
  using acc_t = acc_type<scalar_t>;
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t V = Vec<acc_t>::size;
  const int64_t cpg = channels / groups, plane = height * width, top = K / 2;
  const int64_t before = transposed ? K - 1 - top : top;  // zero rows/columns before the map
  // padded rows: one vector past the last column, so that every load stays inside
  const int64_t ph = height + K - 1, pw = width + K - 1 + V;
  const int64_t tw = (width + V - 1) / V * V;  // tile row: whole vectors
  const int64_t R = tile_rows(height, cpg * tw);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(cpg * ph * pw, acc_t(0)), tile(cpg * R * tw);
    std::vector<acc_t> rows(transposed ? K * pw : 0, acc_t(0));
    // channels-last maps as NCHW planes, a sample at a time (idwconv_common.h)
    PlanarInput<scalar_t> srcs(src, in, channels, height, width);
    PlanarOutput<scalar_t> outs(out, lo, channels, height, width);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t n_ = bg / groups, g_ = bg % groups;
      const auto s = srcs.group(n_, g_, cpg);
      pad_planes(s.first, s.second, padded.data(), cpg, height, width, before, ph, pw);
      const scalar_t* wt = weight + bg * K * K * plane;
      const auto os = outs.group(n_, g_, cpg);
      scalar_t* o = os.first;
      const Layout lo_ = os.second;
      for_each_tile_row<K, transposed>(
          height, R, [&] { std::fill(tile.begin(), tile.end(), acc_t(0)); },
          [&](int64_t h0, int64_t i, int64_t h, int64_t src_row, int64_t kernel_row) {
            const scalar_t* wrow = wt + i * K * plane + kernel_row * width;
            if constexpr (transposed) {
              for (int64_t j = 0; j < K; ++j) {
                const scalar_t* p = wrow + j * plane;
                for (int64_t w = 0; w < width; w += 64 / sizeof(scalar_t)) {
                  __builtin_prefetch(p + 2 * width + w);  // two rows ahead in this kernel map
                }
                widen(p, rows.data() + j * pw + before, width);
              }
            }
            for (int64_t w0 = 0; w0 < width; w0 += V) {
              vec wv[K];
              const int64_t n = std::min(V, width - w0);
#pragma GCC unroll 16
              for (int64_t j = 0; j < K; ++j) {
                if constexpr (transposed) {
                  wv[j] = load<acc_t>(rows.data() + j * pw + w0 + K - 1 - j);
                } else {
                  const scalar_t* p = wrow + j * plane + w0;
                  __builtin_prefetch(p + 2 * width);  // two rows ahead in this kernel map
                  wv[j] = load_n<acc_t>(p, n);
                }
              }
              for (int64_t c = 0; c < cpg; ++c) {
                acc_t* t = tile.data() + (c * R + h - h0) * tw + w0;
                const acc_t* x = padded.data() + (c * ph + h + src_row) * pw + w0;
                // two partial sums: half the length of the dependent chain of FMAs
                vec a = load<acc_t>(t), b = {};
#pragma GCC unroll 16
                for (int64_t j = 0; j < K; ++j) {
                  const vec p = wv[j] * load<acc_t>(x + (transposed ? K - 1 - j : j));
                  if (j % 2) b += p; else a += p;
                }
                a += b;
                std::memcpy(t, &a, sizeof(a));
              }
            }
          },
          [&](int64_t h0, int64_t h1) {
            store_planes(tile.data(), cpg, h1 - h0, width, tw, R * tw, o + h0 * lo_.h, lo_);
          });
    }
    outs.flush();
  });
}

// The rows of one (sample, group)'s K*K kernel-gradient planes `gw`: zeros where the tap
// row h + i - K/2 lies outside the map (no gradient), else row(i, h) computes them.
template <int64_t K, typename T, typename Row>
inline void for_each_gradient_row(T* gw, int64_t height, int64_t width, Row&& row) {
  const int64_t plane = height * width, top = K / 2;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t h0 = std::max<int64_t>(0, top - i);
    const int64_t h1 = std::min<int64_t>(height, height + top - i);
    for (int64_t h = 0; h < height; ++h) {
      if (h >= h0 && h < h1) {
        row(i, h);
      } else {
        for (int64_t j = 0; j < K; ++j) {
          std::fill_n(gw + (i * K + j) * plane + h * width, width, T(0));
        }
      }
    }
  }
}

// grad_w[ij, h, w] = sum_c grad_out[c, h, w] * x[c, h + i - K/2, w + j - K/2]
template <typename scalar_t, int64_t K>
void weight_gradient_blocked(const scalar_t* grad_out, const Layout& lg, const scalar_t* input,
                             const Layout& lx, scalar_t* grad_weight, int64_t batch,
                             int64_t channels, int64_t groups, int64_t height,
                             int64_t width) {
  using acc_t = acc_type<scalar_t>;
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t V = Vec<acc_t>::size;
  const int64_t cpg = channels / groups, plane = height * width, top = K / 2;
  const int64_t ph = height + K - 1, pw = width + K - 1 + V;
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    // grad_out widened, one vector of zeros past the end so that its loads stay inside
    std::vector<acc_t> padded(cpg * ph * pw, acc_t(0)), go(cpg * plane + V, acc_t(0));
    PlanarInput<scalar_t> xs(input, lx, channels, height, width);  // channels-last: NCHW
    PlanarInput<scalar_t> gs(grad_out, lg, channels, height, width);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t n_ = bg / groups, g_ = bg % groups;
      const auto xn = xs.group(n_, g_, cpg), gn = gs.group(n_, g_, cpg);
      pad_planes(xn.first, xn.second, padded.data(), cpg, height, width, top, ph, pw);
      pad_planes(gn.first, gn.second, go.data(), cpg, height, width, 0, height, width);
      scalar_t* gw = grad_weight + bg * K * K * plane;
      for_each_gradient_row<K>(gw, height, width, [&](int64_t i, int64_t h) {
        for (int64_t w0 = 0; w0 < width; w0 += V) {
          const int64_t n = std::min(V, width - w0);
          vec acc[K] = {};
          const acc_t* gp = go.data() + h * width + w0;
          const acc_t* xp = padded.data() + (h + i) * pw + w0;
          for (int64_t c = 0; c < cpg; ++c) {
            // lanes past the row's end read the next row: their sums are not stored
            const vec g = load<acc_t>(gp + c * plane);
            const acc_t* row = xp + c * ph * pw;
#pragma GCC unroll 16
            for (int64_t j = 0; j < K; ++j) acc[j] += g * load<acc_t>(row + j);
          }
          scalar_t* dst = gw + i * K * plane + h * width + w0;
#pragma GCC unroll 16
          for (int64_t j = 0; j < K; ++j) store<scalar_t, acc_t>(dst + j * plane, acc[j], n);
        }
      });
    }
  });
}

#ifdef MMDWNET_BF16_DOT
// bfloat16 on CPUs with AVX-512 BF16. VDPBF16PS multiplies two pairs of bfloat16 values
// exactly and adds both products to a float32 lane: two taps (or two channels) in one
// instruction, where the widened path above needs two FMAs and two loads of widened
// operands. The operands are arranged in pairs, one pair per 32-bit lane:
//   forward / input gradient: the source plane as (x[q], x[q + 1]) (two neighbouring
//     taps of a kernel row) and the kernel maps of taps j, j + 1 interleaved as they
//     stream; an odd last tap takes the widened path (an FMA),
//   kernel gradient: two channels of the group, (x_c[q], x_c+1[q]) and
//     (g_c[p], g_c+1[p]); an odd last channel takes the FMA.
// Sums stay in float32 and are rounded once, as above; only the order of the additions
// differs.

namespace bf16dot {

// The dot products work on 512-bit vectors, whatever the width of Vec: 16 float32 lanes,
// one pair of bfloat16 values each. The gathers and the kernel gradient are bound by the
// instructions they issue per output vector (loads, pairing, rounding, stores), not by the
// multiply-adds: half as many instructions for the same lanes pay even on Zen 4, which
// splits each 512-bit operation in two (where its float32 kernels keep 256 bits).
constexpr int64_t V = 16;

inline uint16_t bits(c10::BFloat16 v) { return v.x; }

// the first n of V lanes
inline __mmask16 first_lanes(int64_t n) {
  return n >= V ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// V bfloat16 values at p, the lanes from n on zero
inline __m256i load16(const uint16_t* p, int64_t n) {
  if (n >= V) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_maskz_loadu_epi16(first_lanes(n), p);
}

// lane k: (a[k], b[k]), a in the low half
inline __m512bh interleave(__m256i a, __m256i b) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  return (__m512bh)_mm512_permutexvar_epi16(
      order, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

inline __m512 widen16(__m256i a) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
}

inline __m512bh load_pairs(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// the first value of each pair at p, as float32
inline __m512 first_of_pairs(const uint32_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
}

// The group's `planes` channel planes of `src` (layout `in`) as bfloat16 bits in
// zero-bordered planes of padded_h x padded_w, the map starting at row/column `top`.
inline void pad_bits(const c10::BFloat16* src, const Layout& in, uint16_t* dst,
                     int64_t planes, int64_t height, int64_t width, int64_t top,
                     int64_t padded_h, int64_t padded_w) {
  for (int64_t c = 0; c < planes; ++c) {
    for (int64_t h = 0; h < height; ++h) {
      const c10::BFloat16* row = src + c * in.c + h * in.h;
      uint16_t* out = dst + (c * padded_h + h + top) * padded_w + top;
      for (int64_t w = 0; w < width; ++w) out[w] = bits(row[w * in.w]);
    }
  }
}

// pairs[q] = (plane[q], plane[q + 1]) over n positions of a row (plane has n + 1)
inline void neighbour_pairs(const uint16_t* plane, uint32_t* pairs, int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    pairs[q] = plane[q] | static_cast<uint32_t>(plane[q + 1]) << 16;
  }
}

// pairs[q] = (a[q], b[q])
inline void channel_pairs(const uint16_t* a, const uint16_t* b, uint32_t* pairs, int64_t n) {
  for (int64_t q = 0; q < n; ++q) pairs[q] = a[q] | static_cast<uint32_t>(b[q]) << 16;
}

// The first n lanes of v, rounded to bfloat16: to nearest even, by VCVTNEPS2BF16 (0.85-0.9x
// the time of the kernel gradient with the integer rounding of round_bf16, whose result it
// equals except that it flushes float32 subnormals, below 1.2e-38, to zero).
inline void store_bf16(c10::BFloat16* p, __m512 v, int64_t n) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), (__m256i)_mm512_cvtneps_pbh(v));
}

// One block of CB channels of gather_rows: out[c, h, w0..w0+V) summed over the taps of
// kernel rows i0..i1-1 in registers (two partial sums per channel), rounded and stored
// once. Kernel map (i, j) of the output vector starts at k0 + (i * K + j) * ks; the source
// pairs of kernel row i at x0 + i * pw (forward) or x0 + (K - 1 - i) * pw. The forward
// pass reads the maps themselves (ks: the plane; n lanes), the input gradient
// zero-bordered copies of their rows (ks: a padded row) at shifted columns, as
// gather_blocked does.
template <int64_t K, int64_t CB, bool transposed>
inline void gather_rows_block(const uint16_t* k0, int64_t ks, int64_t i0, int64_t i1,
                              const uint32_t* x0, int64_t pw, int64_t cstride, int64_t n,
                              c10::BFloat16* o, int64_t ostride) {
  constexpr int64_t P = K / 2;
  __m512 a[CB], b[CB];
#pragma GCC unroll 8
  for (int64_t c = 0; c < CB; ++c) a[c] = b[c] = _mm512_setzero_ps();
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* ki = k0 + i * K * ks;
    __m512bh wp[P > 0 ? P : 1];
#pragma GCC unroll 16
    for (int64_t m = 0; m < P; ++m) {
      const int64_t j = 2 * m;
      if constexpr (transposed) {  // lane q: taps j + 1 at s, j at s + 1
        wp[m] = interleave(load16(ki + (j + 1) * ks + K - 2 - j, V),
                           load16(ki + j * ks + K - 1 - j, V));
      } else {
        wp[m] = interleave(load16(ki + j * ks, n), load16(ki + (j + 1) * ks, n));
      }
    }
    __m512 wl = _mm512_setzero_ps();
    if constexpr (K % 2 == 1) wl = widen16(load16(ki + (K - 1) * ks, transposed ? V : n));
    const uint32_t* x = x0 + (transposed ? K - 1 - i : i) * pw;
#pragma GCC unroll 8
    for (int64_t c = 0; c < CB; ++c) {
      const uint32_t* xc = x + c * cstride;
#pragma GCC unroll 16
      for (int64_t m = 0; m < P; ++m) {
        // forward: (x[q + j], x[q + j + 1]); transposed: (g[s], g[s + 1])
        const __m512bh xs = load_pairs(xc + (transposed ? K - 2 - 2 * m : 2 * m));
        if (m % 2) b[c] = _mm512_dpbf16_ps(b[c], wp[m], xs);
        else a[c] = _mm512_dpbf16_ps(a[c], wp[m], xs);
      }
      if constexpr (K % 2 == 1) {
        b[c] = _mm512_fmadd_ps(wl, first_of_pairs(xc + (transposed ? 0 : K - 1)), b[c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int64_t c = 0; c < CB; ++c) store_bf16(o + c * ostride, _mm512_add_ps(a[c], b[c]), n);
}

// The forward pass and the input gradient for bfloat16 (as gather_blocked computes them
// in float32), the taps in pairs: for each output vector, blocks of CB channels of the
// group are summed over all K*K taps in registers and stored once, rounded, where
// gather_blocked reads back and rewrites a tile per kernel row; the next task's kernel
// maps are read into L2 front to back meanwhile (NextMapsPrefetch). The input gradient
// first copies, per output row, the kernel rows it reads into zero-bordered rows (it reads
// them at shifted columns). On an AMD EPYC (Zen 4, 2 threads; B=8, 32 groups, K=7,
// channels-last maps, medians of 11-13 interleaved with the tiled form this replaced) the
// forward pass took 9.6-11.2 against 11.0-13.0 ms at 56x56 (C=96), 3.1 against 5.7 ms at
// 28x28 (C=192) and 2.4 against 3.3 ms at 14x14 (C=384); the input gradient 9.1-11.1
// against 10.4-11.8, 4.6 against 6.1 and 2.7 against 3.3 ms (without the prefetch 11.8-14.9
// ms at 56x56), and the operator's forward + backward in tools/benchmark_op.py 1.45x its
// float32 speed against 1.36x (two runs each). The same loops for float32 (FMAs) gained
// nothing there - reading twice the bytes, it stays bound by memory - and are not used.
// 512-bit vectors of 16 lanes (equal results) then took, against 256-bit ones, 6.1-7.9
// against 6.4-8.3 ms for the forward pass and 7.4-9.1 against 8.7-10.0 ms for the input
// gradient at 56x56 (NCHW; channels-last 7.3 / 8.8 against 8.2 / 10.7), 2.5 / 3.4 against
// 3.1 / 3.8 ms at 28x28, 1.7 / 2.0 against 2.2 / 2.3 at 14x14 and 1.4 / 1.4 against 1.5 /
// 1.5 at 7x7; with K = 12 (the 384 fine-tuning) 39 / 72 against 51 / 83 ms at 96x96 and
// even at 48x48, only at 24x24 (one and a half vectors a row) 3.3 / 5.0 against 3.0 / 4.9.
template <int64_t K, int64_t CB, bool transposed>
void gather_rows(const c10::BFloat16* src, const Layout& in, const c10::BFloat16* weight,
                 c10::BFloat16* out, const Layout& lo, int64_t batch, int64_t channels,
                 int64_t groups, int64_t height, int64_t width) {
  const int64_t cpg = channels / groups, plane = height * width, top = K / 2;
  const int64_t before = transposed ? K - 1 - top : top;  // zero rows/columns before the map
  const int64_t ph = height + K - 1, pw = width + K - 1 + V;
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> padded(cpg * ph * (pw + 1), 0);
    // a vector of zeros past the end: the last loads of a row read on into the next
    std::vector<uint32_t> pairs(cpg * ph * pw + V, 0);
    std::vector<uint16_t> rows(transposed ? K * K * pw + V : 0, 0);
    PlanarInput<c10::BFloat16> srcs(src, in, channels, height, width);
    PlanarOutput<c10::BFloat16> outs(out, lo, channels, height, width);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t n_ = bg / groups, g_ = bg % groups;
      const auto s = srcs.group(n_, g_, cpg);
      pad_bits(s.first, s.second, padded.data(), cpg, height, width, before, ph, pw + 1);
      for (int64_t r = 0; r < cpg * ph; ++r) {
        neighbour_pairs(padded.data() + r * (pw + 1), pairs.data() + r * pw, pw);
      }
      const uint16_t* wt = reinterpret_cast<const uint16_t*>(weight + bg * K * K * plane);
      const auto os = outs.group(n_, g_, cpg);
      c10::BFloat16* o = os.first;
      const Layout lo_ = os.second;
      const int64_t cstride = ph * pw;
      NextMapsPrefetch next(bg + 1 < end ? wt + K * K * plane : nullptr,
                            K * K * plane * sizeof(uint16_t), height);
      for (int64_t h = 0; h < height; ++h) {
        next.step();
        // transposed: kernel row i contributes where its map row h - i + K/2 exists
        const int64_t i0 = transposed ? std::max<int64_t>(0, h + top - height + 1) : 0;
        const int64_t i1 = transposed ? std::min<int64_t>(K, h + top + 1) : K;
        if constexpr (transposed) {
          for (int64_t i = i0; i < i1; ++i) {
            for (int64_t j = 0; j < K; ++j) {
              std::memcpy(rows.data() + (i * K + j) * pw + before,
                          wt + (i * K + j) * plane + (h - i + top) * width,
                          width * sizeof(uint16_t));
            }
          }
        }
        for (int64_t w0 = 0; w0 < width; w0 += V) {
          const int64_t n = std::min(V, width - w0);
          const uint16_t* k0 = transposed ? rows.data() + w0 : wt + h * width + w0;
          for (int64_t c0 = 0; c0 < cpg; c0 += CB) {
            gather_rows_block<K, CB, transposed>(
                k0, transposed ? pw : plane, i0, i1, pairs.data() + c0 * cstride + h * pw + w0,
                pw, cstride, n, o + c0 * lo_.c + h * lo_.h + w0, lo_.c);
          }
        }
      }
    }
    outs.flush();
  });
}

// gather_rows with channel blocks of 3, 4, 2 or 1, whichever divides the group's channels
template <int64_t K, bool transposed>
void gather_rows_blocks(const c10::BFloat16* src, const Layout& in,
                        const c10::BFloat16* weight, c10::BFloat16* out, const Layout& lo,
                        int64_t batch, int64_t channels, int64_t groups, int64_t height,
                        int64_t width) {
  const auto run = [&](auto cb) {
    gather_rows<K, decltype(cb)::value, transposed>(src, in, weight, out, lo, batch, channels,
                                                    groups, height, width);
  };
  const int64_t cpg = channels / groups;
  if (cpg % 3 == 0) return run(std::integral_constant<int64_t, 3>());
  if (cpg % 4 == 0) return run(std::integral_constant<int64_t, 4>());
  if (cpg % 2 == 0) return run(std::integral_constant<int64_t, 2>());
  run(std::integral_constant<int64_t, 1>());
}

// weight_gradient_blocked for bfloat16, the group's channels in pairs. With only the
// group's channels to sum (3 at stage 1) it is mostly loads, one or two dot products, the
// rounding and the store per output vector. On an AMD EPYC (Zen 4, 2 threads, B=8, 32
// groups, K=7, medians of 13 interleaved, equal results) 512-bit vectors took 5.0-5.7
// against 7.4-7.6 ms for 256-bit ones at 56x56 (C=96; float32 8.8-10.1 ms), 8.2 against
// 10.6 ms on channels-last maps, 3.1 against 3.7 ms at 28x28 (C=192), 1.5 against 2.0 ms at
// 14x14 (C=384) and 0.9 either way at 7x7. Computing one or two maps at a time (one or two
// write streams instead of K) was slower: 17.2 and 14.3 ms at 56x56.
template <int64_t K>
void weight_gradient(const c10::BFloat16* grad_out, const Layout& lg,
                     const c10::BFloat16* input, const Layout& lx, c10::BFloat16* grad_weight,
                     int64_t batch, int64_t channels, int64_t groups, int64_t height,
                     int64_t width) {
  const int64_t cpg = channels / groups, plane = height * width, top = K / 2;
  const int64_t ph = height + K - 1, pw = width + K - 1 + V;
  const int64_t npairs = cpg / 2;
  const bool odd = cpg % 2;
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> padded(cpg * ph * pw, 0), go(cpg * plane, 0);
    // a vector of zeros past the ends: the last loads of a row read on into the next
    std::vector<uint32_t> xpairs(npairs * ph * pw + V, 0), gpairs(npairs * plane + V, 0);
    std::vector<float> xlast(odd ? ph * pw + V : 0, 0.f), glast(odd ? plane + V : 0, 0.f);
    PlanarInput<c10::BFloat16> xs(input, lx, channels, height, width);
    PlanarInput<c10::BFloat16> gs(grad_out, lg, channels, height, width);
    // sizes as locals: the stores may alias anything, and the compiler reloaded the
    // lambda's captured references after each of them
    const int64_t H = height, Wd = width, P = plane, PW = pw, PH = ph, NP = npairs;
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t n_ = bg / groups, g_ = bg % groups;
      const auto xn = xs.group(n_, g_, cpg), gn = gs.group(n_, g_, cpg);
      pad_bits(xn.first, xn.second, padded.data(), cpg, H, Wd, top, PH, PW);
      pad_bits(gn.first, gn.second, go.data(), cpg, H, Wd, 0, H, Wd);
      for (int64_t m = 0; m < NP; ++m) {
        channel_pairs(padded.data() + 2 * m * PH * PW, padded.data() + (2 * m + 1) * PH * PW,
                      xpairs.data() + m * PH * PW, PH * PW);
        channel_pairs(go.data() + 2 * m * P, go.data() + (2 * m + 1) * P,
                      gpairs.data() + m * P, P);
      }
      if (odd) {
        pad_planes(xn.first + (cpg - 1) * xn.second.c, xn.second, xlast.data(), 1, H,
                   Wd, top, PH, PW);
        pad_planes(gn.first + (cpg - 1) * gn.second.c, gn.second, glast.data(), 1, H,
                   Wd, 0, H, Wd);
      }
      c10::BFloat16* gw = grad_weight + bg * K * K * P;
      const uint32_t* xp0 = xpairs.data();
      const uint32_t* gp0 = gpairs.data();
      const float* xl0 = xlast.data();
      const float* gl0 = glast.data();
      for_each_gradient_row<K>(gw, H, Wd, [&](int64_t i, int64_t h) {
        c10::BFloat16* dst = gw + i * K * P + h * Wd;
        for (int64_t w0 = 0; w0 < Wd; w0 += V) {
          const int64_t n = std::min(V, Wd - w0);
          __m512 acc[K];
#pragma GCC unroll 16
          for (int64_t j = 0; j < K; ++j) acc[j] = _mm512_setzero_ps();
          for (int64_t m = 0; m < NP; ++m) {
            const __m512bh g = load_pairs(gp0 + m * P + h * Wd + w0);
            // lanes past the row's end read the next row: their sums are not stored
            const uint32_t* row = xp0 + (m * PH + h + i) * PW + w0;
#pragma GCC unroll 16
            for (int64_t j = 0; j < K; ++j) {
              acc[j] = _mm512_dpbf16_ps(acc[j], g, load_pairs(row + j));
            }
          }
          if (odd) {
            const __m512 g = _mm512_loadu_ps(gl0 + h * Wd + w0);
            const float* row = xl0 + (h + i) * PW + w0;
#pragma GCC unroll 16
            for (int64_t j = 0; j < K; ++j) {
              acc[j] = _mm512_fmadd_ps(g, _mm512_loadu_ps(row + j), acc[j]);
            }
          }
#pragma GCC unroll 16
          for (int64_t j = 0; j < K; ++j) store_bf16(dst + j * P + w0, acc[j], n);
        }
      });
    }
  });
}

}  // namespace bf16dot
#endif  // AVX-512 BF16

// Writes into `out` (same shape as `src`): NCHW-contiguous or channels-last, either one for
// the blocked kernels (the plain loops work on NCHW copies).
void forward_or_grad_input_into(const at::Tensor& src_, const at::Tensor& weight,
                                const at::Tensor& out, bool transposed) {
  const char* name = transposed ? "grad_output" : "input";
  TORCH_CHECK(src_.device().is_cpu() && src_.dim() == 4, "mmdwnet_cpu: `", name,
              "` must be a 4-D CPU tensor");
  check(weight, 6, "weight");
  TORCH_CHECK(src_.scalar_type() == weight.scalar_type() &&
                  out.scalar_type() == weight.scalar_type(), "mmdwnet_cpu: dtype mismatch");
  const int64_t b = src_.size(0), c = src_.size(1), h = src_.size(2), w = src_.size(3);
  const int64_t g = weight.size(1), k = weight.size(2);
  TORCH_CHECK(weight.size(0) == b && weight.size(3) == k && weight.size(4) == h &&
                  weight.size(5) == w && g > 0 && c % g == 0,
              "mmdwnet_cpu: weight shape does not match the input");
  TORCH_CHECK(out.sizes() == src_.sizes() && is_nchw_or_channels_last(out),
              "mmdwnet_cpu: `out` must have the input's shape, NCHW or channels-last");
  const at::Tensor src = is_nchw_or_channels_last(src_) ? src_ : src_.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, src.scalar_type(), "mmdwnet_cpu_shift_accumulate",
      [&] {
    const scalar_t* x = src.data_ptr<scalar_t>();
    const scalar_t* wt = weight.data_ptr<scalar_t>();
    const Layout in(src), lo(out);
    const bool done = with_blocked_size(k, [&](auto size) {
      constexpr int64_t K = decltype(size)::value;
      scalar_t* y = out.data_ptr<scalar_t>();
#ifdef MMDWNET_BF16_DOT
      if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
        if (transposed) {
          bf16dot::gather_rows_blocks<K, true>(x, in, wt, y, lo, b, c, g, h, w);
        } else {
          bf16dot::gather_rows_blocks<K, false>(x, in, wt, y, lo, b, c, g, h, w);
        }
        return;
      }
#endif
      if (transposed) {
        gather_blocked<scalar_t, K, true>(x, in, wt, y, lo, b, c, g, h, w);
      } else {
        gather_blocked<scalar_t, K, false>(x, in, wt, y, lo, b, c, g, h, w);
      }
    });
    if (!done) {
      const at::Tensor x_nchw = src.contiguous();
      at::Tensor y = out.is_contiguous() ? out : at::empty_like(x_nchw);
      shift_accumulate<scalar_t>(x_nchw.data_ptr<scalar_t>(), wt, y.data_ptr<scalar_t>(), b,
                                 c, g, k, h, w, transposed);
      if (!out.is_contiguous()) out.copy_(y);
    }
  });
}

// the output in the memory format of the input
at::Tensor forward(const at::Tensor& input, const at::Tensor& weight) {
  auto out = at::empty_like(input, is_nchw_or_channels_last(input)
                                       ? at::MemoryFormat::Preserve
                                       : at::MemoryFormat::Contiguous);
  forward_or_grad_input_into(input, weight, out, false);
  return out;
}

at::Tensor grad_input(const at::Tensor& grad_output, const at::Tensor& weight) {
  auto out = at::empty_like(grad_output, is_nchw_or_channels_last(grad_output)
                                             ? at::MemoryFormat::Preserve
                                             : at::MemoryFormat::Contiguous);
  forward_or_grad_input_into(grad_output, weight, out, true);
  return out;
}

void forward_into(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& out) {
  forward_or_grad_input_into(input, weight, out, false);
}

void grad_input_into(const at::Tensor& grad_output, const at::Tensor& weight,
                     const at::Tensor& out) {
  forward_or_grad_input_into(grad_output, weight, out, true);
}

at::Tensor grad_weight(const at::Tensor& grad_output_, const at::Tensor& input_,
                       int64_t groups, int64_t kernel) {
  TORCH_CHECK(grad_output_.device().is_cpu() && grad_output_.dim() == 4 &&
                  input_.device().is_cpu() && input_.dim() == 4,
              "mmdwnet_cpu: `grad_output` and `input` must be 4-D CPU tensors");
  const at::Tensor grad_output =
      is_nchw_or_channels_last(grad_output_) ? grad_output_ : grad_output_.contiguous();
  const at::Tensor input = is_nchw_or_channels_last(input_) ? input_ : input_.contiguous();
  const int64_t b = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  TORCH_CHECK(groups > 0 && c % groups == 0, "mmdwnet_cpu: groups must divide channels");
  auto out = at::empty({b, groups, kernel, kernel, h, w}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdwnet_cpu_weight_gradient",
      [&] {
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* gw = out.data_ptr<scalar_t>();
    const Layout lg(grad_output), lx(input);
    const bool done = with_blocked_size(kernel, [&](auto size) {
#ifdef MMDWNET_BF16_DOT
      if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
        bf16dot::weight_gradient<decltype(size)::value>(go, lg, x, lx, gw, b, c, groups, h, w);
        return;
      }
#endif
      weight_gradient_blocked<scalar_t, decltype(size)::value>(go, lg, x, lx, gw, b, c, groups,
                                                               h, w);
    });
    if (!done) {
      const at::Tensor go_nchw = grad_output.contiguous(), x_nchw = input.contiguous();
      weight_gradient<scalar_t>(go_nchw.data_ptr<scalar_t>(), x_nchw.data_ptr<scalar_t>(), gw,
                                b, c, groups, kernel, h, w);
    }
  });
  return out;
}

// whether bfloat16 operands take the AVX-512 BF16 dot products (the build's target has them)
bool bf16_dot_products() {
#ifdef MMDWNET_BF16_DOT
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdwnet_cpu, m) {
  m.def("bf16_dot_products() -> bool", &bf16_dot_products);
  m.def("inhomogeneous_dwconv2d(Tensor input, Tensor weight) -> Tensor", &forward);
  m.def("inhomogeneous_dwconv2d_into(Tensor input, Tensor weight, Tensor(a!) out) -> ()",
        &forward_into);
  m.def("inhomogeneous_dwconv2d_grad_input_into(Tensor grad_output, Tensor weight, "
        "Tensor(a!) out) -> ()",
        &grad_input_into);
  m.def("inhomogeneous_dwconv2d_grad_input(Tensor grad_output, Tensor weight) -> Tensor",
        &grad_input);
  m.def("inhomogeneous_dwconv2d_grad_weight(Tensor grad_output, Tensor input, int groups, "
        "int kernel_size) -> Tensor",
        &grad_weight);
}
