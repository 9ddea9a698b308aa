//! Qwen3 (`Qwen3ForCausalLM`) against transformers 5.24 and peft 0.21: tiny random fp32
//! checkpoints built by `tests/python/qwen3_reference.py`, one with head_dim 24 (not hidden 64 /
//! 4 heads) and an untied lm_head, one with head_dim 8, attention biases and a tied lm_head,
//! both with per-head q/k RMSNorms far from 1. Checked:
//! * logits of a left-padded batch of 2 equal transformers' (max |diff| ≤ 1e-5 on the real
//!   tokens), and greedy generation (KV cache) gives transformers' 32 tokens per row;
//! * a LoRA directory peft wrote (r 4 on all seven linear layers, random A and B) gives peft's
//!   logits, and `ferrotune merge` of it, saved as a model directory, gives them too;
//! * peft loads an adapter directory we wrote and gives our logits;
//! * `ferrotune train` with LoRA lowers the loss and leaves the q/k norms frozen (they are not
//!   linear layers); `finetuning: full` trains them and saves them in the model directory, and
//!   on two ranks under ZeRO stage 3 (the norms stay whole, the linears are partitioned) it
//!   gives one process's losses and saved weights;
//! * the original Qwen3 chat template (`<think>` handling, `enable_thinking`, reasoning_content,
//!   tool calls) renders and tokenizes exactly as transformers' `apply_chat_template`; TRL's
//!   training variant renders too, its `{% generation %}` spans equal transformers'
//!   `generation_indices`, and the labels of a multi-turn conversation sit on its assistant
//!   tokens (transformers' `assistant_masks` without the newline after each `<|im_end|>`),
//!   where the original template, which drops earlier turns' reasoning, is refused for them;
//! * Qwen3 config features this decoder does not implement are refused, naming the key, and a
//!   missing or misshapen q/k norm weight is named with the config value behind its shape.
//!
//! Needs `cargo build --workspace` and the reference stack (`.venv`: torch, transformers, peft).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::data::{encode_sample, EncodeOptions, IGNORE_INDEX};
use ferrotune::generate::{generate, SamplingParams};
use ferrotune::model::{CausalLM, ForwardArgs};
use ferrotune::peft::PeftModel;
use ferrotune::text::{ChatTemplate, Tokenizer};
use ferrotune_plugin_api::{Message, Sample};
use ferrotune_tests::reference::{json, load, read, rows, tensor2};
use ferrotune_tests::*;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Largest accepted |difference| between two fp32 logits tensors.
const TOL: f64 = 1e-5;

/// The reference outputs, built once into `target/qwen3-reference/<hash>/`.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    one_torch_thread();
    DIR.get_or_init(|| cached_reference("qwen3_reference.py", "qwen3-reference"))
}

/// The padded batch of `inputs.json`: (ids, mask).
fn batch() -> (Tensor, Tensor) {
    let inputs = json(&reference().join("inputs.json"));
    (tensor2(&rows(&inputs["ids"])), tensor2(&rows(&inputs["mask"])))
}

fn logits(model: &PeftModel) -> Tensor {
    let (ids, mask) = batch();
    tch::no_grad(|| model.forward(ForwardArgs::ids(&ids).mask(Some(&mask)))).unwrap()
}

/// max |a − b| over the positions where the batch's mask is 1.
fn max_diff_on_tokens(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let (_, mask) = batch();
    let m = mask.ne(0).unsqueeze(-1).expand_as(a);
    (a.masked_select(&m) - b.masked_select(&m)).abs().max().double_value(&[])
}

fn weight(model: &PeftModel, key: &str) -> Tensor {
    model
        .named_weights()
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in named_weights"))
        .1
}

#[test]
fn logits_of_a_padded_batch_equal_transformers() {
    let dir = reference();
    for (name, head_dim) in [("untied", 24), ("tied", 8)] {
        let model = load(&dir.join(name));
        assert_eq!(model.config().head_dim(), head_dim);
        assert_eq!(model.lm_head_is_tied(), name == "tied");
        for norm in ["q_norm", "k_norm"] {
            let w = weight(&model, &format!("model.layers.1.self_attn.{norm}.weight"));
            assert_eq!(w.size(), [head_dim], "{name}: {norm}");
        }
        let want = read(&dir.join("logits.safetensors"), name);
        let diff = max_diff_on_tokens(&logits(&model), &want);
        println!("{name} (head_dim {head_dim}): max |logits − transformers| = {diff:.2e}");
        assert!(diff <= TOL, "{name}: {diff}");
    }
}

