// oneDNN 3-D convolutions for ffn_jax, exposed to XLA on CPU as typed FFI custom calls.
//
// Layouts are the ones XLA already holds, so no activation is copied: activations NDHWC (oneDNN
// tag ndhwc), kernels DHWIO (tag dhwio). Only the small kernel is reordered, on each call, into
// the blocked layout oneDNN chose. Padding is SAME, stride 1.
//
// Targets (the Python side is ffn_jax/ops/onednn.py):
//   ffn_onednn_conv_fwd(x, w, b[, r]) -> y        y = post(conv(x, w) + b [+ r]), post = relu or id
//   ffn_onednn_conv_bwd_weights(x, w, g[, y]) -> dw, db[, gd]
//       kernel and bias gradients given g = dL/dy (ReLU mask from y); gd = masked g
//   ffn_onednn_conv_bwd_data(gd, w, after) -> dx
//       input gradient; a separate call so that XLA drops it where dx is unused
//
// Precision: with bf16=false everything is float32. With bf16=true the convolutions multiply
// bfloat16 operands and accumulate in float32 (AVX512-BF16); activations, output gradients and
// the input gradient may then be bfloat16 or float32 buffers (float32 ones are converted on the
// fly), while kernels, biases and their gradients stay float32.
//
// Threads: when the batch divides evenly over the T threads, each thread runs single-threaded
// primitives on its own N/T samples (one fork/join per call, no barriers inside the kernels,
// each thread's data stays its own); the kernel-gradient partials are summed at the end.
// Otherwise (e.g. batch 1) one multi-threaded primitive runs. FfnOnednnSetBatchSplit(0) turns
// the split off.
//
// Primitives are cached per shape, dtype and option set; the scratchpad and converted operands
// live in per-thread buffers, so cached primitives can run concurrently from several XLA threads.
#include <omp.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Dt = dnnl::memory::data_type;

namespace {

std::atomic<int> g_num_threads{0};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

std::atomic<bool> g_batch_split{true};

// Applies the thread count chosen from Python. OpenMP keeps it per calling thread, and XLA may
// call from any of its pool threads, so it is checked on every call (a cheap read).
void ApplyThreads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
}

// How a batch of n samples runs: `parts` single-threaded sub-convolutions of `n_sub` samples,
// or (parts == 1) one multi-threaded convolution of all n.
struct Split {
  int parts;
  int64_t n_sub;
};

Split PlanSplit(int64_t n) {
  const int t = omp_get_max_threads();
  if (g_batch_split.load(std::memory_order_relaxed) && t > 1 && n >= t && n % t == 0) {
    return {t, n / t};
  }
  return {1, n};
}

// Runs make() with OpenMP limited to one thread when the batch is split, so that oneDNN builds
// primitives for the one thread each part gets (its blocking and work split depend on it).
template <typename Make>
auto MakeFor(const Split& split, Make make) {
  if (split.parts == 1) return make();
  const int prev = omp_get_max_threads();
  omp_set_num_threads(1);
  try {
    auto made = make();
    omp_set_num_threads(prev);
    return made;
  } catch (...) {
    omp_set_num_threads(prev);
    throw;
  }
}

