//! Adapters inside the model against peft 0.21 and transformers 5, on tiny Qwen2 models made by
//! `ferrotune init-model` (hidden 64, tied embeddings, float32):
//! * peft loads the PEFT directories we write (LoRA on all linear layers, DoRA, PiSSA; A, B and
//!   the magnitude perturbed so that the adapter matters) and computes our logits;
//! * we load directories peft wrote (`save_pretrained`: LoRA r=4 on q_proj/v_proj, DoRA on
//!   all linear layers, random non-zero B) and compute peft's logits;
//! * `modules_to_save` both ways: peft loads our directories with a trained copy of the tied
//!   `lm_head` (also named in target_modules: neither peft nor we adapt it) or of
//!   `embed_tokens`; we load peft's with copies of both (each its own) and compute peft's
//!   logits, and peft's logits with the adapter disabled; each copy changes the logits;
//! * transformers loads the merged directories `ferrotune merge` writes (LoRA, DoRA, LoRA on
//!   the tied lm_head, and the saved lm_head or embed_tokens copy, all of which untie the head)
//!   and computes the unmerged adapter's logits;
//! * `ferrotune train` with `modules_to_save: [lm_head]` trains the copy;
//! * `ferrotune generate --adapter` gives peft's greedy tokens (real Qwen2 tokenizer);
//! * PiSSA leaves the logits unchanged at initialisation, the tied lm_head included;
//! * broken adapter directories are refused with an error naming the file, key or tensor, and
//!   leave the model as it was.
//!
//! Every logits comparison: max |ours − theirs| ≤ 1e-5.
//!
//! Needs `cargo build -p ferrotune -p ferrotune-lora -p ferrotune-testkit` and the reference
//! stack (`$PYTHON` or `.venv`: torch 2.11, transformers 5, peft 0.21); one
//! Python run (`tests/python/adapter_reference.py`) serves every test of this file.
use ferrotune::model::ForwardArgs;
use ferrotune::peft::PeftModel;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::model::CausalLM;
use ferrotune::plugins::Registry;
use ferrotune_plugin_api::ForwardFlags;
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

/// Largest accepted |difference| between two logits tensors (float32).
const TOL: f64 = 1e-5;

/// Adapters we write (plugin `lora` configurations), on the `base` model.
const OURS: &[(&str, &str)] = &[
    ("lora", r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#),
    (
        "dora",
        r#"{"r": 4, "lora_alpha": 16, "use_dora": true, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}"#,
    ),
    (
        "pissa",
        r#"{"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa", "target_modules": ["q_proj", "v_proj"]}"#,
    ),
    (
        "lora_head",
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}"#,
    ),
    (
        "save_head",
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"], "modules_to_save": ["lm_head"]}"#,
    ),
    (
        "save_embed",
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]}"#,
    ),
];
/// Which of ours peft loads, and which `ferrotune merge` merges for transformers.
const PEFT_LOADS: &[&str] = &["lora", "dora", "pissa", "save_head", "save_embed"];
const MERGED: &[&str] = &["lora", "dora", "lora_head", "save_head", "save_embed"];
/// Which merges give the tied lm_head a weight of its own.
const UNTIED_BY_MERGE: &[&str] = &["lora_head", "save_head", "save_embed"];
/// Adapters peft writes: `LoraConfig(**config)` keys.
const PEFT_WRITES: &[(&str, &str)] = &[
    ("lora", r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}"#),
    ("dora", r#"{"r": 4, "lora_alpha": 16, "use_dora": true, "target_modules": "all-linear"}"#),
    (
        "save_both",
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "embed_tokens"]}"#,
    ),
];
/// peft's saved keys of the copies of `lm_head` and `embed_tokens` (`modules_to_save`).
const SAVED_HEAD: &str = "base_model.model.lm_head.weight";
const SAVED_EMBED: &str = "base_model.model.model.embed_tokens.weight";
const GENERATE_PROMPT: &str = "Once upon a time, in a village by the sea, there lived";
const GENERATE_TOKENS: usize = 16;

