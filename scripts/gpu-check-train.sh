#!/usr/bin/env bash
# The GPU session's one prepared check (run from the repository root on the device machine,
# after `make gpu-bundle` here; carries dist/gpu-check and assets/). Every step runs even if an
# earlier one fails; logs and numbers go to $OUT (default dist/gpu-out).
#   1. doctor / plugins / selfcheck on cuda (dist/gpu-check/run.sh)
#   2. the story demo's LoRA SFT of a tiny Qwen2-VL on cuda and on cpu: per-step losses compared
#   3. greedy story generation with the adapter on cuda vs cpu (token ids compared)
#   4. DPO and GRPO (reward plugin, sampling on the device) on cuda, a few steps
#   5. generate throughput on cuda, f32 and bf16, on the `small` preset
#   6. c10d NCCL: `dist-check` (every collective through ProcessGroupNCCL on the one GPU; a
#      launched world of one still uses the real group), a 2-rank Gloo dist-check on cpu, and
#      a 1-rank `zero` stage 3 LoRA SFT with FERROTUNE_DIST_BACKEND=nccl (the stage's gradient
#      reduce-scatter and parameter all-gather of CUDA tensors through NCCL; a world of one
#      keeps the frozen weights whole); NCCL refuses two ranks on one GPU, hence --nproc 1
#   7. activation checkpointing with LoRA dropout on the device: losses and grad norms equal
#      to the run without it (the recompute replays the CUDA generator's dropout masks)
set -uo pipefail
DEV=${DEV:-cuda}   # DEV=cpu tries the script on a machine without a GPU
OUT=${OUT:-dist/gpu-out}
mkdir -p "$OUT"
B=dist/gpu-check
FT="$B/ferrotune"
PY=${PYTHON:-python3}
export LD_LIBRARY_PATH="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
W=$(mktemp -d)
step() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > "$OUT/$name.log" 2>&1; local rc=$?; printf '%-14s rc=%s %6.1fs\n' "$name" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)" | tee -a "$OUT/summary.txt"; tail -n 3 "$OUT/$name.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
DEVICE=$DEV step bundle bash "$B/run.sh"
step init-vl "$FT" init-model --preset tiny-vl --tokenizer assets/qwen2-tokenizer --out "$W/vl"
for dev in $DEV cpu; do
  sed -e "s#^model: .*#model: $W/vl#" -e "s#^output_dir: .*#output_dir: $W/story-$dev#" -e "s#^device: .*#device: $dev#" \
      -e "s#path: ../datasets#path: $PWD/datasets#" -e "s#epochs: 6#epochs: 1#" examples/story_lora_demo.yaml > "$W/story-$dev.yaml"
  step "story-$dev" "$FT" train "$W/story-$dev.yaml"
  cp "$W/story-$dev/metrics.jsonl" "$OUT/story-$dev-metrics.jsonl" 2>/dev/null
done
for dev in $DEV cpu; do
  step "gen-$dev" "$FT" generate --model "$W/vl" --adapter "$W/story-$DEV" --chat --device $dev --greedy --json \
    --image datasets/story-llava/images/toy-test-008_1.png --image datasets/story-llava/images/toy-test-008_2.png \
    --prompt "Create a story based on these images." --max-new-tokens 32
