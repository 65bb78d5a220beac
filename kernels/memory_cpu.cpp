// CPU kernels of a memory layer's lookup (issue 16): the product-key selection and the weighted
// embedding bag over fp32 / bf16 / fp16 / int8 rows. Loaded by kernels/memory_cpu.py.
//
// pkm_select: torch's path (kernels/pkm.py pkm_topk_torch) is topk(32 of 1024) per half, a 32x32
// cartesian tensor, topk(32 of 1024) again, two gathers, index arithmetic and a softmax: ~15 ops, and
// torch.topk on a (8, 16, 1024) CPU tensor alone took most of a memory layer's 10 ms at 16 tokens
// (README, Memory layers). Here, per (head, token): a threshold top-k of each half's n scores (see
// topk_sorted), then the top-k of the k x k sums over the pairs that can hold it (see pkm_select), then
// the softmax. Candidates are ordered as one integer key each (sel_key) by vector compares (top_by_rank).
// The sums are the same fp32 additions as torch's cartesian tensor, so the selected slots and scores are
// the same (ties: lower position first). 64 (head, token) rows of 1024 sub-keys, k = 32, 1 thread, AMD
// EPYC: 0.10 ms (min of 200; the previous heap / partial-sort version 0.72 ms, torch's path ~2 ms).
//
// bag: out[t] = sum_k w[t,k] * (scale[idx]) * row(idx[t,k]) in fp32, one pass over each row: the row is
// converted in registers (bf16: a 16-bit shift; int8: a cvt) and accumulated, no gathered copy and no
// fp32 temporary (torch's path for bf16 / int8 gathers, converts, then sums: three passes). At one
// thread a random 0.5-2 KB row costs a DRAM latency; 8 rows are read side by side (see kGroup) so their
// misses overlap. Each column's sum is the same sequence of fused multiply-adds whatever the column
// range, so a column shard's slice equals the full bag's exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>


namespace {

// A (score, position) pair as one integer whose order is the selection's order: larger score first, ties
// by lower position (a strict total order, positions are unique). High 32 bits: the fp32 score mapped to a
// uint32 of the same order (-0.0 as +0.0, which fp32 compares equal); low 32: 0xFFFFFFFF - position.
// Integer keys let the sorts below run as vector compares instead of branchy pair comparisons.
inline uint32_t ordered(float f) {
  f += 0.0f;  // -0.0 -> +0.0
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float key_score(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint64_t sel_key(float f, uint32_t pos) { return (uint64_t(ordered(f)) << 32) | (0xFFFFFFFFu - pos); }
inline uint32_t key_pos(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }

// The k largest of c >= k distinct keys into out[0..k), descending. keys needs room for c rounded up to 8.
// AVX-512: a key's rank is the number of keys above it (c / 8 vector compares per key, no data-dependent
// branch); the candidate sets here are ~40-50 keys. (std::partial_sort of (score, index) pairs took
// 1.45 us of a 2.5 us top-k of 1024 scores: mispredicted compares.)
void top_by_rank(uint64_t* keys, int64_t c, int64_t k, uint64_t* out) {
#ifdef __AVX512F__
  const int64_t c8 = (c + 7) & ~int64_t(7);
  for (int64_t i = c; i < c8; ++i) keys[i] = 0;  // below every real key (a position is < 2**31)
  for (int64_t i = 0; i < c; ++i) {
    const __m512i ki = _mm512_set1_epi64(static_cast<long long>(keys[i]));
    int r = 0;
    for (int64_t v = 0; v < c8; v += 8)
      r += __builtin_popcount(_mm512_cmpgt_epu64_mask(_mm512_loadu_si512(keys + v), ki));
    if (r < k) out[r] = keys[i];
  }
#else
  std::partial_sort(keys, keys + k, keys + c, std::greater<uint64_t>());
  std::copy(keys, keys + k, out);
#endif
}

// Per-thread scratch of the selection (no allocation per row).
struct SelectScratch {
  std::vector<float> bm;
  std::vector<uint64_t> keys;
  std::vector<uint32_t> ou, op;
};

// top-k of x[0..n) into out[0..k) as keys (sel_key(score, index)), descending.
// Threshold first: nb = min(n, 4k) disjoint blocks (block b = {j : j % nb == b}, strided so the block maxima
// are a vertical max over rows of nb scores); the block maxima are nb distinct elements of x, so their k-th
// largest `thr` is <= the k-th largest of x and every top-k element is >= thr. One pass collects the
// elements >= thr (~37 of 1024 for k = 32 on random scores; AVX-512: compare to a mask, compress in
// registers), `top_by_rank` orders them. Measured per 1024-score row, k = 32, AMD EPYC: 0.63 us (k blocks
// and a partial sort of (score, index) pairs, the previous version: 100-150 candidates, 2.5 us).
void topk_sorted(const float* x, int64_t n, int64_t k, SelectScratch& sc, uint64_t* out) {
  const int64_t nb = std::min(n, 4 * k);
  sc.bm.assign(x, x + nb);
  float* bm = sc.bm.data();
  for (int64_t j0 = nb; j0 < n; j0 += nb) {
    const int64_t m = std::min(nb, n - j0);
    const float* xr = x + j0;
#pragma omp simd
    for (int64_t b = 0; b < m; ++b) bm[b] = bm[b] < xr[b] ? xr[b] : bm[b];
  }
  std::nth_element(sc.bm.begin(), sc.bm.begin() + (k - 1), sc.bm.end(), std::greater<float>());
  const float thr = bm[k - 1];
  sc.keys.resize(n + 16);
  uint64_t* keys = sc.keys.data();
  int64_t c = 0, j = 0;
#ifdef __AVX512F__
  sc.ou.resize(n + 16);
  sc.op.resize(n + 16);
  uint32_t* ou = sc.ou.data();
  uint32_t* op = sc.op.data();
  const __m512 tv = _mm512_set1_ps(thr);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u)), ones = _mm512_set1_epi32(-1);
  __m512i pos = _mm512_sub_epi32(ones, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i step = _mm512_set1_epi32(16);
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __mmask16 msk = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
    if (msk) {  // register compress + plain store (a compress store to memory is slow on AMD Zen 4)
      __m512i u = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));                 // -0.0 -> +0.0
      u = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), _mm512_movepi32_mask(u), u, ones);  // ordered(v)
      _mm512_storeu_si512(ou + c, _mm512_maskz_compress_epi32(msk, u));
      _mm512_storeu_si512(op + c, _mm512_maskz_compress_epi32(msk, pos));
      c += __builtin_popcount(msk);
    }
    pos = _mm512_sub_epi32(pos, step);
  }
  for (int64_t m = 0; m < c; m += 8) {  // (ordered, position) -> keys, 8 at a time
    const __m512i hi = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ou + m)));
    const __m512i lo = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(op + m)));
    _mm512_storeu_si512(keys + m, _mm512_or_si512(_mm512_slli_epi64(hi, 32), lo));
  }
