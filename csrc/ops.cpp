// Host layer of the C++ back ends: op schemas (TORCH_LIBRARY), argument validation,
// output allocation, and the CPU / CUDA registrations (TORCH_LIBRARY_IMPL). The pybind11
// module itself is module.cpp. Semantics: docs/KERNEL_OPS.md.
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

// Per-op ATen headers instead of ATen/ATen.h: a much faster compile.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#ifdef PFGMPP_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "backends.h"
#include "philox.h"

namespace pfgmpp {

#ifdef PFGMPP_WITH_CUDA
void cuda_check(int error, const char* what, const char* file, int line) {
  if (error == 0) return;
  try {
    C10_CUDA_CHECK(static_cast<cudaError_t>(error));
  } catch (c10::Error& e) {
    e.add_context(std::string("pfgmpp_fast: ") + what + " at " + file + ":" + std::to_string(line));
    throw;
  }
}
#endif

namespace {

using at::Tensor;
using c10::ScalarType;

DType to_dtype(ScalarType st) {
  switch (st) {
    case ScalarType::Float: return DType::F32;
    case ScalarType::Double: return DType::F64;
    case ScalarType::BFloat16: return DType::BF16;
    case ScalarType::Half: return DType::F16;
    default: TORCH_CHECK_TYPE(false, "pfgmpp_fast: unsupported dtype ", st);
  }
  return DType::F32;
}

bool supported_float(ScalarType st) {
  return st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::BFloat16 ||
         st == ScalarType::Half;
}

uint64_t checked_key(const char* op, int64_t key) {
  TORCH_CHECK_VALUE(key >= 0, op, ": key must be in [0, 2^63), got ", key);
  return static_cast<uint64_t>(key);
}

uint32_t checked_stream(const char* op, const char* name, int64_t stream) {
  TORCH_CHECK_VALUE(stream >= 0 && stream <= 0xFFFFFFFFLL, op, ": ", name,
                    " must be in [0, 2^32), got ", stream);
  return static_cast<uint32_t>(stream);
}

// Element e of a sample draws from Philox block e / 4, and the block index is one 32-bit counter
// word (philox.h, docs/DESIGN.md §2): every op that draws normals per element takes at most 2^34
// elements per sample. `what` names the count ("n", "the elements per sample of y"); checked
// before any input is copied or output allocated. pfgmpp_fast/checks.py says the same.
constexpr int64_t kMaxElementsPerSample = int64_t(1) << 34;

void check_elements_per_sample(const char* op, const char* what, int64_t n) {
  TORCH_CHECK_VALUE(n >= 0 && n <= kMaxElementsPerSample, op, ": ", what, " must be in [0, 2^34], got ", n,
                    " (element e draws from Philox block e // 4, a 32-bit counter word)");
}

void check_device(const char* op, const char* name, const Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, " must be on ", dev,
                    " (the device of the image input), got ", t.device());
}

void check_backend_device(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), op, ": ", name,
                    " must be a CPU or CUDA tensor, got device ", t.device());
}

Tensor checked_ids(const char* op, const Tensor& ids, int64_t B, const at::Device& dev) {
  TORCH_CHECK_TYPE(ids.scalar_type() == ScalarType::Long, op,
                   ": sample_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == B, op, ": sample_ids must have shape [",
                    B, "], got ", ids.sizes());
  check_device(op, "sample_ids", ids, dev);
  return ids.contiguous();
}

// A per-sample scalar vector [B], converted to the op's compute type.
Tensor per_sample(const char* op, const char* name, const Tensor& v, int64_t B,
                  const at::Device& dev, ScalarType compute) {
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), op, ": ", name,
                   " must be a floating tensor, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == B, op, ": ", name, " must have shape [", B,
                    "], got ", v.sizes());
  check_device(op, name, v, dev);
  return v.to(compute).contiguous();
}

// An image input kept as is when contiguous or channels-last, else copied once.
struct Image {
  Tensor t;
  bool channels_last;
};

