// bnlab's batch-norm operators for CPU tensors, in C++: the kernels of batch_norm.h behind PyTorch's dispatcher.
//
// The operators bnlab::batch_norm_{train,backward,eval} are defined in bnlab/nn/ops.py, with their
// schemas, fake (meta) implementations, tensor-op implementations for every device and a Python
// autograd kernel. This library adds, for CPU tensors, a CPU kernel for each and an AutogradCPU
// kernel for the two forward ones. A CPU call then goes Python -> dispatcher -> C++ and back, with
// no Python in between, in the forward or the backward pass.
//
// bnlab_register() installs these kernels and bnlab_deregister() removes them (both called from
// bnlab/kernels/__init__.py; use_kernels(False) removes them, and the Python implementations serve CPU
// tensors again). Registering at runtime rather than when the library loads keeps that switch exact.
//
// Inputs the kernels do not take directly are brought to them: float16/bfloat16 is computed in
// float32 (as statistics.py does), other layouts are made contiguous, per-feature tensors are cast
// to the compute dtype. Input checks give the messages of ops.py, as ValueError.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <tuple>
#include <utility>

#include "batch_norm.h"

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace k = bnlab::kernels;

// ---- checks (the messages of bnlab/nn/ops.py) ----

void check_input(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(1) >= 1,
                    "batch norm expects input of shape (N, C, *) with C >= 1, got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "batch norm expects a floating-point input, got ",
                   x.scalar_type());
}

void check_feature(const Tensor& x, const Tensor& t, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), "batch norm got ", x.size(1),
                    " features (dim 1 of input shape ", x.sizes(), ") but its ", name, " has shape ", t.sizes(),
                    "; the layer's num_features must match the input");
  TORCH_CHECK_VALUE(t.device() == x.device(), "batch norm got its input on ", x.device(), " but its ", name,
                    " on ", t.device(), "; move the layer to the input's device");
}

void check_feature(const Tensor& x, const OptionalTensor& t, const char* name) {
  if (t) check_feature(x, *t, name);
}

void check_values_per_feature(const Tensor& x) {
  TORCH_CHECK_VALUE(x.numel() / x.size(1) != 1,
                    "batch norm in training needs more than one value per feature, got input of shape ", x.sizes(),
                    "; use a batch of two or more samples, or call model.eval() to normalize with the running "
                    "statistics.");
}

// ---- tensors as the kernels take them ----

