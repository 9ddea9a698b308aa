// Activation checkpointing for ferrotune: the reentrant checkpoint of
// torch.utils.checkpoint (use_reentrant=True) as a torch::autograd::Function whose body is a
// Rust callback (host/src/checkpoint.rs).
//
// forward: runs the callback without grad (the autograd Function forward runs under
// no-grad), saves only its inputs and the generator states (CPU, and each CUDA device an
// input is on). backward: restores those generator states (same dropout masks), re-runs the callback with grad on detached inputs,
// and back-propagates the incoming gradient through the recomputed graph; parameters used
// inside the callback get their gradients accumulated there, the inputs' gradients are
// returned. Every C++ exception is caught at the extern "C" boundary.
//
// The same Block callbacks drive the ZeRO-3 autograd functions below: a linear layer whose
// frozen weight is gathered on demand (RegatherLinear), one whose trainable weight is
// partitioned (PartitionedLinear) and a partitioned tensor made whole (GatherPartitioned).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

extern "C" {
// Runs the checkpointed block on `n` inputs (new tensors the callee owns) and stores a new
// output tensor in *out; non-zero with a malloc'ed message in *err on failure.
typedef int (*ft_ckpt_fn)(void* ctx, at::Tensor** inputs, size_t n, at::Tensor** out, char** err);
typedef void (*ft_ckpt_drop)(void* ctx);
}

namespace {

char* dup_message(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

struct Block : torch::CustomClassHolder {
  ft_ckpt_fn fn;
  void* ctx;
  ft_ckpt_drop drop;
  // A frozen tensor the block's user needs besides its inputs (the bias of a re-gathered
  // linear layer; not an autograd input, so it may be undefined).
  at::Tensor extra;
  Block(ft_ckpt_fn f, void* c, ft_ckpt_drop d) : fn(f), ctx(c), drop(d) {}
  ~Block() override {
    if (drop) drop(ctx);
  }
  at::Tensor call(const torch::autograd::variable_list& inputs) {
    std::vector<at::Tensor*> ptrs;
    for (const auto& t : inputs) ptrs.push_back(new at::Tensor(t));
    at::Tensor* out = nullptr;
    char* err = nullptr;
    int rc = fn(ctx, ptrs.data(), ptrs.size(), &out, &err);
    if (rc != 0 || out == nullptr) {
      std::string msg = err ? err : "checkpointed block failed";
      std::free(err);
      throw std::runtime_error(msg);
    }
    at::Tensor result = *out;
    delete out;
    return result;
  }
};

at::Tensor rng_state(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// The generators a block's random ops draw from: the CPU one, and the default generator of
// every CUDA device an input lives on (as torch.utils.checkpoint forks them).
struct RngStates {
  at::Tensor cpu;
  std::vector<int64_t> cuda_index;
  std::vector<at::Tensor> cuda;

  static RngStates capture(const torch::autograd::variable_list& inputs) {
    RngStates s;
    s.cpu = rng_state(at::detail::getDefaultCPUGenerator());
    for (const auto& t : inputs) {
      if (!t.defined() || !t.is_cuda()) continue;
      int64_t i = t.device().index();
      if (std::find(s.cuda_index.begin(), s.cuda_index.end(), i) != s.cuda_index.end()) continue;
      s.cuda_index.push_back(i);
      s.cuda.push_back(rng_state(at::globalContext().defaultGenerator(at::Device(at::kCUDA, i))));
    }
    return s;
  }

  void restore() const {
    set_rng_state(at::detail::getDefaultCPUGenerator(), cpu);
    for (size_t k = 0; k < cuda.size(); ++k) {
      set_rng_state(at::globalContext().defaultGenerator(at::Device(at::kCUDA, cuda_index[k])), cuda[k]);
    }
  }

  void save(torch::autograd::AutogradContext* ctx) const {
    ctx->saved_data["rng"] = cpu;
    ctx->saved_data["cuda_rng_index"] = c10::IValue(cuda_index);
    ctx->saved_data["cuda_rng"] = c10::IValue(c10::List<at::Tensor>(cuda));
  }

  static RngStates load(torch::autograd::AutogradContext* ctx) {
    RngStates s;
    s.cpu = ctx->saved_data["rng"].toTensor();
    s.cuda_index = ctx->saved_data["cuda_rng_index"].toIntVector();
    s.cuda = ctx->saved_data["cuda_rng"].toTensorVector();
    return s;
  }
};

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList input_list,
                                                c10::intrusive_ptr<Block> block) {
    // A TensorList argument (not a std::vector) is what autograd counts as tensor inputs.
    torch::autograd::variable_list inputs(input_list.begin(), input_list.end());
    RngStates::capture(inputs).save(ctx);
    ctx->saved_data["block"] = c10::IValue::make_capsule(block);
    ctx->save_for_backward(inputs);
    return {block->call(inputs)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    auto block = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data["block"].toCapsule());
    torch::autograd::variable_list detached;
    for (const auto& x : saved) {
      auto d = x.detach();
      d.requires_grad_(x.requires_grad());
      detached.push_back(d);
    }
    RngStates now = RngStates::capture(saved);
    RngStates::load(ctx).restore();
    at::Tensor out;
    try {
      at::AutoGradMode grad(true);
      out = block->call(detached);
    } catch (...) {
      now.restore();
      throw;
    }
    now.restore();
    if (out.requires_grad()) {
      torch::autograd::backward({out}, {grad_out[0]});
    }
    torch::autograd::variable_list grads;
    for (const auto& d : detached) grads.push_back(d.requires_grad() ? d.grad() : at::Tensor());
    grads.push_back(at::Tensor());  // the block argument
    return grads;
  }
};

// A linear layer whose frozen weight is gathered on demand (ZeRO-3): forward gathers W and
// returns x Wᵀ + b, saving nothing but the gather callback; backward gathers W again and
// returns grad_y W as the input gradient (W and b are frozen: no other gradient). Unlike a
// checkpointed block, backward does not recompute the product.
struct RegatherLinear : public torch::autograd::Function<RegatherLinear> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::Tensor x,
                                                c10::intrusive_ptr<Block> gather) {
    at::Tensor w = gather->call({});
    ctx->saved_data["gather"] = c10::IValue::make_capsule(gather);
    const at::Tensor& bias = gather->extra;
    return {at::linear(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto gather = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data["gather"].toCapsule());
    at::Tensor w = gather->call({});
    return {grad_out[0].matmul(w.to(grad_out[0].scalar_type())), at::Tensor()};
  }
};