Image image_input(const char* op, const char* name, const Tensor& t,
                  std::optional<ScalarType> as_dtype = std::nullopt) {
  TORCH_CHECK_TYPE(supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  Tensor u = (as_dtype && t.scalar_type() != *as_dtype) ? t.to(*as_dtype) : t;
  if (u.is_contiguous()) return {u, false};
  if (u.dim() == 4 && u.is_contiguous(at::MemoryFormat::ChannelsLast)) return {u, true};
  return {u.contiguous(), false};
}

ImageArg image_arg(const Tensor& t, bool channels_last) {
  ImageArg a;
  a.ptr = t.numel() > 0 ? t.data_ptr() : nullptr;
  a.dtype = to_dtype(t.scalar_type());
  a.channels_last = channels_last;
  a.aligned16 = (reinterpret_cast<uintptr_t>(a.ptr) % 16) == 0;
  return a;
}

Geometry geometry(const Tensor& t) {
  Geometry g;
  g.B = t.size(0);
  g.N = 1;
  for (int64_t d = 1; d < t.dim(); ++d) g.N *= t.size(d);
  if (t.dim() == 4) {
    g.C = t.size(1);
    g.HW = t.size(2) * t.size(3);
  } else {
    g.C = g.N;
    g.HW = 1;
  }
  return g;
}

void check_image_dims(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
}

void check_same_shape(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ",
                    ref_name, " ", ref.sizes(), ", got ", t.sizes());
}

