"""Function-calling conversations rendered by transformers' `apply_chat_template(messages,
tools=...)` on Qwen2.5's chat template, for tests/tool_calls.rs.

    toolcall_reference.py QWEN2_TOKENIZER_DIR OUT_DIR ROWS_JSON

OUT_DIR/qwen25-tokenizer/  the Qwen2 tokenizer (tokenizer.json copied) whose
                           tokenizer_config.json carries Qwen2.5-Instruct's chat template (TRL's
                           `chat_templates/qwen2_5.jinja`, as Qwen/Qwen2.5-*-Instruct ship it):
                           Qwen2 with tools
stdout                     for each row of ROWS_JSON (a JSON list of LLaMA-Factory sharegpt rows:
                           `conversations` of {"from", "value"} turns, optional `system` and
                           `tools` (JSON text or JSON)), {"text", "input_ids", "labels"}

The rows are converted here with LLaMA-Factory's conventions, independently of ferrotune: a
leading `system` turn or the `system` column is the system prompt; human -> user, gpt ->
assistant, observation -> tool, and function_call -> the assistant message transformers
documents for tool use, `{"role": "assistant", "content": "", "tool_calls": [{"type":
"function", "function": {"name", "arguments"}}]}`, one entry per call of the turn's JSON (a
call or a list of calls). `tools` parsed from JSON text; an empty list or blank text is no
tools. Labels: every assistant turn (tool calls included), from the end of
`messages[:i]` rendered with the generation prompt through the turn's `<|im_end|>`; all other
tokens -100.
"""
import importlib.util
import json
import os
import pathlib
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import logging  # noqa: E402

logging.set_verbosity_error()

IGNORE = -100
ROLES = {"human": "user", "gpt": "assistant", "observation": "tool"}


def tool_calls(value):
    calls = json.loads(value)
    if isinstance(calls, dict):
        calls = [calls]
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def messages_and_tools(row):
    turns = row["conversations"]
    system = row.get("system")
    if turns and turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    msgs = [{"role": "system", "content": system}] if system else []
    for t in turns:
        if t["from"] == "function_call":
            msgs.append({"role": "assistant", "content": "", "tool_calls": tool_calls(t["value"])})
        else:
            msgs.append({"role": ROLES[t["from"]], "content": t["value"]})
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    if isinstance(tools, dict):
        tools = [tools]
    return msgs, (tools or None)


def ids_of(tok, msgs, tools, generation_prompt):
    return list(tok.apply_chat_template(msgs, tools=tools, tokenize=True,
                                        add_generation_prompt=generation_prompt, return_dict=False))


def encode(tok, row):
    msgs, tools = messages_and_tools(row)
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    full = ids_of(tok, msgs, tools, False)
    assert full == tok(text, add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    labels = [IGNORE] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = ids_of(tok, msgs[:i], tools, True)
        assert full[: len(prefix)] == prefix, f"turn {i}: not a prefix of the conversation"
        j = len(prefix)
        while full[j] != im_end:
            labels[j] = full[j]
            j += 1
        labels[j] = full[j]
    return {"text": text, "input_ids": full, "labels": labels}


def write_tokenizer(qwen2_dir, out):
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(qwen2_dir / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((qwen2_dir / "tokenizer_config.json").read_text())
    # Found without importing trl (its import costs seconds).
    trl_dir = pathlib.Path(importlib.util.find_spec("trl").origin).parent
    template = trl_dir / "chat_templates" / "qwen2_5.jinja"
    config["chat_template"] = template.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(str(out))


def main():
    qwen2_dir, out_dir, rows_file = map(pathlib.Path, sys.argv[1:4])
    tok = write_tokenizer(qwen2_dir, out_dir / "qwen25-tokenizer")
    rows = json.loads(rows_file.read_text(encoding="utf-8"))
    json.dump([encode(tok, row) for row in rows], sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
