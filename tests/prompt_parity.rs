//! The `prompt` plugins (`prompt_tuning`, `p_tuning` with an MLP and an LSTM encoder,
//! `prefix_tuning` with and without projection) against peft 0.21's PROMPT_TUNING, P_TUNING
//! and PREFIX_TUNING on a tiny Qwen2 made by `ferrotune init-model` (float32, grouped-query
//! attention), every logits comparison to 1e-5 on the input's positions (peft returns the
//! virtual tokens' logits first for prompt tuning and P-tuning: they are dropped):
//! * peft loads the PEFT directory we write (our encoder's output saved as
//!   `prompt_embeddings`, as peft saves it) and computes our logits; we load it back too;
//! * we load the directory peft wrote (its default, non-trivial initialisation) and compute
//!   peft's logits, and `ferrotune generate --adapter` gives peft's greedy tokens, where
//!   peft's reference is its forward without the KV cache (a greedy loop over
//!   model(input_ids = all ids so far)); our cached generate also equals our own uncached
//!   greedy loop;
//! * 10 optimizer steps equal peft + torch AdamW's per-step losses within 1e-5: prompt tuning
//!   and the un-projected prefix (whose saved `prompt_embeddings` is the trained table) from
//!   peft's initial directory through `adapter_init` and `ferrotune train`
//!   (`common/train_parity.rs`); P-tuning (MLP, LSTM) and the projected prefix, whose
//!   encoder peft does not save, from peft's whole initial encoder state copied into the
//!   run's parameters by name (`prompt_encoder.default.*`) before the first step;
//! * prompt tuning on the tiny Qwen2-VL: peft loads our directory onto
//!   `Qwen2VLForConditionalGeneration` and gives our logits for an input with an image;
//! * `ferrotune merge` of a prompt directory fails naming it; an unknown key, a
//!   num_virtual_tokens of 10⁹, a `prompt_embeddings` of another shape and a token_dim of
//!   another model are refused by name; `--resume` of a prompt-tuning run continues exactly,
//!   and of a P-tuning run is refused naming `prompt_embeddings`.
//!
//! Needs `cargo build --workspace` (the `prompt` plugins) and the reference stack (`$PYTHON`
//! or `.venv`); `tests/python/prompt_reference.py` is the Python side.
use std::path::{Path, PathBuf};

use ferrotune::model::{ForwardArgs, VisionInputs};
use ferrotune::peft::PeftModel;
use ferrotune_tests::adapter_parity::*;
use ferrotune_tests::train_parity::{check_variant, Fixture, Variant, ROWS, WORDS};
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// Greedy tokens generated on both sides.
const NEW_TOKENS: usize = 10;

/// One method under test: a name, its plugin, peft's type and the config both sides use.
struct Method {
    name: &'static str,
    plugin: &'static str,
    peft_type: &'static str,
    config: &'static str,
}

const METHODS: &[Method] = &[
    Method {
        name: "prompt_tuning",
        plugin: "prompt_tuning",
        peft_type: "PROMPT_TUNING",
        config: r#"{"num_virtual_tokens": 5}"#,
    },
    Method {
        name: "p_tuning_mlp",
        plugin: "p_tuning",
        peft_type: "P_TUNING",
        config: r#"{"num_virtual_tokens": 4, "encoder_hidden_size": 48}"#,
    },
    Method {
        name: "p_tuning_lstm",
        plugin: "p_tuning",
        peft_type: "P_TUNING",
        config: r#"{"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 24, "encoder_num_layers": 2}"#,
    },
    Method {
        name: "prefix",
        plugin: "prefix_tuning",
        peft_type: "PREFIX_TUNING",
        config: r#"{"num_virtual_tokens": 3}"#,
    },
    Method {
        name: "prefix_projection",
        plugin: "prefix_tuning",
        peft_type: "PREFIX_TUNING",
        config: r#"{"num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 40}"#,
    },
];

/// A tiny Qwen2 model under `w/base` (`ferrotune init-model`, seed 5, a ChatML tokenizer),
/// [`sharpened`].
fn tiny_model(w: &Path) -> PathBuf {
    let base = tiny_parity_model(w);
    sharpen(&base);
    base
}