// body(part) for every part: inline for one part, else one part per OpenMP thread. Exceptions
// must not leave an OpenMP region, so the first one is carried out and rethrown.
template <typename Body>
void ForParts(const Split& split, Body body) {
  if (split.parts == 1) {
    body(0);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mu;
#pragma omp parallel num_threads(split.parts)
  {
    // Fewer threads than asked for is allowed by OpenMP: loop so every part runs.
    for (int part = omp_get_thread_num(); part < split.parts; part += omp_get_num_threads()) {
      try {
        body(part);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// Per-thread, grow-only, 64-byte aligned buffers; each slot is independent of the others.
// kWeights is filled by the calling thread before the parts start and only read by them.
enum Slot {
  kScratchpad, kWeights, kDiffWeights, kPartialWeights, kPartialBias, kSrc, kNumSlots
};

class ScratchBuffers {
 public:
  ~ScratchBuffers() {
    for (Buffer& b : buffers_) std::free(b.ptr);
  }
  void* Get(Slot slot, size_t bytes) {
    Buffer& b = buffers_[slot];
    if (bytes > b.bytes) {
      std::free(b.ptr);
      b.bytes = (bytes + 63) / 64 * 64;
      b.ptr = std::aligned_alloc(64, b.bytes);
      if (b.ptr == nullptr) {
        b.bytes = 0;
        throw std::bad_alloc();
      }
    }
    return b.ptr;
  }

 private:
  struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  Buffer buffers_[kNumSlots];
};

ScratchBuffers& Scratch() {
  thread_local ScratchBuffers buffers;
  return buffers;
}

bool IsBf16(ffi::DataType t) { return t == ffi::DataType::BF16; }
Dt ToDnnl(ffi::DataType t) { return IsBf16(t) ? Dt::bf16 : Dt::f32; }

struct ConvGeometry {
  int64_t n, d, h, w, ci, co, kd, kh, kw;

  memory::dims Src() const { return {n, ci, d, h, w}; }
  memory::dims Dst() const { return {n, co, d, h, w}; }
  memory::dims Wei() const { return {co, ci, kd, kh, kw}; }
  memory::dims Strides() const { return {1, 1, 1}; }
  // XLA's SAME: the odd pad of an even kernel goes at the end.
  memory::dims PadL() const { return {(kd - 1) / 2, (kh - 1) / 2, (kw - 1) / 2}; }
  memory::dims PadR() const {
    return {kd - 1 - (kd - 1) / 2, kh - 1 - (kh - 1) / 2, kw - 1 - (kw - 1) / 2};
  }
  size_t SrcElems() const { return size_t(n * d * h * w * ci); }
  size_t DstElems() const { return size_t(n * d * h * w * co); }
  size_t SrcSampleElems() const { return size_t(d * h * w * ci); }
  size_t DstSampleElems() const { return size_t(d * h * w * co); }
  ConvGeometry WithBatch(int64_t batch) const {
    ConvGeometry g = *this;
    g.n = batch;
    return g;
  }
};

size_t Bytes(Dt dt) { return dt == Dt::bf16 ? 2 : 4; }

// Pointer to sample `first` of an NDHWC buffer with `sample_elems` elements per sample.
template <typename P>
P* Offset(P* base, Dt dt, size_t sample_elems, int64_t first) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  return reinterpret_cast<P*>(reinterpret_cast<Byte*>(base) + Bytes(dt) * sample_elems * first);
}

memory::desc Act(const memory::dims& dims, Dt dt) { return memory::desc(dims, dt, Tag::ndhwc); }
memory::desc UserWeights(const ConvGeometry& g) { return memory::desc(g.Wei(), Dt::f32, Tag::dhwio); }
memory::desc Bias(const ConvGeometry& g) { return memory::desc({g.co}, Dt::f32, Tag::a); }

ffi::Error CheckFloat(const ffi::AnyBuffer& b, const char* name, bool allow_bf16) {
  if (b.element_type() == ffi::DataType::F32 || (allow_bf16 && IsBf16(b.element_type()))) {
    return ffi::Error::Success();
  }
  return ffi::Error::InvalidArgument(std::string("onednn conv: ") + name +
                                     (allow_bf16 ? " must be float32 or bfloat16 (bf16 mode)"
                                                 : " must be float32"));
}

ffi::Error Geometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, bool bf16, ConvGeometry* g) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 5 || wd.size() != 5) {
    return ffi::Error::InvalidArgument("onednn conv expects an NDHWC input and a DHWIO kernel");
  }
  if (xd[4] != wd[3]) return ffi::Error::InvalidArgument("input channels != kernel input channels");
  if (auto e = CheckFloat(x, "input", bf16); e.failure()) return e;
  if (auto e = CheckFloat(w, "kernel", false); e.failure()) return e;
  *g = ConvGeometry{xd[0], xd[1], xd[2], xd[3], xd[4], wd[4], wd[0], wd[1], wd[2]};
  return ffi::Error::Success();
}

std::string Key(const ConvGeometry& g, std::initializer_list<int> options) {
  std::ostringstream os;
  for (int64_t v : {g.n, g.d, g.h, g.w, g.ci, g.co, g.kd, g.kh, g.kw}) os << v << ',';
  for (int v : options) os << ':' << v;
  return os.str();
}

// A converting reorder between two layouts/dtypes, made once and cached with its primitive.
struct Reorder {
  bool needed = false;
  dnnl::reorder prim;

  void Init(const memory::desc& from, const memory::desc& to) {
    needed = from != to;
    if (needed) prim = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
};

struct FwdEntry {
  Split split;
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  Reorder weights;            // user f32 dhwio -> pd.weights_desc()
  Reorder src;                // user x -> pd.src_desc() (f32 -> bf16 in bf16 mode)
  bool residual_via_sum = false;  // binary-add post-op unsupported: copy residual, sum post-op
};

struct BwdDataEntry {
  Split split;
  dnnl::convolution_backward_data::primitive_desc pd;
  dnnl::convolution_backward_data prim;
  Reorder weights;            // user f32 dhwio -> pd.weights_desc()
};

struct BwdWeightsEntry {
  Split split;
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights prim;
  Reorder diff_weights;       // pd.diff_weights_desc() -> user f32 dhwio
  Reorder src;                // user x -> pd.src_desc()
  Reorder grad;               // f32 output gradient -> compute dtype (bf16 mode, no relu)
};

template <typename Entry>
class Cache {
 public:
  template <typename Make>
  Entry& Get(const std::string& key, Make make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) it = entries_.emplace(key, make()).first;
    return *it->second;
  }

 private:
  std::mutex mu_;
  std::unordered_map<std::string, std::unique_ptr<Entry>> entries_;
};

dnnl::primitive_attr ScratchpadAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Compute dtype of the multiplied operands.
Dt Compute(bool bf16) { return bf16 ? Dt::bf16 : Dt::f32; }

dnnl::convolution_forward::primitive_desc FwdPd(const ConvGeometry& g, bool bf16, Dt dst_dt,
                                                const dnnl::primitive_attr& attr,
                                                dnnl::prop_kind prop) {
  memory::desc wei_any(g.Wei(), Compute(bf16), Tag::any);
  return dnnl::convolution_forward::primitive_desc(
      Engine(), prop, dnnl::algorithm::convolution_direct, Act(g.Src(), Compute(bf16)), wei_any,
      Bias(g), Act(g.Dst(), dst_dt), g.Strides(), g.PadL(), g.PadR(), attr);
}

std::unique_ptr<FwdEntry> FillFwd(std::unique_ptr<FwdEntry> e, const ConvGeometry& g, bool relu,
                                  bool residual, bool bf16, Dt x_dt, Dt y_dt) {
  auto build = [&](bool via_sum) {
    dnnl::post_ops ops;
    if (residual) {
      if (via_sum) ops.append_sum(1.f);
      else ops.append_binary(dnnl::algorithm::binary_add, Act(g.Dst(), Dt::f32));
    }
    if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr attr = ScratchpadAttr();
    attr.set_post_ops(ops);
    return FwdPd(g, bf16, y_dt, attr, dnnl::prop_kind::forward_inference);
  };
  try {
    e->pd = build(false);
  } catch (const dnnl::error&) {
    if (!residual) throw;
    e->pd = build(true);
    e->residual_via_sum = true;
  }
  e->prim = dnnl::convolution_forward(e->pd);
  e->weights.Init(UserWeights(g), e->pd.weights_desc());
  e->src.Init(Act(g.Src(), x_dt), e->pd.src_desc());
  return e;
}

std::unique_ptr<BwdDataEntry> FillBwdData(std::unique_ptr<BwdDataEntry> e, const ConvGeometry& g,
                                          bool bf16, Dt dx_dt) {
  const Dt c = Compute(bf16);
  auto hint = FwdPd(g, bf16, c, ScratchpadAttr(), dnnl::prop_kind::forward_training);
  e->pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Act(g.Src(), dx_dt),
      memory::desc(g.Wei(), c, Tag::any), Act(g.Dst(), c), g.Strides(), g.PadL(), g.PadR(), hint,
      ScratchpadAttr());
  e->prim = dnnl::convolution_backward_data(e->pd);
  e->weights.Init(UserWeights(g), e->pd.weights_desc());
  return e;
}

