// c10d process groups for ferrotune: a TCPStore rendezvous, a ProcessGroupGloo (CPU tensors)
// and, in CUDA builds, a ProcessGroupNCCL (CUDA tensors), reached from Rust through the
// extern "C" functions below (host/src/collectives.rs).
//
// Both backends are held as c10d::Backend, so every collective below serves either. A group
// made by ft_pg_new_nccl holds both, as torch's default "cpu:gloo,cuda:nccl" does: a CUDA
// tensor goes through NCCL, a CPU tensor (a loss scalar, a gradient-norm partial) through
// Gloo. A group made by ft_pg_new holds Gloo only, which takes CPU and CUDA tensors.
//
// The torch wheel's libtorch_cpu.so exports c10d and gloo; the gloo headers come from
// Debian's libgloo-dev (headers only, never its library: two gloo copies would clash).
// ProcessGroupNCCL is exported by libtorch_cuda.so; its header needs the CUDA and NCCL
// headers (the wheel's nvidia/cu13 and nvidia/nccl packages) and USE_C10D_NCCL.
// Every C++ exception is caught here and handed to Rust as a malloc'ed message.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

char* dup_message(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown C++ exception in the c10d layer");
  }
  return 1;
}

// ReduceOp codes of ferrotune_plugin_api::ReduceOp. AVG is SUM then a division by the world
// size on both backends: Gloo has no AVG, and NCCL's native ncclAvg pre-multiplies every
// input by 1/world before summing, which rounds differently (visibly in bf16); one formula
// keeps a CUDA run's averages identical to what the Gloo path computes.
c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
    case 1:
      return c10d::ReduceOp::SUM;
    case 2:
      return c10d::ReduceOp::MAX;
    case 3:
      return c10d::ReduceOp::MIN;
    default:
      throw std::invalid_argument("unknown reduce op code " + std::to_string(op));
  }
}

// Rendezvous: rank 0 hosts the TCPStore, every rank waits there for all `world` ranks.
c10::intrusive_ptr<c10d::Store> rendezvous(const char* master_addr, uint16_t port, int rank, int world,
                                          std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = rank == 0;
  opts.numWorkers = static_cast<std::size_t>(world);
  opts.waitWorkers = true;
  opts.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
}

// The Gloo backend over `store` (its own key prefix, as torch gives each backend of a group).
c10::intrusive_ptr<c10d::Backend> gloo_backend(const c10::intrusive_ptr<c10d::Store>& store, const char* master_addr,
                                               int rank, int world, std::chrono::milliseconds timeout,
                                               const char* ifname) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  std::string addr(master_addr);
  if (ifname && *ifname) {
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else if (addr == "127.0.0.1" || addr == "localhost") {
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("cpu/", store);
  return c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, options);
}

}  // namespace

struct ft_pg {
  c10::intrusive_ptr<c10d::Store> store;
  // Gloo: CPU tensors (and CUDA tensors when there is no NCCL backend).
  c10::intrusive_ptr<c10d::Backend> cpu;
  // NCCL: CUDA tensors; null in a Gloo-only group.
  c10::intrusive_ptr<c10d::Backend> cuda;
  int rank;
  int world;
  std::chrono::milliseconds timeout;

  // The backend that takes `t`.
  const c10::intrusive_ptr<c10d::Backend>& backend_for(const at::Tensor& t) const {
    return (cuda && t.is_cuda()) ? cuda : cpu;
  }

  // Waits for a collective so that its results can be used right after on the current
  // stream. Gloo: the CPU blocks until the work is done or `timeout` passes. NCCL:
  // Work::wait() without a timeout makes the current CUDA stream wait for the NCCL stream
  // (stream-ordered, the CPU does not block, as torch's work.wait() does); NCCL's own
  // watchdog enforces the group's timeout (ProcessGroupNCCL::Options::timeout) and aborts
  // the communicator of a collective that hangs. A CPU read of the result (`.item()`,
  // `.to(cpu)`) synchronises with the current stream, so it sees the finished values.
  void wait(const c10::intrusive_ptr<c10d::Backend>& backend, const c10::intrusive_ptr<c10d::Work>& work,
            const char* what) {
    if (cuda && backend.get() == cuda.get()) {
      work->wait();
      return;
    }
    if (!work->wait(timeout)) {
      throw std::runtime_error(std::string(what) + ": timed out");
    }
  }
};

