//! Full fine-tuning (`finetuning: full`) over several ranks, against one process: the same
//! global batch (one process with micro_batch_size 4, `memory: single`; two ranks of
//! `ferrotune launch --nproc 2` with 2 each) under `ddp`, `zero` stages 1, 2, 3 and stage 3
//! with `offload_optimizer` / `offload_param`, and stage 3 with activation checkpointing.
//!
//! * `full_weights_on_two_ranks_equal_one_process`: per-step losses within 1e-5 and the saved
//!   model (output_dir's model.safetensors, gathered from the shards under stage 3) within
//!   1e-6 of one process; per rank at 2 ranks, as DeepSpeed's table: the optimizer state
//!   halves from stage 1, the gradients from stage 2, the parameters from stage 3.
//! * `zero3_killed_rank_resumes_to_the_unbroken_run`: SIGKILL of rank 1 after a checkpoint
//!   under zero-3 (each rank's shards of the weights and of the optimizer state in the
//!   checkpoint), then `--resume`: the final model equals the uninterrupted run's.
//!
//! Needs `cargo build --workspace` (the CLI, `sft`, `single`, `dist`, `alpaca`) and a build
//! with c10d (libgloo-dev); no Python.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use ferrotune::dist::collectives::HAS_C10D;
use ferrotune_tests::*;
use serde_json::Value;
use tch::{Kind, Tensor};

const WORDS: usize = 40;

fn fixture() -> &'static TextFixture {
    static F: OnceLock<TextFixture> = OnceLock::new();
    F.get_or_init(|| text_fixture("full-dist", WORDS, 9, 16, 5))
}

/// A full fine-tuning config: `micro` samples per rank and micro-batch, 2 micro-batches per
/// step, clipping, a cosine schedule with warm-up.
fn config(name: &str, micro: usize, memory: &str, steps: usize, extra: &str) -> PathBuf {
    let f = fixture();
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\nseed: 17\nfinetuning: full\n\
         optimizer: {{lr: 1.0e-3, weight_decay: 0.01, max_grad_norm: 1.0}}\n\
         scheduler: {{type: cosine, warmup_steps: 2}}\n\
         memory: {memory}\n\
         data: {{plugin: alpaca, path: {data}}}\n\
         training: {{max_steps: {steps}, micro_batch_size: {micro}, gradient_accumulation_steps: 2, progress_bar: false{extra}}}\n",
        model = f.model.display(),
        out = f.work.join(name).display(),
        data = f.data.display(),
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn launch(nproc: usize, args: &[&str]) -> std::process::Output {
    let n = nproc.to_string();
    let mut all = vec!["launch", "--nproc", &n, "--timeout", "60"];
    all.extend_from_slice(args);
    ferrotune(&all)
}

fn losses(dir: &Path) -> Vec<f64> {
    read_jsonl(&dir.join("metrics.jsonl"))
        .into_iter()
        .filter_map(|l| l.get("loss").and_then(Value::as_f64))
        .collect()
}

/// The saved model's tensors, by key.
fn model_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Max |a − b| over the saved tensors of two runs: (all but the key biases, the key biases).
///
/// A key bias adds the same `q·b_k` to every score of a query's row, which softmax ignores:
/// its true gradient is exactly zero and what backward computes is rounding noise, which
/// depends on the order of the gradient reduction; AdamW normalises that noise into updates
/// of up to `lr` size. Those tensors are compared apart, with a looser bound.
fn max_model_diff(a: &Path, b: &Path) -> (f64, f64) {
    let (a, b) = (model_tensors(a), model_tensors(b));
    assert!(!a.is_empty() && a.len() == b.len(), "{} vs {} tensors", a.len(), b.len());
    let (mut rest, mut key_bias) = (0f64, 0f64);
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let d = f64::try_from((ta.to_kind(Kind::Double) - tb.to_kind(Kind::Double)).abs().max())
            .unwrap();
        if na.ends_with("k_proj.bias") {
            key_bias = key_bias.max(d);
        } else {
            rest = rest.max(d);
        }
    }
    (rest, key_bias)
}

/// `rank r of w: memory {json}`, which every rank of a launched run prints at the end.
fn memory_report(stderr: &str, rank: usize, world: usize) -> Value {
    let key = format!("rank {rank} of {world}: memory ");
    let line = stderr
        .lines()
        .find_map(|l| l.split_once(&key).map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| panic!("no `{key}` in\n{stderr}"));
    serde_json::from_str(&line).unwrap()
}

fn require_c10d() {
    if !HAS_C10D {
        panic!(
            "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild"
        );
    }
}

