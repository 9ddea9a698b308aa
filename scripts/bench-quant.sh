#!/usr/bin/env bash
# QLoRA memory: peak RSS of a few LoRA SFT steps with an fp32 base, a bf16 base and an NF4
# base (QLoRA: bf16 compute, double quantization), each in its own process so that the peaks
# are separate, on a Qwen2-0.5B-sized model (hidden 896, 24 layers, 14 heads / 2 kv heads,
# intermediate 4864, vocab 151936, tied embeddings); and the packed base against its bf16 size
# (must be ≤ 0.30×). `make bench-quant` calls this.
#   STEPS=2 WARMUP=1 BATCH=1 SEQ_LEN=256 RANK=16 scripts/bench-quant.sh   (the defaults)
#   LAYERS=12 scripts/bench-quant.sh     # ~0.25B: half the layers, for a slow machine
#   PROFILE=debug scripts/bench-quant.sh # the debug build (no release build needed)
# Any of HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE VOCAB overrides the size; THREADS the
# libtorch threads (default nproc).
# Memory is measured with jemalloc returning freed pages at once (MALLOC_CONF below; the
# binary's own setting keeps them for reuse), so that the RSS after set-up shows what the model
# holds, not what loading it once took. `setup peak` includes loading the checkpoint (tensors
# are read one at a time; the QLoRA run packs each target layer as soon as it is read).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
export MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0
hidden=${HIDDEN:-896} layers=${LAYERS:-24} heads=${HEADS:-14} kv=${KV_HEADS:-2} inter=${INTERMEDIATE:-4864} vocab=${VOCAB:-151936}
profile=${PROFILE:-release}
threads=${THREADS:-$(nproc)}
if [ "$profile" = release ]; then
  cargo build --release --quiet -p ferrotune -p ferrotune-lora -p ferrotune-sft -p ferrotune-single -p ferrotune-quant
else
  cargo build --quiet -p ferrotune -p ferrotune-lora -p ferrotune-sft -p ferrotune-single -p ferrotune-quant
fi
bin=target/$profile/ferrotune
tok=target/bench/wordlevel-$vocab
[ -f "$tok/tokenizer.json" ] || python scripts/wordlevel-tokenizer.py "$tok" "$vocab"
model=${MODEL:-target/bench/qwen2-quant-h$hidden-l$layers-a$heads-kv$kv-i$inter-v$vocab}
if [ ! -f "$model/config.json" ]; then
  "$bin" init-model --arch qwen2 --hidden "$hidden" --layers "$layers" --heads "$heads" --kv-heads "$kv" \
    --intermediate "$inter" --vocab "$vocab" --dtype bf16 --tokenizer "$tok" --out "$model" >/dev/null
fi
args=(--model "$model" --batch "${BATCH:-1}" --seq-len "${SEQ_LEN:-256}" --rank "${RANK:-16}" --steps "${STEPS:-2}"
  --warmup "${WARMUP:-1}" --threads "$threads" --memory-phases)
echo "model $model ($profile build): batch ${BATCH:-1} x ${SEQ_LEN:-256} tokens, LoRA r ${RANK:-16} on every linear layer, ${STEPS:-2} timed steps after ${WARMUP:-1}, $threads threads" >&2
runs=()
runs+=("$("$bin" bench train "${args[@]}" --dtype f32)")
echo "fp32 LoRA done" >&2
runs+=("$("$bin" bench train "${args[@]}" --dtype bf16)")
echo "bf16 LoRA done" >&2
runs+=("$("$bin" bench train "${args[@]}" --dtype bf16 --quantization '{"plugin": "nf4", "compute_dtype": "bfloat16"}')")
echo "QLoRA done" >&2
python - "${runs[@]}" <<'PY'
import json, sys
runs = [json.loads(s) for s in sys.argv[1:]]
labels = ["LoRA, fp32 base", "LoRA, bf16 base", "QLoRA, nf4 base (bf16 compute)"]
cols = [("setup_peak_rss_mb", "setup peak MiB"), ("setup_rss_mb", "after setup MiB"), ("train_peak_rss_mb", "train peak MiB"),
        ("peak_rss_mb", "peak MiB"), ("step_s", "step s"), ("first_loss", "loss 1"), ("last_loss", "loss N")]
print(f"{'':32}" + "".join(f"{h:>17}" for _, h in cols))
for label, r in zip(labels, runs):
    print(f"{label:<32}" + "".join(f"{r[c]:>17.1f}" if c.endswith("_mb") else f"{r[c]:>17.3f}" for c, _ in cols))
q = runs[2]
ratio = q["packed_base_bytes"] / q["bf16_base_bytes"]
print(f"quantized base: {q['packed_base_bytes'] / 2**20:.1f} MiB packed vs {q['bf16_base_bytes'] / 2**20:.1f} MiB in bf16 = {ratio:.3f}x")
print(f"QLoRA / bf16 LoRA: train peak {q['train_peak_rss_mb'] / runs[1]['train_peak_rss_mb']:.2f}x, "
      f"after setup {q['setup_rss_mb'] / runs[1]['setup_rss_mb']:.2f}x; QLoRA / fp32: train peak "
      f"{q['train_peak_rss_mb'] / runs[0]['train_peak_rss_mb']:.2f}x")
if ratio > 0.30:
    sys.exit(f"packed base is {ratio:.3f}x its bf16 size, above 0.30x")
PY