#endif
  for (; j < n; ++j)
    if (x[j] >= thr) keys[c++] = sel_key(x[j], static_cast<uint32_t>(j));
  if (c < k) {  // only with NaN scores (no valid threshold): every score, in key order (NaN has a place there)
    for (c = 0; c < n; ++c) keys[c] = sel_key(x[c], static_cast<uint32_t>(c));
  }
  top_by_rank(keys, c, k, out);
}

// s (H, 2, T, n) fp32 contiguous -> (indices (T, H*k) int64 = i1 * n + i2, weights (T, H*k) fp32 softmax)
std::vector<at::Tensor> pkm_select(const at::Tensor& s_in, int64_t k) {
  if (s_in.dim() != 4 || s_in.size(1) != 2 || s_in.scalar_type() != at::kFloat)
    throw std::invalid_argument("pkm_select: scores must be (H, 2, T, n) float32");
  const at::Tensor s = s_in.contiguous();
  const int64_t H = s.size(0), T = s.size(2), n = s.size(3);
  if (k < 1 || k > n) throw std::invalid_argument("pkm_select: need 1 <= k <= n_keys");
  if (n > (int64_t(1) << 31) / std::max<int64_t>(n, 1)) throw std::invalid_argument("pkm_select: n_keys**2 >= 2**31");
  at::Tensor idx = at::empty({T, H * k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor w = at::empty({T, H * k}, at::TensorOptions().dtype(at::kFloat));
  const float* sp = s.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, H * T, 8, [&](int64_t r0, int64_t r1) {
    std::vector<uint64_t> a(k), b(k), top(k), sums(k * k + 8);
    std::vector<float> av(k), bv(k);
    SelectScratch sc;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r / T, t = r % T;
      topk_sorted(sp + ((h * 2 + 0) * T + t) * n, n, k, sc, a.data());
      topk_sorted(sp + ((h * 2 + 1) * T + t) * n, n, k, sc, b.data());
      for (int64_t i = 0; i < k; ++i) av[i] = key_score(a[i]), bv[i] = key_score(b[i]);
      // top-k of the k x k sums av[i] + bv[j] at position i * k + j, in the same order as above (the same
      // fp32 sums as torch's cartesian tensor). Only pairs with (i + 1)(j + 1) <= k can be in it: the
      // (i + 1)(j + 1) - 1 pairs (i' <= i, j' <= j) have sums >= its sum and lower positions. Lower bound of
      // the k-th largest sum: for each p, the p * ceil(k / p) >= k pairs (i < p, j < ceil(k / p)) have sums
      // >= av[p-1] + bv[ceil(k/p)-1]; the sums are non-increasing in i and in j (fp32 addition is monotone),
      // so both loops stop at the first sum below it. ~49 of the ~130 pairs remain at k = 32 (a max-heap
      // frontier of k pops, the previous version: 1.2 us per (head, token); this: 0.4).
      float thr = -INFINITY;
      for (int64_t p = 1; p <= k; ++p) thr = std::max(thr, av[p - 1] + bv[(k + p - 1) / p - 1]);
      int64_t c = 0;
      for (int64_t i = 0; i < k && av[i] + bv[0] >= thr; ++i)
        for (int64_t j = 0; (i + 1) * (j + 1) <= k; ++j) {
          const float sij = av[i] + bv[j];
          if (sij < thr) break;
          sums[c++] = sel_key(sij, static_cast<uint32_t>(i * k + j));
        }
      if (c < k) {  // only with NaN scores: every pair of the region
        c = 0;
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; (i + 1) * (j + 1) <= k; ++j) sums[c++] = sel_key(av[i] + bv[j], static_cast<uint32_t>(i * k + j));
      }
      top_by_rank(sums.data(), c, k, top.data());
      int64_t* io = ip + t * H * k + h * k;
      float* wo = wp + t * H * k + h * k;
      const float mx = key_score(top[0]);
      float sum = 0.f;
      for (int64_t m = 0; m < k; ++m) {
        const uint32_t p = key_pos(top[m]);
        io[m] = static_cast<int64_t>(key_pos(a[p / k])) * n + key_pos(b[p % k]);
        wo[m] = std::exp(key_score(top[m]) - mx);  // softmax in fp32 (top[0] is the maximum)
        sum += wo[m];
      }
      const float inv = 1.f / sum;
      for (int64_t m = 0; m < k; ++m) wo[m] *= inv;
    }
  });
  return {idx, w};
}