std::unique_ptr<BwdWeightsEntry> FillBwdWeights(std::unique_ptr<BwdWeightsEntry> e,
                                                const ConvGeometry& g, bool bf16, Dt x_dt,
                                                Dt g_dt) {
  const Dt c = Compute(bf16);
  auto hint = FwdPd(g, bf16, c, ScratchpadAttr(), dnnl::prop_kind::forward_training);
  e->pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Act(g.Src(), c),
      memory::desc(g.Wei(), Dt::f32, Tag::any), Bias(g), Act(g.Dst(), c), g.Strides(), g.PadL(),
      g.PadR(), hint, ScratchpadAttr());
  e->prim = dnnl::convolution_backward_weights(e->pd);
  e->diff_weights.Init(e->pd.diff_weights_desc(), UserWeights(g));
  e->src.Init(Act(g.Src(), x_dt), e->pd.src_desc());
  e->grad.Init(Act(g.Dst(), g_dt), Act(g.Dst(), c));
  return e;
}

// Entries for a full batch: primitives for the sub-batch each thread runs (see PlanSplit).
std::unique_ptr<FwdEntry> MakeFwd(const ConvGeometry& full, bool relu, bool residual, bool bf16,
                                  Dt x_dt, Dt y_dt) {
  const Split split = PlanSplit(full.n);
  const ConvGeometry sub = full.WithBatch(split.n_sub);
  auto e = MakeFor(split, [&] {
    return FillFwd(std::make_unique<FwdEntry>(), sub, relu, residual, bf16, x_dt, y_dt);
  });
  e->split = split;
  return e;
}

