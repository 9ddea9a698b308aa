"""A word-level tokenizer of exactly N tokens (`t0` … `t{N-2}` and `<|endoftext|>`), for
benchmark models whose ids are synthetic: `python scripts/wordlevel-tokenizer.py OUT N [--chat]`.
With --chat it reads text as well: every printable ASCII character and the newline is a
token of its own (the first ids; `t…` fill the rest), anything else is `<unk>`, and the
tokenizer gets a plain chat template, so that text data sets train on real ids (the memory
benchmark's launched runs)."""
import json, os, string, sys
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
out, n, chat = sys.argv[1], int(sys.argv[2]), "--chat" in sys.argv[3:]
words = (list(string.printable[:95]) + ["\n", "<unk>"]) if chat else []
vocab = {w: i for i, w in enumerate(words)}
vocab |= {f"t{i}": i for i in range(len(words), n - 1)} | {"<|endoftext|>": n - 1}
assert len(vocab) == n, (len(vocab), n)
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if chat else "<|endoftext|>"))
tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated") if chat else pre_tokenizers.Whitespace()
tok.add_special_tokens(["<|endoftext|>"])
os.makedirs(out, exist_ok=True)
tok.save(os.path.join(out, "tokenizer.json"))
config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None}
if chat:
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
json.dump(config, open(os.path.join(out, "tokenizer_config.json"), "w"))
