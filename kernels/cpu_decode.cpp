// One decode token of a dense Llama-family model through every layer, as one C++ call (CPU).
//
// Why: the eager decode step (runtime/decode_step.py: decode_one) runs ~35 torch ops per layer from
// Python; on this project's 2-core EPYC each costs 2-7 us of dispatch, allocation and TensorIterator
// set-up for vectors of 576..1536 floats, i.e. about half of the step next to the 121 int4 matmuls.
// Here the matmuls stay torch's own kernels (int4: aten::_weight_int4pack_mm_for_cpu on bf16
// activations; fp32: aten::linear), and so do every reduction -- the attention bmm/cat/softmax/baddbmm on
// the same views as decode_one, RMSNorm's mean and rsqrt -- and SiLU, so logits round exactly as
// decode_one's; the elementwise rest -- RMSNorm's scaling fused with the bf16 cast of the next matmul's
// input, the residual add fused with the read of the matmul's bf16 output, RoPE on q and k (with the FMA
// torch's vectorized addcmul compiles to), SiLU*mul fused with the cast, the cache write -- is plain loops
// over preallocated buffers. Measured: eager 16.7-18.4 ms vs this 11.9-12.5 ms per token (README,
// Throughput); tests/kernels/test_cpu_decode.py compares every step with decode_one.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

struct Lin {
  at::Tensor w;     // int4: packed weights; fp32: (N, K) weight
  at::Tensor sz;    // int4: bf16 scale_zeros (K/g, N, 2)
  at::Tensor bias;  // fp32 (N) or undefined
  int64_t group;    // int4 group size; 0: fp32 linear
  int64_t n, k;
};

struct Layer {
  at::Tensor in_norm, post_norm;
  Lin qkv, o, gate_up, down;
};

// x (1, K) in the linear's input dtype -> y (1, N): bf16 for int4 (bias not yet added), fp32 for fp32
at::Tensor run(const Lin& l, const at::Tensor& x) {
  if (l.group) return at::_weight_int4pack_mm_for_cpu(x, l.w, l.group, l.sz);
  return l.bias.defined() ? at::linear(x, l.w, l.bias) : at::linear(x, l.w);
}

// y's row as fp32 (+ the int4 bias, which the int4 op does not add), through f(j, value)
template <class F>
void read_out(const Lin& l, const at::Tensor& y, F f) {
  const float* b = (l.group && l.bias.defined()) ? l.bias.data_ptr<float>() : nullptr;
  if (y.scalar_type() == at::kBFloat16) {
    const bf16* p = y.data_ptr<bf16>();
    if (b)
      for (int64_t j = 0; j < l.n; ++j) f(j, static_cast<float>(p[j]) + b[j]);
    else
      for (int64_t j = 0; j < l.n; ++j) f(j, static_cast<float>(p[j]));
  } else {
    const float* p = y.data_ptr<float>();
    for (int64_t j = 0; j < l.n; ++j) f(j, p[j]);
  }
}