std::unique_ptr<BwdDataEntry> MakeBwdData(const ConvGeometry& full, bool bf16, Dt dx_dt) {
  const Split split = PlanSplit(full.n);
  const ConvGeometry sub = full.WithBatch(split.n_sub);
  auto e = MakeFor(split, [&] { return FillBwdData(std::make_unique<BwdDataEntry>(), sub, bf16, dx_dt); });
  e->split = split;
  return e;
}

std::unique_ptr<BwdWeightsEntry> MakeBwdWeights(const ConvGeometry& full, bool bf16, Dt x_dt,
                                                Dt g_dt) {
  const Split split = PlanSplit(full.n);
  const ConvGeometry sub = full.WithBatch(split.n_sub);
  auto e = MakeFor(split, [&] {
    return FillBwdWeights(std::make_unique<BwdWeightsEntry>(), sub, bf16, x_dt, g_dt);
  });
  e->split = split;
  return e;
}

Cache<FwdEntry>& FwdCache() {
  static Cache<FwdEntry> cache;
  return cache;
}

Cache<BwdDataEntry>& BwdDataCache() {
  static Cache<BwdDataEntry> cache;
  return cache;
}

Cache<BwdWeightsEntry>& BwdWeightsCache() {
  static Cache<BwdWeightsEntry> cache;
  return cache;
}

// Binds `ptr` (an XLA buffer or scratch) as oneDNN memory without copying.
memory Wrap(const memory::desc& md, void* ptr) { return memory(md, Engine(), ptr); }

memory ScratchMemory(const memory::desc& md, Slot slot) {
  return Wrap(md, Scratch().Get(slot, md.get_size()));
}

// `user` as the primitive wants it: itself, or converted into scratch `slot`.
memory Converted(const Reorder& r, memory user, const memory::desc& want, Slot slot) {
  if (!r.needed) return user;
  memory out = ScratchMemory(want, slot);
  r.prim.execute(Stream(), user, out);
  return out;
}

