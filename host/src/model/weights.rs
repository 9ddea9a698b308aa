//! Checkpoint weights of a Hugging Face model directory: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` lists, read into tensors of one dtype on one device.
//!
//! Every failure is an error that names the file (and the tensor key where there is one):
//! a missing file, a truncated or corrupt one, an index that points at a missing shard, a
//! tensor that is absent or whose shape disagrees with `config.json`, or one that holds NaN or
//! Inf (each tensor is checked as it is read, in bounded chunks).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::util::safetensors::{self, HeaderEntry};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of a checkpoint, by key, each remembered with the file it came from.
pub struct Weights {
    dir: PathBuf,
    /// What file tensors become when taken.
    device: Device,
    dtype: Kind,
    tensors: HashMap<String, (Stored, PathBuf)>,
}

/// The dtypes a model can be loaded in.
pub fn check_compute_dtype(dtype: Kind) -> Result<()> {
    match dtype {
        Kind::Float | Kind::BFloat16 | Kind::Half => Ok(()),
        other => bail!(
            "unsupported model dtype {other:?}: use float32 (Kind::Float), bfloat16 or float16"
        ),
    }
}

/// The files of the checkpoint in `dir`: the single file, else the shards of the index.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is not read: re-save the model with safetensors)"
        } else {
            ""
        };
        bail!("no {SINGLE_FILE} or {INDEX_FILE} in {}{hint}", dir.display());
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).with_context(|| {
        format!("{}: key `weight_map` (tensor key -> shard file) is missing", index.display())
    })?;
    let mut files: Vec<String> = Vec::new();
    for (key, file) in map {
        let file = file.as_str().with_context(|| {
            format!("{}: `weight_map.{key}` is not a file name", index.display())
        })?;
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    let mut paths = Vec::new();
    for f in files {
        let p = dir.join(&f);
        if !p.is_file() {
            bail!("{} lists shard `{f}`, which is missing from {}", index.display(), dir.display());
        }
        paths.push(p);
    }
    if paths.is_empty() {
        bail!("{}: `weight_map` is empty", index.display());
    }
    Ok(paths)
}

/// The header of a checkpoint file, every entry checked to be a floating-point tensor
/// (see [`safetensors::read_header`]).
fn read_header(file: &Path) -> Result<Vec<HeaderEntry>> {
    let entries = safetensors::read_header(file)?;
    if let Some(e) = entries
        .iter()
        .find(|e| !matches!(e.kind, Some(Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double)))
    {
        bail!(
            "tensor `{}` in {} has dtype `{}`; model weights must be floating point (F32, BF16, F16 or F64)",
            e.key,
            file.display(),
            e.dtype_name
        );
    }
    Ok(entries)
}

/// The dtype of every tensor of the checkpoint in `dir`, read from the safetensors headers
/// only (the tensors themselves are not read).
pub fn checkpoint_dtypes(dir: &Path) -> Result<HashMap<String, Kind>> {
    let mut out = HashMap::new();
    for file in checkpoint_files(dir)? {
        out.extend(read_header(&file)?.into_iter().filter_map(|e| Some((e.key, e.kind?))));
    }
    Ok(out)
}

/// Where a tensor of [`Weights`] is: already in memory, or still in its file.
enum Stored {
    Memory(Tensor),
    File(HeaderEntry),
}

impl Weights {
    /// The checkpoint in `dir`, to be read as `dtype` on `device`. Only the headers are read
    /// here (and checked: a truncated or corrupt file fails now); each tensor is read from
    /// its file when the model takes it, so loading never holds a file's bytes and all its
    /// tensors at once, and a layer that keeps only part of a weight (a ZeRO-3 shard, a
    /// packed quantized weight) lets the rest go before the next layer is read.
    pub fn load(dir: &Path, device: Device, dtype: Kind) -> Result<Self> {
        check_compute_dtype(dtype)?;
        let mut tensors = HashMap::new();
        for file in checkpoint_files(dir)? {
            for e in read_header(&file)? {
                if e.key.ends_with("rotary_emb.inv_freq") {
                    continue; // a buffer some old checkpoints carry; recomputed from config.json
                }
                let key = e.key.clone();
                if let Some((_, other)) =
                    tensors.insert(key.clone(), (Stored::File(e), file.clone()))
                {
                    bail!(
                        "tensor `{key}` is stored twice: in {} and {}",
                        other.display(),
                        file.display()
                    );
                }
            }
        }
        Ok(Self { dir: dir.to_path_buf(), device, dtype, tensors })
    }

    /// Tensors already in memory, as if read from a checkpoint in `dir` (tests, conversions).
    pub fn from_tensors(dir: &Path, tensors: Vec<(String, Tensor)>) -> Self {
        let file = dir.join("(memory)");
        let tensors =
            tensors.into_iter().map(|(k, t)| (k, (Stored::Memory(t), file.clone()))).collect();
        Self { dir: dir.to_path_buf(), device: Device::Cpu, dtype: Kind::Float, tensors }
    }