#[test]
fn the_qk_norms_change_the_logits() {
    // Guards the parity above against a model that ignores q_norm / k_norm: with them set to
    // ones the logits move far beyond the tolerance.
    let dir = reference().join("untied");
    let tmp = temp_dir("qwen3-ones");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), tmp.join(f)).unwrap();
    }
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            if k.ends_with("_norm.weight") && k.contains("self_attn") {
                (k, t.ones_like())
            } else {
                (k, t)
            }
        })
        .collect();
    Tensor::write_safetensors(&tensors, tmp.join("model.safetensors")).unwrap();
    let diff = max_diff_on_tokens(&logits(&load(&tmp)), &logits(&load(&dir)));
    std::fs::remove_dir_all(&tmp).ok();
    println!("q/k norms set to 1: max |logits diff| = {diff:.3}");
    assert!(diff > 1e-2, "{diff}");
}

#[test]
fn greedy_generation_with_kv_cache_equals_transformers() {
    let dir = reference();
    let inputs = json(&dir.join("inputs.json"));
    let want = json(&dir.join("generations.json"));
    let params = SamplingParams {
        pad_token_id: inputs["pad_token_id"].as_i64().unwrap(),
        ..SamplingParams::greedy(inputs["new_tokens"].as_u64().unwrap() as usize)
    };
    println!("smallest top-1/top-2 gap in transformers' run: {}", want["min_margin"]);
    for name in ["untied", "tied"] {
        let model = load(&dir.join(name));
        let got = generate(&model, &rows(&inputs["prompts"]), &params).unwrap();
        assert_eq!(got, rows(&want[name]), "{name}");
        assert!(got.iter().all(|r| r.len() == 32));
        println!("{name}: 2 × 32 greedy tokens equal transformers'");
    }
}

