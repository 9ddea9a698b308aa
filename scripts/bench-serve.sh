#!/usr/bin/env bash
# Decode tokens/s of `ferrotune serve`'s engine (release build): one batch of N requests all on
# one LoRA adapter vs the same N spread over N adapters (mixed batch) vs the base alone.
# `make bench-serve` calls this.
#   REQUESTS=8 PROMPT_LEN=32 NEW_TOKENS=32 RANK=16 DEVICE=cpu scripts/bench-serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
cargo build --release -p ferrotune -p ferrotune-lora --quiet
model=${MODEL:-target/bench/qwen2-small}
if [ ! -f "$model/config.json" ]; then
  target/release/ferrotune init-model --preset small --arch qwen2 --tokenizer assets/qwen2-tokenizer --out "$model"
fi
target/release/ferrotune bench serve --model "$model" --requests "${REQUESTS:-8}" --prompt-len "${PROMPT_LEN:-32}" \
  --new-tokens "${NEW_TOKENS:-32}" --rank "${RANK:-16}" --device "${DEVICE:-cpu}" --repeats "${REPEATS:-3}"
