// Fused elementwise part of an LSTM cell, forward and backward, for CPU tensors.
//
// The gate pre-activations come from one matrix product done by torch; this file does the rest
// in one pass per row: the four nonlinearities, the cell update and the hidden output. PyTorch's
// eager CPU sigmoid/tanh run at about 1 and 0.25 G elements/s here, and a cell needs ~10 of them
// per unit, so fusing (with a vectorizable exp) is most of the speed-up.
//
// Layout: gates (m, 4H) in the order [i, f, g, o]; states (m, H); all contiguous.
//
// Below those, `step_`: the whole in-place inference step of the LSTM optimizer (preprocessing,
// gate products, cells, read-out) in one call, for float32 (see the comment there); and
// `train_forward` / `train_backward`: the same step out of place, differentiable, for
// meta-training.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

// tanh as a rational function (the minimax approximation Eigen uses for float): only multiplies,
// adds and one division, so it vectorizes well; max error ~1e-7 for float32. Doubles use std::.
static inline float tanh_(float x) {
  const float clamp = 7.99881172180175781f;  // tanh(x) rounds to +-1 in float beyond this
  x = x < -clamp ? -clamp : (x > clamp ? clamp : x);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}
static inline double tanh_(double x) { return std::tanh(x); }

template <typename T>
static inline T sigm(T x) { return T(0.5) * tanh_(T(0.5) * x) + T(0.5); }

// One loop over the 4H gates of a row, branch-free so that it vectorizes: with
// sigmoid(z) = 0.5 tanh(0.5 z) + 0.5, every gate is mul[k] * tanh(scale[k] * z) + add[k]
// (g: 1, 1, 0; i, f, o: 0.5, 0.5, 0.5). Twice as fast as one loop per gate kind.
template <typename T>
static void fwd_impl(const T* gates, const T* c_prev, T* h, T* c, T* act, T* tc,
                     int64_t m, int64_t H) {
  std::vector<T> coef(3 * 4 * H);
  T* scale = coef.data();
  T* mul = scale + 4 * H;
  T* add = mul + 4 * H;
  for (int64_t k = 0; k < 4 * H; ++k) {
    const bool g = k >= 2 * H && k < 3 * H;
    scale[k] = mul[k] = g ? T(1) : T(0.5);
    add[k] = g ? T(0) : T(0.5);
  }
  at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* z = gates + r * 4 * H;
      T* a = act + r * 4 * H;
#pragma omp simd
      for (int64_t k = 0; k < 4 * H; ++k) a[k] = mul[k] * tanh_(scale[k] * z[k]) + add[k];
      const T* cp = c_prev + r * H;
      T* cr = c + r * H;
      T* hr = h + r * H;
      T* tr = tc + r * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        T cn = a[H + k] * cp[k] + a[k] * a[2 * H + k];
        T t = tanh_(cn);
        cr[k] = cn;
        tr[k] = t;
        hr[k] = a[3 * H + k] * t;
      }
    }
  });
}

std::vector<torch::Tensor> lstm_cell_forward(torch::Tensor gates, torch::Tensor c_prev) {
  TORCH_CHECK(gates.is_contiguous() && c_prev.is_contiguous(), "contiguous inputs expected");
  const int64_t m = gates.size(0), H = c_prev.size(1);
  TORCH_CHECK(gates.size(1) == 4 * H && c_prev.size(0) == m, "shape mismatch");
  auto h = torch::empty_like(c_prev), c = torch::empty_like(c_prev);
  auto act = torch::empty_like(gates), tc = torch::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell_forward", [&] {
    fwd_impl<scalar_t>(gates.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
                       h.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
                       tc.data_ptr<scalar_t>(), m, H);
  });
  return {h, c, act, tc};
}

// In-place variant for inference: overwrites gates with activations, c with the new cell state,
// h with the new hidden state.
void lstm_cell_forward_(torch::Tensor gates, torch::Tensor c, torch::Tensor h) {
  TORCH_CHECK(gates.is_contiguous() && c.is_contiguous() && h.is_contiguous(),
              "contiguous inputs expected");
  const int64_t m = gates.size(0), H = c.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell_forward_", [&] {
    scalar_t* z = gates.data_ptr<scalar_t>();
    scalar_t* cc = c.data_ptr<scalar_t>();
    scalar_t* hh = h.data_ptr<scalar_t>();
    at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* a = z + r * 4 * H;
        for (int64_t k = 0; k < 2 * H; ++k) a[k] = sigm(a[k]);
        for (int64_t k = 2 * H; k < 3 * H; ++k) a[k] = tanh_(a[k]);
        for (int64_t k = 3 * H; k < 4 * H; ++k) a[k] = sigm(a[k]);
        scalar_t* cr = cc + r * H;
        scalar_t* hr = hh + r * H;
        for (int64_t k = 0; k < H; ++k) {
          scalar_t cn = a[H + k] * cr[k] + a[k] * a[2 * H + k];
          cr[k] = cn;
          hr[k] = a[3 * H + k] * tanh_(cn);
        }
      }
    });
  });
}

std::vector<torch::Tensor> lstm_cell_backward(torch::Tensor dh, torch::Tensor dc,
                                              torch::Tensor act, torch::Tensor c_prev,
                                              torch::Tensor tc) {
  dh = dh.contiguous();
  dc = dc.contiguous();
  const int64_t m = act.size(0), H = c_prev.size(1);
  auto dgates = torch::empty_like(act), dc_prev = torch::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "lstm_cell_backward", [&] {
    const scalar_t* pdh = dh.data_ptr<scalar_t>();
    const scalar_t* pdc = dc.data_ptr<scalar_t>();
    const scalar_t* pa = act.data_ptr<scalar_t>();
    const scalar_t* pcp = c_prev.data_ptr<scalar_t>();
    const scalar_t* ptc = tc.data_ptr<scalar_t>();
    scalar_t* pdg = dgates.data_ptr<scalar_t>();
    scalar_t* pdcp = dc_prev.data_ptr<scalar_t>();
    at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* a = pa + r * 4 * H;
        scalar_t* g = pdg + r * 4 * H;
        for (int64_t k = 0; k < H; ++k) {
          const int64_t j = r * H + k;
          scalar_t i = a[k], f = a[H + k], gg = a[2 * H + k], o = a[3 * H + k];
          scalar_t t = ptc[j];
          scalar_t dct = pdc[j] + pdh[j] * o * (scalar_t(1) - t * t);
          g[k] = dct * gg * i * (scalar_t(1) - i);
          g[H + k] = dct * pcp[j] * f * (scalar_t(1) - f);
          g[2 * H + k] = dct * i * (scalar_t(1) - gg * gg);
          g[3 * H + k] = pdh[j] * t * o * (scalar_t(1) - o);
          pdcp[j] = dct * f;
        }
      }
    });
  });
  return {dgates, dc_prev};
}

