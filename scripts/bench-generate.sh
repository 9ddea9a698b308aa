#!/usr/bin/env bash
# Prefill and decode tokens/s of ferrotune (release build) next to transformers, on the same
# model directory and the same prompts, in one run. `make bench-generate` calls this.
#   BATCH=4 PROMPT_LEN=256 NEW_TOKENS=64 REPEATS=3 DTYPE=f32 scripts/bench-generate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
cargo build --release -p ferrotune --quiet
model=${MODEL:-target/bench/qwen2-small}
if [ ! -f "$model/config.json" ]; then
  target/release/ferrotune init-model --preset small --arch qwen2 --tokenizer assets/qwen2-tokenizer --out "$model"
fi
dtype=${DTYPE:-f32}
py_dtype=$([ "$dtype" = bf16 ] && echo bfloat16 || echo float32)
args=(--batch "${BATCH:-1}" --prompt-len "${PROMPT_LEN:-128}" --new-tokens "${NEW_TOKENS:-64}" --repeats "${REPEATS:-3}")
ours=$(target/release/ferrotune bench generate --model "$model" "${args[@]}" --dtype "$dtype")
theirs=$(python bench/generate_transformers.py --model "$model" "${args[@]}" --dtype "$py_dtype")
python - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"model: batch {a['batch']}, prompt {a['prompt_len']} tokens, {a['new_tokens']} new tokens, {a['dtype']}, threads {a['threads']}/{b['threads']}")
print(f"{'':28}{'prefill tok/s':>15}{'decode tok/s':>15}")
for r in (a, b):
    print(f"{r['impl']:<28}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>15.1f}")
print(f"{'ferrotune / transformers':<28}{a['prefill_tok_s'] / b['prefill_tok_s']:>15.2f}{a['decode_tok_s'] / b['decode_tok_s']:>15.2f}")
PY
