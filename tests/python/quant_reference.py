"""bitsandbytes 0.50 / peft 0.21 reference for tests/quant_parity.rs. Usage: quant_reference.py OUT_DIR.

Writes into OUT_DIR:
* inputs.safetensors: the weights (`<case>`) quantized here, so that Rust quantizes the same values;
* nf4.safetensors: per case, bitsandbytes' NF4 state (`quantize_4bit`, block 64): `<case>.packed`
  (u8 [n/2]), `<case>.absmax` (f32), the dequantized weight `<case>.dequant`; with double
  quantization (`compress_statistics=True`) `<case>.dq.absmax` (u8 codes), `<case>.dq.nested_absmax`,
  `<case>.dq.offset`, `<case>.dq.dequant`. On CPU bitsandbytes' 4-bit quantization is its
  pure-torch `default` kernel; its 8-bit step (the double quantization) and its 4-bit
  dequantization run C kernels, the first with an approximate code search, the second wrong
  for some shapes. Those steps use the `default` kernels (nearest code, bitsandbytes'
  reference semantics, as on CUDA) by redispatching past the CPU registrations; how often
  the C kernels disagree is printed;
* int8.safetensors: `int8_vectorwise_quant` / `int8_vectorwise_dequant` of `int8_w`;
* loftq.safetensors: peft's `loftq_init(W, 4, r=4, num_iter=k)` for k = 1, 2, 3: `q{k}`, `a{k}`,
  `b{k}` and the error `err{k}` = ||W - (Q + B A)||_F. peft hard-codes the compute device
  "cuda"; its function is run from its own source with "cpu" substituted, and with the
  `default` 4-bit dequantization kernel;
* DONE last.

`nf4_round_trip` is also imported by qlora_peft_check.py (the QLoRA base peft must see).
"""
import inspect
import pathlib
import sys

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F
from peft.utils import loftq_utils

# bitsandbytes' pure-torch (`default`) kernels, called past the CPU registrations.
DEFAULT_KERNELS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def default_quantize_blockwise(a, code, blocksize):
    """`quantize_blockwise`: the nearest code (the CPU C kernel's search is approximate)."""
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(DEFAULT_KERNELS, a, code, blocksize)


def default_dequantize_4bit(packed, state):
    """`functional.dequantize_4bit(packed, state)` with the `default` kernels: bitsandbytes
    0.50.2's CPU C kernel returns wrong values for some shapes (a [48, 160] weight dequantizes
    with 25% error; the `default` kernel, like CUDA's, with 9%)."""
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default.redispatch(
            DEFAULT_KERNELS, state.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        DEFAULT_KERNELS, packed, absmax.float(), state.blocksize, state.quant_type, state.shape, state.dtype)


def nf4_round_trip(w, double_quant):
    """bitsandbytes' `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`
    then `dequantize_4bit`, with the `default` kernels (what the `nf4` quantizer must store)."""
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    if double_quant:
        state = double_quantized(state)
    return default_dequantize_4bit(packed, state)


