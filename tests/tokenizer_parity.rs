//! ferrotune's tokenizer, chat templates and generation config against transformers, on
//! the Qwen2 tokenizer the set-up generates (`assets/qwen2-tokenizer`, `make
//! .stamps/qwen-tokenizer`).
//!
//! `tests/python/tokenizer_reference.py` runs transformers on a fixed set of texts and
//! conversations (and on variant folders it writes: a BOS post-processor, named templates
//! using Python string methods and `tojson`, an added token, `split_special_tokens`) and
//! prints what it got; every id, rendered text and decode must be equal here. The test
//! fails, never skips, when the asset or a Python with transformers is missing.
use std::path::{Path, PathBuf};
use std::process::Command;

use ferrotune::text::{GenerationConfig, Tokenizer};
use ferrotune_plugin_api::Message;
use ferrotune_tests::{python, repo_root, temp_dir};
use serde_json::Value;

/// The generated Qwen2 tokenizer folder, checked to exist.
fn qwen2_dir() -> PathBuf {
    let dir = repo_root().join("assets/qwen2-tokenizer");
    assert!(
        dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file(),
        "{} is missing: generate it with `make .stamps/qwen-tokenizer` (`make test` does)",
        dir.display()
    );
    dir
}

/// transformers' output for the asset folder; variant folders are written under `work`.
fn reference(dir: &Path, work: &Path) -> Value {
    let script = repo_root().join("tests/python/tokenizer_reference.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .arg(work)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run tokenizer_reference.py");
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tokenizer_reference.py prints JSON")
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().expect("a list of ids").iter().map(|i| i.as_i64().expect("an id")).collect()
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

/// Collects mismatches so that one run reports all of them.
#[derive(Default)]
struct Diff {
    failures: Vec<String>,
    texts: usize,
    conversations: usize,
}

impl Diff {
    fn eq<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: impl std::fmt::Display,
        ours: T,
        theirs: T,
    ) {
        if ours != theirs {
            self.failures
                .push(format!("{what}:\n    ferrotune:    {ours:?}\n    transformers: {theirs:?}"));
        }
    }
}

fn compare_summary(d: &mut Diff, tag: &str, tok: &Tokenizer, s: &Value) {
    d.eq(format!("{tag}: len(tokenizer)"), tok.vocab_size() as i64, s["len"].as_i64().unwrap());
    d.eq(
        format!("{tag}: tokenizer.vocab_size"),
        tok.base_vocab_size() as i64,
        s["vocab_size"].as_i64().unwrap(),
    );
    d.eq(format!("{tag}: eos_token_id"), tok.eos_token_id(), s["eos_token_id"].as_i64());
    d.eq(format!("{tag}: pad_token_id"), tok.pad_token_id(), s["pad_token_id"].as_i64());
    d.eq(format!("{tag}: bos_token_id"), tok.bos_token_id(), s["bos_token_id"].as_i64());
    for (token, id) in s["tokens"].as_object().unwrap() {
        d.eq(format!("{tag}: token_to_id({token:?})"), tok.token_to_id(token), id.as_i64());
    }
}

fn compare_texts(d: &mut Diff, tag: &str, tok: &Tokenizer, texts: &Value) {
    let texts = texts.as_array().unwrap();
    let inputs: Vec<&str> = texts.iter().map(|t| t["text"].as_str().unwrap()).collect();
    let batch = tok.encode_batch(&inputs, false).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let text = inputs[i];
        let short: String = text.chars().take(40).collect();
        let want = ids(&t["ids"]);
        let got = tok.encode(text, false).unwrap();
        d.eq(format!("{tag}: encode({short:?}, add_special_tokens=false)"), &got, &want);
        d.eq(format!("{tag}: encode_batch[{i}]"), &batch[i], &want);
        let want_special = ids(&t["ids_with_special_tokens"]);
        d.eq(
            format!("{tag}: encode({short:?}, add_special_tokens=true)"),
            &tok.encode(text, true).unwrap(),
            &want_special,
        );
        d.eq(
            format!("{tag}: decode(ids of {short:?})"),
            tok.decode(&want, false).unwrap().as_str(),
            t["decoded"].as_str().unwrap(),
        );
        d.eq(
            format!("{tag}: decode(ids+special of {short:?}, skip_special_tokens=true)"),
            tok.decode(&want_special, true).unwrap().as_str(),
            t["decoded_skip_special"].as_str().unwrap(),
        );
        d.eq(
            format!("{tag}: decode(ids+special of {short:?})"),
            tok.decode(&want_special, false).unwrap().as_str(),
            t["decoded_with_special"].as_str().unwrap(),
        );
        d.texts += 1;
    }
}

