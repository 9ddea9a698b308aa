"""A word-level tokenizer of exactly N tokens (`t0` … `t{N-2}` and `<|endoftext|>`), for
benchmark models whose ids are synthetic: `python scripts/wordlevel-tokenizer.py OUT N [--chat]`.
With --chat the tokenizer gets a plain chat template, so that text data sets can be used as
well (every word is then `<|endoftext|>`: only lengths matter, as in the memory benchmark)."""
import json, os, sys
from tokenizers import Tokenizer, models, pre_tokenizers
out, n, chat = sys.argv[1], int(sys.argv[2]), "--chat" in sys.argv[3:]
vocab = {f"t{i}": i for i in range(n - 1)} | {"<|endoftext|>": n - 1}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.add_special_tokens(["<|endoftext|>"])
os.makedirs(out, exist_ok=True)
tok.save(os.path.join(out, "tokenizer.json"))
config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None}
if chat:
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
json.dump(config, open(os.path.join(out, "tokenizer_config.json"), "w"))
