//! `ferrotune init-model` + `ferrotune generate` end to end with the real Qwen2 tokenizer
//! (made by the set-up in assets/qwen2-tokenizer), against transformers on the same directory:
//! chat template, tokenization, model and greedy decoding together.
use std::ffi::OsStr;

use ferrotune_tests::*;

fn qwen_tokenizer() -> std::path::PathBuf {
    let dir = repo_root().join("assets/qwen2-tokenizer");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: run `make .stamps/qwen-tokenizer` (make test does)",
        dir.display()
    );
    dir
}

const REFERENCE: &str = r#"
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
d, system, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d).eval()
msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
new = out[0, ids.shape[1]:].tolist()
eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])
cut = next((i for i, t in enumerate(new) if t in eos), len(new))
print(json.dumps({"prompt_ids": ids[0].tolist(), "token_ids": new[:cut], "text": tok.decode(new[:cut], skip_special_tokens=True)}))
"#;

#[test]
fn generate_cli_equals_transformers_on_an_init_model_directory() {
    let dir = temp_dir("generate-cli");
    let model = dir.join("qwen2-tiny");
    let out = ferrotune(&[
        "init-model",
        "--preset",
        "tiny",
        "--arch",
        "qwen2",
        "--seed",
        "11",
        "--tokenizer",
        qwen_tokenizer().to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (system, prompt, n) = (
        "You are a storyteller.",
        "Tell the story of frame 1: a girl (char1) finds a key — 🔑, ключ.",
        "20",
    );
    let out = ferrotune(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--system",
        system,
        "--prompt",
        prompt,
        "--max-new-tokens",
        n,
        "--greedy",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ours: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let script = dir.join("reference.py");
    std::fs::write(&script, REFERENCE).unwrap();
    let reference = run_python(&[
        script.as_os_str(),
        model.as_os_str(),
        OsStr::new(system),
        OsStr::new(prompt),
        OsStr::new(n),
    ]);
    let theirs: serde_json::Value = serde_json::from_str(stdout(&reference).trim()).unwrap();
    assert_eq!(ours["token_ids"], theirs["token_ids"], "ours {ours}\ntheirs {theirs}");
    assert_eq!(ours["text"], theirs["text"]);
    assert_eq!(
        ours["token_ids"].as_array().unwrap().len(),
        20,
        "a random model should not hit eos in 20 steps"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn generate_cli_errors_are_clear() {
    let out = ferrotune(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/no/such/model"), "{}", stderr(&out));
    let out = ferrotune(&[
        "generate",
        "--model",
        "/tmp",
        "--prompt",
        "hi",
        "--greedy",
        "--temperature",
        "0.7",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
}