// ------------------------------------------------------------------------------------------
// The whole in-place inference step of the coordinatewise LSTM optimizer, fused (float32).
//
// Per block of `block` coordinates (rows), on one thread, with per-thread scratch that stays in
// L1/L2: preprocessing (log/sign) -> per layer, the gate products and the cell update in one
// register-blocked kernel -> read-out. Blocks are handed out to the threads dynamically (one
// parallel region per call), so a thread that the OS delays does not hold up the others.
//
// Gate kernel. The layer's weights are packed so that 8 consecutive columns hold, for 4
// consecutive units u..u+3, the pre-activations [i, f] and the next 8 hold [g, o] ("quads").
// For 6 rows x 1 quad (2 x 8 columns) the 12 accumulators stay in registers over the whole
// reduction ([x, h_prev] @ W: each weight vector loaded once per 6 rows); the epilogue then has
// all four gates of those units and finishes the cell there: nonlinearities, c update, h.
// The sigmoid gates (i, f, o) go through the same tanh as g: their packed weights are pre-scaled
// by 0.5 (exact in binary floating point) and sigmoid(z) = 0.5 * tanh(0.5 z) + 0.5.
//
// The hidden/cell states may be float32 (updated in place) or bfloat16 (each block is upcast into
// float32 scratch, computed exactly like float32 states holding the same values, and rounded back
// to nearest-even). Per-row results do not depend on the blocking or the number of threads.

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4), may_alias));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }

// tanh_ above, on 8 lanes (same coefficients, same operation order).
inline v8 tanh8(v8 x) {
  const float clamp = 7.99881172180175781f;
  x = x < -clamp ? -clamp : x;
  x = x > clamp ? clamp : x;
  const v8 x2 = x * x;
  v8 p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  v8 q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

// [lo half of a, lo half of b] and [hi half of a, hi half of b]; 4 floats from each of two
// addresses; and the reverse.
#if defined(__AVX__)
inline v8 lo_lo(v8 a, v8 b) { return (v8)_mm256_permute2f128_ps((__m256)a, (__m256)b, 0x20); }
inline v8 hi_hi(v8 a, v8 b) { return (v8)_mm256_permute2f128_ps((__m256)a, (__m256)b, 0x31); }
inline v8 load4x2(const float* lo, const float* hi) {
  return (v8)_mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo)), _mm_loadu_ps(hi), 1);
}
inline void store4x2(float* lo, float* hi, v8 v) {
  _mm_storeu_ps(lo, _mm256_castps256_ps128((__m256)v));
  _mm_storeu_ps(hi, _mm256_extractf128_ps((__m256)v, 1));
}
#else
inline v8 lo_lo(v8 a, v8 b) { return v8{a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]}; }
inline v8 hi_hi(v8 a, v8 b) { return v8{a[4], a[5], a[6], a[7], b[4], b[5], b[6], b[7]}; }
inline v8 load4x2(const float* lo, const float* hi) {
  return v8{lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
}
inline void store4x2(float* lo, float* hi, v8 v) {
  for (int j = 0; j < 4; ++j) {
    lo[j] = v[j];
    hi[j] = v[4 + j];
  }
}
#endif

constexpr int kRows = 6;  // rows per gate kernel call

// One operand of the gate product: rows of `a` (leading dimension lda) times w (K, 4H).
struct Seg {
  const float* a;
  int64_t lda;
  int64_t K;
  const float* w;
};

// Rows `rows[0..5]` (indices into the operands), quad q: gates from the packed weights (columns
// 16q .. 16q + 15) and bias, then the cell update: c[r] (4 floats at unit 4q, in place) and the
// new hidden state h_out[r] (4 floats at unit 4q). With `act` (meta-training), the activations
// [i, f, g, o] of row r are also stored in act[r] (4H floats, one gate kind after the other).
__attribute__((always_inline)) inline void quad_kernel(const Seg* segs, int nseg,
                                                       const float* bias, int64_t N, int64_t q,
                                                       const int64_t* rows, float* const* c,
                                                       float* const* h_out, float* const* act) {
  const int64_t col = 16 * q;
  v8 acc[kRows][2];
  const v8 b0 = load8(bias + col), b1 = load8(bias + col + 8);
  for (int r = 0; r < kRows; ++r) {
    acc[r][0] = b0;
    acc[r][1] = b1;
  }
  for (int s = 0; s < nseg; ++s) {
    const float* a[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = segs[s].a + rows[r] * segs[s].lda;
    const float* w = segs[s].w + col;
    const int64_t K = segs[s].K;
    for (int64_t k = 0; k < K; ++k) {
      const v8 w0 = load8(w + k * N), w1 = load8(w + k * N + 8);
      for (int r = 0; r < kRows; ++r) {
        const float x = a[r][k];
        acc[r][0] += x * w0;
        acc[r][1] += x * w1;
      }
    }
  }
  // acc[r][0] = [i, f], acc[r][1] = [g, o] (pre-scaled); gates of rows r, r + 1 side by side.
  const v8 g_scale = {1.0f, 1.0f, 1.0f, 1.0f, 0.5f, 0.5f, 0.5f, 0.5f};
  const v8 g_shift = {0.0f, 0.0f, 0.0f, 0.0f, 0.5f, 0.5f, 0.5f, 0.5f};
  v8 cn[kRows / 2], og[kRows / 2];
  for (int r = 0; r < kRows; r += 2) {
    const v8 if0 = tanh8(acc[r][0]) * 0.5f + 0.5f, if1 = tanh8(acc[r + 1][0]) * 0.5f + 0.5f;
    const v8 go0 = tanh8(acc[r][1]) * g_scale + g_shift;
    const v8 go1 = tanh8(acc[r + 1][1]) * g_scale + g_shift;
    const v8 i = lo_lo(if0, if1), f = hi_hi(if0, if1), g = lo_lo(go0, go1), o = hi_hi(go0, go1);
    if (act) {
      const int64_t H = N / 4;
      float* a0 = act[r] + 4 * q;
      float* a1 = act[r + 1] + 4 * q;
      store4x2(a0, a1, i);
      store4x2(a0 + H, a1 + H, f);
      store4x2(a0 + 2 * H, a1 + 2 * H, g);
      store4x2(a0 + 3 * H, a1 + 3 * H, o);
    }
    float* c0 = c[r] + 4 * q;
    float* c1 = c[r + 1] + 4 * q;
    cn[r / 2] = f * load4x2(c0, c1) + i * g;
    store4x2(c0, c1, cn[r / 2]);
    og[r / 2] = o;
  }
  // h = o tanh(c) last, for all rows at once: the three tanh chains are independent
  for (int r = 0; r < kRows; r += 2) {
    store4x2(h_out[r] + 4 * q, h_out[r + 1] + 4 * q, og[r / 2] * tanh8(cn[r / 2]));
  }
}

#define LO_NOINLINE __attribute__((noinline))  // separate symbols in profiles; per-block calls

// One LSTM layer on m rows: gates from the segments ([x, h_prev]), c (m, H) updated in place,
// h (m, H) overwritten with the new hidden state once the rows no longer need the old one; with
// `act`, the gate activations (m, 4H) too. `dummy` holds 6 H floats of scratch (rows past m
// write there).
LO_NOINLINE void lstm_layer(int64_t m, int64_t H, const Seg* segs, int nseg, const float* bias,
                            float* c, float* h, float* dummy, float* act = nullptr) {
  const int64_t N = 4 * H, nq = H / 4;
  float* dummy_c = dummy;
  float* dummy_h = dummy + H;
  float* dummy_a = dummy + 2 * H;
  float hbuf[kRows * 64];  // new hidden states of the current rows (H <= 64; else on the heap)
  std::vector<float> hheap(H > 64 ? kRows * H : 0);
  float* hb = H > 64 ? hheap.data() : hbuf;
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    const int64_t live = std::min<int64_t>(kRows, m - r0);
    int64_t rows[kRows];
    float* cp[kRows];
    float* hp[kRows];
    float* ap[kRows];
    for (int r = 0; r < kRows; ++r) {
      const bool ok = r < live;
      rows[r] = ok ? r0 + r : m - 1;
      cp[r] = ok ? c + (r0 + r) * H : dummy_c;
      hp[r] = ok ? hb + r * H : dummy_h;
      ap[r] = act == nullptr ? nullptr : (ok ? act + (r0 + r) * N : dummy_a);
    }
    float* const* aps = act == nullptr ? nullptr : ap;
    for (int64_t q = 0; q < nq; ++q) quad_kernel(segs, nseg, bias, N, q, rows, cp, hp, aps);
    std::memcpy(h + r0 * H, hb, live * H * sizeof(float));
  }
}

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, like c10::BFloat16 (NaN -> the canonical quiet NaN).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct StepArgs {
  int64_t n, H, L, n_in;
  const float* grad;
  float* update;
  std::vector<float*> h32, c32;     // float32 states (or empty)
  std::vector<uint16_t*> h16, c16;  // bfloat16 states (or empty)
  bool bf16;
  const float* packed;  // per layer: wx (n_in or H, 4H), wh (H, 4H), b (4H), quad order
  std::vector<int64_t> wx_off, wh_off, b_off;
  const float* out_w;
  float out_b;
  float p, thr, exp_p;  // log/sign preprocessing (n_in == 1: the raw gradient)
  float out_scale;
  const float* x = nullptr;  // given network inputs (n, n_in) instead of grad + preprocessing
  bool readout = true;       // false: no read-out (the caller reads the top layer's h)
};

// Natural log on 8 lanes, x > 0 and finite (Cephes' logf: |error| ~ 1 ulp), subnormals included.
// Written out rather than left to the compiler so that every lane of every block runs the same
// code (an auto-vectorized loop would mix vector and scalar libm versions, whose last bits
// differ, making results depend on the blocking).
inline v8 log8(v8 x) {
  const v8i tiny = x < 1.17549435e-38f;  // subnormal: scale into the normal range first
  x = tiny ? x * 8388608.0f : x;
  v8 e = tiny ? v8{} - 23.0f : v8{};
  const v8i bits = reinterpret_cast<v8i&>(x);
  e += __builtin_convertvector(((bits >> 23) & 0xff) - 126, v8);
  const v8i mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  v8 m = reinterpret_cast<const v8&>(mbits);
  const v8i small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const v8 z = m * m;
  v8 y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + e * 0.693359375f;
}

// x (m, n_in): the network inputs of m gradients (log/sign preprocessing, see
// learned_opt.preprocess.log_sign; or the raw gradient).
LO_NOINLINE void preprocess(const StepArgs& A, const float* __restrict g, int64_t m,
                            float* __restrict x) {
  if (A.n_in == 1) {
    std::memcpy(x, g, m * sizeof(float));
    return;
  }
  const float p = A.p, thr = A.thr, ep = A.exp_p;
  for (int64_t r = 0; r < m; r += 8) {
    const int64_t len = std::min<int64_t>(8, m - r);
    float buf[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    std::memcpy(buf, g + r, len * sizeof(float));
    const v8 v = load8(buf);
    const v8 mag = v < 0.0f ? -v : v;
    const v8i large = mag >= thr;
    const v8 lg = log8(mag > thr ? mag : thr) / p;
    const v8 sgn = v > 0.0f ? v8{} + 1.0f : (v < 0.0f ? v8{} - 1.0f : v8{});
    const v8 x0 = large ? lg : v8{} - 1.0f;
    const v8 x1 = large ? sgn : v * ep;
    for (int64_t j = 0; j < len; ++j) {
      x[2 * (r + j)] = x0[j];
      x[2 * (r + j) + 1] = x1[j];
    }
  }
}

// u (m,) = out_scale * (h (m, H) @ out_w + out_b).
LO_NOINLINE void readout(const StepArgs& A, const float* __restrict h, int64_t m,
                         float* __restrict u) {
  const int64_t H = A.H;
  for (int64_t r = 0; r < m; ++r) {
    const float* hr = h + r * H;
    float s = 0.0f;
    for (int64_t k = 0; k < H; ++k) s += hr[k] * A.out_w[k];
    u[r] = (s + A.out_b) * A.out_scale;
  }
}

LO_NOINLINE void from_bf16(const uint16_t* __restrict src, int64_t len, float* __restrict dst) {
  for (int64_t j = 0; j < len; ++j) dst[j] = bf16_to_float(src[j]);
}

LO_NOINLINE void to_bf16(const float* __restrict src, int64_t len, uint16_t* __restrict dst) {
  for (int64_t j = 0; j < len; ++j) dst[j] = float_to_bf16(src[j]);
}

// The network inputs of rows [start, start + m): the given ones, or the preprocessed gradient
// written into x (scratch of m * n_in floats). Read only.
inline float* block_inputs(const StepArgs& A, int64_t start, int64_t m, float* x) {
  if (A.x) return const_cast<float*>(A.x) + start * A.n_in;
  preprocess(A, A.grad + start, m, x);
  return x;
}

// Floats of per-thread scratch for blocks of `block` rows.
int64_t scratch_floats(const StepArgs& A, int64_t block) {
  int64_t f = block * A.n_in + 6 * A.H + 16;
  if (A.bf16) f += 2 * A.L * block * A.H;
  return f;
}

void step_block(const StepArgs& A, int64_t start, int64_t m, float* scratch) {
  const int64_t H = A.H;
  float* x = scratch;                 // (m, n_in)
  float* dummy = x + m * A.n_in;      // 6 H
  float* st = dummy + 6 * H + 16;     // bf16 states: per layer h, c (m, H) in float32
  x = block_inputs(A, start, m, x);
  const float* in = x;
  int64_t in_ld = A.n_in;
  for (int64_t l = 0; l < A.L; ++l) {
    float *h, *c;
    if (A.bf16) {
      h = st + 2 * l * m * H;
      c = h + m * H;
      from_bf16(A.h16[l] + start * H, m * H, h);
      from_bf16(A.c16[l] + start * H, m * H, c);
    } else {
      h = A.h32[l] + start * H;
      c = A.c32[l] + start * H;
    }
    const Seg segs[2] = {{in, in_ld, l == 0 ? A.n_in : H, A.packed + A.wx_off[l]},
                         {h, H, H, A.packed + A.wh_off[l]}};
    lstm_layer(m, H, segs, 2, A.packed + A.b_off[l], c, h, dummy);
    if (A.bf16) {
      to_bf16(h, m * H, A.h16[l] + start * H);
      to_bf16(c, m * H, A.c16[l] + start * H);
    }
    in = h;  // the next layer and the read-out use the unrounded value
    in_ld = H;
  }
  if (A.readout) readout(A, in, m, A.update + start);
}

// Packed weights of L layers, quad order: column (gate, unit u) -> 16 (u / 4) + 4 gate + u % 4,
// with the sigmoid gates (i, f, o: gates 0, 1, 3) scaled by 0.5; per layer, the offsets of wx,
// wh and b in `packed`.
void pack_layers(int64_t L, int64_t H, const std::vector<torch::Tensor>& w_ih,
                 const std::vector<torch::Tensor>& w_hh, const std::vector<torch::Tensor>& bias,
                 std::vector<float>& packed, std::vector<int64_t>& wx_off,
                 std::vector<int64_t>& wh_off, std::vector<int64_t>& b_off) {
  const int64_t N = 4 * H;
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    wx_off.push_back(total);
    total += w_ih[l].size(0) * N;
    wh_off.push_back(total);
    total += H * N;
    b_off.push_back(total);
    total += N;
  }
  packed.assign(total, 0.0f);
  auto pack = [&](const torch::Tensor& w, float* dst) {
    auto wc = w.detach().to(torch::kFloat32).contiguous();
    const float* src = wc.data_ptr<float>();
    const int64_t rows = wc.numel() / N;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < N; ++j) {
        const int64_t gate = j / H, u = j % H;
        dst[r * N + 16 * (u / 4) + 4 * gate + u % 4] = src[r * N + j] * (gate == 2 ? 1.0f : 0.5f);
      }
    }
  };
  for (int64_t l = 0; l < L; ++l) {
    pack(w_ih[l], packed.data() + wx_off[l]);
    pack(w_hh[l], packed.data() + wh_off[l]);
    pack(bias[l].reshape({1, N}), packed.data() + b_off[l]);
  }
}

