//! `ferrotune bench memory`: what each multi-rank memory strategy keeps per rank, and what
//! activation checkpointing saves.
//!
//! For 1 and 2 ranks and each of `ddp`, `zero` stage 1, 2 and 3, a short LoRA SFT run
//! (`ferrotune launch --nproc N train`, a config written to the work folder) prints at its
//! end, per rank, the bytes of optimizer state, of trainable parameters and of frozen weights
//! it holds (all of them and those of the decoder's linear layers, which stage 3 shards),
//! and its peak RSS (`VmHWM`); each becomes one JSON line. Then one long-sequence step of
//! `bench train` runs in a fresh process with and without `--gradient-checkpointing` and its
//! peak RSS is printed (one JSON line each). Every run is its own process, so peak RSS is the
//! run's own. Launched runs use Gloo on loopback (CPU).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The strategies compared: a name and the `memory:` section.
pub const STRATEGIES: [(&str, &str); 4] = [
    ("ddp", "{plugin: ddp}"),
    ("zero-1", "{plugin: zero, stage: 1}"),
    ("zero-2", "{plugin: zero, stage: 2}"),
    ("zero-3", "{plugin: zero, stage: 3}"),
];

/// The strategies of the full fine-tuning table (`--finetuning full`).
pub const FULL_STRATEGIES: [(&str, &str); 6] = [
    ("ddp", "{plugin: ddp}"),
    ("zero-1", "{plugin: zero, stage: 1}"),
    ("zero-2", "{plugin: zero, stage: 2}"),
    ("zero-3", "{plugin: zero, stage: 3}"),
    ("zero-3+offload_optimizer", "{plugin: zero, stage: 3, offload_optimizer: cpu}"),
    (
        "zero-3+offload_optimizer+offload_param",
        "{plugin: zero, stage: 3, offload_optimizer: cpu, offload_param: cpu}",
    ),
];

/// What `bench memory` runs.
#[derive(Debug, Clone)]
pub struct MemoryBench {
    /// The model directory (with its tokenizer).
    pub model: PathBuf,
    /// Where configs, synthetic data and run outputs go (created; reused runs are replaced).
    pub work: PathBuf,
    /// Optimizer steps of each launched run.
    pub steps: usize,
    /// Samples per rank and micro-batch.
    pub micro_batch_size: usize,
    /// Rank counts to launch (each must divide the synthetic row count evenly, see below).
    pub ranks: Vec<usize>,
    /// The model of the activation-checkpointing step (default `model`): a small vocabulary
    /// keeps the logits from hiding the decoder's activations.
    pub ckpt_model: Option<PathBuf>,
    /// The activation-checkpointing step: batch rows and tokens per row.
    pub ckpt_batch: usize,
    pub ckpt_seq_len: usize,
    /// `--plugin-dir DIR` pairs forwarded to every child command.
    pub plugin_args: Vec<String>,
    /// The full fine-tuning table: every weight trains ([`FULL_STRATEGIES`]), no
    /// activation-checkpointing step.
    pub full: bool,
    /// Launched runs use `training.gradient_checkpointing`.
    pub gradient_checkpointing: bool,
}

/// Synthetic alpaca rows: a multiple of every `micro_batch_size × ranks` the bench uses, so
/// that ZeRO stage 3 (every rank runs every micro-batch) accepts the data.
const ROWS: usize = 48;

