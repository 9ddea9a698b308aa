//! Multi-rank training over libtorch c10d (Gloo on CPU, 2 ranks on loopback).
//!
//! * `c10d_collectives_two_ranks`: this test binary re-runs itself as 2 ranks
//!   (`c10d_rank_worker`); each checks all-reduce (sum, avg, max, a non-contiguous tensor),
//!   all-gather, reduce-scatter, broadcast and barrier against closed-form values.
//! * `ddp_and_zero_match_one_process`: one process with micro_batch_size 4 (memory `single`)
//!   against `ferrotune launch --nproc 2` with micro_batch_size 2 under `ddp` and `zero`
//!   stages 1, 2, 3 (same global batch): per-step losses within 1e-5 over 10 steps, and the
//!   final adapters close.
//! * `zero3_shards_frozen_weights_and_merges`: `zero` stage 3 shards the frozen decoder
//!   weights (with and without activation checkpointing, shards offloaded to the CPU): per-step
//!   losses and the final adapter equal one process within 1e-5, the frozen decoder bytes per
//!   rank halve from 1 to 2 ranks, and `ferrotune merge` of the 2-rank adapter gives the
//!   merged model of the one-process adapter.
//! * `qwen2vl_ranks_without_images_in_their_batch`: a tiny Qwen2-VL with the PatchMerger
//!   trained in full, on LLaVA rows alternating image / text-only so that rank 1 never sees an
//!   image (its merger has no gradient, which the reduction must count as zeros): `ddp` and
//!   `zero` stages 1, 2, 3 on 2 ranks finish (no rank hangs) with the per-step losses, the
//!   adapter and the merger of one process within 1e-5.
//! * `zero3_sharded_at_load_serves_adapters_that_read_the_base`: DoRA, PiSSA and int8 QLoRA
//!   under zero-3 (weights sharded as the model is read) equal one process.
//! * `killed_rank_stops_launch_and_resume_completes`: SIGKILL of rank 1 mid-run makes launch
//!   exit non-zero naming the rank, fast; `--resume` from the last sharded checkpoint (zero-2,
//!   one optimizer file per rank) finishes with the adapter of an uninterrupted run.
//!
//! Needs `cargo build --workspace` (the CLI, `lora`, `sft`, `single`, `dist`, `alpaca`,
//! `llava` plugins), `assets/qwen2-tokenizer` (the Qwen2-VL test) and a build with c10d
//! (libgloo-dev installed); no Python.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferrotune::dist::collectives::{ProcessGroup, RankEnv, HAS_C10D};
use ferrotune_plugin_api::{Collectives, ReduceOp};
use ferrotune_tests::*;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const WORDS: usize = 40;

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// One rank of `c10d_collectives_two_ranks` (does nothing unless started by it).
#[test]
fn c10d_rank_worker() {
    if std::env::var_os("FERROTUNE_TEST_C10D_WORKER").is_none() {
        return;
    }
    let env = RankEnv::from_env().unwrap().expect("WORLD_SIZE > 1");
    let pg = ProcessGroup::new(&env, Duration::from_secs(30)).unwrap();
    let (r, w) = (pg.rank() as f64, pg.world_size() as f64);
    assert_eq!(w, 2.0);
    let sum_ranks = w * (w - 1.0) / 2.0;

    let t = Tensor::from_slice(&[r + 1.0, 2.0 * (r + 1.0)]);
    pg.all_reduce(&t, ReduceOp::SUM).unwrap();
    assert_eq!(vals(&t), [sum_ranks + w, 2.0 * (sum_ranks + w)]);
    let t = Tensor::from_slice(&[r + 1.0]).to_kind(Kind::Float);
    pg.all_reduce(&t, ReduceOp::AVG).unwrap();
    assert_eq!(vals(&t), [(sum_ranks + w) / w]);
    let t = Tensor::from_slice(&[r, -r]);
    pg.all_reduce(&t, ReduceOp::MAX).unwrap();
    assert_eq!(vals(&t), [w - 1.0, 0.0]);
    // A transposed (non-contiguous) view is reduced in place.
    let base = (Tensor::arange(6, (Kind::Double, Device::Cpu)) + r).view([2, 3]);
    let view = base.tr();
    pg.all_reduce(&view, ReduceOp::SUM).unwrap();
    let expect: Vec<f64> = (0..6).map(|i| w * i as f64 + sum_ranks).collect();
    assert_eq!(vals(&base), expect);

    let g = pg.all_gather(&Tensor::from_slice(&[r, r * 10.0, 7.0])).unwrap();
    assert_eq!(g.len(), 2);
    for (i, t) in g.iter().enumerate() {
        assert_eq!(vals(t), [i as f64, i as f64 * 10.0, 7.0]);
    }

    // input_j = arange(4) + 10·rank_j; rank i receives the summed chunk i.
    let input = Tensor::arange(4, (Kind::Double, Device::Cpu)) + 10.0 * r;
    let out = Tensor::zeros([2], (Kind::Double, Device::Cpu));
    pg.reduce_scatter(&out, &input, ReduceOp::SUM).unwrap();
    let chunk: Vec<f64> = (0..2).map(|k| w * (2.0 * r + k as f64) + 10.0 * sum_ranks).collect();
    assert_eq!(vals(&out), chunk);
    let e = pg
        .reduce_scatter(&out, &Tensor::zeros([3], (Kind::Double, Device::Cpu)), ReduceOp::SUM)
        .unwrap_err();
    assert!(e.message().contains("multiple of the world size"), "{e}");

    let b = Tensor::from_slice(&[r, r + 0.5]);
    pg.broadcast(&b, 1).unwrap();
    assert_eq!(vals(&b), [1.0, 1.5]);
    pg.barrier().unwrap();
    println!("rank {} ok", pg.rank());
}

