// Fused depthwise-convolution kernels for spark-me (loaded by spark_me/sparse/depthwise.py).
//
// Plain C ABI, no torch headers, so the library builds in seconds with the C++ compiler that
// MinkowskiEngine's build already needs. Every kernel works on channels-last rows: a site's C
// channels are contiguous, and the inner loops run over channels in explicit vectors of 64 bytes
// (GCC vector extensions, lowered to whatever -march=native offers), accumulating in float for
// float/bfloat16 and in double for double.
//
//   gather_sum     out[i, c] = bias[c] + sum_j x[idx[i, j], c] * w[j, c]        (idx >= n: no site)
//   gather_wgrad   gw[t, j, c] += sum_{i in part t} x[idx[i, j], c] * g[i, c]   (one part per thread)
//   map_wgrad      gw[t, ky, kx, c] += sum_{b, y, x in part t} g[b, y, x, c] * x[b, ys+ky-p, xs+kx-p, c]
//
// gather_sum is the forward of the fused sparse dataflow and, through the flipped / inverse window
// table, its backward-data (a gather, no scatter-add); the two wgrad kernels are the per-channel
// weight-gradient reductions of the fused dataflow and of the block / dense dataflows. Where the
// compiler targets AVX512-BF16 (-march=native on such a CPU), gather_sum and gather_wgrad take bf16
// rows 32 channels at a time through vdpbf16ps (two products per lane and instruction: x2.1-2.3 on
// ConvNeXt's 7x7 layers, benchmarks/README.md).
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using i64 = int64_t;
struct bf16 {
  uint16_t bits;
};

typedef float vf __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
typedef uint32_t vu32 __attribute__((vector_size(64)));
typedef int32_t vi32 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));

template <typename T>
struct Acc {  // accumulator scalar and vector types of element type T
  using S = float;
  using V = vf;
};
template <>
struct Acc<double> {
  using S = double;
  using V = vd;
};

template <typename T>
constexpr int kLanes = 64 / sizeof(typename Acc<T>::S);