    /// Takes the tensor `key`, checking that its shape is `shape`. `why` says which
    /// config.json values imply that shape, for the message.
    pub fn take(&mut self, key: &str, shape: &[i64], why: &str) -> Result<Tensor> {
        match self.tensors.remove(key) {
            Some((stored, file)) => {
                let size = match &stored {
                    Stored::Memory(t) => t.size(),
                    Stored::File(e) => e.shape.clone(),
                };
                if size != shape {
                    bail!(
                        "tensor `{key}` in {} has shape {:?} but {} implies {:?} ({why})",
                        file.display(),
                        size,
                        self.dir.join("config.json").display(),
                        shape
                    );
                }
                self.read(key, stored, &file)
            }
            None => bail!(
                "tensor `{key}` (shape {shape:?}, {why}) is missing from {}",
                self.source_description()
            ),
        }
    }

    /// The tensor itself: in memory already, or read from its byte range of `file`.
    fn read(&self, key: &str, stored: Stored, file: &Path) -> Result<Tensor> {
        let entry = match stored {
            Stored::Memory(t) => return Ok(t),
            Stored::File(entry) => entry,
        };
        let stored = safetensors::read_tensor(file, &entry)?;
        let t = stored
            .f_to_device(self.device)
            .and_then(|t| t.f_to_kind(self.dtype))
            .with_context(|| format!("cannot load tensor `{key}` from {}", file.display()))?;
        // One finiteness pass per tensor as it loads: a NaN weight makes every output NaN.
        if let Some(counts) = safetensors::non_finite_counts(&t)? {
            let why = if safetensors::non_finite_counts(&stored)?.is_some() {
                "the checkpoint is corrupt or was saved from a diverged run; re-download or re-save it"
                    .to_string()
            } else {
                format!(
                    "its values overflow {:?}: load the model in a wider dtype (float32 or bfloat16)",
                    self.dtype
                )
            };
            bail!(
                "tensor `{key}` in {} {}: refusing to load a model with non-finite weights ({why})",
                file.display(),
                safetensors::describe_non_finite(counts, t.numel())
            );
        }
        Ok(t)
    }

    /// Whether the checkpoint holds `key` (not taken yet).
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Takes `key` when present (optional tensors such as an untied lm_head kept by a tied model).
    pub fn take_if_present(
        &mut self,
        key: &str,
        shape: &[i64],
        why: &str,
    ) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(key) {
            self.take(key, shape, why).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Renames every key for which `rename` gives a new name (an older checkpoint layout read
    /// under the current module paths). Two tensors ending up under one key is an error.
    pub fn rename_keys(&mut self, rename: impl Fn(&str) -> Option<String>) -> Result<()> {
        let renames: Vec<(String, String)> =
            self.tensors.keys().filter_map(|k| rename(k).map(|new| (k.clone(), new))).collect();
        let mut moved = Vec::with_capacity(renames.len());
        for (old, new) in renames {
            let entry = self.tensors.remove(&old).expect("key listed above");
            moved.push((old, new, entry));
        }
        for (old, new, (t, file)) in moved {
            if let Some((_, other)) = self.tensors.get(&new) {
                bail!(
                    "tensor `{old}` in {} is `{new}` in the current layout, which {} also holds: the checkpoint mixes two layouts",
                    file.display(),
                    other.display()
                );
            }
            self.tensors.insert(new, (t, file));
        }
        Ok(())
    }

    /// Keys not taken yet, sorted.
    pub fn remaining(&self) -> Vec<String> {
        let sorted: BTreeMap<&String, ()> = self.tensors.keys().map(|k| (k, ())).collect();
        sorted.into_keys().cloned().collect()
    }

    fn source_description(&self) -> String {
        let single = self.dir.join(SINGLE_FILE);
        if single.is_file() {
            single.display().to_string()
        } else {
            format!("the shards of {}", self.dir.join(INDEX_FILE).display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_weight_is_refused_by_key_and_file_as_it_is_read() {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-weights-nan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let _ = bad.get(1).get(2).fill_(f64::NAN);
        let big = Tensor::from_slice(&[1.0f32, 1e30]).view([1, 2]);
        safetensors::write(
            &dir.join(SINGLE_FILE),
            &[
                ("good".into(), Tensor::ones([2], (Kind::Float, Device::Cpu))),
                ("bad".into(), bad),
                ("big".into(), big),
            ],
        )
        .unwrap();
        let mut w = Weights::load(&dir, Device::Cpu, Kind::Float).unwrap();
        assert!(w.take("good", &[2], "test").is_ok());
        let e = w.take("bad", &[2, 3], "test").unwrap_err().to_string();
        assert!(
            e.contains("tensor `bad`")
                && e.contains("model.safetensors")
                && e.contains("holds 1 NaN and 0 infinite value(s) of 6"),
            "{e}"
        );
        assert!(w.take("big", &[1, 2], "test").is_ok(), "finite in float32");
        let mut w = Weights::load(&dir, Device::Cpu, Kind::Half).unwrap();
        let e = w.take("big", &[1, 2], "test").unwrap_err().to_string();
        assert!(e.contains("tensor `big`") && e.contains("overflow Half"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}
