#!/usr/bin/env python3
"""A fake `ferrotune board` backend for working on the page (host/src/board/assets) without
building the Rust server: serves the three assets from disk and fakes every /api route of the
contract (host/src/board/assets/README.md) with plausible data. Python standard library only.

    python3 scripts/board_mock.py [--port 7861] [--token t]
    then open http://127.0.0.1:7861/?token=t#runs

With --upstream URL --upstream-token T it fakes nothing: the page comes from disk (so edits show
without a rebuild) and every /api request is passed to a running `ferrotune board` (SSE too).

Runs it fakes: a finished LoRA run (60 steps with eval lines), a failed one, a stopped one and a
running one whose metrics grow by one line every 300 ms and then turn finished; a run started
from the form does the same. Chat replies are made up (the base echoes, the adapter rhymes).
"""
import argparse
import http.client
import json
import math
import os
import re
import struct
import threading
import time
import zlib
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "host", "src", "board", "assets")
ROOT = "/srv/board"
RUNS_DIR = ROOT + "/runs"
MODELS_DIR = ROOT + "/models"
DATA_DIR = ROOT + "/data"
TICK = 0.3  # seconds between two metric lines of a running run

LOCK = threading.Lock()


def metric_line(step, total, seed):
    """One metrics.jsonl line of a fake run (every 10th step also an eval line)."""
    warm = max(1, total // 10)
    lr = 5e-3 * (step / warm if step <= warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
    noise = math.sin(step * 1.7 + seed) * 0.08 + math.sin(step * 0.31 + seed * 2) * 0.05
    loss = 2.2 * math.exp(-step / (total / 2.5)) + 0.45 + noise + seed * 0.07
    return {
        "step": step,
        "epoch": round(step / (total / 3), 3),
        "loss": round(loss, 4),
        "lr": lr,
        "grad_norm": round(1.4 * math.exp(-step / total) + 0.2 + abs(noise), 4),
        "tokens_per_s": round(5200 + 400 * math.sin(step / 5 + seed) + seed * 300, 1),
    }


def eval_line(step, total, seed):
    return {"step": step, "epoch": round(step / (total / 3), 3), "eval_loss": round(2.0 * math.exp(-step / (total / 2.2)) + 0.6 + seed * 0.05, 4)}


class Run:
    def __init__(self, name, total, state, seed, done=None, config=None, by_board=False, adapter=True):
        self.name = name
        self.total = total
        self.seed = seed
        self.final_state = state  # the state once every line is written
        self.started = time.time()
        self.done = total if done is None else done  # lines written at start
        self.stopped_at = None
        self.by_board = by_board
        self.adapter = adapter
        self.config = config or default_yaml(name)
        self.modified = time.time() - 3600 * (seed + 1)
        self.error = "training stopped: row 12 of data/alpaca_bad.json: no assistant turn" if state == "failed" else None

    def steps_written(self):
        if self.stopped_at is not None:
            return self.stopped_at
        if self.final_state != "running":
            return self.done
        return min(self.total, self.done + int((time.time() - self.started) / TICK))

    def state(self):
        if self.stopped_at is not None:
            return "stopped"
        if self.final_state == "running":
            return "running" if self.steps_written() < self.total else "finished"
        return self.final_state

    def lines(self):
        out = []
        for s in range(1, self.steps_written() + 1):
            out.append(metric_line(s, self.total, self.seed))
            if s % 10 == 0:
                out.append(eval_line(s, self.total, self.seed))
        return out

    def log_chunks(self):
        chunks = [f"ferrotune train {RUNS_DIR}/{self.name}/config.yaml\nloading model {MODELS_DIR}/qwen2-tiny\n"
                  f"data: 52 rows, 47 for training, 5 for eval\n"]
        for line in self.lines():
            if "loss" in line:
                chunks.append(f"step {line['step']:>4}  loss {line['loss']:.4f}  lr {line['lr']:.2e}  grad_norm {line['grad_norm']:.3f}  {line['tokens_per_s']:.0f} tok/s\n")
            else:
                chunks.append(f"eval at step {line['step']}: eval_loss {line['eval_loss']:.4f}\n")
            if line["step"] % 20 == 0 and "loss" in line:
                chunks.append(f"saved {RUNS_DIR}/{self.name}/checkpoint-{line['step']}\n")
        st = self.state()
        if st == "finished":
            chunks.append(f"saved the adapter to {RUNS_DIR}/{self.name}\ndone\n")
        elif st == "failed":
            chunks.append("Error: " + (self.error or "failed") + "\n")
        elif st == "stopped":
            chunks.append("stopped (SIGTERM)\n")
        return chunks

    def checkpoints(self):
        return [f"checkpoint-{s}" for s in range(20, self.steps_written() + 1, 20)]

    def summary(self):
        lines = self.lines()
        train = [line for line in lines if "loss" in line]
        return {
            "name": self.name,
            "path": f"{RUNS_DIR}/{self.name}",
            "state": self.state(),
            "started_by_board": self.by_board,
            "steps": self.steps_written(),
            "last": train[-1] if train else None,
            "checkpoints": self.checkpoints(),
            "has_adapter": self.adapter and self.state() == "finished",
            "modified": int(time.time()) if self.state() == "running" else int(self.modified),
        }

    def details(self):
        st = self.state()
        return {
            "name": self.name,
            "path": f"{RUNS_DIR}/{self.name}",
            "state": st,
            "config_yaml": self.config,
            "checkpoints": [{"name": c, "step": int(c.split("-")[1])} for c in self.checkpoints()],
            "has_adapter": self.adapter and st == "finished",
            "exit_code": None if st == "running" else (1 if st == "failed" else (143 if st == "stopped" else 0)),
            "error": self.error,
            "command": ["ferrotune", "train", f"{RUNS_DIR}/{self.name}/config.yaml"] if self.by_board else None,
        }


def default_yaml(name):
    return (f"model: {MODELS_DIR}/qwen2-tiny\noutput_dir: {RUNS_DIR}/{name}\ndevice: cpu\ndtype: f32\n\n"
            "adapter:\n  plugin: lora\n  r: 8\n  lora_alpha: 16\n\nobjective:\n  plugin: sft\n\nmemory:\n  plugin: single\n\n"
            f"data:\n  plugin: alpaca\n  path: {DATA_DIR}/alpaca_demo.json\n  cutoff_len: 256\n  eval_ratio: 0.1\n\n"
            "training:\n  epochs: 3\n  micro_batch_size: 4\n  logging_steps: 1\n  save_steps: 20\n")


RUNS = {
    "lora-sft-demo": Run("lora-sft-demo", 60, "finished", 0),
    "story-lora": Run("story-lora", 80, "running", 1, done=10, by_board=True),
    "dora-r16": Run("dora-r16", 60, "finished", 2),
    "bad-data": Run("bad-data", 5, "failed", 3, adapter=False),
    "full-ft": Run("full-ft", 40, "stopped", 4, done=23, adapter=False),
}

ADAPTERS = {}  # name -> path loaded through /api/serve/v1/adapters
CHAT = {"base": None}

MODELS = [
    {"name": "qwen2-tiny", "path": f"{MODELS_DIR}/qwen2-tiny", "model_type": "qwen2", "vision": False},
    {"name": "qwen2-vl-tiny", "path": f"{MODELS_DIR}/qwen2-vl-tiny", "model_type": "qwen2_vl", "vision": True},
]

LORA_SCHEMA = {
    "type": "object",
    "properties": {
        "r": {"type": "integer", "default": 8, "minimum": 1, "maximum": 1024, "description": "rank of the update"},
        "lora_alpha": {"type": "number", "default": 16, "minimum": 0, "description": "scale alpha / r; usually 2 * r"},
        "lora_dropout": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 1, "description": "dropout on the LoRA input"},
        "target_modules": {"type": ["string", "array"], "items": {"type": "string"}, "default": "all-linear",
                           "description": "all-linear, or a list of module name suffixes"},
        "use_dora": {"type": "boolean", "default": False, "description": "weight-decomposed LoRA (DoRA)"},
        "init_lora_weights": {"enum": ["default", "gaussian", "pissa", "olora"], "default": "default", "description": "how A and B start"},
        "modules_to_save": {"type": ["array", "null"], "items": {"type": "string"}, "default": None, "description": "modules trained in full"},
        "rank_pattern": {"type": "object", "default": {}, "description": "per-module ranks: {\"q_proj\": 16}"},
    },
}

PLUGINS = [
    {"name": "lora", "kind": "adapter", "version": "0.3.0", "description": "LoRA, DoRA, rsLoRA, PiSSA (peft-compatible)", "library": "libferrotune_lora.so", "schema": LORA_SCHEMA},
    {"name": "ia3", "kind": "adapter", "version": "0.3.0", "description": "(IA)³ scaling vectors", "library": "libferrotune_ia3.so",
     "schema": {"type": "object", "properties": {"target_modules": {"type": "array", "items": {"type": "string"}, "default": ["k_proj", "v_proj", "down_proj"]},
                                                   "feedforward_modules": {"type": "array", "items": {"type": "string"}, "default": ["down_proj"]}}}},
    {"name": "prompt", "kind": "adapter", "version": "0.3.0", "description": "prompt tuning: virtual tokens", "library": "libferrotune_prompt.so", "schema": None},
    {"name": "sft", "kind": "objective", "version": "0.3.0", "description": "next-token cross-entropy on the labelled tokens", "library": "libferrotune_sft.so",
     "schema": {"type": "object", "properties": {"label_smoothing": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 1}}}},
    {"name": "dpo", "kind": "objective", "version": "0.3.0", "description": "direct preference optimisation", "library": "libferrotune_align.so",
     "schema": {"type": "object", "properties": {"beta": {"type": "number", "default": 0.1, "minimum": 0, "description": "strength of the KL penalty"},
                                                   "loss_type": {"enum": ["sigmoid", "hinge", "ipo"], "default": "sigmoid"}}, "required": ["beta"]}},
    {"name": "single", "kind": "memory", "version": "0.3.0", "description": "one device; AdamW", "library": "libferrotune_single.so", "schema": {"type": "object", "properties": {}}},
    {"name": "zero", "kind": "memory", "version": "0.3.0", "description": "ZeRO-style sharded optimizer state", "library": "libferrotune_dist.so",
     "schema": {"type": "object", "properties": {"stage": {"type": "integer", "enum": [1, 2, 3], "default": 2}, "offload": {"type": "boolean", "default": False}}}},
    {"name": "alpaca", "kind": "dataset", "version": "0.3.0", "description": "instruction / input / output rows", "library": "libferrotune_textdata.so",
     "schema": {"type": "object", "properties": {"system": {"type": "string", "description": "a system prompt for every row"}}}},
    {"name": "sharegpt", "kind": "dataset", "version": "0.3.0", "description": "conversations", "library": "libferrotune_textdata.so", "schema": None},
    {"name": "storyreasoning", "kind": "dataset", "version": "0.3.0", "description": "image sequences with a grounded story", "library": "libferrotune_vlmdata.so",
     "schema": {"type": "object", "properties": {"max_images": {"type": "integer", "default": 8, "minimum": 1, "maximum": 64, "description": "images kept per story"}}}},
    {"name": "length", "kind": "reward", "version": "0.3.0", "description": "rewards short answers", "library": "libferrotune_rewards.so", "schema": None},
]