#[test]
fn c10d_collectives_two_ranks() {
    require_c10d(
        "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild",
    );
    let port = ferrotune::dist::launch::free_port().unwrap().to_string();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "c10d_rank_worker", "--nocapture", "--test-threads", "1"])
                .env("FERROTUNE_TEST_C10D_WORKER", "1")
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .output_spawn()
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains(&format!("rank {rank} ok")),
            "rank {rank}:\n{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60));
}

trait SpawnPiped {
    fn output_spawn(&mut self) -> std::process::Child;
}
impl SpawnPiped for Command {
    fn output_spawn(&mut self) -> std::process::Child {
        self.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }
}

// ------------------------------------------------------------------ training

type Fixture = TextFixture;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| text_fixture("dist", WORDS, 9, 16, 5))
}

/// A run config: `micro` samples per rank and micro-batch, 2 micro-batches per step.
fn config(
    f: &Fixture,
    name: &str,
    micro: usize,
    memory: &str,
    steps: usize,
    save: Option<usize>,
) -> PathBuf {
    let save = save.map(|s| format!(", save_steps: {s}")).unwrap_or_default();
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\nseed: 17\n\
         adapter: {{plugin: lora, r: 4, lora_alpha: 8, lora_dropout: 0.0, target_modules: all-linear}}\n\
         optimizer: {{lr: 1.0e-3, weight_decay: 0.01, max_grad_norm: 1.0}}\n\
         scheduler: {{type: cosine, warmup_steps: 2}}\n\
         memory: {memory}\n\
         data: {{plugin: alpaca, path: {data}}}\n\
         training: {{max_steps: {steps}, micro_batch_size: {micro}, gradient_accumulation_steps: 2, progress_bar: false{save}}}\n",
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

fn step_lines(dir: &Path) -> Vec<Value> {
    read_jsonl(&dir.join("metrics.jsonl")).into_iter().filter(|l| l.get("loss").is_some()).collect()
}

fn adapter(dir: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn max_adapter_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (adapter(a), adapter(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            f64::try_from((ta - tb).abs().max()).unwrap()
        })
        .fold(0.0, f64::max)
}

#[test]
fn ddp_and_zero_match_one_process() {
    require_c10d(
        "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild",
    );
    let f = fixture();
    const STEPS: usize = 10;
    let one = train_one(f, "one", STEPS);
    let reference = step_lines(&one);
    assert_eq!(reference.len(), STEPS);
    let mut state_bytes = Vec::new();
    for (name, memory) in [
        ("ddp", "{plugin: ddp, bucket_mb: 0.001}"),
        ("zero1", "{plugin: zero, stage: 1}"),
        ("zero2", "{plugin: zero, stage: 2}"),
        ("zero3", "{plugin: zero, stage: 3, offload_optimizer: cpu}"),
    ] {
        let cfg = config(f, name, 2, memory, STEPS, None);
        let o = launch(2, &["train", cfg.to_str().unwrap()]);
        assert!(o.status.success(), "{name}:\n{}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("[rank 1]") && err.contains("[rank 0]"), "{err}");
        let bytes: Vec<u64> = (0..2).map(|r| state_bytes_of(&err, r)).collect();
        println!("{name}: optimizer state bytes per rank {bytes:?}");
        state_bytes.push((name, bytes));
        let lines = step_lines(&f.work.join(name));
        assert_eq!(lines.len(), STEPS, "{name}: only rank 0 writes metrics");
        let mut worst = 0f64;
        for (a, b) in reference.iter().zip(&lines) {
            let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            worst = worst.max((la - lb).abs());
            let (ga, gb) = (a["grad_norm"].as_f64().unwrap(), b["grad_norm"].as_f64().unwrap());
            assert!(
                (ga - gb).abs() <= 1e-4 * ga.abs().max(1.0),
                "{name} step {}: grad_norm {ga} vs {gb}",
                a["step"]
            );
        }
        let adapter_diff = max_adapter_diff(&one, &f.work.join(name));
        println!("{name}: max |loss - one process| over {STEPS} steps = {worst:.2e}, max |adapter - one process| = {adapter_diff:.2e}");
        assert!(worst <= 1e-5, "{name}: per-step losses differ from one process by up to {worst}");
        assert!(
            adapter_diff <= 1e-5,
            "{name}: final adapter differs from one process by up to {adapter_diff}"
        );
        assert!(
            reference.first().unwrap()["loss"].as_f64().unwrap()
                > reference.last().unwrap()["loss"].as_f64().unwrap()
        );
    }
    // ddp keeps the whole state on each rank: the one-process state (the adapter's size twice,
    // fp32 exp_avg and exp_avg_sq). ZeRO splits it: the ranks' shards sum to it, each about half.
    let adapter_bytes: u64 = adapter(&one).iter().map(|(_, t)| (t.numel() * 4) as u64).sum();
    let full = 2 * adapter_bytes;
    assert_eq!(state_bytes[0].1, [full, full], "ddp");
    for (name, b) in &state_bytes[1..] {
        assert_eq!(b[0] + b[1], full, "{name}");
        assert!(b.iter().all(|&x| (x as f64) < 0.6 * full as f64), "{name}: {b:?} of {full}");
    }
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

/// Max |a - b| over the tensors of every safetensors file of two model directories.
fn max_weights_diff(a: &Path, b: &Path) -> f64 {
    let load = |d: &Path| {
        let mut all = Vec::new();
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                all.extend(Tensor::read_safetensors(&p).unwrap());
            }
        }
        all.sort_by(|x, y| x.0.cmp(&y.0));
        all
    };
    let (a, b) = (load(a), load(b));
    assert!(!a.is_empty() && a.len() == b.len(), "{} vs {} tensors", a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            f64::try_from((ta.to_kind(Kind::Double) - tb.to_kind(Kind::Double)).abs().max())
                .unwrap()
        })
        .fold(0.0, f64::max)
}

