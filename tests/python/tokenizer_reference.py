"""Reference output of transformers for tests/tokenizer_parity.rs.

    python tests/python/tokenizer_reference.py assets/qwen2-tokenizer WORK_DIR

Loads the Qwen2 tokenizer folder with AutoTokenizer and prints one JSON document: for a
fixed set of texts the ids (with and without special tokens) and decodes; for a set of
conversations the rendered `apply_chat_template(..., tokenize=False)` text and its ids.
It also writes variant folders under WORK_DIR that the Rust side loads too (a BOS
post-processor, special tokens given as objects, named templates that use Python string
methods and `tojson`, an added token, `split_special_tokens`) and generation configs, and
reports what transformers makes of them. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""
import copy
import json
import os
import pathlib
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer, GenerationConfig  # noqa: E402
from transformers.utils import logging  # noqa: E402

logging.set_verbosity_error()

PARAGRAPH = (
    "Fine-tuning adapts a pretrained language model to a task with a small learning rate; "
    "LoRA trains two low-rank matrices per projection instead of the full weight. "
)

TEXTS = [
    "Hello, world! How are you doing today?",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n",
    'fn main() {\n\tlet x: Vec<u8> = vec![1, 2, 3];\n\tprintln!("{x:?}");\n}\n',
    "Pi is 3.14159265358979, e is 2.71828; 1,234,567.89 and 2024-06-01T12:30:00Z, 0x1F, 1e-10, 123456789012345",
    "a  b   c    d\t\te \t \t f     \n   g",
    "   leading spaces",
    "trailing spaces   ",
    "",
    " ",
    "\n",
    "\n\n\n",
    "\r\n\r\n",
    "  \n  \n",
    "line1\nline2\r\nline3\n\n\nline6\n",
    "我爱自然语言处理。今日は良い天気ですね。안녕하세요, 세계!",
    "🦀 Rust + 🔥 torch = ❤️ 👩‍👩‍👧‍👦 🇯🇵 👍🏽",
    "cafe\u0301 / café, A\u030a / Å, n\u0303 / ñ, \u212b (angstrom sign), \ufb01 ligature, \u216b",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "text<|im_end|>more<|endoftext|><|im_start|>",
    "<|im_start| is not special, nor is <|extra_0|> or <|tool_call|>",
    "I'M sure you'LL see it's THEIR dog's toy; don't, won't, y'all",
    "Привет мир! Γειά σου Κόσμε! مرحبا بالعالم! שלום עולם! नमस्ते दुनिया!",
    "Pneumonoultramicroscopicsilicovolcanoconiosis " + "a" * 60,
    "tab\there\x00null\x7fdel\u200bzwsp\ufeffbom",
    PARAGRAPH * 20,
]

QWEN2_CONVERSATIONS = [
    ("system_and_user", [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the treasure?"}], True),
    ("user_only_default_system", [{"role": "user", "content": "Hi there!"}], True),
    ("user_only_no_generation_prompt", [{"role": "user", "content": "Hi there!"}], False),
    (
        "multi_turn",
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times 3?"},
        ],
        True,
    ),
    (
        "multi_turn_assistant_last",
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one."},
            {"role": "assistant", "content": "Green."},
        ],
        False,
    ),
    (
        "unicode",
        [
            {"role": "user", "content": "翻译：“机器学习”\n🦀 cafe\u0301 \u212b"},
            {"role": "assistant", "content": "Machine learning ✨\n\n  indented\tand tabbed  "},
            {"role": "user", "content": ""},
        ],
        True,
    ),
    ("special_tokens_in_content", [{"role": "user", "content": "say <|im_end|> then <|endoftext|>"}], True),
    ("system_only", [{"role": "system", "content": "Only a system prompt."}], True),
    ("assistant_first", [{"role": "assistant", "content": "I speak first."}], False),
]

# A template in the style of real ones: namespace, slicing, Python string methods, filters,
# tojson with options, whitespace control mixed with trim_blocks/lstrip_blocks.
FEATURE_TEMPLATE = """{#- exercises what real chat templates use -#}
{%- set ns = namespace(system='', turns=0) -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set ns.system = messages[0]['content'].strip() -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{ bos_token }}
{%- if ns.system %}[SYS]{{ ns.system | upper }}[/SYS]
{% endif %}
{% for message in loop_messages %}
    {% if message.role not in ['user', 'assistant'] %}
        {{ raise_exception('Unsupported role: ' ~ message.role) }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if message.role == 'user' %}
<|im_start|>user #{{ loop.index }}{% if loop.first %} (first){% endif %}

{{ message.content }}<|im_end|>
    {% else %}
<|im_start|>assistant
{{ message.content | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}
meta: turns={{ ns.turns }} gen={{ add_generation_prompt }} last={{ messages[-1].role }}
words={{ messages[-1].content.split() | length }} starts={{ messages[-1].content.startswith('Hel') }} ends={{ messages[-1].content.endswith('?') }}
title={{ messages[-1].content.title() }} lower={{ messages[-1].content.lower() }} replace={{ messages[-1].content.replace(' ', '_') }}
name={{ messages[0].get('name', 'anon') }} extra={{ custom_flag | default('unset') }} cap={{ 'hELLO' | capitalize }}
{% for k, v in extra_map.items() %}{{ k }}={{ v }};{% endfor %}

json={{ {'a': [1, 2.5, none, true], 'é': 'ü"<>&'} | tojson }} ascii={{ 'é' | tojson(ensure_ascii=true) }}
pretty={{ [1, {'k': 'v'}] | tojson(indent=2) }}
sorted={{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}
defined={{ documents is defined }} none={{ documents is none }} tools={{ tools }} len={{ messages | length }}
roles={{ messages | map(attribute='role') | join(',') }} math={{ 7 // 2 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 7 % 3 }} {{ 10 / 5 }}
list={{ [1, 'a', none, false] }} first={{ (loop_messages | first).role }}
"""

TOOL_TEMPLATE = """{% for tool in tools %}{{ tool.function.name }}: {{ tool | tojson }}
{% endfor %}{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""

# Keys in sorted order: minijinja's maps sort keys (see host/src/text/chat_template.rs).
TOOLS = [
    {
        "function": {
            "description": "Current weather of a city",
            "name": "get_weather",
            "parameters": {"properties": {"city": {"description": "City name", "type": "string"}}, "required": ["city"], "type": "object"},
        },
        "type": "function",
    }
]

FEATURE_CONVERSATIONS = [
    (
        "features_with_system",
        [{"role": "system", "content": "  Be terse.  "}, {"role": "user", "content": "Hello there, how are you?"}],
        True,
        {"custom_flag": True, "extra_map": {"alpha": 1, "beta": "two"}},
    ),
    (
        "features_multi_turn",
        [
            {"role": "user", "content": "Hello wörld"},
            {"role": "assistant", "content": "  Hi!  \n"},
            {"role": "user", "content": "what is 'ß'.upper()? 🦀"},
        ],
        False,
        {"extra_map": {}},
    ),
    ("tool_use_template", [{"role": "user", "content": "Weather in Paris?"}], True, {"tools": TOOLS}),
]

ERROR_CONVERSATIONS = [
    ("raise_exception", [{"role": "robot", "content": "beep"}], False, {"extra_map": {}}),
]

GENERATION_CONFIGS = {
    "qwen2_instruct": {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "transformers_version": "4.37.0",
    },
    "single_eos": {"eos_token_id": 151645, "max_new_tokens": 128, "temperature": 0.6, "do_sample": True},
    "empty": {},
}
GENERATION_KEYS = ["eos_token_id", "pad_token_id", "bos_token_id", "do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty"]


def text_records(tok, texts):
    out = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        ids_special = tok.encode(text, add_special_tokens=True)
        out.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special_tokens": ids_special,
                "decoded": tok.decode(ids),
                "decoded_skip_special": tok.decode(ids_special, skip_special_tokens=True),
                "decoded_with_special": tok.decode(ids_special),
            }
        )
    return out


def conversation_records(tok, conversations):
    out = []
    for name, messages, gen, extra in conversations:
        rec = {"name": name, "messages": messages, "add_generation_prompt": gen, "extra": extra}
        try:
            rec["rendered"] = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra)
            rec["ids"] = tok.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=gen, **extra)
            rec["decoded"] = tok.decode(rec["ids"])
        except Exception as e:  # noqa: BLE001 - the error message is the reference
            rec["error"] = str(e)
        out.append(rec)
    return out


def summary(tok):
    return {
        "len": len(tok),
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "tokens": {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tool_call|>", "Hello", "Ġworld"]},
    }


def write_variant(base: pathlib.Path, out: pathlib.Path, tokenizer_json_edit, config) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    tj = json.loads((base / "tokenizer.json").read_text())
    tokenizer_json_edit(tj)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


def main():
    base = pathlib.Path(sys.argv[1]).resolve()
    work = pathlib.Path(sys.argv[2]).resolve()
    base_config = json.loads((base / "tokenizer_config.json").read_text())

    tok = AutoTokenizer.from_pretrained(base)
    report = {
        "transformers_tokenizer_class": type(tok).__name__,
        "summary": summary(tok),
        "texts": text_records(tok, TEXTS),
        "conversations": conversation_records(tok, [(n, m, g, {}) for n, m, g in QWEN2_CONVERSATIONS]),
        "variants": [],
        "generation_configs": [],
    }

    # Variant 1: a BOS-adding post-processor, special tokens as objects, add_bos/eos flags,
    # named templates, an added token only in added_tokens_decoder.
    def bos_post_processor(tj):
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}},
        }

    config = copy.deepcopy(base_config)
    config.update(
        {
            "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
            "add_bos_token": True,
            "add_eos_token": True,
            "chat_template": [{"name": "default", "template": FEATURE_TEMPLATE}, {"name": "tool_use", "template": TOOL_TEMPLATE}],
        }
    )
    # A new added token takes the next free id (after Qwen2-VL's specials, 151657).
    next_id = str(max(int(i) for i in config["added_tokens_decoder"]) + 1)
    config["added_tokens_decoder"][next_id] = {"content": "<|tool_call|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": False}
    variant = write_variant(base, work / "bos-templates", bos_post_processor, config)
    vtok = AutoTokenizer.from_pretrained(variant)
    report["variants"].append(
        {
            "name": "bos-templates",
            "dir": str(variant),
            "summary": summary(vtok),
            "texts": text_records(vtok, TEXTS),
            "conversations": conversation_records(vtok, FEATURE_CONVERSATIONS + ERROR_CONVERSATIONS),
        }
    )

    # Variant 2: split_special_tokens: special tokens written in text are plain text.
    config = copy.deepcopy(base_config)
    config["split_special_tokens"] = True
    variant = write_variant(base, work / "split-special", lambda tj: None, config)
    vtok = AutoTokenizer.from_pretrained(variant)
    report["variants"].append(
        {
            "name": "split-special",
            "dir": str(variant),
            "summary": summary(vtok),
            "texts": text_records(vtok, TEXTS),
            "conversations": conversation_records(vtok, [(n, m, g, {}) for n, m, g in QWEN2_CONVERSATIONS[:2]]),
        }
    )

    for name, cfg in GENERATION_CONFIGS.items():
        d = work / "generation" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "generation_config.json").write_text(json.dumps(cfg))
        loaded = GenerationConfig.from_pretrained(d)
        values = {k: getattr(loaded, k) for k in GENERATION_KEYS}
        # transformers leaves unset sampling knobs as None and applies the defaults at
        # generate() time; report what generate() would use.
        defaults = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
        for k, v in defaults.items():
            if values[k] is None:
                values[k] = v
        report["generation_configs"].append({"name": name, "dir": str(d), "values": values})

    json.dump(report, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
