#!/usr/bin/env bash
# Training throughput on one CUDA GPU: ferrotune (the bundled release binary, `bench train
# --device cuda`) next to transformers + peft (bench/train_transformers.py: SDPA, bf16 autocast,
# fused AdamW, DataCollatorWithFlattening), LoRA r 16 SFT with packing at 4 × 2048 tokens a
# step on a random Qwen2.5-1.5B-shaped model (hidden 1536, 28 layers, 12/2 heads, inter 8960,
# vocab 151936, tied head). Run from the repository root on the device machine after
# `make gpu-bundle` here (carries dist/gpu-check, bench/, host/src/bench/alpaca_lengths.txt and
# scripts/); no Rust, no internet; torch 2.11 + transformers + peft in $PYTHON. Under 8 minutes
# on one H100/H200: 3 timed steps after 2 warm-up, one run a side.
#   scripts/gpu-bench.sh                      # cuda
#   DEV=cpu scripts/gpu-bench.sh              # a tiny dry run of the same steps without a GPU
#
# Rows: variable-length rows of the alpaca set's token lengths (cut at 2048). Ours: 4 packed
# rows of ≤ 2048 tokens a step (data.packing); the peer: 4 × k rows flattened a step, k =
# ⌈2048 / mean length⌉ (the same tokens a step). Ours: bf16 base, fp32 adapter and AdamW state;
# the peer: fp32 weights under torch.autocast(bfloat16) (Trainer's bf16=True).
#
# MFU, the formula of host/src/bench/roofline.rs: per step
#   4 · N · n            frozen base: forward 2·N·n + input gradients 2·N·n (no weight grads)
# + 4 · H · V · h        head forward + input gradients at the h tokens that reach it
#                        (ours: label positions; transformers: every token)
# + 6 · A · n            adapter forward + backward
# + 6 · L · d · Σ T²     attention: 4·L·d·T² forward per sequence, causal halves it, backward 2×
# with N the decoder's linear weights, n the step's tokens, A the adapter's weights, L layers,
# d = heads · head_dim. Printed against the bf16 dense peak (989 TFLOP/s for H100/H200 SXM;
# PEAK_TFLOPS overrides) and, as each side's `mfu`, against its own measured 8192³ bf16 matmul.
#
# Peak GPU memory: ours through nvidia-smi polling (memory.used every 100 ms, the process's
# whole footprint with the CUDA context; libtorch's caching-allocator stats are not reachable
# through tch) minus the idle reading before the run; the peer both ways: the same polling and
# torch.cuda.max_memory_reserved (its `peak_gpu_mb`).
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=${DEV:-cuda}
OUT=${OUT:-dist/gpu-out}
B=${BUNDLE:-dist/gpu-check}
FT=${FT:-$B/ferrotune}
PY=${PYTHON:-python3}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
mkdir -p "$OUT"
W=$(mktemp -d)
export HF_HUB_OFFLINE=1
export LD_LIBRARY_PATH="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$DEV" = cpu ]; then
  shape=(64 2 4 2 128 151936) batch=2 seq=256 steps=1 warmup=1 threads=(--threads "$(nproc)")
else
  shape=(1536 28 12 2 8960 151936) batch=4 seq=2048 steps=${STEPS:-3} warmup=${WARMUP:-2} threads=()
fi
lengths=host/src/bench/alpaca_lengths.txt
k=$("$PY" -c 'import sys; l=[min(int(w), int(sys.argv[2])) for s in open(sys.argv[1]) if not s.lstrip().startswith("#") for w in s.split()]; print(max(1, -(-int(sys.argv[2]) * len(l) // sum(l))))' "$lengths" "$seq")
echo "device $DEV, model hidden ${shape[0]} layers ${shape[1]}, $batch x $seq packed (peer: $((batch * k)) rows flattened), $steps steps after $warmup"
"$PY" scripts/wordlevel-tokenizer.py "$W/tok" "${shape[5]}" || exit 1
"$FT" init-model --arch qwen2 --hidden "${shape[0]}" --layers "${shape[1]}" --heads "${shape[2]}" --kv-heads "${shape[3]}" \
  --intermediate "${shape[4]}" --vocab "${shape[5]}" --dtype bf16 --tokenizer "$W/tok" --out "$W/model" > /dev/null || exit 1

# poll FILE: the largest nvidia-smi memory.used (MiB) until killed, written to FILE.
poll() {
  local peak=0 v
  while true; do
    v=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    [ -n "$v" ] && [ "$v" -gt "$peak" ] && { peak=$v; echo "$peak" > "$1"; }
    sleep 0.1
  done
}
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
# run NAME CMD…: its JSON line to $OUT/gpu-bench-NAME.json, its polled GPU peak beside it.
run() {
  local name=$1
  shift
  echo 0 > "$OUT/gpu-bench-$name.smi"
  poll "$OUT/gpu-bench-$name.smi" & local poller=$!
  local t0=$SECONDS
  "$@" > "$OUT/gpu-bench-$name.json" 2> "$OUT/gpu-bench-$name.err"
  echo "$name: rc=$? $((SECONDS - t0)) s"
  kill "$poller" 2>/dev/null
  wait "$poller" 2>/dev/null
  tail -n 2 "$OUT/gpu-bench-$name.err"
}
common=(--model "$W/model" --device "$DEV" --dtype bf16 --seq-len "$seq" --steps "$steps" --warmup "$warmup"
  --rank 16 --lengths "$lengths" --packing "${threads[@]}")
run ours timeout 240 "$FT" bench train "${common[@]}" --batch "$batch"
run peer timeout 240 "$PY" bench/train_transformers.py "${common[@]}" --batch $((batch * k))
"$PY" - "$OUT" "${idle:-0}" "$PEAK_TFLOPS" <<'PY' | tee "$OUT/gpu-bench.txt"
import json, sys
out, idle, peak = sys.argv[1], float(sys.argv[2] or 0), float(sys.argv[3]) * 1e12
print(f"{'':10}{'tok/s':>10}{'label tok/s':>13}{'TFLOP/s':>9}{'MFU peak':>10}{'mfu meas.':>10}{'GPU MiB smi':>13}{'alloc MiB':>11}  impl")
for name in ("ours", "peer"):
    try:
        r = json.loads(open(f"{out}/gpu-bench-{name}.json").read().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        print(f"{name:10} no result (see {out}/gpu-bench-{name}.err)")
        continue
    smi = float(open(f"{out}/gpu-bench-{name}.smi").read().strip() or 0)
    smi_s = f"{smi - idle:,.0f}" if smi else "n/a"
    alloc = r.get("peak_gpu_mb")
    print(f"{name:10}{r['tokens_per_s']:>10,.0f}{r['label_tokens_per_s']:>13,.0f}{r['flops_per_s'] / 1e12:>9.1f}"
          f"{r['flops_per_s'] / peak:>10.3f}{r['mfu']:>10.3f}{smi_s:>13}{'n/a' if alloc is None else f'{alloc:,.0f}':>11}  {r['impl']}")
print(f"MFU peak: against {peak / 1e12:.0f} TFLOP/s bf16 dense; mfu meas.: against the process's own 8192^3 bf16 matmul;"
      " GPU MiB smi: nvidia-smi peak minus idle (context included); alloc: torch.cuda.max_memory_reserved (peer only)")
PY
rm -rf "$W"