ffi::Error Guard(const std::function<void()>& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("ffn onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

// float32 -> bfloat16, round to nearest even (inputs here are finite).
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float Load(const void* p, bool bf16, size_t i) {
  if (!bf16) return static_cast<const float*>(p)[i];
  uint32_t u = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// out = (y > 0 ? g : 0) written as float32 or bfloat16: the gradient through the fused ReLU
// (relu(t) > 0 <=> t > 0), converted to the compute dtype in the same pass. `parallel`: split
// the loop over OpenMP threads (false inside a part that already has its own thread).
template <bool kGBf16, bool kYBf16, bool kOutBf16>
void MaskedGrad(const void* g, const void* y, void* out, size_t count, bool parallel) {
#pragma omp parallel for schedule(static) if (parallel)
  for (size_t i = 0; i < count; ++i) {
    float v = Load(y, kYBf16, i) > 0.f ? Load(g, kGBf16, i) : 0.f;
    if (kOutBf16) static_cast<uint16_t*>(out)[i] = ToBf16(v);
    else static_cast<float*>(out)[i] = v;
  }
}

void MaskedGradDispatch(bool g_bf16, bool y_bf16, bool out_bf16, const void* g, const void* y,
                        void* out, size_t count, bool parallel) {
  using Fn = void (*)(const void*, const void*, void*, size_t, bool);
  static const Fn table[8] = {
      MaskedGrad<false, false, false>, MaskedGrad<false, false, true>,
      MaskedGrad<false, true, false>,  MaskedGrad<false, true, true>,
      MaskedGrad<true, false, false>,  MaskedGrad<true, false, true>,
      MaskedGrad<true, true, false>,   MaskedGrad<true, true, true>};
  table[int(g_bf16) << 2 | int(y_bf16) << 1 | int(out_bf16)](g, y, out, count, parallel);
}

ffi::Error ConvFwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer b, ffi::RemainingArgs rest,
                   ffi::Result<ffi::AnyBuffer> y, bool relu, bool residual, bool bf16) {
  ConvGeometry g;
  if (ffi::Error err = Geometry(x, w, bf16, &g); err.failure()) return err;
  if (auto e = CheckFloat(b, "bias", false); e.failure()) return e;
  if (auto e = CheckFloat(*y, "output", bf16); e.failure()) return e;
  void* residual_ptr = nullptr;
  if (residual) {
    auto r = rest.get<ffi::AnyBuffer>(0);
    if (r.has_error()) return r.error();
    if (auto e = CheckFloat(r.value(), "residual", false); e.failure()) return e;
    if (r.value().element_count() != g.DstElems()) {
      return ffi::Error::InvalidArgument("residual must have the output's shape");
    }
    residual_ptr = r.value().untyped_data();
  }
  const Dt x_dt = ToDnnl(x.element_type()), y_dt = ToDnnl(y->element_type());
  if (residual && y_dt != Dt::f32) {
    return ffi::Error::InvalidArgument("onednn conv: a residual add needs a float32 output");
  }
  return Guard([&] {
    ApplyThreads();
    FwdEntry& e = FwdCache().Get(
        Key(g, {relu, residual, bf16, int(x_dt), int(y_dt), omp_get_max_threads(), int(g_batch_split.load())}),
        [&] { return MakeFwd(g, relu, residual, bf16, x_dt, y_dt); });
    const ConvGeometry sub = g.WithBatch(e.split.n_sub);
    // The kernel, converted once and shared read-only by all parts.
    memory weights = Converted(e.weights, Wrap(UserWeights(g), w.untyped_data()),
                               e.pd.weights_desc(), kWeights);
    if (residual && e.residual_via_sum) {
      // Fallback only: the sum post-op accumulates onto dst, so dst must hold the residual.
      std::memcpy(y->untyped_data(), residual_ptr, sizeof(float) * g.DstElems());
    }
    ForParts(e.split, [&](int part) {
      const int64_t first = part * e.split.n_sub;
      void* x_part = Offset(x.untyped_data(), x_dt, g.SrcSampleElems(), first);
      void* y_part = Offset(y->untyped_data(), y_dt, g.DstSampleElems(), first);
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, Converted(e.src, Wrap(Act(sub.Src(), x_dt), x_part), e.pd.src_desc(),
                                   kSrc)},
          {DNNL_ARG_WEIGHTS, weights},
          {DNNL_ARG_BIAS, Wrap(Bias(g), b.untyped_data())},
          {DNNL_ARG_DST, Wrap(e.pd.dst_desc(), y_part)},
          {DNNL_ARG_SCRATCHPAD, ScratchMemory(e.pd.scratchpad_desc(), kScratchpad)},
      };
      if (residual && !e.residual_via_sum) {
        args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                     Wrap(Act(sub.Dst(), Dt::f32),
                          Offset(residual_ptr, Dt::f32, g.DstSampleElems(), first)));
      }
      e.prim.execute(Stream(), args);
      Stream().wait();
    });
  });
}

