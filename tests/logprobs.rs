//! Log-probabilities out of `ferrotune generate --json --logprobs K` and `ferrotune serve`
//! (chat `logprobs`/`top_logprobs`, completions' integer `logprobs`, streamed or not, in mixed
//! batches with and without adapters) against transformers: `log_softmax` of the raw logits
//! along the greedy path (tests/python/logprobs_reference.py). Values must agree within 1e-5
//! and the top tokens must be the same; bad values are refused with errors naming the field.
use std::collections::BTreeSet;
use std::path::Path;

use ferrotune::model::CausalLM;
use ferrotune::peft::PeftModel;
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind};

const TOLERANCE: f64 = 1e-5;
const NEW_TOKENS: u64 = 12;
const TOP: u64 = 5;
const CHAT_PROMPT: &str = "w3 w1 w4 w1 w5";
const TEXT_PROMPT: &str = "w2 w7 w1 w8";

/// `(status, JSON body)` of a POST, errors included.
fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = ureq::post(&format!("{}{path}", s.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string());
    let (code, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    };
    (code, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")))
}

fn post_ok(s: &Server, path: &str, body: &Value) -> Value {
    let (code, v) = post(s, path, body);
    assert_eq!(code, 200, "{path} {body}: {v}");
    v
}

/// The `data:` payloads of a streamed response, parsed, `[DONE]` checked and left out.
fn post_stream(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let text = ureq::post(&format!("{}{path}", s.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap()
        .into_string()
        .unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

/// Runs the reference script on `cases`; one result per case.
fn reference(dir: &Path, cases: &Value) -> Vec<Value> {
    let file = dir.join("cases.json");
    std::fs::write(&file, cases.to_string()).unwrap();
    let script = repo_root().join("tests/python/logprobs_reference.py");
    let out = run_python(&[script.as_os_str(), file.as_os_str()]);
    serde_json::from_str::<Value>(stdout(&out).trim()).unwrap().as_array().unwrap().clone()
}

/// One side's log-probabilities, in a form every output shape turns into.
#[derive(Debug, Default, PartialEq)]
struct Logprobs {
    /// Known where the shape carries ids (the CLI).
    ids: Option<Vec<i64>>,
    texts: Vec<String>,
    values: Vec<f64>,
    top_ids: Option<Vec<Vec<i64>>>,
    top_texts: Vec<Vec<String>>,
    top_values: Vec<Vec<f64>>,
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_string()
}

/// `generate --json --logprobs K`'s `logprobs`.
fn from_cli(v: &Value) -> Logprobs {
    let mut l = Logprobs { ids: Some(vec![]), top_ids: Some(vec![]), ..Default::default() };
    for e in v["logprobs"].as_array().unwrap_or_else(|| panic!("no logprobs in {v}")) {
        l.ids.as_mut().unwrap().push(e["token_id"].as_i64().unwrap());
        l.texts.push(s(&e["token"]));
        l.values.push(f(&e["logprob"]));
        let top = e["top_logprobs"].as_array().unwrap();
        l.top_ids
            .as_mut()
            .unwrap()
            .push(top.iter().map(|t| t["token_id"].as_i64().unwrap()).collect());
        l.top_texts.push(top.iter().map(|t| s(&t["token"])).collect());
        l.top_values.push(top.iter().map(|t| f(&t["logprob"])).collect());
    }
    l
}

/// Chat's `logprobs.content` entries (one response's, or a stream's chunks' together).
fn from_chat(content: &[Value]) -> Logprobs {
    let mut l = Logprobs::default();
    let bytes_ok = |e: &Value| {
        let b: Vec<u8> =
            e["bytes"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect();
        assert_eq!(b, s(&e["token"]).as_bytes(), "bytes are the token's UTF-8: {e}");
    };
    for e in content {
        bytes_ok(e);
        l.texts.push(s(&e["token"]));
        l.values.push(f(&e["logprob"]));
        let top = e["top_logprobs"].as_array().unwrap();
        top.iter().for_each(bytes_ok);
        l.top_texts.push(top.iter().map(|t| s(&t["token"])).collect());
        l.top_values.push(top.iter().map(|t| f(&t["logprob"])).collect());
    }
    l
}

/// The chat `logprobs.content` of a response or of a stream's chunks.
fn chat_content(choices: &[&Value]) -> Vec<Value> {
    choices
        .iter()
        .filter(|c| !c["logprobs"].is_null())
        .flat_map(|c| c["logprobs"]["content"].as_array().unwrap().clone())
        .collect()
}

/// Greedy ids of a response with `return_token_ids`.
fn token_ids(v: &Value) -> Vec<i64> {
    v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect()
}

/// Checks `ours` against a reference case (its first `k` top tokens); the largest difference.
fn check(what: &str, ours: &Logprobs, theirs: &Value, k: usize) -> f64 {
    let ids: Vec<i64> =
        theirs["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert!(
        !ids.is_empty(),
        "{what}: the reference generated nothing (eos at once): change the seed"
    );
    assert_eq!(ours.values.len(), ids.len(), "{what}: one entry per generated token");
    if let Some(o) = &ours.ids {
        assert_eq!(o, &ids, "{what}: greedy tokens");
    }
    let texts: Vec<String> = theirs["token_texts"].as_array().unwrap().iter().map(s).collect();
    assert_eq!(ours.texts, texts, "{what}: token texts");
    let mut max = 0f64;
    for (j, (o, t)) in ours.values.iter().zip(theirs["logprobs"].as_array().unwrap()).enumerate() {
        let d = (o - f(t)).abs();
        assert!(d <= TOLERANCE, "{what}: token {j}: logprob {o} vs transformers {t}");
        max = max.max(d);
    }
    for j in 0..ids.len() {
        let t_vals: Vec<f64> =
            theirs["top_logprobs"][j].as_array().unwrap().iter().map(f).take(k).collect();
        // The reference's top tokens must be told apart for the order to be meaningful.
        for w in t_vals.windows(2) {
            assert!(
                w[0] - w[1] > 1e-4,
                "{what}: step {j}: the reference has near ties {t_vals:?}: change the seed"
            );
        }
        if let Some(o) = &ours.top_ids {
            let t_ids: Vec<i64> = theirs["top_ids"][j]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_i64().unwrap())
                .take(k)
                .collect();
            assert_eq!(o[j], t_ids, "{what}: step {j}: top ids");
        }
        let t_texts: Vec<String> =
            theirs["top_texts"][j].as_array().unwrap().iter().map(s).take(k).collect();
        assert_eq!(ours.top_texts[j], t_texts, "{what}: step {j}: top tokens");
        assert_eq!(ours.top_values[j].len(), k, "{what}: step {j}: {k} top tokens");
        for (o, t) in ours.top_values[j].iter().zip(&t_vals) {
            let d = (o - t).abs();
            assert!(d <= TOLERANCE, "{what}: step {j}: top logprob {o} vs transformers {t}");
            max = max.max(d);
        }
    }
    println!("{what}: {} tokens, top {k}: max |logprob - transformers| {max:.3e}", ids.len());
    max
}

/// The legacy completions `logprobs` object against a reference case.
fn check_legacy(what: &str, lp: &Value, text: &str, theirs: &Value, k: usize) -> f64 {
    let tokens: Vec<String> = lp["tokens"].as_array().unwrap().iter().map(s).collect();
    let mut ours = Logprobs {
        texts: tokens.clone(),
        values: lp["token_logprobs"].as_array().unwrap().iter().map(f).collect(),
        ..Default::default()
    };
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at, "{what}: text_offset");
        at += t.chars().count() as u64;
    }
    assert_eq!(tokens.concat(), text, "{what}: the tokens spell the text");
    // top_logprobs: the k most likely and the chosen token, {text: logprob}
    for (j, m) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let m = m.as_object().unwrap();
        let t_texts: Vec<String> =
            theirs["top_texts"][j].as_array().unwrap().iter().map(s).take(k).collect();
        let mut want: BTreeSet<&str> = t_texts.iter().map(String::as_str).collect();
        want.insert(&tokens[j]);
        assert_eq!(m.keys().map(String::as_str).collect::<BTreeSet<_>>(), want, "{what}: step {j}");
        assert_eq!(f(&m[&tokens[j]]), ours.values[j], "{what}: step {j}: the chosen token's entry");
        ours.top_texts.push(t_texts.clone());
        ours.top_values.push(t_texts.iter().map(|t| f(&m[t])).collect());
    }
    check(what, &ours, theirs, k)
}

/// Attaches a LoRA, moves its weights by N(0, 0.3²) and saves it as a PEFT directory.
fn make_adapter(model_dir: &Path, out: &Path, seed: i64) {
    let registry = registry();
    let mut model =
        CausalLM::load(model_dir, Device::Cpu, Kind::Float).map(PeftModel::new).unwrap();
    tch::manual_seed(seed);
    let config = r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#;
    model.attach_adapter("default", Box::new(registry.adapter("lora", config).unwrap())).unwrap();
    perturb_adapter(&mut model, seed, 0.3);
    model.save_peft_adapter(out).unwrap();
}

fn chat_body(model: &str, logprobs: Option<u64>) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": CHAT_PROMPT}],
                       "max_tokens": NEW_TOKENS, "temperature": 0, "return_token_ids": true});
    if let Some(k) = logprobs {
        b["logprobs"] = json!(true);
        b["top_logprobs"] = json!(k);
    }
    b
}