def double_quantized(state):
    """`state` with its absmax constants double-quantized as `quantize_4bit(compress_statistics=True)`
    does, with the nearest-code 8-bit kernel."""
    code = F.create_dynamic_map().to(state.absmax.device)
    offset = state.absmax.mean()
    qabsmax, absmax2 = default_quantize_blockwise(state.absmax - offset, code, 256)
    state2 = F.QuantState(absmax=absmax2, code=code, blocksize=256, dtype=torch.float32)
    return F.QuantState(absmax=qabsmax, shape=state.shape, dtype=state.dtype, blocksize=64, code=state.code,
                        quant_type="nf4", offset=offset, state2=state2)


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # (name, weight): full blocks; a partial last 4-bit block and an odd count; many blocks (a
    # partial last block of the 256 double-quantized constants); bf16; an all-zero block; 160 columns.
    zero_block = torch.randn(4, 128)
    zero_block[0, :64] = 0
    cases = {
        "full": torch.randn(48, 200),
        "odd": torch.randn(5, 13) * 0.02,
        "many": torch.randn(96, 704) * 0.05,
        "bf16": (torch.randn(64, 256) * 0.1).to(torch.bfloat16),
        "zero_block": zero_block,
        "cols160": torch.randn(48, 160) * 0.1,  # bitsandbytes' CPU C dequantization kernel gets this shape wrong
    }

    inputs, nf4 = {}, {}
    for name, w in cases.items():
        inputs[name] = w.contiguous()
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        nf4[f"{name}.packed"] = packed.reshape(-1).contiguous()
        nf4[f"{name}.absmax"] = state.absmax.float().contiguous()
        nf4[f"{name}.dequant"] = default_dequantize_4bit(packed, state).contiguous()
        c_kernel = F.dequantize_4bit(packed, state)
        print(f"{name}: bitsandbytes' CPU C kernel dequantizes {int((c_kernel != nf4[f'{name}.dequant']).sum())} "
              f"of {w.numel()} values differently")

        # quantize_4bit(compress_statistics=True), step by step, with the nearest-code 8-bit kernel
        dq_state = double_quantized(state)
        nf4[f"{name}.dq.absmax"] = dq_state.absmax.contiguous()
        nf4[f"{name}.dq.nested_absmax"] = dq_state.state2.absmax.contiguous()
        nf4[f"{name}.dq.offset"] = dq_state.offset.reshape(1).contiguous()
        nf4[f"{name}.dq.dequant"] = default_dequantize_4bit(packed, dq_state).contiguous()
        c_codes, _ = F.quantize_blockwise(state.absmax - dq_state.offset, code=dq_state.state2.code, blocksize=256)
        print(f"{name}: bitsandbytes' CPU C kernel picks another 8-bit code for "
              f"{int((c_codes != dq_state.absmax).sum())} of {dq_state.absmax.numel()} absmax constants")

    int8_w = torch.randn(32, 100) * torch.rand(32, 1) * 3
    inputs["int8_w"] = int8_w
    q, scb, _ = F.int8_vectorwise_quant(int8_w.clone())
    int8 = {"q": q.contiguous(), "scb": scb.contiguous(), "dequant": F.int8_vectorwise_dequant(q, scb).contiguous()}

    # peft's loftq_init on the CPU: its own source, the compute device substituted
    source = inspect.getsource(loftq_utils.loftq_init.__wrapped__ if hasattr(loftq_utils.loftq_init, "__wrapped__") else loftq_utils.loftq_init)
    assert 'compute_device = "xpu" if is_xpu_available() else "cuda"' in source, "peft's loftq_init changed"
    source = source.replace('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"')
    namespace = dict(vars(loftq_utils))
    exec(compile(source, "peft/utils/loftq_utils.py (compute_device cpu)", "exec"), namespace)
    loftq_init = namespace["loftq_init"]
    # peft imports bitsandbytes inside loftq_init and calls functional.dequantize_4bit: the default kernel
    F.dequantize_4bit = default_dequantize_4bit

    loftq_w = torch.randn(48, 160) * 0.1
    inputs["loftq_w"] = loftq_w
    loftq = {}
    for k in (1, 2, 3):
        qw, a, b = loftq_init(loftq_w.clone(), num_bits=4, reduced_rank=4, num_iter=k)
        loftq[f"q{k}"], loftq[f"a{k}"], loftq[f"b{k}"] = qw.contiguous(), a.contiguous(), b.contiguous()
        err = torch.linalg.norm(loftq_w - (qw + b @ a))
        loftq[f"err{k}"] = err.reshape(1)
        print(f"loftq iter {k}: ||W - (Q + BA)|| = {float(err):.6f}")

    save_file(inputs, out / "inputs.safetensors")
    save_file(nf4, out / "nf4.safetensors")
    save_file(int8, out / "int8.safetensors")
    save_file(loftq, out / "loftq.safetensors")
    (out / "DONE").write_text(f"bitsandbytes {bnb.__version__}\n")


if __name__ == "__main__":
    main()