// Dense, contiguous tensor a collective can work on: the tensor itself or a copy.
static at::Tensor dense(const at::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

extern "C" {

void ft_free_error(char* err) { std::free(err); }

// A Gloo group: CPU and CUDA tensors both go through Gloo.
ft_pg* ft_pg_new(const char* master_addr, uint16_t port, int rank, int world, int64_t timeout_ms,
                 const char* ifname, char** err) {
  ft_pg* out = nullptr;
  guarded(err, [&] {
    std::chrono::milliseconds timeout(timeout_ms);
    auto store = rendezvous(master_addr, port, rank, world, timeout);
    auto cpu = gloo_backend(store, master_addr, rank, world, timeout, ifname);
    out = new ft_pg{store, cpu, {}, rank, world, timeout};
  });
  return out;
}

// A Gloo + NCCL group (torch's "cpu:gloo,cuda:nccl"): NCCL on CUDA device `device` (the
// rank's LOCAL_RANK), made the current device of the calling thread. The NCCL communicator
// is connected here (eagerly, as torch's init_process_group(device_id=...) does), so that a
// bad set-up (two ranks on one GPU, no GPU) fails now rather than in the first collective.
ft_pg* ft_pg_new_nccl(const char* master_addr, uint16_t port, int rank, int world, int64_t timeout_ms,
                      const char* ifname, int device, char** err) {
  ft_pg* out = nullptr;
  guarded(err, [&] {
#ifdef USE_C10D_NCCL
    std::chrono::milliseconds timeout(timeout_ms);
    int gpus = static_cast<int>(c10::cuda::device_count());
    if (gpus == 0) {
      throw std::runtime_error("ProcessGroupNCCL needs a CUDA GPU and this process sees none");
    }
    if (device < 0 || device >= gpus) {
      throw std::runtime_error("CUDA device " + std::to_string(device) + " of rank " + std::to_string(rank) +
                               " does not exist: this process sees " + std::to_string(gpus) + " GPU(s)");
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto store = rendezvous(master_addr, port, rank, world, timeout);
    auto cpu = gloo_backend(store, master_addr, rank, world, timeout, ifname);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("cuda/", store);
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world, options);
    at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    nccl->setBoundDeviceId(dev);
    nccl->eagerConnectSingleDevice(dev);
    out = new ft_pg{store, cpu, nccl, rank, world, timeout};
#else
    (void)master_addr, (void)port, (void)rank, (void)world, (void)timeout_ms, (void)ifname, (void)device;
    throw std::runtime_error("this build has no ProcessGroupNCCL (the CUDA/NCCL headers were missing at build time)");
#endif
  });
  return out;
}

// Leaves the group. NCCL is shut down first (what torch's destroy_process_group does): its
// communicators are finalised and its watchdog joined, instead of the destructor's abort and
// its "destroy_process_group() was not called" warning.
void ft_pg_free(ft_pg* pg) {
  if (!pg) return;
  if (pg->cuda) {
    try {
      pg->cuda->shutdown();
    } catch (...) {
      // Nothing to report to at this point; the destructor aborts what is left.
    }
  }
  delete pg;
}

int ft_pg_all_reduce(ft_pg* pg, at::Tensor* t, int op, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{dense(*t)};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    auto& b = pg->backend_for(ts[0]);
    pg->wait(b, b->allreduce(ts, o), "all_reduce");
    if (op == 1) ts[0].div_(pg->world);
    if (!ts[0].is_same(*t)) t->copy_(ts[0]);
  });
}

int ft_pg_broadcast(ft_pg* pg, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{dense(*t)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    auto& b = pg->backend_for(ts[0]);
    pg->wait(b, b->broadcast(ts, o), "broadcast");
    if (!ts[0].is_same(*t)) t->copy_(ts[0]);
  });
}

// `outs` receives `world` new tensors (owned by the caller), on the input's device.
int ft_pg_all_gather(ft_pg* pg, at::Tensor* t, at::Tensor** outs, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> in{dense(*t)};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int i = 0; i < pg->world; ++i) out[0].push_back(at::empty_like(in[0]));
    auto& b = pg->backend_for(in[0]);
    pg->wait(b, b->allgather(out, in), "all_gather");
    for (int i = 0; i < pg->world; ++i) outs[i] = new at::Tensor(out[0][i]);
  });
}

// `in` is split along dim 0 into `world` equal chunks; `out` receives this rank's reduced one.
int ft_pg_reduce_scatter(ft_pg* pg, at::Tensor* out, at::Tensor* in, int op, char** err) {
  return guarded(err, [&] {
    at::Tensor input = dense(*in);
    if (input.dim() == 0 || input.size(0) % pg->world != 0) {
      throw std::invalid_argument("reduce_scatter: input dim 0 (" + std::to_string(input.dim() ? input.size(0) : 0) +
                                  ") is not a multiple of the world size " + std::to_string(pg->world));
    }
    if (out->device() != input.device()) {
      throw std::invalid_argument("reduce_scatter: output on " + out->device().str() + ", input on " +
                                  input.device().str() + " (both must be on one device)");
    }
    std::vector<at::Tensor> outs{dense(*out)};
    std::vector<std::vector<at::Tensor>> ins(1);
    for (auto& c : input.chunk(pg->world, 0)) ins[0].push_back(c.contiguous());
    if (!outs[0].sizes().equals(ins[0][0].sizes())) {
      throw std::invalid_argument("reduce_scatter: output shape does not match one chunk of the input");
    }
    c10d::ReduceScatterOptions o;
    o.reduceOp = reduce_op(op);
    auto& b = pg->backend_for(input);
    pg->wait(b, b->reduce_scatter(outs, ins, o), "reduce_scatter");
    if (op == 1) outs[0].div_(pg->world);
    if (!outs[0].is_same(*out)) out->copy_(outs[0]);
  });
}

// Every rank reaches this point. With NCCL the barrier is NCCL's (on the bound device) and the
// CPU blocks until it has completed or the timeout passes; with Gloo only, Gloo's.
int ft_pg_barrier(ft_pg* pg, char** err) {
  return guarded(err, [&] {
    auto& b = pg->cuda ? pg->cuda : pg->cpu;
    if (!b->barrier()->wait(pg->timeout)) throw std::runtime_error("barrier: timed out");
  });
}

}  // extern "C"
