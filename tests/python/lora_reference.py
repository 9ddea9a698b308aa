"""peft 0.21 reference for the `lora` plugin's parity test (tests/lora_parity.rs).

Usage: lora_reference.py WORK_DIR

WORK_DIR/plan.json, written by the Rust test, lists
  "parity":  [{"name", "dir"}]  - each dir holds the plugin's own PEFT directory `ours/`
                                  (adapter_config.json + adapter_model.safetensors, written
                                  by the plugin) and `ours_io.safetensors` (w_orig, bias, x);
  "targets": [{"name", "dir"}]  - each dir holds an adapter_config.json written by the plugin.

For each parity entry this writes into its dir:
  peft/                    the adapter directory peft's save_pretrained writes (its keys are
                           what the plugin's load_state_dict must accept);
  reference.safetensors    a peft LoRA layer on nn.Linear(24, 16, bias=True), built from the
                           plugin's adapter_config.json: the original and base (residual for
                           PiSSA/OLoRA) weights, the initial A/B/magnitude, a trained state
                           (perturbed A/B/magnitude, the one saved in peft/), input x, output
                           y, gradients of A, B, magnitude and x for loss = sum(y * gy), the
                           merge_and_unload weight, the weight after peft's own merge + unmerge, and
                           `ours_y`: peft's output with the plugin's directory loaded through
                           PeftModel.from_pretrained.
For each targets entry: targets.json, the linear layers of a tiny LlamaForCausalLM and the
ones peft adapts under that config.

Exits non-zero with a message on any failure; prints one line per entry.
"""
import json
import pathlib
import sys
import warnings

import torch
from torch import nn

from peft import LoraConfig, PeftConfig, PeftModel
from safetensors.torch import load_file, save_file

IN_FEATURES, OUT_FEATURES = 24, 16
SEED = 1234


class Tiny(nn.Module):
    """One linear layer, named `proj`. `prepare_inputs_for_generation` lets peft wrap it as
    the CAUSAL_LM task type the plugin's config names (it is never called)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=True)

    def forward(self, x):
        return self.proj(x)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


def load_plugin_config(directory: pathlib.Path) -> LoraConfig:
    """The plugin's adapter_config.json, loaded both ways peft loads one."""
    raw = json.loads((directory / "adapter_config.json").read_text())
    strict = LoraConfig(**raw)  # an unknown key is a TypeError here
    loaded = PeftConfig.from_pretrained(str(directory))
    if not isinstance(loaded, LoraConfig):
        raise SystemExit(f"{directory}: PeftConfig.from_pretrained gave {type(loaded).__name__}, not LoraConfig")
    for key, value in raw.items():
        got = getattr(loaded, key)
        got = sorted(got) if isinstance(got, (set, list)) else got
        want = sorted(value) if isinstance(value, list) else value
        if key in ("peft_type", "task_type"):
            got = getattr(got, "value", got)
        if got != want:
            raise SystemExit(f"{directory}: key {key}: file says {value!r}, peft loaded {got!r}")
    return strict


def peft_layer(peft_model):
    return peft_model.base_model.model.proj


def parity(entry) -> str:
    d = pathlib.Path(entry["dir"])
    config = load_plugin_config(d / "ours")
    config.inference_mode = False  # trainable, for the gradients

    torch.manual_seed(SEED)
    model = Tiny()
    w_orig = model.proj.weight.detach().clone()
    bias = model.proj.bias.detach().clone()
    peft_model = PeftModel(model, config)
    layer = peft_layer(peft_model)
    lora_a = layer.lora_A["default"].weight
    lora_b = layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight if config.use_dora else None
    out = {
        "w_orig": w_orig,
        "bias": bias,
        "w_base": layer.base_layer.weight.detach().clone(),
        "init_A": lora_a.detach().clone(),
        "init_B": lora_b.detach().clone(),
        "scaling": torch.tensor([layer.scaling["default"]], dtype=torch.float64),
    }
    if magnitude is not None:
        out["init_m"] = magnitude.detach().clone()

    # A trained state: with B = 0 the forward, the merge and A's gradient would be trivial.
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        lora_a += 0.2 * torch.randn(lora_a.shape, generator=g)
        lora_b += 0.2 * torch.randn(lora_b.shape, generator=g)
        if magnitude is not None:
            magnitude *= 1 + 0.2 * torch.randn(magnitude.shape, generator=g)
    out["A"], out["B"] = lora_a.detach().clone(), lora_b.detach().clone()
    if magnitude is not None:
        out["m"] = magnitude.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PiSSA/OLoRA: "the base weights changed"
        peft_model.save_pretrained(str(d / "peft"))

    x = torch.randn(3, 5, IN_FEATURES, generator=g).requires_grad_(True)
    gy = torch.randn(3, 5, OUT_FEATURES, generator=g)
    peft_model.train()
    y = peft_model.base_model.model(x)
    (y * gy).sum().backward()
    out.update(x=x.detach(), gy=gy, y=y.detach(), grad_x=x.grad, grad_A=lora_a.grad, grad_B=lora_b.grad)
    if magnitude is not None:
        out["grad_m"] = magnitude.grad

    # peft's own merge / unmerge round trip, then merge_and_unload.
    with torch.no_grad():
        layer.merge()
        layer.unmerge()
        out["peft_unmerged"] = layer.base_layer.weight.detach().clone()
        out["merged"] = peft_model.merge_and_unload().proj.weight.detach().clone()

    # The plugin's PEFT directory, loaded by peft onto the plugin's original weight.
    io = load_file(str(d / "ours_io.safetensors"))
    theirs = Tiny()
    with torch.no_grad():
        theirs.proj.weight.copy_(io["w_orig"])
        theirs.proj.bias.copy_(io["bias"])
    loaded = PeftModel.from_pretrained(theirs, str(d / "ours"))
    loaded.eval()
    with torch.no_grad():
        out["ours_y"] = loaded.base_model.model(io["x"])
        out["ours_w_base"] = peft_layer(loaded).base_layer.weight.detach().clone()

    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "reference.safetensors"))
    keys = sorted(load_file(str(d / "peft" / "adapter_model.safetensors")))
    return f"{entry['name']}: peft saved {keys}"


def targets(entry) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = pathlib.Path(entry["dir"])
    config = load_plugin_config(d)
    torch.manual_seed(SEED)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    linear = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear)]
    peft_model = PeftModel(llama, config)
    targeted = sorted(peft_model.targeted_module_names)
    (d / "targets.json").write_text(json.dumps({"linear": linear, "targeted": targeted}, indent=1))
    return f"{entry['name']}: peft targets {len(targeted)} of {len(linear)} linear layers"


def main():
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    torch.use_deterministic_algorithms(True)
    for entry in plan.get("parity", []):
        print(parity(entry), flush=True)
    for entry in plan.get("targets", []):
        print(targets(entry), flush=True)


if __name__ == "__main__":
    main()
