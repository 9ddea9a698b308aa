#!/usr/bin/env bash
# The fast-training-engine table: LoRA SFT of ferrotune (release build, `bench train`, the
# trainer's own Run::step) next to transformers + peft at their best (bench/train_transformers.py:
# SDPA, fused AdamW, autocast for bf16, DataCollatorWithFlattening for padding-free rows), in
# one run. Every row runs REPEATS times, each repeat alternating the order of the sides (A B,
# B A, …); the table gives each side's median and the MEDIAN OF THE PAIRED RATIOS (repeat i's
# ours / repeat i's theirs), next to the issue's target. `make bench-train` calls this.
#
# Rows (ROWS selects, default all; e.g. ROWS=varlen scripts/bench-train.sh reruns one):
#   ref_fp32   Qwen2 hidden 512, 8 layers, 8/2 heads, inter 1408, vocab 32000; 4 × 512 tokens,
#              first quarter of each row label −100, LoRA r 16 all linear, fp32: tok/s, peak RSS
#   bf16       the same with --dtype bf16 (ours: bf16 base, fp32 adapter and optimizer state;
#              the peer: fp32 weights under torch.autocast(bfloat16), as Trainer's bf16=True)
#   varlen     rows of the alpaca set's token lengths (host/src/bench/alpaca_lengths.txt, cut at
#              1024): LABEL tokens/s of ours padded (4 rows a step, right-padded), ours packed
#              (--packing: the trainer's data.packing, 4 packed rows of ≤ 1024 a step; "n/a" if
#              this build has none) and the peer padding-free (DataCollatorWithFlattening of
#              4 × k rows a step, k = ⌈1024 / mean length⌉: the same tokens a step as ours packed)
#   longvocab  one 1 × 4096 step (after 1 warm-up) on hidden 512, 4 layers, vocab 151,936:
#              peak RSS (and tok/s) ours vs peer, and ours vs today's (TODAY_LONGVOCAB_MB)
#   vlm        ours only: the story demo's tiny Qwen2-VL on the StoryReasoning sample
#              (`bench train --config`), packed vs padded label tok/s, VLM_BATCH samples a step
# Each result also carries the roofline: achieved FLOP/s over this process's best matmul FLOP/s
# at the same threads and dtype (`mfu`; the formula: host/src/bench/roofline.rs).
#
#   STEPS=10 WARMUP=2 REPEATS=3 THREADS=$(nproc) scripts/bench-train.sh    (the defaults)
#   SIZE=small STEPS=2 WARMUP=1 REPEATS=1 scripts/bench-train.sh           # a quick try
# SIZE=small: hidden 128, 2 layers, 2 × 128 (varlen: cutoff 256, 2 rows; longvocab: 1 × 512,
# 2 layers; vlm: 1 step). Any of HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE VOCAB BATCH SEQ_LEN
# RANK overrides the ref rows' size. JSON lines land in target/bench/train/.
# ferrotune's binary runs on jemalloc (host/src/main.rs); REF_JEMALLOC=/path/libjemalloc.so.2
# runs the reference on it too, with the same options (LD_PRELOAD), to compare like for like.
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
# ferrotune before the fast-training-engine work (commit 04204f2's release binary, measured
# once): peak RSS of the longvocab step, fp32, 2 threads, labels = ids. The target is ≤ 0.35×.
TODAY_LONGVOCAB_MB=${TODAY_LONGVOCAB_MB:-8619}
ROWS=${ROWS:-ref_fp32 bf16 varlen longvocab vlm}
small=$([ "${SIZE:-full}" = small ] && echo 1 || echo 0)
if ((small)); then
  d=(128 2 4 2 352 32000 2 128 8) varlen=(2 256) lv=(128 2 512) vlm_steps=1
else
  d=(512 8 8 2 1408 32000 4 512 16) varlen=(4 1024) lv=(512 4 4096) vlm_steps=${STEPS:-10}