// dL/dw and dL/db of y = post(conv(x, w) + b [+ r]), given g = dL/dy. With relu, or when g's
// dtype is not the compute dtype, also returns gd: the gradient at the conv output (masked by
// the ReLU) in the compute dtype, which the data-gradient call then consumes.
ffi::Error ConvBwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer grad,
                          ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dw,
                          ffi::Result<ffi::AnyBuffer> db, ffi::RemainingRets gd_ret, bool relu,
                          bool bf16) {
  ConvGeometry g;
  if (ffi::Error err = Geometry(x, w, bf16, &g); err.failure()) return err;
  if (auto e = CheckFloat(grad, "output gradient", bf16); e.failure()) return e;
  if (grad.element_count() != g.DstElems()) {
    return ffi::Error::InvalidArgument("output gradient must have the output's shape");
  }
  const void* y_ptr = nullptr;
  bool y_bf16 = false;
  if (relu) {
    auto y = rest.get<ffi::AnyBuffer>(0);
    if (y.has_error()) return y.error();
    if (auto e = CheckFloat(y.value(), "output", bf16); e.failure()) return e;
    y_ptr = y.value().untyped_data();
    y_bf16 = IsBf16(y.value().element_type());
  }
  const Dt x_dt = ToDnnl(x.element_type()), g_dt = ToDnnl(grad.element_type()), c = Compute(bf16);
  const bool convert = relu || g_dt != c;
  void* gd_ptr = nullptr;
  if (convert) {
    auto gd = gd_ret.get<ffi::AnyBuffer>(0);
    if (gd.has_error()) return gd.error();
    if (ToDnnl(gd.value()->element_type()) != c || gd.value()->element_count() != g.DstElems()) {
      return ffi::Error::InvalidArgument("gd must have the output's shape and compute dtype");
    }
    gd_ptr = gd.value()->untyped_data();
  }
  return Guard([&] {
    ApplyThreads();
    BwdWeightsEntry& e = BwdWeightsCache().Get(
        Key(g, {bf16, int(x_dt), int(g_dt), omp_get_max_threads(), int(g_batch_split.load())}),
        [&] { return MakeBwdWeights(g, bf16, x_dt, g_dt); });
    const ConvGeometry sub = g.WithBatch(e.split.n_sub);
    const bool split = e.split.parts > 1;
    const size_t wcount = size_t(g.kd * g.kh * g.kw * g.ci * g.co);
    // Per-part kernel and bias gradients in user layout, summed below; one part writes directly.
    std::vector<float*> part_dw(e.split.parts), part_db(e.split.parts);
    ForParts(e.split, [&](int part) {
      const int64_t first = part * e.split.n_sub;
      const size_t count = sub.DstElems();
      const void* g_part = Offset(grad.untyped_data(), g_dt, g.DstSampleElems(), first);
      void* gd_part = convert ? Offset(gd_ptr, c, g.DstSampleElems(), first) : nullptr;
      memory diff_dst = Wrap(Act(sub.Dst(), c), convert ? gd_part : const_cast<void*>(g_part));
      if (relu) {
        MaskedGradDispatch(g_dt == Dt::bf16, y_bf16, c == Dt::bf16, g_part,
                           Offset(y_ptr, y_bf16 ? Dt::bf16 : Dt::f32, g.DstSampleElems(), first),
                           gd_part, count, !split);
      } else if (convert) {
        memory user = Wrap(Act(sub.Dst(), g_dt), const_cast<void*>(g_part));
        e.grad.prim.execute(Stream(), user, diff_dst);
      }
      float* dw_out = static_cast<float*>(dw->untyped_data());
      float* db_out = static_cast<float*>(db->untyped_data());
      if (split) {
        dw_out = static_cast<float*>(Scratch().Get(kPartialWeights, sizeof(float) * wcount));
        db_out = static_cast<float*>(Scratch().Get(kPartialBias, sizeof(float) * g.co));
      }
      part_dw[part] = dw_out;
      part_db[part] = db_out;
      memory user_dw = Wrap(UserWeights(g), dw_out);
      memory diff_w = e.diff_weights.needed
                          ? ScratchMemory(e.pd.diff_weights_desc(), kDiffWeights)
                          : user_dw;
      void* x_part = Offset(x.untyped_data(), x_dt, g.SrcSampleElems(), first);
      // oneDNN reduces the bias gradient in the same pass.
      e.prim.execute(Stream(),
                     {{DNNL_ARG_SRC, Converted(e.src, Wrap(Act(sub.Src(), x_dt), x_part),
                                               e.pd.src_desc(), kSrc)},
                      {DNNL_ARG_DIFF_DST, diff_dst},
                      {DNNL_ARG_DIFF_WEIGHTS, diff_w},
                      {DNNL_ARG_DIFF_BIAS, Wrap(Bias(g), db_out)},
                      {DNNL_ARG_SCRATCHPAD, ScratchMemory(e.pd.scratchpad_desc(), kScratchpad)}});
      if (e.diff_weights.needed) e.diff_weights.prim.execute(Stream(), diff_w, user_dw);
      Stream().wait();
    });
    if (split) {
      float* dw_out = static_cast<float*>(dw->untyped_data());
      float* db_out = static_cast<float*>(db->untyped_data());
      for (size_t i = 0; i < wcount; ++i) {
        float sum = 0.f;
        for (float* p : part_dw) sum += p[i];
        dw_out[i] = sum;
      }
      for (int64_t i = 0; i < g.co; ++i) {
        float sum = 0.f;
        for (float* p : part_db) sum += p[i];
        db_out[i] = sum;
      }
    }
  });
}

