// Helpers the CPU kernels of mmdwnet's I-D-DW operators share (inhomogeneous_dwconv_cpu.cpp,
// predicted_idwconv_cpu.cpp): float32 accumulation for narrower types, 32-byte vectors as
// GCC vector extensions, widening loads and rounding stores, and the strides of NCHW or
// channels-last maps.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
// bfloat16 dot products (VDPBF16PS): the build targets a CPU with AVX-512 BF16
#define MMDWNET_BF16_DOT 1
#endif

namespace {

// float32 accumulation for float16/bfloat16 operands (double stays double)
template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double,
                                           float>::type;

// Bytes of the vectors the I-D-DW kernels work on (along a row of the map): 32 (AVX2,
// AVX-512VL) unless the build asks for 64 (cpu_extension.vector_bytes: AVX-512 where
// Intel CPUs with AVX-512).
#ifndef MMDWNET_VEC_BYTES
#define MMDWNET_VEC_BYTES 32
#endif
static_assert(MMDWNET_VEC_BYTES == 32 || MMDWNET_VEC_BYTES == 64,
              "MMDWNET_VEC_BYTES must be 32 or 64");

template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(MMDWNET_VEC_BYTES)));
  static constexpr int64_t size = MMDWNET_VEC_BYTES / sizeof(acc_t);
};
// bfloat16 bits and float32 bits of one float32 vector
typedef uint16_t u16xV __attribute__((vector_size(MMDWNET_VEC_BYTES / 2)));
typedef uint32_t u32xV __attribute__((vector_size(MMDWNET_VEC_BYTES)));

// One value as acc_t. bfloat16 is the upper half of a float32: widened with integer
// operations that vectorise (c10::BFloat16's conversion does not, here).
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// bfloat16 <-> float32 for vectors of any width: u16 lanes (bfloat16 bits) to f32 lanes
// (the upper halves of floats), and f32 lanes rounded to nearest even, as c10::BFloat16
// does (a NaN stays a quiet NaN)
template <typename f32v, typename u32v, typename u16v>
inline f32v widen_bf16(u16v half) {
  const u32v bits = __builtin_convertvector(half, u32v) << 16;
  f32v v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename u16v, typename u32v, typename f32v>
inline u16v round_bf16(f32v v) {
  u32v bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32v nan = reinterpret_cast<u32v>(v != v);  // all ones where NaN
  const u32v rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), u16v);
}

template <typename acc_t, typename T>
inline typename Vec<acc_t>::type load(const T* p) {  // same type: an unaligned load
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same<T, acc_t>::value) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {  // upper halves of floats
    u16xV half;
    std::memcpy(&half, p, sizeof(half));
    v = widen_bf16<typename Vec<acc_t>::type, u32xV>(half);
  } else {
    for (int64_t i = 0; i < Vec<acc_t>::size; ++i) v[i] = static_cast<acc_t>(p[i]);
  }
  return v;
}

// `n` values of `src` as acc_t in `dst`
template <typename scalar_t, typename acc_t>
void widen(const scalar_t* src, acc_t* dst, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size;
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const auto v = load<acc_t>(src + i);
    std::memcpy(dst + i, &v, sizeof(v));
  }
  for (; i < n; ++i) dst[i] = to_acc<acc_t>(src[i]);
}