fi
hidden=${HIDDEN:-${d[0]}} layers=${LAYERS:-${d[1]}} heads=${HEADS:-${d[2]}} kv=${KV_HEADS:-${d[3]}}
inter=${INTERMEDIATE:-${d[4]}} vocab=${VOCAB:-${d[5]}} batch=${BATCH:-${d[6]}} seq=${SEQ_LEN:-${d[7]}} rank=${RANK:-${d[8]}}
threads=${THREADS:-$(nproc)} steps=${STEPS:-10} warmup=${WARMUP:-2} repeats=${REPEATS:-3}
cargo build --release --quiet -p ferrotune -p ferrotune-lora -p ferrotune-sft -p ferrotune-single -p ferrotune-vlmdata
out=target/bench/train
mkdir -p "$out"
rm -f "$out"/*.json

# model DIR HIDDEN LAYERS HEADS KV INTER VOCAB: a random fp32 Qwen2 with a word-level tokenizer
# of exactly VOCAB tokens (the ids are synthetic), written once.
model() {
  local tok=target/bench/wordlevel-$7
  [ -f "$tok/tokenizer.json" ] || python scripts/wordlevel-tokenizer.py "$tok" "$7"
  [ -f "$1/config.json" ] || target/release/ferrotune init-model --arch qwen2 --hidden "$2" --layers "$3" \
    --heads "$4" --kv-heads "$5" --intermediate "$6" --vocab "$7" --dtype f32 --tokenizer "$tok" --out "$1" >/dev/null
}
ref=(python)
if [ -n "${REF_JEMALLOC:-}" ]; then
  ref=(env LD_PRELOAD="$REF_JEMALLOC" MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0 python)
fi
# side ROW NAME REPEAT CMD…: one run's JSON line into $out/ROW-NAME-REPEAT.json; a failed run
# leaves {"error": its last stderr line} (the table prints n/a).
side() {
  local file="$out/$1-$2-$3.json" err="$out/$1-$2-$3.err"
  shift 3
  if ! "$@" > "$file" 2> "$err"; then
    python -c 'import json,sys; print(json.dumps({"error": sys.argv[1]}))' "$(tail -n 1 "$err")" > "$file"
  fi
}
# pair ROW "NAME CMD" …: REPEATS rounds of every side, the order reversed every other round.
pair() {
  local row=$1 i k
  shift
  local sides=("$@")
  for ((i = 1; i <= repeats; i++)); do
    local order=("${sides[@]}")
    if ((i % 2 == 0)); then for ((k = 0; k < ${#sides[@]}; k++)); do order[k]=${sides[${#sides[@]} - 1 - k]}; done; fi
    for s in "${order[@]}"; do
      # shellcheck disable=SC2086
      side "$row" ${s%% *} "$i" ${s#* }
    done
    echo "$row: repeat $i of $repeats done" >&2
  done
}
ours="target/release/ferrotune bench train --threads $threads"
theirs="${ref[*]} bench/train_transformers.py --threads $threads"
timing="--steps $steps --warmup $warmup --rank $rank"
ref_model=target/bench/qwen2-train-h$hidden-l$layers-a$heads-kv$kv-i$inter-v$vocab
for row in $ROWS; do
  case $row in
    ref_fp32 | bf16)
      model "$ref_model" "$hidden" "$layers" "$heads" "$kv" "$inter" "$vocab"
      dt=$([ "$row" = bf16 ] && echo bf16 || echo f32)
      a="--model $ref_model --batch $batch --seq-len $seq $timing --dtype $dt"
      pair "$row" "ours $ours $a" "theirs $theirs $a" ;;
    varlen)
      model "$ref_model" "$hidden" "$layers" "$heads" "$kv" "$inter" "$vocab"
      lengths=host/src/bench/alpaca_lengths.txt
      a="--model $ref_model --seq-len ${varlen[1]} $timing --lengths $lengths"
      # Packed steps hold batch rows of up to cutoff tokens, k = ⌈cutoff / mean length⌉ rows each
      # (bench::rows_per_packed_row): the peer flattens batch × k rows a step, the same tokens.
      k=$(python -c 'import sys; l=[min(int(w), int(sys.argv[2])) for s in open(sys.argv[1]) if not s.lstrip().startswith("#") for w in s.split()]; print(max(1, -(-int(sys.argv[2]) * len(l) // sum(l))))' "$lengths" "${varlen[1]}")
      pair varlen "padded $ours $a --batch ${varlen[0]}" "packed $ours $a --batch ${varlen[0]} --packing" \
        "theirs $theirs $a --batch $((varlen[0] * k)) --packing" ;;
    longvocab)
      m=target/bench/qwen2-train-h${lv[0]}-l${lv[1]}-a8-kv2-i1408-v151936
      model "$m" "${lv[0]}" "${lv[1]}" 8 2 1408 151936
      a="--model $m --batch 1 --seq-len ${lv[2]} --steps 1 --warmup 1 --rank $rank"
      pair longvocab "ours $ours $a" "theirs $theirs $a" ;;
    vlm)
      vl=target/demo/qwen2-vl-tiny
      [ -f "$vl/config.json" ] || target/release/ferrotune init-model --preset tiny-vl --tokenizer assets/qwen2-tokenizer --out "$vl" >/dev/null
      sed -e "s#^model: .*#model: $PWD/$vl#" -e "s#^output_dir: .*#output_dir: $PWD/target/bench/vlm-run#" \
        -e "s#path: ../datasets#path: $PWD/datasets#" examples/story_lora_demo.yaml > target/bench/vlm.yaml
      a="--config target/bench/vlm.yaml --batch ${VLM_BATCH:-2} --steps $vlm_steps --warmup 1"
      pair vlm "padded $ours $a" "packed $ours $a --packing" ;;
    *) echo "unknown row $row (ROWS: ref_fp32 bf16 varlen longvocab vlm)" >&2; exit 2 ;;
  esac
done
python - "$out" "$repeats" "$TODAY_LONGVOCAB_MB" <<'PY'
import glob, json, os, statistics, sys
out, repeats, today = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def runs(row, name):
    rs = []
    for i in range(1, repeats + 1):
        p = f"{out}/{row}-{name}-{i}.json"
        rs.append(json.load(open(p)) if os.path.exists(p) else None)
    return rs if any(rs) else None
ok = lambda r: r is not None and "error" not in r
def med(rs, key):
    v = [r[key] for r in rs or [] if ok(r)]
    return statistics.median(v) if v else None
def paired(a, b, key, b_key=None):
    v = [x[key] / y[b_key or key] for x, y in zip(a or [], b or []) if ok(x) and ok(y)]
    return statistics.median(v) if v else None
def fmt(v, unit=""):
    return "n/a" if v is None else f"{v:,.1f}{unit}" if abs(v) >= 10 else f"{v:.3f}{unit}"
lines = []
def line(row, metric, ours, peer, ratio, target, good):
    met = "" if ratio is None or good is None else ("yes" if good(ratio) else "NO")
    lines.append((row, metric, fmt(ours), fmt(peer), "n/a" if ratio is None else f"{ratio:.2f}x", target, met))
def errors(rs):
    return [r["error"] for r in rs or [] if r is not None and "error" in r]
notes = []
for row in ("ref_fp32", "bf16"):
    o, t = runs(row, "ours"), runs(row, "theirs")
    if o is None:
        continue
    line(row, "tok/s", med(o, "tokens_per_s"), med(t, "tokens_per_s"), paired(o, t, "tokens_per_s"), ">= 1.3x", lambda r: r >= 1.3)
    line(row, "peak RSS MiB", med(o, "peak_rss_mb"), med(t, "peak_rss_mb"), paired(o, t, "peak_rss_mb"),
         "<= 0.5x" if row == "ref_fp32" else "", (lambda r: r <= 0.5) if row == "ref_fp32" else None)
    line(row, "mfu", med(o, "mfu"), med(t, "mfu"), paired(o, t, "mfu"), "", None)
pad, pack, peer = runs("varlen", "padded"), runs("varlen", "packed"), runs("varlen", "theirs")
if pad is not None:
    line("varlen", "label tok/s padded", med(pad, "label_tokens_per_s"), med(peer, "label_tokens_per_s"),
         paired(pad, peer, "label_tokens_per_s"), "", None)
    line("varlen", "label tok/s packed", med(pack, "label_tokens_per_s"), med(peer, "label_tokens_per_s"),
         paired(pack, peer, "label_tokens_per_s"), ">= 1.1x peer", lambda r: r >= 1.1)
    line("varlen", "packed / our padded", med(pack, "label_tokens_per_s"), med(pad, "label_tokens_per_s"),
         paired(pack, pad, "label_tokens_per_s"), ">= 2x", lambda r: r >= 2.0)
    line("varlen", "mfu packed", med(pack, "mfu"), med(peer, "mfu"), paired(pack, peer, "mfu"), "", None)
    if errors(pack):
        notes.append(f"varlen packed: n/a ({errors(pack)[0]})")
o, t = runs("longvocab", "ours"), runs("longvocab", "theirs")
if o is not None:
    line("longvocab", "peak RSS MiB", med(o, "peak_rss_mb"), med(t, "peak_rss_mb"), paired(o, t, "peak_rss_mb"), "", None)
    rss = med(o, "peak_rss_mb")
    line("longvocab", "peak RSS vs today's", rss, today, None if rss is None else rss / today, "<= 0.35x", lambda r: r <= 0.35)
    line("longvocab", "tok/s", med(o, "tokens_per_s"), med(t, "tokens_per_s"), paired(o, t, "tokens_per_s"), "", None)
    line("longvocab", "mfu", med(o, "mfu"), med(t, "mfu"), paired(o, t, "mfu"), "", None)
    if o[0] and o[0].get("seq_len") != 4096:
        notes.append("longvocab: today's figure is for 1 x 4096 tokens; this size is smaller (SIZE=small)")
pad, pack = runs("vlm", "padded"), runs("vlm", "packed")
if pad is not None:
    line("vlm (ours)", "label tok/s packed | padded", med(pack, "label_tokens_per_s"), med(pad, "label_tokens_per_s"),
         paired(pack, pad, "label_tokens_per_s"), ">= 1.5x", lambda r: r >= 1.5)
    if errors(pack):
        notes.append(f"vlm packed: n/a ({errors(pack)[0]})")
for name in sorted(glob.glob(f"{out}/*.json")):
    r = json.load(open(name))
    if "error" in r and "-packed-" not in name:
        notes.append(f"{os.path.basename(name)}: {r['error']}")
any_ours = next((r for rs in (runs("ref_fp32", "ours"), runs("varlen", "padded")) for r in rs or [] if ok(r)), None)
any_peer = next((r for rs in (runs("ref_fp32", "theirs"), runs("varlen", "theirs"), runs("longvocab", "theirs")) for r in rs or [] if ok(r)), None)
if any_ours:
    print(f"ours: {any_ours['impl']}, {any_ours['device']}, {any_ours['threads']} threads")
if any_peer:
    print(f"peer: {any_peer['impl']}, {any_peer['optimizer']}, {any_peer['attention']} (padding-free in varlen)")
print(f"{repeats} repeats, sides alternating; ours/peer = median of the paired ratios (repeat i / repeat i)")
heads = ("row", "metric", "ours", "peer", "ours/peer", "target", "met")
widths = [max(len(str(x[i])) for x in lines + [heads]) for i in range(len(heads))]
for x in [heads] + lines:
    print("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(x, widths))))
for n in notes:
    print("note:", n)
PY
