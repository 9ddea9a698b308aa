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
//!
//! Runs never mix: a new run into an output directory that holds an earlier run's files is
//! refused before anything is written (unless `training.overwrite_output_dir` /
//! `--overwrite-output-dir`, which deletes them once the run is set up), and a checkpoint
//! records the run's training config and data fingerprint, which `--resume` compares. The
//! output directory is created only once the run is set up; leftovers of a killed run
//! (`.checkpoint-N.tmp`) are removed at the next start. A step whose loss or gradient norm is
//! not finite is skipped, and `training.on_nonfinite` decides whether the run goes on.
pub mod checkpoint;
pub mod config;
pub mod context;
pub mod data;
pub mod plot;
pub mod reward_model;
pub mod run;
pub mod schedule;
pub mod step;
pub mod tensorboard;
pub mod trainable;
pub mod vision;

use anyhow::{Context, Result};
use std::path::PathBuf;

use crate::plugins::Registry;
pub use checkpoint::latest_checkpoint;
use checkpoint::{write_metrics_line, METRICS_FILE};
use config::TrainConfig;
pub use context::{load_rewards, LoadedReward, PolicyContext};
pub use data::{
    config_rows, encode_options, image_prep, permutation, rank_share, read_data, read_data_sets,
    review_data, would_stop,
};
pub use run::{Losses, Run, StepResult};
use step::NonFiniteSteps;
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
    /// Steps skipped because their loss or gradient norm was not finite.
    pub nonfinite_steps: usize,
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
/// a checkpoint every `save_steps`, and [`Run::finish`]. Only rank 0 writes metrics. A new run
/// into an earlier run's output directory is refused before anything is written, and an
/// output directory this call created is removed again if the run fails while it is empty.
pub fn train(
    cfg: &TrainConfig,
    registry: &Registry,
    resume: Option<Resume>,
) -> Result<TrainSummary> {
    let out = &cfg.output_dir;
    if resume.is_none() && !cfg.training.overwrite_output_dir {
        let earlier = checkpoint::earlier_run_files(out);
        if !earlier.is_empty() {
            let names: Vec<String> = earlier
                .iter()
                .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect();
            anyhow::bail!(
                "output_dir {} holds an earlier run ({}): continue it with --resume, start over with \
                 --overwrite-output-dir (or training.overwrite_output_dir: true), which deletes those files, \
                 or choose another output_dir",
                out.display(),
                names.join(", ")
            );
        }
    }
    let created = !out.exists();
    let result = run_training(cfg, registry, resume);
    if result.is_err() {
        // A run that failed before logging a step leaves no empty metrics file (which would
        // read as an earlier run) and no empty output directory it created.
        let metrics = out.join(METRICS_FILE);
        if std::fs::metadata(&metrics).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&metrics);
        }
        if created && std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_none()) {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}

/// Rank 0 readies the output directory of a run that is set up: creates it, deletes an
/// earlier run's files (`overwrite_output_dir`, a new run only), removes a killed run's
/// leftovers, and on resume cuts `metrics.jsonl` back to the checkpoint's step.
fn prepare_output_dir(cfg: &TrainConfig, resumed: bool, step: usize) -> Result<()> {
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    if !resumed && cfg.training.overwrite_output_dir {
        let removed = checkpoint::remove_earlier_run(out)?;
        if !removed.is_empty() {
            eprintln!(
                "overwrite_output_dir: removed the earlier run's {} from {}",
                removed.join(", "),
                out.display()
            );
        }
    }
    let stale = checkpoint::remove_stale_temporaries(out)?;
    if !stale.is_empty() {
        eprintln!(
            "removed what an interrupted run left half-written in {}: {}",
            out.display(),
            stale.join(", ")
        );
    }
    if resumed {
        checkpoint::rewind_metrics(&out.join(METRICS_FILE), step)?;
    }
    Ok(())
}

fn run_training(
    cfg: &TrainConfig,
    registry: &Registry,
    resume: Option<Resume>,
) -> Result<TrainSummary> {
    let resumed = resume.is_some();
    let mut run = Run::setup(cfg, registry, resume)?;
    let t = &cfg.training;
    if run.rank() == 0 {
        prepare_output_dir(cfg, resumed, run.step)?;
    }
    let mut metrics = if run.rank() == 0 {
        let path = cfg.output_dir.join(METRICS_FILE);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        Some(file.with_context(|| format!("cannot open {}", path.display()))?)
    } else {
        None
    };
    let mut tracker = if run.rank() == 0 {
        let dir = t.logging_dir.as_deref();
        tensorboard::Tracker::start(&t.report_to, &cfg.output_dir, dir, resumed, run.step)
    } else {
        tensorboard::Tracker::default()
    };
    let bar = if run.rank() == 0 {
        progress_bar(t.progress_bar, run.total_steps, run.step)
    } else {
        None
    };
    let mut losses = Losses::default();
    let mut nonfinite = NonFiniteSteps::new(t.on_nonfinite, t.max_nonfinite_steps);
    let mut last_eval_step = None;
    while !run.done() {
        let s = run.step()?;
        if s.loss.is_finite() {
            losses.first.get_or_insert(s.loss);
            losses.last = Some(s.loss);
        }
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
            tracker.log(&line);
            println!("{line}");
        }
        if let Some(b) = &bar {
            b.set_message(format!("loss {:.4} lr {:.2e}", s.loss, s.lr));
            b.inc(1);
        }
        if let Err(e) = nonfinite.observe(s.step, s.loss, &s.report) {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(e);
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
                tracker.log(&line);
                println!("{line}");
            }
            losses.eval = Some(l);
        }
    }
    drop(metrics);
    drop(tracker);
    losses.nonfinite_steps = nonfinite.total;
    if nonfinite.total > 0 && run.rank() == 0 {
        eprintln!(
            "{} of {} steps were skipped: their loss or gradient norm was NaN or infinite (training.on_nonfinite: {})",
            nonfinite.total,
            run.step,
            if t.on_nonfinite == config::OnNonFinite::Skip { "skip" } else { "stop" }
        );
    }
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
