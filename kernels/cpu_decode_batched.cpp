// One decode token of each of B sequences through every layer, as one C++ call (CPU): the batched
// counterpart of cpu_decode.cpp (single token), kept in its own file.
//
// Why: at 16 streams Model.forward spent ~45 ms per step on the 2-core EPYC (int4 model, 1 thread),
// of which ~19 ms in DensePagedAttention (RoPE, two index_copy_, a padded gather of every sequence's
// K/V, a mask, and torch's CPU flash kernel, which handles 3 query rows per KV head poorly) and ~7 ms
// in ~900 small torch ops (RMSNorm's 7-op composite, casts, SiLU, adds); the linears (fbgemm int8 at
// 16 rows) ~20 ms. Here the linears stay torch's kernels -- fbgemm's dynamic int8 linear called through
// its packed-params object (no dispatcher, no Python), the int4 op on bf16 rows for <= max_small rows
// (as Int4Linear), at::linear for fp32 -- and everything else is loops over preallocated buffers:
// RMSNorm, RoPE on q and k, the cache write, attention read straight from the paged cache through
// each sequence's block table (no gather, no padding; sequences in parallel), SiLU*mul, residuals.
// Not bit-identical to Model.forward (own reductions and exp); tests/kernels/test_cpu_decode_batched.py
// bounds the difference against Model.forward and a float64 reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/jit/api/object.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <memory>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
using clock = std::chrono::steady_clock;

enum Kind : int64_t { NONE = 0, FP32 = 1, INT8 = 2, INT4 = 3 };

struct Kernel {
  int64_t kind = NONE;
  at::Tensor w, sz, bias;  // fp32: w (N, K); int4: w packed, sz bf16 (K/g, N, 2), bias added after
  int64_t group = 0;
  c10::intrusive_ptr<LinearPackedParamsBase> q8;  // int8: fbgemm packed weights (bias inside)
  bool reduce_range = false;
};

struct Lin {
  Kernel small, large;  // large (if any) for calls of more than max_small rows
  int64_t max_small = 0, n = 0, k = 0;
  const Kernel& pick(int64_t rows) const { return (large.kind != NONE && rows > max_small) ? large : small; }
};

// e^x, Cephes-style range reduction + degree-6 polynomial (~2 ulp; x clamped to [-87, 88]); a plain
// loop of it vectorizes, std::exp does not (softmax and SiLU: ~1.4M exps per 16-stream step)
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return y * s;
}

// softmax of each query head's scores in place, unnormalized; returns 1 / sum per head in inv
inline void softmax_rows(float* sc, int64_t Hq, int64_t n, float* inv) {
  for (int64_t hh = 0; hh < Hq; ++hh) {
    float* s = sc + hh * n;
    float m = s[0];
    for (int64_t t = 1; t < n; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      s[t] = fast_exp(s[t] - m);
      sum += s[t];
    }
    inv[hh] = 1.0f / sum;
  }
}

// one sequence's attention, any head_dim: q (Hq*D, pre-scaled) over tokens 0..n-1 of the paged cache
// kc/vc (per slot Hkv*D floats) through block table tb; scores in sc (Hq*n), out (Hq*D)
void attend_generic(const float* q, int64_t n, const float* kc, const float* vc, const int32_t* tb, int64_t BS,
                    int64_t Hkv, int64_t G, int64_t D, float* sc, float* acc, float* out) {
  const int64_t Hq = Hkv * G, row = Hkv * D;
  for (int64_t t0 = 0, bi = 0; t0 < n; t0 += BS, ++bi) {  // block by block: no division per token
    const float* kb = kc + static_cast<int64_t>(tb[bi]) * BS * row;
    for (int64_t o = 0; o < std::min(BS, n - t0); ++o)
      for (int64_t hh = 0; hh < Hq; ++hh) {
        const float* qh = q + hh * D;
        const float* k = kb + o * row + (hh / G) * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < D; ++j) s += qh[j] * k[j];
        sc[hh * n + t0 + o] = s;
      }
  }
  std::vector<float> inv(Hq);
  softmax_rows(sc, Hq, n, inv.data());
  std::fill(acc, acc + Hq * D, 0.f);
  for (int64_t t0 = 0, bi = 0; t0 < n; t0 += BS, ++bi) {
    const float* vb = vc + static_cast<int64_t>(tb[bi]) * BS * row;
    for (int64_t o = 0; o < std::min(BS, n - t0); ++o)
      for (int64_t hh = 0; hh < Hq; ++hh) {
        const float p = sc[hh * n + t0 + o];
        const float* v = vb + o * row + (hh / G) * D;
        float* a = acc + hh * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) a[j] += p * v[j];
      }
  }
  for (int64_t hh = 0; hh < Hq; ++hh)
    for (int64_t j = 0; j < D; ++j) out[hh * D + j] = acc[hh * D + j] * inv[hh];
}