// Shape checks, the packed weights and the read-out of a fused step (inference or training).
// grad (n,) float32; w_ih[l] (in, 4H), w_hh[l] (H, 4H), bias[l] (4H); out_w (H, 1), out_b (1);
// H a multiple of 4; p > 0: log/sign preprocessing (w_ih[0] has 2 rows), else the raw gradient.
struct Prepared {
  std::vector<float> packed;
  torch::Tensor out_w;
};

// With `inputs`, `grad` holds the network's inputs x (n, in) instead (no preprocessing), and an
// empty out_w means no read-out.
void prepare(StepArgs& A, Prepared& P, const char* name, const torch::Tensor& grad, int64_t L,
             const std::vector<torch::Tensor>& w_ih, const std::vector<torch::Tensor>& w_hh,
             const std::vector<torch::Tensor>& bias, const torch::Tensor& out_w,
             const torch::Tensor& out_b, double p, double out_scale, bool inputs) {
  if (inputs) {
    TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() &&
                    grad.dim() == 2 && grad.device().is_cpu(),
                name, ": inputs must be a contiguous (n, in) float32 CPU tensor");
  } else {
    TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() &&
                    grad.dim() == 1 && grad.device().is_cpu(),
                name, ": grad must be a contiguous 1-D float32 CPU tensor");
  }
  TORCH_CHECK(L >= 1 && (int64_t)w_ih.size() == L && (int64_t)w_hh.size() == L &&
                  (int64_t)bias.size() == L,
              name, ": one h, c, w_ih, w_hh, bias per layer");
  const int64_t H = w_hh[0].size(0), N = 4 * H;
  TORCH_CHECK(H % 4 == 0 && H > 0, name, ": the hidden size must be a multiple of 4");
  A.n = inputs ? grad.size(0) : grad.numel();
  A.H = H;
  A.L = L;
  A.n_in = w_ih[0].size(0);
  if (inputs) {
    TORCH_CHECK(grad.size(1) == A.n_in, name, ": inputs do not match w_ih[0]");
  } else {
    TORCH_CHECK(A.n_in == (p > 0 ? 2 : 1), name, ": input size does not match preprocessing");
  }
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(w_ih[l].dim() == 2 && w_ih[l].size(0) == (l == 0 ? A.n_in : H) &&
                    w_ih[l].size(1) == N && w_hh[l].dim() == 2 && w_hh[l].size(0) == H &&
                    w_hh[l].size(1) == N && bias[l].numel() == N,
                name, ": weight shapes");
  }
  pack_layers(L, H, w_ih, w_hh, bias, P.packed, A.wx_off, A.wh_off, A.b_off);
  A.packed = P.packed.data();
  A.readout = !(inputs && out_w.numel() == 0);
  if (A.readout) {
    P.out_w = out_w.detach().to(torch::kFloat32).contiguous();
    TORCH_CHECK(P.out_w.numel() == H && out_b.numel() == 1, name, ": read-out shapes");
    A.out_w = P.out_w.data_ptr<float>();
    A.out_b = out_b.detach().to(torch::kFloat32).item<float>();
  }
  A.p = static_cast<float>(p);
  A.thr = static_cast<float>(p > 0 ? std::exp(-p) : 0.0);
  A.exp_p = static_cast<float>(p > 0 ? std::exp(p) : 1.0);
  A.out_scale = static_cast<float>(out_scale);
  if (inputs) {
    A.x = grad.data_ptr<float>();
  } else {
    A.grad = grad.data_ptr<float>();
  }
}

void check_states(const char* name, const std::vector<torch::Tensor>& s, int64_t L, int64_t n,
                  int64_t H, torch::ScalarType dt) {
  TORCH_CHECK((int64_t)s.size() == L, name, ": one state per layer");
  for (const auto& t : s) {
    TORCH_CHECK(t.scalar_type() == dt && t.device().is_cpu() && t.is_contiguous() &&
                    t.dim() == 2 && t.size(0) == n && t.size(1) == H,
                name, ": states must be contiguous (n, H) CPU tensors of one dtype");
  }
}

// Runs fn(block index, scratch) over nblocks blocks on up to torch's thread count, each thread
// with its own scratch of sf floats; blocks handed out dynamically.
template <typename F>
void run_blocks(int64_t nblocks, int64_t sf, const F& fn) {
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), nblocks);
  std::atomic<int64_t> next{0};
  auto run = [&]() {
    std::vector<float> scratch(sf);
    for (;;) {
      const int64_t b = next.fetch_add(1, std::memory_order_relaxed);
      if (b >= nblocks) break;
      fn(b, scratch.data());
    }
  };
  if (nthreads <= 1 || at::in_parallel_region()) {
    run();
  } else {
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) { run(); });
  }
}

}  // namespace

