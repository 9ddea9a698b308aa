// `y = x · Wᵀ` for a frozen weight W stored packed by a quantizer plugin, as a libtorch
// autograd function that saves no dense weight: forward and backward each ask the plugin to
// dequantize W (a callback into Rust), use it and drop it. Plain `x.linear(dequantize())`
// would keep every layer's dense W alive from forward to backward, which is the memory that
// QLoRA exists to save (bitsandbytes' MatMul4Bit does the same).
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <cstdio>
#include <stdexcept>

extern "C" {
// Writes a new tensor (`new at::Tensor`) holding W in `scalar_type`; 0 on success.
typedef int (*ft_dequant_fn)(const void* ctx, int scalar_type, at::Tensor** out);
// Drops the reference `ctx` stands for.
typedef void (*ft_release_fn)(const void* ctx);
}

namespace {

struct Source : torch::CustomClassHolder {
  const void* ctx;
  ft_dequant_fn dequant;
  ft_release_fn release;
  Source(const void* c, ft_dequant_fn d, ft_release_fn r) : ctx(c), dequant(d), release(r) {}
  ~Source() override { release(ctx); }
  at::Tensor weight(c10::ScalarType t) const {
    at::Tensor* out = nullptr;
    if (dequant(ctx, static_cast<int>(t), &out) != 0 || out == nullptr) {
      throw std::runtime_error("the quantizer plugin could not dequantize the weight");
    }
    at::Tensor w = std::move(*out);
    delete out;
    return w;
  }
};

struct DequantLinear : public torch::autograd::Function<DequantLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, c10::intrusive_ptr<Source> src) {
    at::Tensor w = src->weight(x.scalar_type());
    ctx->saved_data["source"] = c10::IValue::make_capsule(src);
    return at::matmul(x, w.t());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto src = c10::static_intrusive_pointer_cast<Source>(ctx->saved_data["source"].toCapsule());
    const at::Tensor& g = grads[0];
    at::Tensor w = src->weight(g.scalar_type());
    return {at::matmul(g, w), at::Tensor()};
  }
};

}  // namespace

// `x · Wᵀ` through DequantLinear. Takes over one reference `ctx` (released through `release`
// when the autograd graph, or this call on failure, is done with it). 0 on success, else 1
// with the message in `err`.
extern "C" int ferrotune_dequant_linear(const at::Tensor* x, const void* ctx, ft_dequant_fn dequant, ft_release_fn release,
                                        at::Tensor** out, char* err, size_t errlen) {
  try {
    auto src = c10::make_intrusive<Source>(ctx, dequant, release);
    *out = new at::Tensor(DequantLinear::apply(*x, std::move(src)));
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 1;
  }
}