at::ScalarType compute_type(const Tensor& x) {
  const auto t = x.scalar_type();
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

// x in the compute dtype, contiguous (NCS) or channels_last (NSC).
Tensor kernel_input(const Tensor& x, at::ScalarType type) {
  Tensor t = x.scalar_type() == type ? x : x.to(type);
  if (t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
    return t;
  return t.contiguous();
}

// t with x's dtype and strides: the kernels walk x, dy and y together.
Tensor like(const Tensor& t, const Tensor& x) {
  if (t.scalar_type() == x.scalar_type() && t.strides() == x.strides()) return t;
  return at::empty_like(x).copy_(t);
}

Tensor per_feature(const OptionalTensor& t, at::ScalarType type) {
  if (!t || !t->defined()) return Tensor();
  return t->to(type).contiguous();
}

k::Shape shape_of(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  return k::Shape{n, c, x.numel() / (n * c), !x.is_contiguous()};
}

template <typename T>
const T* in(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* out(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// f(T{}) for the compute dtype T.
template <typename F>
void on_type(at::ScalarType type, F&& f) {
  if (type == at::kFloat)
    f(float{});
  else if (type == at::kDouble)
    f(double{});
  else
    TORCH_CHECK_TYPE(false, "bnlab's CPU batch norm computes in float32 or float64, not ", type);
}

// out (computed in the kernels' dtype and layout) as a tensor like input: its dtype, and the strides of
// at::empty_like(input), which ops.py's fake implementations promise (code torch.compile generates relies on
// them; a transposed input made it fail). Only inputs the kernels do not take directly are copied.
Tensor like_input(const Tensor& out, const Tensor& input) {
  if (out.strides() != input.strides()) return at::empty_like(input).copy_(out);
  return out.scalar_type() == input.scalar_type() ? out : out.to(input.scalar_type());
}

// The dtype of the weight and bias gradients (statistics.parameter_dtype): the compute dtype, or the weight's if
// wider, never a float16 that would round or overflow a float32 parameter's gradient.
at::ScalarType parameter_type(at::ScalarType type, const OptionalTensor& weight) {
  return weight && weight->defined() ? at::promote_types(type, weight->scalar_type()) : type;
}

// running <- (1 - momentum) * running + momentum * factor * batch in the buffer's dtype: torch.nn's formula and
// statistics.running_update's, so the two paths differ only as their statistics do, by rounding.
template <typename R>
void update_into(R* running, const double* batch, double factor, double momentum, int64_t C) {
  const R keep = static_cast<R>(1.0 - momentum), w = static_cast<R>(momentum);
  for (int64_t c = 0; c < C; c++) running[c] = running[c] * keep + static_cast<R>(batch[c] * factor) * w;
}

// running follows row `row` of stats (0: mean, 1: biased var), times factor.
void follow(const OptionalTensor& running, const Tensor& stats, int64_t row, double factor, double momentum) {
  if (!running || !running->defined()) return;
  const Tensor& r = *running;
  if (r.is_contiguous() && (r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble)) {
    const double* batch = stats.const_data_ptr<double>() + row * stats.size(1);
    on_type(r.scalar_type(), [&](auto zero) {
      using R = decltype(zero);
      update_into<R>(r.mutable_data_ptr<R>(), batch, factor, momentum, r.numel());
    });
    torch::autograd::impl::bump_version(r);
  } else {  // a strided view or a half-precision buffer: tensor ops
    r.mul_(1.0 - momentum).add_(stats[row].mul(factor).to(r.scalar_type()), momentum);
  }
}

// ---- CPU kernels ----

std::tuple<Tensor, Tensor> train_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                     const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                     double momentum, double eps, bool unbiased, bool relu) {
  check_input(input);
  check_feature(input, weight, "weight");
  check_feature(input, bias, "bias");
  check_feature(input, running_mean, "running_mean");
  check_feature(input, running_var, "running_var");
  check_values_per_feature(input);
  if (input.numel() == 0) {  // as torch.nn: an empty output, the running statistics left as they are
    Tensor stats = at::zeros({3, input.size(1)}, input.options().dtype(at::kDouble));
    stats[2].fill_(1.0 / std::sqrt(eps));  // statistics.moments and make_stats of no values
    return {at::empty_like(input), stats};
  }
  const auto type = compute_type(input);
  const Tensor x = kernel_input(input, type), w = per_feature(weight, type), b = per_feature(bias, type);
  const k::Shape sh = shape_of(x);
  Tensor y = at::empty_like(x);
  Tensor stats = at::empty({3, sh.C}, x.options().dtype(at::kDouble));
  on_type(type, [&](auto zero) {
    using T = decltype(zero);
    k::forward_train<T>(in<T>(x), in<T>(w), in<T>(b), out<double>(stats), out<T>(y), sh, at::get_num_threads(),
                        eps, relu);
  });
  const double count = static_cast<double>(sh.N * sh.S);
  follow(running_mean, stats, 0, 1.0, momentum);
  follow(running_var, stats, 1, unbiased ? count / (count - 1) : 1.0, momentum);
  return {like_input(y, input), stats};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& input, const OptionalTensor& weight,
                                                const Tensor& stats, const Tensor& grad,
                                                const OptionalTensor& output) {
  check_input(input);
  check_feature(input, weight, "weight");
  const bool output_matches = !output || !output->defined() || output->sizes() == input.sizes();
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == input.size(1) &&
                        grad.sizes() == input.sizes() && output_matches,
                    "bnlab::batch_norm_backward: stats, dy or y do not match x of shape ", input.sizes());
  const auto type = compute_type(input);
  const auto options = input.options().dtype(parameter_type(type, weight));
  if (input.numel() == 0)  // sums over no values
    return {at::empty_like(input), at::zeros({input.size(1)}, options), at::zeros({input.size(1)}, options)};
  const Tensor x = kernel_input(input, type), w = per_feature(weight, type);
  const Tensor dy = like(grad, x), y = output && output->defined() ? like(*output, x) : Tensor();
  const Tensor st = stats.to(at::kDouble).contiguous();
  const k::Shape sh = shape_of(x);
  Tensor dx = at::empty_like(x), dweight = at::empty({sh.C}, options), dbias = at::empty({sh.C}, options);
  std::vector<double> sum_dz_xhat(sh.C), sum_dz(sh.C);
  on_type(type, [&](auto zero) {
    using T = decltype(zero);
    k::backward<T>(in<T>(x), in<T>(w), in<double>(st), in<T>(dy), in<T>(y), out<T>(dx), sum_dz_xhat.data(),
                   sum_dz.data(), sh, at::get_num_threads());
  });
  on_type(dweight.scalar_type(), [&](auto zero) {
    using P = decltype(zero);
    P *dw = out<P>(dweight), *db = out<P>(dbias);
    for (int64_t c = 0; c < sh.C; c++) {
      dw[c] = static_cast<P>(sum_dz_xhat[c]);
      db[c] = static_cast<P>(sum_dz[c]);
    }
  });
  return {like_input(dx, input), dweight, dbias};
}

Tensor eval_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
                const Tensor& var, double eps, bool relu) {
  check_input(input);
  check_feature(input, weight, "weight");
  check_feature(input, bias, "bias");
  check_feature(input, mean, "running_mean");
  check_feature(input, var, "running_var");
  if (input.numel() == 0) return at::empty_like(input);
  const auto type = compute_type(input);
  const Tensor x = kernel_input(input, type), w = per_feature(weight, type), b = per_feature(bias, type);
  const Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
  const k::Shape sh = shape_of(x);
  std::vector<double> invstd(sh.C);
  for (int64_t c = 0; c < sh.C; c++) invstd[c] = 1.0 / std::sqrt(v.const_data_ptr<double>()[c] + eps);
  Tensor y = at::empty_like(x);
  on_type(type, [&](auto zero) {
    using T = decltype(zero);
    k::normalize<T>(in<T>(x), out<T>(y), sh, at::get_num_threads(), in<double>(m), invstd.data(), in<T>(w),
                    in<T>(b), relu);
  });
  return like_input(y, input);
}

// ---- autograd ----
//
// The same formulas as ops.py's Python autograd kernel, through the same operators: the closed-form
// bnlab::batch_norm_backward, and under create_graph (gradients that will be differentiated again)
// ops.py's differentiable ones, bnlab::batch_norm_train_backward_differentiable and
// bnlab::batch_norm_eval_backward.

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TrainSignature = std::tuple<Tensor, Tensor>(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                                  const OptionalTensor&, const OptionalTensor&, double, double,
                                                  bool, bool);
using EvalSignature = Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
                             const Tensor&, double, bool);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptionalTensor&, const Tensor&,
                                                             const Tensor&, const OptionalTensor&);
using DifferentiableSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptionalTensor&,
                                                                   const OptionalTensor&, const Tensor&, double,
                                                                   bool);
using EvalBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptionalTensor&,
                                                                 const Tensor&, const Tensor&, const Tensor&,
                                                                 const OptionalTensor&, double,
                                                                 c10::ArrayRef<bool>);

const auto& train_op() {
  static const auto op = find<TrainSignature>("bnlab::batch_norm_train");
  return op;
}
const auto& eval_op() {
  static const auto op = find<EvalSignature>("bnlab::batch_norm_eval");
  return op;
}

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// Which of x, weight, bias need a gradient: needs_input_grad counts only the inputs that are tensors,
// so an absent weight shifts the bias's index.
std::array<bool, 3> wanted(AutogradContext* ctx, bool has_weight, bool has_bias) {
  const bool present[3] = {true, has_weight, has_bias};
  std::array<bool, 3> needs{};
  for (int i = 0, edge = 0; i < 3; i++) needs[i] = present[i] && ctx->needs_input_grad(edge++);
  return needs;
}

bool requires_grad(const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias) {
  return c10::GradMode::is_enabled() &&
         (x.requires_grad() || (weight && weight->requires_grad()) || (bias && bias->requires_grad()));
}

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, double momentum, double eps, bool unbiased,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, stats] = train_op().call(x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu);
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), stats, relu ? y : Tensor()});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({stats});
    return {y, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto closed_form = find<BackwardSignature>("bnlab::batch_norm_backward");
    static const auto differentiable =
        find<DifferentiableSignature>("bnlab::batch_norm_train_backward_differentiable");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &stats = saved[3], &y = saved[4];
    auto [dx, dweight, dbias] =
        c10::GradMode::is_enabled()
            ? differentiable.call(x, optional(weight), optional(bias), grads[0], ctx->saved_data["eps"].toDouble(),
                                  ctx->saved_data["relu"].toBool())
            : closed_form.call(x, optional(weight), stats, grads[0], optional(y));
    const auto needs = wanted(ctx, weight.defined(), bias.defined());
    return {needs[0] ? dx : Tensor(), needs[1] ? dweight : Tensor(), needs[2] ? dbias : Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct EvalFunction : public torch::autograd::Function<EvalFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, const Tensor& mean, const Tensor& var, double eps,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor y = eval_op().call(x, weight, bias, mean, var, eps, relu);
    ctx->save_for_backward({x, weight.value_or(Tensor()), mean, var, relu ? y : Tensor()});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto eval_backward = find<EvalBackwardSignature>("bnlab::batch_norm_eval_backward");
    const auto saved = ctx->get_saved_variables();
    const auto needs = wanted(ctx, saved[1].defined(), ctx->saved_data["bias"].toBool());
    const bool mask[3] = {needs[0], needs[1], needs[2]};
    auto [dx, dweight, dbias] = eval_backward.call(saved[0], optional(saved[1]), saved[2], saved[3], grads[0],
                                                   optional(saved[4]), ctx->saved_data["eps"].toDouble(), mask);
    return {needs[0] ? dx : Tensor(), needs[1] ? dweight : Tensor(), needs[2] ? dbias : Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> train_autograd(const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                                          const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                          double momentum, double eps, bool unbiased, bool relu) {
  if (!requires_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return train_op().call(x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu);
  }
  auto outputs = TrainFunction::apply(x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu);
  return {outputs[0], outputs[1]};
}

Tensor eval_autograd(const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, const Tensor& mean,
                     const Tensor& var, double eps, bool relu) {
  if (!requires_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return eval_op().call(x, weight, bias, mean, var, eps, relu);
  }
  return EvalFunction::apply(x, weight, bias, mean, var, eps, relu)[0];
}

std::unique_ptr<torch::Library> cpu_kernels, autograd_kernels;

}  // namespace

extern "C" {

// Install the CPU and AutogradCPU kernels; 0 on success, else 1 (nothing installed).
int bnlab_register() {
  try {
    cpu_kernels = std::make_unique<torch::Library>(torch::Library::IMPL, "bnlab", c10::DispatchKey::CPU, __FILE__,
                                                   __LINE__);
    cpu_kernels->impl("batch_norm_train", TORCH_FN(train_cpu));
    cpu_kernels->impl("batch_norm_backward", TORCH_FN(backward_cpu));
    cpu_kernels->impl("batch_norm_eval", TORCH_FN(eval_cpu));
    autograd_kernels = std::make_unique<torch::Library>(torch::Library::IMPL, "bnlab", c10::DispatchKey::AutogradCPU,
                                                        __FILE__, __LINE__);
    autograd_kernels->impl("batch_norm_train", TORCH_FN(train_autograd));
    autograd_kernels->impl("batch_norm_eval", TORCH_FN(eval_autograd));
    return 0;
  } catch (const std::exception&) {
    autograd_kernels.reset();
    cpu_kernels.reset();
    return 1;
  }
}

// Remove them: the dispatcher falls back to ops.py's Python implementations.
void bnlab_deregister() {
  autograd_kernels.reset();
  cpu_kernels.reset();
}
}