// The fused in-place step. grad (n,) float32; hs, cs: per layer (n, H) float32 or bfloat16
// (all the same dtype), updated in place; w_ih[l] (in, 4H), w_hh[l] (H, 4H), bias[l] (4H);
// out_w (H, 1), out_b (1); H a multiple of 4. p > 0: log/sign preprocessing with scale p
// (w_ih[0] has 2 rows); p <= 0: the raw gradient (1 row). Returns the update (n,) =
// out_scale * (h_L @ out_w + out_b). `block`: rows per unit of work (per-thread working set).
// With `inputs`, grad is the network's inputs x (n, in) instead (any per-coordinate features,
// computed by the caller), and with an empty out_w there is no read-out (an empty tensor is
// returned; the top layer's h is the state hs[L - 1]).
torch::Tensor lstm_step_(torch::Tensor grad, std::vector<torch::Tensor> hs,
                         std::vector<torch::Tensor> cs, std::vector<torch::Tensor> w_ih,
                         std::vector<torch::Tensor> w_hh, std::vector<torch::Tensor> bias,
                         torch::Tensor out_w, torch::Tensor out_b, double p, double out_scale,
                         int64_t block, bool inputs) {
  const int64_t L = static_cast<int64_t>(hs.size());
  StepArgs A;
  Prepared P;
  prepare(A, P, "lstm_step_", grad, L, w_ih, w_hh, bias, out_w, out_b, p, out_scale, inputs);
  const int64_t n = A.n, H = A.H;
  const auto sdt = hs[0].scalar_type();
  TORCH_CHECK(sdt == torch::kFloat32 || sdt == torch::kBFloat16,
              "lstm_step_: states must be float32 or bfloat16");
  check_states("lstm_step_", hs, L, n, H, sdt);
  check_states("lstm_step_", cs, L, n, H, sdt);
  A.bf16 = sdt == torch::kBFloat16;
  for (int64_t l = 0; l < L; ++l) {
    if (A.bf16) {
      A.h16.push_back(reinterpret_cast<uint16_t*>(hs[l].data_ptr<at::BFloat16>()));
      A.c16.push_back(reinterpret_cast<uint16_t*>(cs[l].data_ptr<at::BFloat16>()));
    } else {
      A.h32.push_back(hs[l].data_ptr<float>());
      A.c32.push_back(cs[l].data_ptr<float>());
    }
  }
  auto update = torch::empty({A.readout ? n : 0}, grad.options());
  A.update = update.data_ptr<float>();
  if (n == 0) return update;
  block = std::max<int64_t>(kRows, block);
  run_blocks((n + block - 1) / block, scratch_floats(A, block), [&](int64_t b, float* scratch) {
    const int64_t start = b * block;
    step_block(A, start, std::min(block, n - start), scratch);
  });
  return update;
}

// ------------------------------------------------------------------------------------------
// For another extension (the LSTM-corrected Adam rule's in-place step, whose elementwise part is
// compiled without -ffast-math): the layer stack of lstm_step_ on given inputs x (m, n_in), for
// one block of m rows, float32 states h[l], c[l] (m, H) updated in place; bit for bit what
// lstm_step_ computes for those rows. Called through a plain function pointer
// (lstm_block_address); `packed`, `offsets` (wx, wh, b per layer) from pack_lstm; `dummy`:
// 6 H + 16 floats of scratch.
extern "C" void learned_opt_lstm_block(const float* packed, const int64_t* offsets, int64_t L,
                                       int64_t H, int64_t n_in, const float* x, int64_t m,
                                       float* const* h, float* const* c, float* dummy) {
  const float* in = x;
  int64_t ld = n_in;
  for (int64_t l = 0; l < L; ++l) {
    const Seg segs[2] = {{in, ld, l == 0 ? n_in : H, packed + offsets[3 * l]},
                         {h[l], H, H, packed + offsets[3 * l + 1]}};
    lstm_layer(m, H, segs, 2, packed + offsets[3 * l + 2], c[l], h[l], dummy);
    in = h[l];
    ld = H;
  }
}

// The packed weights of learned_opt_lstm_block (float32) and their offsets (int64: wx, wh, b
// per layer).
std::vector<torch::Tensor> pack_lstm(std::vector<torch::Tensor> w_ih,
                                     std::vector<torch::Tensor> w_hh,
                                     std::vector<torch::Tensor> bias) {
  const int64_t L = static_cast<int64_t>(w_ih.size());
  TORCH_CHECK(L >= 1 && (int64_t)w_hh.size() == L && (int64_t)bias.size() == L,
              "pack_lstm: one w_ih, w_hh, bias per layer");
  const int64_t H = w_hh[0].size(0);
  TORCH_CHECK(H % 4 == 0 && H > 0, "pack_lstm: the hidden size must be a multiple of 4");
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(w_ih[l].dim() == 2 && w_ih[l].size(1) == 4 * H && w_hh[l].dim() == 2 &&
                    w_hh[l].size(0) == H && w_hh[l].size(1) == 4 * H && bias[l].numel() == 4 * H &&
                    (l == 0 || w_ih[l].size(0) == H),
                "pack_lstm: weight shapes");
  }
  std::vector<float> packed;
  std::vector<int64_t> wx, wh, b;
  pack_layers(L, H, w_ih, w_hh, bias, packed, wx, wh, b);
  auto out = torch::empty({(int64_t)packed.size()}, torch::kFloat32);
  std::copy(packed.begin(), packed.end(), out.data_ptr<float>());
  auto off = torch::empty({3 * L}, torch::kInt64);
  for (int64_t l = 0; l < L; ++l) {
    off[3 * l] = wx[l];
    off[3 * l + 1] = wh[l];
    off[3 * l + 2] = b[l];
  }
  return {out, off};
}

int64_t lstm_block_address() { return reinterpret_cast<int64_t>(&learned_opt_lstm_block); }

// ------------------------------------------------------------------------------------------
// Meta-training: the rule's step as a differentiable function, forward and backward fused.
//
// Forward (lstm_train_forward): the same per-block computation as the in-place step, out of
// place (new states in new tensors, the old ones are the backward's inputs), also writing each
// layer's gate activations act[l] (n, 4H) = [i, f, g, o] for the backward.
//
// Backward (lstm_train_backward): per block of rows, from the top layer down: the read-out's
// backward, the cell's backward (dgates), then the gate product's three backward products on
// the block with register-blocked kernels: dW += [x, h_prev]^T dgates (per-chunk partial sums),
// and [dx, dh_prev] = dgates @ [W_ih; W_hh]^T. The weight gradients are summed over fixed chunks
// of rows and the chunks' partial sums added in order, so the result does not depend on the
// thread count or the scheduling (the unroll's checkpointing relies on bit-exact re-runs).

