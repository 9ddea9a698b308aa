//! An adapter method built outside the workspace (`external-scale`, in
//! tests/fixtures/external-plugin/src/adapter.rs: a learned per-channel scale and shift of a
//! layer's output) trains, is served, generates and merges through the `ferrotune` binary of
//! the workspace build, found through `--plugin-dir`: no host rebuild, and no row of the
//! host's `PEFT_METHODS` (its adapter_config.json names its plugin under `ferrotune_plugin`).
//! Also: the README's adapter-plugin excerpts are the source they quote.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferrotune_tests::server::Server;
use ferrotune_tests::*;
use serde_json::{json, Value};

const PROMPT: &str = "w1 w2 w3 w4";
const PLUGIN: &str = "external-scale";
const SHIFTED: &str = "target_modules: [q_proj, v_proj, down_proj], shift: true";

/// Builds tests/fixtures/external-plugin in a scratch workspace under target/ (against this
/// tree's plugin-api, the same torch), as load_failures does, and returns the library. The
/// package gets a name of its own there, so that load_failures' builds into the same target
/// folder never replace the file this test copies.
fn build_external() -> PathBuf {
    let root = repo_root();
    let ws = root.join("target/ext-plugins-work/adapter");
    let target = root.join("target/ext-plugins");
    let _ = std::fs::remove_dir_all(&ws);
    copy_dir(&root.join("plugin-api"), &ws.join("plugin-api"));
    copy_dir(&root.join("tests/fixtures/external-plugin"), &ws.join("plugin"));
    let manifest = ws.join("plugin/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("name = \"external-reward\"", "name = \"external-adapter-check\"")
        .replace("@PLUGIN_API@", "../plugin-api")
        .replace("@BUILD_SUPPORT@", &root.join("build-support").display().to_string());
    std::fs::write(&manifest, text).unwrap();
    let ws_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let start = ws_manifest.find("members = [").unwrap();
    let end = start + ws_manifest[start..].find(']').unwrap() + 1;
    std::fs::write(
        ws.join("Cargo.toml"),
        format!(
            "{}members = [\"plugin-api\", \"plugin\"]{}",
            &ws_manifest[..start],
            &ws_manifest[end..]
        ),
    )
    .unwrap();
    std::fs::copy(root.join("Cargo.lock"), ws.join("Cargo.lock")).unwrap();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--offline", "-p", "external-adapter-check", "--manifest-path"])
        .arg(ws.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "building the external plugin failed:\n{}", stderr(&out));
    let lib = target.join("debug/libexternal_adapter_check.so");
    let _ = std::fs::remove_dir_all(&ws);
    lib
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "target" {
                copy_dir(&entry.path(), &dst);
            }
        } else {
            std::fs::copy(entry.path(), dst).unwrap();
        }
    }
}

/// `ferrotune ARGS` on one thread; panics with its output unless it succeeds.
fn run_ok(args: &[&str]) -> Output {
    let o = ferrotune_one_thread(args);
    assert!(o.status.success(), "ferrotune {args:?}:\n{}\n{}", stdout(&o), stderr(&o));
    o
}

/// Trains `external-scale` with `adapter` (YAML flow mapping body) for `steps` steps on one
/// fixed batch, `extra` appended to the config; returns the per-step losses.
fn train(
    work: &Path,
    plugins: &Path,
    adapter: &str,
    extra: &str,
    out: &Path,
    steps: usize,
) -> Vec<f64> {
    let config = work.join(format!("{}.yaml", out.file_name().unwrap().to_str().unwrap()));
    std::fs::write(
        &config,
        format!(
            "model: {model}\noutput_dir: {out}\nseed: 3\n\
             adapter: {{plugin: {PLUGIN}, {adapter}}}\n\
             optimizer: {{lr: 5.0e-2, weight_decay: 0.0, max_grad_norm: null}}\n\
             scheduler: {{type: constant}}\n\
             data: {{plugin: alpaca, path: {data}, cutoff_len: 64}}\n\
             training: {{max_steps: {steps}, micro_batch_size: 2, progress_bar: false}}\n{extra}",
            model = work.join("tiny").display(),
            out = out.display(),
            data = work.join("data.jsonl").display()
        ),
    )
    .unwrap();
    run_ok(&["train", "--plugin-dir", plugins.to_str().unwrap(), config.to_str().unwrap()]);
    read_jsonl(&out.join("metrics.jsonl")).iter().filter_map(|l| l["loss"].as_f64()).collect()
}

