// The in-place inference step of the LSTM-corrected Adam rule (learned_opt.rules.
// LSTMCorrectedAdamRule), fused per cache-sized block of coordinates, for float32 gradients with
// float32 or bfloat16 state.
//
// It computes exactly what the rule's PyTorch forward computes (bit for bit where both see the
// same blocks: tensors up to one block; on larger tensors PyTorch's reductions and matrix
// products split the work differently, a last-bit difference): this file is compiled WITHOUT
// -ffast-math and with -ffp-contract=off, so every +, -, *, /, sqrt is one IEEE operation as in
// PyTorch's elementwise kernels (lerp is an explicit fma, as in PyTorch's), and the transcendental
// functions (log, tanh, exp), the read-out's matrix product and the per-block sums are the ATen
// operations the forward calls, applied to each block. The LSTM layers are the fused kernel of
// lstm_cell.cpp (compiled with -ffast-math, as for the forward), called through a function
// pointer (learned_opt_lstm_block).
//
// One step of one parameter tensor is three passes over its coordinates: the sums for the
// gradient clipping (clip_sums), the sums for the step-size adaptation (adapt_sums), and the
// step (step_). The per-tensor arithmetic between them is done by the caller with the same
// PyTorch code as the forward.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using LstmBlockFn = void (*)(const float*, const int64_t*, int64_t, int64_t, int64_t,
                             const float*, int64_t, float* const*, float* const*, float*);

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

// A per-coordinate state entry: float32 or bfloat16 storage, read and written as float.
struct Store {
  float* f = nullptr;
  uint16_t* b = nullptr;
  float get(int64_t i) const { return f ? f[i] : bf16_to_float(b[i]); }
  void set(int64_t i, float v) const {
    if (f) {
      f[i] = v;
    } else {
      b[i] = float_to_bf16(v);
    }
  }
};

Store store_of(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() % std::max<int64_t>(n, 1) == 0,
              "corrected_adam: ", what, " must be a contiguous CPU tensor");
  Store s;
  if (t.scalar_type() == torch::kFloat32) {
    s.f = t.data_ptr<float>();
  } else {
    TORCH_CHECK(t.scalar_type() == torch::kBFloat16, "corrected_adam: ", what,
                " must be float32 or bfloat16");
    s.b = reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
  }
  return s;
}

// Typed access to a per-coordinate state entry stored as S: float (float32) or uint16_t
// (bfloat16), read and written as float.
inline float load_s(const float* p, int64_t i) { return p[i]; }
inline float load_s(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store_s(float* p, int64_t i, float v) { p[i] = v; }
inline void store_s(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// Clamp to [-G, G] (learned_opt.rules.base.bounded_grad): min(max(g, -G), G).
inline float bounded(float g, float G) {
  const float lo = g > -G ? g : -G;
  return lo < G ? lo : G;
}

// Runs fn(block, scratch) for every block on up to torch's thread count, each thread with its own
// scratch of sf floats; blocks are handed out dynamically. Per-block results do not depend on
// which thread runs a block.
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

// The k per-block sums of `rows` (k, m) contiguous floats: ATen's sum over dim 1, the reduction
// the forward applies to the whole tensor (the same result when the tensor is one block).
void block_sums(float* rows, int64_t k, int64_t m, float* out) {
  auto t = torch::from_blob(rows, {k, m}, torch::kFloat32);
  auto s = at::sum(t, {1});
  const float* p = s.data_ptr<float>();
  for (int64_t j = 0; j < k; ++j) out[j] = p[j];
}

// Sums over blocks: the blocks' partial sums added in block order (the same for any thread count).
torch::Tensor combine(const std::vector<float>& partial, int64_t k, int64_t nblocks) {
  auto out = torch::zeros({k}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int64_t j = 0; j < k; ++j) o[j] = b == 0 ? partial[j] : o[j] + partial[b * k + j];
  }
  return out;
}

void check_grad(const torch::Tensor& g, const char* name) {
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == torch::kFloat32 && g.is_contiguous() &&
                  g.dim() == 1,
              name, ": grad must be a contiguous 1-D float32 CPU tensor");
}

// lstm_cell.cpp's packed weights (quad order: per 4 units u the 16 columns
// 16 (u / 4) + 4 gate + u % 4) in gate-major order (gate * H + u), for rows16.
std::vector<float> gate_major(const float* packed, int64_t total, int64_t H) {
  const int64_t N = 4 * H;
  std::vector<float> out(total);
  for (int64_t row = 0; row < total / N; ++row) {
    for (int64_t gate = 0; gate < 4; ++gate) {
      for (int64_t u = 0; u < H; ++u) {
        out[row * N + gate * H + u] = packed[row * N + 16 * (u / 4) + 4 * gate + u % 4];
      }
    }
  }
  return out;
}