template <typename T, typename acc_t>
inline void store(T* p, typename Vec<acc_t>::type v, int64_t n) {  // the first n lanes
  if (n == Vec<acc_t>::size) {
    if constexpr (std::is_same<T, acc_t>::value) {
      std::memcpy(p, &v, sizeof(v));
      return;
    } else if constexpr (std::is_same<T, c10::BFloat16>::value &&
                         std::is_same<acc_t, float>::value) {
      const u16xV half = round_bf16<u16xV, u32xV>(v);
      std::memcpy(p, &half, sizeof(half));
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(v[i]);
}

// Strides of a (B, C, H, W) feature map, in elements: NCHW-contiguous or channels-last.
struct Layout {
  int64_t b, c, h, w;
  explicit Layout(const at::Tensor& t)
      : b(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  Layout(int64_t b_, int64_t c_, int64_t h_, int64_t w_) : b(b_), c(c_), h(h_), w(w_) {}
  // first element of group g of sample n
  int64_t group(int64_t n, int64_t g, int64_t cpg) const { return n * b + g * cpg * c; }
  bool planar() const { return w == 1; }  // rows contiguous (NCHW)
};

// dst[j * ds + i] = src[i * ss + j] for i < rows, j < cols (strides in elements): in
// tiles of 8 x 8 values for 2- and 4-byte types, transposed in vector registers (SSE2
// unpacks for 16-bit values, AVX for 32-bit ones), the edges value by value. The kernels
// transpose every channels-last map they read or write (PlanarInput, PlanarOutput); a
// value at a time, with a strided load or store each, that took about a sixth of the
// fused bfloat16 I-D-DW forward pass at DWNet-T's first stage (AMD EPYC, Zen 4).
template <typename T>
inline void transpose_tile8(const T* src, int64_t ss, T* dst, int64_t ds) {
#if defined(__SSE2__)
  if constexpr (sizeof(T) == 2) {
    __m128i r[8], t[8], u[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k * ss));
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {  // rows 4k .. 4k + 3: columns (0, 1), (2, 3), (4, 5), (6, 7)
      u[4 * k] = _mm_unpacklo_epi32(t[4 * k], t[4 * k + 2]);
      u[4 * k + 1] = _mm_unpackhi_epi32(t[4 * k], t[4 * k + 2]);
      u[4 * k + 2] = _mm_unpacklo_epi32(t[4 * k + 1], t[4 * k + 3]);
      u[4 * k + 3] = _mm_unpackhi_epi32(t[4 * k + 1], t[4 * k + 3]);
    }
    for (int k = 0; k < 4; ++k) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * k) * ds),
                       _mm_unpacklo_epi64(u[k], u[4 + k]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * k + 1) * ds),
                       _mm_unpackhi_epi64(u[k], u[4 + k]));
    }
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(T) == 4) {
    __m256 r[8], t[8], u[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + k * ss));
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {
      u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(reinterpret_cast<float*>(dst + k * ds),
                       _mm256_permute2f128_ps(u[k], u[4 + k], 0x20));
      _mm256_storeu_ps(reinterpret_cast<float*>(dst + (k + 4) * ds),
                       _mm256_permute2f128_ps(u[k], u[4 + k], 0x31));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < 8; ++i) {
    for (int64_t j = 0; j < 8; ++j) dst[j * ds + i] = src[i * ss + j];
  }
}

template <typename T>
void transpose(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) transpose_tile8(src + i * ss + j, ss, dst + j * ds + i, ds);
    for (; j < cols; ++j) {
      for (int64_t k = i; k < i + 8; ++k) dst[j * ds + k] = src[k * ss + j];
    }
  }
  for (; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
  }
}

// One sample of a channels-last map as NCHW planes, or back. The kernels read and write
// a group's few channels at a time, plane by plane; straight from channels-last memory
// that touches a cache line per pixel for a few values of it, again for every group (at
// DWNet-T's first stage 32 times over a 1.2 MiB map, which falls out of the L2 cache in
// between). Transposed once instead, in 8 x 8 tiles, each line is read once. `planes`
// holds the `channels` channels of one sample (back: channels c0..c1 of them), H x W
// each, `map` the sample in layout `l` (channels-last, possibly a slice of the channels
// of a wider map; other layouts value by value).
template <typename scalar_t>
void channels_last_to_planes(const scalar_t* map, const Layout& l, scalar_t* planes,
                             int64_t channels, int64_t height, int64_t width) {
  const int64_t plane = height * width;
  if (l.c == 1 && l.h == width * l.w) {  // channels-last: pixels of l.w values in a row
    transpose(map, l.w, planes, plane, plane, channels);
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t h = 0; h < height; ++h) {
      for (int64_t w = 0; w < width; ++w) {
        planes[c * plane + h * width + w] = map[c * l.c + h * l.h + w * l.w];
      }
    }
  }
}