#[test]
fn peft_adapter_directory_gives_peft_logits_and_merges() {
    let dir = reference();
    let want = read(&dir.join("logits.safetensors"), "peft");
    let mut model = load(&dir.join("untied"));
    let report = model.load_peft_adapter(&dir.join("peft-adapter"), &registry()).unwrap();
    println!("peft's adapter: {}", report.summary());
    let diff = max_diff_on_tokens(&logits(&model), &want);
    println!("peft's adapter: max |logits − peft| = {diff:.2e}");
    assert!(diff <= TOL, "{diff}");

    // `ferrotune merge` writes a model directory (q/k norms included) that gives the same.
    let work = temp_dir("qwen3-merge");
    let merged = work.join("merged");
    let o = ferrotune(&[
        "merge",
        "--model",
        dir.join("untied").to_str().unwrap(),
        "--adapter",
        dir.join("peft-adapter").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "merge: {}", stderr(&o));
    let saved = Tensor::read_safetensors(merged.join("model.safetensors")).unwrap();
    assert!(saved.iter().any(|(k, _)| k == "model.layers.0.self_attn.k_norm.weight"));
    let config = json(&merged.join("config.json"));
    assert_eq!(config["architectures"][0], "Qwen3ForCausalLM");
    let diff = max_diff_on_tokens(&logits(&load(&merged)), &want);
    std::fs::remove_dir_all(&work).ok();
    println!("merged model directory: max |logits − peft| = {diff:.2e}");
    assert!(diff <= TOL, "{diff}");
}

#[test]
fn peft_loads_our_adapter_directory() {
    let dir = reference();
    let inputs = json(&dir.join("inputs.json"));
    let base = dir.join("untied");
    let mut model = load(&base);
    tch::manual_seed(30); // A's initial draw
    let method = registry()
        .adapter("lora", r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#)
        .unwrap();
    model.attach_adapter("default", Box::new(method)).unwrap();
    perturb_adapter(&mut model, 31, 0.2);
    let ours = logits(&model);
    let work = temp_dir("qwen3-ours");
    let adapter = work.join("adapter");
    model.save_peft_adapter(&adapter).unwrap();
    let ids = work.join("ids.json");
    std::fs::write(
        &ids,
        serde_json::json!({"ids": inputs["ids"], "mask": inputs["mask"]}).to_string(),
    )
    .unwrap();
    let out = work.join("peft.safetensors");
    let script = repo_root().join("tests/python/qwen3_reference.py");
    let o = run_python(&[
        script.as_os_str(),
        "peft-load".as_ref(),
        base.as_os_str(),
        adapter.as_os_str(),
        ids.as_os_str(),
        out.as_os_str(),
    ]);
    println!("{}", stdout(&o).trim());
    let theirs = read(&out, "logits");
    std::fs::remove_dir_all(&work).ok();
    let diff = max_diff_on_tokens(&ours, &theirs);
    let moved = max_diff_on_tokens(&ours, &logits(&load(&base)));
    println!("our adapter in peft: max |logits − ours| = {diff:.2e} (the adapter moves them by {moved:.3})");
    assert!(moved > 1e-2, "the adapter must matter: {moved}");
    assert!(diff <= TOL, "{diff}");
}

/// Runs `ferrotune train` on the untied model with `section` (adapter or finetuning keys);
/// returns the output directory and the logged losses.
fn train(work: &Path, name: &str, section: &str, steps: usize) -> (PathBuf, Vec<f64>) {
    train_on(work, name, section, steps, 4, &[])
}

/// [`train`] with `micro` samples per micro-batch, launched as `launcher` (e.g. `launch
/// --nproc 2`) when given.
fn train_on(
    work: &Path,
    name: &str,
    section: &str,
    steps: usize,
    micro: usize,
    launcher: &[&str],
) -> (PathBuf, Vec<f64>) {
    let data = work.join("data.jsonl");
    if !data.exists() {
        write_alpaca_rows(&data, 16, 100, 7);
    }
    let out = work.join(name);
    let config = format!(
        "model: {model}\noutput_dir: {out}\ndevice: cpu\ndtype: f32\nseed: 3\n{section}\
         optimizer: {{lr: 5.0e-3, weight_decay: 0.0, max_grad_norm: 1.0}}\n\
         scheduler: {{type: constant}}\n\
         data: {{plugin: alpaca, path: {data}, cutoff_len: 128, eval_ratio: 0.0, shuffle: false}}\n\
         training: {{max_steps: {steps}, micro_batch_size: {micro}, logging_steps: 1, progress_bar: false}}\n",
        model = reference().join("untied").display(),
        out = out.display(),
        data = data.display(),
    );
    let path = work.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let mut args = launcher.to_vec();
    args.extend(["train", path.to_str().unwrap()]);
    let o = ferrotune(&args);
    assert!(o.status.success(), "{name}: train failed:\n{}\n{}", stdout(&o), stderr(&o));
    let losses = read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter_map(|m| m["loss"].as_f64())
        .collect::<Vec<_>>();
    (out, losses)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn lora_and_full_training_through_the_cli() {
    let work = temp_dir("qwen3-train");
    let (out, losses) = train(
        &work,
        "lora",
        "adapter: {plugin: lora, r: 8, lora_alpha: 16, target_modules: all-linear}\n",
        16,
    );
    assert_eq!(losses.len(), 16, "{losses:?}");
    let (first, last) = (mean(&losses[..4]), mean(&losses[12..]));
    println!("LoRA on Qwen3: loss {:.4} → {:.4} (mean of the first / last 4 steps)", first, last);
    assert!(last < first - 0.05, "{losses:?}");
    let saved = Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap();
    assert!(saved.iter().any(|(k, _)| k.contains("self_attn.q_proj.lora_A")));
    assert!(
        !saved.iter().any(|(k, _)| k.contains("_norm")),
        "q/k norms are frozen in adapter runs"
    );

    let (out, losses) = train(&work, "full", "finetuning: full\n", 4);
    assert_eq!(losses.len(), 4, "{losses:?}");
    let base = load(&reference().join("untied"));
    let trained = load(&out);
    for key in ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"]
    {
        let step = (weight(&trained, key) - weight(&base, key)).abs().max().double_value(&[]);
        println!("finetuning: full moved {key} by up to {step:.2e}");
        assert!(step > 1e-4, "{key}: {step}");
    }
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn chat_template_renders_as_transformers() {
    let dir = reference();
    let chat = json(&dir.join("chat.json"));
    let tok = Tokenizer::from_dir(&dir.join("untied")).unwrap();
    let trl_copy = tok.chat_template().unwrap().source("default").unwrap();
    assert_eq!(trl_copy, chat["template"].as_str().unwrap());
    let cases = chat["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = tok
            .apply_chat_template_json(
                &case["messages"],
                case["add_generation_prompt"].as_bool().unwrap(),
                &case["extra"],
            )
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{name}");
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(serde_json::json!(ids), case["ids"], "{name}");
    }
    println!("{} Qwen3 chat-template cases equal transformers' text and ids", cases.len());
}

#[test]
fn unimplemented_qwen3_features_are_refused_by_name() {
    let dir = reference().join("untied");
    let base = json(&dir.join("config.json"));
    let work = temp_dir("qwen3-refused");
    let cases: [(&str, Value, &str); 5] = [
        (
            "use_sliding_window",
            serde_json::json!({"use_sliding_window": true, "sliding_window": 4}),
            "`use_sliding_window`",
        ),
        (
            "layer_types",
            serde_json::json!({"layer_types": ["full_attention", "sliding_attention"]}),
            "`layer_types`",
        ),
        ("attention_dropout", serde_json::json!({"attention_dropout": 0.1}), "`attention_dropout`"),
        (
            "yarn",
            serde_json::json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}),
            "`rope_parameters.rope_type`",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_parameters": null, "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
            "`rope_scaling.rope_type`",
        ),
    ];
    for (name, patch, key) in cases {
        let mut config = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        let d = work.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), config.to_string()).unwrap();
        std::fs::copy(dir.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        let e = match CausalLM::load(&d, Device::Cpu, Kind::Float) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        println!("{name}: {e}");
        assert!(e.contains(key) && e.contains("config.json"), "{name}: {e}");
    }
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn training_template_marks_and_labels_assistant_turns_as_transformers() {
    let dir = reference();
    let chat = json(&dir.join("chat.json"));
    let source = chat["training_template"].as_str().unwrap();
    let template = ChatTemplate::single(source, "trl/chat_templates/qwen3_training.jinja").unwrap();
    let mut tok = Tokenizer::from_dir(&dir.join("untied")).unwrap();
    let original = Tokenizer::from_dir(&dir.join("untied")).unwrap();
    tok.set_chat_template(Some(
        ChatTemplate::single(source, "trl/chat_templates/qwen3_training.jinja").unwrap(),
    ));
    let (im_end, newline) =
        (tok.token_to_id("<|im_end|>").unwrap(), tok.token_to_id("\n").unwrap());
    let mut labelled_cases = 0;
    for case in chat["training"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (text, spans) = template
            .render_json_with_generation_spans(&case["messages"], false, &case["extra"])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{name}");
        // ASCII text: transformers' character offsets are our byte offsets.
        assert!(text.is_ascii());
        let spans: Vec<[usize; 2]> = spans.iter().map(|r| [r.start, r.end]).collect();
        assert_eq!(serde_json::json!(spans), case["spans"], "{name}");

        let messages = case["messages"].as_array().unwrap();
        if messages
            .iter()
            .any(|m| m.as_object().unwrap().keys().any(|k| k != "role" && k != "content"))
        {
            continue; // reasoning_content / tool_calls: not in a data sample's messages
        }
        let sample = Sample {
            id: Some(name.to_string()),
            messages: messages
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect(),
            ..Default::default()
        };
        let encoded = encode_sample(&tok, &sample, &EncodeOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let ids = rows(&serde_json::json!([case["ids"]])).remove(0);
        assert_eq!(encoded.input_ids, ids, "{name}");
        let masks = rows(&serde_json::json!([case["assistant_masks"]])).remove(0);
        let want: Vec<i64> = (0..ids.len())
            .map(|j| {
                let glue = j > 0 && ids[j] == newline && ids[j - 1] == im_end;
                if masks[j] == 1 && !glue {
                    ids[j]
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        assert_eq!(encoded.labels, want, "{name}");
        println!("{name}: {} label tokens on the assistant turns", encoded.num_label_tokens());
        labelled_cases += 1;

        if messages.iter().filter(|m| m["role"] == "assistant").count() > 1 {
            let e = encode_sample(&original, &sample, &EncodeOptions::default()).unwrap_err();
            println!("{name} with the original template: {e:#}");
        }
    }
    assert_eq!(labelled_cases, 2);
}

#[test]
fn zero3_full_fine_tuning_on_two_ranks_equals_one_process() {
    if !ferrotune::dist::collectives::HAS_C10D {
        panic!("this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild");
    }
    let work = temp_dir("qwen3-zero3");
    let (one, one_losses) =
        train_on(&work, "one", "finetuning: full\nmemory: {plugin: single}\n", 3, 4, &[]);
    let launcher = ["launch", "--nproc", "2", "--timeout", "60"];
    let (two, two_losses) = train_on(
        &work,
        "zero3",
        "finetuning: full\nmemory: {plugin: zero, stage: 3}\n",
        3,
        2,
        &launcher,
    );
    assert_eq!(one_losses.len(), 3);
    let worst = one_losses.iter().zip(&two_losses).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let read = |d: &Path| {
        let mut t = Tensor::read_safetensors(d.join("model.safetensors")).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let (a, b) = (read(&one), read(&two));
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    assert_eq!(
        a.iter()
            .filter(|(k, _)| k.ends_with("q_norm.weight") || k.ends_with("k_norm.weight"))
            .count(),
        4
    );
    let (mut weights, mut worst_key, mut norms) = (0f64, String::new(), 0f64);
    for ((k, ta), (_, tb)) in a.iter().zip(&b) {
        let d = (ta - tb).abs().max().double_value(&[]);
        if k.contains("self_attn.") && k.ends_with("_norm.weight") {
            norms = norms.max(d);
        }
        if d > weights {
            (weights, worst_key) = (d, k.clone());
        }
    }
    println!("ZeRO-3 on 2 ranks vs one process: max |loss diff| = {worst:.2e}, max |weight diff| = {weights:.2e} ({worst_key}), q/k norms {norms:.2e}");
    std::fs::remove_dir_all(&work).ok();
    assert!(worst <= 1e-5, "{one_losses:?} vs {two_losses:?}");
    // The runs differ only in the order of the gradient sums; AdamW turns a rounding-level
    // gradient difference on an element whose gradient is near zero into an update difference
    // of up to lr (5e-3) on its first steps, so the bound is lr / 500.
    assert!(weights <= 1e-5, "{worst_key}: {weights}");
    assert!(norms <= 1e-6, "q/k norms: {norms}");
}

#[test]
fn missing_or_misshapen_qk_norms_are_named() {
    let dir = reference().join("untied");
    let work = temp_dir("qwen3-bad-norms");
    let tensors = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    let key = "model.layers.1.self_attn.k_norm.weight";
    let cases: [(&str, Option<Tensor>, &str); 2] = [
        ("missing", None, "is missing"),
        ("misshapen", Some(Tensor::ones([64], (Kind::Float, Device::Cpu))), "has shape [64]"),
    ];
    for (name, replacement, what) in cases {
        let d = work.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(dir.join("config.json"), d.join("config.json")).unwrap();
        let mut changed: Vec<(String, Tensor)> = tensors
            .iter()
            .filter(|(k, _)| k != key)
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        if let Some(t) = replacement {
            changed.push((key.to_string(), t));
        }
        Tensor::write_safetensors(&changed, d.join("model.safetensors")).unwrap();
        let e = match CausalLM::load(&d, Device::Cpu, Kind::Float) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        println!("{name}: {e}");
        assert!(e.contains(key) && e.contains(what) && e.contains("head_dim"), "{name}: {e}");
    }
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn lora_on_a_qk_norm_is_refused_by_name() {
    // q_norm / k_norm are RMSNorms, not linear layers: peft refuses them as targets, so do we.
    let mut model = load(&reference().join("untied"));
    let method = registry().adapter("lora", r#"{"r": 4, "target_modules": ["q_norm"]}"#).unwrap();
    let e = format!("{:#}", model.attach_adapter("default", Box::new(method)).unwrap_err());
    println!("{e}");
    assert!(e.contains("q_norm"), "{e}");
}