struct Fixture {
    work: PathBuf,
    /// Qwen2 tiny with a 203-token tokenizer.
    base: PathBuf,
    /// Qwen2 tiny with the real Qwen2 tokenizer (for `generate`).
    qwen: PathBuf,
}

fn ids() -> Tensor {
    Tensor::from_slice(&[3i64, 17, 42, 99, 150, 7, 64, 201, 5, 5, 120, 33, 2, 180, 11, 90])
        .view([2, 8])
}

fn ids_json() -> serde_json::Value {
    let v: Vec<i64> = Vec::try_from(&ids().view([-1])).unwrap();
    serde_json::json!(v.chunks(8).map(|c| c.to_vec()).collect::<Vec<_>>())
}

fn lora_registry() -> Registry {
    let lib = build_dir().join("libferrotune_lora.so");
    assert!(
        lib.exists(),
        "{} is missing: `cargo build -p ferrotune -p ferrotune-lora -p ferrotune-testkit` first",
        lib.display()
    );
    registry()
}

fn load(dir: &Path) -> PeftModel {
    CausalLM::load(dir, Device::Cpu, Kind::Float)
        .map(PeftModel::new)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn attach(
    model: &mut PeftModel,
    registry: &Registry,
    config: &str,
) -> ferrotune::peft::adapters::AttachReport {
    let method = registry.adapter("lora", config).unwrap_or_else(|e| panic!("{config}: {e}"));
    model.attach_adapter("default", Box::new(method)).unwrap_or_else(|e| panic!("{config}: {e:#}"))
}

/// Moves every adapter tensor away from its initial value (B = 0 would make the test trivial):
/// A, B and the copies of `modules_to_save` by N(0, 0.1²), DoRA's magnitude by 1 + N(0, 0.2²).
fn perturb(model: &mut PeftModel, seed: i64) {
    perturb_adapter(model, seed, 0.1);
}

fn logits(model: &PeftModel) -> Tensor {
    tch::no_grad(|| model.forward(ForwardArgs::ids(&ids()))).unwrap()
}

fn disabled_logits(model: &PeftModel) -> Tensor {
    tch::no_grad(|| {
        model.forward(
            ForwardArgs::ids(&ids()).mode(model.mode(ForwardFlags::DISABLE_ADAPTER, false)),
        )
    })
    .unwrap()
}

/// The logits of `model`'s adapter with the copy saved under `key` put back to the original
/// module's weight: how much that one copy matters.
fn logits_without_copy(model: &mut PeftModel, key: &str) -> Tensor {
    let original = match key {
        SAVED_HEAD => model.linears().last().unwrap().1.weight.copy(),
        SAVED_EMBED => model.embed_tokens().copy(),
        _ => panic!("no original known for {key}"),
    };
    let trained = model.adapter_state_dict().unwrap();
    let reverted = trained
        .iter()
        .map(|(k, t)| (k.clone(), if k == key { original.copy() } else { t.copy() }))
        .collect();
    model.load_adapter_state_dict(reverted).unwrap();
    let out = logits(model);
    model.load_adapter_state_dict(trained).unwrap();
    out
}

/// Asserts that each copy in `keys` changes `model`'s logits by more than 1e-2.
fn each_copy_matters(what: &str, model: &mut PeftModel, keys: &[&str]) {
    let with = logits(model);
    for key in keys {
        let d = max_abs_diff(&with, &logits_without_copy(model, key));
        println!("{what}: the copy {key} changes the logits by {d:.3e}");
        assert!(
            d > 1e-2,
            "{what}: the copy {key} must change the logits for the test to mean anything ({d:e})"
        );
    }
}

/// The saved copies' keys a configuration's `modules_to_save` gives (lm_head, embed_tokens).
fn copy_keys(config: &str) -> Vec<&'static str> {
    let v: serde_json::Value = serde_json::from_str(config).unwrap();
    let saved = |m: &str| v["modules_to_save"].as_array().is_some_and(|a| a.iter().any(|x| x == m));
    [("lm_head", SAVED_HEAD), ("embed_tokens", SAVED_EMBED)]
        .into_iter()
        .filter(|(m, _)| saved(m))
        .map(|(_, k)| k)
        .collect()
}
fn write_logits(path: &Path, t: &Tensor) {
    Tensor::write_safetensors(&[("logits", t)], path).unwrap();
}

fn read_logits(path: &Path) -> Tensor {
    let mut v =
        Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v.remove(v.iter().position(|(n, _)| n == "logits").expect("a `logits` tensor")).1
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = max_abs_diff(ours, theirs);
    let scale = theirs.abs().max().double_value(&[]);
    println!("{what:<58} max |diff| {d:.3e} (max |logit| {scale:.3})");
    assert!(d <= TOL, "{what}: max |diff| {d:e} > {TOL:e}");
}

fn init_model(tokenizer: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "init-model",
        "--preset",
        "tiny",
        "--dtype",
        "f32",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = ferrotune(&args);
    assert!(o.status.success(), "init-model: {}", stderr(&o));
}

fn qwen_tokenizer() -> PathBuf {
    let dir = repo_root().join("assets/qwen2-tokenizer");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: run `make .stamps/qwen-tokenizer` (make test does)",
        dir.display()
    );
    dir
}

fn ours_dir(work: &Path, name: &str) -> PathBuf {
    work.join(format!("ours-{name}"))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(prepare)
}

/// Removes the work folders of earlier runs (about 50 MB each) whose process has ended; the
/// current run's folder is kept for inspection until the next run.
fn remove_stale_work_dirs() {
    let prefix = "ferrotune-test-adapter-interop-";
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn prepare() -> Fixture {
    one_torch_thread();
    remove_stale_work_dirs();
    let work = temp_dir("adapter-interop");
    let tokenizer = work.join("tokenizer");
    write_tiny_tokenizer(&tokenizer, 200);
    let base = work.join("base");
    init_model(&tokenizer, &base, &["--seed", "5"]);
    let qwen = work.join("qwen");
    init_model(&qwen_tokenizer(), &qwen, &["--seed", "11"]);
    let registry = lora_registry();

    for (i, (name, config)) in OURS.iter().enumerate() {
        let mut model = load(&base);
        tch::manual_seed(100 + i as i64); // A's initial draw
        let report = attach(&mut model, &registry, config);
        println!("ours {name}: {}", report.summary());
        perturb(&mut model, 100 + i as i64);
        model.save_peft_adapter(&ours_dir(&work, name)).unwrap();
        write_logits(&work.join(format!("ours-{name}.logits.safetensors")), &logits(&model));
    }
    let mut model = load(&qwen);
    tch::manual_seed(200);
    attach(&mut model, &registry, r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#);
    perturb(&mut model, 200);
    model.save_peft_adapter(&ours_dir(&work, "generate")).unwrap();

    for &name in MERGED {
        let out = work.join(format!("merged-{name}"));
        let o = ferrotune(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            ours_dir(&work, name).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "merge {name}: {}", stderr(&o));
        println!("{}", stdout(&o).trim());
    }

    let entry = |kind: &str, name: &str, dir: PathBuf| serde_json::json!({"name": name, "dir": dir, "out": work.join(format!("{kind}-{name}.logits.safetensors"))});
    let plan = serde_json::json!({
        "base": base,
        "ids": ids_json(),
        "peft_loads": PEFT_LOADS.iter().copied().map(|n| entry("peft-loads", n, ours_dir(&work, n))).collect::<Vec<_>>(),
        "peft_writes": PEFT_WRITES.iter().enumerate().map(|(i, (n, c))| {
            let mut e = entry("peft-writes", n, work.join(format!("peft-{n}")));
            e["config"] = serde_json::from_str(c).unwrap();
            e["seed"] = serde_json::json!(300 + i);
            e["out_disabled"] = serde_json::json!(work.join(format!("peft-writes-{n}.disabled.logits.safetensors")));
            e
        }).collect::<Vec<_>>(),
        "transformers_loads": MERGED.iter().copied().map(|n| entry("transformers-loads", n, work.join(format!("merged-{n}")))).collect::<Vec<_>>(),
        "generate": {"base": qwen, "adapter": ours_dir(&work, "generate"), "prompt": GENERATE_PROMPT,
                     "max_new_tokens": GENERATE_TOKENS, "out": work.join("generate.json")},
    });
    std::fs::write(work.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/adapter_reference.py");
    let out = run_python(&[script.as_os_str(), work.as_os_str()]);
    println!("{}", stdout(&out).trim());
    Fixture { work, base, qwen }
}

// ---------------------------------------------------------------- tests

#[test]
fn peft_loads_our_adapter_directories() {
    let f = fixture();
    for name in PEFT_LOADS.iter().copied() {
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(ours_dir(&f.work, name).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert!(
            config["base_model_name_or_path"].as_str().is_some_and(|p| p.ends_with("base")),
            "{config}"
        );
        let ours = read_logits(&f.work.join(format!("ours-{name}.logits.safetensors")));
        let theirs = read_logits(&f.work.join(format!("peft-loads-{name}.logits.safetensors")));
        check(&format!("peft loads our {name} directory: logits"), &ours, &theirs);
        let base = logits(&load(&f.base));
        assert!(
            max_abs_diff(&ours, &base) > 1e-2,
            "{name}: the adapter must change the logits for the test to mean anything"
        );
        // modules_to_save: the copies are saved under peft's keys, the head is not adapted, and
        // each copy matters
        let config = OURS.iter().find(|(n, _)| *n == name).unwrap().1;
        let copies = copy_keys(config);
        let saved =
            Tensor::read_safetensors(ours_dir(&f.work, name).join("adapter_model.safetensors"))
                .unwrap();
        let keys: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
        for key in [SAVED_HEAD, SAVED_EMBED] {
            assert_eq!(
                keys.contains(&key),
                copies.contains(&key),
                "{name}: {key} saved iff in modules_to_save: {keys:?}"
            );
        }
        assert!(
            !keys.iter().any(|k| k.contains("lm_head.lora_")),
            "{name}: a saved module is never adapted: {keys:?}"
        );
        if !copies.is_empty() {
            let mut model = load(&f.base);
            model.load_peft_adapter(&ours_dir(&f.work, name), &lora_registry()).unwrap();
            check(&format!("our {name} directory loaded back: logits"), &logits(&model), &ours);
            each_copy_matters(name, &mut model, &copies);
        }
    }
}

#[test]
fn we_load_adapter_directories_peft_wrote() {
    let f = fixture();
    let registry = lora_registry();
    for (name, config) in PEFT_WRITES {
        let dir = f.work.join(format!("peft-{name}"));
        let mut model = load(&f.base);
        let report =
            model.load_peft_adapter(&dir, &registry).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        println!("peft's {name}: {}", report.summary());
        let theirs = read_logits(&f.work.join(format!("peft-writes-{name}.logits.safetensors")));
        check(&format!("we load peft's {name} directory: logits"), &logits(&model), &theirs);
        let base = logits(&load(&f.base));
        assert!(max_abs_diff(&theirs, &base) > 1e-2, "{name}: the adapter must matter");
        let theirs_disabled =
            read_logits(&f.work.join(format!("peft-writes-{name}.disabled.logits.safetensors")));
        check(
            &format!("we load peft's {name} directory: adapter disabled"),
            &disabled_logits(&model),
            &theirs_disabled,
        );
        check(
            &format!("we load peft's {name} directory: adapter disabled vs base"),
            &disabled_logits(&model),
            &base,
        );
        let copies = copy_keys(config);
        each_copy_matters(&format!("peft's {name}"), &mut model, &copies);
        if !copies.is_empty() {
            assert_eq!(model.saved_modules(), vec!["model.embed_tokens", "lm_head"], "{name}");
            assert!(
                model.lm_head_is_tied(),
                "{name}: the originals stay tied; each copy is its own"
            );
        }
        // and it saves back to the same keys and values
        let out = f.work.join(format!("peft-{name}-resaved"));
        model.save_peft_adapter(&out).unwrap();
        let mut a = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
        let mut b = Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            a.iter().map(|x| &x.0).collect::<Vec<_>>(),
            b.iter().map(|x| &x.0).collect::<Vec<_>>(),
            "{name}: keys"
        );
        assert!(a.iter().zip(&b).all(|(x, y)| x.1.equal(&y.1)), "{name}: values");
    }
}

#[test]
fn transformers_loads_our_merged_directories() {
    let f = fixture();
    for &name in MERGED {
        let ours = read_logits(&f.work.join(format!("ours-{name}.logits.safetensors")));
        let theirs =
            read_logits(&f.work.join(format!("transformers-loads-{name}.logits.safetensors")));
        check(&format!("transformers on our merged {name}: logits vs unmerged"), &ours, &theirs);
        let merged = f.work.join(format!("merged-{name}"));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                .unwrap();
        let tensors = ferrotune::model::save::read_model_tensors(&merged).unwrap();
        let has_head = tensors.iter().any(|(k, _)| k == "lm_head.weight");
        if UNTIED_BY_MERGE.contains(&name) {
            assert_eq!(
                config["tie_word_embeddings"], false,
                "{name}: a merge that changes the tied head or embedding unties them"
            );
            assert!(has_head);
        } else {
            assert_eq!(config["tie_word_embeddings"], true, "tied embeddings stay tied");
            assert!(!has_head);
        }
        for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(merged.join(file).is_file(), "{name}: {file} copied");
        }
        assert!(
            tensors.iter().all(|(_, t)| t.kind() == Kind::Float),
            "the source dtype (f32) is kept"
        );
    }
}

/// `ferrotune train` with `modules_to_save: [lm_head]` on the tied Qwen2 tiny: the head's copy
/// gets gradients and moves (AdamW without weight decay moves nothing whose gradient is zero),
/// the tied original does not, and the run's adapter directory holds the copy under peft's key.
#[test]
fn training_updates_the_copy_of_a_saved_module() {
    let f = fixture();
    let run = f.work.join("train-save-head");
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).unwrap();
    let out = run.join("out");
    let config = format!(
        "model: {model}\noutput_dir: {out}\nseed: 3\n\
         adapter:\n  plugin: lora\n  r: 4\n  lora_alpha: 8\n  target_modules: [q_proj, v_proj]\n  modules_to_save: [lm_head]\n\
         optimizer:\n  lr: 1.0e-2\n  weight_decay: 0.0\n  max_grad_norm: null\n\
         scheduler:\n  type: constant\n\
         data:\n  plugin: alpaca\n  path: {data}\n  cutoff_len: 64\n\
         training:\n  max_steps: 3\n  micro_batch_size: 2\n  progress_bar: false\n",
        model = f.qwen.display(),
        out = out.display(),
        data = repo_root().join("datasets/alpaca_demo.json").display()
    );
    let config_path = run.join("train.yaml");
    std::fs::write(&config_path, config).unwrap();
    let o = ferrotune(&["train", config_path.to_str().unwrap()]);
    assert!(o.status.success(), "train: {}\n{}", stdout(&o), stderr(&o));

    let base = load(&f.qwen);
    assert!(base.lm_head_is_tied());
    let saved = Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap();
    let head = &saved
        .iter()
        .find(|(k, _)| k == SAVED_HEAD)
        .unwrap_or_else(|| {
            panic!("no {SAVED_HEAD} in {:?}", saved.iter().map(|x| &x.0).collect::<Vec<_>>())
        })
        .1;
    let step = (head - base.embed_tokens()).abs();
    let moved = step.gt(1e-4).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    println!("train with modules_to_save [lm_head]: {:.1}% of the head's copy moved by > 1e-4 (max {:.3e})", 100.0 * moved, step.max().double_value(&[]));
    assert!(
        moved > 0.99,
        "every row of the head's copy gets a gradient through the softmax; {moved} moved"
    );
    assert!(
        saved.iter().any(|(k, _)| k.ends_with("q_proj.lora_B.weight"))
            && !saved.iter().any(|(k, _)| k.contains("lm_head.lora_"))
    );
    for line in std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(m["grad_norm"].as_f64().is_some_and(|g| g > 0.0), "{line}");
    }
    // the trained directory runs the copy; the base stays as it was
    let mut model = load(&f.qwen);
    model.load_peft_adapter(&out, &lora_registry()).unwrap();
    assert!(
        model.lm_head_is_tied() && max_abs_diff(model.embed_tokens(), base.embed_tokens()) == 0.0
    );
    each_copy_matters("trained save_head", &mut model, &[SAVED_HEAD]);
}