namespace {

struct TrainArgs {
  StepArgs A;                              // forward pointers (h32/c32 unused)
  std::vector<const float*> h_prev, c_prev, h_new, c_new, act;
  std::vector<float*> h_out, c_out, act_out;  // forward outputs
  // backward
  const float* d_update = nullptr;
  std::vector<const float*> dh_new, dc_new;  // nullptr: zero
  std::vector<float*> dh_prev, dc_prev;
  std::vector<float> wt;                   // per layer: [W_ih; W_hh] transposed, padded (N, Kp)
  std::vector<int64_t> wt_off, wt_kp;
  int64_t kp_max = 0;                      // the widest of wt_kp
  // gradient layout in a partial-sum buffer: per layer dW_ih (in, N), dW_hh (H, N), db (N),
  // then d_out_w (H), d_out_b (1)
  std::vector<int64_t> gx_off, gh_off, gb_off;
  int64_t gow_off = 0, gob_off = 0, gsize = 0;
};

void train_fwd_block(const TrainArgs& T, int64_t start, int64_t m, float* scratch) {
  const StepArgs& A = T.A;
  const int64_t H = A.H;
  float* x = scratch;             // (m, n_in)
  float* dummy = x + m * A.n_in;  // 6 H
  x = block_inputs(A, start, m, x);
  const float* in = x;
  int64_t in_ld = A.n_in;
  for (int64_t l = 0; l < A.L; ++l) {
    float* c = T.c_out[l] + start * H;
    float* h = T.h_out[l] + start * H;
    std::memcpy(c, T.c_prev[l] + start * H, m * H * sizeof(float));
    const Seg segs[2] = {{in, in_ld, l == 0 ? A.n_in : H, A.packed + A.wx_off[l]},
                         {T.h_prev[l] + start * H, H, H, A.packed + A.wh_off[l]}};
    lstm_layer(m, H, segs, 2, A.packed + A.b_off[l], c, h, dummy, T.act_out[l] + start * 4 * H);
    in = h;
    in_ld = H;
  }
  if (A.readout) readout(A, in, m, A.update + start);
}

// out (K, N) += a^T d over m rows: a (m, K) with leading dimension lda, d (m, N); N % 16 == 0.
// Tiles of KT rows of out x CV vectors of 8 columns, the accumulators in registers.
template <int KT, int CV>
inline void atd_tile(const float* a, int64_t lda, const float* d, int64_t m, int64_t N,
                     int64_t j0, float* out) {
  v8 acc[KT][CV];
  for (int k = 0; k < KT; ++k)
    for (int v = 0; v < CV; ++v) acc[k][v] = v8{};
  for (int64_t r = 0; r < m; ++r) {
    v8 dv[CV];
    for (int v = 0; v < CV; ++v) dv[v] = load8(d + r * N + j0 + 8 * v);
    const float* ar = a + r * lda;
    for (int k = 0; k < KT; ++k) {
      const float x = ar[k];
      for (int v = 0; v < CV; ++v) acc[k][v] += x * dv[v];
    }
  }
  for (int k = 0; k < KT; ++k)
    for (int v = 0; v < CV; ++v) {
      float* o = out + k * N + j0 + 8 * v;
      store8(o, load8(o) + acc[k][v]);
    }
}

template <int CV>
void add_atd_cv(const float* a, int64_t lda, int64_t K, const float* d, int64_t m, int64_t N,
                float* out) {
  for (int64_t j0 = 0; j0 < N; j0 += 8 * CV) {
    int64_t k0 = 0;
    for (; k0 + 4 <= K; k0 += 4) atd_tile<4, CV>(a + k0, lda, d, m, N, j0, out + k0 * N);
    for (; k0 < K; ++k0) atd_tile<1, CV>(a + k0, lda, d, m, N, j0, out + k0 * N);
  }
}

LO_NOINLINE void add_atd(const float* a, int64_t lda, int64_t K, const float* d, int64_t m,
                         int64_t N, float* out) {
  if (N % 40 == 0) return add_atd_cv<5>(a, lda, K, d, m, N, out);
  if (N % 32 == 0) return add_atd_cv<4>(a, lda, K, d, m, N, out);
  return add_atd_cv<2>(a, lda, K, d, m, N, out);
}

// out (m, 8 KV) = d (m, N) @ wt (N, 8 KV), R rows at a time (rows past m read row m - 1 and
// write to `spill`, R * 8 KV floats).
template <int R, int KV>
LO_NOINLINE void dwt(const float* d, int64_t m, int64_t N, const float* wt, float* out,
                     float* spill) {
  constexpr int64_t Kp = 8 * KV;
  for (int64_t r0 = 0; r0 < m; r0 += R) {
    const float* dr[R];
    float* orow[R];
    for (int r = 0; r < R; ++r) {
      const bool ok = r0 + r < m;
      dr[r] = d + (ok ? r0 + r : m - 1) * N;
      orow[r] = ok ? out + (r0 + r) * Kp : spill + r * Kp;
    }
    v8 acc[R][KV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < KV; ++v) acc[r][v] = v8{};
    for (int64_t j = 0; j < N; ++j) {
      v8 w[KV];
      for (int v = 0; v < KV; ++v) w[v] = load8(wt + j * Kp + 8 * v);
      for (int r = 0; r < R; ++r) {
        const float x = dr[r][j];
        for (int v = 0; v < KV; ++v) acc[r][v] += x * w[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < KV; ++v) store8(orow[r] + 8 * v, acc[r][v]);
  }
}

void d_wt(const float* d, int64_t m, int64_t N, const float* wt, int64_t Kp, float* out,
          float* spill) {
  switch (Kp / 8) {
    case 1: return dwt<8, 1>(d, m, N, wt, out, spill);
    case 2: return dwt<8, 2>(d, m, N, wt, out, spill);
    case 3: return dwt<8, 3>(d, m, N, wt, out, spill);
    case 4: return dwt<4, 4>(d, m, N, wt, out, spill);
    case 5: return dwt<4, 5>(d, m, N, wt, out, spill);
    case 6: return dwt<3, 6>(d, m, N, wt, out, spill);
    case 8: return dwt<2, 8>(d, m, N, wt, out, spill);
    default: break;
  }
  // wide layers: 8 columns at a time
  for (int64_t v = 0; v < Kp / 8; ++v) {
    for (int64_t r = 0; r < m; ++r) {
      v8 acc = v8{};
      for (int64_t j = 0; j < N; ++j) acc += d[r * N + j] * load8(wt + j * Kp + 8 * v);
      store8(out + r * Kp + 8 * v, acc);
    }
  }
}

// The cell's backward on m rows: from the activations act (m, 4H), the old and new cell states
// and the gradients wrt the new h and c (dc_new may be nullptr: zero), the gradients wrt the
// gate pre-activations dg (m, 4H) and the old cell state; the bias gradient (the column sums of
// dg) is added into gb.
LO_NOINLINE void cell_backward(const float* __restrict act, const float* __restrict c_prev,
                               const float* __restrict c_new, const float* __restrict dc_new,
                               const float* __restrict dh, int64_t m, int64_t H,
                               float* __restrict dg, float* __restrict dc_prev,
                               float* __restrict gb) {
  const int64_t N = 4 * H;
  for (int64_t r = 0; r < m; ++r) {
    const float* a = act + r * N;
    const float* cpr = c_prev + r * H;
    const float* cnr = c_new + r * H;
    const float* dhr = dh + r * H;
    float* gr = dg + r * N;
    float* dcr = dc_prev + r * H;
    float dct[64];
    float* dc = H <= 64 ? dct : dcr;  // dc_prev = dct * f: written over below
    if (dc_new) {
      const float* dnr = dc_new + r * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) dc[k] = dnr[k];
    } else {
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) dc[k] = 0.0f;
    }
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      const float i = a[k], f = a[H + k], gg = a[2 * H + k], o = a[3 * H + k];
      const float t = tanh_(cnr[k]);
      const float d = dc[k] + dhr[k] * o * (1.0f - t * t);
      gr[k] = d * gg * i * (1.0f - i);
      gr[H + k] = d * cpr[k] * f * (1.0f - f);
      gr[2 * H + k] = d * i * (1.0f - gg * gg);
      gr[3 * H + k] = dhr[k] * t * o * (1.0f - o);
      dcr[k] = d * f;
    }
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) gb[j] += gr[j];
  }
}

// Scratch floats of one backward block of m rows.
int64_t bwd_scratch_floats(const TrainArgs& T, int64_t m) {
  const int64_t H = T.A.H, N = 4 * H;
  return m * T.A.n_in + 2 * m * H + m * N + m * T.kp_max + 8 * T.kp_max + 64;  // spill: 8 rows
}