class DecodeModel {
 public:
  DecodeModel(at::Tensor embed, std::vector<at::Tensor> norms, std::vector<at::Tensor> lin_w,
              std::vector<at::Tensor> lin_sz, std::vector<at::Tensor> lin_bias, std::vector<int64_t> lin_group,
              at::Tensor final_norm, int64_t hq, int64_t hkv, int64_t d, double eps)
      : embed_(embed.contiguous()), final_norm_(final_norm.contiguous()), hq_(hq), hkv_(hkv), d_(d), eps_(eps) {
    const size_t nl = norms.size() / 2;
    if (norms.size() != 2 * nl || lin_w.size() != 4 * nl + 1 || lin_sz.size() != lin_w.size() ||
        lin_bias.size() != lin_w.size() || lin_group.size() != lin_w.size())
      throw std::invalid_argument("DecodeModel: need 2 norms and 4 linears per layer, then the LM head");
    if (d > 1024 || embed.size(1) > 8192 || hq % hkv)
      throw std::invalid_argument("DecodeModel: head_dim <= 1024, hidden <= 8192, heads divisible by kv heads");
    auto mk = [&](size_t i) {
      Lin l;
      l.w = lin_w[i].contiguous();
      l.sz = lin_sz[i];  // empty for fp32
      if (lin_bias[i].numel()) l.bias = lin_bias[i].to(at::kFloat).contiguous();  // empty: no bias
      l.group = lin_group[i];
      if (l.w.dim() < 2 && !l.group) {  // no linear (a hooked FFN's gate_up / down: see set_ffn_hook)
        l.n = l.k = 0;
      } else if (l.group) {
        l.n = l.sz.size(1);
        l.k = l.sz.size(0) * l.group;
      } else {
        l.n = l.w.size(0);
        l.k = l.w.size(1);
      }
      return l;
    };
    for (size_t i = 0; i < nl; ++i) {
      Layer L;
      L.in_norm = norms[2 * i].contiguous();
      L.post_norm = norms[2 * i + 1].contiguous();
      L.qkv = mk(4 * i);
      L.o = mk(4 * i + 1);
      L.gate_up = mk(4 * i + 2);
      L.down = mk(4 * i + 3);
      layers_.push_back(L);
    }
    head_ = mk(4 * nl);
    h_ = embed_.size(1);
    for (const Layer& L : layers_) inter_ = std::max<int64_t>(inter_, L.gate_up.n / 2);  // layer 0 may be hooked
    auto f32 = at::TensorOptions().dtype(at::kFloat);
    hidden_ = at::empty({1, h_}, f32);
    qkv_ = at::empty({(hq_ + 2 * hkv_) * d_}, f32);
    gate_ = at::empty({1, std::max<int64_t>(inter_, 1)}, f32);
    up_ = at::empty({std::max<int64_t>(inter_, 1)}, f32);
    sq_ = at::empty({1, h_}, f32);
    ffn_x_ = at::empty({1, h_}, f32);
    hooked_.assign(layers_.size(), false);
  }

  ~DecodeModel() {
    if (hook_) {  // a Python object: released with the GIL held
      pybind11::gil_scoped_acquire g;
      hook_.reset();
    }
  }

  // Layers whose FFN runs in Python (memory layers: runtime/ffn.py FFN, with its value store and lookup
  // stats): `fn(layer, x)` gets the post-attention-normed x (1, hidden) fp32 -- a buffer reused by the next
  // call -- and returns the FFN output (1, hidden), added to the residual as Model.forward does.
  void set_ffn_hook(std::vector<int64_t> layers, pybind11::function fn) {
    hooked_.assign(layers_.size(), false);
    for (int64_t i : layers) {
      if (i < 0 || i >= static_cast<int64_t>(layers_.size())) throw std::invalid_argument("hooked layer out of range");
      hooked_[i] = true;
    }
    hook_ = std::make_unique<pybind11::function>(std::move(fn));
  }