#[test]
fn generate_with_adapter_equals_peft() {
    let f = fixture();
    let out = ferrotune(&[
        "generate",
        "--model",
        f.qwen.to_str().unwrap(),
        "--adapter",
        ours_dir(&f.work, "generate").to_str().unwrap(),
        "--prompt",
        GENERATE_PROMPT,
        "--max-new-tokens",
        &GENERATE_TOKENS.to_string(),
        "--greedy",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ours: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.work.join("generate.json")).unwrap())
            .unwrap();
    println!(
        "generate --adapter: ours {}\n                    peft {}",
        ours["token_ids"], theirs["token_ids"]
    );
    assert_eq!(ours["token_ids"], theirs["token_ids"]);
    assert_eq!(
        ours["token_ids"].as_array().unwrap().len(),
        GENERATE_TOKENS,
        "a random model should not stop early"
    );
    assert_ne!(
        theirs["token_ids"], theirs["base_token_ids"],
        "the adapter must change the generation"
    );
}

#[test]
fn pissa_keeps_the_function_at_init() {
    let f = fixture();
    let registry = lora_registry();
    let mut model = load(&f.base);
    let before = logits(&model);
    let q = "model.layers.0.self_attn.q_proj";
    let weight = |m: &PeftModel, name: &str| {
        m.linears().into_iter().find(|(n, _)| *n == name).unwrap().1.weight.copy()
    };
    let q_before = weight(&model, q);
    let report = attach(
        &mut model,
        &registry,
        r#"{"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa", "target_modules": ["q_proj", "v_proj", "lm_head"]}"#,
    );
    assert_eq!(report.rewritten_base.len(), 5);
    assert!(report.untied_lm_head && !model.lm_head_is_tied());
    assert!(
        max_abs_diff(&weight(&model, q), &q_before) > 1e-3,
        "the base weight became the residual"
    );
    check("PiSSA at init (W_res + BA = W): logits", &logits(&model), &before);

    // A trained PiSSA directory loads onto the original model as peft loads it (the
    // residual recomputed, the trained A and B loaded): peft_loads_our_adapter_directories
    // checks that against peft; here: our own round trip.
    let mut again = load(&f.base);
    again.load_peft_adapter(&ours_dir(&f.work, "pissa"), &registry).unwrap();
    check(
        "PiSSA directory, saved and loaded back: logits",
        &logits(&again),
        &read_logits(&f.work.join("ours-pissa.logits.safetensors")),
    );
}