// The backward of rows [start, start + m), gradients of the weights added into g.
void train_bwd_block(const TrainArgs& T, int64_t start, int64_t m, float* scratch, float* g) {
  const StepArgs& A = T.A;
  const int64_t H = A.H, N = 4 * H, L = A.L;
  float* x = scratch;       // (m, n_in) layer 0's inputs
  float* dh = x + m * A.n_in;  // (m, H) gradient wrt the current layer's new h
  float* dhx = dh + m * H;     // (m, H) gradient wrt the layer below's new h
  float* dg = dhx + m * H;     // (m, N) gradient wrt the gate pre-activations
  float* prod = dg + m * N;       // (m, Kp) dg @ W^T
  float* spill = prod + m * T.kp_max;  // 8 Kp
  x = block_inputs(A, start, m, x);
  if (!A.readout) {  // the top layer's h: only its own gradient
    const float* dht = T.dh_new[L - 1] ? T.dh_new[L - 1] + start * H : nullptr;
    for (int64_t j = 0; j < m * H; ++j) dh[j] = dht ? dht[j] : 0.0f;
  } else {  // read-out: u = s (h_top @ w + b)
    const float* du = T.d_update + start;
    const float* ht = T.h_new[L - 1] + start * H;
    const float* dht = T.dh_new[L - 1] ? T.dh_new[L - 1] + start * H : nullptr;
    float* gow = g + T.gow_off;
    float sb = 0.0f;
    for (int64_t r = 0; r < m; ++r) {
      const float s = du[r] * A.out_scale;
      sb += s;
      for (int64_t k = 0; k < H; ++k) {
        dh[r * H + k] = (dht ? dht[r * H + k] : 0.0f) + s * A.out_w[k];
        gow[k] += s * ht[r * H + k];
      }
    }
    g[T.gob_off] += sb;
  }
  for (int64_t l = L - 1; l >= 0; --l) {
    const float* act = T.act[l] + start * N;
    const float* cp = T.c_prev[l] + start * H;
    const float* cn = T.c_new[l] + start * H;
    const float* dcn = T.dc_new[l] ? T.dc_new[l] + start * H : nullptr;
    float* dcp = T.dc_prev[l] + start * H;
    cell_backward(act, cp, cn, dcn, dh, m, H, dg, dcp, g + T.gb_off[l]);
    // weights: [x, h_prev]^T dg
    const float* xin = l == 0 ? x : T.h_new[l - 1] + start * H;
    const int64_t kin = l == 0 ? A.n_in : H;
    add_atd(xin, kin, kin, dg, m, N, g + T.gx_off[l]);
    add_atd(T.h_prev[l] + start * H, H, H, dg, m, N, g + T.gh_off[l]);
    // inputs: prod = dg @ W^T, columns [dh_prev (H) | dx (H, layers above 0)] (padded)
    const int64_t kp = T.wt_kp[l];
    d_wt(dg, m, N, T.wt.data() + T.wt_off[l], kp, prod, spill);
    float* dhp = T.dh_prev[l] + start * H;
    for (int64_t r = 0; r < m; ++r) std::memcpy(dhp + r * H, prod + r * kp, H * sizeof(float));
    if (l > 0) {
      const float* dhb = T.dh_new[l - 1] ? T.dh_new[l - 1] + start * H : nullptr;
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t k = 0; k < H; ++k) {
          dhx[r * H + k] = prod[r * kp + H + k] + (dhb ? dhb[r * H + k] : 0.0f);
        }
      }
      std::swap(dh, dhx);
    }
  }
}

const float* f32_or_null(const torch::Tensor& t, int64_t n, int64_t H, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n * H,
              "lstm_train_backward: ", what, " must be contiguous float32 (n, H) or empty");
  return t.data_ptr<float>();
}

}  // namespace

// Forward of the rule's step for meta-training (float32): the same arguments as lstm_step_,
// old states not modified. Returns [update (n,), h_new x L, c_new x L, act x L (n, 4H)]
// (update empty without a read-out).
std::vector<torch::Tensor> lstm_train_forward(torch::Tensor grad, std::vector<torch::Tensor> hs,
                                              std::vector<torch::Tensor> cs,
                                              std::vector<torch::Tensor> w_ih,
                                              std::vector<torch::Tensor> w_hh,
                                              std::vector<torch::Tensor> bias,
                                              torch::Tensor out_w, torch::Tensor out_b, double p,
                                              double out_scale, int64_t block, bool inputs) {
  const int64_t L = static_cast<int64_t>(hs.size());
  TrainArgs T;
  Prepared P;
  prepare(T.A, P, "lstm_train_forward", grad, L, w_ih, w_hh, bias, out_w, out_b, p, out_scale,
          inputs);
  const int64_t n = T.A.n, H = T.A.H;
  check_states("lstm_train_forward", hs, L, n, H, torch::kFloat32);
  check_states("lstm_train_forward", cs, L, n, H, torch::kFloat32);
  T.A.bf16 = false;
  auto update = torch::empty({T.A.readout ? n : 0}, grad.options());
  T.A.update = update.data_ptr<float>();
  std::vector<torch::Tensor> out{update};
  std::vector<torch::Tensor> hn, cn, acts;
  for (int64_t l = 0; l < L; ++l) {
    hn.push_back(torch::empty({n, H}, grad.options()));
    cn.push_back(torch::empty({n, H}, grad.options()));
    acts.push_back(torch::empty({n, 4 * H}, grad.options()));
    T.h_prev.push_back(hs[l].data_ptr<float>());
    T.c_prev.push_back(cs[l].data_ptr<float>());
    T.h_out.push_back(hn[l].data_ptr<float>());
    T.c_out.push_back(cn[l].data_ptr<float>());
    T.act_out.push_back(acts[l].data_ptr<float>());
  }
  out.insert(out.end(), hn.begin(), hn.end());
  out.insert(out.end(), cn.begin(), cn.end());
  out.insert(out.end(), acts.begin(), acts.end());
  if (n == 0) return out;
  block = std::max<int64_t>(kRows, block);
  run_blocks((n + block - 1) / block, block * T.A.n_in + 6 * H + 16,
             [&](int64_t b, float* scratch) {
               const int64_t start = b * block;
               train_fwd_block(T, start, std::min(block, n - start), scratch);
             });
  return out;
}

