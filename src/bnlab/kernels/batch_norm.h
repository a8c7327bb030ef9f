// bnlab's CPU batch-norm kernels: bnlab/nn/statistics.py's formulas in as few passes over memory as they allow.
//
// A tensor of N samples, C features and S positions per sample (S = L, H*W or D*H*W; 1 for (N, C))
// is stored either
//   NCS (contiguous):    x[(n * C + c) * S + s]
//   NSC (channels_last): x[(n * S + s) * C + c]
//
// Training forward = 1 pass for the moments + 1 pass writing y (ReLU'd if asked);
// backward = 1 pass for the two per-feature sums + 1 pass writing dx; eval forward = 1 pass.
//
// Two ways to walk memory, chosen by shape:
//  - per feature (NCS with runs of S >= kMinRun values): each feature's N runs, coefficients constant;
//  - periodic (NSC, or NCS with short runs): the flat data repeats a pattern of P = C (NSC) or
//    P = C * S (NCS) values, so it is cut into rows of L = a multiple of P (at least kMinRow values)
//    and every per-feature quantity is tiled to length L. Inner loops then run over L contiguous
//    values whatever C and S are, which keeps tiny layers (C = 4 channels_last, or H = W = 1) fast.
//
// Accuracy: moments are accumulated in double around a per-feature shift K (the feature's first
// value), so a large mean with a small spread loses nothing to cancellation; the mean is kept in
// double and subtracted as a pair of T (hi + lo), so x - mean is as exact as T allows.
//
// Semantics: statistics.py's, operation for operation where it decides what a non-finite or huge
// value does (tests/test_differential.py compares the two paths and torch.nn):
//  - deviations u = x - K are taken in T, K being 0 where the feature's first value is not finite;
//  - mean = K + mean(u): a NaN, or both infinities, make it NaN, one infinity makes it that
//    infinity (torch.nn's mean); the biased variance is then NaN, and NaN stays NaN (never clamped);
//  - the variance is rounded to T, so one beyond T's range is inf (invstd 0), as the tensor ops
//    and torch.nn give it;
//  - y = (x - hi) * a + e with a = T(invstd) * weight and e = bias - lo * a, in T;
//  - under a fused ReLU the gradient is dropped where y <= 0, so a NaN y passes it (torch.relu's
//    backward, threshold_backward).
//
// Plain C++ on raw pointers, no PyTorch types: operators.cpp wraps these in PyTorch operators.
// Threads: OpenMP, as many as the caller passes (operators.cpp passes at::get_num_threads()); the
// library links libgomp.so.1, which resolves to the copy PyTorch has already loaded.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bnlab::kernels {

#ifdef _OPENMP
inline int thread_id() { return omp_get_thread_num(); }
#else
inline int thread_id() { return 0; }
#endif

constexpr int64_t kGrain = 32768;     // fewer elements per thread than this: not worth a thread
constexpr int64_t kMinRun = 64;       // NCS runs at least this long are walked per feature
constexpr int64_t kMaxPeriod = 4096;  // NCS patterns longer than this are walked per feature
constexpr int64_t kMinRow = 512;      // periodic rows are at least this long

inline int threads_for(int64_t elements, int requested) {
  const int64_t useful = elements / kGrain;
  if (requested < 1 || useful < 2) return 1;
  return useful < requested ? static_cast<int>(useful) : requested;
}

struct Shape {
  int64_t N, C, S;
  bool channels_last;
  int64_t numel() const { return N * C * S; }
  bool periodic() const { return channels_last || (S < kMinRun && C * S <= kMaxPeriod); }
};

// How a periodic walk cuts the data: `count` rows of L values (L a multiple of the period and at
// most the whole tensor; the last row may be shorter), and the feature of each position in a row.
struct Rows {
  int64_t L, count, total;
  std::vector<int64_t> feature;
  explicit Rows(const Shape& sh) : total(sh.numel()) {
    const int64_t period = sh.channels_last ? sh.C : sh.C * sh.S;
    L = period * ((kMinRow + period - 1) / period);
    if (L > total) L = total;  // total is a multiple of the period
    count = (total + L - 1) / L;
    feature.resize(L);
    for (int64_t j = 0, c = 0, s = 0; j < L; j++) {  // counters, not a division per position
      feature[j] = c;
      if (sh.channels_last || ++s == sh.S) {
        s = 0;
        c = c + 1 == sh.C ? 0 : c + 1;
      }
    }
  }
  int64_t length(int64_t r) const { return total - r * L < L ? total - r * L : L; }