fn write_rows(path: &Path) -> Result<()> {
    let words = [
        "river", "stone", "light", "garden", "window", "quiet", "morning", "paper", "green",
        "sound",
    ];
    let mut text = String::new();
    for i in 0..ROWS {
        let output: Vec<&str> =
            (0..24 + i % 7).map(|j| words[(i * 7 + j * 3) % words.len()]).collect();
        let row = json!({"instruction": format!("Describe scene number {i}."), "input": "", "output": output.join(" ")});
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The `rank r of n: memory {json}` report of each rank in a launched run's stderr.
pub fn memory_reports(stderr: &str, world: usize) -> Result<Vec<Value>> {
    (0..world)
        .map(|rank| {
            let key = format!("rank {rank} of {world}: memory ");
            let line = stderr
                .lines()
                .find_map(|l| l.split_once(&key).map(|(_, rest)| rest))
                .with_context(|| format!("no `{key}` line in the run's output"))?;
            serde_json::from_str(line)
                .with_context(|| format!("rank {rank}: bad memory report `{line}`"))
        })
        .collect()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn run(exe: &Path, args: &[String]) -> Result<(String, String)> {
    let o = Command::new(exe)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    if !o.status.success() {
        bail!("`{} {}` failed ({}):\n{}", exe.display(), args.join(" "), o.status, tail(&err));
    }
    Ok((out, err))
}

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the benchmark with the binary `exe` (this ferrotune), calling `emit` with each JSON
/// line as it is measured.
pub fn bench_memory(
    exe: &Path,
    opts: &MemoryBench,
    mut emit: impl FnMut(&Value),
) -> Result<Vec<Value>> {
    if let Some(&n) =
        opts.ranks.iter().find(|&&n| n == 0 || !ROWS.is_multiple_of(n * opts.micro_batch_size))
    {
        bail!("--ranks {n} with --micro-batch-size {}: the {ROWS} synthetic rows must split evenly over the ranks", opts.micro_batch_size);
    }
    std::fs::create_dir_all(&opts.work)
        .with_context(|| format!("cannot create {}", opts.work.display()))?;
    // The configs name absolute paths (a config's relative paths are relative to its folder).
    let work = std::fs::canonicalize(&opts.work)
        .with_context(|| format!("cannot resolve {}", opts.work.display()))?;
    let model = std::fs::canonicalize(&opts.model)
        .with_context(|| format!("--model {}", opts.model.display()))?;
    let data = work.join("rows.jsonl");
    write_rows(&data)?;
    let mut out = Vec::new();
    let strategies: &[(&str, &str)] = if opts.full { &FULL_STRATEGIES } else { &STRATEGIES };
    // Full fine-tuning writes the model at the end: in shards of 200 MB, so that the write
    // buffers one shard, not the whole model, and peak RSS measures the training.
    let trains = if opts.full {
        "finetuning: full"
    } else {
        "adapter: {plugin: lora, r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear}"
    };
    for &n in &opts.ranks {
        for &(name, memory) in strategies {
            let dir = work.join(format!("{name}-{n}"));
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot clear {}", dir.display()))?;
            }
            let yaml = format!(
                "model: {model}\noutput_dir: {out}\nseed: 1\n{trains}\n\
                 optimizer: {{lr: 1.0e-4}}\nmemory: {memory}\n\
                 data: {{plugin: alpaca, path: {data}}}\n\
                 training: {{max_steps: {steps}, micro_batch_size: {mbs}, gradient_accumulation_steps: 1, progress_bar: false, gradient_checkpointing: {ckpt}{shards}}}\n",
                model = model.display(),
                out = dir.display(),
                data = data.display(),
                steps = opts.steps,
                mbs = opts.micro_batch_size,
                ckpt = opts.gradient_checkpointing,
                shards = if opts.full { ", max_shard_size: 200MB" } else { "" },
            );
            let cfg = work.join(format!("{name}-{n}.yaml"));
            std::fs::write(&cfg, yaml)
                .with_context(|| format!("cannot write {}", cfg.display()))?;
            let mut args = vec!["launch".to_string(), "--nproc".into(), n.to_string()];
            args.extend(opts.plugin_args.iter().cloned());
            args.extend(["train".to_string(), cfg.display().to_string()]);
            let (_, err) = run(exe, &args).with_context(|| format!("{name} on {n} rank(s)"))?;
            if opts.full {
                // Each full run wrote its model (2 GB at 0.5B parameters): only the figures
                // are kept, or a table of 12 runs would fill the disk.
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
            for (rank, r) in memory_reports(&err, n)?.into_iter().enumerate() {
                let peak_rss_mb = r["peak_rss"].as_f64().map(|b| (b / MIB * 10.0).round() / 10.0);
                let line = if opts.full {
                    json!({
                        "finetuning": "full",
                        "strategy": name,
                        "ranks": n,
                        "rank": rank,
                        "param_bytes": r["params"],
                        "gradient_bytes": r["gradients"],
                        "optimizer_state_bytes": r["optimizer_state"],
                        "peak_rss_mb": peak_rss_mb,
                    })
                } else {
                    json!({
                        "strategy": name,
                        "ranks": n,
                        "rank": rank,
                        "optimizer_state_bytes": r["optimizer_state"],
                        "trainable_param_bytes": r["trainable"],
                        "frozen_param_bytes": r["frozen"],
                        "frozen_decoder_linear_bytes": r["frozen_decoder_linears"],
                        "peak_rss_mb": peak_rss_mb,
                    })
                };
                emit(&line);
                out.push(line);
            }
        }
    }
    let ckpt_steps: &[bool] = if opts.full { &[] } else { &[false, true] };
    for &on in ckpt_steps {
        let mut args = vec!["bench".to_string(), "train".into()];
        args.extend(opts.plugin_args.iter().cloned());
        args.extend(
            [
                "--model",
                &opts.ckpt_model.as_ref().unwrap_or(&opts.model).display().to_string(),
                "--batch",
                &opts.ckpt_batch.to_string(),
                "--seq-len",
                &opts.ckpt_seq_len.to_string(),
                "--steps",
                "1",
                "--warmup",
                "0",
            ]
            .map(String::from),
        );
        if on {
            args.push("--gradient-checkpointing".into());
        }
        let (stdout, _) = run(exe, &args).with_context(|| {
            format!("bench train, activation checkpointing {}", if on { "on" } else { "off" })
        })?;
        let result: Value = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("bench train printed no JSON line:\n{}", tail(&stdout)))?;
        let line = json!({
            "activation_checkpointing": on,
            "model": opts.ckpt_model.as_ref().unwrap_or(&opts.model).display().to_string(),
            "batch": opts.ckpt_batch,
            "seq_len": opts.ckpt_seq_len,
            "peak_rss_mb": result["peak_rss_mb"],
        });
        emit(&line);
        out.push(line);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_found_per_rank_and_missing_ones_named() {
        let err = "[rank 1] rank 1 of 2: memory {\"frozen\": 4}\n[rank 0] rank 0 of 2: memory {\"frozen\": 8}\n";
        let r = memory_reports(err, 2).unwrap();
        assert_eq!((r[0]["frozen"].as_u64(), r[1]["frozen"].as_u64()), (Some(8), Some(4)));
        let e = memory_reports("[rank 0] rank 0 of 2: memory {}\n", 2).unwrap_err();
        assert!(e.to_string().contains("rank 1 of 2"), "{e}");
    }
}