// A linear layer whose TRAINABLE weight is partitioned over the ranks (ZeRO-3): the autograd
// inputs are x and this rank's shard of the flattened weight (a leaf); `gather` (no inputs)
// returns the whole weight W, `scatter` (one input, dL/dW) returns the shard's gradient
// (reduce-scattered over the ranks). forward gathers W and returns x Wᵀ, saving only x;
// backward gathers W again for grad_x = grad_y W and hands grad_yᵀ x to `scatter`. The bias,
// if any, is added outside by ordinary autograd.
//
// Every rank must make the same collectives in the same order, whatever its data: backward
// always gathers (even where x needs no gradient, which may differ between ranks whose
// graphs differ upstream) and always scatters when the shard needs a gradient.
struct PartitionedLinear : public torch::autograd::Function<PartitionedLinear> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::Tensor x,
                                                at::Tensor shard, c10::intrusive_ptr<Block> gather,
                                                c10::intrusive_ptr<Block> scatter) {
    (void)shard;  // an autograd input only: its gradient comes from `scatter`
    at::Tensor w = gather->call({});
    ctx->saved_data["gather"] = c10::IValue::make_capsule(gather);
    ctx->saved_data["scatter"] = c10::IValue::make_capsule(scatter);
    ctx->save_for_backward({x});
    return {at::linear(x, w.to(x.scalar_type()))};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto gather = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data["gather"].toCapsule());
    auto scatter = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data["scatter"].toCapsule());
    at::Tensor x = ctx->get_saved_variables()[0];
    const at::Tensor& g = grad_out[0];
    at::Tensor grad_x, grad_shard;
    {
      at::Tensor w = gather->call({});
      if (ctx->needs_input_grad(0)) grad_x = g.matmul(w.to(g.scalar_type()));
    }  // the gathered weight is freed before the weight gradient is formed
    if (ctx->needs_input_grad(1)) {
      at::Tensor g2 = g.reshape({-1, g.size(-1)});
      at::Tensor x2 = x.reshape({-1, x.size(-1)}).to(g.scalar_type());
      grad_shard = scatter->call({g2.t().mm(x2)});
    }
    return {grad_x, grad_shard, at::Tensor(), at::Tensor()};
  }
};

