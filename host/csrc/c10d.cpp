// c10d process group for ferrotune: a TCPStore rendezvous and a ProcessGroupGloo (CPU),
// reached from Rust through the extern "C" functions below (host/src/collectives.rs).
//
// The torch wheel's libtorch_cpu.so exports c10d and gloo; the gloo headers come from
// Debian's libgloo-dev (headers only, never its library: two gloo copies would clash).
// Every C++ exception is caught here and handed to Rust as a malloc'ed message.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

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

// ReduceOp codes of ferrotune_plugin_api::ReduceOp (AVG is SUM then a division: Gloo has no AVG).
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

}  // namespace

struct ft_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  int rank;
  int world;
  std::chrono::milliseconds timeout;

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
    if (!work->wait(timeout)) {
      throw std::runtime_error(std::string(what) + ": timed out");
    }
  }
};

// Dense, contiguous tensor a Gloo collective can work on: the tensor itself or a copy.
static at::Tensor dense(const at::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

extern "C" {

void ft_free_error(char* err) { std::free(err); }

ft_pg* ft_pg_new(const char* master_addr, uint16_t port, int rank, int world, int64_t timeout_ms,
                 const char* ifname, char** err) {
  ft_pg* out = nullptr;
  guarded(err, [&] {
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = rank == 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    std::string addr(master_addr);
    if (ifname && *ifname) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (addr == "127.0.0.1" || addr == "localhost") {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    out = new ft_pg{store, pg, rank, world, timeout};
  });
  return out;
}

void ft_pg_free(ft_pg* pg) { delete pg; }

int ft_pg_all_reduce(ft_pg* pg, at::Tensor* t, int op, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{dense(*t)};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    pg->wait(pg->pg->allreduce(ts, o), "all_reduce");
    if (op == 1) ts[0].div_(pg->world);
    if (!ts[0].is_same(*t)) t->copy_(ts[0]);
  });
}

int ft_pg_broadcast(ft_pg* pg, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{dense(*t)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    pg->wait(pg->pg->broadcast(ts, o), "broadcast");
    if (!ts[0].is_same(*t)) t->copy_(ts[0]);
  });
}

// `outs` receives `world` new tensors (owned by the caller).
int ft_pg_all_gather(ft_pg* pg, at::Tensor* t, at::Tensor** outs, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> in{dense(*t)};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int i = 0; i < pg->world; ++i) out[0].push_back(at::empty_like(in[0]));
    pg->wait(pg->pg->allgather(out, in), "all_gather");
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
    std::vector<at::Tensor> outs{dense(*out)};
    std::vector<std::vector<at::Tensor>> ins(1);
    for (auto& c : input.chunk(pg->world, 0)) ins[0].push_back(c.contiguous());
    if (!outs[0].sizes().equals(ins[0][0].sizes())) {
      throw std::invalid_argument("reduce_scatter: output shape does not match one chunk of the input");
    }
    c10d::ReduceScatterOptions o;
    o.reduceOp = reduce_op(op);
    pg->wait(pg->pg->reduce_scatter(outs, ins, o), "reduce_scatter");
    if (op == 1) outs[0].div_(pg->world);
    if (!outs[0].is_same(*out)) out->copy_(outs[0]);
  });
}

int ft_pg_barrier(ft_pg* pg, char** err) {
  return guarded(err, [&] { pg->wait(pg->pg->barrier(), "barrier"); });
}

}  // extern "C"