done
step init-text "$FT" init-model --preset tiny --tokenizer assets/qwen2-tokenizer --out "$W/text"
cat > "$W/prefs.jsonl" <<'J'
{"instruction": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
{"instruction": "Name a number.", "chosen": "Seven.", "rejected": "Blue."}
{"instruction": "Name an animal.", "chosen": "A cat.", "rejected": "A chair."}
{"instruction": "Name a fruit.", "chosen": "An apple.", "rejected": "A car."}
J
cat > "$W/dpo.yaml" <<Y
model: $W/text
output_dir: $W/dpo
device: $DEV
adapter: {plugin: lora, r: 8, target_modules: all-linear}
objective: {plugin: dpo, beta: 0.1}
optimizer: {lr: 5.0e-3}
data: {plugin: alpaca, path: $W/prefs.jsonl, config: {ranking: true}}
training: {max_steps: 6, micro_batch_size: 2, progress_bar: false}
Y
step dpo-$DEV "$FT" train "$W/dpo.yaml"
cat > "$W/grpo.yaml" <<Y
model: $W/text
output_dir: $W/grpo
device: $DEV
adapter: {plugin: lora, r: 8, target_modules: all-linear}
objective: {plugin: grpo, num_generations: 4, max_completion_length: 16, beta: 0.04}
rewards: [{plugin: length, mode: target, target: 4}]
optimizer: {lr: 5.0e-3}
data: {plugin: alpaca, path: $W/prefs.jsonl, config: {ranking: true}}
training: {max_steps: 4, micro_batch_size: 2, progress_bar: false, num_iterations: 2}
Y
step grpo-$DEV "$FT" train "$W/grpo.yaml"
step init-small "$FT" init-model --preset small --tokenizer assets/qwen2-tokenizer --out "$W/small"
for dt in f32 bf16; do
  step "bench-$dt" "$FT" bench generate --model "$W/small" --device $DEV --dtype $dt --batch 8 --prompt-len 128 --new-tokens 64 --repeats 3
done
NB=nccl; [ "$DEV" = cpu ] && NB=gloo   # DEV=cpu: the same steps on Gloo
step dist-$NB "$FT" launch --nproc 1 --timeout 120 dist-check --backend $NB --device $DEV
step dist-gloo-2 "$FT" launch --nproc 2 --timeout 120 dist-check --backend gloo --device cpu --numel 1048576
cat > "$W/alpaca.jsonl" <<'J'
{"instruction": "Name a colour.", "output": "Blue."}
{"instruction": "Name a number.", "output": "Seven."}
{"instruction": "Name an animal.", "output": "A cat."}
{"instruction": "Name a fruit.", "output": "An apple."}
J
cat > "$W/zero3.yaml" <<Y
model: $W/text
output_dir: $W/zero3
device: $DEV
adapter: {plugin: lora, r: 8, target_modules: all-linear}
optimizer: {lr: 5.0e-3, max_grad_norm: 1.0}
memory: {plugin: zero, stage: 3}
data: {plugin: alpaca, path: $W/alpaca.jsonl}
training: {max_steps: 4, micro_batch_size: 2, progress_bar: false}
Y
FERROTUNE_DIST_BACKEND=$NB step zero3-$NB "$FT" launch --nproc 1 --timeout 120 train "$W/zero3.yaml"
for gc in false true; do
cat > "$W/gc-$gc.yaml" <<Y
model: $W/text
output_dir: $W/gc-$gc
device: $DEV
seed: 3
adapter: {plugin: lora, r: 8, lora_dropout: 0.2, target_modules: all-linear}
optimizer: {lr: 5.0e-3}
data: {plugin: alpaca, path: $W/alpaca.jsonl}
training: {max_steps: 4, micro_batch_size: 2, progress_bar: false, gradient_checkpointing: $gc}
Y
step ckpt-$gc "$FT" train "$W/gc-$gc.yaml"
done
step ckpt-compare "$PY" -c '
import json, sys
a, b = ([json.loads(l) for l in open(sys.argv[i]) if "loss" in l] for i in (1, 2))
assert len(a) == len(b) == 4, (len(a), len(b))
for k in ("loss", "grad_norm"):
    d = max(abs(x[k] - y[k]) for x, y in zip(a, b))
    print(k, "max |checkpointed - plain| =", d)
    assert d < 1e-4, k
' "$W/gc-false/metrics.jsonl" "$W/gc-true/metrics.jsonl"
cp "$W"/*/train_summary.json "$OUT/" 2>/dev/null
for d in story-$DEV story-cpu dpo grpo zero3 gc-false gc-true; do cp "$W/$d/train_summary.json" "$OUT/$d-summary.json" 2>/dev/null; cp "$W/$d/metrics.jsonl" "$OUT/$d-metrics.jsonl" 2>/dev/null; done
echo done