template <typename scalar_t>
void planes_to_channels_last(const scalar_t* planes, scalar_t* map, const Layout& l,
                             int64_t c0, int64_t c1, int64_t height, int64_t width) {
  const int64_t plane = height * width;
  if (l.c == 1 && l.h == width * l.w) {
    transpose(planes + c0 * plane, plane, map + c0, l.w, c1 - c0, plane);
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t h = 0; h < height; ++h) {
      for (int64_t w = 0; w < width; ++w) {
        map[c * l.c + h * l.h + w * l.w] = planes[c * plane + h * width + w];
      }
    }
  }
}

// The layout of one sample's `channels` NCHW planes of height x width
inline Layout planes_layout(int64_t channels, int64_t height, int64_t width) {
  return Layout(channels * height * width, height * width, width, 1);
}

// A thread's NCHW copy of the sample it works on, for tasks that take a (sample, group)
// at a time: group(n, g, cpg) returns the first channel of group g of sample n of `map`
// (layout `l`) as planes, and their layout (the sample transposed once, on the first of
// its groups this thread takes), or of the map itself where its rows are contiguous.
template <typename scalar_t>
struct PlanarInput {
  const scalar_t* map;
  Layout l;
  int64_t channels, height, width, current = -1;
  std::vector<scalar_t> buf;
  PlanarInput(const scalar_t* map_, const Layout& l_, int64_t c, int64_t h, int64_t w)
      : map(map_), l(l_), channels(c), height(h), width(w) {
    if (!l.planar()) buf.resize(c * h * w);
  }
  std::pair<const scalar_t*, Layout> group(int64_t n, int64_t g, int64_t cpg) {
    if (l.planar()) return {map + l.group(n, g, cpg), l};
    if (n != current) {
      channels_last_to_planes(map + n * l.b, l, buf.data(), channels, height, width);
      current = n;
    }
    const Layout p = planes_layout(channels, height, width);
    return {buf.data() + p.group(0, g, cpg), p};
  }
};

// The output side of PlanarInput: a thread writes the groups of a sample into NCHW
// planes (`group(n, g, cpg)`), and they go to the channels-last map, transposed, when the thread
// moves to another sample or calls flush() at the end of its tasks; only the channels it
// wrote. Where the map's rows are contiguous the planes are the map itself.
template <typename scalar_t>
struct PlanarOutput {
  scalar_t* map;
  Layout l;
  int64_t channels, height, width, current = -1, c0 = 0, c1 = 0;
  std::vector<scalar_t> buf;
  PlanarOutput(scalar_t* map_, const Layout& l_, int64_t c, int64_t h, int64_t w)
      : map(map_), l(l_), channels(c), height(h), width(w) {
    if (!l.planar()) buf.resize(c * h * w);
  }
  std::pair<scalar_t*, Layout> group(int64_t n, int64_t g, int64_t cpg) {
    if (l.planar()) return {map + l.group(n, g, cpg), l};
    if (n != current) {
      flush();
      current = n;
      c0 = g * cpg;
      c1 = c0 + cpg;
    }
    c0 = std::min(c0, g * cpg);
    c1 = std::max(c1, (g + 1) * cpg);
    const Layout p = planes_layout(channels, height, width);
    return {buf.data() + p.group(0, g, cpg), p};
  }
  void flush() {
    if (current >= 0 && c1 > c0) {
      planes_to_channels_last(buf.data(), map + current * l.b, l, c0, c1, height, width);
    }
    current = -1;
  }
};

// The group's `planes` channel planes of `src` (layout `in`), widened to acc_t, into
// zero-bordered planes of padded_h x padded_w starting at row/column `top`.
template <typename scalar_t, typename acc_t>
void pad_planes(const scalar_t* src, const Layout& in, acc_t* dst, int64_t planes,
                int64_t height, int64_t width, int64_t top, int64_t padded_h,
                int64_t padded_w) {
  for (int64_t c = 0; c < planes; ++c) {
    for (int64_t h = 0; h < height; ++h) {
      const scalar_t* row = src + c * in.c + h * in.h;
      acc_t* out = dst + (c * padded_h + h + top) * padded_w + top;
      if (in.w == 1) {
        widen(row, out, width);
      } else {  // channels-last: a strided row
        for (int64_t w = 0; w < width; ++w) out[w] = to_acc<acc_t>(row[w * in.w]);
      }
    }
  }
}