/// Greedy `generate --json --logprobs 0` on `model` (with `adapter`): token ids, log-probs.
fn generate(model: &Path, plugins: &Path, adapter: Option<&Path>) -> (Vec<i64>, Vec<f64>) {
    let mut args = vec![
        "generate",
        "--plugin-dir",
        plugins.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--greedy",
        "--max-new-tokens",
        "10",
        "--json",
        "--logprobs",
        "0",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let v: Value = serde_json::from_str(stdout(&run_ok(&args)).trim()).unwrap();
    let ids = v["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    let lps = v["logprobs"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap());
    (ids, lps.collect())
}

/// The saved tensors of an adapter directory, by key.
fn saved(dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut t = tch::Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// `(status, JSON body)` of a POST or DELETE to the server.
fn request(s: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let req = ureq::request(method, &format!("{}{path}", s.url));
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
        None => req.call(),
    };
    let (code, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    };
    (code, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")))
}

/// Greedy completion token ids from the server.
fn complete(s: &Server, model: &str) -> Vec<i64> {
    let body = json!({"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "return_token_ids": true});
    let (code, v) = request(s, "POST", "/v1/completions", Some(body));
    assert_eq!(code, 200, "{v}");
    v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect()
}

#[test]
fn an_adapter_method_built_outside_the_workspace_trains_serves_and_merges() {
    let lib = build_external();
    let work = TempDir::new("external-adapter");
    let w = &work.0;
    // A plugin folder of this test's own; the workspace's plugins stay on the default path.
    let plugins = w.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(&lib, plugins.join("libexternal_plugins.so")).unwrap();
    let listed = stdout(&run_ok(&["plugins", "--plugin-dir", plugins.to_str().unwrap()]));
    assert!(listed.contains(PLUGIN) && listed.contains("lora"), "{listed}");
    write_chat_tokenizer(&w.join("tok"), 40);
    let model = w.join("tiny");
    init_tiny_model(&w.join("tok/tokenizer.json"), &model, 3);
    write_alpaca_rows(&w.join("data.jsonl"), 2, 40, 5);

    // train: one batch seen 8 times, the loss falls, every saved tensor moved from zero
    let adapters = w.join("adapters");
    let shifted = adapters.join("shifted");
    let losses = train(w, &plugins, SHIFTED, "", &shifted, 8);
    println!("external-scale losses: {losses:?}");
    assert_eq!(losses.len(), 8);
    assert!(losses[7] < losses[0] - 1e-3, "the loss did not fall: {losses:?}");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(shifted.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (config["ferrotune_plugin"].as_str(), config["peft_type"].as_str()),
        (Some(PLUGIN), Some("EXTERNAL_SCALE"))
    );
    let tensors = saved(&shifted);
    let layers = tensors.iter().filter(|(k, _)| k.ends_with(".scale")).count();
    assert!(
        layers >= 3 && tensors.len() == 2 * layers,
        "{:?}",
        tensors.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for (k, t) in &tensors {
        assert!(
            k.starts_with("base_model.model.model.layers.")
                && (k.ends_with(".scale") || k.ends_with(".shift")),
            "{k}"
        );
        let moved = t.abs().max().double_value(&[]);
        assert!(moved > 1e-3, "{k} did not move from zero ({moved:.2e})");
    }

    // generate with the adapter directory: the host loads it through the plugin it names
    let base = generate(&model, &plugins, None);
    let adapted = generate(&model, &plugins, Some(&shifted));
    assert_ne!(
        adapted.0, base.0,
        "the trained adapter must change the greedy output for the serve check to mean anything"
    );

    // adapter_init: a run starting from the saved adapter starts where the first one ended (its
    // first loss is below the first run's last, taken before that run's last update)
    let init = format!("adapter_init: {}\n", shifted.display());
    let resumed = train(w, &plugins, SHIFTED, &init, &w.join("resumed"), 1);
    println!(
        "adapter_init: first loss {:.4} (first run: {:.4} -> {:.4})",
        resumed[0], losses[0], losses[7]
    );
    assert!(resumed[0] < losses[7], "{resumed:?} vs {losses:?}");

    // serve: load the adapter at runtime, alone and in one batch with the base, then unload it
    let s = Server::start(
        &model,
        &["--plugin-dir", plugins.to_str().unwrap(), "--adapter-dir", adapters.to_str().unwrap()],
    );
    let (code, v) =
        request(&s, "POST", "/v1/adapters", Some(json!({"name": "ext", "path": "shifted"})));
    assert_eq!(code, 200, "{v}");
    assert_eq!(complete(&s, "ext"), adapted.0, "served output == generate --adapter");
    assert_eq!(complete(&s, "tiny"), base.0);
    let (mixed_ext, mixed_base) = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..4)
            .map(|i| {
                scope.spawn({
                    let s = &s;
                    move || complete(s, if i % 2 == 0 { "ext" } else { "tiny" })
                })
            })
            .collect();
        let outs: Vec<Vec<i64>> = runs.into_iter().map(|r| r.join().unwrap()).collect();
        (outs[0].clone(), outs[1].clone())
    });
    assert_eq!(
        (mixed_ext, mixed_base),
        (adapted.0.clone(), base.0.clone()),
        "concurrent (batched) requests give what each gets alone"
    );
    let (code, v) = request(&s, "DELETE", "/v1/adapters/ext", None);
    assert_eq!(code, 200, "{v}");
    let body = json!({"model": "ext", "prompt": PROMPT});
    assert_eq!(request(&s, "POST", "/v1/completions", Some(body)).0, 404);
    drop(s);

    // merge: a shift on a layer without a bias (down_proj) is refused naming the layer, and
    // nothing is written; scale and shift on q/k/v (which have biases) merge into weight and
    // bias, and the merged model gives the adapter's tokens and log-probabilities
    let o = ferrotune_one_thread(&[
        "merge",
        "--plugin-dir",
        plugins.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        shifted.to_str().unwrap(),
        "--out",
        w.join("no-merge").to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("mlp.down_proj` has no bias") && e.contains("shift"),
        "{e}"
    );
    assert!(!w.join("no-merge").join("config.json").exists());
    let attn = adapters.join("attn");
    let losses =
        train(w, &plugins, "target_modules: [q_proj, k_proj, v_proj], shift: true", "", &attn, 4);
    assert!(losses[3] < losses[0], "{losses:?}");
    let merged = w.join("merged");
    run_ok(&[
        "merge",
        "--plugin-dir",
        plugins.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        attn.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let with_adapter = generate(&model, &plugins, Some(&attn));
    let from_merged = generate(&merged, &plugins, None);
    assert_eq!(from_merged.0, with_adapter.0);
    let diff =
        with_adapter.1.iter().zip(&from_merged.1).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    println!(
        "merged vs adapter: max |logprob diff| {diff:.2e} over {} tokens",
        from_merged.1.len()
    );
    assert!(diff < 1e-4, "{diff}");
    let moved = with_adapter.1.iter().zip(&base.1).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    println!("q/k/v adapter vs base: max |logprob diff| {moved:.2e}");
    assert!(
        with_adapter.0 != base.0 || moved > 1e-3,
        "the q/k/v adapter must change the output for the merge check to mean anything"
    );

    // the plugin validates its own keys; the host checks the tensors against the layers the
    // plugin builds, by name, and refuses a plugin that is not on the plugin path
    let bad = |name: &str, edit: &dyn Fn(&mut Value)| -> String {
        let dir = w.join(name);
        copy_dir(&attn, &dir);
        let mut c: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        edit(&mut c);
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
        let o = ferrotune_one_thread(&[
            "generate",
            "--plugin-dir",
            plugins.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--adapter",
            dir.to_str().unwrap(),
        ]);
        assert!(!o.status.success(), "{name} loaded");
        stderr(&o)
    };
    let e = bad("unknown-key", &|c| c["rank"] = json!(4));
    assert!(e.contains("rank") && e.contains(PLUGIN), "{e}");
    let e = bad("more-targets", &|c| {
        c["target_modules"] = json!(["q_proj", "k_proj", "v_proj", "o_proj"])
    });
    assert!(e.contains("missing key") && e.contains("self_attn.o_proj.scale`"), "{e}");
    let e = bad("no-plugin", &|c| c["ferrotune_plugin"] = json!("external-scale-v2"));
    assert!(e.contains("no adapter plugin named `external-scale-v2`"), "{e}");
}

/// Each ```rust block of the README's "Writing an adapter plugin" (indented as a list item's)
/// opens with a comment naming its source file; the rest, parts separated by `// …` lines, are
/// verbatim excerpts of that file.
#[test]
fn readme_adapter_plugin_excerpts_are_the_source() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("### Writing an adapter plugin").expect("README has the section");
    let section = &readme[start..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut open: Option<(usize, Vec<String>)> = None;
    for line in section.lines() {
        let trimmed = line.trim_start();
        match open.take() {
            None if trimmed == "```rust" => open = Some((line.len() - trimmed.len(), Vec::new())),
            None => {}
            Some((_, lines)) if trimmed == "```" => blocks.push(lines),
            Some((indent, mut lines)) => {
                let cut = line.len() - line.trim_start_matches(' ').len();
                lines.push(line[cut.min(indent)..].to_string());
                open = Some((indent, lines));
            }
        }
    }
    assert!(open.is_none(), "an unclosed block");
    assert!(blocks.len() >= 4, "{} excerpts", blocks.len());
    for block in &blocks {
        let file = block[0]
            .strip_prefix("// ")
            .unwrap_or_else(|| panic!("a block that names no source: {block:?}"));
        let source = std::fs::read_to_string(repo_root().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        for part in block[1..].split(|l| l == "// …") {
            let part = part.join("\n");
            assert!(source.contains(&part), "README excerpt of {file} drifted from it:\n{part}");
        }
    }
}