  // Per-feature values tiled along a row: out[j] = value[feature[j]].
  template <typename V>
  std::vector<V> tile(const std::vector<V>& value) const {
    std::vector<V> out(L);
    for (int64_t j = 0; j < L; j++) out[j] = value[feature[j]];
    return out;
  }
};

// mean -> (hi, lo) with hi + lo = mean to double precision, both of type T.
template <typename T>
void split_mean(const double* mean, int64_t C, std::vector<T>& hi, std::vector<T>& lo) {
  hi.resize(C);
  lo.resize(C);
  for (int64_t c = 0; c < C; c++) {
    hi[c] = static_cast<T>(mean[c]);
    lo[c] = static_cast<T>(mean[c] - static_cast<double>(hi[c]));
  }
}

// ---- inner loops over one contiguous block; coefficients tiled (one per position) or constant ----

template <typename T, bool kTiled, bool kRelu>
inline void forward_block(const T* __restrict__ x, T* __restrict__ out, int64_t len, const T* __restrict__ h,
                          const T* __restrict__ a, const T* __restrict__ e) {
#pragma omp simd
  for (int64_t j = 0; j < len; j++) {
    const int64_t k = kTiled ? j : 0;
    const T v = (x[j] - h[k]) * a[k] + e[k];
    out[j] = (kRelu && v < T(0)) ? T(0) : v;  // NaN stays NaN, as torch.relu
  }
}

template <typename T, bool kTiled, bool kMask>
inline void dx_block(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ out,
                     int64_t len, const T* __restrict__ h, const T* __restrict__ l, const T* __restrict__ a,
                     const T* __restrict__ b, const T* __restrict__ d) {
#pragma omp simd
  for (int64_t j = 0; j < len; j++) {
    const int64_t k = kTiled ? j : 0;
    T dz = dy[j];
    if constexpr (kMask) dz = y[j] <= T(0) ? T(0) : dz;  // a blend, not a branch
    out[j] = a[k] * dz - b[k] * ((x[j] - h[k]) - l[k]) - d[k];
  }
}

// Per-position sums along a periodic row: s1[j] += u, s2[j] += u * v, where
//   moments:  u = x - K (h = K; in T, as the tensor ops take it), v = u;      backward: u = dz, v = (x - hi) - lo.
template <typename T, bool kMoments, bool kMask>
inline void sums_row(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, int64_t len,
                     const T* __restrict__ h, const T* __restrict__ l, double* __restrict__ s1,
                     double* __restrict__ s2) {
#pragma omp simd
  for (int64_t j = 0; j < len; j++) {
    if constexpr (kMoments) {
      const double u = static_cast<double>(x[j] - h[j]);
      s1[j] += u;
      s2[j] += u * u;
    } else {
      double u = static_cast<double>(dy[j]);
      if constexpr (kMask) u = y[j] <= T(0) ? 0.0 : u;  // a blend, not a branch
      s1[j] += u;
      s2[j] += u * static_cast<double>((x[j] - h[j]) - l[j]);
    }
  }
}

// The same, reduced to two scalars over one run of a single feature.
template <typename T, bool kMoments, bool kMask>
inline void sums_run(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, int64_t len, T h,
                     T l, double& s1, double& s2) {
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < len; j++) {
    if constexpr (kMoments) {
      const double u = static_cast<double>(x[j] - h);
      a += u;
      b += u * u;
    } else {
      double u = static_cast<double>(dy[j]);
      if constexpr (kMask) u = y[j] <= T(0) ? 0.0 : u;  // a blend, not a branch
      a += u;
      b += u * static_cast<double>((x[j] - h) - l);
    }
  }
  s1 += a;
  s2 += b;
}

// ---- whole-tensor passes ----