void check_out_dtype(const char* op, const char* name, ScalarType st) {
  TORCH_CHECK_TYPE(supported_float(st), op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", st);
}

// channels_last only applies to 4-D images (like reference.py: other ranks stay contiguous).
bool effective_channels_last(bool channels_last, const Tensor& like) {
  return channels_last && like.dim() == 4;
}

at::MemoryFormat net_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

Tensor empty_of(const Tensor& like, ScalarType st) { return at::empty({0}, like.options().dtype(st)); }

// The dispatch tail of every op: runs `cpu_call()` for a CPU tensor `on`, else
// `cuda_call(stream)` on on's device and its current stream. Write the CUDA call as
// PFG_CUDA_CALL(expression using `stream`) so that CPU-only builds never reference it.
#ifdef PFGMPP_WITH_CUDA
#define PFG_CUDA_CALL(...) [&](void* stream) { __VA_ARGS__; }
#else
#define PFG_CUDA_CALL(...) nullptr
#endif

template <typename CpuCall, typename CudaCall>
void run_kernel(const Tensor& on, CpuCall&& cpu_call, CudaCall&& cuda_call) {
#ifdef PFGMPP_WITH_CUDA
  if (on.is_cuda()) {
    const c10::cuda::OptionalCUDAGuard device_guard(on.device());
    cuda_call(static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
    return;
  }
#else
  (void)cuda_call;
#endif
  cpu_call();
}

void require_cuda_build(const char* op, const Tensor& t) {
#ifndef PFGMPP_WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), op, ": pfgmpp_fast._C was built without CUDA kernels");
#else
  (void)op;
  (void)t;
#endif
}

// ---------------------------------------------------------------------------- ops

Tensor philox4x32_op(const Tensor& counter, int64_t key) {
  const char* op = "philox4x32";
  TORCH_CHECK_TYPE(counter.scalar_type() == ScalarType::Long, op,
                   ": counter must be int64, got ", counter.scalar_type());
  TORCH_CHECK_VALUE(counter.dim() == 2 && counter.size(1) == 4, op,
                    ": counter must have shape [M, 4], got ", counter.sizes());
  check_backend_device(op, "counter", counter);
  require_cuda_build(op, counter);
  RawPhiloxParams p;
  const Tensor c = counter.contiguous();
  Tensor out = at::empty_like(c);
  p.counter = c.data_ptr<int64_t>();
  p.out = out.data_ptr<int64_t>();
  p.M = c.size(0);
  p.key = checked_key(op, key);
  if (p.M == 0) return out;
  run_kernel(c, [&] { cpu::philox4x32(p); }, PFG_CUDA_CALL(cuda::philox4x32(p, stream)));
  return out;
}

Tensor philox_normal_op(const Tensor& sample_ids, int64_t key, int64_t n, int64_t stream) {
  const char* op = "philox_normal";
  check_backend_device(op, "sample_ids", sample_ids);
  require_cuda_build(op, sample_ids);
  check_elements_per_sample(op, "n", n);
  TORCH_CHECK_VALUE(sample_ids.dim() == 1, op, ": sample_ids must be 1-D, got shape ",
                    sample_ids.sizes());
  const Tensor ids = checked_ids(op, sample_ids, sample_ids.size(0), sample_ids.device());
  NormalParams p;
  p.B = ids.size(0);
  p.n = n;
  p.key = checked_key(op, key);
  p.stream = checked_stream(op, "stream", stream);
  Tensor out = at::empty({p.B, n}, ids.options().dtype(ScalarType::Float));
  if (out.numel() == 0) return out;
  p.sample_ids = ids.data_ptr<int64_t>();
  p.out = out.data_ptr<float>();
  run_kernel(ids, [&] { cpu::philox_normal(p); }, PFG_CUDA_CALL(cuda::philox_normal(p, stream)));
  return out;
}

Tensor chi2_op(const Tensor& sample_ids, int64_t key, double D, int64_t stream) {
  const char* op = "chi2";
  check_backend_device(op, "sample_ids", sample_ids);
  require_cuda_build(op, sample_ids);
  TORCH_CHECK_VALUE(std::isfinite(D) && D > 0.0, op,
                    ": D must be finite and > 0 (D = inf needs no chi2 draw), got ", D);
  TORCH_CHECK_VALUE(sample_ids.dim() == 1, op, ": sample_ids must be 1-D, got shape ",
                    sample_ids.sizes());
  const Tensor ids = checked_ids(op, sample_ids, sample_ids.size(0), sample_ids.device());
  Chi2Params p;
  p.B = ids.size(0);
  p.key = checked_key(op, key);
  p.D = D;
  p.stream = checked_stream(op, "stream", stream);
  Tensor out = at::empty({p.B}, ids.options().dtype(ScalarType::Double));
  if (p.B == 0) return out;
  p.sample_ids = ids.data_ptr<int64_t>();
  p.out = out.data_ptr<double>();
  run_kernel(ids, [&] { cpu::chi2(p); }, PFG_CUDA_CALL(cuda::chi2(p, stream)));
  return out;
}

std::tuple<Tensor, Tensor> perturb_op(const Tensor& y, const Tensor& scale, const Tensor& c_in,
                                      const Tensor& sample_ids, int64_t key, int64_t stream,
                                      ScalarType out_dtype, bool channels_last, bool write_x) {
  const char* op = "perturb";
  check_image_dims(op, "y", y);
  check_backend_device(op, "y", y);
  check_elements_per_sample(op, "the elements per sample of y", geometry(y).N);
  require_cuda_build(op, y);
  check_out_dtype(op, "out_dtype", out_dtype);
  const ScalarType compute =
      y.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  const Image yi = image_input(op, "y", y, compute);
  const Geometry g = geometry(y);
  const at::Device dev = y.device();
  const Tensor s = per_sample(op, "scale", scale, g.B, dev, compute);
  const Tensor ci = per_sample(op, "c_in", c_in, g.B, dev, compute);
  const Tensor ids = checked_ids(op, sample_ids, g.B, dev);

  PerturbParams p;
  p.key = checked_key(op, key);
  p.stream = checked_stream(op, "stream", stream);
  channels_last = effective_channels_last(channels_last, y);
  const at::MemoryFormat fmt = net_format(channels_last);
  Tensor net_in = at::empty(y.sizes(), y.options().dtype(out_dtype).memory_format(fmt));
  Tensor x = write_x ? at::empty(y.sizes(), y.options().dtype(compute)) : empty_of(y, compute);
  if (g.B * g.N == 0) return {net_in, x};

  p.g = g;
  p.y = image_arg(yi.t, yi.channels_last);
  p.net_in = image_arg(net_in, channels_last);
  p.x = write_x ? image_arg(x, false) : ImageArg{};
  p.scale = s.data_ptr();
  p.c_in = ci.data_ptr();
  p.sample_ids = ids.data_ptr<int64_t>();
  p.use_double = compute == ScalarType::Double;
  run_kernel(y, [&] { cpu::perturb(p); }, PFG_CUDA_CALL(cuda::perturb(p, stream)));
  return {net_in, x};
}

#ifdef PFGMPP_WITH_CUDA
// The CUDA loss also needs its per-chunk partial sums ([B, chunks] floats).
void cuda_loss_fwd_bwd(const LossParams& p, const Tensor& F, void* stream) {
  const int64_t chunks = cuda::loss_num_chunks(p);
  TORCH_CHECK_VALUE(chunks < (int64_t(1) << 31), "loss_fwd_bwd: too many elements per sample, N=", p.g.N);
  const Tensor partials = at::empty({p.g.B, chunks}, F.options().dtype(ScalarType::Float));
  cuda::loss_fwd_bwd(p, partials.data_ptr<float>(), stream);
}
#endif

std::tuple<Tensor, Tensor> loss_fwd_bwd_op(const Tensor& F, const Tensor& y, const Tensor& scale,
                                           const Tensor& c_skip, const Tensor& c_out,
                                           const Tensor& sample_ids, int64_t key, int64_t stream,
                                           double grad_scale) {
  const char* op = "loss_fwd_bwd";
  check_image_dims(op, "F", F);
  check_backend_device(op, "F", F);
  check_elements_per_sample(op, "the elements per sample of F", geometry(F).N);
  require_cuda_build(op, F);
  const at::Device dev = F.device();
  check_device(op, "y", y, dev);
  check_same_shape(op, "y", y, "F", F);
  const ScalarType compute =
      (F.scalar_type() == ScalarType::Double || y.scalar_type() == ScalarType::Double)
          ? ScalarType::Double
          : ScalarType::Float;
  const Image Fi = image_input(op, "F", F);
  const Image yi = image_input(op, "y", y, compute);
  const Geometry g = geometry(F);
  const Tensor s = per_sample(op, "scale", scale, g.B, dev, compute);
  const Tensor cs = per_sample(op, "c_skip", c_skip, g.B, dev, compute);
  const Tensor co = per_sample(op, "c_out", c_out, g.B, dev, compute);
  const Tensor ids = checked_ids(op, sample_ids, g.B, dev);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ",
                    grad_scale);

  LossParams p;
  p.key = checked_key(op, key);
  p.stream = checked_stream(op, "stream", stream);
  Tensor loss = at::empty({g.B}, F.options().dtype(ScalarType::Float));
  Tensor grad = at::empty(Fi.t.sizes(), Fi.t.options().memory_format(
                                             Fi.channels_last ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous));
  if (g.B * g.N == 0) return {loss.zero_(), grad};  // N == 0: every sample's loss is 0

  p.g = g;
  p.F = image_arg(Fi.t, Fi.channels_last);
  p.y = image_arg(yi.t, yi.channels_last);
  p.grad_F = image_arg(grad, Fi.channels_last);
  p.scale = s.data_ptr();
  p.c_skip = cs.data_ptr();
  p.c_out = co.data_ptr();
  p.sample_ids = ids.data_ptr<int64_t>();
  p.per_sample_loss = loss.data_ptr<float>();
  p.grad_scale = grad_scale;
  p.use_double = compute == ScalarType::Double;
  run_kernel(F, [&] { cpu::loss_fwd_bwd(p); }, PFG_CUDA_CALL(cuda_loss_fwd_bwd(p, F, stream)));
  return {loss, grad};
}

std::tuple<Tensor, Tensor, Tensor> sampler_update_op(
    const Tensor& x, const std::optional<Tensor>& F, const std::optional<Tensor>& base, double A,
    double Bf, double h1, std::optional<double> h2, const Tensor& sample_ids, int64_t key,
    double alpha_scale, int64_t alpha_stream, double churn_scale, int64_t churn_stream,
    std::optional<double> c_in_next, ScalarType net_dtype, bool channels_last) {
  const char* op = "sampler_update";
  check_image_dims(op, "x", x);
  check_backend_device(op, "x", x);
  check_elements_per_sample(op, "the elements per sample of x", geometry(x).N);
  require_cuda_build(op, x);
  TORCH_CHECK_TYPE(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double,
                   op, ": x (the sampler state) must be float32 or float64, got ",
                   x.scalar_type());
  check_out_dtype(op, "net_dtype", net_dtype);
  const ScalarType state = x.scalar_type();
  const at::Device dev = x.device();
  const Geometry g = geometry(x);
  const bool has_F = F.has_value();
  const bool has_base = base.has_value();
  std::optional<Image> Fi, bi;
  if (has_F) {
    check_device(op, "F", *F, dev);
    check_same_shape(op, "F", *F, "x", x);
    Fi = image_input(op, "F", *F);
  }
  if (has_base) {
    check_device(op, "base", *base, dev);
    check_same_shape(op, "base", *base, "x", x);
    TORCH_CHECK_TYPE(base->scalar_type() == state, op, ": base must have x's dtype ", state,
                     ", got ", base->scalar_type());
    bi = Image{base->contiguous(), false};
  }
  for (auto [name, v] : {std::pair<const char*, double>{"A", A}, {"Bf", Bf}, {"h1", h1},
                         {"alpha_scale", alpha_scale}, {"churn_scale", churn_scale}}) {
    TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
  }
  TORCH_CHECK_VALUE(!h2 || std::isfinite(*h2), op, ": h2 must be finite or None (no y2), got ",
                    h2.value_or(0.0));
  TORCH_CHECK_VALUE(!c_in_next || std::isfinite(*c_in_next), op,
                    ": c_in_next must be finite or None (no net input), got ",
                    c_in_next.value_or(0.0));
  const Tensor ids = checked_ids(op, sample_ids, g.B, dev);
  const Tensor xc = x.contiguous();

  SamplerParams p;
  p.key = checked_key(op, key);
  p.alpha_stream = checked_stream(op, "alpha_stream", alpha_stream);
  p.churn_stream = checked_stream(op, "churn_stream", churn_stream);
  const bool want_y2 = h2.has_value();
  const bool want_net = c_in_next.has_value();
  channels_last = effective_channels_last(channels_last, x);
  const at::MemoryFormat fmt = net_format(channels_last);
  Tensor y1 = at::empty(x.sizes(), x.options());
  Tensor y2 = want_y2 ? at::empty(x.sizes(), x.options()) : empty_of(x, state);
  Tensor net_in = want_net
                      ? at::empty(x.sizes(), x.options().dtype(net_dtype).memory_format(fmt))
                      : empty_of(x, net_dtype);
  if (g.B * g.N == 0) return {y1, y2, net_in};

  p.g = g;
  p.x = image_arg(xc, false);
  p.F = has_F ? image_arg(Fi->t, Fi->channels_last) : ImageArg{};
  p.base = has_base ? image_arg(bi->t, false) : ImageArg{};
  p.y1 = image_arg(y1, false);
  p.y2 = want_y2 ? image_arg(y2, false) : ImageArg{};
  p.net_in = want_net ? image_arg(net_in, channels_last) : ImageArg{};
  p.A = A;
  p.Bf = Bf;
  p.h1 = h1;
  p.h2 = h2.value_or(0.0);  // unused without y2
  p.alpha_scale = alpha_scale;
  p.churn_scale = churn_scale;
  p.c_in_next = c_in_next.value_or(0.0);  // unused without net_in
  p.sample_ids = ids.data_ptr<int64_t>();
  p.use_double = state == ScalarType::Double;
  run_kernel(x, [&] { cpu::sampler_update(p); }, PFG_CUDA_CALL(cuda::sampler_update(p, stream)));
  return {y1, y2, net_in};
}

}  // namespace
}  // namespace pfgmpp

