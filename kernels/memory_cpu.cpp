// CPU kernels of a memory layer's lookup (issue 16): the product-key selection and the weighted
// embedding bag over fp32 / bf16 / fp16 / int8 rows. Loaded by kernels/memory_cpu.py.
//
// pkm_select: torch's path (kernels/pkm.py pkm_topk_torch) is topk(32 of 1024) per half, a 32x32
// cartesian tensor, topk(32 of 1024) again, two gathers, index arithmetic and a softmax: ~15 ops, and
// torch.topk on a (8, 16, 1024) CPU tensor alone took most of a memory layer's 10 ms at 16 tokens
// (README, Memory layers). Here, per (head, token): a threshold top-k of each half's n scores (see
// topk_sorted), then the top-k of the k x k sums by a frontier over
// the two sorted lists (a[i] + b[j] is non-increasing in i and j, so k pops of a max-heap find it), then
// the softmax. The sums are the same fp32 additions as torch's cartesian tensor, so the selected slots
// and scores are the same (up to ties).
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>


namespace {

// top-k of x[0..n) into out[0..k) as (val, idx), sorted descending (ties: lower index first).
// Threshold first: split x into k blocks; each block's maximum is a distinct element, so the k-th largest
// is >= the smallest block maximum `thr`. One vectorizable pass finds the block maxima, a second collects
// the few elements >= thr (~100-150 of 1024 for k = 32 on random scores), a partial sort orders those.
// (A bounded min-heap scan measured 7 us per 1024-score row here: its compares mispredict.)
void topk_sorted(const float* x, int64_t n, int64_t k, std::vector<std::pair<float, int32_t>>& cand,
                 std::pair<float, int32_t>* out) {
  float thr = INFINITY;
  for (int64_t b = 0; b < k; ++b) {
    const int64_t lo = b * n / k, hi = (b + 1) * n / k;
    float m = x[lo];
    for (int64_t j = lo + 1; j < hi; ++j) m = std::max(m, x[j]);
    thr = std::min(thr, m);
  }
  cand.clear();
  for (int64_t j = 0; j < n; ++j)
    if (x[j] >= thr) cand.push_back({x[j], static_cast<int32_t>(j)});
  auto desc = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), desc);
  std::copy(cand.begin(), cand.begin() + k, out);
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
    std::vector<std::pair<float, int32_t>> a(k), b(k), cand;
    cand.reserve(n);
    std::vector<std::pair<float, int32_t>> front;  // (sum, i * k + j)
    std::vector<uint8_t> seen(k * k);
    std::vector<float> best(k);
    auto lt = [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
      return x.first < y.first || (x.first == y.first && x.second > y.second);
    };  // max-heap by sum (ties: lower (i, j) first)
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r / T, t = r % T;
      topk_sorted(sp + ((h * 2 + 0) * T + t) * n, n, k, cand, a.data());
      topk_sorted(sp + ((h * 2 + 1) * T + t) * n, n, k, cand, b.data());
      std::fill(seen.begin(), seen.end(), 0);
      front.clear();
      front.push_back({a[0].first + b[0].first, 0});
      seen[0] = 1;
      int64_t* io = ip + t * H * k + h * k;
      for (int64_t m = 0; m < k; ++m) {
        std::pop_heap(front.begin(), front.end(), lt);
        const auto top = front.back();
        front.pop_back();
        const int64_t i = top.second / k, j = top.second % k;
        best[m] = top.first;
        io[m] = static_cast<int64_t>(a[i].second) * n + b[j].second;
        if (i + 1 < k && !seen[(i + 1) * k + j]) {
          seen[(i + 1) * k + j] = 1;
          front.push_back({a[i + 1].first + b[j].first, static_cast<int32_t>((i + 1) * k + j)});
          std::push_heap(front.begin(), front.end(), lt);
        }
        if (j + 1 < k && !seen[i * k + j + 1]) {
          seen[i * k + j + 1] = 1;
          front.push_back({a[i].first + b[j + 1].first, static_cast<int32_t>(i * k + j + 1)});
          std::push_heap(front.begin(), front.end(), lt);
        }
      }
      // softmax in fp32 (best[0] is the maximum)
      float* wo = wp + t * H * k + h * k;
      float sum = 0.f;
      for (int64_t m = 0; m < k; ++m) {
        wo[m] = std::exp(best[m] - best[0]);
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
// 8.3 GB/s in the same run): G = 1 5.1 GB/s, 2 7.3, 4 10.4, 8 12.9; software prefetch of the rows 4 or 16
// pairs ahead made G = 8 slower (8.4-8.7), so there is none. More rows per pass for the narrower bf16 /
// int8 rows measured slower (G = 16 / 32: bf16 1.9 vs 6.8 GB/s, int8 1.0 vs 1.1 at T = 16; the G pointers
// and weights no longer stay in registers). Each column's sum is still the fused multiply-adds of
// k = 0, 1, ..., K-1 in order: the same result as one row per pass, for any column range.
template <class R>
constexpr int kGroup = 8;

template <class R>
void bag_rows(const R* table, int64_t stride, int64_t c0, int64_t E, const int64_t* idx, const float* w,
              const float* scales, int64_t K, float* out) {
  for (int64_t j = 0; j < E; ++j) out[j] = 0.f;
  auto weight = [&](int64_t kk) {
    float wk = w ? w[kk] : 1.f;
    return scales ? wk * scales[idx[kk]] : wk;
  };
  int64_t kk = 0;
  for (; kk + kGroup<R> <= K; kk += kGroup<R>) {
    const R* r[kGroup<R>];
    float wk[kGroup<R>];
    for (int g = 0; g < kGroup<R>; ++g) {
      r[g] = table + idx[kk + g] * stride + c0;
      wk[g] = weight(kk + g);
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
        bag_rows(tp, stride, c0, E, ip + t * K, wp ? wp + t * K : nullptr, sp, K, op + t * E);
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
