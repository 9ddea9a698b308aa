//! Checkpoints of a run (`checkpoint-N`: the adapter, the optimizer state of every rank, the
//! step and what the run was — its training config and data fingerprint —, written
//! atomically), its `metrics.jsonl`, which a resumed run cuts back to the checkpoint's step,
//! and the output folder's bookkeeping: which files are an earlier run's, and which are
//! leftovers of a killed one.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{Collectives, MemoryStrategy, TrainParam};
use serde_json::Value;

use crate::peft::{non_lora, quant, PeftModel, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::util::{atomic, safetensors};

// ------------------------------------------------------------------ metrics

pub(crate) const METRICS_FILE: &str = "metrics.jsonl";

/// Appends one JSON line with a single `write` call: formatting straight into the file would
/// issue one call per JSON token, and a run killed between two of them leaves a torn line.
pub(crate) fn write_metrics_line(file: &mut std::fs::File, line: &serde_json::Value) -> Result<()> {
    file.write_all(format!("{line}\n").as_bytes()).context("cannot append to metrics.jsonl")
}

/// Cuts `metrics.jsonl` back to what the run had written when it reached `step`: lines of
/// later steps (written after that checkpoint by the interrupted run) and a torn last line are
/// dropped, so that a resumed run's file reads as one uninterrupted run.
pub(crate) fn rewind_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let line_step = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64())
    };
    let kept: String = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && line_step(l).is_some_and(|s| s as usize <= step))
        .collect();
    if kept.len() != text.len() {
        crate::util::atomic::write(path, kept)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ the output folder

/// Files a run writes at the top of its output folder, besides its `checkpoint-N` folders.
const RUN_FILES: [&str; 10] = [
    METRICS_FILE,
    "config.json",
    crate::model::weights::SINGLE_FILE,
    crate::model::weights::INDEX_FILE,
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    non_lora::NON_LORA_FILE,
    quant::QUANTIZATION_FILE,
    "train_summary.json",
    "loss.png",
];

/// What an earlier run left in `out`: its `checkpoint-N` folders and the files of
/// [`RUN_FILES`] (an empty `metrics.jsonl` aside), sorted; other files (a config kept beside
/// the run, notes) are not a run's.
pub fn earlier_run_files(out: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let empty = e.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
            (RUN_FILES.contains(&name.as_str()) && !(name == METRICS_FILE && empty))
                || is_weight_shard(&name)
                || name.strip_prefix("checkpoint-").is_some_and(|n| n.parse::<usize>().is_ok())
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Deletes what [`earlier_run_files`] lists (`--overwrite-output-dir`); returns their names.
pub fn remove_earlier_run(out: &Path) -> Result<Vec<String>> {
    let files = earlier_run_files(out);
    for f in &files {
        let removed = if f.is_dir() { std::fs::remove_dir_all(f) } else { std::fs::remove_file(f) };
        removed
            .with_context(|| format!("--overwrite-output-dir: cannot remove {}", f.display()))?;
    }
    Ok(files.iter().map(|f| file_name(f)).collect())
}

/// Removes what a killed run left half-written in `out`: `.checkpoint-N.tmp` folders and the
/// temporaries of atomic writes whose process is gone; returns their names.
pub fn remove_stale_temporaries(out: &Path) -> Result<Vec<String>> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(Vec::new()) };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let checkpoint_tmp = name
            .strip_prefix(".checkpoint-")
            .and_then(|n| n.strip_suffix(".tmp"))
            .is_some_and(|n| n.parse::<usize>().is_ok());
        if !(checkpoint_tmp || atomic::is_stale_temp(&name)) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        r.with_context(|| format!("cannot remove the leftover {}", p.display()))?;
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// `model-00001-of-00003.safetensors`: a shard of a model saved by a full fine-tuning run.
fn is_weight_shard(name: &str) -> bool {
    name.strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

// ------------------------------------------------------------------ what a run was

/// What a checkpoint records of the run that wrote it and `--resume` compares with the run
/// resuming: the config keys that change training (`TrainConfig::training_record`) and the
/// data's fingerprint (`data.fingerprint`, `data.train_samples`, `data.eval_samples`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Provenance(pub BTreeMap<String, Value>);

impl Provenance {
    fn json(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    /// `key: recorded vs current` for every key whose value differs (absent on one side:
    /// `(absent)`).
    pub fn differences(&self, recorded: &serde_json::Map<String, Value>) -> Vec<String> {
        let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
        let keys: std::collections::BTreeSet<&String> =
            self.0.keys().chain(recorded.keys()).collect();
        keys.into_iter()
            .filter(|k| !same_value(self.0.get(*k), recorded.get(*k)))
            .map(|k| format!("{k}: {} vs {}", show(recorded.get(k)), show(self.0.get(k))))
            .collect()
    }
}

/// Equal values, numbers compared as numbers (2 and 2.0 are the same learning rate).
fn same_value(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_f64() == y.as_f64(),
        (a, b) => a == b,
    }
}

/// `--resume` from `dir`: the checkpoint's recorded run must be this one (same training keys,
/// same data), else the error lists what differs. A checkpoint written before checkpoints
/// recorded their run is resumed with a warning.
pub fn check_resume(dir: &Path, current: &Provenance) -> Result<()> {
    let file = dir.join(STATE_FILE);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?,
    )
    .with_context(|| format!("{} is not JSON", file.display()))?;
    let Some(recorded) = state.get("run").and_then(Value::as_object) else {
        eprintln!(
            "warning: {} records no config or data fingerprint (an older checkpoint): resuming unchecked",
            file.display()
        );
        return Ok(());
    };
    let differ = current.differences(recorded);
    if !differ.is_empty() {
        bail!(
            "--resume: {} was written by another run (its config or data differ; checkpoint vs now): {}. \
             Resume with that run's config and data, or start a new run (--overwrite-output-dir, or another output_dir)",
            dir.display(),
            differ.join("; ")
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ checkpoints

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const STATE_FILE: &str = "trainer_state.json";

/// `checkpoint-N` folders of a run, by step.
fn checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(found) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("checkpoint-").and_then(|n| n.parse::<usize>().ok()) {
            if e.path().join(STATE_FILE).is_file() {
                found.push((n, e.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(dir)?.pop().map(|(_, p)| p))
}

/// The optimizer-state file of `rank`: one file for a one-process run, one per rank
/// (`optimizer-rank{r}.safetensors`) for a sharded one.
fn optimizer_file(rank: usize, world: usize) -> String {
    if world == 1 {
        OPTIMIZER_FILE.to_string()
    } else {
        format!("optimizer-rank{rank}.safetensors")
    }
}

/// Writes `checkpoint-{step}` atomically: everything goes to a temporary folder that is
/// renamed into place only when complete, so a killed run never leaves a half checkpoint.
/// With several ranks each writes its optimizer shard into rank 0's temporary folder (a
/// folder all ranks see: the same machine or a shared file system) between barriers, and
/// rank 0 writes the adapter and renames the folder. A write that fails (disk full) removes
/// rank 0's temporary folder before the error returns. `run` is recorded in
/// `trainer_state.json` for `--resume` to compare ([`check_resume`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_checkpoint(
    out: &Path,
    step: usize,
    model: &PeftModel,
    full_weights: &[TrainParam],
    partitioned: bool,
    memory: &dyn MemoryStrategy,
    keep: Option<usize>,
    run: Option<&Provenance>,
    comm: &dyn Collectives,
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let final_dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.tmp"));
    let guard = if rank == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        Some(atomic::TempGuard::new(tmp.clone()))
    } else {
        None
    };
    comm.barrier()?;
    let state = memory.state_dict()?;
    safetensors::write(&tmp.join(optimizer_file(rank, world)), &state).with_context(|| {
        format!("rank {rank}: cannot write its optimizer state into {}", tmp.display())
    })?;
    let adapter = model.active_adapter().is_some();
    if !adapter && (partitioned || rank == 0) {
        // Full or freeze fine-tuning: the trained weights themselves, each rank its shards when
        // they are partitioned (ZeRO stage 3), else rank 0 all of them.
        let named: Vec<(String, tch::Tensor)> =
            full_weights.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect();
        safetensors::write(&tmp.join(weights_file(rank, partitioned)), &named).with_context(
            || format!("rank {rank}: cannot write its trained weights into {}", tmp.display()),
        )?;
    }
    comm.barrier()?;
    if rank != 0 {
        return Ok(comm.barrier()?);
    }
    if adapter {
        model.save_peft_adapter(&tmp.join("adapter"))?;
        non_lora::save(&tmp.join("adapter"), full_weights)?;
    }
    let mut state = serde_json::json!({ "step": step, "world_size": world });
    if let Some(run) = run {
        state["run"] = run.json();
    }
    let state_file = tmp.join(STATE_FILE);
    std::fs::write(&state_file, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("cannot write {}", state_file.display()))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    if let Some(g) = guard {
        g.keep();
    }
    if let Some(keep) = keep {
        let all = checkpoints(out)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).ok();
        }
    }
    comm.barrier()?;
    Ok(())
}

/// The file of a full or freeze run's trained weights in a checkpoint: one for the run, or
/// one per rank when they are partitioned.
fn weights_file(rank: usize, partitioned: bool) -> String {
    if partitioned {
        format!("weights-rank{rank}.safetensors")
    } else {
        "weights.safetensors".to_string()
    }
}

/// Copies a checkpoint's trained weights into `params` (every one must be there, with its
/// shape, finite; nothing else may be); nothing is copied unless all are.
fn load_full_weights(file: &Path, params: &[TrainParam]) -> Result<()> {
    let saved = safetensors::read(file)
        .with_context(|| format!("cannot read the trained weights {}", file.display()))?;
    let mut by_name: BTreeMap<String, tch::Tensor> = saved.into_iter().collect();
    let mut pairs = Vec::with_capacity(params.len());
    for p in params {
        let Some(t) = by_name.remove(&p.name) else {
            bail!(
                "{} has no `{}`: it was saved by a run that trains other weights",
                file.display(),
                p.name
            );
        };
        if t.size() != p.tensor.size() {
            bail!(
                "{}: `{}` has shape {:?}, this run's {:?}",
                file.display(),
                p.name,
                t.size(),
                p.tensor.size()
            );
        }
        if let Some(counts) = safetensors::non_finite_counts(&t)? {
            bail!(
                "{}: `{}` {}: refusing non-finite weights",
                file.display(),
                p.name,
                safetensors::describe_non_finite(counts, t.numel())
            );
        }
        pairs.push((p.tensor.shallow_clone(), t));
    }
    if let Some(extra) = by_name.keys().next() {
        bail!("{}: `{extra}` is not a weight this run trains", file.display());
    }
    tch::no_grad(|| -> Result<()> {
        for (dst, src) in pairs {
            let mut dst = dst;
            dst.f_copy_(&src.f_to_device(dst.device())?.f_to_kind(dst.kind())?)?;
        }
        Ok(())
    })
}

pub(crate) fn load_checkpoint(
    dir: &Path,
    model: &mut PeftModel,
    full_weights: &[TrainParam],
    partitioned: bool,
    memory: &mut dyn MemoryStrategy,
    comm: &dyn Collectives,
) -> Result<usize> {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(STATE_FILE))
            .with_context(|| format!("{} has no {STATE_FILE}", dir.display()))?,
    )?;
    let step = state["step"]
        .as_u64()
        .with_context(|| format!("{}/{STATE_FILE}: no `step`", dir.display()))?
        as usize;
    let (rank, world) = (comm.rank(), comm.world_size());
    let saved_world = state["world_size"].as_u64().unwrap_or(1) as usize;
    if saved_world != world {
        bail!(
            "{} was saved by a run on {saved_world} rank(s) and this run has {world}: a sharded checkpoint resumes with the same world size",
            dir.display()
        );
    }
    if model.active_adapter().is_some() {
        let adapter = safetensors::read(&dir.join("adapter/adapter_model.safetensors"))
            .with_context(|| format!("cannot read the adapter of {}", dir.display()))?;
        model.load_adapter_state_dict(adapter)?;
        non_lora::load_into(model, &dir.join("adapter"))?;
    } else {
        load_full_weights(&dir.join(weights_file(rank, partitioned)), full_weights)?;
    }
    let file = optimizer_file(rank, world);
    let opt = safetensors::read(&dir.join(&file))
        .with_context(|| format!("cannot read {}/{file}", dir.display()))?;
    memory.load_state_dict(opt)?;
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewind_metrics_drops_later_steps_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("ferrotune-rewind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(METRICS_FILE);
        let lines = [
            "{\"step\":1,\"loss\":2.0}\n",
            "{\"step\":2,\"loss\":1.5}\n",
            "{\"step\":3,\"loss\":1.2}\n",
        ];
        std::fs::write(&path, lines.concat() + "{\"step\":4,\"lo").unwrap();
        rewind_metrics(&path, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lines[..2].concat());
        rewind_metrics(&path, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            lines[..2].concat(),
            "nothing to cut: unchanged"
        );
        rewind_metrics(&dir.join("absent.jsonl"), 2).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn provenance_differences_name_key_old_and_new() {
        let now = Provenance(BTreeMap::from([
            ("optimizer.lr".to_string(), serde_json::json!(0.002)),
            ("seed".to_string(), serde_json::json!(42)),
            ("data.train_samples".to_string(), serde_json::json!(5)),
        ]));
        let recorded = serde_json::json!({"optimizer.lr": 0.001, "seed": 42.0, "adapter.r": 2});
        let d = now.differences(recorded.as_object().unwrap());
        assert_eq!(
            d,
            [
                "adapter.r: 2 vs (absent)",
                "data.train_samples: (absent) vs 5",
                "optimizer.lr: 0.001 vs 0.002"
            ],
            "42 and 42.0 are the same seed"
        );
        assert!(now.differences(now.json().as_object().unwrap()).is_empty());
    }

    #[test]
    fn earlier_runs_and_leftovers_are_told_apart_from_other_files() {
        let dir = std::env::temp_dir().join(format!("ferrotune-outdir-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("checkpoint-4")).unwrap();
        std::fs::create_dir_all(dir.join(".checkpoint-6.tmp")).unwrap();
        std::fs::write(dir.join(METRICS_FILE), "").unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        std::fs::write(dir.join(".metrics.jsonl.tmp-99999999"), "{").unwrap();
        let names = |v: Vec<PathBuf>| v.iter().map(|p| file_name(p)).collect::<Vec<_>>();
        assert_eq!(
            names(earlier_run_files(&dir)),
            ["checkpoint-4"],
            "an empty metrics file is no run"
        );
        std::fs::write(dir.join(METRICS_FILE), "{\"step\":1}\n").unwrap();
        assert_eq!(names(earlier_run_files(&dir)), ["checkpoint-4", METRICS_FILE]);
        assert_eq!(
            remove_stale_temporaries(&dir).unwrap(),
            [".checkpoint-6.tmp", ".metrics.jsonl.tmp-99999999"]
        );
        assert_eq!(remove_earlier_run(&dir).unwrap(), ["checkpoint-4", METRICS_FILE]);
        let left: Vec<_> =
            std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["notes.txt"]);
        std::fs::remove_dir_all(dir).ok();
    }
}
