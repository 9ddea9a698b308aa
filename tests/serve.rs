//! `ferrotune serve` end to end: the real binary on a loopback port, spoken to over HTTP.
//! Outputs are checked against `ferrotune generate` (greedy) and against themselves (streamed
//! vs not, mixed batch vs alone, base before vs after loading adapters); every refusal is
//! checked for its status and JSON error; a bounded load test churns adapters under
//! concurrent clients and prints its numbers.
use ferrotune::peft::PeftModel;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferrotune::model::CausalLM;
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// A tiny chat model and adapters made for it.
struct Fixture {
    root: PathBuf,
    model: PathBuf,
    /// `--adapter-dir`: a1, a2, a3 (LoRA), dora (not mixable), corrupt, misshaped, link (a
    /// symlink to a folder outside).
    adapters: PathBuf,
    /// A valid adapter outside the adapter folder.
    outside: PathBuf,
}

fn lora_registry() -> ferrotune::plugins::Registry {
    let lib = build_dir().join("libferrotune_lora.so");
    assert!(
        lib.exists(),
        "{} is missing: `cargo build -p ferrotune -p ferrotune-lora -p ferrotune-testkit` first",
        lib.display()
    );
    registry()
}

/// Attaches a LoRA with `config`, moves every tensor by N(0, 0.3²) (B = 0 would leave the base
/// unchanged) and saves it as a PEFT directory.
fn make_adapter(model_dir: &Path, out: &Path, config: &str, seed: i64) {
    make_method_adapter(model_dir, out, "lora", config, seed, 0.3);
}