// The first n lanes of v to p[0], p[stride], ...
template <typename T, typename acc_t>
inline void store_strided(T* p, int64_t stride, typename Vec<acc_t>::type v, int64_t n) {
  if (stride == 1) {
    store<T, acc_t>(p, v, n);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * stride] = static_cast<T>(v[i]);
  }
}

// `planes` (rows x width, `stride` apart in `src`, of `ld` values per row) to the strided
// map `dst` (layout `lo`), rounded to scalar_t; where given, first the per-plane affine
// map v * scale[c] + shift[c] (a folded BatchNorm), then a ReLU
template <typename scalar_t, typename acc_t>
void store_planes(const acc_t* src, int64_t planes, int64_t rows, int64_t width, int64_t ld,
                  int64_t stride, scalar_t* dst, const Layout& lo,
                  const acc_t* scale = nullptr, const acc_t* shift = nullptr,
                  bool relu = false) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t V = Vec<acc_t>::size;
  for (int64_t c = 0; c < planes; ++c) {
    const vec a = vec{} + (scale ? scale[c] : acc_t(1));
    const vec b = vec{} + (shift ? shift[c] : acc_t(0));
    for (int64_t h = 0; h < rows; ++h) {
      const acc_t* t = src + c * stride + h * ld;
      scalar_t* d = dst + c * lo.c + h * lo.h;
      for (int64_t w0 = 0; w0 < width; w0 += V) {
        vec v = load<acc_t>(t + w0);
        if (scale) v = v * a + b;
        if (relu) v = v > 0 ? v : vec{};
        store_strided<scalar_t, acc_t>(d + w0 * lo.w, lo.w, v, std::min(V, width - w0));
      }
    }
  }
}

// Loads of a row that may end inside the vector: the missing lanes read as zero.
template <typename acc_t, typename T>
inline typename Vec<acc_t>::type load_n(const T* p, int64_t n) {
  if (n == Vec<acc_t>::size) return load<acc_t>(p);
  typename Vec<acc_t>::type v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = to_acc<acc_t>(p[i]);
  return v;
}

// Prefetches the next task's K*K kernel maps into the L2 cache in memory order, a slice at
// each of `steps` calls, while the current task's maps are read. A gather reads a
// sample-group's maps a row of each map at a time, and on an AMD EPYC (Zen 4, one thread,
// 78 MiB of bfloat16 maps) memory delivered that order at 7-10 GB/s, against 18-20 GB/s
// read front to back: ahead of time and front to back, the maps are in L2 when the
// gather comes to them. Only maps of up to 512 KiB a task (half of Zen 4's L2; 56x56 maps
// of K = 7 in bfloat16 take 300 KiB): larger ones would not stay there until used.
struct NextMapsPrefetch {
  static constexpr int64_t max_bytes = 512 << 10;
  const char* next;
  int64_t bytes, chunk, done = 0;
  NextMapsPrefetch(const void* next_, int64_t bytes_, int64_t steps)
      : next(bytes_ <= max_bytes ? static_cast<const char*>(next_) : nullptr), bytes(bytes_),
        chunk(((bytes_ + steps - 1) / steps + 63) / 64 * 64) {}
  inline void step() {
    if (next == nullptr) return;
    const int64_t stop = std::min(bytes, done + chunk);
    for (; done < stop; done += 64) __builtin_prefetch(next + done, 0, 1);  // to L2
  }
};

// Runs `fn.template operator()<K>()` for the kernel sizes with a blocked kernel; false
// for the others, which take the plain loops.
template <typename F>
bool with_blocked_size(int64_t kernel, F&& fn) {
  switch (kernel) {
    case 3: fn(std::integral_constant<int64_t, 3>()); return true;
    case 5: fn(std::integral_constant<int64_t, 5>()); return true;
    case 7: fn(std::integral_constant<int64_t, 7>()); return true;
    case 12: fn(std::integral_constant<int64_t, 12>()); return true;
    default: return false;
  }
}

inline bool is_nchw_or_channels_last(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace
