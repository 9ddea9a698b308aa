//! Checkpoints of a run (`checkpoint-N`: the adapter, the optimizer state of every rank and
//! the step, written atomically) and its `metrics.jsonl`, which a resumed run cuts back to
//! the checkpoint's step.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{Collectives, MemoryStrategy, TrainParam};

use crate::peft::{non_lora, PeftModel};
use crate::util::safetensors;

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
/// rank 0 writes the adapter and renames the folder.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_checkpoint(
    out: &Path,
    step: usize,
    model: &PeftModel,
    full_weights: &[TrainParam],
    memory: &dyn MemoryStrategy,
    keep: Option<usize>,
    comm: &dyn Collectives,
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let final_dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.tmp"));
    if rank == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
    }
    comm.barrier()?;
    let state = memory.state_dict()?;
    safetensors::write(&tmp.join(optimizer_file(rank, world)), &state).with_context(|| {
        format!("rank {rank}: cannot write its optimizer state into {}", tmp.display())
    })?;
    comm.barrier()?;
    if rank != 0 {
        return Ok(comm.barrier()?);
    }
    model.save_peft_adapter(&tmp.join("adapter"))?;
    non_lora::save(&tmp.join("adapter"), full_weights)?;
    std::fs::write(
        tmp.join(STATE_FILE),
        serde_json::to_string_pretty(&serde_json::json!({ "step": step, "world_size": world }))?,
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    if let Some(keep) = keep {
        let all = checkpoints(out)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            std::fs::remove_dir_all(old).ok();
        }
    }
    comm.barrier()?;
    Ok(())
}

pub(crate) fn load_checkpoint(
    dir: &Path,
    model: &mut PeftModel,
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
    let adapter = safetensors::read(&dir.join("adapter/adapter_model.safetensors"))
        .with_context(|| format!("cannot read the adapter of {}", dir.display()))?;
    model.load_adapter_state_dict(adapter)?;
    non_lora::load_into(model, &dir.join("adapter"))?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let saved_world = state["world_size"].as_u64().unwrap_or(1) as usize;
    if saved_world != world {
        bail!(
            "{} was saved by a run on {saved_world} rank(s) and this run has {world}: a sharded checkpoint resumes with the same world size",
            dir.display()
        );
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
}