/// [`make_adapter`] for any adapter plugin, tensors moved by N(0, `scale`²) (not at all for
/// `scale` 0).
fn make_method_adapter(
    model_dir: &Path,
    out: &Path,
    plugin: &str,
    config: &str,
    seed: i64,
    scale: f64,
) {
    let registry = lora_registry();
    let mut model =
        CausalLM::load(model_dir, Device::Cpu, Kind::Float).map(PeftModel::new).unwrap();
    tch::manual_seed(seed);
    model.attach_adapter("default", Box::new(registry.adapter(plugin, config).unwrap())).unwrap();
    if scale > 0.0 {
        perturb_adapter(&mut model, seed, scale);
    }
    model.save_peft_adapter(out).unwrap();
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = temp_dir("serve");
        remove_at_exit(&root);
        let tok = root.join("tok");
        write_chat_tokenizer(&tok, 40);
        let model = root.join("tiny");
        init_tiny_model(&tok.join("tokenizer.json"), &model, 3);
        let adapters = root.join("adapters");
        std::fs::create_dir_all(&adapters).unwrap();
        for (i, name) in ["a1", "a2", "a3"].iter().enumerate() {
            make_adapter(&model, &adapters.join(name), r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#, 10 + i as i64);
        }
        make_adapter(&model, &adapters.join("dora"), r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": true}"#, 20);
        // Other methods: IA³ (scales activations: its own batch) and prompt tuning (virtual
        // tokens at the prefill, the base model's decode steps: mixes).
        let methods = root.join("methods");
        make_method_adapter(&model, &methods.join("ia3"), "ia3", r#"{"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#, 21, 0.5);
        for (name, plugin, config) in [
            ("vera", "vera", r#"{"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#),
            ("loha", "loha", r#"{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#),
            ("lokr", "lokr", r#"{"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#),
            ("ptune", "p_tuning", r#"{"num_virtual_tokens": 4, "encoder_hidden_size": 16}"#),
            ("prefix", "prefix_tuning", r#"{"num_virtual_tokens": 3}"#),
        ] {
            // P-tuning's saved table is its encoder's output: a fresh one is not trivial, and
            // a directory is loaded as that table (not into an encoder to perturb).
            let scale = if plugin == "p_tuning" { 0.0 } else { 0.5 };
            make_method_adapter(&model, &methods.join(name), plugin, config, 40, scale);
        }
        for (i, name) in ["pt1", "pt2"].iter().enumerate() {
            let n = 3 + 2 * i;
            make_method_adapter(&model, &methods.join(name), "prompt_tuning", &format!(r#"{{"num_virtual_tokens": {n}}}"#), 22 + i as i64, 0.5);
        }
        // corrupt: the weights file is not safetensors
        let corrupt = adapters.join("corrupt");
        std::fs::create_dir_all(&corrupt).unwrap();
        std::fs::copy(adapters.join("a1/adapter_config.json"), corrupt.join("adapter_config.json")).unwrap();
        std::fs::write(corrupt.join("adapter_model.safetensors"), b"this is not a safetensors file").unwrap();
        // misshaped: one lora_A of rank 5 where the config says 4 (made for another base)
        let misshaped = adapters.join("misshaped");
        std::fs::create_dir_all(&misshaped).unwrap();
        std::fs::copy(adapters.join("a1/adapter_config.json"), misshaped.join("adapter_config.json")).unwrap();
        let mut tensors = Tensor::read_safetensors(adapters.join("a1/adapter_model.safetensors")).unwrap();
        let (k, inp) = tensors.iter().find(|(k, _)| k.ends_with("lora_A.weight")).map(|(k, t)| (k.clone(), t.size2().unwrap().1)).unwrap();
        tensors.retain(|(n, _)| *n != k);
        tensors.push((k, Tensor::zeros([5, inp], (Kind::Float, Device::Cpu))));
        Tensor::write_safetensors(&tensors, misshaped.join("adapter_model.safetensors")).unwrap();
        let outside = root.join("outside/secret");
        std::fs::create_dir_all(outside.parent().unwrap()).unwrap();
        make_adapter(&model, &outside, r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#, 30);
        std::os::unix::fs::symlink(&outside, adapters.join("link")).unwrap();
        Fixture { root, model, adapters, outside }
    })
}

/// The shared fixtures' folders: statics are never dropped, so they go when the test process
/// exits (libtest returns from `main` or calls `exit`; both run `atexit` handlers).
static FIXTURE_ROOTS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

extern "C" fn remove_fixture_roots() {
    if let Ok(roots) = FIXTURE_ROOTS.lock() {
        for r in roots.iter() {
            let _ = std::fs::remove_dir_all(r);
        }
    }
}

fn remove_at_exit(root: &Path) {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function with no arguments, as atexit expects.
    REGISTER.call_once(|| unsafe {
        libc::atexit(remove_fixture_roots);
    });
    FIXTURE_ROOTS.lock().unwrap_or_else(|p| p.into_inner()).push(root.to_path_buf());
}

/// A server over the fixture's model, API loads from its adapter folder.
fn start(extra: &[&str]) -> Server {
    let f = fixture();
    start_on(&f.model, &f.adapters, extra)
}

fn start_on(model: &Path, adapter_dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--adapter-dir", adapter_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(model, &args)
}

/// `(status, body)` of a request, errors included.
fn call(req: ureq::Request, body: Option<&Value>) -> (u16, String) {
    let r = match body {
        Some(b) => req.send_string(&b.to_string()),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (code, text) = call(
        ureq::post(&format!("{}{path}", s.url)).set("Content-Type", "application/json"),
        Some(body),
    );
    (code, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")))
}

fn post_ok(s: &Server, path: &str, body: &Value) -> Value {
    let (code, v) = post(s, path, body);
    assert_eq!(code, 200, "{path} {body}: {v}");
    v
}

fn get(s: &Server, path: &str) -> Value {
    let (code, text) = call(ureq::get(&format!("{}{path}", s.url)), None);
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn model_ids(s: &Server) -> Vec<String> {
    get(s, "/v1/models")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Greedy completion: (token ids, text).
fn complete(s: &Server, model: &str, prompt: &str, max_tokens: u64) -> (Vec<i64>, String) {
    let v = post_ok(
        s,
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": true}),
    );
    let c = &v["choices"][0];
    let ids =
        c["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<_>>();
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() as usize, ids.len());
    (ids, c["text"].as_str().unwrap().to_string())
}

/// `ferrotune generate --greedy --json` (with the adapter directory if given).
fn generate(prompt: &str, adapter: Option<&Path>, chat: bool, n: u64) -> (Vec<i64>, String) {
    let f = fixture();
    let n = n.to_string();
    let mut args = vec![
        "generate",
        "--model",
        f.model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--greedy",
        "--max-new-tokens",
        &n,
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    if chat {
        args.push("--chat");
    }
    let o = ferrotune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    (
        v["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect(),
        v["text"].as_str().unwrap().to_string(),
    )
}

/// The `data:` payloads of a server-sent-events body, `[DONE]` last.
fn sse_events(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

const PROMPT: &str = "w1 w2 w3 w4";

#[test]
fn adapter_output_equals_generate_streams_match_and_the_base_is_unaffected() {
    let f = fixture();
    let a1 = f.adapters.join("a1");
    let s = start(&["--adapter", &format!("a1={}", a1.display())]);
    assert_eq!(model_ids(&s), vec!["tiny", "a1"]);
    let base_before = complete(&s, "tiny", PROMPT, 12);

    // completions through the adapter == `generate --adapter`
    let ours = complete(&s, "a1", PROMPT, 12);
    let cli = generate(PROMPT, Some(&a1), false, 12);
    assert_eq!(ours, cli);
    assert!(!ours.0.is_empty());
    assert_ne!(
        ours.0, base_before.0,
        "the adapter must change the output for this test to mean anything"
    );
    assert_eq!(base_before, generate(PROMPT, None, false, 12));

    // chat completions == `generate --chat --adapter`
    let chat = post_ok(
        &s,
        "/v1/chat/completions",
        &json!({"model": "a1", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0, "return_token_ids": true}),
    );
    let (cli_ids, cli_text) = generate(PROMPT, Some(&a1), true, 10);
    assert_eq!(chat["choices"][0]["message"]["content"].as_str().unwrap(), cli_text);
    assert_eq!(chat["choices"][0]["token_ids"], json!(cli_ids));
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(
        chat["usage"]["total_tokens"],
        json!(chat["usage"]["prompt_tokens"].as_u64().unwrap() + cli_ids.len() as u64)
    );

    // streamed == non-streamed, for both endpoints
    let (code, body) = call(
        ureq::post(&format!("{}/v1/completions", s.url)),
        Some(
            &json!({"model": "a1", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(code, 200);
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|c| c["text"].as_str()))
        .collect();
    assert_eq!(text, ours.1);
    assert!(chunks.len() > 3, "one chunk per token, not one at the end: {body}");
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|c| c["finish_reason"].as_str()))
        .collect::<Vec<_>>();
    assert_eq!(finish.len(), 1);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], json!(ours.0.len()));
    let (_, body) = call(
        ureq::post(&format!("{}/v1/chat/completions", s.url)),
        Some(
            &json!({"model": "a1", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0, "stream": true}),
        ),
    );
    let events = sse_events(&body);
    let deltas: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(deltas, cli_text);

    // loading more adapters (through both APIs) leaves the base and a1 as they were
    post_ok(&s, "/v1/adapters", &json!({"name": "a2", "path": "a2"}));
    post_ok(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "a3", "lora_path": f.adapters.join("a3")}),
    );
    assert_eq!(model_ids(&s), vec!["tiny", "a1", "a2", "a3"]);
    assert_eq!(complete(&s, "tiny", PROMPT, 12), base_before);
    assert_eq!(complete(&s, "a1", PROMPT, 12), ours);
    assert_eq!(
        complete(&s, "a2", PROMPT, 12),
        generate(PROMPT, Some(&f.adapters.join("a2")), false, 12)
    );
    // unloading: gone from the list, requests for it are refused, the others unchanged
    post_ok(&s, "/v1/unload_lora_adapter", &json!({"lora_name": "a3"}));
    let (code, v) = call(ureq::delete(&format!("{}/v1/adapters/a2", s.url)), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(model_ids(&s), vec!["tiny", "a1"]);
    assert_eq!(post(&s, "/v1/completions", &json!({"model": "a2", "prompt": PROMPT})).0, 404);
    assert_eq!(complete(&s, "a1", PROMPT, 12), ours);
    assert_eq!(complete(&s, "tiny", PROMPT, 12), base_before);
}

/// `--adapter NAME=DIR` for the fixture's adapters a1, a2, a3 and dora.
fn adapter_args(f: &Fixture) -> Vec<String> {
    ["a1", "a2", "a3", "dora"]
        .iter()
        .flat_map(|n| ["--adapter".to_string(), format!("{n}={}", f.adapters.join(n).display())])
        .collect()
}

#[test]
fn a_mixed_batch_gives_each_request_what_it_gets_alone() {
    let f = fixture();
    let args = adapter_args(f);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = start(&[&args[..], &["--max-batch", "16"]].concat());
    let jobs: Vec<(&str, String)> = ["a1", "a2", "a3", "dora", "tiny", "a1", "a2", "a3"]
        .iter()
        .enumerate()
        .map(|(i, m)| (*m, format!("w{} w{} w{}", i + 5, 2 * i + 1, 3 * i + 2)))
        .collect();
    let alone: Vec<_> = jobs.iter().map(|(m, p)| complete(&s, m, p, 24)).collect();
    assert_eq!(alone[0], generate(&jobs[0].1, Some(&f.adapters.join("a1")), false, 24));
    assert_eq!(
        alone[3],
        generate(&jobs[3].1, Some(&f.adapters.join("dora")), false, 24),
        "DoRA (its own batch)"
    );
    let before = get(&s, "/health")["engine"]["mixed_steps"].as_u64().unwrap();
    for round in 0..2 {
        let together: Vec<_> = std::thread::scope(|sc| {
            let handles: Vec<_> =
                jobs.iter().map(|(m, p)| sc.spawn(|| complete(&s, m, p, 24))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, b, "round {round}: request {i} ({}) differs in a batch", jobs[i].0);
        }
    }
    let health = get(&s, "/health");
    let mixed = health["engine"]["mixed_steps"].as_u64().unwrap() - before;
    println!("engine after the concurrent rounds: {health}");
    assert!(mixed > 0, "the concurrent requests never shared a mixed batch: {health}");
    assert!(health["engine"]["max_rows"].as_u64().unwrap() >= 3, "{health}");
}

#[test]
fn bad_inputs_are_refused_with_json_errors_and_the_server_keeps_serving() {
    let f = fixture();
    let a1 = f.adapters.join("a1");
    let s = start(&[
        "--adapter",
        &format!("a1={}", a1.display()),
        "--api-key",
        "sesame",
        "--max-adapters",
        "2",
        "--adapter-grace-secs",
        "0",
        "--max-tokens-limit",
        "32",
        "--max-body-bytes",
        "2048",
    ]);
    let url = |p: &str| format!("{}{p}", s.url);
    let authed = |r: ureq::Request| {
        r.set("Authorization", "Bearer sesame").set("Content-Type", "application/json")
    };
    let req = |path: &str, body: Value| -> (u16, Value) {
        let (code, text) = call(authed(ureq::post(&url(path))), Some(&body));
        (code, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")))
    };
    let error = |v: &Value| {
        v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {v}"))
            .to_string()
    };
    let serving = || {
        let (code, v) = req(
            "/v1/completions",
            json!({"model": "a1", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(code, 200, "{v}");
    };

    // API key
    let (code, text) = call(ureq::get(&url("/v1/models")), None);
    assert_eq!(code, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
        "authentication_error"
    );
    let (code, _) = call(ureq::get(&url("/v1/models")).set("Authorization", "Bearer open"), None);
    assert_eq!(code, 401);
    let (code, _) = call(authed(ureq::get(&url("/v1/models"))), None);
    assert_eq!(code, 200);
    assert_eq!(call(ureq::get(&url("/health")), None).0, 200, "health needs no key");

    // unknown adapter: 404 naming what is loaded
    let (code, v) = req("/v1/completions", json!({"model": "nope", "prompt": PROMPT}));
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["error"]["models"], json!(["tiny", "a1"]));
    assert!(error(&v).contains("nope") && error(&v).contains("a1"), "{v}");

    // paths outside --adapter-dir: absolute, traversal, symlink
    for path in [
        f.outside.to_str().unwrap().to_string(),
        "../outside/secret".into(),
        "link".into(),
        "/etc".into(),
    ] {
        let (code, v) = req("/v1/adapters", json!({"name": "x", "path": path}));
        assert_eq!(code, 403, "{path}: {v}");
        assert_eq!(v["error"]["code"], "path_outside_adapter_dir", "{path}: {v}");
    }
    // corrupt and mis-shaped adapters, a directory that is no adapter, a missing one
    let (code, v) = req("/v1/adapters", json!({"name": "bad", "path": "corrupt"}));
    assert_eq!(code, 400, "{v}");
    assert!(error(&v).contains("safetensors"), "{v}");
    serving();
    let (code, v) =
        req("/v1/load_lora_adapter", json!({"lora_name": "bad", "lora_path": "misshaped"}));
    assert_eq!(code, 400, "{v}");
    // The fixture's rank-5 lora_A is whichever the file listed first (q_proj's is [5, 64],
    // down_proj's [5, 176]): the message names it with its shape.
    assert!(
        error(&v).contains("1 mis-shaped key(s)") && error(&v).contains("lora_A.weight` is [5, "),
        "{v}"
    );
    serving();
    let (code, v) = req("/v1/adapters", json!({"name": "bad", "path": "."}));
    assert_eq!(code, 400, "{v}");
    assert!(error(&v).contains("adapter_config.json"), "{v}");
    let (code, v) = req("/v1/adapters", json!({"name": "bad", "path": "missing"}));
    assert_eq!(code, 404, "{v}");
    let (code, v) = req("/v1/adapters", json!({"name": "a b", "path": "a2"}));
    assert_eq!(code, 400, "{v}");
    let (code, v) = req("/v1/adapters", json!({"name": "tiny", "path": "a2"}));
    assert_eq!(code, 400, "{v}");
    let (code, v) = req("/v1/adapters", json!({"name": "a1", "path": "a2"}));
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("adapter_exists")), "{v}");
    let (code, v) = req("/v1/unload_lora_adapter", json!({"lora_name": "never"}));
    assert_eq!(code, 404, "{v}");
    assert_eq!(get_models(&s), vec!["tiny", "a1"], "failed loads leave nothing behind");

    // limits: max_tokens, body size, JSON, unsupported fields
    let (code, v) =
        req("/v1/completions", json!({"model": "a1", "prompt": PROMPT, "max_tokens": 33}));
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("max_tokens_out_of_range")), "{v}");
    let (code, v) = req("/v1/completions", json!({"model": "a1", "prompt": "w1 ".repeat(1000)}));
    assert_eq!((code, v["error"]["code"].as_str()), (413, Some("request_too_large")), "{v}");
    let (code, text) = call(authed(ureq::post(&url("/v1/completions"))), None);
    assert_eq!(code, 400, "{text}");
    let (code, text) = call(
        authed(ureq::post(&url("/v1/completions"))).set("Content-Type", "application/json"),
        Some(&json!("{not json")),
    );
    assert_eq!(code, 400, "{text}");
    let (code, v) = req("/v1/completions", json!({"prompt": PROMPT}));
    assert!(code == 400 && error(&v).contains("model"), "{v}");
    let (code, v) = req("/v1/completions", json!({"model": "a1", "prompt": PROMPT, "n": 2}));
    assert_eq!(code, 400, "{v}");
    let (code, v) = req(
        "/v1/chat/completions",
        json!({"model": "a1", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
    );
    assert_eq!(code, 400, "{v}");
    serving();

    // the adapter cap: a third load evicts the least recently used idle adapter (no grace
    // period here, --adapter-grace-secs 0; tests/bad_inputs/serve.rs covers the grace)
    req("/v1/adapters", json!({"name": "a2", "path": "a2"}));
    serving(); // a1 used after a2 was loaded: a2 is now the least recently used
    let (code, v) = req("/v1/adapters", json!({"name": "a3", "path": "a3"}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["evicted"], "a2");
    assert_eq!(get_models(&s), vec!["tiny", "a1", "a3"]);
    serving();
}

fn get_models(s: &Server) -> Vec<String> {
    let (_, text) = call(
        ureq::get(&format!("{}/v1/models", s.url)).set("Authorization", "Bearer sesame"),
        None,
    );
    serde_json::from_str::<Value>(&text).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sigterm_lets_the_requests_in_flight_finish() {
    let f = fixture();
    let mut s = start(&["--adapter", &format!("a1={}", f.adapters.join("a1").display())]);
    let expected = complete(&s, "a1", PROMPT, 30);
    let body = json!({"model": "a1", "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stream": true});
    let resp =
        ureq::post(&format!("{}/v1/completions", s.url)).send_string(&body.to_string()).unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let kill = Command::new("kill").args(["-TERM", &s.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let events = sse_events(&(first + &rest));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the stream was cut: {events:?}");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"].get(0).and_then(|c| c["text"].as_str()).map(str::to_string))
        .collect();
    assert_eq!(text, expected.1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Bounded load test (about 10 s of traffic): 4 clients cycle over the base and 3 adapters
/// (plus DoRA, in a batch of its own) while a fifth loads, swaps and unloads adapters in a loop.
/// No request may fail and each must equal what its adapter gives alone.
#[test]
fn load_test_concurrent_clients_with_adapter_churn() {
    let f = fixture();
    let args = adapter_args(f);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = start(&[&args[..], &["--max-batch", "8", "--max-adapters", "6"]].concat());
    let models = ["a1", "a2", "a3", "tiny", "dora"];
    let prompts: Vec<String> =
        (0..3).map(|i| format!("w{} w{} w{}", i + 1, i + 7, i + 13)).collect();
    let mut reference = std::collections::HashMap::new();
    for m in models {
        for p in &prompts {
            reference.insert((m, p.clone()), complete(&s, m, p, 8));
        }
    }
    let traffic = Duration::from_secs(10);
    let start = Instant::now();
    let (latencies, churn) = std::thread::scope(|sc| {
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let (s, reference, prompts) = (&s, &reference, &prompts);
                sc.spawn(move || {
                    let mut lat = Vec::new();
                    let mut i = c;
                    while start.elapsed() < traffic {
                        let (m, p) = (
                            models[i % models.len()],
                            &prompts[(i / models.len()) % prompts.len()],
                        );
                        let t = Instant::now();
                        let got = complete(s, m, p, 8);
                        lat.push(t.elapsed().as_secs_f64());
                        assert_eq!(&got, &reference[&(m, p.clone())], "client {c}: {m} on `{p}`");
                        i += 1;
                    }
                    lat
                })
            })
            .collect();
        let (s, reference, prompts) = (&s, &reference, &prompts);
        let churn = sc.spawn(move || {
            let (mut loads, mut swaps) = (Vec::new(), Vec::new());
            let mut k = 0;
            while start.elapsed() < traffic {
                let t = Instant::now();
                post_ok(s, "/v1/adapters", &json!({"name": "churn", "path": "a1"}));
                loads.push(t.elapsed().as_secs_f64());
                // a request on the freshly loaded adapter gives a1's output
                let p = &prompts[k % prompts.len()];
                assert_eq!(
                    complete(s, "churn", p, 8),
                    reference[&("a1", p.clone())],
                    "churn (a1) on `{p}`"
                );
                // swap: unload, then load another adapter under the same name
                let t = Instant::now();
                let (code, v) = call(ureq::delete(&format!("{}/v1/adapters/churn", s.url)), None);
                assert_eq!(code, 200, "{v}");
                post_ok(
                    s,
                    "/v1/load_lora_adapter",
                    &json!({"lora_name": "churn", "lora_path": "a2"}),
                );
                swaps.push(t.elapsed().as_secs_f64());
                assert_eq!(
                    complete(s, "churn", p, 8),
                    reference[&("a2", p.clone())],
                    "churn (a2) on `{p}`"
                );
                post_ok(s, "/v1/unload_lora_adapter", &json!({"lora_name": "churn"}));
                k += 1;
            }
            (loads, swaps)
        });
        let lat: Vec<f64> = clients.into_iter().flat_map(|h| h.join().unwrap()).collect();
        (lat, churn.join().unwrap())
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = latencies;
    lat.sort_by(f64::total_cmp);
    let (mut loads, mut swaps) = churn;
    loads.sort_by(f64::total_cmp);
    swaps.sort_by(f64::total_cmp);
    assert!(
        lat.len() >= 8 && !loads.is_empty(),
        "too little traffic: {} requests, {} loads",
        lat.len(),
        loads.len()
    );
    let health = get(&s, "/health");
    println!(
        "load test: {} requests in {elapsed:.1} s = {:.1} req/s, 0 failed; latency p50 {:.0} ms, p99 {:.0} ms; \
         adapter load p50 {:.1} ms ({} loads), swap p50 {:.1} ms; engine {}",
        lat.len(),
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.5) * 1e3,
        percentile(&lat, 0.99) * 1e3,
        percentile(&loads, 0.5) * 1e3,
        loads.len(),
        percentile(&swaps, 0.5) * 1e3,
        health["engine"]
    );
    assert!(health["engine"]["mixed_steps"].as_u64().unwrap() > 0, "{health}");
    assert_eq!(model_ids(&s), vec!["tiny", "a1", "a2", "a3", "dora"]);
}

#[test]
fn bench_serve_prints_one_adapter_vs_many() {
    let f = fixture();
    let o = ferrotune(&[
        "bench",
        "serve",
        "--model",
        f.model.to_str().unwrap(),
        "--requests",
        "4",
        "--prompt-len",
        "8",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    println!("bench serve: {v}");
    for k in [
        "base_tokens_per_s",
        "one_adapter_tokens_per_s",
        "n_adapters_tokens_per_s",
        "n_adapters_one_by_one_tokens_per_s",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    let _ = &f.root;
}

/// A `data:` URL of encoded image bytes.
fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A small PNG (w×h, a colour gradient) encoded in memory.
fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 40) as u8, (y * 40) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The text of the first choice (completion or chat).
fn choice_text(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"]
        .as_str()
        .or_else(|| c["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

/// The text of a streamed body: the deltas (chat) or texts (completions) of its chunks, in order.
fn streamed_text(body: &str) -> (String, Vec<String>) {
    let events = sse_events(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let pieces: Vec<String> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            let ch = c["choices"].get(0)?;
            ch["text"].as_str().or_else(|| ch["delta"]["content"].as_str()).map(str::to_string)
        })
        .collect();
    (pieces.concat(), pieces)
}

#[test]
fn stop_sequences_end_the_text_before_them_streamed_or_not() {
    let s = start(&[]);
    let full = post_ok(
        &s,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}),
    );
    let text = choice_text(&full);
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    assert!(text.len() > 8, "the base must produce some text for this test: `{text}`");
    // a stop taken from the second half of the output; it may occur earlier too
    let k = (text.len() / 2..text.len() - 2)
        .find(|&k| text.is_char_boundary(k) && text.is_char_boundary(k + 2))
        .unwrap();
    let stop = text[k..k + 2].to_string();
    let expected = text[..text.find(&stop).unwrap()].to_string();
    for (endpoint, body) in [
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": stop}),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": ["never-said", stop.clone()]}),
        ),
    ] {
        let v = post_ok(&s, endpoint, &body);
        assert_eq!(choice_text(&v), expected, "{body}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (code, raw) = call(ureq::post(&format!("{}{endpoint}", s.url)), Some(&streamed));
        assert_eq!(code, 200, "{raw}");
        let (joined, pieces) = streamed_text(&raw);
        // the pieces add up to the text before the stop: nothing past it was ever sent
        assert_eq!(joined, expected, "streamed pieces {pieces:?}");
        assert!(raw.contains("\"finish_reason\":\"stop\""), "{raw}");
    }
    // a stop never produced: the whole text, `length`
    let v = post_ok(
        &s,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": "never-said"}),
    );
    assert_eq!(
        (choice_text(&v), v["choices"][0]["finish_reason"].as_str()),
        (text.clone(), Some("length"))
    );
    // the chat endpoint too
    let msgs = json!([{"role": "user", "content": PROMPT}]);
    let chat = post_ok(
        &s,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": msgs, "max_tokens": 16, "temperature": 0}),
    );
    let chat_text = choice_text(&chat);
    let k = (chat_text.len() / 2..chat_text.len().saturating_sub(1))
        .find(|&k| chat_text.is_char_boundary(k) && chat_text.is_char_boundary(k + 1))
        .unwrap();
    let stop = chat_text[k..k + 1].to_string();
    let expected = chat_text[..chat_text.find(&stop).unwrap()].to_string();
    let body = json!({"model": "tiny", "messages": msgs, "max_tokens": 16, "temperature": 0, "stop": [stop], "stream": true});
    let (_, raw) = call(ureq::post(&format!("{}/v1/chat/completions", s.url)), Some(&body));
    assert_eq!(streamed_text(&raw).0, expected);
    // bad stops
    for stop in [json!(["a", "b", "c", "d", "e"]), json!(""), json!([1]), json!({"x": 1})] {
        let (code, v) =
            post(&s, "/v1/completions", &json!({"model": "tiny", "prompt": PROMPT, "stop": stop}));
        assert_eq!((code, v["error"]["code"].as_str()), (400, Some("invalid_stop")), "{stop}: {v}");
    }
}

#[test]
fn a_seeded_request_samples_the_same_text_alone_and_in_a_busy_batch() {
    let f = fixture();
    let s = start(&[
        "--adapter",
        &format!("a1={}", f.adapters.join("a1").display()),
        "--max-batch",
        "16",
    ]);
    let seeded = |seed: u64| json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "seed": seed, "return_token_ids": true});
    let ids = |v: &Value| v["choices"][0]["token_ids"].clone();
    let alone = post_ok(&s, "/v1/completions", &seeded(7));
    assert_eq!(
        ids(&post_ok(&s, "/v1/completions", &seeded(7))),
        ids(&alone),
        "the same seed twice alone"
    );
    let other = post_ok(&s, "/v1/completions", &seeded(8));
    assert_ne!(
        ids(&other),
        ids(&alone),
        "another seed must sample other tokens for this test to mean anything"
    );
    let greedy = post_ok(
        &s,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "return_token_ids": true}),
    );
    assert_ne!(ids(&greedy), ids(&alone), "sampling must differ from greedy here");
    for round in 0..2 {
        let busy: Vec<Value> = std::thread::scope(|sc| {
            let mut handles = Vec::new();
            for i in 0..6 {
                let body = match i % 3 {
                    0 => {
                        json!({"model": "a1", "prompt": format!("w{} w3", i + 2), "max_tokens": 20, "temperature": 1.0})
                    }
                    1 => {
                        json!({"model": "tiny", "prompt": "w9 w8", "max_tokens": 30, "temperature": 0.8, "seed": 100 + i})
                    }
                    _ => {
                        json!({"model": "a1", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
                    }
                };
                let s = &s;
                handles.push(sc.spawn(move || post_ok(s, "/v1/completions", &body)));
            }
            handles.push(sc.spawn(|| post_ok(&s, "/v1/completions", &seeded(7))));
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            ids(busy.last().unwrap()),
            ids(&alone),
            "round {round}: the seeded request in a busy batch"
        );
    }
    assert!(get(&s, "/health")["engine"]["max_rows"].as_u64().unwrap() >= 3);
}

/// A tiny random Qwen2-VL with the Qwen2 tokenizer, a LoRA for it, and two story images.
struct VlFixture {
    model: PathBuf,
    adapters: PathBuf,
    images: Vec<PathBuf>,
}

fn vl_fixture() -> &'static VlFixture {
    static F: OnceLock<VlFixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = temp_dir("serve-vl");
        remove_at_exit(&root);
        let model = root.join("tiny-vl");
        init_tiny_vl_model(&model, 3);
        let adapters = root.join("adapters");
        make_adapter(&model, &adapters.join("vl"), r#"{"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}"#, 40);
        let images = ["toy-test-008_1.png", "toy-test-008_2.png"].iter().map(|f| repo_root().join("datasets/story-llava/images").join(f)).collect();
        VlFixture { model, adapters, images }
    })
}

/// `ferrotune generate --chat --image ... --greedy --json` on the VL fixture.
fn generate_vl(
    prompt: &str,
    images: &[PathBuf],
    adapter: Option<&Path>,
    n: u64,
) -> (Vec<i64>, String) {
    let f = vl_fixture();
    let n = n.to_string();
    let mut args = vec![
        "generate",
        "--model",
        f.model.to_str().unwrap(),
        "--chat",
        "--prompt",
        prompt,
        "--greedy",
        "--max-new-tokens",
        &n,
        "--json",
    ];
    for im in images {
        args.extend(["--image", im.to_str().unwrap()]);
    }
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let o = ferrotune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    (
        v["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect(),
        v["text"].as_str().unwrap().to_string(),
    )
}

/// A greedy chat request with image parts (data URLs of `images`) then the text.
fn image_chat(model: &str, images: &[PathBuf], prompt: &str, n: u64) -> Value {
    let mut parts: Vec<Value> = images.iter().map(|p| json!({"type": "image_url", "image_url": {"url": data_url("image/png", &std::fs::read(p).unwrap())}})).collect();
    parts.push(json!({"type": "text", "text": prompt}));
    json!({"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": n, "temperature": 0, "return_token_ids": true})
}

fn ids_text(v: &Value) -> (Vec<i64>, String) {
    (
        v["choices"][0]["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect(),
        choice_text(v),
    )
}

const VL_PROMPT: &str = "Describe the story.";

#[test]
fn image_parts_equal_generate_with_images_alone_and_beside_text_rows() {
    let f = vl_fixture();
    let vl = f.adapters.join("vl");
    let s = start_on(
        &f.model,
        &f.adapters,
        &["--adapter", &format!("vl={}", vl.display()), "--max-batch", "8"],
    );
    let base =
        post_ok(&s, "/v1/chat/completions", &image_chat("tiny-vl", &f.images, VL_PROMPT, 10));
    assert_eq!(
        ids_text(&base),
        generate_vl(VL_PROMPT, &f.images, None, 10),
        "base model, 2 images"
    );
    let adapted = post_ok(&s, "/v1/chat/completions", &image_chat("vl", &f.images, VL_PROMPT, 10));
    let cli = generate_vl(VL_PROMPT, &f.images, Some(&vl), 10);
    assert_eq!(ids_text(&adapted), cli, "adapter, 2 images");
    assert_ne!(
        ids_text(&adapted),
        ids_text(&base),
        "the adapter must change the output for this test to mean anything"
    );
    let swapped = [f.images[1].clone(), f.images[0].clone()];
    let adapted_swapped =
        post_ok(&s, "/v1/chat/completions", &image_chat("vl", &swapped, VL_PROMPT, 10));
    assert_eq!(
        ids_text(&adapted_swapped),
        generate_vl(VL_PROMPT, &swapped, Some(&vl), 10),
        "adapter, images swapped"
    );
    assert_ne!(
        ids_text(&adapted_swapped),
        ids_text(&adapted),
        "the images must change the output for this test to mean anything"
    );
    // the image tokens are in the prompt: 2 images give more prompt tokens than none
    let text_only = post_ok(
        &s,
        "/v1/chat/completions",
        &json!({"model": "vl", "messages": [{"role": "user", "content": VL_PROMPT}], "max_tokens": 10, "temperature": 0, "return_token_ids": true}),
    );
    assert!(
        base["usage"]["prompt_tokens"].as_u64().unwrap()
            > text_only["usage"]["prompt_tokens"].as_u64().unwrap() + 8,
        "{base} vs {text_only}"
    );
    assert_eq!(ids_text(&text_only), generate_vl(VL_PROMPT, &[], Some(&vl), 10));
    // together in one batch (images rows with their own M-RoPE deltas beside text rows)
    let jobs = [
        image_chat("vl", &f.images, VL_PROMPT, 10),
        json!({"model": "vl", "messages": [{"role": "user", "content": VL_PROMPT}], "max_tokens": 10, "temperature": 0, "return_token_ids": true}),
        image_chat("tiny-vl", &f.images, VL_PROMPT, 10),
        image_chat("vl", &swapped, VL_PROMPT, 10),
    ];
    let expected = [&adapted, &text_only, &base, &adapted_swapped];
    let before = get(&s, "/health")["engine"]["max_rows"].as_u64().unwrap();
    for round in 0..2 {
        let together: Vec<Value> = std::thread::scope(|sc| {
            let hs: Vec<_> =
                jobs.iter().map(|b| sc.spawn(|| post_ok(&s, "/v1/chat/completions", b))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (t, e)) in together.iter().zip(expected).enumerate() {
            assert_eq!(ids_text(t), ids_text(e), "round {round}: request {i} differs in a batch");
        }
    }
    let health = get(&s, "/health");
    println!("engine after the image batches: {health} (max rows before: {before})");
    assert!(health["engine"]["max_rows"].as_u64().unwrap() >= 2, "{health}");
}

#[test]
fn bad_image_parts_are_refused_with_json_errors() {
    let f = vl_fixture();
    let s = start_on(
        &f.model,
        &f.adapters,
        &["--max-images", "2", "--max-body-bytes", "12288", "--image-max-pixels", "3136"],
    );
    let png = std::fs::read(&f.images[0]).unwrap();
    let with_url = |url: String| json!({"model": "tiny-vl", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}], "max_tokens": 2});
    let refused = |body: Value, status: u16, code: &str| {
        let (got, v) = post(&s, "/v1/chat/completions", &body);
        assert_eq!((got, v["error"]["code"].as_str()), (status, Some(code)), "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    };
    refused(with_url("https://example.com/cat.png".into()), 400, "remote_image_url");
    refused(with_url("http://127.0.0.1/cat.png".into()), 400, "remote_image_url");
    refused(with_url("data:image/png;base64,@@not base64@@".into()), 400, "invalid_image");
    refused(
        with_url(data_url("image/png", b"these bytes are no image at all")),
        400,
        "invalid_image",
    );
    refused(with_url(data_url("image/png", &png[..png.len() / 2])), 400, "invalid_image");
    refused(with_url(data_url("image/gif", &png)), 400, "unsupported_image_type");
    refused(with_url(format!("data:image/png,{}", "x")), 400, "invalid_image");
    refused(with_url("file:///etc/passwd".into()), 400, "invalid_image");
    refused(
        json!({"model": "tiny-vl", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        400,
        "invalid_image",
    );
    let three: Vec<Value> = (0..3)
        .map(|_| json!({"type": "image_url", "image_url": {"url": data_url("image/png", &png)}}))
        .collect();
    refused(
        json!({"model": "tiny-vl", "messages": [{"role": "user", "content": three}]}),
        400,
        "too_many_images",
    );
    // just over the limit: a larger body may still be on its way when the server answers 413
    // and closes, which the client then sees as a broken pipe
    let big = [png_bytes(20, 20), vec![0u8; 9_500]].concat();
    refused(with_url(data_url("image/png", &big)), 413, "request_too_large");
    // still serving, and a good image works: 200×200 resized to 56×56 (--image-max-pixels
    // 3136) is 4×4 patches of 14, 2×2 merged tokens, between <|vision_start|> and <|vision_end|>
    let ok =
        post_ok(&s, "/v1/chat/completions", &with_url(data_url("image/png", &png_bytes(200, 200))));
    assert_eq!(
        ok["choices"][0]["finish_reason"].as_str().map(|r| r == "length" || r == "stop"),
        Some(true),
        "{ok}"
    );
    let text_only = post_ok(
        &s,
        "/v1/chat/completions",
        &json!({"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(tokens(&ok), tokens(&text_only) + 2 + 4, "{ok}");

    // a text-only model refuses image parts
    let t = start(&[]);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("image/png", &png_bytes(8, 8))}}, {"type": "text", "text": PROMPT}]}]});
    let (code, v) = post(&t, "/v1/chat/completions", &body);
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("images_not_supported")), "{v}");
}

/// A folder removed when the test ends, passed or not.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the frame files of `from` into a new folder `to`.
fn copy_frames(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// `ferrotune generate --chat [--image ...] --video ... --greedy --json` on the VL fixture.
fn generate_video(prompt: &str, images: &[PathBuf], videos: &[PathBuf], n: u64) -> Value {
    let f = vl_fixture();
    let n = n.to_string();
    let mut args = vec!["generate", "--model", f.model.to_str().unwrap(), "--chat"];
    args.extend([
        "--prompt",
        prompt,
        "--greedy",
        "--max-new-tokens",
        &n,
        "--json",
        "--logprobs",
        "0",
    ]);
    for im in images {
        args.extend(["--image", im.to_str().unwrap()]);
    }
    for v in videos {
        args.extend(["--video", v.to_str().unwrap()]);
    }
    let o = ferrotune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

/// A greedy chat request: image parts (data URLs), video parts (`video_url.url` as given),
/// then the text.
fn video_chat(images: &[PathBuf], videos: &[&str], prompt: &str, n: u64) -> Value {
    let mut parts: Vec<Value> = images.iter().map(|p| json!({"type": "image_url", "image_url": {"url": data_url("image/png", &std::fs::read(p).unwrap())}})).collect();
    parts.extend(videos.iter().map(|v| json!({"type": "video_url", "video_url": {"url": v}})));
    parts.push(json!({"type": "text", "text": prompt}));
    json!({"model": "tiny-vl", "messages": [{"role": "user", "content": parts}], "max_tokens": n, "temperature": 0, "return_token_ids": true, "logprobs": true})
}

/// The greedy tokens' log-probabilities of `generate --json --logprobs` or of a chat response.
fn token_logprobs(v: &Value) -> Vec<f64> {
    let entries = v["logprobs"]
        .as_array()
        .or_else(|| v["choices"][0]["logprobs"]["content"].as_array())
        .unwrap_or_else(|| panic!("no logprobs in {v}"));
    entries.iter().map(|e| e["logprob"].as_f64().unwrap()).collect()
}

#[test]
fn video_parts_equal_generate_with_videos_and_bad_video_parts_are_refused() {
    let f = vl_fixture();
    let root = Cleanup(temp_dir("serve-video"));
    let videos = root.0.join("videos");
    let fixture_clips = repo_root().join("tests/fixtures/video");
    copy_frames(&fixture_clips.join("clip_down"), &videos.join("clip_down"));
    copy_frames(&fixture_clips.join("clip_right"), &videos.join("clip_right"));
    let outside = root.0.join("outside");
    copy_frames(&fixture_clips.join("clip_down"), &outside.join("clip"));
    std::os::unix::fs::symlink(outside.join("clip"), videos.join("link")).unwrap();
    let mixed = videos.join("mixed");
    copy_frames(&fixture_clips.join("clip_right"), &mixed);
    let first = std::fs::read_dir(&mixed).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(&first).unwrap();
    std::os::unix::fs::symlink(outside.join("clip").join(first.file_name().unwrap()), &first)
        .unwrap();
    let prompt = "Where does the square go?";
    let (down, right) = (videos.join("clip_down"), videos.join("clip_right"));

    let s = start_on(&f.model, &f.adapters, &["--video-dir", videos.to_str().unwrap()]);
    let ids = |v: &Value| -> Vec<i64> {
        let t =
            if v["choices"].is_array() { &v["choices"][0]["token_ids"] } else { &v["token_ids"] };
        t.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect()
    };
    // the same tokens, and the same log-probabilities (so the same pixels reached the model)
    let same = |got: &Value, want: &Value, what: &str| {
        assert_eq!(ids(got), ids(want), "{what}: {got}");
        let (g, w) = (token_logprobs(got), token_logprobs(want));
        let d = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d <= 1e-5, "{what}: logprobs differ by {d}: {g:?} vs {w:?}");
        d
    };
    // one video, by absolute path, relative path and file:// URL
    let want = generate_video(prompt, &[], std::slice::from_ref(&down), 8);
    assert_eq!(ids(&want).len(), 8, "{want}");
    let abs = down.to_str().unwrap().to_string();
    for url in [abs.clone(), "clip_down".to_string(), format!("file://{abs}")] {
        let got = post_ok(&s, "/v1/chat/completions", &video_chat(&[], &[&url], prompt, 8));
        same(&got, &want, &format!("video_url {url}"));
        assert_eq!(choice_text(&got), want["text"].as_str().unwrap());
    }
    // the video matters: another clip, or none, gives other logits
    let other = generate_video(prompt, &[], std::slice::from_ref(&right), 8);
    let text_only = post_ok(&s, "/v1/chat/completions", &video_chat(&[], &[], prompt, 8));
    let with_video = post_ok(
        &s,
        "/v1/chat/completions",
        &json!({"model": "tiny-vl", "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": abs}}, {"type": "text", "text": prompt}]}], "max_tokens": 1, "logprobs": true}),
    );
    let no_video = post_ok(
        &s,
        "/v1/chat/completions",
        &json!({"model": "tiny-vl", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "logprobs": true}),
    );
    let lp = |v: &Value| v["choices"][0]["logprobs"]["content"][0]["logprob"].as_f64().unwrap();
    assert_ne!(lp(&with_video), lp(&no_video), "the video changes the model's output");
    assert!(
        text_only["usage"]["prompt_tokens"].as_u64().unwrap() + 2
            < with_video["usage"]["prompt_tokens"].as_u64().unwrap(),
        "the video's block of tokens is in the prompt"
    );
    // an image and two videos in one turn, alone and beside text rows
    let (image, both) = (&f.images[..1], [down.clone(), right.clone()]);
    let want2 = generate_video(prompt, image, &both, 8);
    let body = video_chat(image, &["clip_down", "clip_right"], prompt, 8);
    same(&post_ok(&s, "/v1/chat/completions", &body), &want2, "an image and two videos");
    let together: Vec<Value> = std::thread::scope(|sc| {
        let a = sc.spawn(|| post_ok(&s, "/v1/chat/completions", &body));
        let b = sc.spawn(|| post_ok(&s, "/v1/chat/completions", &video_chat(&[], &[], prompt, 8)));
        let c = sc.spawn(|| {
            post_ok(&s, "/v1/chat/completions", &video_chat(&[], &["clip_right"], prompt, 8))
        });
        vec![a.join().unwrap(), b.join().unwrap(), c.join().unwrap()]
    });
    let mixed = [
        same(&together[0], &want2, "image + videos beside other rows"),
        same(&together[1], &text_only, "a text row beside video rows"),
        same(&together[2], &other, "a video row beside other rows"),
    ];
    println!(
        "videos in a mixed batch: max |logprob - alone| {:.3e}",
        mixed.iter().fold(0.0, |a: f64, &b| a.max(b))
    );

    // a video file, as a data URL and by path (a build that decodes video files: feature
    // ffmpeg; without it the data URL is refused below)
    if ferrotune::vision::VIDEO_FILE_DECODING {
        let mp4 = fixture_clips.join("counter.mp4");
        std::fs::copy(&mp4, videos.join("counter.mp4")).unwrap();
        let want = generate_video(prompt, &[], std::slice::from_ref(&mp4), 8);
        let url = data_url("video/mp4", &std::fs::read(&mp4).unwrap());
        for url in [url.as_str(), "counter.mp4"] {
            let got = post_ok(&s, "/v1/chat/completions", &video_chat(&[], &[url], prompt, 8));
            same(&got, &want, &format!("counter.mp4 as {}", &url[..url.len().min(24)]));
        }
        println!("counter.mp4: serve (data URL, path) == generate --video: {:?}", ids(&want));
    }

    // refusals
    let refused = |s: &Server, body: Value, status: u16, code: &str| {
        let (got, v) = post(s, "/v1/chat/completions", &body);
        assert_eq!((got, v["error"]["code"].as_str()), (status, Some(code)), "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("video_url")), "{v}");
    };
    let one = |url: &str| video_chat(&[], &[url], prompt, 2);
    let outside_clip = outside.join("clip");
    refused(&s, one(outside_clip.to_str().unwrap()), 403, "path_outside_video_dir");
    refused(&s, one("../outside/clip"), 403, "path_outside_video_dir");
    refused(&s, one("/no/such/folder"), 403, "path_outside_video_dir");
    refused(&s, one("link"), 403, "path_outside_video_dir");
    refused(&s, one("mixed"), 403, "path_outside_video_dir");
    refused(&s, one("no_such_clip"), 404, "video_path_not_found");
    refused(&s, one("https://example.com/clip.mp4"), 400, "remote_video_url");
    refused(&s, one("data:video/mp4;base64,@@not base64@@"), 400, "invalid_video");
    refused(&s, one(&data_url("image/png", &png_bytes(8, 8))), 400, "unsupported_video_type");
    let garbage = data_url("video/mp4", b"these bytes are no video at all");
    let code = if ferrotune::vision::VIDEO_FILE_DECODING {
        "invalid_video"
    } else {
        "video_decoding_unavailable"
    };
    refused(&s, one(&garbage), 400, code);
    refused(
        &s,
        json!({"model": "tiny-vl", "messages": [{"role": "user", "content": [{"type": "video_url"}]}]}),
        400,
        "invalid_video",
    );
    let three = video_chat(&[], &["clip_down", "clip_down", "clip_down"], prompt, 2);
    refused(&s, three, 400, "too_many_videos");
    // still serving
    assert_eq!(ids(&post_ok(&s, "/v1/chat/completions", &one("clip_down"))), ids(&want)[..2]);

    // without --video-dir paths are refused; a text-only model refuses video parts
    let plain = start_on(&f.model, &f.adapters, &[]);
    refused(&plain, one(&abs), 403, "video_dir_not_set");
    let t = start(&["--video-dir", videos.to_str().unwrap()]);
    let mut body = one(&abs);
    body["model"] = json!("tiny");
    refused(&t, body, 400, "videos_not_supported");
    let o = ferrotune(&[
        "generate",
        "--model",
        fixture().model.to_str().unwrap(),
        "--video",
        &abs,
        "--prompt",
        prompt,
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--video needs a vision-language model"),
        "{}",
        stderr(&o)
    );
}

/// One batch of requests for the base model, LoRA adapters, two prompt-tuning adapters (each row
/// its own virtual tokens, sharing the mixed batch) and an IA³ adapter (its own batch): each
/// gives what it gives alone, and what `ferrotune generate --adapter` gives.
#[test]
fn base_lora_prompt_tuning_and_ia3_requests_share_a_batch_and_each_gets_its_own_output() {
    let f = fixture();
    let mut args = Vec::new();
    let dir = |n: &str| {
        if n.starts_with('a') {
            f.adapters.join(n)
        } else {
            f.root.join("methods").join(n)
        }
    };
    for n in ["a1", "a2", "ia3", "pt1", "pt2"] {
        args.push("--adapter".to_string());
        args.push(format!("{n}={}", dir(n).display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = start(&[&args[..], &["--max-batch", "16"]].concat());
    let jobs: Vec<(&str, String)> = ["pt1", "tiny", "a1", "ia3", "pt2", "a2", "pt1", "ia3"]
        .iter()
        .enumerate()
        .map(|(i, m)| (*m, format!("w{} w{} w{}", i + 3, 2 * i + 5, 3 * i + 1)))
        .collect();
    let alone: Vec<_> = jobs.iter().map(|(m, p)| complete(&s, m, p, 20)).collect();
    for (i, (m, p)) in jobs.iter().enumerate() {
        let adapter = (*m != "tiny").then(|| dir(m));
        assert_eq!(
            alone[i],
            generate(p, adapter.as_deref(), false, 20),
            "request {i} ({m}) vs generate"
        );
    }
    // The tiny random model repeats one token whatever the adapter; its log-probability shows
    // that each adapter changes the model.
    let first_logprob = |m: &str| {
        let v = post_ok(
            &s,
            "/v1/chat/completions",
            &json!({"model": m, "messages": [{"role": "user", "content": "w3 w5 w1"}], "max_tokens": 1, "temperature": 0, "logprobs": true}),
        );
        token_logprobs(&v)[0]
    };
    let base = first_logprob("tiny");
    for m in ["a1", "ia3", "pt1", "pt2"] {
        let lp = first_logprob(m);
        assert!((lp - base).abs() > 1e-4, "{m} leaves the first log-probability at {base} ({lp})");
    }
    let before = get(&s, "/health")["engine"]["mixed_steps"].as_u64().unwrap();
    let together: Vec<_> = std::thread::scope(|sc| {
        let handles: Vec<_> =
            jobs.iter().map(|(m, p)| sc.spawn(|| complete(&s, m, p, 20))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i} ({}) differs in a batch", jobs[i].0);
    }
    let health = get(&s, "/health");
    println!("engine after the concurrent round: {health}");
    assert!(health["engine"]["mixed_steps"].as_u64().unwrap() > before, "{health}");
}

/// Every adapter method of the PEFT family loads through the API, answers as
/// `ferrotune generate --adapter` does, changes the model, and unloads, the base unaffected.
#[test]
fn every_peft_method_loads_answers_and_unloads_in_serve() {
    let f = fixture();
    let methods = f.root.join("methods");
    let s = start_on(&f.model, &methods, &[]);
    let prompt = "w4 w9 w2";
    let base = complete(&s, "tiny", prompt, 12);
    let first_logprob = |m: &str| {
        let v = post_ok(
            &s,
            "/v1/chat/completions",
            &json!({"model": m, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0, "logprobs": true}),
        );
        token_logprobs(&v)[0]
    };
    let base_lp = first_logprob("tiny");
    for name in ["ia3", "vera", "loha", "lokr", "pt1", "ptune", "prefix"] {
        post_ok(&s, "/v1/adapters", &json!({"name": name, "path": name}));
        assert_eq!(model_ids(&s), vec!["tiny", name]);
        assert_eq!(
            complete(&s, name, prompt, 12),
            generate(prompt, Some(&methods.join(name)), false, 12),
            "{name}: served vs generate --adapter"
        );
        let lp = first_logprob(name);
        assert!(
            (lp - base_lp).abs() > 1e-4,
            "{name} leaves the first log-probability at {base_lp}"
        );
        let (code, v) = call(ureq::delete(&format!("{}/v1/adapters/{name}", s.url)), None);
        assert_eq!(code, 200, "{name}: {v}");
        assert_eq!(model_ids(&s), vec!["tiny"]);
        assert_eq!(complete(&s, "tiny", prompt, 12), base, "{name}: the base after unloading");
    }
}