#if defined(__AVX512F__)
// ------------------------------------------------------------------------------------------
// The LSTM layers on 16 lanes (hidden sizes that are multiples of 16), bit for bit what the fused
// kernel of lstm_cell.cpp computes on 8 lanes: the same packed weights (quad order: per 4 units
// the 16 columns [i, f, g, o], sigmoid gates pre-scaled by 0.5), the gate sums in the same order
// (bias, then one fma per input in order), and the operations that file's -ffast-math build
// emits for its epilogue, one for one: the rational tanh with its division as a 12-bit reciprocal
// (vrcpps, on 8 lanes at a time) and one Newton step, i and f as (t + 1) * 0.5, g and o as
// fma(t, [1, 0.5], [0, 0.5]), c = fma(f, c, i * g), h = o * tanh(c). Twice the lanes per
// instruction, and all four gates of 16 units per row without the 8-lane kernel's row pairing.

inline __m512 rcp_12bit(__m512 q) {
  const __m256 lo = _mm256_rcp_ps(_mm512_castps512_ps256(q));
  const __m256 hi = _mm256_rcp_ps(_mm512_extractf32x8_ps(q, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

inline __m512 tanh16(__m512 x) {
  const float clamp = 7.99881172180175781f;
  x = _mm512_max_ps(x, _mm512_set1_ps(-clamp));
  x = _mm512_min_ps(x, _mm512_set1_ps(clamp));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.76076847742355e-16f),
                             _mm512_set1_ps(2.00018790482477e-13f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-8.60467152213735e-11f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(5.12229709037114e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(1.48572235717979e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(6.37261928875436e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(4.89352455891786e-03f));
  p = _mm512_mul_ps(p, x);
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(1.19825839466702e-06f),
                             _mm512_set1_ps(1.18534705686654e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(2.26843463243900e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(4.89352518554385e-03f));
  const __m512 r = rcp_12bit(q);
  const __m512 e = _mm512_mul_ps(r, _mm512_mul_ps(q, r));
  return _mm512_mul_ps(p, _mm512_sub_ps(_mm512_add_ps(r, r), e));
}

struct Seg {
  const float* a;  // inputs: row r, column k at a[r * lda + k * step]
  int64_t lda;
  int64_t step;
  int64_t K;
  const float* w;  // weights (K, 4H), gate-major: columns [i, f, g, o] x H units
};

// Rows r0 .. r0 + R - 1 of one layer, per 16 units: the four gates' sums in registers, the
// activations, the cell update of c (in place) and the new h (into hb (R, H), copied to h once
// every unit of the rows is done: the rows' old h is an input of every unit).
template <int R>
void rows16(const Seg* segs, int nseg, const float* bias, int64_t H, int64_t r0, int64_t m,
            float* c, float* h, float* hb) {
  const int64_t N = 4 * H;
  // The states stream from memory: ask for the rows eight groups ahead now, so that their loads
  // overlap this group's arithmetic.
  for (int64_t r = r0 + 8 * R; r < std::min(m, r0 + 9 * R); ++r) {
    for (int64_t u = 0; u < H; u += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * H + u), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(h + r * H + u), _MM_HINT_T0);
    }
  }
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps();
  for (int64_t u0 = 0; u0 < H; u0 += 16) {
    __m512 acc[R][4];
    for (int j = 0; j < 4; ++j) {
      const __m512 b = _mm512_loadu_ps(bias + j * H + u0);
      for (int r = 0; r < R; ++r) acc[r][j] = b;
    }
    for (int s = 0; s < nseg; ++s) {
      const float* a[R];
      for (int r = 0; r < R; ++r) a[r] = segs[s].a + (r0 + r) * segs[s].lda;
      const float* w = segs[s].w + u0;
      const int64_t step = segs[s].step;
      for (int64_t k = 0; k < segs[s].K; ++k) {
        const float* wk = w + k * N;
        const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + H),
                     w2 = _mm512_loadu_ps(wk + 2 * H), w3 = _mm512_loadu_ps(wk + 3 * H);
        for (int r = 0; r < R; ++r) {
          const __m512 x = _mm512_set1_ps(a[r][k * step]);
          acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
          acc[r][2] = _mm512_fmadd_ps(x, w2, acc[r][2]);
          acc[r][3] = _mm512_fmadd_ps(x, w3, acc[r][3]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      // lstm_cell.cpp's epilogue lane for lane: i, f = (t + 1) * 0.5; g = fma(t, 1, 0);
      // o = fma(t, 0.5, 0.5); c = fma(f, c, i * g); h = o * tanh(c)
      const __m512 i = _mm512_mul_ps(_mm512_add_ps(tanh16(acc[r][0]), one), half);
      const __m512 f = _mm512_mul_ps(_mm512_add_ps(tanh16(acc[r][1]), one), half);
      const __m512 g = _mm512_fmadd_ps(tanh16(acc[r][2]), one, zero);
      const __m512 o = _mm512_fmadd_ps(tanh16(acc[r][3]), half, half);
      float* cr = c + (r0 + r) * H + u0;
      const __m512 cn = _mm512_fmadd_ps(f, _mm512_loadu_ps(cr), _mm512_mul_ps(i, g));
      _mm512_storeu_ps(cr, cn);
      _mm512_storeu_ps(hb + r * H + u0, _mm512_mul_ps(tanh16(cn), o));
    }
  }
  std::memcpy(h + r0 * H, hb, R * H * sizeof(float));
}

// The layer stack on inputs x for one block (row r, input k at x[r * x_ld + k * x_step]),
// states h[l], c[l] (m, H) float32 in place; `gm`: gate_major of the packed weights; hb: 6 H
// floats of scratch.
void lstm16(const float* gm, const int64_t* off, int64_t L, int64_t H, int64_t n_in,
            const float* x, int64_t x_ld, int64_t x_step, int64_t m, float* const* h,
            float* const* c, float* hb) {
  const float* in = x;
  int64_t ld = x_ld, step = x_step;
  for (int64_t l = 0; l < L; ++l) {
    const Seg segs[2] = {{in, ld, step, l == 0 ? n_in : H, gm + off[3 * l]},
                         {h[l], H, 1, H, gm + off[3 * l + 1]}};
    const float* bias = gm + off[3 * l + 2];
    int64_t r0 = 0;
    for (; r0 + 6 <= m; r0 += 6) rows16<6>(segs, 2, bias, H, r0, m, c[l], h[l], hb);
    switch (m - r0) {
      case 5: rows16<5>(segs, 2, bias, H, r0, m, c[l], h[l], hb); break;
      case 4: rows16<4>(segs, 2, bias, H, r0, m, c[l], h[l], hb); break;
      case 3: rows16<3>(segs, 2, bias, H, r0, m, c[l], h[l], hb); break;
      case 2: rows16<2>(segs, 2, bias, H, r0, m, c[l], h[l], hb); break;
      case 1: rows16<1>(segs, 2, bias, H, r0, m, c[l], h[l], hb); break;
      default: break;
    }
    in = h[l];
    ld = H;
    step = 1;
  }
}
constexpr bool kHave16 = true;
#else
constexpr bool kHave16 = false;
void lstm16(const float*, const int64_t*, int64_t, int64_t, int64_t, const float*, int64_t,
            int64_t, int64_t, float* const*, float* const*, float*) {}
#endif

}  // namespace

// The sums of the gradient clipping: [sum g^2, sum v / v_corr] (g the bounded gradient, v the
// second moment of the last step, v_corr = 1 - beta2^(t-1)).
torch::Tensor clip_sums(torch::Tensor grad, torch::Tensor v, double bound, double v_corr,
                        int64_t block) {
  check_grad(grad, "clip_sums");
  const int64_t n = grad.numel();
  const Store V = store_of(v, n, "v");
  const float* g = grad.data_ptr<float>();
  const float G = static_cast<float>(bound), vc = static_cast<float>(v_corr);
  block = std::max<int64_t>(1, block);
  const int64_t nblocks = std::max<int64_t>(1, (n + block - 1) / block);
  std::vector<float> partial(2 * nblocks, 0.0f);
  run_blocks(nblocks, 2 * block, [&](int64_t b, float* rows) {
    const int64_t s = b * block, m = std::min(block, n - s);
    for (int64_t i = 0; i < m; ++i) {
      const float gb = bounded(g[s + i], G);
      rows[i] = gb * gb;
      rows[m + i] = V.get(s + i) / vc;
    }
    block_sums(rows, 2, m, partial.data() + 2 * b);
  });
  return combine(partial, 2, nblocks);
}

// The sums of the step-size adaptation: [sum -g prev, sum g^2, sum prev^2] (g the bounded
// gradient times the tensor's clip factor `scale`, prev the last direction).
torch::Tensor adapt_sums(torch::Tensor grad, torch::Tensor prev, double bound, double scale,
                         int64_t block) {
  check_grad(grad, "adapt_sums");
  const int64_t n = grad.numel();
  const Store P = store_of(prev, n, "prev");
  const float* g = grad.data_ptr<float>();
  const float G = static_cast<float>(bound), cs = static_cast<float>(scale);
  block = std::max<int64_t>(1, block);
  const int64_t nblocks = std::max<int64_t>(1, (n + block - 1) / block);
  std::vector<float> partial(3 * nblocks, 0.0f);
  run_blocks(nblocks, 3 * block, [&](int64_t b, float* rows) {
    const int64_t s = b * block, m = std::min(block, n - s);
    for (int64_t i = 0; i < m; ++i) {
      const float gc = bounded(g[s + i], G) * cs;
      const float p = P.get(s + i);
      rows[i] = -gc * p;
      rows[m + i] = gc * gc;
      rows[2 * m + i] = p * p;
    }
    block_sums(rows, 3, m, partial.data() + 3 * b);
  });
  return combine(partial, 3, nblocks);
}

namespace {

// Everything one step reads, for step_block.
struct StepCtx {
  int64_t n, H, L, n_in, n_out, adam_k;
  const float* g;
  void* m[5];  // the momenta, v, v_fast, prev (may be null), h[l], c[l]: storage S
  void* v;
  void* vf;
  void* prev;
  void* h[8];
  void* c[8];
  float G, clip, b2, omb2, sq2, eps, bcf, floor_, p, abound, oscale, exp_s, exp_lr;
  int64_t n_m;  // momenta: the LSTM's four, and a fifth when Adam's is none of them
  float w[5], bc[5];
  const float* packed;  // quad order (lstm_cell.cpp's kernel)
  const float* gm;      // gate-major (lstm16)
  const int64_t* off;
  LstmBlockFn fn;
  bool use16;
  torch::Tensor out_w, out_b;
  float* u;
  const float* dov;  // a direction given by the caller (may be null: Adam's)
};

// The moments of rows [0, m) (pointers at the block's first row): the gradient bounded and
// clipped (gcs), the momenta, v and v_fast updated in place (storage S; the slow average m3
// storage W and v storage Q: float32 beside bfloat16 S where they are slow averages, whose weight
// 1 - beta is below bfloat16's 8 bits; v is slow for beta2 = 0.999, not 0.95) and kept unrounded
// (mk0..mk3), v and the bias-corrected v_fast (sqv, sqf). torch.lerp with the momenta's weights:
// 1 - 0.5 (not below 0.5: from the end), 1 - 0.9, 1 - 0.99, 1 - 0.999 (from the start); an fma
// either way, as in ATen (checked by step_). Parameters, not locals, are __restrict: GCC then
// vectorizes without run-time alias checks.
template <typename S, typename W, typename Q>
void moments(const StepCtx& C, int64_t m, const float* __restrict g, S* __restrict M0,
             S* __restrict M1, S* __restrict M2, W* __restrict M3, Q* __restrict V,
             S* __restrict VF, float* __restrict gcs, float* __restrict mk0,
             float* __restrict mk1, float* __restrict mk2, float* __restrict mk3,
             float* __restrict sqv, float* __restrict sqf) {
  const float G = C.G, clip = C.clip, b2 = C.b2, omb2 = C.omb2, bcf = C.bcf;
  const float w0m1 = C.w[0] - 1.0f, w1 = C.w[1], w2 = C.w[2], w3 = C.w[3];
  for (int64_t i = 0; i < m; ++i) {
    const float gc = bounded(g[i], G) * clip;
    gcs[i] = gc;
    const float m0 = load_s(M0, i), m1 = load_s(M1, i), m2 = load_s(M2, i), m3 = load_s(M3, i);
    const float n0 = std::fma(w0m1, gc - m0, gc);
    const float n1 = std::fma(w1, gc - m1, m1);
    const float n2 = std::fma(w2, gc - m2, m2);
    const float n3 = std::fma(w3, gc - m3, m3);
    store_s(M0, i, n0);
    store_s(M1, i, n1);
    store_s(M2, i, n2);
    store_s(M3, i, n3);
    mk0[i] = n0;
    mk1[i] = n1;
    mk2[i] = n2;
    mk3[i] = n3;
    const float vn = load_s(V, i) * b2 + (omb2 * gc) * gc;
    store_s(V, i, vn);
    sqv[i] = vn;
    const float vf = load_s(VF, i) * 0.9f + (0.1f * gc) * gc;
    store_s(VF, i, vf);
    sqf[i] = vf / bcf;
  }
}

// The LSTM's inputs by column (x0..x4; the log arguments lg0, lg1, clamped at the floor) and
// Adam's direction, from the moments (sqv, sqf: the square roots of v and of v_fast's bias
// correction; mka: Adam's momentum, one of mk0..mk3).
void inputs(const StepCtx& C, int64_t m, const float* __restrict gcs,
            const float* __restrict sqv, const float* __restrict sqf,
            const float* __restrict mk0, const float* __restrict mk1,
            const float* __restrict mk2, const float* __restrict mk3,
            const float* __restrict mka, float* __restrict x0, float* __restrict x1,
            float* __restrict x2, float* __restrict x3, float* __restrict x4,
            float* __restrict lg0, float* __restrict lg1, float* __restrict dir) {
  const float sq2 = C.sq2, eps = C.eps, floor_ = C.floor_;
  const float bc0 = C.bc[0], bc1 = C.bc[1], bc2 = C.bc[2], bc3 = C.bc[3];
  const float bca = C.bc[C.adam_k];
  for (int64_t i = 0; i < m; ++i) {
    const float gc = gcs[i];
    const float den = sqv[i] / sq2 + eps;
    x0[i] = gc / den;
    x1[i] = (mk0[i] / bc0) / den;
    x2[i] = (mk1[i] / bc1) / den;
    x3[i] = (mk2[i] / bc2) / den;
    x4[i] = (mk3[i] / bc3) / den;
    const float r0 = std::fabs(gc) / den, r1 = (sqf[i] + eps) / den;
    lg0[i] = r0 > floor_ ? r0 : floor_;  // clamp_min (finite values)
    lg1[i] = r1 > floor_ ? r1 : floor_;
    dir[i] = -(mka[i] / bca) / den;
  }
}

// Rows [s, s + mrows) of the step, states stored as S (m3 as W, v as Q). Scratch: see step_.
template <typename S, typename W, typename Q>
void step_block(const StepCtx& C, int64_t s, int64_t mrows, int64_t block, float* scratch) {
  const int64_t H = C.H, L = C.L, n_out = C.n_out;
  // (the scratch arrays and the state entries never overlap)
  float* __restrict x = scratch;
  float* __restrict mk = x + 7 * block;   // (5, mrows): the new momenta
  float* __restrict sq = mk + 5 * block;  // (2, mrows): v, v_fast_hat; then their square roots
  float* __restrict lg = sq + 2 * block;  // (2, mrows): the log arguments; then their logs
  float* __restrict gcs = lg + 2 * block;
  float* __restrict dir = gcs + block;
  float* __restrict out = dir + block;  // (mrows, n_out)
  float* __restrict tt = out + 2 * block;
  float* dummy = tt + block;
  float* raw = dummy + 6 * H + 16;
  float* st = raw + 24 * H;
  moments<S, W, Q>(C, mrows, C.g + s, static_cast<S*>(C.m[0]) + s,
                   static_cast<S*>(C.m[1]) + s, static_cast<S*>(C.m[2]) + s,
                   static_cast<W*>(C.m[3]) + s, static_cast<Q*>(C.v) + s,
                   static_cast<S*>(C.vf) + s, gcs, mk, mk + mrows, mk + 2 * mrows,
                   mk + 3 * mrows, sq, sq + mrows);
  if (C.n_m == 5) {  // Adam's momentum, when it is none of the LSTM's (weight below 0.5)
    S* __restrict const M4 = static_cast<S*>(C.m[4]) + s;
    float* __restrict const mk4 = mk + 4 * mrows;
    const float w4 = C.w[4];
    for (int64_t i = 0; i < mrows; ++i) {
      const float m4 = load_s(M4, i);
      const float n4 = std::fma(w4, gcs[i] - m4, m4);
      store_s(M4, i, n4);
      mk4[i] = n4;
    }
  }
  {  // torch.sqrt (not always the correctly rounded root: the forward's)
    auto t = torch::from_blob(sq, {2 * mrows}, torch::kFloat32);
    at::sqrt_(t);
  }
  float* __restrict const lg0 = lg;
  float* __restrict const lg1 = lg + mrows;
  inputs(C, mrows, gcs, sq, sq + mrows, mk, mk + mrows, mk + 2 * mrows, mk + 3 * mrows,
         mk + C.adam_k * mrows, x, x + mrows, x + 2 * mrows, x + 3 * mrows, x + 4 * mrows, lg0,
         lg1, dir);
  {
    auto t = torch::from_blob(lg, {2 * mrows}, torch::kFloat32);
    at::log_(t);
  }
  const float p = C.p;
  float* __restrict const x5 = x + 5 * mrows;
  float* __restrict const x6 = x + 6 * mrows;
  for (int64_t i = 0; i < mrows; ++i) {
    x5[i] = lg0[i] / p;
    x6[i] = lg1[i] / p;
  }
  float* hp[8];
  float* cp[8];
  for (int64_t l = 0; l < L; ++l) {
    S* hs = static_cast<S*>(C.h[l]) + s * H;
    S* cs = static_cast<S*>(C.c[l]) + s * H;
    if constexpr (std::is_same_v<S, float>) {
      hp[l] = hs;
      cp[l] = cs;
    } else {
      hp[l] = st + 2 * l * mrows * H;
      cp[l] = hp[l] + mrows * H;
      for (int64_t q = 0; q < mrows * H; ++q) {
        hp[l][q] = load_s(hs, q);
        cp[l][q] = load_s(cs, q);
      }
    }
  }
  if (C.use16) {
    lstm16(C.gm, C.off, L, H, C.n_in, x, 1, mrows, mrows, hp, cp, raw);
  } else {  // lstm_cell.cpp's kernel reads the inputs by row: (mrows, 7)
    float* xr = mk;  // (the momenta's scratch is free again; 7 block floats with sq)
    for (int64_t i = 0; i < mrows; ++i) {
      for (int k = 0; k < 7; ++k) xr[7 * i + k] = x[k * mrows + i];
    }
    C.fn(C.packed, C.off, L, H, C.n_in, xr, mrows, hp, cp, dummy);
  }
  if constexpr (!std::is_same_v<S, float>) {
    for (int64_t l = 0; l < L; ++l) {
      S* hs = static_cast<S*>(C.h[l]) + s * H;
      S* cs = static_cast<S*>(C.c[l]) + s * H;
      for (int64_t q = 0; q < mrows * H; ++q) {
        store_s(hs, q, hp[l][q]);
        store_s(cs, q, cp[l][q]);
      }
    }
  }
  {
    auto o = torch::from_blob(out, {mrows, n_out}, torch::kFloat32);
    auto h = torch::from_blob(hp[L - 1], {mrows, H}, torch::kFloat32);
    at::addmm_out(o, C.out_b, h, C.out_w);
  }
  for (int64_t i = 0; i < mrows * n_out; ++i) out[i] = out[i] * C.oscale;
  for (int64_t i = 0; i < mrows; ++i) tt[i] = out[i * n_out] / C.abound;
  {
    auto t = torch::from_blob(tt, {mrows}, torch::kFloat32);
    at::tanh_(t);
    for (int64_t i = 0; i < mrows; ++i) tt[i] = C.abound * tt[i];
    at::exp_(t);
  }
  S* __restrict const P = C.prev ? static_cast<S*>(C.prev) + s : nullptr;
  float* __restrict u = C.u + s;
  const float* __restrict d = C.dov ? C.dov + s : dir;
  for (int64_t i = 0; i < mrows; ++i) {
    const float ui = d[i] * tt[i];
    float r = ui;
    if (P) {
      store_s(P, i, ui);
      r = ui * C.exp_s;
    }
    if (n_out == 2) r = r + out[2 * i + 1];
    u[i] = C.exp_lr * r;
  }
}

void* state_ptr(const torch::Tensor& t, int64_t n, torch::ScalarType dt, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dt &&
                  t.dim() >= 1 && t.size(0) == n,
              "corrected_adam step_: ", what, " must be a contiguous CPU tensor of n rows, ",
              "of the states' dtype");
  return t.data_ptr();
}

}  // namespace

// The step. grad (n,) float32; m (4 momenta, betas 0.5, 0.9, 0.99, 0.999, and a fifth of weight
// 1 - beta below 0.5 stored like the first three; Adam's is m[adam_k]), v, v_fast, prev (may be
// empty: no adaptation), h[l], c[l] (n, H): all float32 or all bfloat16 (m[3] and v: each also
// float32 beside bfloat16), updated in place. `scalars`
// (float64): [bound G, clip scale, beta2, 1 - beta2,
// sqrt(1 - beta2^t), eps, 1 - 0.9^t, log floor, p, a_bound, output_scale, exp(s), exp(log lr),
// then per momentum (1 - beta_k, 1 - beta_k^t)]. out_w (H, n_out), out_b (n_out) (n_out = 2: the
// additive term). The LSTM: packed weights and offsets (pack_lstm), and the address of
// learned_opt_lstm_block (used when the hidden size is not a multiple of 16). `direction` (n,)
// float32, or empty: the direction the read-out scales, in place of Adam's (the caller's, e.g.
// an orthogonalized momentum). Returns the update.
torch::Tensor step_(torch::Tensor grad, std::vector<torch::Tensor> m, torch::Tensor v,
                    torch::Tensor v_fast, torch::Tensor prev, std::vector<torch::Tensor> hs,
                    std::vector<torch::Tensor> cs, torch::Tensor packed, torch::Tensor offsets,
                    int64_t lstm_block, int64_t n_in, torch::Tensor out_w, torch::Tensor out_b,
                    std::vector<double> scalars, int64_t adam_k, int64_t block,
                    torch::Tensor direction) {
  check_grad(grad, "step_");
  const int64_t n = grad.numel(), L = static_cast<int64_t>(hs.size());
  const int64_t n_m = static_cast<int64_t>(m.size());
  TORCH_CHECK((n_m == 4 || n_m == 5) && (int64_t)cs.size() == L && L >= 1 && L <= 8 && n_in == 7,
              "step_: four or five momenta, one h and c per layer (at most 8), seven inputs");
  TORCH_CHECK(scalars.size() == 13 + 2 * n_m && adam_k >= 0 && adam_k < n_m, "step_: scalars");
  TORCH_CHECK(n_m == 4 || std::fabs(static_cast<float>(scalars[21])) < 0.5f,
              "step_: a fifth momentum's weight 1 - beta must be below 0.5");
  TORCH_CHECK(std::fabs(static_cast<float>(scalars[13])) >= 0.5f &&
                  std::fabs(static_cast<float>(scalars[15])) < 0.5f &&
                  std::fabs(static_cast<float>(scalars[17])) < 0.5f &&
                  std::fabs(static_cast<float>(scalars[19])) < 0.5f,
              "step_: momentum weights 1 - beta for betas 0.5, 0.9, 0.99, 0.999 expected");
  const int64_t H = hs[0].size(1);
  const int64_t n_out = out_w.size(1);
  TORCH_CHECK(out_w.dim() == 2 && out_w.size(0) == H && (n_out == 1 || n_out == 2) &&
                  out_b.numel() == n_out && out_w.scalar_type() == torch::kFloat32 &&
                  out_b.scalar_type() == torch::kFloat32,
              "step_: read-out shapes");
  TORCH_CHECK(packed.scalar_type() == torch::kFloat32 && packed.is_contiguous() &&
                  offsets.scalar_type() == torch::kInt64 && offsets.numel() == 3 * L,
              "step_: packed LSTM weights");
  const auto sdt = m[0].scalar_type(), pdt = m[3].scalar_type(), vdt = v.scalar_type();
  TORCH_CHECK((sdt == torch::kFloat32 || sdt == torch::kBFloat16) &&
                  (pdt == sdt || pdt == torch::kFloat32) && (vdt == sdt || vdt == torch::kFloat32),
              "step_: states must be float32 or bfloat16 (m3 and v: also float32)");
  StepCtx C;
  C.n = n;
  C.H = H;
  C.L = L;
  C.n_in = n_in;
  C.n_out = n_out;
  C.adam_k = adam_k;
  C.g = grad.data_ptr<float>();
  C.n_m = n_m;
  for (int k = 0; k < n_m; ++k) C.m[k] = state_ptr(m[k], n, k == 3 ? pdt : sdt, "a momentum");
  C.v = state_ptr(v, n, vdt, "v");
  C.vf = state_ptr(v_fast, n, sdt, "v_fast");
  C.prev = prev.numel() > 0 ? state_ptr(prev, n, sdt, "prev") : nullptr;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(hs[l].dim() == 2 && hs[l].size(1) == H && cs[l].sizes() == hs[l].sizes(),
                "step_: LSTM states (n, H)");
    C.h[l] = state_ptr(hs[l], n, sdt, "h");
    C.c[l] = state_ptr(cs[l], n, sdt, "c");
  }
  C.G = scalars[0];
  C.clip = scalars[1];
  C.b2 = scalars[2];
  C.omb2 = scalars[3];
  C.sq2 = scalars[4];
  C.eps = scalars[5];
  C.bcf = scalars[6];
  C.floor_ = scalars[7];
  C.p = scalars[8];
  C.abound = scalars[9];
  C.oscale = scalars[10];
  C.exp_s = scalars[11];
  C.exp_lr = scalars[12];
  for (int k = 0; k < n_m; ++k) {
    C.w[k] = static_cast<float>(scalars[13 + 2 * k]);
    C.bc[k] = static_cast<float>(scalars[14 + 2 * k]);
  }
  C.packed = packed.data_ptr<float>();
  const std::vector<float> gm = gate_major(C.packed, packed.numel(), H);
  C.gm = gm.data();
  C.off = offsets.data_ptr<int64_t>();
  C.fn = reinterpret_cast<LstmBlockFn>(lstm_block);
  C.use16 = kHave16 && H % 16 == 0;
  C.out_w = out_w.contiguous();
  C.out_b = out_b.contiguous();
  auto update = torch::empty({n}, grad.options());
  C.u = update.data_ptr<float>();
  C.dov = nullptr;
  if (direction.numel() > 0) {
    check_grad(direction, "step_ (direction)");
    TORCH_CHECK(direction.numel() == n, "step_: direction must have n coordinates");
    C.dov = direction.data_ptr<float>();
  }
  if (n == 0) return update;
  block = std::max<int64_t>(8, block);
  const int64_t nblocks = (n + block - 1) / block;
  const bool bf16 = sdt == torch::kBFloat16;
  // Scratch per thread: x (7 block), the new momenta (5 block), square-root and log arguments
  // (2 block each), gradient, direction, read-out (2 block), tanh/exp argument; the LSTM's
  // scratch (6 H + 16, and 6 * 4H for the 16-lane kernel's gate sums); float32 copies of
  // bfloat16 LSTM states (2 L block H).
  const int64_t sf = 22 * block + 30 * H + 16 + (bf16 ? 2 * L * block * H : 0);
  run_blocks(nblocks, sf, [&](int64_t b, float* scratch) {
    const int64_t s = b * block, rows = std::min(block, n - s);
    const bool m3f = pdt == torch::kFloat32, vf = vdt == torch::kFloat32;
    if (!bf16) {
      step_block<float, float, float>(C, s, rows, block, scratch);
    } else if (m3f && vf) {
      step_block<uint16_t, float, float>(C, s, rows, block, scratch);
    } else if (m3f) {
      step_block<uint16_t, float, uint16_t>(C, s, rows, block, scratch);
    } else if (vf) {
      step_block<uint16_t, uint16_t, float>(C, s, rows, block, scratch);
    } else {
      step_block<uint16_t, uint16_t, uint16_t>(C, s, rows, block, scratch);
    }
  });
  return update;
}

// The 16-lane LSTM layers on inputs x (n, n_in) in blocks of 128 rows, float32 states in place
// (for testing them against lstm_cell.cpp's kernel). False (nothing done) where not built.
bool lstm16_(torch::Tensor x, std::vector<torch::Tensor> hs, std::vector<torch::Tensor> cs,
             torch::Tensor packed, torch::Tensor offsets) {
  const int64_t L = static_cast<int64_t>(hs.size()), n = x.size(0), n_in = x.size(1);
  const int64_t H = hs[0].size(1);
  if (!kHave16 || H % 16 != 0) return false;
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat32, "lstm16_: x");
  std::vector<float*> hp, cp;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(hs[l].is_contiguous() && cs[l].is_contiguous() &&
                    hs[l].scalar_type() == torch::kFloat32 && hs[l].size(0) == n,
                "lstm16_: states");
    hp.push_back(hs[l].data_ptr<float>());
    cp.push_back(cs[l].data_ptr<float>());
  }
  std::vector<float> raw(24 * H);
  const std::vector<float> gm = gate_major(packed.data_ptr<float>(), packed.numel(), H);
  for (int64_t s = 0; s < n; s += 128) {
    std::vector<float*> hb(L), cb(L);
    for (int64_t l = 0; l < L; ++l) {
      hb[l] = hp[l] + s * H;
      cb[l] = cp[l] + s * H;
    }
    lstm16(gm.data(), offsets.data_ptr<int64_t>(), L, H, n_in,
           x.data_ptr<float>() + s * n_in, n_in, 1, std::min<int64_t>(128, n - s), hb.data(),
           cb.data(), raw.data());
  }
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm16_", &lstm16_, "the 16-lane LSTM layers (for tests)");
  m.def("clip_sums", &clip_sums, "sums of the per-tensor gradient clipping");
  m.def("adapt_sums", &adapt_sums, "sums of the per-tensor step-size adaptation");
  m.def("step_", &step_, "fused in-place step of the LSTM-corrected Adam rule");
}
