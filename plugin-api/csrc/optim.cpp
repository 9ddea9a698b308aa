// The multi-tensor optimizer kernels of libtorch that tch does not bind (its generator skips
// every `_foreach*` and `_fused_adam*` op): torch.optim.AdamW(fused=True)'s `_fused_adamw_`,
// clip_grad_norm_'s `_foreach_norm` and `_foreach_mul_`, and `p.grad = None`.
// Every function returns 0 on success, else 1 with the exception's message in `err`.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdio>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

template <typename F>
int guarded(char* err, size_t errlen, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 1;
  }
}

}  // namespace

// torch._fused_adamw_ over n parameters of one dtype and device: `max_exp_avg_sqs` is null
// without amsgrad; `step` (fp32, on the parameters' device) is every parameter's state step,
// already advanced, as torch.optim.AdamW passes `state_steps`.
extern "C" int ferrotune_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                                     at::Tensor* const* exp_avg_sqs, at::Tensor* const* max_exp_avg_sqs,
                                     const at::Tensor* step, size_t n, double lr, double beta1, double beta2,
                                     double weight_decay, double eps, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> steps(n, *step);
    auto maxes = max_exp_avg_sqs ? list(max_exp_avg_sqs, n) : std::vector<at::Tensor>{};
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), maxes, steps, lr,
                      beta1, beta2, weight_decay, eps, max_exp_avg_sqs != nullptr, /*maximize=*/false);
  });
}

// torch._foreach_norm(ts, 2, dtype): writes n new tensors (`new at::Tensor`) to `out`.
extern "C" int ferrotune_foreach_norm(at::Tensor* const* ts, size_t n, int dtype, at::Tensor** out, char* err,
                                      size_t errlen) {
  return guarded(err, errlen, [&] {
    auto norms = at::_foreach_norm(list(ts, n), 2, static_cast<c10::ScalarType>(dtype));
    for (size_t i = 0; i < n; ++i) out[i] = new at::Tensor(std::move(norms[i]));
  });
}

// torch._foreach_mul_(ts, factor) with a 0-dim tensor factor.
extern "C" int ferrotune_foreach_mul_(at::Tensor* const* ts, size_t n, const at::Tensor* factor, char* err,
                                      size_t errlen) {
  return guarded(err, errlen, [&] {
    at::NoGradGuard no_grad;
    at::_foreach_mul_(list(ts, n), *factor);
  });
}

// `t.grad = None`: drops the gradient tensor (the next backward allocates a fresh one).
extern "C" int ferrotune_set_grad_none(at::Tensor* t, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { t->mutable_grad().reset(); });
}
