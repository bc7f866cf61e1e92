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

// Clamp to [-G, G] (learned_opt.rules.base.bounded_grad): min(max(g, -G), G).
inline float bounded(float g, float G) { return std::min(std::max(g, -G), G); }

// torch.lerp(s, e, w) for a scalar weight w (ATen's lerp: an fma either way).
inline float torch_lerp(float s, float e, float w) {
  const float d = e - s;
  return std::fabs(w) < 0.5f ? std::fma(w, d, s) : std::fma(w - 1.0f, d, e);
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

// Gate activations of one quad (4 units): lanes [i, f, g, o] from their pre-activations.
inline __m512 activate(__m512 z) {
  const __m512 t = tanh16(z);
  const __m512 if_ = _mm512_mul_ps(_mm512_add_ps(t, _mm512_set1_ps(1.0f)), _mm512_set1_ps(0.5f));
  const __m512 scale = _mm512_setr_ps(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0.5f, 0.5f, 0.5f, 0.5f);
  const __m512 shift = _mm512_setr_ps(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f, 0.5f, 0.5f, 0.5f);
  return _mm512_mask_blend_ps(0xff00, if_, _mm512_fmadd_ps(t, scale, shift));
}

struct Seg {
  const float* a;  // rows of inputs, leading dimension lda
  int64_t lda;
  int64_t K;
  const float* w;  // packed (K, 4H)
};

// Rows r0 .. r0 + R - 1 of one layer: gate sums into raw (R, 4H), then per row the cell update
// of c and the new h (both (m, H), in place; the rows' old h is read by the gate sums only).
template <int R>
void rows16(const Seg* segs, int nseg, const float* bias, int64_t H, int64_t r0, float* c,
            float* h, float* raw) {
  const int64_t N = 4 * H, nq = H / 4;
  for (int64_t q0 = 0; q0 < nq; q0 += 4) {
    __m512 acc[R][4];
    for (int j = 0; j < 4; ++j) {
      const __m512 b = _mm512_loadu_ps(bias + 16 * (q0 + j));
      for (int r = 0; r < R; ++r) acc[r][j] = b;
    }
    for (int s = 0; s < nseg; ++s) {
      const float* a[R];
      for (int r = 0; r < R; ++r) a[r] = segs[s].a + (r0 + r) * segs[s].lda;
      const float* w = segs[s].w + 16 * q0;
      for (int64_t k = 0; k < segs[s].K; ++k) {
        const __m512 w0 = _mm512_loadu_ps(w + k * N), w1 = _mm512_loadu_ps(w + k * N + 16),
                     w2 = _mm512_loadu_ps(w + k * N + 32), w3 = _mm512_loadu_ps(w + k * N + 48);
        for (int r = 0; r < R; ++r) {
          const __m512 x = _mm512_set1_ps(a[r][k]);
          acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
          acc[r][2] = _mm512_fmadd_ps(x, w2, acc[r][2]);
          acc[r][3] = _mm512_fmadd_ps(x, w3, acc[r][3]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(raw + r * N + 16 * (q0 + j), acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* cr = c + (r0 + r) * H;
    float* hr = h + (r0 + r) * H;
    for (int64_t u0 = 0; u0 < H; u0 += 16) {
      const float* z = raw + r * N + 4 * u0;  // the 4 quads of units u0 .. u0 + 15
      const __m512 a0 = activate(_mm512_loadu_ps(z)), a1 = activate(_mm512_loadu_ps(z + 16)),
                   a2 = activate(_mm512_loadu_ps(z + 32)), a3 = activate(_mm512_loadu_ps(z + 48));
      const __m512 t0 = _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0));  // i0 f0 i1 f1
      const __m512 t1 = _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0));  // i2 f2 i3 f3
      const __m512 t2 = _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2));  // g0 o0 g1 o1
      const __m512 t3 = _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2));  // g2 o2 g3 o3
      const __m512 i = _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));
      const __m512 f = _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));
      const __m512 g = _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0));
      const __m512 o = _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1));
      const __m512 cn = _mm512_fmadd_ps(f, _mm512_loadu_ps(cr + u0), _mm512_mul_ps(i, g));
      _mm512_storeu_ps(cr + u0, cn);
      _mm512_storeu_ps(hr + u0, _mm512_mul_ps(tanh16(cn), o));
    }
  }
}