// -- scalar and vector loads / stores in the accumulator type ------------------------------------
inline float load1(const float* p) { return *p; }
inline double load1(const double* p) { return *p; }
inline float load1(const bf16* p) {
  uint32_t u = uint32_t(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store1(float* p, float v) { *p = v; }
inline void store1(double* p, double v) { *p = v; }
inline void store1(bf16* p, float v) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  p->bits = v != v ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vd loadv(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf loadv(const bf16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void storev(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
inline void storev(bf16* p, vf v) {
  vu32 u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vi32 nan = v != v;  // all-ones lanes where v is NaN
  u = (u & ~vu32(nan)) | (vu32(nan) & 0x7fc0u);
  vu16 h = __builtin_convertvector(u, vu16);
  std::memcpy(p, &h, sizeof h);
}

// -- gather_sum -----------------------------------------------------------------------------------
// U vectors of channels [c0, c0 + U*lanes) of one output row.
template <typename T, int U>
inline void gather_sum_vec(const T* x, i64 n, const i64* idx, i64 kk, const T* w, const T* bias, i64 C,
                           i64 c0, T* out) {
  using V = typename Acc<T>::V;
  constexpr int L = kLanes<T>;
  V acc[U];
  for (int u = 0; u < U; ++u) acc[u] = bias ? loadv(bias + c0 + u * L) : V{};
  for (i64 j = 0; j < kk; ++j) {
    const i64 r = idx[j];
    if (r >= n) continue;
    const T* xr = x + r * C + c0;
    const T* wj = w + j * C + c0;
    for (int u = 0; u < U; ++u) acc[u] += loadv(xr + u * L) * loadv(wj + u * L);
  }
  for (int u = 0; u < U; ++u) storev(out + c0 + u * L, acc[u]);
}

template <typename T>
inline void gather_sum_scalar(const T* x, i64 n, const i64* idx, i64 kk, const T* w, const T* bias, i64 C,
                              i64 c, T* out) {
  typename Acc<T>::S acc = bias ? load1(bias + c) : 0;
  for (i64 j = 0; j < kk; ++j) {
    const i64 r = idx[j];
    if (r < n) acc += load1(x + r * C + c) * load1(w + j * C + c);
  }
  store1(out + c, acc);
}

// R output rows at once for U vectors of channels: each weight vector is loaded once for R
// multiply-adds (weights are shared by all outputs, neighbours are not).
template <typename T, int U, int R>
inline void gather_sum_rows(const T* x, i64 n, const i64* idx, i64 kk, const T* w, const T* bias, i64 C,
                            i64 c0, T* out) {
  using V = typename Acc<T>::V;
  constexpr int L = kLanes<T>;
  V acc[R][U];
  for (int q = 0; q < R; ++q)
    for (int u = 0; u < U; ++u) acc[q][u] = bias ? loadv(bias + c0 + u * L) : V{};
  for (i64 j = 0; j < kk; ++j) {
    V wv[U];
    for (int u = 0; u < U; ++u) wv[u] = loadv(w + j * C + c0 + u * L);
    for (int q = 0; q < R; ++q) {
      const i64 r = idx[q * kk + j];
      if (r >= n) continue;
      for (int u = 0; u < U; ++u) acc[q][u] += loadv(x + r * C + c0 + u * L) * wv[u];
    }
  }
  for (int q = 0; q < R; ++q)
    for (int u = 0; u < U; ++u) storev(out + q * C + c0 + u * L, acc[q][u]);
}

#if defined(__AVX512BF16__)
// -- bf16 on CPUs with AVX512-BF16 -----------------------------------------------------------------
// vdpbf16ps adds two bf16 products to each float lane: a pair of terms of a sum (two kernel offsets
// of one output, or two rows of one weight gradient) per channel and instruction, where the float
// path converts each bf16 vector and does one product per lane. The pairs are made by interleaving
// two 32-channel bf16 vectors word by word (unpacklo / unpackhi, which work within 128-bit lanes),
// so `lo` accumulates channels 8L..8L+3 and `hi` channels 8L+4..8L+7 of each lane L; `channels`
// puts them back in order. Products of bf16 values are exact in float; like the instruction,
// denormal inputs count as zero.
constexpr bool kPairs = true;

struct Pairs {  // (a[c], b[c]) of two 32-channel bf16 rows, lane order (see above)
  __m512bh lo, hi;
};

// Rows ra, rb of `base` [rows, C] at channels c0..c0+31; a row >= `rows` (absent) reads as zeros.
inline Pairs pairs_of(const bf16* base, i64 rows, i64 ra, i64 rb, i64 C, i64 c0) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i a = ra < rows ? _mm512_loadu_si512(base + ra * C + c0) : zero;
  const __m512i b = rb < rows ? _mm512_loadu_si512(base + rb * C + c0) : zero;
  return {(__m512bh)_mm512_unpacklo_epi16(a, b), (__m512bh)_mm512_unpackhi_epi16(a, b)};
}

// lo += x.lo . y.lo, hi += x.hi . y.hi: two products per float lane
inline void dot_pairs(__m512* lo, __m512* hi, Pairs x, Pairs y) {
  *lo = _mm512_dpbf16_ps(*lo, x.lo, y.lo);
  *hi = _mm512_dpbf16_ps(*hi, x.hi, y.hi);
}

// (channels c0..c0+15, c0+16..c0+31) as float vectors, from the lo / hi accumulators
inline void channels(__m512 lo, __m512 hi, vf* first, vf* second) {
  const __m512i a = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i b = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  __m512 f = _mm512_permutex2var_ps(lo, a, hi), s = _mm512_permutex2var_ps(lo, b, hi);
  std::memcpy(first, &f, sizeof f);
  std::memcpy(second, &s, sizeof s);
}

// gather_sum_rows for bf16, 32 channels: offsets j, j+1 paired
template <int R>
inline void gather_sum_pairs(const bf16* x, i64 n, const i64* idx, i64 kk, const bf16* w, const bf16* bias,
                             i64 C, i64 c0, bf16* out) {
  __m512 lo[R], hi[R];
  for (int q = 0; q < R; ++q) lo[q] = hi[q] = _mm512_setzero_ps();
  for (i64 j = 0; j < kk; j += 2) {
    const bool two = j + 1 < kk;
    const Pairs wp = pairs_of(w, kk, j, j + 1, C, c0);
    for (int q = 0; q < R; ++q) {
      const i64 ra = idx[q * kk + j], rb = two ? idx[q * kk + j + 1] : n;
      if (ra < n || rb < n) dot_pairs(&lo[q], &hi[q], pairs_of(x, n, ra, rb, C, c0), wp);
    }
  }
  for (int q = 0; q < R; ++q) {
    vf first, second;
    channels(lo[q], hi[q], &first, &second);
    if (bias) {
      first += loadv(bias + c0);
      second += loadv(bias + c0 + 16);
    }
    storev(out + q * C + c0, first);
    storev(out + q * C + c0 + 16, second);
  }
}

// gather_wgrad_vec for bf16, 32 channels, J offsets: rows i, i+1 paired
template <int J>
inline void gather_wgrad_pairs(const bf16* x, i64 n, const i64* idx, i64 i0, i64 i1, i64 kk, i64 j0,
                               const bf16* g, i64 C, i64 c0, float* gw) {
  __m512 lo[J], hi[J];
  for (int q = 0; q < J; ++q) lo[q] = hi[q] = _mm512_setzero_ps();
  for (i64 i = i0; i < i1; i += 2) {
    const bool two = i + 1 < i1;
    const Pairs gp = pairs_of(g, i1, i, i + 1, C, c0);
    for (int q = 0; q < J; ++q) {
      const i64 ra = idx[i * kk + j0 + q], rb = two ? idx[(i + 1) * kk + j0 + q] : n;
      if (ra < n || rb < n) dot_pairs(&lo[q], &hi[q], pairs_of(x, n, ra, rb, C, c0), gp);
    }
  }
  for (int q = 0; q < J; ++q) {
    vf first, second;
    channels(lo[q], hi[q], &first, &second);
    float* dst = gw + (j0 + q) * C + c0;
    storev(dst, loadv(dst) + first);
    storev(dst + 16, loadv(dst + 16) + second);
  }
}
#else
constexpr bool kPairs = false;
template <int R>
inline void gather_sum_pairs(const bf16*, i64, const i64*, i64, const bf16*, const bf16*, i64, i64, bf16*) {}
template <int J>
inline void gather_wgrad_pairs(const bf16*, i64, const i64*, i64, i64, i64, i64, const bf16*, i64, i64, float*) {}
#endif

template <typename T>
constexpr bool kPaired = kPairs && std::is_same_v<T, bf16>;

template <typename T>
void gather_sum(const T* x, i64 n, const i64* idx, i64 m, i64 kk, const T* w, const T* bias, T* out, i64 C,
                int threads) {
  constexpr int L = kLanes<T>;
  constexpr i64 R = 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (i64 g = 0; g < (m + R - 1) / R; ++g) {
    const i64 i0 = g * R;
    if (i0 + R <= m) {
      const i64* rows = idx + i0 * kk;
      T* o = out + i0 * C;
      i64 c = 0;
      if constexpr (kPaired<T>)
        for (; c + 2 * L <= C; c += 2 * L) gather_sum_pairs<R>(x, n, rows, kk, w, bias, C, c, o);
      for (; c + 2 * L <= C; c += 2 * L) gather_sum_rows<T, 2, R>(x, n, rows, kk, w, bias, C, c, o);
      for (; c + L <= C; c += L) gather_sum_rows<T, 1, R>(x, n, rows, kk, w, bias, C, c, o);
      for (; c < C; ++c)
        for (i64 i = i0; i < i0 + R; ++i) gather_sum_scalar(x, n, idx + i * kk, kk, w, bias, C, c, out + i * C);
      continue;
    }
    for (i64 i = i0; i < m; ++i) {
      const i64* row = idx + i * kk;
      T* o = out + i * C;
      i64 c = 0;
      for (; c + 4 * L <= C; c += 4 * L) gather_sum_vec<T, 4>(x, n, row, kk, w, bias, C, c, o);
      for (; c + L <= C; c += L) gather_sum_vec<T, 1>(x, n, row, kk, w, bias, C, c, o);
      for (; c < C; ++c) gather_sum_scalar(x, n, row, kk, w, bias, C, c, o);
    }
  }
}

// -- gather_wgrad ---------------------------------------------------------------------------------
constexpr i64 kTile = 32;  // output rows whose gradient stays in L1 while every offset reads it

// J kernel offsets at once for U vectors of channels over rows [i0, i1): each gradient vector is
// loaded once for J multiply-adds, the J*U accumulators stay in registers along the rows.
template <typename T, int U, int J>
inline void gather_wgrad_vec(const T* x, i64 n, const i64* idx, i64 i0, i64 i1, i64 kk, i64 j0, const T* g,
                             i64 C, i64 c0, typename Acc<T>::S* gw) {
  using V = typename Acc<T>::V;
  constexpr int L = kLanes<T>;
  V acc[J][U];
  for (int q = 0; q < J; ++q)
    for (int u = 0; u < U; ++u) acc[q][u] = loadv(gw + (j0 + q) * C + c0 + u * L);
  for (i64 i = i0; i < i1; ++i) {
    V gv[U];
    for (int u = 0; u < U; ++u) gv[u] = loadv(g + i * C + c0 + u * L);
    for (int q = 0; q < J; ++q) {
      const i64 r = idx[i * kk + j0 + q];
      if (r >= n) continue;
      for (int u = 0; u < U; ++u) acc[q][u] += loadv(x + r * C + c0 + u * L) * gv[u];
    }
  }
  for (int q = 0; q < J; ++q)
    for (int u = 0; u < U; ++u) storev(gw + (j0 + q) * C + c0 + u * L, acc[q][u]);
}

template <typename T, int U>
inline void gather_wgrad_offsets(const T* x, i64 n, const i64* idx, i64 i0, i64 i1, i64 kk, const T* g, i64 C,
                                 i64 c0, typename Acc<T>::S* gw) {
  i64 j = 0;
  if constexpr (kPaired<T> && U == 2) {
    for (; j + 4 <= kk; j += 4) gather_wgrad_pairs<4>(x, n, idx, i0, i1, kk, j, g, C, c0, gw);
    for (; j < kk; ++j) gather_wgrad_pairs<1>(x, n, idx, i0, i1, kk, j, g, C, c0, gw);
  }
  for (; j + 4 <= kk; j += 4) gather_wgrad_vec<T, U, 4>(x, n, idx, i0, i1, kk, j, g, C, c0, gw);
  for (; j < kk; ++j) gather_wgrad_vec<T, U, 1>(x, n, idx, i0, i1, kk, j, g, C, c0, gw);
}

template <typename T>
void gather_wgrad(const T* x, i64 n, const i64* idx, i64 m, i64 kk, const T* g, typename Acc<T>::S* gw, i64 C,
                  int threads) {
  constexpr int L = kLanes<T>;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    typename Acc<T>::S* part = gw + t * kk * C;
    const i64 begin = m * t / nt, end = m * (t + 1) / nt;
    for (i64 i0 = begin; i0 < end; i0 += kTile) {
      const i64 i1 = i0 + kTile < end ? i0 + kTile : end;
      i64 c = 0;
      for (; c + 2 * L <= C; c += 2 * L) gather_wgrad_offsets<T, 2>(x, n, idx, i0, i1, kk, g, C, c, part);
      for (; c + L <= C; c += L) gather_wgrad_offsets<T, 1>(x, n, idx, i0, i1, kk, g, C, c, part);
      for (; c < C; ++c)
        for (i64 j = 0; j < kk; ++j)
          for (i64 i = i0; i < i1; ++i) {
            const i64 r = idx[i * kk + j];
            if (r < n) part[j * C + c] += load1(x + r * C + c) * load1(g + i * C + c);
          }
    }
  }
}

// -- map_wgrad ------------------------------------------------------------------------------------
// Output columns [x0, x1) of one output row read input columns x*s + kx - p, all inside the map.
inline void valid_columns(i64 kx, i64 s, i64 p, i64 W, i64 Wo, i64* x0, i64* x1) {
  i64 lo = p - kx > 0 ? (p - kx + s - 1) / s : 0;
  i64 hi = (W - 1 + p - kx) >= 0 ? (W - 1 + p - kx) / s + 1 : 0;
  *x0 = lo;
  *x1 = hi < Wo ? hi : Wo;
}

template <typename T, int U>
inline void map_wgrad_vec(const T* xin, const T* grow, i64 W, i64 Wo, i64 k, i64 s, i64 p, i64 iy, i64 ky,
                          i64 C, i64 c0, typename Acc<T>::S* gw) {
  using V = typename Acc<T>::V;
  constexpr int L = kLanes<T>;
  for (i64 kx = 0; kx < k; ++kx) {
    i64 x0, x1;
    valid_columns(kx, s, p, W, Wo, &x0, &x1);
    typename Acc<T>::S* dst = gw + (ky * k + kx) * C + c0;
    V acc[U];
    for (int u = 0; u < U; ++u) acc[u] = loadv(dst + u * L);
    for (i64 xo = x0; xo < x1; ++xo) {
      const T* xr = xin + (iy * W + xo * s + kx - p) * C + c0;
      const T* gr = grow + xo * C + c0;
      for (int u = 0; u < U; ++u) acc[u] += loadv(xr + u * L) * loadv(gr + u * L);
    }
    for (int u = 0; u < U; ++u) storev(dst + u * L, acc[u]);
  }
}

template <typename T>
void map_wgrad(const T* x, i64 B, i64 H, i64 W, const T* g, i64 Ho, i64 Wo, i64 k, i64 s, i64 p,
               typename Acc<T>::S* gw, i64 C, int threads) {
  constexpr int L = kLanes<T>;
  const i64 rows = B * Ho;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    typename Acc<T>::S* part = gw + t * k * k * C;
    for (i64 row = rows * t / nt; row < rows * (t + 1) / nt; ++row) {
      const i64 b = row / Ho, y = row % Ho;
      const T* xin = x + b * H * W * C;
      const T* grow = g + row * Wo * C;
      for (i64 ky = 0; ky < k; ++ky) {
        const i64 iy = y * s + ky - p;
        if (iy < 0 || iy >= H) continue;
        i64 c = 0;
        for (; c + 4 * L <= C; c += 4 * L) map_wgrad_vec<T, 4>(xin, grow, W, Wo, k, s, p, iy, ky, C, c, part);
        for (; c + L <= C; c += L) map_wgrad_vec<T, 1>(xin, grow, W, Wo, k, s, p, iy, ky, C, c, part);
        for (; c < C; ++c)
          for (i64 kx = 0; kx < k; ++kx) {
            i64 x0, x1;
            valid_columns(kx, s, p, W, Wo, &x0, &x1);
            for (i64 xo = x0; xo < x1; ++xo)
              part[(ky * k + kx) * C + c] +=
                  load1(xin + (iy * W + xo * s + kx - p) * C + c) * load1(grow + xo * C + c);
          }
      }
    }
  }
}

}  // namespace

// -- C ABI: one symbol per element type (f32, f64, bf16) ----------------------------------------------
#define SPARK_DW_EXPORT(SUFFIX, T)                                                                        \
  extern "C" void spark_dw_gather_sum_##SUFFIX(const void* x, i64 n, const i64* idx, i64 m, i64 kk,      \
                                               const void* w, const void* bias, void* out, i64 C,        \
                                               int threads) {                                            \
    gather_sum<T>(static_cast<const T*>(x), n, idx, m, kk, static_cast<const T*>(w),                     \
                  static_cast<const T*>(bias), static_cast<T*>(out), C, threads);                        \
  }                                                                                                       \
  extern "C" void spark_dw_gather_wgrad_##SUFFIX(const void* x, i64 n, const i64* idx, i64 m, i64 kk,    \
                                                 const void* g, void* gw, i64 C, int threads) {          \
    gather_wgrad<T>(static_cast<const T*>(x), n, idx, m, kk, static_cast<const T*>(g),                   \
                    static_cast<Acc<T>::S*>(gw), C, threads);                                            \
  }                                                                                                       \
  extern "C" void spark_dw_map_wgrad_##SUFFIX(const void* x, i64 B, i64 H, i64 W, const void* g, i64 Ho, \
                                              i64 Wo, i64 k, i64 s, i64 p, void* gw, i64 C, int threads) { \
    map_wgrad<T>(static_cast<const T*>(x), B, H, W, static_cast<const T*>(g), Ho, Wo, k, s, p,           \
                 static_cast<Acc<T>::S*>(gw), C, threads);                                               \
  }

SPARK_DW_EXPORT(f32, float)
SPARK_DW_EXPORT(f64, double)
SPARK_DW_EXPORT(bf16, bf16)