HOST_SCHEMA = {
    "optimizer": {"type": "object", "properties": {
        "lr": {"type": "number", "default": 1e-4, "minimum": 0, "description": "peak learning rate"},
        "weight_decay": {"type": "number", "default": 0.0, "minimum": 0},
        "max_grad_norm": {"type": ["number", "null"], "default": 1.0, "description": "clip the gradient norm (null: no clipping)"},
        "betas": {"type": "array", "items": {"type": "number"}, "default": [0.9, 0.999]}}},
    "scheduler": {"type": "object", "properties": {
        "type": {"enum": ["constant", "linear", "cosine"], "default": "linear"},
        "warmup_ratio": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 1},
        "warmup_steps": {"type": "integer", "default": 0, "minimum": 0}}},
    "training": {"type": "object", "properties": {
        "epochs": {"type": "integer", "default": 1, "minimum": 1},
        "max_steps": {"type": ["integer", "null"], "minimum": 1, "description": "stop after this many steps"},
        "micro_batch_size": {"type": "integer", "default": 1, "minimum": 1},
        "gradient_accumulation_steps": {"type": "integer", "default": 1, "minimum": 1},
        "logging_steps": {"type": "integer", "default": 10, "minimum": 1},
        "save_steps": {"type": ["integer", "null"], "minimum": 1},
        "gradient_checkpointing": {"type": "boolean", "default": False}}},
    "data": {"type": "object", "properties": {
        "cutoff_len": {"type": "integer", "default": 1024, "minimum": 1},
        "eval_ratio": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 0.9},
        "train_on_prompt": {"type": "boolean", "default": False},
        "packing": {"type": "boolean", "default": False},
        "on_bad_sample": {"enum": ["stop", "skip"], "default": "stop"},
        "image_max_pixels": {"type": ["integer", "null"], "minimum": 1}}},
    "top": {"type": "object", "properties": {
        "device": {"type": "string", "default": "cpu", "description": "cpu, cuda or cuda:N", "examples": ["cpu", "cuda"]},
        "dtype": {"type": "string", "default": "f32", "enum": ["f32", "bf16"], "description": "compute dtype of the frozen base"},
        "seed": {"type": "integer", "default": 42, "minimum": 0, "description": "seed of init, shuffling and dropout"},
        "finetuning": {"type": "string", "default": "adapter", "enum": ["adapter", "full", "freeze"], "description": "what trains"}}},
}