// The layer stack on inputs x (m, n_in) for one block, states h[l], c[l] (m, H) float32 in place;
// raw: 6 * 4H floats of scratch.
void lstm16(const float* packed, const int64_t* off, int64_t L, int64_t H, int64_t n_in,
            const float* x, int64_t m, float* const* h, float* const* c, float* raw) {
  const float* in = x;
  int64_t ld = n_in;
  for (int64_t l = 0; l < L; ++l) {
    const Seg segs[2] = {{in, ld, l == 0 ? n_in : H, packed + off[3 * l]},
                         {h[l], H, H, packed + off[3 * l + 1]}};
    const float* bias = packed + off[3 * l + 2];
    int64_t r0 = 0;
    for (; r0 + 6 <= m; r0 += 6) rows16<6>(segs, 2, bias, H, r0, c[l], h[l], raw);
    switch (m - r0) {
      case 5: rows16<5>(segs, 2, bias, H, r0, c[l], h[l], raw); break;
      case 4: rows16<4>(segs, 2, bias, H, r0, c[l], h[l], raw); break;
      case 3: rows16<3>(segs, 2, bias, H, r0, c[l], h[l], raw); break;
      case 2: rows16<2>(segs, 2, bias, H, r0, c[l], h[l], raw); break;
      case 1: rows16<1>(segs, 2, bias, H, r0, c[l], h[l], raw); break;
      default: break;
    }
    in = h[l];
    ld = H;
  }
}
constexpr bool kHave16 = true;
#else
constexpr bool kHave16 = false;
void lstm16(const float*, const int64_t*, int64_t, int64_t, int64_t, const float*, int64_t,
            float* const*, float* const*, float*) {}
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