// dL/dx given gd (the gradient at the conv output, compute dtype) and w. The trailing `after`
// operand is unused: it orders this call after the weights call, so that XLA never runs the two
// at once (two OpenMP teams on the same cores), while it still drops this call where dL/dx is
// not needed (the model's input).
ffi::Error ConvBwdData(ffi::AnyBuffer gd, ffi::AnyBuffer w, ffi::AnyBuffer after,
                       ffi::Result<ffi::AnyBuffer> dx, bool bf16) {
  (void)after;
  auto gdims = gd.dimensions();
  auto wd = w.dimensions();
  auto xd = dx->dimensions();
  if (gdims.size() != 5 || wd.size() != 5 || xd.size() != 5 || gdims[4] != wd[4] ||
      xd[4] != wd[3]) {
    return ffi::Error::InvalidArgument("onednn conv bwd data: inconsistent shapes");
  }
  if (auto e = CheckFloat(gd, "output gradient", bf16); e.failure()) return e;
  if (auto e = CheckFloat(w, "kernel", false); e.failure()) return e;
  if (auto e = CheckFloat(*dx, "input gradient", bf16); e.failure()) return e;
  const ConvGeometry g{xd[0], xd[1], xd[2], xd[3], xd[4], wd[4], wd[0], wd[1], wd[2]};
  const Dt c = Compute(bf16), dx_dt = ToDnnl(dx->element_type());
  if (ToDnnl(gd.element_type()) != c) {
    return ffi::Error::InvalidArgument("onednn conv bwd data: gradient not in compute dtype");
  }
  return Guard([&] {
    ApplyThreads();
    BwdDataEntry& e = BwdDataCache().Get(Key(g, {bf16, int(dx_dt), omp_get_max_threads(), int(g_batch_split.load())}),
                                         [&] { return MakeBwdData(g, bf16, dx_dt); });
    const ConvGeometry sub = g.WithBatch(e.split.n_sub);
    memory weights = Converted(e.weights, Wrap(UserWeights(g), w.untyped_data()),
                               e.pd.weights_desc(), kWeights);
    ForParts(e.split, [&](int part) {
      const int64_t first = part * e.split.n_sub;
      e.prim.execute(
          Stream(),
          {{DNNL_ARG_DIFF_DST, Wrap(Act(sub.Dst(), c),
                                    Offset(gd.untyped_data(), c, g.DstSampleElems(), first))},
           {DNNL_ARG_WEIGHTS, weights},
           {DNNL_ARG_DIFF_SRC, Wrap(e.pd.diff_src_desc(),
                                    Offset(dx->untyped_data(), dx_dt, g.SrcSampleElems(), first))},
           {DNNL_ARG_SCRATCHPAD, ScratchMemory(e.pd.scratchpad_desc(), kScratchpad)}});
      Stream().wait();
    });
  });
}

}  // namespace