fn completion_body(model: &str, logprobs: Option<u64>) -> Value {
    let mut b = json!({"model": model, "prompt": TEXT_PROMPT, "max_tokens": NEW_TOKENS,
                       "temperature": 0, "return_token_ids": true});
    if let Some(k) = logprobs {
        b["logprobs"] = json!(k);
    }
    b
}

#[test]
fn logprobs_from_generate_and_serve_equal_transformers_and_bad_values_are_refused() {
    let root = TempDir(temp_dir("logprobs"));
    let tok = root.0.join("tok");
    write_chat_tokenizer(&tok, 40);
    let model = root.0.join("tiny");
    init_tiny_model(&tok.join("tokenizer.json"), &model, 5);
    let adapter = root.0.join("a1");
    make_adapter(&model, &adapter, 12);
    let m = model.to_str().unwrap();
    let cases = json!([
        {"model": m, "chat": true, "prompt": CHAT_PROMPT, "n": NEW_TOKENS, "k": TOP},
        {"model": m, "chat": false, "prompt": TEXT_PROMPT, "n": NEW_TOKENS, "k": TOP},
    ]);
    let refs = reference(&root.0, &cases);
    let (chat_ref, text_ref) = (&refs[0], &refs[1]);
    let k = TOP as usize;
    let mut max = 0f64;

    // the CLI, chat and plain
    let n = NEW_TOKENS.to_string();
    let top = TOP.to_string();
    let cli = |extra: &[&str], prompt: &str| -> Value {
        let mut args = vec!["generate", "--model", m, "--prompt", prompt, "--greedy"];
        args.extend(["--max-new-tokens", &n, "--json", "--logprobs", &top]);
        args.extend(extra);
        let o = ferrotune(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    };
    max = max.max(check("generate --chat", &from_cli(&cli(&["--chat"], CHAT_PROMPT)), chat_ref, k));
    max = max.max(check("generate", &from_cli(&cli(&[], TEXT_PROMPT)), text_ref, k));
    // the same tokens with and without --logprobs; --logprobs needs --json
    let o = ferrotune(&[
        "generate",
        "--model",
        m,
        "--prompt",
        TEXT_PROMPT,
        "--greedy",
        "--max-new-tokens",
        &n,
        "--json",
    ]);
    let plain: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(plain["token_ids"], text_ref["token_ids"]);
    assert!(plain.get("logprobs").is_none(), "{plain}");
    let o = ferrotune(&["generate", "--model", m, "--prompt", "w1", "--logprobs", "2"]);
    assert!(!o.status.success() && stderr(&o).contains("--json"), "{}", stderr(&o));

    // serve: alone, streamed, then in mixed batches
    let s = Server::start(
        &model,
        &["--adapter", &format!("a1={}", adapter.display()), "--max-batch", "16"],
    );
    let v = post_ok(&s, "/v1/chat/completions", &chat_body("tiny", Some(TOP)));
    assert_eq!(json!(token_ids(&v)), chat_ref["token_ids"]);
    let chat_alone = from_chat(&chat_content(&[&v["choices"][0]]));
    max = max.max(check("serve chat", &chat_alone, chat_ref, k));
    let mut body = chat_body("tiny", Some(TOP));
    body["stream"] = json!(true);
    let chunks = post_stream(&s, "/v1/chat/completions", &body);
    let streamed =
        from_chat(&chat_content(&chunks.iter().map(|c| &c["choices"][0]).collect::<Vec<_>>()));
    assert_eq!(streamed, chat_alone, "streamed chat logprobs equal the response's");

    let v = post_ok(&s, "/v1/completions", &completion_body("tiny", Some(TOP)));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    max = max.max(check_legacy(
        "serve completions",
        &v["choices"][0]["logprobs"],
        &text,
        text_ref,
        k,
    ));
    let mut body = completion_body("tiny", Some(TOP));
    body["stream"] = json!(true);
    let chunks = post_stream(&s, "/v1/completions", &body);
    let mut joined =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for c in chunks.iter().filter(|c| !c["choices"][0]["logprobs"].is_null()) {
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let more = c["choices"][0]["logprobs"][key].as_array().unwrap().clone();
            joined[key].as_array_mut().unwrap().extend(more);
        }
    }
    assert_eq!(
        joined, v["choices"][0]["logprobs"],
        "streamed completions logprobs equal the response's"
    );

    // k = 0: the chosen token's log-probability only
    let v = post_ok(&s, "/v1/chat/completions", &chat_body("tiny", Some(0)));
    let zero = from_chat(&chat_content(&[&v["choices"][0]]));
    assert_eq!(zero.values, chat_alone.values);
    assert!(zero.top_texts.iter().all(Vec::is_empty), "{v}");

    // the adapter's logprobs alone, then mixed batches of rows with and without logprobs
    let adapter_alone = from_chat(&chat_content(&[&post_ok(
        &s,
        "/v1/chat/completions",
        &chat_body("a1", Some(TOP)),
    )["choices"][0]]));
    assert_ne!(adapter_alone.values, chat_alone.values, "the adapter changes the model");
    let jobs: Vec<(&str, Value)> = vec![
        ("/v1/chat/completions", chat_body("tiny", Some(TOP))),
        ("/v1/chat/completions", chat_body("tiny", None)),
        ("/v1/chat/completions", chat_body("a1", Some(TOP))),
        ("/v1/completions", completion_body("tiny", Some(3))),
        ("/v1/completions", completion_body("a1", None)),
        ("/v1/chat/completions", chat_body("a1", None)),
    ];
    let mut max_mixed = 0f64;
    for round in 0..2 {
        let out: Vec<Value> = std::thread::scope(|sc| {
            let handles: Vec<_> =
                jobs.iter().map(|(p, b)| sc.spawn(|| post_ok(&s, p, b))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let what = |i: usize| format!("mixed round {round} request {i}");
        max_mixed = max_mixed.max(check(
            &what(0),
            &from_chat(&chat_content(&[&out[0]["choices"][0]])),
            chat_ref,
            k,
        ));
        assert!(out[1]["choices"][0]["logprobs"].is_null(), "{}", out[1]);
        assert_eq!(json!(token_ids(&out[1])), chat_ref["token_ids"]);
        let a = from_chat(&chat_content(&[&out[2]["choices"][0]]));
        assert_eq!(a.texts, adapter_alone.texts, "{}", what(2));
        for (x, y) in a
            .values
            .iter()
            .chain(a.top_values.concat().iter())
            .zip(adapter_alone.values.iter().chain(adapter_alone.top_values.concat().iter()))
        {
            assert!((x - y).abs() <= TOLERANCE, "{}: {x} vs alone {y}", what(2));
            max_mixed = max_mixed.max((x - y).abs());
        }
        let text = out[3]["choices"][0]["text"].as_str().unwrap().to_string();
        max_mixed = max_mixed.max(check_legacy(
            &what(3),
            &out[3]["choices"][0]["logprobs"],
            &text,
            text_ref,
            3,
        ));
        assert!(
            out[4]["choices"][0]["logprobs"].is_null()
                && out[5]["choices"][0]["logprobs"].is_null()
        );
    }
    let health: Value =
        ureq::get(&format!("{}/health", s.url)).call().unwrap().into_json().unwrap();
    println!("mixed batches: max |logprob - reference or alone| {max_mixed:.3e}; engine {health}");
    assert!(
        health["engine"]["mixed_steps"].as_u64().unwrap() > 0,
        "the rows never shared a mixed batch: {health}"
    );

    // refusals name the field
    let refused = |path: &str, body: Value, param: &str| {
        let (code, v) = post(&s, path, &body);
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains(param), "{v}");
    };
    let chat = |extra: Value| {
        let mut b = chat_body("tiny", None);
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    refused(
        "/v1/chat/completions",
        chat(json!({"logprobs": true, "top_logprobs": 21})),
        "top_logprobs",
    );
    refused(
        "/v1/chat/completions",
        chat(json!({"logprobs": true, "top_logprobs": -1})),
        "top_logprobs",
    );
    refused(
        "/v1/chat/completions",
        chat(json!({"logprobs": true, "top_logprobs": 2.5})),
        "top_logprobs",
    );
    refused("/v1/chat/completions", chat(json!({"top_logprobs": 3})), "top_logprobs");
    refused("/v1/chat/completions", chat(json!({"logprobs": 3})), "logprobs");
    refused(
        "/v1/completions",
        json!({"model": "tiny", "prompt": "w1", "logprobs": 21}),
        "logprobs",
    );
    refused(
        "/v1/completions",
        json!({"model": "tiny", "prompt": "w1", "logprobs": true}),
        "logprobs",
    );
    refused(
        "/v1/completions",
        json!({"model": "tiny", "prompt": "w1", "logprobs": 2, "top_logprobs": 2}),
        "top_logprobs",
    );
    // still serving, and `logprobs: false` is no logprobs
    let v = post_ok(&s, "/v1/chat/completions", &chat(json!({"logprobs": false})));
    assert!(v["choices"][0]["logprobs"].is_null());
    assert_eq!(json!(token_ids(&v)), chat_ref["token_ids"]);
    println!("max |logprob - transformers| over the CLI and serve: {max:.3e}");
}

#[test]
fn a_qwen2_vl_prompt_with_an_image_gives_transformers_logprobs() {
    let root = TempDir(temp_dir("logprobs-vl"));
    let model = root.0.join("tiny-vl");
    init_tiny_vl_model(&model, 5);
    let image = repo_root().join("datasets/story-llava/images/toy-test-008_1.png");
    let (prompt, n, k) = ("Describe the story.", 6u64, 3usize);
    let refs = reference(
        &root.0,
        &json!([{"model": model, "chat": true, "prompt": prompt, "n": n, "k": k, "images": [image]}]),
    );
    let (ns, ks) = (n.to_string(), k.to_string());
    let o = ferrotune(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        prompt,
        "--greedy",
        "--max-new-tokens",
        &ns,
        "--json",
        "--logprobs",
        &ks,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let cli = check("generate --chat --image", &from_cli(&v), &refs[0], k);

    use base64::Engine as _;
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&image).unwrap())
    );
    let s = Server::start(&model, &[]);
    let body = json!({"model": "tiny-vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}],
        "max_tokens": n, "temperature": 0, "logprobs": true, "top_logprobs": k, "return_token_ids": true});
    let v = post_ok(&s, "/v1/chat/completions", &body);
    assert_eq!(json!(token_ids(&v)), refs[0]["token_ids"]);
    let served = check(
        "serve chat with an image",
        &from_chat(&chat_content(&[&v["choices"][0]])),
        &refs[0],
        k,
    );
    println!("Qwen2-VL with an image: max |logprob - transformers| generate {cli:.3e}, serve {served:.3e}");
}