#[test]
fn zero3_shards_frozen_weights_and_merges() {
    require_c10d(
        "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild",
    );
    let f = fixture();
    const STEPS: usize = 6;
    let one = train_one(f, "z3-one", STEPS);
    let reference = step_lines(&one);
    let memory = "{plugin: zero, stage: 3, offload_param: cpu}";
    let mut decoder_bytes = Vec::new();
    for (name, nproc, checkpointing) in
        [("z3-1rank", 1, false), ("z3-2ranks", 2, false), ("z3-2ranks-ckpt", 2, true)]
    {
        let cfg = config(f, name, 4 / nproc, memory, STEPS, None);
        if checkpointing {
            let yaml = std::fs::read_to_string(&cfg).unwrap().replace(
                "progress_bar: false",
                "progress_bar: false, gradient_checkpointing: true",
            );
            std::fs::write(&cfg, yaml).unwrap();
        }
        let o = launch(nproc, &["train", cfg.to_str().unwrap()]);
        let err = stderr(&o);
        assert!(o.status.success(), "{name}:\n{err}");
        let reports: Vec<Value> = (0..nproc).map(|r| memory_report(&err, r, nproc)).collect();
        println!("{name}: per rank {reports:?}");
        decoder_bytes.push(
            reports
                .iter()
                .map(|r| r["frozen_decoder_linears"].as_u64().unwrap())
                .collect::<Vec<_>>(),
        );
        let lines = step_lines(&f.work.join(name));
        assert_eq!(lines.len(), STEPS);
        let worst = reference
            .iter()
            .zip(&lines)
            .map(|(a, b)| (a["loss"].as_f64().unwrap() - b["loss"].as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        let adapter_diff = max_adapter_diff(&one, &f.work.join(name));
        println!("{name}: max |loss - one process| = {worst:.2e}, max |adapter - one process| = {adapter_diff:.2e}");
        assert!(worst <= 1e-5, "{name}: per-step losses differ from one process by up to {worst}");
        assert!(
            adapter_diff <= 1e-5,
            "{name}: final adapter differs from one process by up to {adapter_diff}"
        );
    }
    // One rank keeps every decoder weight; two ranks each keep half of each (plus at most one
    // padding element per layer).
    let full = decoder_bytes[0][0];
    for b in &decoder_bytes[1..] {
        for &x in b {
            assert!(
                x >= full / 2 && x <= full / 2 + full / 100,
                "2 ranks: {x} bytes of frozen decoder weights per rank, one rank {full}"
            );
        }
    }
    println!(
        "frozen decoder linear bytes per rank: 1 rank {full}, 2 ranks {:?}",
        &decoder_bytes[1]
    );

    // The adapter rank 0 wrote is the whole adapter: merging it gives the one-process merge.
    let merged = |name: &str| {
        let out = f.work.join(format!("{name}-merged"));
        let o = ferrotune(&[
            "merge",
            "--model",
            f.model.to_str().unwrap(),
            "--adapter",
            f.work.join(name).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "merge {name}:\n{}", stderr(&o));
        out
    };
    let (a, b) = (merged("z3-one"), merged("z3-2ranks"));
    let diff = max_weights_diff(&a, &b);
    let moved = max_weights_diff(&a, &f.model);
    println!("merged zero-3 adapter vs merged one-process adapter: max diff {diff:.2e} (merge moved weights by up to {moved:.2e})");
    assert!(moved > 1e-4, "the merge changed nothing");
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn qwen2vl_ranks_without_images_in_their_batch() {
    require_c10d(
        "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild",
    );
    let work = temp_dir("dist-vl");
    let model = work.join("model");
    init_tiny_vl_model(&model, 3);
    // Unshuffled, one row per rank and micro-batch: global micro-batch k is rows 2k (an
    // image: rank 0) and 2k+1 (text only: rank 1).
    let images = repo_root().join("datasets/story-llava/images");
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            let answer = ["A green giant walks by the pines.", "The small creature follows, curious.", "They stop at the river.", "Night falls over the hills."][i % 4];
            if i % 2 == 0 {
                serde_json::json!({"id": format!("img-{i}"), "image": images.join(format!("toy-train-00{}_1.png", i / 2)).display().to_string(),
                    "conversations": [{"from": "human", "value": "<image>\nWhat happens here?"}, {"from": "gpt", "value": answer}]})
            } else {
                serde_json::json!({"id": format!("text-{i}"), "conversations": [{"from": "human", "value": format!("Tell me part {i} of the story.")}, {"from": "gpt", "value": answer}]})
            }
        })
        .collect();
    let data = work.join("mixed.json");
    std::fs::write(&data, serde_json::to_string(&rows).unwrap()).unwrap();
    const STEPS: usize = 4;
    let config = |name: &str, micro: usize, memory: &str| {
        let path = work.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "model: {model}\noutput_dir: {out}\nseed: 5\n\
                 adapter: {{plugin: lora, r: 8, lora_alpha: 16, lora_dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}\n\
                 vision: {{tune_merger: true, merger_lr: 1.0e-3}}\n\
                 optimizer: {{lr: 1.0e-3}}\nscheduler: {{type: constant}}\nmemory: {memory}\n\
                 data: {{plugin: llava, path: {data}, shuffle: false, cutoff_len: 512, image_max_pixels: 50176}}\n\
                 training: {{max_steps: {STEPS}, micro_batch_size: {micro}, gradient_accumulation_steps: 2, progress_bar: false}}\n",
                model = model.display(),
                out = work.join(name).display(),
                data = data.display(),
            ),
        )
        .unwrap();
        path
    };
    let one = config("one", 2, "{plugin: single}");
    let o = ferrotune(&["train", one.to_str().unwrap()]);
    assert!(o.status.success(), "one process: {}", stderr(&o));
    let reference = step_lines(&work.join("one"));
    assert_eq!(reference.len(), STEPS);
    let merger = |name: &str| {
        let mut t =
            Tensor::read_safetensors(work.join(name).join("non_lora_state_dict.safetensors"))
                .unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let base = merger("one");
    assert!(!base.is_empty());
    for (name, memory) in [
        ("ddp", "{plugin: ddp}"),
        ("zero1", "{plugin: zero, stage: 1}"),
        ("zero2", "{plugin: zero, stage: 2}"),
        ("zero3", "{plugin: zero, stage: 3}"),
    ] {
        let cfg = config(name, 1, memory);
        let started = Instant::now();
        let o = launch(2, &["train", cfg.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let lines = step_lines(&work.join(name));
        assert_eq!(lines.len(), STEPS);
        let worst = reference
            .iter()
            .zip(&lines)
            .map(|(a, b)| (a["loss"].as_f64().unwrap() - b["loss"].as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        let adapter_diff = max_adapter_diff(&work.join("one"), &work.join(name));
        let got = merger(name);
        assert_eq!(got.len(), base.len());
        let merger_diff = base
            .iter()
            .zip(&got)
            .map(|((na, a), (nb, b))| {
                assert_eq!(na, nb);
                f64::try_from((a - b).abs().max()).unwrap()
            })
            .fold(0.0, f64::max);
        println!(
            "qwen2-vl {name} on 2 ranks ({:.1} s): max |loss - one process| {worst:.2e}, adapter {adapter_diff:.2e}, merger {merger_diff:.2e}",
            started.elapsed().as_secs_f64()
        );
        assert!(
            worst <= 1e-5 && adapter_diff <= 1e-5 && merger_diff <= 1e-5,
            "{name}: loss {worst}, adapter {adapter_diff}, merger {merger_diff}"
        );
    }
    // The merger did train (a test of zeros-for-missing-gradients needs a gradient somewhere).
    let model_weights = Tensor::read_safetensors(model.join("model.safetensors")).unwrap();
    let (_, before) =
        model_weights.iter().find(|(n, _)| n.ends_with("merger.mlp.0.weight")).unwrap();
    let (_, after) = base.iter().find(|(n, _)| n.ends_with("merger.mlp.0.weight")).unwrap();
    assert!(f64::try_from((before - after).abs().max()).unwrap() > 1e-5, "the merger did not move");
}

/// [`config`] with the adapter line replaced by `adapter` (the rest unchanged).
fn config_with_adapter(
    f: &Fixture,
    name: &str,
    micro: usize,
    memory: &str,
    steps: usize,
    adapter: &str,
) -> PathBuf {
    let cfg = config(f, name, micro, memory, steps, None);
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    let line = yaml.lines().find(|l| l.starts_with("adapter:")).unwrap().to_string();
    std::fs::write(&cfg, yaml.replace(&line, &format!("adapter: {adapter}"))).unwrap();
    cfg
}

/// ZeRO-3 shards each decoder weight as the model is read, before adapters are attached:
/// adapters that read the base at attach (DoRA's magnitude, PiSSA's SVD, which also rewrites
/// the base) and a quantizer (QLoRA packs a gathered weight) must still see the whole weight.
/// Each gives the per-step losses and adapter of one process within 1e-5 on 2 ranks.
#[test]
fn zero3_sharded_at_load_serves_adapters_that_read_the_base() {
    require_c10d(
        "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild",
    );
    let f = fixture();
    const STEPS: usize = 4;
    let lora = "plugin: lora, r: 4, lora_alpha: 8, lora_dropout: 0.0, target_modules: all-linear";
    for (name, adapter, quant) in [
        ("z3-dora", format!("{{{lora}, use_dora: true}}"), ""),
        ("z3-pissa", format!("{{{lora}, init_lora_weights: pissa}}"), ""),
        ("z3-qlora", format!("{{{lora}}}"), "quantization: {plugin: int8}\n"),
    ] {
        let run = |suffix: &str, nproc: usize, memory: &str| {
            let run_name = format!("{name}-{suffix}");
            let cfg = config_with_adapter(f, &run_name, 4 / nproc, memory, STEPS, &adapter);
            if !quant.is_empty() {
                let yaml = std::fs::read_to_string(&cfg).unwrap();
                std::fs::write(&cfg, format!("{yaml}{quant}")).unwrap();
            }
            let o = if nproc == 1 {
                ferrotune(&["train", cfg.to_str().unwrap()])
            } else {
                launch(nproc, &["train", cfg.to_str().unwrap()])
            };
            assert!(o.status.success(), "{run_name}:\n{}", stderr(&o));
            (f.work.join(&run_name), stderr(&o))
        };
        let (one, _) = run("one", 1, "{plugin: single}");
        let (two, err) = run("2ranks", 2, "{plugin: zero, stage: 3}");
        let (a, b) = (step_lines(&one), step_lines(&two));
        assert_eq!((a.len(), b.len()), (STEPS, STEPS));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x["loss"].as_f64().unwrap() - y["loss"].as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        let adapter_diff = max_adapter_diff(&one, &two);
        let report = memory_report(&err, 1, 2);
        println!("{name}: max |loss - one process| = {worst:.2e}, max |adapter - one process| = {adapter_diff:.2e}, rank 1 {report}");
        assert!(
            worst <= 1e-5 && adapter_diff <= 1e-5,
            "{name}: losses differ by {worst}, adapters by {adapter_diff}"
        );
        if quant.is_empty() {
            // Half of each decoder weight (PiSSA's rewritten residual too) and every bias.
            let (mut weights, mut biases) = (0u64, 0u64);
            for (k, t) in Tensor::read_safetensors(f.model.join("model.safetensors")).unwrap() {
                let bytes = (t.numel() * 4) as u64;
                match (k.contains(".layers.") && k.contains("_proj."), k.ends_with(".weight")) {
                    (true, true) => weights += bytes,
                    (true, false) => biases += bytes,
                    _ => {}
                }
            }
            let held = report["frozen_decoder_linears"].as_u64().unwrap();
            let expected = weights / 2 + biases;
            assert!(
                held >= expected && held <= expected + weights / 100,
                "{name}: rank 1 holds {held} bytes of decoder linears, half is {expected}"
            );
        }
    }
}

/// An untied `lm_head` is sharded under zero-3 too (the tied one is the embedding, which stays
/// whole): 2 ranks equal one process, and rank 1 holds half of the decoder weights and of the
/// head.
#[test]
fn zero3_shards_an_untied_lm_head() {
    require_c10d(
        "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild",
    );
    let f = fixture();
    let model = f.work.join("model-untied");
    if !model.join("config.json").is_file() {
        let tok = f.model.to_str().unwrap();
        let o = ferrotune(&[
            "init-model",
            "--preset",
            "tiny",
            "--dtype",
            "f32",
            "--seed",
            "4",
            "--tie-embeddings",
            "false",
            "--tokenizer",
            tok,
            "--out",
            model.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "init-model: {}", stderr(&o));
    }
    const STEPS: usize = 4;
    let run = |name: &str, nproc: usize, memory: &str| {
        let cfg = config(f, name, 4 / nproc, memory, STEPS, None);
        let yaml = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("model: {}", f.model.display()),
            &format!("model: {}", model.display()),
        );
        std::fs::write(&cfg, yaml).unwrap();
        let o = if nproc == 1 {
            ferrotune(&["train", cfg.to_str().unwrap()])
        } else {
            launch(nproc, &["train", cfg.to_str().unwrap()])
        };
        assert!(o.status.success(), "{name}:\n{}", stderr(&o));
        (f.work.join(name), stderr(&o))
    };
    let (one, _) = run("untied-one", 1, "{plugin: single}");
    let (two, err) = run("untied-z3", 2, "{plugin: zero, stage: 3}");
    let (a, b) = (step_lines(&one), step_lines(&two));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x["loss"].as_f64().unwrap() - y["loss"].as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    let adapter_diff = max_adapter_diff(&one, &two);
    let report = memory_report(&err, 1, 2);
    // Every frozen tensor whole, less half of each sharded weight (padding: one element each).
    let (mut all, mut sharded, mut layers) = (0u64, 0u64, 0u64);
    for (k, t) in Tensor::read_safetensors(model.join("model.safetensors")).unwrap() {
        let bytes = (t.numel() * 4) as u64;
        all += bytes;
        if (k.contains(".layers.") && k.contains("_proj.") && k.ends_with(".weight"))
            || k == "lm_head.weight"
        {
            sharded += bytes;
            layers += 1;
        }
    }
    let held = report["frozen"].as_u64().unwrap();
    let expected = all - sharded / 2;
    println!("untied lm_head under zero-3: max |loss - one process| {worst:.2e}, adapter {adapter_diff:.2e}; rank 1 holds {held} frozen bytes of {all} (expected {expected})");
    assert!(
        worst <= 1e-5 && adapter_diff <= 1e-5,
        "losses differ by {worst}, adapters by {adapter_diff}"
    );
    assert!(
        held >= expected && held <= expected + 4 * layers,
        "rank 1 holds {held} frozen bytes, expected {expected}"
    );
}

/// `rank r of 2: optimizer state N bytes`, which every rank of a launched run prints at the end.
fn state_bytes_of(stderr: &str, rank: usize) -> u64 {
    let key = format!("rank {rank} of 2: optimizer state ");
    let line = stderr
        .lines()
        .find_map(|l| l.split_once(&key).map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| panic!("no `{key}` in\n{stderr}"));
    line.trim_end_matches(" bytes").parse().unwrap()
}

/// The one-process reference: micro_batch_size 4 = 2 per rank × 2 ranks.
fn train_one(f: &Fixture, name: &str, steps: usize) -> PathBuf {
    let cfg = config(f, name, 4, "{plugin: single}", steps, None);
    let o = ferrotune(&["train", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    f.work.join(name)
}

#[test]
fn killed_rank_stops_launch_and_resume_completes() {
    require_c10d(
        "this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild",
    );
    let f = fixture();
    const STEPS: usize = 40;
    let memory = "{plugin: zero, stage: 2}";
    let full = config(f, "full", 2, memory, STEPS, Some(4));
    let o = launch(2, &["train", full.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = f.work.join("full/checkpoint-4");
    assert!(
        ck.join("optimizer-rank0.safetensors").is_file()
            && ck.join("optimizer-rank1.safetensors").is_file(),
        "sharded checkpoint"
    );
    // Each rank's shard holds only the state of the parameters it owns: about half.
    let shard = |r: usize| {
        Tensor::read_safetensors(ck.join(format!("optimizer-rank{r}.safetensors"))).unwrap().len()
    };
    assert!(shard(0) > 1 && shard(1) > 1);

    let cfg = config(f, "killed", 2, memory, STEPS, Some(4));
    let killed =
        launch_and_kill_rank1(&cfg, &f.work.join("killed/checkpoint-4"), Duration::from_secs(60));
    let (status, elapsed, err) = (killed.status, killed.exit_after_kill, killed.stderr);
    println!(
        "launch exited {:?} {:.2} s after rank 1 was killed",
        status.code(),
        elapsed.as_secs_f64()
    );
    assert!(!status.success(), "launch must fail when a rank dies:\n{err}");
    assert!(err.contains("rank 1 of 2 failed (signal 9)"), "{err}");
    assert!(elapsed < Duration::from_secs(20), "launch took {elapsed:?} to notice");
    assert!(!f.work.join("killed/adapter_model.safetensors").exists(), "the run did not finish");

    let o = launch(2, &["train", cfg.to_str().unwrap(), "--resume"]);
    assert!(o.status.success(), "resume:\n{}", stderr(&o));
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    let diff = max_adapter_diff(&f.work.join("full"), &f.work.join("killed"));
    println!("resumed run vs uninterrupted: max |adapter diff| = {diff:.2e}");
    assert!(diff <= 1e-6, "{diff}");

    // Another world size cannot resume a sharded checkpoint.
    let o = ferrotune(&["train", cfg.to_str().unwrap(), "--resume", ck.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("same world size"), "{}", stderr(&o));
}

/// Fails the test with `why` on a build without the c10d layer (this build's constant).
fn require_c10d(why: &str) {
    if !HAS_C10D {
        panic!("{why}");
    }
}