// Built with -fvisibility=hidden; only what follows is exported.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfnOnednnConvFwd, ConvFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x, NDHWC
                                  .Arg<ffi::AnyBuffer>()  // w, DHWIO
                                  .Arg<ffi::AnyBuffer>()  // b, O
                                  .RemainingArgs()        // r, NDHWC (if residual)
                                  .Ret<ffi::AnyBuffer>()  // y, NDHWC
                                  .Attr<bool>("relu")
                                  .Attr<bool>("residual")
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfnOnednnConvBwdWeights, ConvBwdWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w (shape only)
                                  .Arg<ffi::AnyBuffer>()  // g = dL/dy
                                  .RemainingArgs()        // y (if relu)
                                  .Ret<ffi::AnyBuffer>()  // dw
                                  .Ret<ffi::AnyBuffer>()  // db
                                  .RemainingRets()        // gd (if relu or g needs converting)
                                  .Attr<bool>("relu")
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfnOnednnConvBwdData, ConvBwdData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // gd
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // after (ordering only)
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Attr<bool>("bf16"));

extern "C" {

// Threads for oneDNN's OpenMP regions; 0 keeps OpenMP's default (OMP_NUM_THREADS or all cores).
void FfnOnednnSetNumThreads(int n) { g_num_threads.store(n < 0 ? 0 : n); }

// 1 (default): spread a batch over threads, one sub-batch each, when it divides evenly; 0: never.
void FfnOnednnSetBatchSplit(int on) { g_batch_split.store(on != 0); }

int FfnOnednnVersion() {
  const dnnl_version_t* v = dnnl::version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// Implementation names oneDNN picks for one conv geometry, "fwd;bwd_data;bwd_weights", written
// into `out` (at most `cap` bytes). Returns 0, or 1 with the error message in `out`.
int FfnOnednnImplInfo(int64_t n, int64_t d, int64_t h, int64_t w, int64_t ci, int64_t co,
                      int64_t k, int bf16, char* out, int cap) {
  try {
    ConvGeometry g{n, d, h, w, ci, co, k, k, k};
    const Dt c = Compute(bf16 != 0);
    auto fwd = MakeFwd(g, false, false, bf16 != 0, c, Dt::f32);
    auto data = MakeBwdData(g, bf16 != 0, c);
    auto weights = MakeBwdWeights(g, bf16 != 0, c, c);
    std::string info = std::string(fwd->pd.impl_info_str()) + ";" + data->pd.impl_info_str() +
                       ";" + weights->pd.impl_info_str();
    std::snprintf(out, cap, "%s", info.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(out, cap, "%s", e.what());
    return 1;
  }
}

}  // extern "C"

#pragma GCC visibility pop