#[test]
fn full_weights_on_two_ranks_equal_one_process() {
    require_c10d();
    const STEPS: usize = 6;
    let f = fixture();
    let one = config("one", 4, "{plugin: single}", STEPS, "");
    let o = ferrotune(&["train", one.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let one = f.work.join("one");
    let reference = losses(&one);
    assert_eq!(reference.len(), STEPS);
    assert!(reference[0] > reference[STEPS - 1], "training lowers the loss: {reference:?}");
    let mut reports: Vec<(&str, [Value; 2])> = Vec::new();
    for (name, memory, extra) in [
        ("ddp", "{plugin: ddp, bucket_mb: 0.01}", ""),
        ("zero1", "{plugin: zero, stage: 1}", ""),
        ("zero2", "{plugin: zero, stage: 2}", ""),
        ("zero3", "{plugin: zero, stage: 3}", ""),
        ("zero3-offload-opt", "{plugin: zero, stage: 3, offload_optimizer: cpu}", ""),
        (
            "zero3-offload-all",
            "{plugin: zero, stage: 3, offload_optimizer: cpu, offload_param: cpu}",
            "",
        ),
        ("zero3-ckpt", "{plugin: zero, stage: 3}", ", gradient_checkpointing: true"),
    ] {
        let cfg = config(name, 2, memory, STEPS, extra);
        let o = launch(2, &["train", cfg.to_str().unwrap()]);
        let err = stderr(&o);
        assert!(o.status.success(), "{name}:\n{err}");
        let got = losses(&f.work.join(name));
        assert_eq!(got.len(), STEPS, "{name}");
        let worst = reference.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let (weights, key_bias) = max_model_diff(&one, &f.work.join(name));
        println!("{name}: max |loss - one process| = {worst:.2e}, max |weight - one process| = {weights:.2e} (key biases {key_bias:.2e})");
        assert!(worst <= 1e-5, "{name}: losses differ by {worst}");
        assert!(weights <= 1e-6, "{name}: final weights differ by {weights}");
        assert!(key_bias <= 1e-5, "{name}: key biases differ by {key_bias}");
        reports.push((name, [memory_report(&err, 0, 2), memory_report(&err, 1, 2)]));
    }
    let bytes = |name: &str, key: &str| -> [f64; 2] {
        let (_, r) = reports.iter().find(|(n, _)| *n == name).unwrap();
        [0, 1].map(|i| r[i][key].as_f64().unwrap_or_else(|| panic!("{name}: no {key}")))
    };
    for name in ["ddp", "zero1", "zero2", "zero3", "zero3-offload-opt"] {
        println!(
            "{name}: per rank params {:?}, gradients {:?}, optimizer state {:?}",
            bytes(name, "params"),
            bytes(name, "gradients"),
            bytes(name, "optimizer_state")
        );
    }
    let half = |name: &str, key: &str| {
        let (full, got) = (bytes("ddp", key), bytes(name, key));
        for r in 0..2 {
            assert!(
                got[r] <= 0.6 * full[r],
                "{name}: rank {r} {key} {} bytes, ddp's {}",
                got[r],
                full[r]
            );
        }
    };
    let same =
        |name: &str, key: &str| assert_eq!(bytes(name, key), bytes("ddp", key), "{name} {key}");
    // Stage 1 shards the optimizer state; 2 also the gradients; 3 also the parameters.
    half("zero1", "optimizer_state");
    same("zero1", "gradients");
    same("zero1", "params");
    half("zero2", "optimizer_state");
    half("zero2", "gradients");
    same("zero2", "params");
    for z3 in ["zero3", "zero3-offload-opt", "zero3-offload-all", "zero3-ckpt"] {
        half(z3, "optimizer_state");
        half(z3, "gradients");
        half(z3, "params");
    }
}

#[test]
fn zero3_killed_rank_resumes_to_the_unbroken_run() {
    require_c10d();
    const STEPS: usize = 12;
    let f = fixture();
    let memory = "{plugin: zero, stage: 3}";
    let unbroken = config("unbroken", 2, memory, STEPS, ", save_steps: 4");
    let o = launch(2, &["train", unbroken.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = f.work.join("unbroken/checkpoint-4");
    for file in [
        "weights-rank0.safetensors",
        "weights-rank1.safetensors",
        "optimizer-rank0.safetensors",
        "optimizer-rank1.safetensors",
    ] {
        assert!(ck.join(file).is_file(), "checkpoint-4 has no {file}");
    }

    let cfg = config("killed", 2, memory, STEPS, ", save_steps: 4");
    let killed =
        launch_and_kill_rank1(&cfg, &f.work.join("killed/checkpoint-4"), Duration::from_secs(120));
    let (status, err) = (killed.status, killed.stderr);
    assert!(!status.success(), "launch must fail when a rank dies:\n{err}");
    assert!(!f.work.join("killed/model.safetensors").exists(), "the run did not finish");

    let o = launch(2, &["train", cfg.to_str().unwrap(), "--resume"]);
    assert!(o.status.success(), "resume:\n{}", stderr(&o));
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    let (diff, key_bias) = max_model_diff(&f.work.join("unbroken"), &f.work.join("killed"));
    let diff = diff.max(key_bias);
    let (a, b) = (losses(&f.work.join("unbroken")), losses(&f.work.join("killed")));
    println!("resumed zero-3 run vs uninterrupted: max |weight diff| = {diff:.2e}; losses {a:?} vs {b:?}");
    assert_eq!(a.len(), b.len());
    assert!(diff <= 1e-6, "{diff}");

    // One process cannot resume the 2-rank shards: refused by the world size, before reading.
    let o = ferrotune(&["train", cfg.to_str().unwrap(), "--resume", ck.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("same world size"), "{}", stderr(&o));
}

/// `dtype: bf16` full fine-tuning (one process, `single`): the weights stay bf16, the
/// optimizer keeps an fp32 master of each beside its fp32 moments and the weight is the
/// master rounded to bf16 (checked on a checkpoint: `weights.safetensors` against
/// `optimizer.safetensors`' `<name>.master`); the saved model is bf16; a run resumed from that
/// checkpoint ends bit-identical to the unbroken one.
#[test]
fn bf16_full_finetuning_keeps_fp32_masters_and_resumes_exactly() {
    const STEPS: usize = 6;
    let f = fixture();
    let extra = ", save_steps: 3";
    let bf16 = |name: &str| {
        let cfg = config(name, 2, "{plugin: single}", STEPS, extra);
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("dtype: bf16\n{text}")).unwrap();
        cfg
    };
    let cfg = bf16("bf16");
    let o = ferrotune(&["train", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = f.work.join("bf16");
    let got = losses(&dir);
    assert!(got[0] > got[STEPS - 1], "bf16 training lowers the loss: {got:?}");
    let ck = dir.join("checkpoint-3");
    let weights = Tensor::read_safetensors(ck.join("weights.safetensors")).unwrap();
    let state = Tensor::read_safetensors(ck.join("optimizer.safetensors")).unwrap();
    for (name, w) in &weights {
        assert_eq!(w.kind(), Kind::BFloat16, "{name}");
        let master = |suffix: &str| {
            state
                .iter()
                .find(|(k, _)| *k == format!("{name}.{suffix}"))
                .unwrap_or_else(|| panic!("no {name}.{suffix} in the optimizer state"))
                .1
                .shallow_clone()
        };
        let m = master("master");
        assert_eq!(m.kind(), Kind::Float, "{name}.master");
        assert_eq!(master("exp_avg").kind(), Kind::Float, "{name}.exp_avg");
        assert!(m.to_kind(Kind::BFloat16).equal(w), "{name} is not its master rounded to bf16");
    }
    for (name, t) in model_tensors(&dir) {
        assert_eq!(t.kind(), Kind::BFloat16, "saved {name}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let dtype = config["dtype"].as_str().or(config["torch_dtype"].as_str());
    assert_eq!(dtype, Some("bfloat16"), "{config}");

    let resumed = bf16("bf16-resumed");
    let o = ferrotune(&["train", resumed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let second = f.work.join("bf16-resumed");
    std::fs::remove_file(second.join("model.safetensors")).unwrap();
    let o = ferrotune(&[
        "train",
        resumed.to_str().unwrap(),
        "--resume",
        second.join("checkpoint-3").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (model_tensors(&dir), model_tensors(&second));
    for ((na, ta), (_, tb)) in a.iter().zip(&b) {
        assert!(ta.equal(tb), "{na}: the resumed bf16 run differs from the unbroken one");
    }
    assert_eq!(losses(&dir), losses(&second));
}

/// DPO with `finetuning: full`: the reference is a frozen copy of the base (the policy itself
/// trains), so step 1's loss is exactly ln 2 (policy = reference), the margin then grows; on
/// 2 ranks under zero-3 (the reference's decoder weights sharded too) the losses equal one
/// process.
#[test]
fn dpo_full_finetuning_compares_with_a_frozen_reference() {
    require_c10d();
    const STEPS: usize = 4;
    let f = fixture();
    let pairs = f.work.join("pairs.jsonl");
    let words: Vec<String> = (0..WORDS).map(|i| format!("w{i}")).collect();
    let vocab = std::fs::read_to_string(f.work.join("tokenizer/tokenizer.json")).unwrap();
    // Words the fixture's tokenizer knows (its vocabulary is the first WORDS words).
    let known: Vec<&String> =
        words.iter().filter(|w| vocab.contains(&format!("\"{w}\""))).collect();
    let word = |i: usize| known[i % known.len()].as_str();
    let rows: String = (0..8)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("{} {}", word(i), word(i + 1)),
                "input": "",
                "chosen": format!("{} {} {}", word(i + 2), word(i + 3), word(i + 4)),
                "rejected": format!("{} {}", word(i + 5), word(i + 5)),
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&pairs, rows).unwrap();
    let run = |name: &str, micro: usize, memory: &str| {
        let yaml = format!(
            "model: {model}\noutput_dir: {out}\nseed: 5\nfinetuning: full\n\
             objective: {{plugin: dpo, beta: 0.1}}\n\
             optimizer: {{lr: 1.0e-3}}\nscheduler: {{type: constant}}\nmemory: {memory}\n\
             data: {{plugin: alpaca, path: {data}, config: {{ranking: true}}, shuffle: false}}\n\
             training: {{max_steps: {STEPS}, micro_batch_size: {micro}, progress_bar: false}}\n",
            model = f.model.display(),
            out = f.work.join(name).display(),
            data = pairs.display(),
        );
        let cfg = f.work.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let o = if micro == 4 {
            ferrotune(&["train", cfg.to_str().unwrap()])
        } else {
            launch(2, &["train", cfg.to_str().unwrap()])
        };
        assert!(o.status.success(), "{name}:\n{}", stderr(&o));
        read_jsonl(&f.work.join(name).join("metrics.jsonl"))
            .into_iter()
            .filter(|l| l.get("loss").is_some())
            .collect::<Vec<Value>>()
    };
    let one = run("dpo-one", 4, "{plugin: single}");
    let loss = |l: &Value| l["loss"].as_f64().unwrap();
    assert_eq!(one.len(), STEPS);
    assert!((loss(&one[0]) - std::f64::consts::LN_2).abs() < 1e-6, "step 1: {}", one[0]);
    assert!(loss(&one[STEPS - 1]) < loss(&one[0]) - 1e-3, "{one:?}");
    let margin = one[STEPS - 1]["train/rewards/margins"].as_f64().unwrap();
    assert!(margin > 0.0, "the chosen answers gain on the rejected ones: {margin}");
    let two = run("dpo-zero3", 2, "{plugin: zero, stage: 3}");
    let worst = one.iter().zip(&two).map(|(a, b)| (loss(a) - loss(b)).abs()).fold(0.0, f64::max);
    println!(
        "dpo full: losses {:?}; zero-3 on 2 ranks within {worst:.2e}",
        one.iter().map(loss).collect::<Vec<_>>()
    );
    assert!(worst <= 1e-5, "{worst}");
}

/// `ferrotune bench memory --finetuning full` on the tiny model: one JSON line per strategy
/// and rank, and the per-rank bytes follow DeepSpeed's table (optimizer state halved from
/// stage 1, gradients from stage 2, parameters from stage 3).
#[test]
fn bench_memory_prints_the_full_fine_tuning_table() {
    require_c10d();
    let f = fixture();
    let work = f.work.join("bench-memory-full");
    let o = ferrotune(&[
        "bench",
        "memory",
        "--finetuning",
        "full",
        "--model",
        f.model.to_str().unwrap(),
        "--work",
        work.to_str().unwrap(),
        "--ranks",
        "2",
        "--steps",
        "1",
        "--micro-batch-size",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12, "6 strategies × 2 ranks: {lines:?}");
    let get = |strategy: &str, key: &str| -> f64 {
        lines
            .iter()
            .filter(|l| l["strategy"] == strategy)
            .map(|l| l[key].as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    for l in &lines {
        assert_eq!(l["finetuning"], "full");
        assert!(l["peak_rss_mb"].as_f64().unwrap() > 0.0, "{l}");
    }
    let ddp = |key: &str| get("ddp", key);
    assert!(get("zero-1", "optimizer_state_bytes") <= 0.6 * ddp("optimizer_state_bytes"));
    assert!(get("zero-2", "gradient_bytes") <= 0.6 * ddp("gradient_bytes"));
    for z3 in ["zero-3", "zero-3+offload_optimizer", "zero-3+offload_optimizer+offload_param"] {
        assert!(get(z3, "param_bytes") <= 0.6 * ddp("param_bytes"), "{z3}");
    }
    assert_eq!(get("zero-2", "param_bytes"), ddp("param_bytes"));
}
