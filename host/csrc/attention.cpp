// Variable-length causal attention for packed rows on CUDA: libtorch's FlashAttention-2
// kernel (`at::_flash_attention_forward`) over all samples of a batch at once, given their
// cumulative sequence lengths. The call goes through the dispatcher, so autograd records
// `_flash_attention_backward` for it. Every C++ exception is caught at the extern "C"
// boundary.
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace {
char* attention_error(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}
}  // namespace

extern "C" {
// q [total, heads, d], k/v [total, kv_heads, d] (bf16/f16, CUDA), cu_seqlens int32 [n + 1];
// returns a new tensor [total, heads, d], or null with a malloc'ed message in *err.
at::Tensor* ft_varlen_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                const at::Tensor* cu_seqlens, int64_t max_len, double scale,
                                char** err) {
  try {
    auto out = at::_flash_attention_forward(*q, *k, *v, *cu_seqlens, *cu_seqlens, max_len, max_len,
                                            0.0, true, false, scale);
    return new at::Tensor(std::get<0>(out));
  } catch (const std::exception& e) {
    *err = attention_error(e.what());
  } catch (...) {
    *err = attention_error("unknown C++ exception in variable-length attention");
  }
  return nullptr;
}
}