// A partitioned tensor made whole (the token embedding under ZeRO-3): forward returns what
// `gather` gives, saving nothing; backward hands the whole tensor's gradient to `scatter`,
// whose result (this rank's shard of the reduce-scattered gradient) is the shard's gradient.
struct GatherPartitioned : public torch::autograd::Function<GatherPartitioned> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::Tensor shard,
                                                c10::intrusive_ptr<Block> gather,
                                                c10::intrusive_ptr<Block> scatter) {
    (void)shard;
    ctx->saved_data["scatter"] = c10::IValue::make_capsule(scatter);
    return {gather->call({})};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto scatter = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data["scatter"].toCapsule());
    at::Tensor grad_shard;
    if (ctx->needs_input_grad(0)) grad_shard = scatter->call({grad_out[0]});
    return {grad_shard, at::Tensor(), at::Tensor()};
  }
};

template <typename F>
at::Tensor* guarded_output(char** err, const char* what, F&& f) {
  try {
    return new at::Tensor(f());
  } catch (const c10::Error& e) {
    *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message(std::string("unknown C++ exception in ") + what);
  }
  return nullptr;
}

}  // namespace

extern "C" {

// x Wᵀ for a trainable W partitioned over the ranks (PartitionedLinear): `gfn` gathers W,
// `sfn` turns dL/dW into the shard's gradient. `shard` must be the leaf that receives that
// gradient. A new output tensor, or null with *err; each `drop(ctx)` is called once when its
// callback is no longer needed.
at::Tensor* ft_partitioned_linear(ft_ckpt_fn gfn, void* gctx, ft_ckpt_drop gdrop, ft_ckpt_fn sfn, void* sctx,
                                  ft_ckpt_drop sdrop, at::Tensor* x, at::Tensor* shard, char** err) {
  return guarded_output(err, "a partitioned linear layer", [&] {
    auto gather = c10::make_intrusive<Block>(gfn, gctx, gdrop);
    auto scatter = c10::make_intrusive<Block>(sfn, sctx, sdrop);
    return PartitionedLinear::apply(*x, *shard, gather, scatter)[0];
  });
}

// The whole tensor of a partition (GatherPartitioned); as ft_partitioned_linear otherwise.
at::Tensor* ft_gather_partitioned(ft_ckpt_fn gfn, void* gctx, ft_ckpt_drop gdrop, ft_ckpt_fn sfn, void* sctx,
                                  ft_ckpt_drop sdrop, at::Tensor* shard, char** err) {
  return guarded_output(err, "gathering a partitioned tensor", [&] {
    auto gather = c10::make_intrusive<Block>(gfn, gctx, gdrop);
    auto scatter = c10::make_intrusive<Block>(sfn, sctx, sdrop);
    return GatherPartitioned::apply(*shard, gather, scatter)[0];
  });
}

// x Wᵀ + b with W from `fn` (called with no inputs) in forward and again in backward; a new
// output tensor, or null with *err. `bias` may be null.
at::Tensor* ft_regather_linear(ft_ckpt_fn fn, void* ctx, ft_ckpt_drop drop, at::Tensor* x, at::Tensor* bias, char** err) {
  try {
    auto gather = c10::make_intrusive<Block>(fn, ctx, drop);
    if (bias) gather->extra = *bias;
    auto out = RegatherLinear::apply(*x, gather);
    return new at::Tensor(out[0]);
  } catch (const c10::Error& e) {
    *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown C++ exception in a re-gathered linear layer");
  }
  return nullptr;
}

// Whether autograd records operations on this thread (torch.is_grad_enabled()).
int ft_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Applies `fn` to `inputs` as a checkpointed block; a new output tensor, or null with *err.
// `drop(ctx)` is called once when the block is no longer needed (graph freed or call failed).
at::Tensor* ft_checkpoint(ft_ckpt_fn fn, void* ctx, ft_ckpt_drop drop, at::Tensor** inputs, size_t n, char** err) {
  try {
    auto block = c10::make_intrusive<Block>(fn, ctx, drop);
    torch::autograd::variable_list in;
    for (size_t i = 0; i < n; ++i) in.push_back(*inputs[i]);
    auto out = Checkpoint::apply(at::TensorList(in), block);
    return new at::Tensor(out[0]);
  } catch (const c10::Error& e) {
    *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown C++ exception in activation checkpointing");
  }
  return nullptr;
}

}  // extern "C"