#ifdef __AVX512F__
// lane i of the result = sum of the 16 lanes of a[i] (a transpose-add tree: 15 adds, 30 shuffles for 16
// sums, instead of a horizontal reduction per dot product)
inline __m512 hsum16(const __m512* a) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d l = _mm512_castps_pd(x[2 * i]), h = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(l, h)), _mm512_castpd_ps(_mm512_unpackhi_pd(l, h)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x44), _mm512_shuffle_f32x4(y[0], y[1], 0xEE));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x44), _mm512_shuffle_f32x4(y[2], y[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// attend_generic for head_dim 16 * ND: scores 16 tokens at a time, the output accumulated in registers
template <int ND>
void attend_avx512(const float* q, int64_t n, const float* kc, const float* vc, const int32_t* tb, int64_t BS,
                   int64_t Hkv, int64_t G, float* sc, float* out) {
  constexpr int64_t D = 16 * ND;
  const int64_t Hq = Hkv * G, row = Hkv * D;
  for (int64_t t0 = 0, bi = 0; t0 < n; t0 += BS, ++bi) {
    const float* kb = kc + static_cast<int64_t>(tb[bi]) * BS * row;
    const int64_t nb = std::min(BS, n - t0);
    // the blocks are scattered in the pool, so the hardware prefetcher stops at each block's end: fetch
    // the next block's keys (to L1) and this block's values (to L2, for the second pass) ahead
    if (t0 + BS < n) {
      const char* nk = reinterpret_cast<const char*>(kc + static_cast<int64_t>(tb[bi + 1]) * BS * row);
      const int64_t bytes = std::min(BS, n - t0 - BS) * row * 4;
      for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(nk + off, _MM_HINT_T0);
    }
    {
      const char* vb = reinterpret_cast<const char*>(vc + static_cast<int64_t>(tb[bi]) * BS * row);
      for (int64_t off = 0; off < nb * row * 4; off += 64) _mm_prefetch(vb + off, _MM_HINT_T1);
    }
    for (int64_t c0 = 0; c0 < nb; c0 += 16) {  // chunks of <= 16 tokens within the block
      const int64_t cnt = std::min<int64_t>(16, nb - c0);
      for (int64_t hh = 0; hh < Hq; ++hh) {
        __m512 qv[ND], acc[16];
        for (int c = 0; c < ND; ++c) qv[c] = _mm512_loadu_ps(q + hh * D + 16 * c);
        const float* kh = kb + c0 * row + (hh / G) * D;
        for (int64_t tt = 0; tt < 16; ++tt) {
          if (tt < cnt) {
            const float* k = kh + tt * row;
            __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
            for (int c = 1; c < ND; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), a);
            acc[tt] = a;
          } else {
            acc[tt] = _mm512_setzero_ps();
          }
        }
        _mm512_mask_storeu_ps(sc + hh * n + t0 + c0, static_cast<__mmask16>((1u << cnt) - 1), hsum16(acc));
      }
    }
  }
  std::vector<float> inv(Hq);
  softmax_rows(sc, Hq, n, inv.data());
  for (int64_t hh = 0; hh < Hq; ++hh) {
    __m512 acc[ND];
    for (int c = 0; c < ND; ++c) acc[c] = _mm512_setzero_ps();
    const float* s = sc + hh * n;
    for (int64_t t0 = 0, bi = 0; t0 < n; t0 += BS, ++bi) {
      const float* vh = vc + static_cast<int64_t>(tb[bi]) * BS * row + (hh / G) * D;
      const int64_t nb = std::min(BS, n - t0);
      for (int64_t o = 0; o < nb; ++o) {
        const __m512 p = _mm512_set1_ps(s[t0 + o]);
        const float* v = vh + o * row;
        for (int c = 0; c < ND; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16 * c), acc[c]);
      }
    }
    const __m512 iv = _mm512_set1_ps(inv[hh]);
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(out + hh * D + 16 * c, _mm512_mul_ps(acc[c], iv));
  }
}
#endif

