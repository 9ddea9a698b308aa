"""Reference token ids and labels for tests/data_encoding.rs, computed by transformers.

    python tests/python/data_reference.py TOKENIZER_DIR CASES_JSON

CASES_JSON is a list of {"name", "format": "alpaca"|"sharegpt", "file", "cutoff_len",
"mask_history", "train_on_prompt"}. For every row of every file this script builds the
conversation itself (LLaMA-Factory's conventions, default column names: alpaca's
instruction + "\\n" + input after the history pairs and system; sharegpt's human/gpt turns,
observation -> tool, function_call -> assistant, a leading system turn or the system
column), renders it with AutoTokenizer.apply_chat_template and labels each trained assistant
turn: the ids of `messages[:i]` with the generation prompt must be a prefix of the whole
conversation's ids, and the labels run from there through the first `<|im_end|>` (or eos).
`return_assistant_tokens_mask` needs `{% generation %}` blocks, which Qwen2's template lacks,
hence this explicit prefix rendering. Truncation keeps the first `cutoff_len` tokens.

Prints {name: [{"input_ids", "labels", "truncated_from"} | {"error": "no labels"}]}.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import logging  # noqa: E402

logging.set_verbosity_error()

IGNORE = -100


def read_rows(path):
    text = open(path, encoding="utf-8").read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def alpaca_messages(row):
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": row["system"]})
    for user, assistant in row.get("history") or []:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    query = "\n".join(part for part in (row.get("instruction"), row.get("input")) if part)
    msgs.append({"role": "user", "content": query})
    msgs.append({"role": "assistant", "content": row["output"]})
    return msgs


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant"}


def sharegpt_messages(row):
    turns = row["conversations"]
    system = row.get("system")
    if turns and turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def ids_of(tok, msgs, generation_prompt):
    return list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False))


def encode(tok, msgs, case):
    full = ids_of(tok, msgs, False)
    end_ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    if case["train_on_prompt"]:
        labels = list(full)
    else:
        labels = [IGNORE] * len(full)
        assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if case["mask_history"]:
            assistants = assistants[-1:]
        for i in assistants:
            prefix = ids_of(tok, msgs[:i], True)
            assert full[: len(prefix)] == prefix, f"turn {i}: prefix is not a prefix of the conversation"
            j = len(prefix)
            while full[j] not in end_ids:
                labels[j] = full[j]
                j += 1
            labels[j] = full[j]
    truncated_from = None
    if len(full) > case["cutoff_len"]:
        truncated_from = len(full)
        full, labels = full[: case["cutoff_len"]], labels[: case["cutoff_len"]]
    if all(label == IGNORE for label in labels):
        return {"error": "no labels"}
    return {"input_ids": full, "labels": labels, "truncated_from": truncated_from}


def main():
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    cases = json.load(open(sys.argv[2], encoding="utf-8"))
    out = {}
    for case in cases:
        convert = alpaca_messages if case["format"] == "alpaca" else sharegpt_messages
        out[case["name"]] = [encode(tok, convert(row), case) for row in read_rows(case["file"])]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