DATASETS = {
    "files": [
        {"name": "alpaca_demo.json", "path": f"{DATA_DIR}/alpaca_demo.json", "plugin_guess": "alpaca"},
        {"name": "sharegpt_chats.jsonl", "path": f"{DATA_DIR}/sharegpt_chats.jsonl", "plugin_guess": "sharegpt"},
        {"name": "storyreasoning-sample", "path": f"{DATA_DIR}/storyreasoning-sample", "plugin_guess": "storyreasoning"},
        {"name": "notes.txt", "path": f"{DATA_DIR}/notes.txt", "plugin_guess": None},
    ],
    "registries": [
        {"dataset_dir": f"{DATA_DIR}/llamafactory", "datasets": [
            {"name": "identity", "formatting": "alpaca", "ranking": False, "file_name": "identity.json"},
            {"name": "alpaca_en_demo", "formatting": "alpaca", "ranking": False, "file_name": "alpaca_en_demo.json"},
            {"name": "glaive_toolcall_en_demo", "formatting": "sharegpt", "ranking": False, "file_name": "glaive_toolcall_en_demo.json"},
            {"name": "dpo_en_demo", "formatting": "sharegpt", "ranking": True, "file_name": "dpo_en_demo.json"},
        ]},
    ],
}


def png(width, height, seed):
    """A gradient PNG (RGB, no compression tricks) made with zlib alone."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            row += bytes(((x * 255 // max(1, width - 1) + seed * 60) % 256, (y * 255 // max(1, height - 1)) % 256, (seed * 90 + 80) % 256))
        rows.append(bytes(row))
    raw = b"".join(rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def yaml_scalar(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    s = str(v)
    return json.dumps(s) if (s == "" or re.search(r"[:#\[\]{},&*!|>'\"%@`]", s) or s != s.strip()) else s


def draft_yaml(body):
    name = body.get("name") or "run"
    sec = body.get("sections") or {}
    out = [f"# drafted by ferrotune board (mock) for run {name}", f"model: {body.get('model')}", f"output_dir: {RUNS_DIR}/{name}",
           f"device: {body.get('device', 'cpu')}", f"dtype: {body.get('dtype', 'f32')}"]
    if body.get("finetuning") and body.get("finetuning") != "adapter":
        out.append(f"finetuning: {body['finetuning']}")
    for s in ["adapter", "objective", "memory", "data", "optimizer", "scheduler", "training"]:
        v = sec.get(s)
        if not v or (s == "adapter" and body.get("finetuning") in ("full", "freeze")):
            continue
        out.append("")
        out.append(f"{s}:")
        for k, x in v.items():
            if x is None or x == "" or x == [] or x == {}:
                continue
            if isinstance(x, dict):
                out.append(f"  {k}:")
                for k2, x2 in x.items():
                    out.append(f"    {k2}: {yaml_scalar(x2)}")
            else:
                out.append(f"  {k}: {yaml_scalar(x)}")
    return "\n".join(out) + "\n"


def fake_preview(n):
    samples = []
    for i in range(n):
        # The real board sends thumbnails as data URLs; /api/file URLs are allowed too: both here.
        images = [{"url": f"/api/file?path={DATA_DIR}/storyreasoning-sample/images/{i}_{j}.png" if j == 0 else data_url(png(224 - 32 * j, 160, i + j)),
                   "error": None, "width": 224 - 32 * j, "height": 160, "resized": [224 - 32 * j, 160] if j == 0 else [168, 112], "tokens": 48 - 8 * j,
                   "source": f"{DATA_DIR}/storyreasoning-sample/images/{i}_{j}.png"} for j in range(2)] if i % 2 == 0 else []
        videos = [{"frames": [{"url": data_url(png(112, 84, i + k)), "width": 112, "height": 84} for k in range(6)], "error": None,
                   "width": 640, "height": 480, "frames_kept": 6, "frames_total": 150, "fps": 2.0, "tokens": 96,
                   "describe": "6 of 150 frames at 2 fps"}] if i == 1 else []
        prompt = f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        if images:
            prompt += "<|vision_start|><|image_pad|>×48<|vision_end|><|vision_start|><|image_pad|>×40<|vision_end|>"
        prompt += f"Tell story number {i} about these pictures.\n   (indented line kept)<|im_end|>\n<|im_start|>assistant\n"
        answer = f"Once upon a time, in picture {i}, a fox met a heron.\nThey shared a meal.<|im_end|>"
        samples.append({"index": i * 7, "tokens": 120 + 88 * bool(images) + i, "labelled_tokens": 24 + i, "truncated_from": 300 if i == 2 else None,
                        "segments": [{"text": prompt, "labelled": False}, {"text": answer, "labelled": True}, {"text": "\n", "labelled": False}],
                        "images": images, "videos": videos})
    return {"total": 43, "samples": samples, "layout": "sft", "refused": [{"index": 5, "error": "row 5: no assistant turn: nothing to learn"}]}


def data_url(data):
    import base64
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "board-mock/1"

    def log_message(self, fmt, *args):  # quieter: one line per request
        print("%s %s" % (self.command, self.path[:120]), flush=True)

    # -- plumbing ---------------------------------------------------------------------------
    def token_ok(self, q):
        t = self.server.token
        if q.get("token", [None])[0] == t:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {t}":
            return True
        c = cookies.SimpleCookie(self.headers.get("Cookie", ""))
        return "ferrotune_board" in c and c["ferrotune_board"].value == t

    def send(self, code, body, ctype="application/json", extra=None):
        data = body if isinstance(body, bytes) else (json.dumps(body) if ctype == "application/json" else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def error(self, code, message):
        self.send(code, {"error": {"message": message}})

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"request body: not JSON ({e})")

    def sse_start(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def sse(self, event, data):
        self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    # -- routes -----------------------------------------------------------------------------
    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")

    def route(self, method):
        u = urlparse(self.path)
        q = parse_qs(u.query)
        p = u.path
        if not self.token_ok(q):
            return self.error(401, "missing or wrong token: open the address `ferrotune board` printed (it ends in ?token=…)")
        try:
            if method == "GET" and p == "/":
                with open(os.path.join(ASSETS, "index.html"), "rb") as f:
                    return self.send(200, f.read(), "text/html; charset=utf-8",
                                     {"Set-Cookie": f"ferrotune_board={self.server.token}; HttpOnly; SameSite=Strict; Path=/"})
            if method == "GET" and p in ("/assets/app.js", "/assets/style.css"):
                name = p.rsplit("/", 1)[1]
                with open(os.path.join(ASSETS, name), "rb") as f:
                    return self.send(200, f.read(), "text/javascript; charset=utf-8" if name.endswith(".js") else "text/css; charset=utf-8")
            if not p.startswith("/api/"):
                return self.error(404, f"no page {p}")
            if self.server.upstream:
                return self.forward(method)
            return self.api(method, p[5:], q)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return None
        except ValueError as e:
            return self.error(400, str(e))

    def api(self, method, p, q):
        m = re.fullmatch(r"runs/([^/]+)(?:/(metrics|log|stop|resume))?", p)
        if m:
            name, what = unquote(m.group(1)), m.group(2)
            with LOCK:
                run = RUNS.get(name)
            if run is None:
                return self.error(404, f"no run {name} under {RUNS_DIR}")
            if method == "GET" and what is None:
                return self.send(200, run.details())
            if method == "GET" and what == "metrics":
                return self.stream(run, "metrics")
            if method == "GET" and what == "log":
                return self.stream(run, "log")
            if method == "POST" and what == "stop":
                with LOCK:
                    if run.state() != "running":
                        return self.error(409, f"run {name} is {run.state()}, not running")
                    run.stopped_at = run.steps_written()
                return self.send(200, {"state": run.state()})
            if method == "POST" and what == "resume":
                with LOCK:
                    if run.state() == "running":
                        return self.error(409, f"run {name} is already running")
                    if run.state() == "failed":
                        return self.error(409, f"run {name} failed before its first checkpoint: nothing to resume from {RUNS_DIR}/{name}")
                    run.done = (run.steps_written() // 20) * 20  # back to the last checkpoint, as the trainer does
                    run.total = max(run.total, run.steps_written() + 20)
                    run.stopped_at = None
                    run.final_state = "running"
                    run.started = time.time()
                return self.send(200, {"state": run.state()})
            return self.error(405, f"{method} /api/{p} is not a route")

        if method == "DELETE":
            m = re.fullmatch(r"serve/v1/adapters/([^/]+)", p)
            if m is None:
                return self.error(404, f"no route DELETE /api/{p}")
            name = unquote(m.group(1))
            if ADAPTERS.pop(name, None) is None:
                return self.error(404, f"no adapter named `{name}` is loaded")
            return self.send(200, {"name": name, "unloaded": True})

        if method == "GET":
            if p == "info":
                return self.send(200, {"version": "0.3.0-mock", "runs_dir": RUNS_DIR, "models_dir": MODELS_DIR, "data_dir": DATA_DIR})
            if p == "runs":
                with LOCK:
                    runs = [r.summary() for r in RUNS.values()]
                runs.sort(key=lambda r: -r["modified"])
                return self.send(200, {"runs": runs})
            if p == "plugins":
                return self.send(200, {"plugins": PLUGINS})
            if p == "host_schema":
                return self.send(200, {"sections": HOST_SCHEMA})
            if p == "models":
                return self.send(200, {"models": MODELS})
            if p == "datasets":
                return self.send(200, DATASETS)
            if p == "file":
                path = q.get("path", [""])[0]
                if not any(path.startswith(d + "/") for d in (RUNS_DIR, MODELS_DIR, DATA_DIR)) or ".." in path:
                    return self.error(403, f"{path}: outside the board's folders")
                m2 = re.search(r"(\d+)_(?:f)?(\d+)\.png$", path)
                seed = int(m2.group(1)) + int(m2.group(2)) if m2 else 0
                w, h = (112, 84) if "/clips/" in path else (224 - 32 * (int(m2.group(2)) if m2 else 0), 160)
                return self.send(200, png(w, h, seed), "image/png")
            return self.error(404, f"no route GET /api/{p}")

        body = self.body()
        if p == "draft":
            unknown = set(body) - {"name", "model", "device", "dtype", "finetuning", "sections"}
            if unknown:
                return self.error(400, f"unknown field `{sorted(unknown)[0]}`")
            bad = set(body.get("sections") or {}) - {"adapter", "quantization", "objective", "memory", "optimizer", "scheduler", "data", "training", "vision", "rewards"}
            if bad:
                return self.error(400, f"sections.{sorted(bad)[0]}: not a section of a run config")
            if body.get("finetuning") not in (None, "", "adapter", "full", "freeze"):
                return self.error(400, f"finetuning: unknown variant `{body['finetuning']}`, expected one of `adapter`, `full`, `freeze`")
            if not body.get("name"):
                return self.error(400, "name: missing")
            if not body.get("model"):
                return self.error(400, "model: missing")
            ad = (body.get("sections") or {}).get("adapter") or {}
            if isinstance(ad.get("r"), int) and ad["r"] > 1024:
                return self.error(400, f"adapter.r: {ad['r']} is above the maximum 1024")
            return self.send(200, {"yaml": draft_yaml(body)})
        if p == "check":
            y = body.get("yaml") or ""
            if "model:" not in y:
                return self.send(200, {"ok": False, "report": None, "error": "config: missing key `model`"})
            if "bad" in y:
                return self.send(200, {"ok": False, "error": None, "report": {
                    "path": f"{DATA_DIR}/alpaca_bad.json", "rows": 12, "usable": 10, "errors": 2, "skipped": 0, "warnings": 1, "images": 0,
                    "image_tokens": 0, "videos": 0, "video_tokens": 0, "label_tokens": 610, "max_tokens": 300, "notes": [
                        {"row": 3, "level": "error", "message": "no assistant turn: nothing to learn"},
                        {"row": 7, "level": "error", "message": "`output` is not a string"},
                        {"row": 9, "level": "warning", "message": "truncated to cutoff_len 256 (had 300 tokens)"}]}})
            return self.send(200, {"ok": True, "error": None, "report": {
                "path": f"{DATA_DIR}/alpaca_demo.json", "rows": 52, "usable": 52, "errors": 0, "skipped": 0, "warnings": 1, "images": 0,
                "image_tokens": 0, "videos": 0, "video_tokens": 0, "label_tokens": 2817, "max_tokens": 188,
                "notes": [{"row": 14, "level": "warning", "message": "the labels do not end with an end-of-turn token"}]}})
        if p == "runs":
            name = body.get("name") or ""
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                return self.error(400, f"name {name!r}: letters, digits, _ . - only")
            if not (body.get("yaml") or "").strip():
                return self.error(400, "yaml: empty")
            n = body.get("nproc", 1)
            if not isinstance(n, int) or not 1 <= n <= 8:
                return self.error(400, f"nproc: {n} is not between 1 and 8")
            with LOCK:
                if name in RUNS:
                    return self.error(409, f"run {name} exists: {RUNS_DIR}/{name}")
                RUNS[name] = Run(name, 40, "running", len(RUNS) % 5, done=0, config=body["yaml"], by_board=True)
            return self.send(200, {"name": name, "state": "running"})
        if p == "preview":
            n = body.get("n", 3)
            if not body.get("run") and not (body.get("yaml") or "").strip():
                return self.error(400, "preview: give `run` or `yaml`")
            if body.get("run") and body["run"] not in RUNS:
                return self.error(404, f"no run {body['run']}")
            if "bad" in (body.get("yaml") or ""):
                return self.error(400, f"data.path: {DATA_DIR}/bad.json: no such file")
            return self.send(200, fake_preview(max(1, min(int(n), 20))))
        if p == "chat/start":
            model = body.get("model")
            m = next((x for x in MODELS if x["path"] == model), None)
            if m is None:
                return self.error(400, f"model {model}: not a model folder under {MODELS_DIR}")
            if CHAT["base"] != m["name"]:  # a switch loads the new base without adapters
                time.sleep(0.6)
                CHAT["base"] = m["name"]
                ADAPTERS.clear()
            return self.send(200, {"base": m["name"], "vision": m["vision"], "adapters": sorted(ADAPTERS)})
        if p == "serve/v1/adapters":
            name, path = body.get("name"), body.get("path") or ""
            if not path.startswith(RUNS_DIR + "/"):
                return self.error(403, f"{path}: adapters load only from under {RUNS_DIR}")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
                return self.error(400, f"adapter name {name!r}: letters, digits, _ . - only")
            if name in ADAPTERS:
                return self.error(400, f"an adapter named `{name}` is already loaded; unload it first")
            ADAPTERS[name] = path
            return self.send(200, {"name": name, "path": path})
        if p == "serve/v1/unload_lora_adapter":
            name = body.get("lora_name")
            if ADAPTERS.pop(name, None) is None:
                return self.error(404, f"no adapter named `{name}` is loaded")
            return self.send(200, {"name": name, "unloaded": True})
        if p == "serve/v1/chat/completions":
            model = body.get("model")
            if CHAT["base"] is None:
                return self.error(400, "no model loaded: POST /api/chat/start first")
            if model != CHAT["base"] and model not in ADAPTERS:
                return self.error(404, f"model {model}: not loaded (base {CHAT['base']}, adapters {sorted(ADAPTERS)})")
            msgs = body.get("messages") or []
            last = msgs[-1]["content"] if msgs else ""
            has_image = isinstance(last, list) and any(part.get("type") == "image_url" for part in last)
            text = " ".join(part.get("text", "") for part in last if part.get("type") == "text") if isinstance(last, list) else last
            if "fail" in text:
                return self.error(400, "messages[0].content: the word `fail` asks the mock for an error")
            time.sleep(0.4 if model == CHAT["base"] else 0.8)
            turn = sum(1 for x in msgs if x["role"] == "user")
            if model == CHAT["base"]:
                reply = f"(turn {turn}) You said: {text}" + (" — and I see an image." if has_image else "")
            else:
                reply = f"(turn {turn}, adapter {model}) Once upon a time, {text.lower()} rhymed with a fox and a heron."
            reply = " ".join(reply.split()[: max(1, int(body.get('max_tokens', 64)))])
            return self.send(200, {"id": "chatcmpl-mock", "object": "chat.completion", "model": model,
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]})
        return self.error(404, f"no route POST /api/{p}")

    def forward(self, method):
        """Passes the request to the real board (--upstream), streaming the answer through."""
        import urllib.error
        import urllib.request
        u = urlparse(self.path)
        query = "&".join(x for x in u.query.split("&") if x and not x.startswith("token="))
        url = self.server.upstream + u.path + ("?" + query if query else "")
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method != "GET" else None
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.server.upstream_token}",
            "Content-Type": self.headers.get("Content-Type", "application/json")})
        try:
            resp = urllib.request.urlopen(req, timeout=3600)
        except urllib.error.HTTPError as e:
            resp = e
        except (OSError, http.client.HTTPException) as e:
            return self.error(502, f"the upstream board did not answer {method} {u.path}: {e}")
        ctype = resp.headers.get("Content-Type", "application/octet-stream")
        if ctype.startswith("text/event-stream"):
            self.sse_start()
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
                if not chunk:
                    return None
                self.wfile.write(chunk)
                self.wfile.flush()
        return self.send(resp.status if hasattr(resp, "status") else resp.code, resp.read(), ctype)

    def stream(self, run, kind):
        """SSE: every line so far, then new lines every TICK while running; state events on change."""
        self.sse_start()
        sent = 0
        last_state = None
        idle = 0
        while True:
            with LOCK:
                state = run.state()
                items = run.lines() if kind == "metrics" else run.log_chunks()
            if len(items) < sent:  # the file shrank (a resumed run): start over
                self.sse("reset", {})
                sent = 0
            if last_state is None:
                self.sse("state", {"state": state})  # the state on connect, before the lines
            for item in items[sent:]:
                if kind == "metrics":
                    self.sse("metric", item)
                else:
                    self.sse("log", {"text": item})
                sent += 1
            if last_state is not None and state != last_state:
                self.sse("state", {"state": state})  # a change, after the lines that led to it
            last_state = state
            if self.server.close_streams and state != "running":
                return  # --close-streams: end like a server that closes finished streams
            time.sleep(TICK / 3)
            idle += 1
            if idle % 45 == 0:
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=7861)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--token", default="t")
    ap.add_argument("--upstream", help="a running `ferrotune board` (http://127.0.0.1:PORT) to pass /api requests to")
    ap.add_argument("--upstream-token", default="", help="its token")
    ap.add_argument("--close-streams", action="store_true",
                    help="end each SSE stream once its run is not running (the page must reconnect without duplicates)")
    a = ap.parse_args()
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    srv.daemon_threads = True
    srv.token = a.token
    srv.close_streams = a.close_streams
    srv.upstream = (a.upstream or "").rstrip("/")
    srv.upstream_token = a.upstream_token
    print(f"board mock: open http://{a.host}:{a.port}/?token={a.token}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