// Per-feature totals of the two sums above: out1[c], out2[c] (moments: hi = the shift K, lo unused).
template <typename T, bool kMoments, bool kMask>
void feature_sums(const T* x, const T* dy, const T* y, const Shape& sh, int threads, const std::vector<T>& hi,
                  const std::vector<T>& lo, double* out1, double* out2) {
  const int64_t C = sh.C, S = sh.S;
  if (!sh.periodic()) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t n = 0; n < sh.N; n++) {
        const int64_t i = (n * C + c) * S;
        sums_run<T, kMoments, kMask>(x + i, dy + i, y + i, S, hi[c], lo[c], s1, s2);
      }
      out1[c] = s1;
      out2[c] = s2;
    }
    return;
  }
  const Rows rows(sh);
  const int64_t L = rows.L;
  // moments need the tiled shift; the backward the tiled mean
  const std::vector<T> th = rows.tile(hi);
  const std::vector<T> tl = kMoments ? std::vector<T>() : rows.tile(lo);
  std::vector<double> partial(2 * L * threads, 0.0);
#pragma omp parallel num_threads(threads)
  {
    double* s1 = partial.data() + 2 * L * thread_id();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows.count; r++) {
      const int64_t i = r * L;
      sums_row<T, kMoments, kMask>(x + i, dy + i, y + i, rows.length(r), th.data(), tl.data(), s1, s1 + L);
    }
  }
  for (int64_t c = 0; c < C; c++) out1[c] = out2[c] = 0.0;
  for (int t = 0; t < threads; t++)
    for (int64_t j = 0; j < L; j++) {
      out1[rows.feature[j]] += partial[2 * L * t + j];
      out2[rows.feature[j]] += partial[2 * L * t + L + j];
    }
}

// Per-feature mean and biased variance, accumulated around shift K = the feature's first value (0 if it is
// not finite: an inf as K would make every deviation inf or NaN, and the mean NaN instead of inf).
template <typename T>
void moments(const T* x, const Shape& sh, int threads, double* mean, double* var) {
  const int64_t C = sh.C;
  std::vector<T> shift(C);
  std::vector<double> sum(C), sumsq(C);
  for (int64_t c = 0; c < C; c++) {
    const T first = x[sh.channels_last ? c : c * sh.S];
    shift[c] = std::isfinite(first) ? first : T(0);
  }
  feature_sums<T, true, false>(x, x, x, sh, threads, shift, shift, sum.data(), sumsq.data());
  const double M = static_cast<double>(sh.N * sh.S);
  for (int64_t c = 0; c < C; c++) {
    const double m = sum[c] / M;
    mean[c] = static_cast<double>(shift[c]) + m;
    // finite deviations whose squares overflow (float64 input): the variance does too, rather than inf - inf
    const double v = std::isinf(sumsq[c]) && std::isfinite(sum[c]) ? sumsq[c] : sumsq[c] / M - m * m;
    // rounding can leave v a little below 0: clamped, but a NaN stays NaN (std::fmax(NaN, 0) would be 0)
    var[c] = static_cast<double>(static_cast<T>(v < 0.0 ? 0.0 : v));
  }
}

// One elementwise pass (forward_block if kForward, with d = e and lo, b unused; else dx_block; kFlag = ReLU /
// mask), either walk.
template <typename T, bool kForward, bool kFlag>
void elementwise(const T* x, const T* dy, const T* y, T* out, const Shape& sh, int threads, const std::vector<T>& hi,
                 const std::vector<T>& lo, const std::vector<T>& a, const std::vector<T>& b,
                 const std::vector<T>& d) {
  if (sh.periodic()) {
    const Rows rows(sh);
    const std::vector<T> th = rows.tile(hi), ta = rows.tile(a), td = rows.tile(d);
    const std::vector<T> tl = kForward ? std::vector<T>() : rows.tile(lo);
    const std::vector<T> tb = kForward ? std::vector<T>() : rows.tile(b);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows.count; r++) {
      const int64_t i = r * rows.L, len = rows.length(r);
      if constexpr (kForward)
        forward_block<T, true, kFlag>(x + i, out + i, len, th.data(), ta.data(), td.data());
      else
        dx_block<T, true, kFlag>(x + i, dy + i, y + i, out + i, len, th.data(), tl.data(), ta.data(), tb.data(),
                                 td.data());
    }
    return;
  }
  const int64_t C = sh.C, S = sh.S;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t nc = 0; nc < sh.N * C; nc++) {
    const int64_t c = nc % C, i = nc * S;
    if constexpr (kForward)
      forward_block<T, false, kFlag>(x + i, out + i, S, &hi[c], &a[c], &d[c]);
    else
      dx_block<T, false, kFlag>(x + i, dy + i, y + i, out + i, S, &hi[c], &lo[c], &a[c], &b[c], &d[c]);
  }
}