TORCH_LIBRARY(pfgmpp_fast, m) {
  m.def("philox4x32(Tensor counter, int key) -> Tensor");
  m.def("philox_normal(Tensor sample_ids, int key, int n, int stream) -> Tensor");
  m.def("chi2(Tensor sample_ids, int key, float D, int stream) -> Tensor");
  m.def(
      "perturb(Tensor y, Tensor scale, Tensor c_in, Tensor sample_ids, int key, int stream, "
      "ScalarType out_dtype, bool channels_last, bool write_x) -> (Tensor, Tensor)");
  m.def(
      "loss_fwd_bwd(Tensor F, Tensor y, Tensor scale, Tensor c_skip, Tensor c_out, "
      "Tensor sample_ids, int key, int stream, float grad_scale) -> (Tensor, Tensor)");
  m.def(
      "sampler_update(Tensor x, Tensor? F, Tensor? base, float A, float Bf, float h1, float? h2, "
      "Tensor sample_ids, int key, float alpha_scale, int alpha_stream, float churn_scale, "
      "int churn_stream, float? c_in_next, ScalarType net_dtype, bool channels_last) "
      "-> (Tensor, Tensor, Tensor)");
}

#define PFG_REGISTER_ALL(m)                                      \
  m.impl("philox4x32", &pfgmpp::philox4x32_op);                  \
  m.impl("philox_normal", &pfgmpp::philox_normal_op);            \
  m.impl("chi2", &pfgmpp::chi2_op);                              \
  m.impl("perturb", &pfgmpp::perturb_op);                        \
  m.impl("loss_fwd_bwd", &pfgmpp::loss_fwd_bwd_op);              \
  m.impl("sampler_update", &pfgmpp::sampler_update_op)

TORCH_LIBRARY_IMPL(pfgmpp_fast, CPU, m) { PFG_REGISTER_ALL(m); }

#ifdef PFGMPP_WITH_CUDA
TORCH_LIBRARY_IMPL(pfgmpp_fast, CUDA, m) { PFG_REGISTER_ALL(m); }
#endif