/// Scales the decoder's linear weights of model `dir` by 10: at init-model's std 0.02 the tied
/// head's argmax is the last input token whatever the adapter (greedy tokens would test
/// nothing) and the loss hardly depends on the virtual tokens (training would hardly move it).
fn sharpen(dir: &Path) {
    let file = dir.join("model.safetensors");
    let scaled: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(k, t)| match k.starts_with("model.layers.") && t.dim() == 2 {
            true => (k, t * 10.0),
            false => (k, t),
        })
        .collect();
    Tensor::write_safetensors(&scaled, &file).unwrap();
}

/// Our greedy continuation without the KV cache: the whole sequence through the model at
/// every step, the argmax of the last position appended.
fn uncached_greedy(model: &PeftModel, prompt: &[i64], n: usize) -> Vec<i64> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let t = Tensor::from_slice(&ids).view([1, -1]);
        let l = logits_of(model, &t);
        ids.push(l.get(0).get(-1).argmax(0, false).int64_value(&[]));
    }
    ids[prompt.len()..].to_vec()
}

fn generate(base: &Path, adapter: &Path, prompt: &str) -> Vec<i64> {
    let n = NEW_TOKENS.to_string();
    let o = ferrotune_one_thread(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        prompt,
        "--greedy",
        "--max-new-tokens",
        &n,
        "--json",
    ]);
    assert!(o.status.success(), "generate: {}\n{}", stdout(&o), stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    v["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect()
}

#[test]
fn prompt_methods_match_peft_both_ways() {
    one_torch_thread();
    let work = TempDir::new("prompt-parity");
    let w = &work.0;
    let base = tiny_model(w);
    let registry = plugin_registry("libferrotune_prompt.so");
    let base_logits = logits_of(&load_model(&base), &parity_ids());
    let prompt = "w3 w17 w42 w99 w150 w7";
    let prompt_ids =
        ferrotune::text::Tokenizer::from_dir(&base).unwrap().encode(prompt, true).unwrap();

    // ours, written before the reference run so that peft can load them
    let mut ours_logits = Vec::new();
    for m in METHODS {
        let mut model = load_model(&base);
        attach_plugin(&mut model, &registry, m.plugin, m.config);
        let l = logits_of(&model, &parity_ids());
        assert!(max_abs_diff(&l, &base_logits) > 1e-2, "{}: our adapter must matter", m.name);
        let dir = w.join(format!("ours-{}", m.name));
        model.save_peft_adapter(&dir).unwrap();
        // we load our own directory back: the saved table gives the encoder's logits
        let mut again = load_model(&base);
        again.load_peft_adapter(&dir, &registry).unwrap_or_else(|e| panic!("{}: {e:#}", m.name));
        check_logits(
            &format!("{}: our directory loaded back", m.name),
            &logits_of(&again, &parity_ids()),
            &l,
        );
        ours_logits.push(l);
    }

    // TEXT and SAMPLE_VOCAB initialisations: rows of the frozen embedding
    let text_config = json!({
        "num_virtual_tokens": 7, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "w5 w6\nw7",
        "tokenizer_name_or_path": w.join("tokenizer"),
    });
    let initial_table = |config: &Value| {
        let mut model = load_model(&base);
        attach_plugin(&mut model, &registry, "prompt_tuning", &config.to_string());
        model.adapter_state_dict().unwrap().remove(0).1
    };
    let text_table = initial_table(&text_config);
    let sampled =
        initial_table(&json!({"num_virtual_tokens": 6, "prompt_tuning_init": "SAMPLE_VOCAB"}));
    let embed = load_model(&base).embed_tokens().shallow_clone();
    for r in 0..6 {
        let row = sampled.get(r);
        let hits = (embed.shallow_clone() - &row)
            .abs()
            .amax([1].as_slice(), false)
            .eq(0.0)
            .sum(Kind::Int64);
        assert!(hits.int64_value(&[]) >= 1, "SAMPLE_VOCAB row {r} is a row of the embedding");
    }
    let mut writes: Vec<Value> = METHODS.iter().enumerate().map(|(i, m)| json!({
            "peft_type": m.peft_type,
            "config": serde_json::from_str::<Value>(m.config).unwrap(),
            "seed": 20 + i,
            "dir": w.join(format!("peft-{}", m.name)),
            "out": w.join(format!("peft-{}.logits.safetensors", m.name)),
            "greedy": {"ids": prompt_ids, "new_tokens": NEW_TOKENS, "out": w.join(format!("peft-{}.greedy.json", m.name))},
        })).collect();
    writes.push(json!({"peft_type": "PROMPT_TUNING", "config": text_config, "seed": 1, "dir": w.join("peft-text"),
                       "out": w.join("peft-text.logits.safetensors")}));
    let plan = json!({
        "base": base,
        "ids": parity_ids_rows(),
        "peft_writes": writes,
        "peft_loads": METHODS.iter().map(|m| json!({
            "dir": w.join(format!("ours-{}", m.name)),
            "peft_type": m.peft_type,
            "out": w.join(format!("peft-loads-{}.logits.safetensors", m.name)),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(w.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/prompt_reference.py");
    let out = run_python(&[script.as_os_str(), w.as_os_str()]);
    println!("{}", stdout(&out).trim());

    let peft_text =
        Tensor::read_safetensors(w.join("peft-text/adapter_model.safetensors")).unwrap();
    assert_eq!(max_abs_diff(&text_table, &peft_text[0].1), 0.0, "TEXT: peft's initial table");
    println!(
        "TEXT init: our table equals peft's ({:?}); SAMPLE_VOCAB: every row an embedding row",
        text_table.size()
    );

    for (m, ours) in METHODS.iter().zip(&ours_logits) {
        // peft loads ours
        check_logits(
            &format!("{}: peft loads our directory", m.name),
            &read_logits(&w.join(format!("peft-loads-{}.logits.safetensors", m.name))),
            ours,
        );
        // we load peft's
        let dir = w.join(format!("peft-{}", m.name));
        let mut model = load_model(&base);
        let report = model
            .load_peft_adapter(&dir, &registry)
            .unwrap_or_else(|e| panic!("peft's {} directory: {e:#}", m.name));
        println!("peft's {}: {}", m.name, report.summary());
        let theirs = read_logits(&w.join(format!("peft-{}.logits.safetensors", m.name)));
        assert!(
            max_abs_diff(&theirs, &base_logits) > 1e-2,
            "{}: peft's adapter must matter",
            m.name
        );
        check_logits(
            &format!("{}: we load peft's directory", m.name),
            &logits_of(&model, &parity_ids()),
            &theirs,
        );
        let saved = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
        assert_eq!(saved.len(), 1, "{}: peft saves one tensor", m.name);
        assert_eq!(saved[0].0, "prompt_embeddings");
        // greedy: peft's uncached forward, our uncached loop and our cached generate
        let want: Vec<i64> = serde_json::from_str(
            &std::fs::read_to_string(w.join(format!("peft-{}.greedy.json", m.name))).unwrap(),
        )
        .unwrap();
        let uncached = uncached_greedy(&model, &prompt_ids, NEW_TOKENS);
        assert_eq!(uncached, want, "{}: our uncached greedy tokens vs peft's", m.name);
        let cached = generate(&base, &dir, prompt);
        println!("{}: greedy {want:?}; ferrotune generate {cached:?}", m.name);
        assert!(
            !cached.is_empty() && want.starts_with(&cached),
            "{}: generate {cached:?} vs peft's {want:?}",
            m.name
        );
        assert!(
            cached.len() == NEW_TOKENS || want[cached.len() - 1] == 2,
            "{}: generate stopped early ({cached:?}) without the end-of-turn token",
            m.name
        );
    }
    drop(work);
}

/// Training variants: the table methods through the shared harness (`ferrotune train`
/// from peft's initial directory), the encoders from peft's whole initial state.
const TRAIN: &[Variant] = &[
    Variant {
        name: "prompt_tuning",
        plugin: "prompt_tuning",
        peft_type: "PROMPT_TUNING",
        config: r#"{"num_virtual_tokens": 10}"#,
        from_init: true,
        steps: 10,
        loss_tol: 1e-5,
    },
    Variant {
        name: "prefix",
        plugin: "prefix_tuning",
        peft_type: "PREFIX_TUNING",
        config: r#"{"num_virtual_tokens": 24}"#,
        from_init: true,
        steps: 10,
        loss_tol: 1e-5,
    },
    Variant {
        name: "p_tuning_mlp",
        plugin: "p_tuning",
        peft_type: "P_TUNING",
        config: r#"{"num_virtual_tokens": 4, "encoder_hidden_size": 48}"#,
        from_init: false,
        steps: 10,
        loss_tol: 1e-5,
    },
    Variant {
        name: "p_tuning_lstm",
        plugin: "p_tuning",
        peft_type: "P_TUNING",
        config: r#"{"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 24, "encoder_num_layers": 2}"#,
        from_init: false,
        steps: 10,
        loss_tol: 1e-5,
    },
    Variant {
        name: "prefix_projection",
        plugin: "prefix_tuning",
        peft_type: "PREFIX_TUNING",
        config: r#"{"num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 40}"#,
        from_init: false,
        steps: 10,
        loss_tol: 1e-5,
    },
];

/// The harness's fixture and plan (`train_parity::prepare`'s), run by
/// `prompt_reference.py --train`, which also saves an encoder variant's whole initial state
/// to `work/full-init-NAME.safetensors`.
fn prepare_training(tag: &str) -> Fixture {
    let work = temp_dir(tag);
    write_chat_tokenizer(&work.join("tokenizer"), WORDS);
    let model = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &model, 7);
    sharpen(&model);
    let data = work.join("alpaca.jsonl");
    write_alpaca_rows(&data, ROWS, WORDS, 3);
    let variants: Vec<Value> = TRAIN
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v.name, "peft_type": v.peft_type, "seed": 1000 + i, "steps": v.steps,
                "config": serde_json::from_str::<Value>(v.config).unwrap(),
                "init_dir": if v.from_init { json!(work.join(format!("init-{}", v.name))) } else { Value::Null },
                "full_init": if v.from_init { Value::Null } else { json!(work.join(format!("full-init-{}.safetensors", v.name))) },
                "out": work.join(format!("peft-{}", v.name)),
            })
        })
        .collect();
    let plan = json!({
        "model": model, "tokenizer": work.join("tokenizer"), "data": data, "cutoff_len": 1024,
        "micro_batch_size": 2, "gradient_accumulation_steps": 2,
        "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0,
        "scheduler": "cosine", "warmup_steps": 2, "variants": variants,
    });
    std::fs::write(work.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/prompt_reference.py");
    let out = run_python(&[script.as_os_str(), "--train".as_ref(), work.as_os_str()]);
    println!("{}", stdout(&out).trim());
    Fixture { work, model, data }
}

/// An encoder variant: `Run::setup` with the harness's run, peft's whole initial state copied
/// into the trainable tensors by name, then the steps; per-step losses and the final
/// `prompt_embeddings` against peft's.
fn check_encoder_variant(f: &Fixture, v: &Variant) {
    let name = v.name;
    let mut adapter: Value = serde_json::from_str(v.config).unwrap();
    adapter["plugin"] = json!(v.plugin);
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\ndevice: cpu\ndtype: f32\nseed: 42\nadapter: {adapter}\n\
         optimizer: {{lr: 1.0e-3, weight_decay: 0.01, max_grad_norm: 1.0}}\n\
         scheduler: {{type: cosine, warmup_steps: 2}}\n\
         data: {{plugin: alpaca, path: {data}, cutoff_len: 1024, eval_ratio: 0.0, shuffle: false}}\n\
         training: {{max_steps: {steps}, micro_batch_size: 2, gradient_accumulation_steps: 2, logging_steps: 1, progress_bar: false}}\n",
        model = f.model.display(),
        out = f.work.join(format!("ours-{name}")).display(),
        data = f.data.display(),
        steps = v.steps,
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let cfg = ferrotune::train::config::TrainConfig::from_file(&path).unwrap();
    let registry = plugin_registry("libferrotune_prompt.so");
    let mut run = ferrotune::train::Run::setup(&cfg, &registry, None).unwrap();
    let init =
        Tensor::read_safetensors(f.work.join(format!("full-init-{name}.safetensors"))).unwrap();
    let params = run.model.trainable_parameters().unwrap();
    assert_eq!(params.len(), init.len(), "{name}: peft's trainable tensors are ours");
    for p in &params {
        let (_, t) = init
            .iter()
            .find(|(k, _)| *k == p.name)
            .unwrap_or_else(|| panic!("{name}: peft has no `{}`", p.name));
        assert_eq!(t.size(), p.tensor.size(), "{name}: `{}`", p.name);
        tch::no_grad(|| p.tensor.shallow_clone().copy_(t));
    }
    let theirs: Value = serde_json::from_str(
        &std::fs::read_to_string(f.work.join(format!("peft-{name}/metrics.json"))).unwrap(),
    )
    .unwrap();
    let mut worst = 0f64;
    for i in 0..v.steps {
        let s = run.step().unwrap();
        let tl = theirs["loss"][i].as_f64().unwrap();
        println!(
            "{name} step {:>2}: loss {:.7} vs {tl:.7} (|diff| {:.1e})",
            s.step,
            s.loss,
            (s.loss - tl).abs()
        );
        assert!(
            (s.loss - tl).abs() <= v.loss_tol,
            "{name} step {}: loss {} vs peft's {tl}",
            s.step,
            s.loss
        );
        worst = worst.max((s.loss - tl).abs());
    }
    let (first, last) =
        (theirs["loss"][0].as_f64().unwrap(), theirs["loss"][v.steps - 1].as_f64().unwrap());
    assert!((first - last).abs() > 1e-3, "{name}: the loss must move ({first} -> {last})");
    let ours = run.model.adapter_state_dict().unwrap();
    let peft =
        Tensor::read_safetensors(f.work.join(format!("peft-{name}/adapter_model.safetensors")))
            .unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!(
        (ours[0].0.as_str(), peft[0].0.as_str()),
        ("prompt_embeddings", "prompt_embeddings")
    );
    let e = relative_error(&ours[0].1, &peft[0].1);
    println!("{name}: {} steps, max |loss diff| {worst:.2e}, final prompt_embeddings relative diff {e:.2e}", v.steps);
    assert!(e <= 1e-4, "{name}: final prompt_embeddings relative error {e:e}");
}

#[test]
fn prompt_training_matches_peft() {
    one_torch_thread();
    let f = prepare_training("prompt-train-parity");
    for v in TRAIN {
        if v.from_init {
            check_variant(&f, TRAIN, v.name);
        } else {
            check_encoder_variant(&f, v);
        }
    }
    let _ = std::fs::remove_dir_all(&f.work);
}

/// Prompt tuning on the tiny Qwen2-VL: peft loads our directory onto
/// `Qwen2VLForConditionalGeneration` and computes our logits for an input with one image
/// (random pixel values, grid [1, 4, 4]).
#[test]
fn prompt_tuning_on_qwen2_vl_matches_peft() {
    one_torch_thread();
    let work = TempDir::new("prompt-vl");
    let w = &work.0;
    let base = w.join("vl");
    init_tiny_vl_model(&base, 3);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let token = |k: &str| {
        cfg[k]
            .as_i64()
            .or_else(|| cfg["text_config"][k].as_i64())
            .unwrap_or_else(|| panic!("config.json: {k}"))
    };
    let (start, image, end) =
        (token("vision_start_token_id"), token("image_token_id"), token("vision_end_token_id"));
    let ids =
        Tensor::from_slice(&[7i64, 8, start, image, image, image, image, end, 9, 10]).view([1, 10]);
    tch::manual_seed(0);
    let images = VisionInputs::images(
        Tensor::randn([16, 1176], (Kind::Float, Device::Cpu)),
        vec![[1, 4, 4]],
    );
    let registry = plugin_registry("libferrotune_prompt.so");
    let forward = |m: &PeftModel| {
        tch::no_grad(|| m.forward(ForwardArgs::ids(&ids).images(Some(&images)))).unwrap()
    };
    let base_logits = forward(&load_model(&base));
    let mut model = load_model(&base);
    attach_plugin(&mut model, &registry, "prompt_tuning", r#"{"num_virtual_tokens": 4}"#);
    let ours = forward(&model);
    assert!(max_abs_diff(&ours, &base_logits) > 1e-2, "the adapter must matter");
    let dir = w.join("ours");
    model.save_peft_adapter(&dir).unwrap();
    let io = w.join("io.safetensors");
    Tensor::write_safetensors(
        &[
            ("ids", &ids),
            ("pixel_values", &images.pixel_values),
            ("grid", &Tensor::from_slice(&[1i64, 4, 4]).view([1, 3])),
        ],
        &io,
    )
    .unwrap();
    let plan =
        json!({"vl": {"base": base, "dir": dir, "io": io, "out": w.join("vl.logits.safetensors")}});
    std::fs::write(w.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/prompt_reference.py");
    let out = run_python(&[script.as_os_str(), w.as_os_str()]);
    println!("{}", stdout(&out).trim());
    check_logits(
        "prompt tuning: peft loads our directory on Qwen2-VL (image input)",
        &read_logits(&w.join("vl.logits.safetensors")),
        &ours,
    );
    drop(work);
}

/// Writes a copy of PEFT directory `from` into `to` with `edit` applied to its config.
fn edited_copy(from: &Path, to: &Path, edit: impl FnOnce(&mut Value)) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("adapter_model.safetensors"), to.join("adapter_model.safetensors"))
        .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(to.join("adapter_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn prompt_directories_refuse_what_does_not_fit_by_name() {
    one_torch_thread();
    let work = TempDir::new("prompt-hostile");
    let w = &work.0;
    let base = tiny_model(w);
    let registry = plugin_registry("libferrotune_prompt.so");
    let base_logits = logits_of(&load_model(&base), &parity_ids());
    let mut model = load_model(&base);
    attach_plugin(&mut model, &registry, "prompt_tuning", r#"{"num_virtual_tokens": 5}"#);
    let good = w.join("good");
    model.save_peft_adapter(&good).unwrap();

    // merge: refused, naming the adapter as a prompt-learning method
    let o = ferrotune_one_thread(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        good.to_str().unwrap(),
        "--out",
        w.join("merged").to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "merge of a prompt adapter: {}\n{e}", stdout(&o));
    assert!(e.contains("prompt-learning") && e.contains("cannot be merged"), "{e}");
    assert!(!w.join("merged").join("model.safetensors").exists());

    // a key the plugin does not implement, in a run config and in a directory
    let e = registry
        .adapter("prompt_tuning", r#"{"num_virtual_tokens": 5, "r": 8}"#)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`r`"), "{e}");
    let unknown = w.join("unknown");
    edited_copy(&good, &unknown, |c| c["lora_alpha"] = json!(16));
    let mut m = load_model(&base);
    let e = format!("{:#}", m.load_peft_adapter(&unknown, &registry).unwrap_err());
    assert!(e.contains("`lora_alpha` = 16"), "{e}");

    // 10⁹ virtual tokens: refused before anything is allocated
    let huge = w.join("huge");
    edited_copy(&good, &huge, |c| c["num_virtual_tokens"] = json!(1_000_000_000));
    let t0 = std::time::Instant::now();
    let e = format!("{:#}", m.load_peft_adapter(&huge, &registry).unwrap_err());
    assert!(e.contains("num_virtual_tokens = 1000000000"), "{e}");
    assert!(t0.elapsed().as_secs() < 5, "refused at once");
    assert!(rss_bytes() < 2 << 30, "nothing large allocated");

    // a prompt_embeddings of another shape (the config says 6 virtual tokens, 5 are saved)
    let shape = w.join("shape");
    edited_copy(&good, &shape, |c| c["num_virtual_tokens"] = json!(6));
    let e = format!("{:#}", m.load_peft_adapter(&shape, &registry).unwrap_err());
    assert!(e.contains("prompt_embeddings") && e.contains("[5, "), "{e}");

    // a token_dim of another model
    let dim = w.join("dim");
    edited_copy(&good, &dim, |c| c["token_dim"] = json!(4096));
    let e = format!("{:#}", m.load_peft_adapter(&dim, &registry).unwrap_err());
    assert!(e.contains("`token_dim`") && e.contains("4096"), "{e}");
    check_logits(
        "refused directories leave the model as it was",
        &logits_of(&m, &parity_ids()),
        &base_logits,
    );
    drop(work);
}

/// `--resume` after a checkpoint: prompt tuning (its table is what is saved) continues
/// exactly; P-tuning (its encoder is not saved) is refused naming `prompt_embeddings`.
#[test]
fn resume_continues_prompt_tuning_and_refuses_p_tuning() {
    one_torch_thread();
    let work = TempDir::new("prompt-resume");
    let w = &work.0;
    let base = tiny_model(w);
    let data = w.join("data.jsonl");
    write_alpaca_rows(&data, 8, 200, 1);
    for (plugin, extra, resumes) in
        [("prompt_tuning", "", true), ("p_tuning", "  encoder_hidden_size: 16\n", false)]
    {
        let out = w.join(format!("out-{plugin}"));
        let config = format!(
            "model: {model}\noutput_dir: {out}\nseed: 3\n\
             adapter:\n  plugin: {plugin}\n  num_virtual_tokens: 3\n{extra}\
             optimizer:\n  lr: 1.0e-2\n\
             scheduler:\n  type: constant\n\
             data:\n  plugin: alpaca\n  path: {data}\n  cutoff_len: 64\n\
             training:\n  max_steps: 3\n  micro_batch_size: 2\n  save_steps: 2\n  logging_steps: 1\n  progress_bar: false\n",
            model = base.display(),
            out = out.display(),
            data = data.display()
        );
        let path = w.join(format!("{plugin}.yaml"));
        std::fs::write(&path, config).unwrap();
        let o = ferrotune_one_thread(&["train", path.to_str().unwrap()]);
        assert!(o.status.success(), "{plugin} train: {}\n{}", stdout(&o), stderr(&o));
        let first = read_jsonl(&out.join("metrics.jsonl"));
        assert!(out.join("checkpoint-2").is_dir(), "{plugin}: checkpoint-2");
        let o = ferrotune_one_thread(&["train", path.to_str().unwrap(), "--resume"]);
        if resumes {
            assert!(o.status.success(), "{plugin} resume: {}\n{}", stdout(&o), stderr(&o));
            let again = read_jsonl(&out.join("metrics.jsonl"));
            assert_eq!(again.len(), 3);
            assert_eq!(
                again[2]["loss"], first[2]["loss"],
                "{plugin}: step 3 after resuming from step 2"
            );
            println!("{plugin}: step 3 loss {} uninterrupted and resumed", first[2]["loss"]);
        } else {
            let e = stderr(&o);
            assert!(!o.status.success(), "{plugin}: resume must be refused");
            assert!(e.contains("prompt_embeddings") && e.contains("encoder"), "{plugin}: {e}");
            println!("{plugin}: resume refused: {}", e.lines().last().unwrap_or(""));
            // the saved table trains on as a table (`inference_mode: true`) from adapter_init
            let table = w.join("p_tuning-table.yaml");
            let text = std::fs::read_to_string(&path).unwrap().replace(
                &format!("output_dir: {}", out.display()),
                &format!(
                    "output_dir: {}\nadapter_init: {}",
                    w.join("out-table").display(),
                    out.display()
                ),
            );
            std::fs::write(
                &table,
                text.replace("  encoder_hidden_size: 16\n", "  inference_mode: true\n"),
            )
            .unwrap();
            let o = ferrotune_one_thread(&["train", table.to_str().unwrap()]);
            assert!(o.status.success(), "table from adapter_init: {}\n{}", stdout(&o), stderr(&o));
            let start = Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap();
            let end =
                Tensor::read_safetensors(w.join("out-table/adapter_model.safetensors")).unwrap();
            let moved = max_abs_diff(&start[0].1, &end[0].1);
            println!(
                "{plugin}: its saved table trained on from adapter_init, max |change| {moved:.3e}"
            );
            assert!(moved > 1e-4 && moved < 1.0, "{moved}");
        }
    }
    drop(work);
}