// The step. grad (n,) float32; m (4 momenta, betas 0.5, 0.9, 0.99, 0.999; Adam's is m[adam_k]), v,
// v_fast, prev (may be empty: no adaptation), h[l], c[l] (n, H): float32 or bfloat16, updated in
// place. `scalars` (float64): [bound G, clip scale, beta2, 1 - beta2, sqrt(1 - beta2^t), eps,
// 1 - 0.9^t, log floor, p, a_bound, output_scale, exp(s), exp(log lr), then per momentum
// (1 - beta_k, 1 - beta_k^t)]. out_w (H, n_out), out_b (n_out) (n_out = 2: the additive term).
// Returns the update (n,).
torch::Tensor step_(torch::Tensor grad, std::vector<torch::Tensor> m, torch::Tensor v,
                    torch::Tensor v_fast, torch::Tensor prev, std::vector<torch::Tensor> hs,
                    std::vector<torch::Tensor> cs, torch::Tensor packed, torch::Tensor offsets,
                    int64_t lstm_block, int64_t n_in, torch::Tensor out_w, torch::Tensor out_b,
                    std::vector<double> scalars, int64_t adam_k, int64_t block) {
  check_grad(grad, "step_");
  const int64_t n = grad.numel(), L = static_cast<int64_t>(hs.size());
  TORCH_CHECK(m.size() == 4 && (int64_t)cs.size() == L && L >= 1 && n_in == 7,
              "step_: four momenta, one h and c per layer, seven inputs");
  TORCH_CHECK(scalars.size() == 13 + 2 * 4 && adam_k >= 0 && adam_k < 4, "step_: scalars");
  const int64_t H = hs[0].size(1);
  const int64_t n_out = out_w.size(1);
  TORCH_CHECK(out_w.dim() == 2 && out_w.size(0) == H && (n_out == 1 || n_out == 2) &&
                  out_b.numel() == n_out && out_w.scalar_type() == torch::kFloat32 &&
                  out_b.scalar_type() == torch::kFloat32,
              "step_: read-out shapes");
  TORCH_CHECK(packed.scalar_type() == torch::kFloat32 && packed.is_contiguous() &&
                  offsets.scalar_type() == torch::kInt64 && offsets.numel() == 3 * L,
              "step_: packed LSTM weights");
  Store M[4];
  for (int k = 0; k < 4; ++k) M[k] = store_of(m[k], n, "a momentum");
  const Store V = store_of(v, n, "v"), VF = store_of(v_fast, n, "v_fast");
  const bool adapt = prev.numel() > 0;
  const Store P = adapt ? store_of(prev, n, "prev") : Store{};
  std::vector<Store> Hs, Cs;
  const auto sdt = hs[0].scalar_type();
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(hs[l].dim() == 2 && hs[l].size(0) == n && hs[l].size(1) == H &&
                    cs[l].sizes() == hs[l].sizes() && hs[l].scalar_type() == sdt &&
                    cs[l].scalar_type() == sdt,
                "step_: LSTM states (n, H) of one dtype");
    Hs.push_back(store_of(hs[l], n, "h"));
    Cs.push_back(store_of(cs[l], n, "c"));
  }
  const bool bf16 = sdt == torch::kBFloat16;
  const float* g = grad.data_ptr<float>();
  const float G = scalars[0], clip = scalars[1], b2 = scalars[2], omb2 = scalars[3],
              sq2 = scalars[4], eps = scalars[5], bcf = scalars[6], floor_ = scalars[7],
              p = scalars[8], abound = scalars[9], oscale = scalars[10], exp_s = scalars[11],
              exp_lr = scalars[12];
  float w[4], bc[4];
  for (int k = 0; k < 4; ++k) {
    w[k] = static_cast<float>(scalars[13 + 2 * k]);
    bc[k] = static_cast<float>(scalars[14 + 2 * k]);
  }
  const float* pk = packed.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const auto fn = reinterpret_cast<LstmBlockFn>(lstm_block);
  const auto out_wc = out_w.contiguous(), out_bc = out_b.contiguous();
  auto update = torch::empty({n}, grad.options());
  float* u = update.data_ptr<float>();
  if (n == 0) return update;
  block = std::max<int64_t>(8, block);
  const int64_t nblocks = (n + block - 1) / block;
  // scratch per thread: x (7 block), the new momenta (4 block), square-root and log arguments
  // (2 block each), gradient, direction, read-out (2 block), tanh/exp argument, LSTM dummy
  // (6 H + 16), float32 copies of bfloat16 LSTM states (2 L block H)
  // (and 6 * 4H for the 16-lane LSTM's gate sums)
  const bool use16 = kHave16 && H % 16 == 0;
  const int64_t sf = 21 * block + 6 * H + 16 + 24 * H + (bf16 ? 2 * L * block * H : 0);
  run_blocks(nblocks, sf, [&](int64_t b, float* scratch) {
    const int64_t s = b * block, mrows = std::min(block, n - s);
    float* x = scratch;
    float* mk = x + 7 * block;   // (4, mrows)
    float* sq = mk + 4 * block;  // (2, mrows): v, v_fast_hat; then their square roots
    float* lg = sq + 2 * block;  // (2, mrows): the log arguments; then their logs
    float* gcs = lg + 2 * block;
    float* dir = gcs + block;
    float* out = dir + block;  // (mrows, n_out)
    float* tt = out + 2 * block;
    float* dummy = tt + block;
    float* raw = dummy + 6 * H + 16;
    float* st = raw + 24 * H;
    for (int64_t i = 0; i < mrows; ++i) {
      const int64_t j = s + i;
      const float gc = bounded(g[j], G) * clip;
      gcs[i] = gc;
      for (int k = 0; k < 4; ++k) {
        const float mnew = torch_lerp(M[k].get(j), gc, w[k]);
        M[k].set(j, mnew);
        mk[k * mrows + i] = mnew;
      }
      const float vn = V.get(j) * b2 + (omb2 * gc) * gc;
      V.set(j, vn);
      sq[i] = vn;
      const float vf = VF.get(j) * 0.9f + (0.1f * gc) * gc;
      VF.set(j, vf);
      sq[mrows + i] = vf / bcf;
    }
    {  // torch.sqrt (not always the correctly rounded root: the forward's)
      auto t = torch::from_blob(sq, {2 * mrows}, torch::kFloat32);
      at::sqrt_(t);
    }
    for (int64_t i = 0; i < mrows; ++i) {
      const float gc = gcs[i];
      const float den = sq[i] / sq2 + eps;
      float* xi = x + 7 * i;
      xi[0] = gc / den;
      for (int k = 0; k < 4; ++k) xi[1 + k] = (mk[k * mrows + i] / bc[k]) / den;
      lg[i] = std::max(std::fabs(gc) / den, floor_);
      lg[mrows + i] = std::max((sq[mrows + i] + eps) / den, floor_);
      dir[i] = -(mk[adam_k * mrows + i] / bc[adam_k]) / den;
    }
    {
      auto t = torch::from_blob(lg, {2 * mrows}, torch::kFloat32);
      at::log_(t);
    }
    for (int64_t i = 0; i < mrows; ++i) {
      x[7 * i + 5] = lg[i] / p;
      x[7 * i + 6] = lg[mrows + i] / p;
    }
    float* hp[8];
    float* cp[8];
    TORCH_CHECK(L <= 8, "step_: at most 8 layers");
    for (int64_t l = 0; l < L; ++l) {
      if (bf16) {
        hp[l] = st + 2 * l * mrows * H;
        cp[l] = hp[l] + mrows * H;
        for (int64_t q = 0; q < mrows * H; ++q) {
          hp[l][q] = Hs[l].get(s * H + q);
          cp[l][q] = Cs[l].get(s * H + q);
        }
      } else {
        hp[l] = Hs[l].f + s * H;
        cp[l] = Cs[l].f + s * H;
      }
    }
    if (use16) {
      lstm16(pk, off, L, H, n_in, x, mrows, hp, cp, raw);
    } else {
      fn(pk, off, L, H, n_in, x, mrows, hp, cp, dummy);
    }
    if (bf16) {
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t q = 0; q < mrows * H; ++q) {
          Hs[l].set(s * H + q, hp[l][q]);
          Cs[l].set(s * H + q, cp[l][q]);
        }
      }
    }
    {
      auto o = torch::from_blob(out, {mrows, n_out}, torch::kFloat32);
      auto h = torch::from_blob(hp[L - 1], {mrows, H}, torch::kFloat32);
      at::addmm_out(o, out_bc, h, out_wc);
    }
    for (int64_t i = 0; i < mrows * n_out; ++i) out[i] = out[i] * oscale;
    for (int64_t i = 0; i < mrows; ++i) tt[i] = out[i * n_out] / abound;
    {
      auto t = torch::from_blob(tt, {mrows}, torch::kFloat32);
      at::tanh_(t);
      for (int64_t i = 0; i < mrows; ++i) tt[i] = abound * tt[i];
      at::exp_(t);
    }
    for (int64_t i = 0; i < mrows; ++i) {
      const int64_t j = s + i;
      const float ui = dir[i] * tt[i];
      float r = ui;
      if (adapt) {
        P.set(j, ui);
        r = ui * exp_s;
      }
      if (n_out == 2) r = r + out[2 * i + 1];
      u[j] = exp_lr * r;
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
  for (int64_t s = 0; s < n; s += 128) {
    std::vector<float*> hb(L), cb(L);
    for (int64_t l = 0; l < L; ++l) {
      hb[l] = hp[l] + s * H;
      cb[l] = cp[l] + s * H;
    }
    lstm16(packed.data_ptr<float>(), offsets.data_ptr<int64_t>(), L, H, n_in,
           x.data_ptr<float>() + s * n_in, std::min<int64_t>(128, n - s), hb.data(), cb.data(),
           raw.data());
  }
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm16_", &lstm16_, "the 16-lane LSTM layers (for tests)");
  m.def("clip_sums", &clip_sums, "sums of the per-tensor gradient clipping");
  m.def("adapt_sums", &adapt_sums, "sums of the per-tensor step-size adaptation");
  m.def("step_", &step_, "fused in-place step of the LSTM-corrected Adam rule");
}