fn compare_conversations(d: &mut Diff, tag: &str, tok: &Tokenizer, conversations: &Value) {
    for c in conversations.as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let msgs = messages(&c["messages"]);
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let ours = tok.apply_chat_template_with(&msgs, gen, &c["extra"]);
        if let Some(err) = c.get("error").and_then(Value::as_str) {
            match ours {
                Ok(text) => d.failures.push(format!(
                    "{tag}/{name}: transformers raised {err:?}, ferrotune rendered {text:?}"
                )),
                Err(e) => {
                    let e = format!("{e:#}");
                    if !e.contains(err) {
                        d.failures.push(format!("{tag}/{name}: error {e:?} does not carry transformers' message {err:?}"));
                    }
                }
            }
        } else {
            let rendered = c["rendered"].as_str().unwrap();
            match ours {
                Ok(text) => {
                    d.eq(format!("{tag}/{name}: rendered chat"), text.as_str(), rendered);
                    d.eq(
                        format!("{tag}/{name}: chat ids"),
                        tok.encode(&text, false).unwrap(),
                        ids(&c["ids"]),
                    );
                    let has_extra = c["extra"].as_object().is_some_and(|e| !e.is_empty());
                    if !has_extra {
                        d.eq(
                            format!("{tag}/{name}: encode_chat"),
                            tok.encode_chat(&msgs, gen).unwrap(),
                            ids(&c["ids"]),
                        );
                    }
                    d.eq(
                        format!("{tag}/{name}: decode(chat ids)"),
                        tok.decode(&ids(&c["ids"]), false).unwrap().as_str(),
                        c["decoded"].as_str().unwrap(),
                    );
                }
                Err(e) => d
                    .failures
                    .push(format!("{tag}/{name}: transformers rendered, ferrotune failed: {e:#}")),
            }
        }
        d.conversations += 1;
    }
}