  // logits (1, V) fp32 of `token` at position `pos`; attends to flat cache slots [start, end) of
  // kv (2, L, slots, Hkv, D) fp32 and to itself; writes its k/v to slot `slot` (outside [start, end))
  at::Tensor step(int64_t token, int64_t pos, const at::Tensor& cos_t, const at::Tensor& sin_t, at::Tensor kv,
                  int64_t start, int64_t end, int64_t slot) {
    if (slot >= start && slot < end) throw std::invalid_argument("decode slot inside its own context");
    if (token < 0 || token >= embed_.size(0)) throw std::invalid_argument("token id out of range");
    const int64_t H = h_, D = d_, G = hq_ / hkv_, S = end - start;
    const int64_t slots = kv.size(2), L = kv.size(1);
    if (kv.scalar_type() != at::kFloat || !kv.is_contiguous() || kv.dim() != 5 || kv.size(3) != hkv_ || kv.size(4) != D)
      throw std::invalid_argument("kv must be the contiguous fp32 flat cache (2, L, slots, Hkv, D)");
    float* kvp = kv.data_ptr<float>();
    const float* cs = cos_t.data_ptr<float>() + pos * D;
    const float* sn = sin_t.data_ptr<float>() + pos * D;
    float* h = hidden_.data_ptr<float>();
    const float* e = embed_.data_ptr<float>() + token * H;
    for (int64_t j = 0; j < H; ++j) h[j] = e[j];
    const double scale = std::pow(static_cast<double>(D), -0.5);  // decode_one: D ** -0.5
    float* qkv = qkv_.data_ptr<float>();
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& ly = layers_[i];
      // RMSNorm -> qkv input
      at::Tensor x = norm_into(h, ly.in_norm, ly.qkv);
      read_out(ly.qkv, run(ly.qkv, x), [&](int64_t j, float v) { qkv[j] = v; });
      // RoPE on q and k heads: x*cos + swap_halves(x)*sin (sin sign-folded), as RotaryEmbedding.apply
      float tmp[1024];
      const int64_t half = D / 2;
      for (int64_t hh = 0; hh < hq_ + hkv_; ++hh) {
        float* r = qkv + hh * D;
        for (int64_t j = 0; j < D; ++j) tmp[j] = r[j];
        for (int64_t j = 0; j < D; ++j) r[j] = std::fma(tmp[j < half ? j + half : j - half], sn[j], tmp[j] * cs[j]);
      }
      // attention: the reference's own ops (bmm / softmax / baddbmm over the same views), so that its
      // reductions round exactly as decode_one's do
      at::Tensor q = qkv_.narrow(0, 0, hq_ * D).view({hkv_, G, D});
      at::Tensor kn = qkv_.narrow(0, hq_ * D, hkv_ * D).view({hkv_, D});
      at::Tensor vn = qkv_.narrow(0, (hq_ + hkv_) * D, hkv_ * D).view({hkv_, D});
      at::Tensor kc = kv.select(0, 0).select(0, static_cast<int64_t>(i)).narrow(0, start, S);  // (S, Hkv, D)
      at::Tensor vc = kv.select(0, 1).select(0, static_cast<int64_t>(i)).narrow(0, start, S);
      at::Tensor sc = at::cat({at::bmm(q, kc.permute({1, 2, 0})), at::bmm(q, kn.unsqueeze(-1))}, -1);
      at::Tensor p = at::_softmax(sc.mul_(scale), -1, false);
      at::Tensor o = at::baddbmm(p.narrow(-1, S, 1) * vn.unsqueeze(1), p.narrow(-1, 0, S), vc.transpose(0, 1));
      at::Tensor ox = in_buf(ly.o);
      store(ox, 0, o.data_ptr<float>(), hq_ * D);
      const float* knp = kn.data_ptr<float>();
      const float* vnp = vn.data_ptr<float>();
      // this token's k/v into the cache (after its own attention: never read by it from there)
      float* kd = kvp + ((0 * L + static_cast<int64_t>(i)) * slots + slot) * hkv_ * D;
      float* vd = kvp + ((1 * L + static_cast<int64_t>(i)) * slots + slot) * hkv_ * D;
      for (int64_t j = 0; j < hkv_ * D; ++j) {
        kd[j] = knp[j];
        vd[j] = vnp[j];
      }
      read_out(ly.o, run(ly.o, ox), [&](int64_t j, float v) { h[j] = h[j] + v; });
      if (hooked_[i]) {
        ffn_hook(static_cast<int64_t>(i), h, ly.post_norm);
        continue;
      }
      // MLP: RMSNorm -> gate_up -> SiLU(gate) * up -> down, residual
      x = norm_into(h, ly.post_norm, ly.gate_up);
      at::Tensor gu = run(ly.gate_up, x);
      float* gate = gate_.data_ptr<float>();
      const int64_t I = inter_;
      float* upp = up_.data_ptr<float>();
      read_out(ly.gate_up, gu, [&](int64_t j, float v) {
        if (j < I) gate[j] = v; else upp[j - I] = v;
      });
      at::silu_(gate_);
      at::Tensor dx = in_buf(ly.down);
      for (int64_t j = 0; j < I; ++j) gate[j] = gate[j] * upp[j];
      store(dx, 0, gate, I);
      read_out(ly.down, run(ly.down, dx), [&](int64_t j, float v) { h[j] = h[j] + v; });
    }
    at::Tensor x = norm_into(h, final_norm_, head_);
    at::Tensor y = run(head_, x);
    if (head_.group && head_.bias.defined()) y = y.to(at::kFloat) + head_.bias;
    return y.to(at::kFloat);
  }

 private:
  // h += fn(i, RMSNorm(h)) through the Python hook (the norm as norm_into's, in fp32)
  void ffn_hook(int64_t i, float* h, const at::Tensor& w) {
    float* sq = sq_.data_ptr<float>();
    for (int64_t j = 0; j < h_; ++j) sq[j] = h[j] * h[j];
    const float r = at::mean(sq_, {-1}, true).add_(eps_).rsqrt_().item<float>();
    const float* wp = w.data_ptr<float>();
    float* x = ffn_x_.data_ptr<float>();
    for (int64_t j = 0; j < h_; ++j) x[j] = h[j] * r * wp[j];
    at::Tensor y;
    {
      pybind11::gil_scoped_acquire g;
      y = (*hook_)(i, ffn_x_).cast<at::Tensor>();
    }
    if (y.numel() != h_) throw std::runtime_error("FFN hook must return (1, hidden)");
    y = y.to(at::kFloat).contiguous();
    const float* yp = y.data_ptr<float>();
    for (int64_t j = 0; j < h_; ++j) h[j] = h[j] + yp[j];
  }

  // the input buffer (1, K) of linear l in its dtype (bf16 for int4), reused across calls
  at::Tensor in_buf(const Lin& l) {
    auto dt = l.group ? at::kBFloat16 : at::kFloat;
    for (auto& b : bufs_)
      if (b.size(1) == l.k && b.scalar_type() == dt) return b;
    bufs_.push_back(at::empty({1, l.k}, at::TensorOptions().dtype(dt)));
    return bufs_.back();
  }

  static void store(const at::Tensor& dst, int64_t off, const float* src, int64_t n) {
    if (dst.scalar_type() == at::kBFloat16) {
      bf16* p = dst.data_ptr<bf16>() + off;
      for (int64_t j = 0; j < n; ++j) p[j] = bf16(src[j]);
    } else {
      float* p = dst.data_ptr<float>() + off;
      for (int64_t j = 0; j < n; ++j) p[j] = src[j];
    }
  }

  // RMSNorm(h) * w (as F.rms_norm: x * rsqrt(mean(x^2) + eps) * w) into l's input buffer
  at::Tensor norm_into(const float* h, const at::Tensor& w, const Lin& l) {
    const int64_t H = h_;
    // mean(x^2) by at::mean (its summation order is the reference's); the rest elementwise, same order
    float* sq = sq_.data_ptr<float>();
    for (int64_t j = 0; j < H; ++j) sq[j] = h[j] * h[j];
    // (at::rsqrt too: on this CPU it is not 1/std::sqrt in every last bit)
    const float r = at::mean(sq_, {-1}, true).add_(eps_).rsqrt_().item<float>();
    const float* wp = w.data_ptr<float>();
    at::Tensor x = in_buf(l);
    float tmp[8192];
    for (int64_t j = 0; j < H; ++j) tmp[j] = h[j] * r * wp[j];
    store(x, 0, tmp, H);
    return x;
  }

  at::Tensor embed_, final_norm_, hidden_, qkv_, gate_, up_, sq_, ffn_x_;
  std::vector<bool> hooked_;
  std::unique_ptr<pybind11::function> hook_;
  std::vector<Layer> layers_;
  std::vector<at::Tensor> bufs_;
  Lin head_;
  int64_t hq_, hkv_, d_, h_ = 0, inter_ = 0;
  double eps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodeModel>(m, "DecodeModel")
      .def(pybind11::init<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<int64_t>, at::Tensor, int64_t, int64_t, int64_t,
                          double>())
      .def("set_ffn_hook", &DecodeModel::set_ffn_hook)
      .def("step", &DecodeModel::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