// y = (x - hi) * a + e, a = T(invstd) * weight, e = bias - lo * a: statistics.normalize's operations, in T.
template <typename T>
void normalize(const T* x, T* y, const Shape& sh, int threads, const double* mean, const double* invstd,
               const T* weight, const T* bias, bool relu) {
  std::vector<T> hi, lo, a(sh.C), e(sh.C), unused;
  split_mean(mean, sh.C, hi, lo);
  for (int64_t c = 0; c < sh.C; c++) {
    a[c] = weight ? static_cast<T>(invstd[c]) * weight[c] : static_cast<T>(invstd[c]);
    e[c] = (bias ? bias[c] : T(0)) - lo[c] * a[c];
  }
  threads = threads_for(sh.numel(), threads);
  if (relu)
    elementwise<T, true, true>(x, x, x, y, sh, threads, hi, unused, a, unused, e);
  else
    elementwise<T, true, false>(x, x, x, y, sh, threads, hi, unused, a, unused, e);
}

// sum_dz = sum(dz), sum_dz_xhat = sum(dz * xhat), dz = dy but 0 where y <= 0 when y is given.
template <typename T>
void backward_sums(const T* x, const T* dy, const T* y, const Shape& sh, int threads, const double* mean,
                   const double* invstd, double* sum_dz, double* sum_dz_xhat) {
  std::vector<T> hi, lo;
  split_mean(mean, sh.C, hi, lo);
  threads = threads_for(sh.numel(), threads);
  if (y)
    feature_sums<T, false, true>(x, dy, y, sh, threads, hi, lo, sum_dz, sum_dz_xhat);
  else
    feature_sums<T, false, false>(x, dy, dy, sh, threads, hi, lo, sum_dz, sum_dz_xhat);
  for (int64_t c = 0; c < sh.C; c++) sum_dz_xhat[c] *= invstd[c];
}

// dx = k * (dz - sum_dz / M - xhat * sum_dz_xhat / M), k = invstd * weight.
template <typename T>
void backward_dx(const T* x, const T* dy, const T* y, T* dx, const Shape& sh, int threads, const double* mean,
                 const double* invstd, const T* weight, const double* sum_dz, const double* sum_dz_xhat,
                 double count) {
  std::vector<T> hi, lo, a(sh.C), b(sh.C), d(sh.C);
  split_mean(mean, sh.C, hi, lo);
  for (int64_t c = 0; c < sh.C; c++) {
    const double k = invstd[c] * (weight ? static_cast<double>(weight[c]) : 1.0);
    a[c] = static_cast<T>(k);
    b[c] = static_cast<T>(k * invstd[c] * sum_dz_xhat[c] / count);
    d[c] = static_cast<T>(k * sum_dz[c] / count);
  }
  threads = threads_for(sh.numel(), threads);
  if (y)
    elementwise<T, false, true>(x, dy, y, dx, sh, threads, hi, lo, a, b, d);
  else
    elementwise<T, false, false>(x, dy, dy, dx, sh, threads, hi, lo, a, b, d);
}

// ---- entry points (operators.cpp); stats = [mean (C), biased var (C), invstd (C)] in double ----

// Batch statistics into stats, then y as normalize with them.
template <typename T>
void forward_train(const T* x, const T* weight, const T* bias, double* stats, T* y, const Shape& sh, int threads,
                   double eps, bool relu) {
  double *mean = stats, *var = stats + sh.C, *invstd = stats + 2 * sh.C;
  moments(x, sh, threads_for(sh.numel(), threads), mean, var);
  for (int64_t c = 0; c < sh.C; c++) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  normalize(x, y, sh, threads, mean, invstd, weight, bias, relu);
}

// dz = dy (0 where y <= 0 when y is given); dweight = sum(dz * xhat), dbias = sum(dz) in double (the caller
// rounds them to the parameters' dtype), dx = invstd * weight * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)
// unless dx is null.
template <typename T>
void backward(const T* x, const T* weight, const double* stats, const T* dy, const T* y, T* dx, double* dweight,
              double* dbias, const Shape& sh, int threads) {
  const double *mean = stats, *invstd = stats + 2 * sh.C;
  backward_sums(x, dy, y, sh, threads, mean, invstd, dbias, dweight);
  if (dx)
    backward_dx(x, dy, y, dx, sh, threads, mean, invstd, weight, dbias, dweight, static_cast<double>(sh.N * sh.S));
}

}  // namespace bnlab::kernels