// row element -> fp32
inline float cvt(float v) { return v; }
inline float cvt(c10::BFloat16 v) {
  uint16_t u;
  std::memcpy(&u, &v, 2);
  const uint32_t b = static_cast<uint32_t>(u) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline float cvt(c10::Half v) { return static_cast<float>(v); }
inline float cvt(int8_t v) { return static_cast<float>(v); }

// Rows accumulated per pass over the output: a pass loads G rows' j-th vectors together, so G random rows'
// cache misses are in flight at once (one row per pass: each row's misses wait on the previous row's).
// Measured (1 GB fp32 table, T = 16, K = 128, E = 576, 1 thread, AMD EPYC, loaded box; F.embedding_bag
// 8.3 GB/s in the same run): G = 1 5.1 GB/s, 2 7.3, 4 10.4, 8 12.9; software prefetch of whole rows 4 or 16
// pairs ahead made G = 8 slower (8.4-8.7). What helps is a prefetch of the *start* of the next group's rows
// (kPrefetchLines below). More rows per pass for the narrower bf16 /
// int8 rows measured slower (G = 16 / 32: bf16 1.9 vs 6.8 GB/s, int8 1.0 vs 1.1 at T = 16; the G pointers
// and weights no longer stay in registers). Each column's sum is still the fused multiply-adds of
// k = 0, 1, ..., K-1 in order: the same result as one row per pass, for any column range.
template <class R>
constexpr int kGroup = 8;

// While a group is summed, the first kPrefetchLines cache lines of the next group's G rows (and, int8, their
// scales) are prefetched into L2 (the next group may be the next token's: the index array is (T, K)
// contiguous): a row's first misses are its DRAM latency, the rest of the row follows from the hardware's
// stream prefetch. Measured (1 GB tables, T = 16, K = 128, E = 576, 1 thread, AMD EPYC, load 6-7, the
// previous build and 0 / 2 / 4 / 8 lines interleaved on the same fresh index sets, best / median GB/s):
// fp32 11.9/11.0 (previous) 11.6/10.6 (0) 12.6/11.3 (2) 13.3/12.1 (4) 13.0/12.1 (8); bf16 7.2/6.3, 6.9/6.3,
// 7.5/6.7, 7.7/6.9, 7.8/7.0; int8 3.8/2.4, 3.9/2.5, 4.0/2.8, 4.4/3.1, 5.2/3.5. In a C++ loop of the fp32
// bag: every line of the rows 11.6, into L1 (T0) 8.4, two groups ahead 11.0-11.4 (none: 10.2-12.0).
constexpr int kPrefetchLines = 8;

template <class R>
void bag_rows(const R* table, int64_t stride, int64_t c0, int64_t E, const int64_t* idx, const float* w,
              const float* scales, int64_t K, float* out, const int64_t* idx_end) {
  for (int64_t j = 0; j < E; ++j) out[j] = 0.f;
  auto weight = [&](int64_t kk) {
    float wk = w ? w[kk] : 1.f;
    return scales ? wk * scales[idx[kk]] : wk;
  };
  const int lines = static_cast<int>(std::min<int64_t>(kPrefetchLines, (E * int64_t(sizeof(R)) + 63) / 64));
  int64_t kk = 0;
  for (; kk + kGroup<R> <= K; kk += kGroup<R>) {
    const R* r[kGroup<R>];
    float wk[kGroup<R>];
    for (int g = 0; g < kGroup<R>; ++g) {
      r[g] = table + idx[kk + g] * stride + c0;
      wk[g] = weight(kk + g);
    }
    for (int g = 0; g < kGroup<R>; ++g) {  // the next group's row starts (idx_end: the indices' end)
      const int64_t* nx = idx + kk + kGroup<R> + g;
      if (nx >= idx_end) break;
      const char* p = reinterpret_cast<const char*>(table + *nx * stride + c0);
      for (int l = 0; l < lines; ++l) _mm_prefetch(p + 64 * l, _MM_HINT_T1);
      if (scales) _mm_prefetch(reinterpret_cast<const char*>(scales + *nx), _MM_HINT_T1);  // int8: its scale
    }
#pragma omp simd
    for (int64_t j = 0; j < E; ++j) {
      float acc = out[j];
      for (int g = 0; g < kGroup<R>; ++g) acc = std::fma(wk[g], cvt(r[g][j]), acc);
      out[j] = acc;
    }
  }
  for (; kk < K; ++kk) {
    const R* row = table + idx[kk] * stride + c0;
    const float wk = weight(kk);
#pragma omp simd
    for (int64_t j = 0; j < E; ++j) out[j] = std::fma(wk, cvt(row[j]), out[j]);
  }
}

// table (N, *) rows of stride(0), columns [c0, c1) (stride(1) = 1); indices (T, K) int; weights (T, K)
// fp32 or undefined; scales (N,) fp32 or undefined -> (T, c1 - c0) fp32
at::Tensor bag(const at::Tensor& table, const at::Tensor& indices_in, const c10::optional<at::Tensor>& weights_in,
               const c10::optional<at::Tensor>& scales_in, int64_t c0, int64_t c1) {
  if (table.dim() != 2 || table.stride(1) != 1) throw std::invalid_argument("bag: table must be (N, E), rows contiguous");
  if (c0 < 0 || c1 > table.size(1) || c0 >= c1) throw std::invalid_argument("bag: bad column range");
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t T = indices.size(0), K = indices.size(1), E = c1 - c0, N = table.size(0);
  at::Tensor weights, scales;
  if (weights_in && weights_in->defined()) weights = weights_in->to(at::kFloat).contiguous();
  if (scales_in && scales_in->defined()) scales = scales_in->to(at::kFloat).contiguous();
  if (weights.defined() && (weights.size(0) != T || weights.size(1) != K)) throw std::invalid_argument("bag: weights shape");
  const int64_t* ip = indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i)
    if (ip[i] < 0 || ip[i] >= N) throw std::out_of_range("bag: index out of range");
  at::Tensor out = at::empty({T, E}, at::TensorOptions().dtype(at::kFloat));
  const float* wp = weights.defined() ? weights.data_ptr<float>() : nullptr;
  const float* sp = scales.defined() ? scales.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t stride = table.stride(0);
  auto run = [&](auto* tp) {
    at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        bag_rows(tp, stride, c0, E, ip + t * K, wp ? wp + t * K : nullptr, sp, K, op + t * E, ip + T * K);
    });
  };
  switch (table.scalar_type()) {
    case at::kFloat: run(table.data_ptr<float>()); break;
    case at::kBFloat16: run(table.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(table.data_ptr<c10::Half>()); break;
    case at::kChar:
      if (!sp) throw std::invalid_argument("bag: an int8 table needs scales");
      run(table.data_ptr<int8_t>());
      break;
    default: throw std::invalid_argument("bag: table dtype must be float32, bfloat16, float16 or int8");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pkm_select", &pkm_select, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bag", &bag, pybind11::call_guard<pybind11::gil_scoped_release>());
}
