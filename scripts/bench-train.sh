#!/usr/bin/env bash
# LoRA SFT training tokens/s and peak RSS of ferrotune (release build) next to transformers +
# peft, on the same model directory and the same synthetic batches, in one run: each repeat
# runs both, back to back, in alternating order. `make bench-train` calls this.
# Full size (the issue's): Qwen2, hidden 512, 8 layers, 8 heads / 2 kv heads, intermediate
# 1408, vocab 32000; batch 4 × 512 tokens, LoRA r 16 on every linear layer, AdamW, fp32.
#   STEPS=10 WARMUP=2 REPEATS=3 THREADS=2 scripts/bench-train.sh   (the defaults; THREADS: nproc)
#   SIZE=small scripts/bench-train.sh        # a quick try: hidden 128, 2 layers, batch 2 × 128
# Any of HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE VOCAB BATCH SEQ_LEN RANK overrides the size;
# DTYPE=bf16 trains a bf16 base (adapters in fp32 on both sides).
# ferrotune's binary runs on jemalloc (host/src/main.rs); REF_JEMALLOC=/path/libjemalloc.so.2
# runs the reference on it too, with the same options (LD_PRELOAD), to compare like for like.
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
if [ "${SIZE:-full}" = small ]; then
  d=(128 2 4 2 352 32000 2 128 8)
else
  d=(512 8 8 2 1408 32000 4 512 16)
fi
hidden=${HIDDEN:-${d[0]}} layers=${LAYERS:-${d[1]}} heads=${HEADS:-${d[2]}} kv=${KV_HEADS:-${d[3]}}
inter=${INTERMEDIATE:-${d[4]}} vocab=${VOCAB:-${d[5]}} batch=${BATCH:-${d[6]}} seq=${SEQ_LEN:-${d[7]}} rank=${RANK:-${d[8]}}
threads=${THREADS:-$(nproc)}
cargo build --release --quiet -p ferrotune -p ferrotune-lora -p ferrotune-sft -p ferrotune-single
# The model only needs a tokenizer whose ids fit its vocabulary: a word-level one of exactly
# $vocab tokens (the Qwen2 tokenizer has 151k), written once.
tok=target/bench/wordlevel-$vocab
[ -f "$tok/tokenizer.json" ] || python scripts/wordlevel-tokenizer.py "$tok" "$vocab"
model=${MODEL:-target/bench/qwen2-train-h$hidden-l$layers-a$heads-kv$kv-i$inter-v$vocab}
if [ ! -f "$model/config.json" ]; then
  target/release/ferrotune init-model --arch qwen2 --hidden "$hidden" --layers "$layers" --heads "$heads" \
    --kv-heads "$kv" --intermediate "$inter" --vocab "$vocab" --dtype f32 --tokenizer "$tok" --out "$model" >/dev/null
fi
args=(--model "$model" --batch "$batch" --seq-len "$seq" --rank "$rank" --steps "${STEPS:-10}" --warmup "${WARMUP:-2}"
  --threads "$threads" --dtype "${DTYPE:-f32}")
echo "model $model: batch $batch x $seq tokens, LoRA r $rank, ${STEPS:-10} timed steps after ${WARMUP:-2} warm-up, $threads threads${REF_JEMALLOC:+; reference on $REF_JEMALLOC}" >&2
ref=(python)
if [ -n "${REF_JEMALLOC:-}" ]; then
  ref=(env LD_PRELOAD="$REF_JEMALLOC" MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0 python)
fi
ours=() theirs=()
for ((i = 0; i < ${REPEATS:-3}; i++)); do
  if ((i % 2 == 0)); then
    ours+=("$(target/release/ferrotune bench train "${args[@]}")")
    theirs+=("$("${ref[@]}" bench/train_transformers.py "${args[@]}")")
  else
    theirs+=("$("${ref[@]}" bench/train_transformers.py "${args[@]}")")
    ours+=("$(target/release/ferrotune bench train "${args[@]}")")
  fi
  echo "repeat $((i + 1)) done" >&2
done
python - "${#ours[@]}" "${ours[@]}" "${theirs[@]}" <<'PY'
import json, statistics, sys
n = int(sys.argv[1])
ours = [json.loads(s) for s in sys.argv[2:2 + n]]
theirs = [json.loads(s) for s in sys.argv[2 + n:]]
a = ours[0]
print(f"LoRA SFT: batch {a['batch']} x {a['seq_len']} tokens, r {a['lora_r']} ({a['trainable_params']} trainable), "
      f"{a['dtype']}, {a['device']}, threads {a['threads']}/{theirs[0]['threads']}, {a['steps']} timed steps after {a['warmup']}")
cols = ["tokens_per_s", "best_tokens_per_s", "step_s", "forward_s", "backward_s", "optimizer_s", "peak_rss_mb", "base_rss_mb", "first_loss"]
heads = ["tok/s", "best tok/s", "step s", "fwd s", "bwd s", "optim s", "peak MiB", "base MiB", "loss 1"]
print(f"{'':36}" + "".join(f"{h:>11}" for h in heads))
def row(label, r):
    print(f"{label:<36}" + "".join(f"{r[c]:>11.1f}" if c in ("tokens_per_s", "best_tokens_per_s", "peak_rss_mb", "base_rss_mb")
                                   else f"{r[c]:>11.4f}" if c == "first_loss" else f"{r[c]:>11.3f}" for c in cols))
for i in range(n):
    row(f"{ours[i]['impl']} #{i + 1}", ours[i])
    row(f"{theirs[i]['impl']} #{i + 1}", theirs[i])
# Throughput and times: each side's best repeat (the least disturbed by other load, as
# bench-generate's best of R); memory: the median repeat.
bo, bt = (max(rs, key=lambda r: r["tokens_per_s"]) for rs in (ours, theirs))
med = lambda rs, c: statistics.median(r[c] for r in rs)
ratio = lambda c: med(ours, c) / med(theirs, c) if c.endswith("_mb") else bo[c] / bt[c]
print(f"{'ferrotune / transformers':<36}" + "".join(f"{ratio(c):>11.2f}" if c != "first_loss" else f"{'':>11}" for c in cols))
print("(ratios: tok/s and times of each side's best repeat, memory of the median repeat)")
PY