#[test]
fn qwen2_tokenizer_matches_transformers() {
    let dir = qwen2_dir();
    let work = temp_dir("tokenizer-parity");
    let reference = reference(&dir, &work);
    let mut d = Diff::default();

    let tok = Tokenizer::from_dir(&dir).expect("load assets/qwen2-tokenizer");
    assert!(tok.has_chat_template());
    compare_summary(&mut d, "qwen2", &tok, &reference["summary"]);
    compare_texts(&mut d, "qwen2", &tok, &reference["texts"]);
    compare_conversations(&mut d, "qwen2", &tok, &reference["conversations"]);

    for v in reference["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let vtok = Tokenizer::from_dir(Path::new(v["dir"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("load variant {name}: {e:#}"));
        compare_summary(&mut d, name, &vtok, &v["summary"]);
        compare_texts(&mut d, name, &vtok, &v["texts"]);
        compare_conversations(&mut d, name, &vtok, &v["conversations"]);
    }

    let mut gen_configs = 0;
    for g in reference["generation_configs"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        let ours = GenerationConfig::from_dir(Path::new(g["dir"].as_str().unwrap())).unwrap();
        let t = &g["values"];
        let eos = match &t["eos_token_id"] {
            Value::Null => vec![],
            Value::Array(_) => ids(&t["eos_token_id"]),
            v => vec![v.as_i64().unwrap()],
        };
        d.eq(format!("generation/{name}: eos_token_ids"), ours.eos_token_ids(), eos);
        d.eq(
            format!("generation/{name}: pad_token_id"),
            ours.pad_token_id,
            t["pad_token_id"].as_i64(),
        );
        d.eq(
            format!("generation/{name}: bos_token_id"),
            ours.bos_token_id,
            t["bos_token_id"].as_i64(),
        );
        d.eq(
            format!("generation/{name}: do_sample"),
            ours.do_sample,
            t["do_sample"].as_bool().unwrap(),
        );
        d.eq(
            format!("generation/{name}: temperature"),
            ours.temperature,
            t["temperature"].as_f64().unwrap(),
        );
        d.eq(format!("generation/{name}: top_p"), ours.top_p, t["top_p"].as_f64().unwrap());
        d.eq(format!("generation/{name}: top_k"), ours.top_k, t["top_k"].as_i64().unwrap());
        d.eq(
            format!("generation/{name}: repetition_penalty"),
            ours.repetition_penalty,
            t["repetition_penalty"].as_f64().unwrap(),
        );
        d.eq(
            format!("generation/{name}: max_new_tokens"),
            ours.max_new_tokens.map(|n| n as u64),
            t["max_new_tokens"].as_u64(),
        );
        gen_configs += 1;
    }

    eprintln!(
        "tokenizer parity: {} texts, {} conversations, {} generation configs compared with transformers; {} mismatches",
        d.texts,
        d.conversations,
        gen_configs,
        d.failures.len()
    );
    assert!(
        d.texts >= 75 && d.conversations >= 15 && gen_configs == 3,
        "the reference produced too little to compare"
    );
    assert!(
        d.failures.is_empty(),
        "{} mismatches with transformers:\n{}",
        d.failures.len(),
        d.failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn eos_ids_merge_generation_config_then_tokenizer() {
    let dir = qwen2_dir();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    // The asset folder has no generation_config.json: the tokenizer's eos (<|im_end|>).
    let gen = GenerationConfig::from_dir(&dir).unwrap().with_tokenizer_defaults(&tok);
    assert_eq!(gen.eos_token_ids(), vec![151645]);
    assert_eq!(gen.pad_token_id, Some(151643));
    // A generation_config.json list wins over the tokenizer.
    let work = temp_dir("genconf-merge");
    std::fs::write(work.join("generation_config.json"), r#"{"eos_token_id": [151645, 151643]}"#)
        .unwrap();
    let gen = GenerationConfig::from_dir(&work).unwrap().with_tokenizer_defaults(&tok);
    assert_eq!(gen.eos_token_ids(), vec![151645, 151643]);
}

#[test]
fn raise_exception_in_a_template_is_an_error_value() {
    let work = temp_dir("raise-exception");
    std::fs::copy(qwen2_dir().join("tokenizer.json"), work.join("tokenizer.json")).unwrap();
    let template = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool turns are not supported') }}{% endif %}{{ m.content }}{% endfor %}";
    std::fs::write(
        work.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template}).to_string(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&work).unwrap();
    assert_eq!(tok.apply_chat_template(&[Message::new("user", "ok")], false).unwrap(), "ok");
    let err =
        format!("{:#}", tok.apply_chat_template(&[Message::new("tool", "x")], false).unwrap_err());
    assert!(
        err.contains("tool turns are not supported") && err.contains("tokenizer_config.json"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let work = temp_dir("no-tokenizer");
    let err = format!("{:#}", Tokenizer::from_dir(&work).unwrap_err());
    assert!(err.contains(&work.join("tokenizer.json").display().to_string()), "{err}");
}

#[test]
fn malformed_tokenizer_config_names_file_and_key() {
    let work = temp_dir("bad-config");
    std::fs::copy(qwen2_dir().join("tokenizer.json"), work.join("tokenizer.json")).unwrap();
    let config = work.join("tokenizer_config.json");
    std::fs::write(&config, r#"{"eos_token": ["<|im_end|>"], "chat_template": "x"}"#).unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(&work).unwrap_err());
    assert!(err.contains(&config.display().to_string()) && err.contains("`eos_token`"), "{err}");
    std::fs::write(&config, r#"{"added_tokens_decoder": {"151643": {"content": 7}}}"#).unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(&work).unwrap_err());
    assert!(
        err.contains(&config.display().to_string())
            && err.contains("`added_tokens_decoder.151643.content`"),
        "{err}"
    );
}