class BatchedDecodeModel {
 public:
  BatchedDecodeModel(at::Tensor embed, std::vector<at::Tensor> norms, at::Tensor final_norm, int64_t hq, int64_t hkv,
                     int64_t d, double eps)
      : embed_(embed.contiguous()), final_norm_(final_norm.contiguous()), hq_(hq), hkv_(hkv), d_(d), eps_(eps) {
    if (hq % hkv || d % 2) throw std::invalid_argument("BatchedDecodeModel: heads divisible by kv heads, even head_dim");
    for (auto& t : norms) norms_.push_back(t.contiguous());
    h_ = embed_.size(1);
    hooked_.assign(norms_.size() / 2, false);
  }

  ~BatchedDecodeModel() {
    if (hook_) {  // a Python object: released with the GIL held
      pybind11::gil_scoped_acquire g;
      hook_.reset();
    }
  }

  // Memory layers (issue 16): layers whose FFN runs in Python (runtime/ffn.py FFN: lookup, value store, stats,
  // the MLP in "parallel" mode); fn(layer, x (B, hidden) fp32 post-attention-normed) -> (B, hidden), added to
  // the residual. Their gate_up / down are added as NONE linears.
  void set_ffn_hook(std::vector<int64_t> layers, pybind11::function fn) {
    hooked_.assign(norms_.size() / 2, false);
    for (int64_t i : layers) {
      if (i < 0 || i >= static_cast<int64_t>(hooked_.size())) throw std::invalid_argument("hooked layer out of range");
      hooked_[i] = true;
    }
    hook_ = std::make_unique<pybind11::function>(std::move(fn));
  }

  // linears in order: per layer qkv, o, gate_up, down; then the LM head. kind_* from Kind; packed_*: the
  // fbgemm packed-params ScriptObject for INT8 (None otherwise)
  void add_linear(int64_t kind_s, at::Tensor w_s, at::Tensor sz_s, int64_t group_s, at::Tensor bias_s,
                  pybind11::object packed_s, bool rr_s, int64_t kind_l, at::Tensor w_l, at::Tensor bias_l,
                  pybind11::object packed_l, bool rr_l, int64_t max_small, int64_t n, int64_t k) {
    Lin l;
    l.small = kernel(kind_s, w_s, sz_s, group_s, bias_s, packed_s, rr_s);
    l.large = kernel(kind_l, w_l, at::Tensor(), 0, bias_l, packed_l, rr_l);
    l.max_small = max_small;
    l.n = n;
    l.k = k;
    lins_.push_back(l);
  }

