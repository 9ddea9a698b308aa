"""Scores token sequences with a reward model as transformers + peft load it.

usage: reward_model_reference.py BASE ADAPTER MERGED IDS_JSON OUT_JSON

BASE is a causal-LM directory, ADAPTER the sequence-classification (SEQ_CLS) PEFT directory
ferrotune's `reward_model` objective saved, MERGED the directory `ferrotune merge` wrote from
them (a …ForSequenceClassification model). IDS_JSON holds a list of token-id lists (no id 0,
the pad). Writes {"adapter": [...], "merged": [...], "architectures": [...]}: each row's score
read at its last token, as AutoModelForSequenceClassification reads it.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification


def scores(model, rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].double().tolist()


def main():
    base, adapter, merged, ids_path, out = sys.argv[1:6]
    rows = json.load(open(ids_path))
    assert all(0 not in r for r in rows), "id 0 is the pad"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = 0
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    result = {"adapter": scores(peft_model, rows)}
    m = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    m.config.pad_token_id = 0
    result["merged"] = scores(m, rows)
    result["architectures"] = AutoConfig.from_pretrained(merged).architectures
    json.dump(result, open(out, "w"))


if __name__ == "__main__":
    main()