#[test]
fn broken_adapter_directories_are_refused_by_name() {
    let f = fixture();
    let registry = lora_registry();
    let mut model = load(&f.base);
    let before = logits(&model);
    let dir = f.work.join("broken");
    let _ = std::fs::remove_dir_all(&dir);
    let good = ours_dir(&f.work, "lora");
    let mut err =
        |d: &Path| format!("{:#}", model.load_peft_adapter(d, &registry).expect_err("must fail"));

    let e = err(&dir);
    assert!(e.contains("does not exist") && e.contains("broken"), "{e}");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(good.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors"))
        .unwrap();
    let e = err(&dir);
    assert!(
        e.contains("has no adapter_config.json") && e.contains("adapter_model.safetensors"),
        "{e}"
    );

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("adapter_config.json")).unwrap())
            .unwrap();
    let write_config = |v: &serde_json::Value| {
        std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap()
    };
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    write_config(&config);
    let e = err(&dir);
    assert!(e.contains("has no adapter_model.safetensors"), "{e}");
    std::fs::copy(good.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors"))
        .unwrap();

    let mut v = config.clone();
    v["peft_type"] = "BOFT".into();
    write_config(&v);
    let e = err(&dir);
    assert!(
        e.contains("`peft_type` = \"BOFT\"")
            && e.contains("adapter_config.json")
            && e.contains("LORA"),
        "{e}"
    );
    // a LoRA configuration labelled IA3: the `ia3` plugin refuses LoRA's keys by name
    let mut v = config.clone();
    v["peft_type"] = "IA3".into();
    write_config(&v);
    let e = err(&dir);
    assert!(e.contains("`r` = 4") && e.contains("not supported by adapter plugin `ia3`"), "{e}");

    let mut v = config.clone();
    v["layers_to_transform"] = serde_json::json!([0]);
    write_config(&v);
    let e = err(&dir);
    assert!(
        e.contains("key `layers_to_transform` = [0] is not supported by adapter plugin `lora`"),
        "{e}"
    );

    // An adapter made for another model (hidden 32): the shapes say so, by key.
    let other = f.work.join("other-model");
    if !other.join("config.json").exists() {
        init_model(
            &f.work.join("tokenizer"),
            &other,
            &["--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "64"],
        );
    }
    for (name, config) in [("lora", OURS[0].1), ("pissa", OURS[2].1)] {
        let mut small = load(&other);
        attach(&mut small, &registry, config);
        let other_adapter = f.work.join(format!("other-adapter-{name}"));
        small.save_peft_adapter(&other_adapter).unwrap();
        let e = err(&other_adapter);
        assert!(
            e.contains("mis-shaped") && e.contains("`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` is [4, 32], this model's is [4, 64]"),
            "{e}"
        );
    }
    drop(err);
    assert!(model.adapter_names().is_empty(), "a failed load leaves no adapter attached");
    assert_eq!(
        max_abs_diff(&logits(&model), &before),
        0.0,
        "a failed load leaves the model as it was (PiSSA's residual undone)"
    );
}

#[test]
fn merge_cli_dtype_help_and_errors() {
    let f = fixture();
    let out_dir = f.work.join("merged-bf16");
    let _ = std::fs::remove_dir_all(&out_dir);
    let o = ferrotune(&[
        "merge",
        "--model",
        f.base.to_str().unwrap(),
        "--adapter",
        ours_dir(&f.work, "dora").to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dtypes = ferrotune::model::weights::checkpoint_dtypes(&out_dir).unwrap();
    assert!(!dtypes.is_empty() && dtypes.values().all(|k| *k == Kind::BFloat16), "{dtypes:?}");
    let o = ferrotune(&[
        "merge",
        "--model",
        f.base.to_str().unwrap(),
        "--adapter",
        ours_dir(&f.work, "dora").to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("not empty"), "{}", stderr(&o));

    let o = ferrotune(&[
        "merge",
        "--model",
        f.base.to_str().unwrap(),
        "--adapter",
        "/no/such/adapter",
        "--out",
        f.work.join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("/no/such/adapter"), "{}", stderr(&o));
    let o = ferrotune(&[
        "generate",
        "--model",
        f.base.to_str().unwrap(),
        "--adapter",
        "/no/such/adapter",
        "--prompt",
        "w1",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("/no/such/adapter"), "{}", stderr(&o));

    let help = stdout(&ferrotune(&["merge", "--help"]));
    for flag in ["--model", "--adapter", "--out", "--dtype", "--device"] {
        assert!(help.contains(flag), "merge --help lacks {flag}:\n{help}");
    }
    assert!(stdout(&ferrotune(&["generate", "--help"])).contains("PEFT adapter directory"));
}