  // logits (B, V) fp32. tokens, pos, slots (B,) int64; block_tables (B, MAXB) int32; kv the flat cache
  // (2, L, slots, Hkv, D) fp32, contiguous. Sequence b's token is at position pos[b], its k/v go to flat
  // slot slots[b], and it attends to positions 0..pos[b] (itself included) through its block table.
  at::Tensor step(const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& slots,
                  const at::Tensor& block_tables, const at::Tensor& cos_t, const at::Tensor& sin_t, at::Tensor kv,
                  int64_t block_size) {
    const int64_t B = tokens.size(0), H = h_, D = d_, NL = static_cast<int64_t>(norms_.size() / 2);
    if (static_cast<int64_t>(lins_.size()) != 4 * NL + 1) throw std::invalid_argument("need 4 linears per layer + LM head");
    if (kv.scalar_type() != at::kFloat || !kv.is_contiguous() || kv.dim() != 5 || kv.size(1) != NL ||
        kv.size(3) != hkv_ || kv.size(4) != D)
      throw std::invalid_argument("kv must be the contiguous fp32 flat cache (2, L, slots, Hkv, D)");
    if (pos.size(0) != B || slots.size(0) != B || block_tables.size(0) != B || block_tables.scalar_type() != at::kInt ||
        !block_tables.is_contiguous() || tokens.scalar_type() != at::kLong || pos.scalar_type() != at::kLong ||
        slots.scalar_type() != at::kLong)
      throw std::invalid_argument("tokens/pos/slots (B,) int64, block_tables (B, MAXB) int32 contiguous");
    const int64_t* tk = tokens.data_ptr<int64_t>();
    const int64_t* ps = pos.data_ptr<int64_t>();
    const int64_t* sl = slots.data_ptr<int64_t>();
    const int32_t* bt = block_tables.data_ptr<int32_t>();
    const int64_t maxb = block_tables.size(1), nslots = kv.size(2);
    for (int64_t b = 0; b < B; ++b) {
      if (tk[b] < 0 || tk[b] >= embed_.size(0)) throw std::invalid_argument("token id out of range");
      if (ps[b] < 0 || ps[b] >= cos_t.size(0) || ps[b] / block_size >= maxb) throw std::invalid_argument("position out of range");
      if (sl[b] < 0 || sl[b] >= nslots) throw std::invalid_argument("slot out of range");
      for (int64_t j = 0; j <= ps[b] / block_size; ++j)
        if (bt[b * maxb + j] < 0 || (bt[b * maxb + j] + 1) * block_size > nslots) throw std::invalid_argument("block id out of range");
    }
    auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor hidden = at::empty({B, H}, f32);
    float* h = hidden.data_ptr<float>();
    const float* e = embed_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::memcpy(h + b * H, e + tk[b] * H, H * sizeof(float));
    float* kvp = kv.data_ptr<float>();
    const int64_t qkvn = (hq_ + 2 * hkv_) * D;
    at::Tensor attn_out = at::empty({B, hq_ * D}, f32);
    const auto t_start = clock::now();
    double t_attn = 0;
    for (int64_t i = 0; i < NL; ++i) {
      const Lin& lq = lins_[4 * i];
      const Lin& lo = lins_[4 * i + 1];
      const Lin& lg = lins_[4 * i + 2];
      const Lin& ld = lins_[4 * i + 3];
      at::Tensor qkv = as_f32(lq, run(lq, norm_into(h, B, norms_[2 * i], lq)));  // (B, qkvn)
      if (qkv.size(1) != qkvn) throw std::invalid_argument("qkv width != (Hq + 2 Hkv) * D");
      const auto t0 = clock::now();
      attention(qkv.data_ptr<float>(), B, i, ps, sl, bt, maxb, block_size, cos_t.data_ptr<float>(),
                sin_t.data_ptr<float>(), kvp, nslots, attn_out.data_ptr<float>(), false, NL);
      t_attn += std::chrono::duration<double>(clock::now() - t0).count();
      add_out(h, B, lo, run(lo, in_from(lo, attn_out.data_ptr<float>(), B, lo.k)));
      if (hooked_[i]) {
        ffn_hook(i, h, B, norms_[2 * i + 1]);
        continue;
      }
      at::Tensor gu = as_f32(lg, run(lg, norm_into(h, B, norms_[2 * i + 1], lg)));  // (B, 2I)
      const int64_t I = lg.n / 2;
      float* g = gu.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        float* r = g + b * 2 * I;
#pragma omp simd
        for (int64_t j = 0; j < I; ++j) r[j] = r[j] / (1.0f + fast_exp(-r[j])) * r[I + j];
      }
      add_out(h, B, ld, run(ld, in_from_strided(ld, g, B, I, 2 * I)));
    }
    const Lin& head = lins_[4 * NL];
    at::Tensor logits = as_f32(head, run(head, norm_into(h, B, final_norm_, head)));
    seconds_[0] += std::chrono::duration<double>(clock::now() - t_start).count();
    seconds_[1] += t_attn;
    seconds_[2] += static_cast<double>(B);
    return logits;
  }

  // one layer's attention part of step() alone, on a copy of qkv (B, (Hq + 2 Hkv) D): RoPE, cache write,
  // attention; out (B, Hq D). `generic`: the plain-loop kernel even where the AVX-512 one applies. For the
  // kernel-level tests (against a float64 reference) and benchmarks
  at::Tensor attend(const at::Tensor& qkv, int64_t layer, const at::Tensor& pos, const at::Tensor& slots,
                    const at::Tensor& block_tables, const at::Tensor& cos_t, const at::Tensor& sin_t, at::Tensor kv,
                    int64_t block_size, bool generic) {
    const int64_t B = qkv.size(0);
    if (qkv.scalar_type() != at::kFloat || qkv.dim() != 2 || qkv.size(1) != (hq_ + 2 * hkv_) * d_ || kv.dim() != 5 ||
        !kv.is_contiguous() || kv.scalar_type() != at::kFloat || layer < 0 || layer >= kv.size(1) ||
        pos.size(0) != B || slots.size(0) != B || block_tables.size(0) != B || block_tables.scalar_type() != at::kInt)
      throw std::invalid_argument("attend: bad shapes / dtypes");
    at::Tensor q = qkv.contiguous().clone();
    at::Tensor out = at::empty({B, hq_ * d_}, q.options());
    attention(q.data_ptr<float>(), B, layer, pos.data_ptr<int64_t>(), slots.data_ptr<int64_t>(),
              block_tables.contiguous().data_ptr<int32_t>(), block_tables.size(1), block_size, cos_t.data_ptr<float>(),
              sin_t.data_ptr<float>(), kv.data_ptr<float>(), kv.size(2), out.data_ptr<float>(), generic, kv.size(1));
    return out;
  }

  // (seconds in step, of which in attention (RoPE, cache write, attention), rows) since construction:
  // where a batched step's time goes, next to the linears' share measured from outside
  std::vector<double> seconds() const { return {seconds_[0], seconds_[1], seconds_[2]}; }

 private:
  static Kernel kernel(int64_t kind, const at::Tensor& w, const at::Tensor& sz, int64_t group, const at::Tensor& bias,
                       const pybind11::object& packed, bool rr) {
    Kernel k;
    k.kind = kind;
    if (kind == INT8) {
      // the Python ScriptObject wraps a torch::jit::Object whose one slot holds the C++ object
      k.q8 = c10::IValue(packed.cast<torch::jit::Object>()._ivalue()).toCustomClass<LinearPackedParamsBase>();
      k.reduce_range = rr;
    } else if (kind == FP32) {
      k.w = w.contiguous();
    } else if (kind == INT4) {
      k.w = w;
      k.sz = sz;
      k.group = group;
    }
    if (kind != INT8 && bias.defined() && bias.numel()) k.bias = bias.to(at::kFloat).contiguous();
    return k;
  }

  // the input (B, K) of linear l as its kernel for B rows takes it: bf16 for int4, else fp32
  static at::ScalarType in_dtype(const Lin& l, int64_t rows) {
    return l.pick(rows).kind == INT4 ? at::kBFloat16 : at::kFloat;
  }

  static at::Tensor run(const Lin& l, const at::Tensor& x) {
    const Kernel& k = l.pick(x.size(0));
    switch (k.kind) {
      case INT8: return k.q8->apply_dynamic(x, k.reduce_range);
      case INT4: return at::_weight_int4pack_mm_for_cpu(x, k.w, k.group, k.sz);  // bf16 (B, N), bias not added
      case FP32: return k.bias.defined() ? at::linear(x, k.w, k.bias) : at::linear(x, k.w);
      default: throw std::invalid_argument("linear without a kernel");
    }
  }

  // y as contiguous fp32 with the int4 bias added (the int4 op adds none)
  static at::Tensor as_f32(const Lin& l, at::Tensor y) {
    const Kernel& k = l.pick(y.size(0));
    if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
    if (k.kind == INT4 && k.bias.defined()) y.add_(k.bias);
    return y.contiguous();
  }

  // h += y (B, H) for linear l's output y
  void add_out(float* h, int64_t B, const Lin& l, at::Tensor y) {
    y = as_f32(l, y);
    const float* p = y.data_ptr<float>();
    const int64_t n = B * h_;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h[j] += p[j];
  }

  at::Tensor buffer(int64_t rows, int64_t k, at::ScalarType dt) {
    for (auto& b : bufs_)
      if (b.size(0) == rows && b.size(1) == k && b.scalar_type() == dt) return b;
    bufs_.push_back(at::empty({rows, k}, at::TensorOptions().dtype(dt)));
    return bufs_.back();
  }

  at::Tensor in_from(const Lin& l, const float* src, int64_t B, int64_t K) { return in_from_strided(l, src, B, K, K); }

  // rows b of src (row stride `stride`, first K values) as l's input buffer
  at::Tensor in_from_strided(const Lin& l, const float* src, int64_t B, int64_t K, int64_t stride) {
    at::Tensor x = buffer(B, K, in_dtype(l, B));
    if (x.scalar_type() == at::kBFloat16) {
      bf16* p = x.data_ptr<bf16>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < K; ++j) p[b * K + j] = bf16(src[b * stride + j]);
    } else {
      float* p = x.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) std::memcpy(p + b * K, src + b * stride, K * sizeof(float));
    }
    return x;
  }

  // h += fn(i, RMSNorm(h) * w) through the Python FFN hook (set_ffn_hook)
  void ffn_hook(int64_t i, float* h, int64_t B, const at::Tensor& w) {
    at::Tensor x = at::empty({B, h_}, at::TensorOptions().dtype(at::kFloat));
    norm_rows(h, B, w, x.data_ptr<float>());
    at::Tensor y;
    {
      pybind11::gil_scoped_acquire g;
      y = (*hook_)(i, x).cast<at::Tensor>();
    }
    if (y.numel() != B * h_) throw std::runtime_error("FFN hook must return (B, hidden)");
    y = y.to(at::kFloat).contiguous();
    const float* p = y.data_ptr<float>();
#pragma omp simd
    for (int64_t j = 0; j < B * h_; ++j) h[j] += p[j];
  }

  // RMSNorm(h) * w, row by row, into l's input buffer
  at::Tensor norm_into(const float* h, int64_t B, const at::Tensor& w, const Lin& l) {
    std::vector<float> tmp(B * h_);
    norm_rows(h, B, w, tmp.data());
    return in_from(l, tmp.data(), B, h_);
  }

  void norm_rows(const float* h, int64_t B, const at::Tensor& w, float* out) {
    const int64_t H = h_;
    const float* wp = w.data_ptr<float>();
    float* tmp = out;
    for (int64_t b = 0; b < B; ++b) {
      const float* r = h + b * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) ss += r[j] * r[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps_));
      float* t = tmp + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) t[j] = r[j] * inv * wp[j];
    }
  }

  // RoPE on every row's q and k heads, k/v into the cache, then attention of each row's G query heads
  // per KV head over its context read through its block table; out (B, Hq*D)
  void attention(float* qkv, int64_t B, int64_t layer, const int64_t* ps, const int64_t* sl, const int32_t* bt,
                 int64_t maxb, int64_t BS, const float* cos_t, const float* sin_t, float* kvp, int64_t nslots,
                 float* out, bool generic, int64_t NL) const {
    const int64_t D = d_, Hq = hq_, Hkv = hkv_, G = hq_ / hkv_, half = d_ / 2;
    const int64_t qkvn = (Hq + 2 * Hkv) * D, row = Hkv * D;
    float* kc = kvp + (0 * NL + layer) * nslots * row;
    float* vc = kvp + (1 * NL + layer) * nslots * row;
    const float scale = static_cast<float>(std::pow(static_cast<double>(D), -0.5));
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> tmp(D), sc, acc(Hq * D);
      for (int64_t b = b0; b < b1; ++b) {
        float* r = qkv + b * qkvn;
        const float* cs = cos_t + ps[b] * D;
        const float* sn = sin_t + ps[b] * D;  // sign-folded: x*cos + swap_halves(x)*sin
        for (int64_t hh = 0; hh < Hq + Hkv; ++hh) {
          float* x = r + hh * D;
          std::memcpy(tmp.data(), x, D * sizeof(float));
          for (int64_t j = 0; j < half; ++j) x[j] = tmp[j] * cs[j] + tmp[j + half] * sn[j];
          for (int64_t j = half; j < D; ++j) x[j] = tmp[j] * cs[j] + tmp[j - half] * sn[j];
        }
        std::memcpy(kc + sl[b] * row, r + Hq * D, row * sizeof(float));
        std::memcpy(vc + sl[b] * row, r + (Hq + Hkv) * D, row * sizeof(float));
        const int64_t n = ps[b] + 1;
        const int32_t* tb = bt + b * maxb;
        sc.resize(Hq * n);
        for (int64_t j = 0; j < Hq * D; ++j) r[j] *= scale;  // q * scale (scale the scores once, here)
        float* o = out + b * Hq * D;
#ifdef __AVX512F__
        if (D == 64 && !generic) {
          attend_avx512<4>(r, n, kc, vc, tb, BS, Hkv, G, sc.data(), o);
          continue;
        }
        if (D == 128 && !generic) {
          attend_avx512<8>(r, n, kc, vc, tb, BS, Hkv, G, sc.data(), o);
          continue;
        }
#endif
        attend_generic(r, n, kc, vc, tb, BS, Hkv, G, D, sc.data(), acc.data(), o);
      }
    });
  }

  at::Tensor embed_, final_norm_;
  std::vector<at::Tensor> norms_, bufs_;
  std::vector<Lin> lins_;
  std::vector<bool> hooked_;
  std::unique_ptr<pybind11::function> hook_;
  double seconds_[3] = {0, 0, 0};
  int64_t hq_, hkv_, d_, h_ = 0;
  double eps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<BatchedDecodeModel>(m, "BatchedDecodeModel")
      .def(pybind11::init<at::Tensor, std::vector<at::Tensor>, at::Tensor, int64_t, int64_t, int64_t, double>())
      .def("add_linear", &BatchedDecodeModel::add_linear)
      .def("seconds", &BatchedDecodeModel::seconds)
      .def("attend", &BatchedDecodeModel::attend, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("set_ffn_hook", &BatchedDecodeModel::set_ffn_hook)
      .def("step", &BatchedDecodeModel::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