// Backward of lstm_train_forward. d_update (n,); dh_new, dc_new: per layer (n, H) or empty
// (zero). Returns [dh_prev x L, dc_prev x L, dw_ih x L, dw_hh x L, dbias x L, d_out_w (H, 1),
// d_out_b (1)] (the last two empty without a read-out; no gradient wrt given inputs: they are
// constants, as the gradient is). `block`: rows per unit of work; `chunk`: rows per partial sum of the weight
// gradients (a multiple of block; fixed, so that results do not depend on the threads).
std::vector<torch::Tensor> lstm_train_backward(
    torch::Tensor grad, std::vector<torch::Tensor> hs, std::vector<torch::Tensor> cs,
    std::vector<torch::Tensor> hs_new, std::vector<torch::Tensor> cs_new,
    std::vector<torch::Tensor> acts, std::vector<torch::Tensor> w_ih,
    std::vector<torch::Tensor> w_hh, std::vector<torch::Tensor> bias, torch::Tensor out_w,
    torch::Tensor out_b, torch::Tensor d_update, std::vector<torch::Tensor> dh_new,
    std::vector<torch::Tensor> dc_new, double p, double out_scale, int64_t block, int64_t chunk,
    bool inputs) {
  const char* name = "lstm_train_backward";
  const int64_t L = static_cast<int64_t>(hs.size());
  TrainArgs T;
  Prepared P;
  prepare(T.A, P, name, grad, L, w_ih, w_hh, bias, out_w, out_b, p, out_scale, inputs);
  const int64_t n = T.A.n, H = T.A.H, N = 4 * H;
  for (const auto* s : {&hs, &cs, &hs_new, &cs_new}) check_states(name, *s, L, n, H, torch::kFloat32);
  TORCH_CHECK((int64_t)acts.size() == L && (int64_t)dh_new.size() == L &&
                  (int64_t)dc_new.size() == L,
              name, ": one activation and state gradient per layer");
  if (T.A.readout) {
    TORCH_CHECK(d_update.scalar_type() == torch::kFloat32 && d_update.is_contiguous() &&
                    d_update.numel() == n,
                name, ": d_update must be a contiguous float32 (n,) tensor");
    T.d_update = d_update.data_ptr<float>();
  }
  std::vector<torch::Tensor> dhp, dcp;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(acts[l].scalar_type() == torch::kFloat32 && acts[l].is_contiguous() &&
                    acts[l].numel() == n * N,
                name, ": activations must be contiguous float32 (n, 4H)");
    T.h_prev.push_back(hs[l].data_ptr<float>());
    T.c_prev.push_back(cs[l].data_ptr<float>());
    T.h_new.push_back(hs_new[l].data_ptr<float>());
    T.c_new.push_back(cs_new[l].data_ptr<float>());
    T.act.push_back(acts[l].data_ptr<float>());
    T.dh_new.push_back(f32_or_null(dh_new[l], n, H, "dh_new"));
    T.dc_new.push_back(f32_or_null(dc_new[l], n, H, "dc_new"));
    dhp.push_back(torch::empty({n, H}, grad.options()));
    dcp.push_back(torch::empty({n, H}, grad.options()));
    T.dh_prev.push_back(dhp[l].data_ptr<float>());
    T.dc_prev.push_back(dcp[l].data_ptr<float>());
  }
  // [W_ih; W_hh]^T per layer, (N, Kp): columns [h (H) | x (H, layers above 0)], zero padded.
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t k = l == 0 ? H : 2 * H;
    T.wt_kp.push_back((k + 7) / 8 * 8);
    T.kp_max = std::max(T.kp_max, T.wt_kp[l]);
    T.wt_off.push_back(total);
    total += N * T.wt_kp[l];
  }
  T.wt.assign(total, 0.0f);
  for (int64_t l = 0; l < L; ++l) {
    auto wh = w_hh[l].detach().to(torch::kFloat32).contiguous();
    auto wx = w_ih[l].detach().to(torch::kFloat32).contiguous();
    const float* ph = wh.data_ptr<float>();
    const float* px = wx.data_ptr<float>();
    float* dst = T.wt.data() + T.wt_off[l];
    const int64_t kp = T.wt_kp[l];
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t k = 0; k < H; ++k) dst[j * kp + k] = ph[k * N + j];
      if (l > 0)
        for (int64_t k = 0; k < H; ++k) dst[j * kp + H + k] = px[k * N + j];
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    const int64_t kin = l == 0 ? T.A.n_in : H;
    T.gx_off.push_back(T.gsize);
    T.gsize += kin * N;
    T.gh_off.push_back(T.gsize);
    T.gsize += H * N;
    T.gb_off.push_back(T.gsize);
    T.gsize += N;
  }
  T.gow_off = T.gsize;
  T.gsize += H;
  T.gob_off = T.gsize;
  T.gsize += 1;

  block = std::max<int64_t>(8, block);
  chunk = std::max<int64_t>(1, chunk / block) * block;
  const int64_t nchunks = n == 0 ? 0 : (n + chunk - 1) / chunk;
  std::vector<float> partial(std::max<int64_t>(nchunks, 1) * T.gsize, 0.0f);
  run_blocks(nchunks, bwd_scratch_floats(T, block), [&](int64_t c, float* scratch) {
    float* g = partial.data() + c * T.gsize;
    const int64_t end = std::min(n, (c + 1) * chunk);
    for (int64_t start = c * chunk; start < end; start += block) {
      train_bwd_block(T, start, std::min(block, end - start), scratch, g);
    }
  });
  std::vector<float> gsum(T.gsize, 0.0f);
  for (int64_t c = 0; c < nchunks; ++c) {
    const float* g = partial.data() + c * T.gsize;
    for (int64_t i = 0; i < T.gsize; ++i) gsum[i] += g[i];
  }
  auto opts = grad.options();
  auto from = [&](int64_t off, std::vector<int64_t> shape) {
    int64_t numel = 1;
    for (auto s : shape) numel *= s;
    auto t = torch::empty(shape, opts);
    std::memcpy(t.data_ptr<float>(), gsum.data() + off, numel * sizeof(float));
    return t;
  };
  std::vector<torch::Tensor> out;
  out.insert(out.end(), dhp.begin(), dhp.end());
  out.insert(out.end(), dcp.begin(), dcp.end());
  for (int64_t l = 0; l < L; ++l) out.push_back(from(T.gx_off[l], {l == 0 ? T.A.n_in : H, N}));
  for (int64_t l = 0; l < L; ++l) out.push_back(from(T.gh_off[l], {H, N}));
  for (int64_t l = 0; l < L; ++l) out.push_back(from(T.gb_off[l], {N}));
  if (T.A.readout) {
    out.push_back(from(T.gow_off, {H, 1}));
    out.push_back(from(T.gob_off, {1}));
  } else {
    out.push_back(torch::empty({0}, opts));
    out.push_back(torch::empty({0}, opts));
  }
  return out;
}

// The fused step's vector tanh on a float32 tensor (out of place), for testing its accuracy.
torch::Tensor tanh_approx(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "tanh_approx: float32 expected");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t n = xc.numel();
  float buf[8];
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t len = std::min<int64_t>(8, n - i);
    std::fill(buf, buf + 8, 0.0f);
    std::copy(src + i, src + i + len, buf);
    store8(buf, tanh8(load8(buf)));
    std::copy(buf, buf + len, dst + i);
  }
  return y;
}

// How many tasks at::parallel_for runs at once here with torch's thread count (1 when the
// extension was built without OpenMP: then its parallel_for is serial), for testing.
int64_t parallel_width() {
  std::atomic<int64_t> running{0}, most{0};
  const int64_t n = at::get_num_threads();
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t now = ++running;
    int64_t seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    // wait (bounded) for the others to arrive, so that the count is not a race
    for (int spin = 0; spin < 100000000 && running.load() < n; ++spin) {
    }
    seen = most.load();
    while (running.load() > seen && !most.compare_exchange_weak(seen, running.load())) {
    }
  });
  return most.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lstm_cell_forward, "fused LSTM cell forward");
  m.def("forward_", &lstm_cell_forward_, "fused LSTM cell forward, in place");
  m.def("backward", &lstm_cell_backward, "fused LSTM cell backward");
  m.def("step_", &lstm_step_, "fused in-place step of the coordinatewise LSTM optimizer");
  m.def("train_forward", &lstm_train_forward, "fused step of the LSTM rule for meta-training");
  m.def("train_backward", &lstm_train_backward, "backward of train_forward");
  m.def("pack_lstm", &pack_lstm, "packed weights of learned_opt_lstm_block");
  m.def("lstm_block_address", &lstm_block_address, "address of learned_opt_lstm_block");
  m.def("tanh_approx", &tanh_approx, "the fused step's vector tanh (for tests)");
  m.def("parallel_width", &parallel_width, "tasks at::parallel_for runs at once (for tests)");
}
