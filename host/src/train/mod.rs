//! `ferrotune train config.yaml`: the recipe that wires the plugins a config names ([`Run`]:
//! setup → step → evaluate → finish, in `run.rs`) and the loop that drives it ([`train`]).
//!
//! model (host) + adapter plugin → trainable parameters → dataset plugin → chat template,
//! token ids and label masks (host) → objective plugin (loss) → backward → memory plugin
//! (clipping, optimizer step) → metrics (JSON lines), checkpoints (atomic), final PEFT
//! adapter directory.
//!
//! Determinism, so that `--resume` continues exactly: the data order of epoch `e` is a
//! permutation drawn from a generator seeded by `(seed, e)`; libtorch's generator (dropout)
//! is re-seeded from `(seed, step)` at the start of every optimizer step; the learning-rate
//! schedule is a function of the step. A checkpoint therefore needs only the adapter, the
//! optimizer state and the step number. Resuming also cuts `metrics.jsonl` back to the
//! checkpoint's step, so a killed and resumed run logs each step once, as an uninterrupted one.
pub mod checkpoint;
pub mod config;
pub mod context;
pub mod data;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod step;
pub mod vision;

use anyhow::{Context, Result};
use std::path::PathBuf;

use crate::plugins::Registry;
pub use checkpoint::latest_checkpoint;
use checkpoint::{write_metrics_line, METRICS_FILE};
use config::TrainConfig;
pub use context::{load_rewards, LoadedReward, PolicyContext};
pub use data::{encode_options, image_prep, permutation, rank_share, read_data};
pub use run::{Losses, Run, StepResult};
pub use step::{batch_meta, optimizer_step, StepOutcome, StepTiming};

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub truncated_samples: usize,
    pub skipped_samples: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub trainable_parameters: i64,
    pub seconds: f64,
    pub output_dir: PathBuf,
}

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The newest `checkpoint-N` in the output directory.
    Latest,
    Path(PathBuf),
}

/// Runs (or resumes) a training run: [`Run::setup`], then [`Run::step`] until the last step
/// with a metrics line per logging step, [`Run::evaluate`] every `eval_steps` and at the end,
/// a checkpoint every `save_steps`, and [`Run::finish`]. Only rank 0 writes metrics.
pub fn train(
    cfg: &TrainConfig,
    registry: &Registry,
    resume: Option<Resume>,
) -> Result<TrainSummary> {
    let mut run = Run::setup(cfg, registry, resume)?;
    let t = &cfg.training;
    let mut metrics = if run.rank() == 0 {
        let path = cfg.output_dir.join(METRICS_FILE);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        Some(file.with_context(|| format!("cannot open {}", path.display()))?)
    } else {
        None
    };
    let bar = if run.rank() == 0 {
        progress_bar(t.progress_bar, run.total_steps, run.step)
    } else {
        None
    };
    let mut losses = Losses::default();
    let mut last_eval_step = None;
    while !run.done() {
        let s = run.step()?;
        losses.first.get_or_insert(s.loss);
        losses.last = Some(s.loss);
        let mut line = s.json();
        if t.eval_steps.is_some_and(|every| s.step % every == 0) {
            if let Some((l, eval_metrics)) = run.evaluate()? {
                add_eval(&mut line, l, eval_metrics);
                losses.eval = Some(l);
                last_eval_step = Some(s.step);
            }
        }
        if let Some(metrics) =
            metrics.as_mut().filter(|_| s.step % t.logging_steps == 0 || s.step == run.total_steps)
        {
            write_metrics_line(metrics, &line)?;
            println!("{line}");
        }
        if let Some(b) = &bar {
            b.set_message(format!("loss {:.4} lr {:.2e}", s.loss, s.lr));
            b.inc(1);
        }
        if t.save_steps.is_some_and(|every| s.step % every == 0) && s.step < run.total_steps {
            run.save_checkpoint()?;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    if last_eval_step != Some(run.step) {
        if let Some((l, eval_metrics)) = run.evaluate()? {
            let mut line = serde_json::json!({"step": run.step});
            add_eval(&mut line, l, eval_metrics);
            if let Some(metrics) = metrics.as_mut() {
                write_metrics_line(metrics, &line)?;
                println!("{line}");
            }
            losses.eval = Some(l);
        }
    }
    drop(metrics);
    run.finish(losses)
}

/// `eval_loss` and `eval/<metric>` in a metrics line.
fn add_eval(line: &mut serde_json::Value, loss: f64, metrics: Vec<(String, f64)>) {
    line["eval_loss"] = serde_json::json!(loss);
    for (k, v) in metrics {
        line[format!("eval/{k}")] = serde_json::json!(v);
    }
}

fn progress_bar(enabled: bool, total: usize, done: usize) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(done as u64);
    Some(bar)
}
