//! Writing a model as a Hugging Face directory transformers loads (`save_pretrained`): after
//! [`PeftModel::merge_adapter`](crate::peft::PeftModel::merge_adapter) this is the merged model,
//! after full fine-tuning the trained one.
//!
//! `config.json` is the source's (with `tie_word_embeddings` set to false when a merge gave a
//! tied `lm_head` a weight of its own, and `dtype` updated when the dtype changes); the weights
//! are written under their checkpoint keys, each in its dtype in the source checkpoint unless
//! one is chosen, as transformers 5.24's `save_pretrained(max_shard_size=...)` writes them: one
//! `model.safetensors` up to [`SaveOptions::max_shard_bytes`], above it shards
//! `model-00001-of-0000N.safetensors`, … and `model.safetensors.index.json`, filled greedily
//! (huggingface_hub's `split_torch_state_dict_into_shards`; a tensor larger than the limit
//! gets a shard of its own) in the order transformers saves a model it loaded (the keys sorted
//! by its `dot_natural_key`), so that both write the same files. A tied `lm_head` is left out.
//! The tokenizer files and `generation_config.json` are copied (and, for Qwen2-VL, the image /
//! video processor configs). A Qwen2-VL model is written with its vision weights in the key
//! layout transformers 5.24's `save_pretrained` writes (the original one: `visual.*`,
//! `model.layers.*`), whichever layout the source used.
//!
//! A new folder is built beside the destination and renamed into place at the end. With
//! [`SaveOptions::into_existing`] (a run's `output_dir`, which holds metrics and checkpoints)
//! every file is first written as a temporary in the folder, then each is renamed into place,
//! and the weight files of an earlier save that this one does not produce are removed last:
//! a loader sees the earlier model or the new one, never a mix (except for the instants of the
//! renames when a sharded save replaces one with the same shard count). Files that are not
//! model weights are left alone. A weight holding NaN or Inf is refused by name before anything
//! is written.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::weights::{checkpoint_dtypes, INDEX_FILE, SINGLE_FILE};
use super::CausalLM;
use crate::util::atomic::{self, TempGuard};
use crate::util::safetensors;

/// Files copied from the source directory when present (tokenizer, generation defaults and
/// Qwen2-VL's processor configs).
pub const COPIED_FILES: [&str; 13] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
];

/// transformers 5.24's default `max_shard_size` of `save_pretrained`.
pub const DEFAULT_MAX_SHARD_SIZE: &str = "50GB";
/// [`DEFAULT_MAX_SHARD_SIZE`] in bytes.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 50_000_000_000;

/// How [`CausalLM::save_pretrained_with`] writes a model.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveOptions {
    /// dtype of the written weights. Default `None`: each weight's dtype in the source
    /// checkpoint (an untied `lm_head` the source lacks takes the embeddings').
    pub dtype: Option<Kind>,
    /// Largest weight file in bytes before the model is split into shards (default
    /// [`DEFAULT_MAX_SHARD_BYTES`], transformers' 50 GB; [`parse_size`] reads `"5GB"`,
    /// `"500MB"`, `"2GiB"`). A single tensor larger than this gets a shard of its own.
    pub max_shard_bytes: u64,
    /// Write into `out_dir` even when it holds other files (a run's `output_dir`), replacing
    /// the weights of an earlier save there. Default false: `out_dir` must be absent or empty.
    pub into_existing: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self { dtype: None, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES, into_existing: false }
    }
}

/// A size as transformers' `max_shard_size` takes it: a whole number of bytes (`"1000000"`),
/// or a number and a unit, `KB` `MB` `GB` `TB` (powers of 1000, as huggingface_hub's
/// `parse_size_to_int`: `"5GB"`, `"1.5GB"`, case and spaces ignored) or `KiB` `MiB` `GiB`
/// `TiB` (powers of 1024, as transformers' `convert_file_size_to_int`). It must be above 0.
pub fn parse_size(s: &str) -> Result<u64> {
    const UNITS: [(&str, u64); 8] = [
        ("KIB", 1 << 10),
        ("MIB", 1 << 20),
        ("GIB", 1 << 30),
        ("TIB", 1 << 40),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
    ];
    let invalid = || {
        anyhow::anyhow!(
            "invalid size `{s}`: use a number of bytes (`1000000`) or a number and a unit, KB, MB, GB, TB \
             (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. `5GB`"
        )
    };
    let text = s.trim();
    let bytes = if let Ok(n) = text.parse::<u64>() {
        n
    } else {
        let upper = text.to_ascii_uppercase();
        let (number, unit) = UNITS
            .iter()
            .find_map(|&(u, m)| upper.strip_suffix(u).map(|n| (n.trim(), m)))
            .ok_or_else(invalid)?;
        let value: f64 = number.parse().map_err(|_| invalid())?;
        if !value.is_finite() || value < 0.0 {
            return Err(invalid());
        }
        (value * unit as f64) as u64
    };
    if bytes == 0 {
        bail!("invalid size `{s}`: a shard must hold at least one byte");
    }
    Ok(bytes)
}

/// One weight file of a save: its name and the keys it holds, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub file: String,
    pub keys: Vec<String>,
}

/// The weight files of tensors `(key, bytes)` given in order, split as huggingface_hub's
/// `split_torch_state_dict_into_shards` splits them: greedily, a new shard when the next
/// tensor would take the current one above `max_shard_bytes`, a tensor larger than the limit
/// alone in a shard of its own (placed where it comes, before the shard being filled). One
/// shard is `model.safetensors`; several are `model-00001-of-0000N.safetensors`, ….
pub fn split_into_shards(sizes: &[(String, u64)], max_shard_bytes: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut current_bytes = 0u64;
    for (key, bytes) in sizes {
        if *bytes > max_shard_bytes {
            shards.push(vec![key.clone()]);
            continue;
        }
        if current_bytes + bytes > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(key.clone());
        current_bytes += bytes;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Names the shards of [`split_into_shards`] as transformers does.
pub fn name_shards(shards: Vec<Vec<String>>) -> Vec<Shard> {
    let n = shards.len();
    shards
        .into_iter()
        .enumerate()
        .map(|(i, keys)| Shard {
            file: if n == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            },
            keys,
        })
        .collect()
}

/// `model.safetensors.index.json` of a sharded save, as transformers 5.24 writes it (keys
/// sorted, two-space indent, a final newline): `metadata.total_size` is the bytes of every
/// tensor, `metadata.total_parameters` their elements, `weight_map` each key's file.
pub fn index_json(shards: &[Shard], total_size: u64, total_parameters: u64) -> String {
    #[derive(serde::Serialize)]
    struct Index<'a> {
        metadata: BTreeMap<&'static str, u64>,
        weight_map: BTreeMap<&'a str, &'a str>,
    }
    let index = Index {
        metadata: BTreeMap::from([
            ("total_parameters", total_parameters),
            ("total_size", total_size),
        ]),
        weight_map: shards
            .iter()
            .flat_map(|s| s.keys.iter().map(|k| (k.as_str(), s.file.as_str())))
            .collect(),
    };
    serde_json::to_string_pretty(&index).expect("maps of strings and numbers serialize") + "\n"
}

/// Whether `name` is a weight file or index a save writes (`model.safetensors`, its index,
/// `model-00001-of-00003.safetensors`).
pub fn is_weight_file(name: &str) -> bool {
    if name == SINGLE_FILE || name == INDEX_FILE {
        return true;
    }
    let Some(rest) = name.strip_prefix("model-").and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(rest.split_once("-of-"), Some((i, n)) if digits(i) && digits(n))
}

/// One dot-separated part of a key, ordered as transformers' `dot_natural_key` orders them:
/// numbers first, by value; then words, a trailing number compared by value (`shard_2` before
/// `shard_11`).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart<'a> {
    Number(u128),
    Text(&'a str, Option<u128>),
}

/// transformers 5.24's `dot_natural_key` of a state-dict key.
fn natural_key(key: &str) -> Vec<KeyPart<'_>> {
    let number = |digits: &str| digits.parse::<u128>().unwrap_or(u128::MAX);
    key.split('.')
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                return KeyPart::Number(number(part));
            }
            let text = part.trim_end_matches(|c: char| c.is_ascii_digit());
            let digits = &part[text.len()..];
            KeyPart::Text(text, (!digits.is_empty()).then(|| number(digits)))
        })
        .collect()
}

/// The order in which transformers 5.24's `save_pretrained` writes a model it loaded: its
/// state-dict keys (the module paths, before the Qwen2-VL layout is reverted) sorted by
/// `dot_natural_key` (in `revert_weight_conversion`), as indices into `keys`.
fn in_transformers_order(keys: &[String]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_cached_key(|&i| natural_key(&keys[i]));
    order
}

/// `given` in the order of the model's `keys`, every key present exactly once.
fn match_weights(keys: &[String], given: Vec<(String, Tensor)>) -> Result<Vec<Tensor>> {
    let shown = |names: &[&str]| {
        let mut s = names.iter().take(4).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        if names.len() > 4 {
            s += &format!(", … ({} in all)", names.len());
        }
        s
    };
    let mut by_key: HashMap<String, Tensor> = HashMap::with_capacity(given.len());
    let mut twice = Vec::new();
    for (k, t) in given {
        match by_key.entry(k) {
            std::collections::hash_map::Entry::Occupied(e) => twice.push(e.key().clone()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(t);
            }
        }
    }
    if !twice.is_empty() {
        let names: Vec<&str> = twice.iter().map(String::as_str).collect();
        bail!("save_pretrained: the weights to save hold {} more than once", shown(&names));
    }
    let missing: Vec<&str> =
        keys.iter().filter(|k| !by_key.contains_key(*k)).map(String::as_str).collect();
    if !missing.is_empty() {
        bail!("save_pretrained: the weights to save lack {} of the model", shown(&missing));
    }
    let out: Vec<Tensor> = keys.iter().map(|k| by_key.remove(k).expect("checked above")).collect();
    if !by_key.is_empty() {
        let mut extra: Vec<&str> = by_key.keys().map(String::as_str).collect();
        extra.sort_unstable();
        bail!(
            "save_pretrained: the weights to save hold {}, which the model does not save (a tied lm_head is not saved)",
            shown(&extra)
        );
    }
    Ok(out)
}

/// Whether `t` is the stand-in of a weight kept as a shard (zero-strided, see
/// `model::partition::stand_in`) rather than the weight itself.
fn is_stand_in(t: &Tensor) -> bool {
    t.numel() > 1 && t.stride().iter().all(|&s| s == 0)
}

/// transformers' name of a dtype in `config.json`.
fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// What one file of a save holds.
enum Content<'a> {
    Weights(Vec<(&'a str, &'a Tensor, Kind)>),
    Text(String),
    Copy(PathBuf),
}

/// Writes `content` to `path` (not atomically: the callers write temporaries).
fn write_content(path: &Path, content: &Content) -> Result<()> {
    match content {
        Content::Weights(tensors) => {
            let converted = tensors
                .iter()
                .map(|&(key, t, kind)| {
                    let t =
                        t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(kind)?.f_contiguous()?;
                    Ok((key.to_string(), t))
                })
                .collect::<Result<Vec<_>>>()?;
            safetensors::write(path, &converted)
        }
        Content::Text(text) => {
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
        }
        Content::Copy(src) => std::fs::copy(src, path)
            .map(|_| ())
            .with_context(|| format!("cannot copy {} to {}", src.display(), path.display())),
    }
}

impl CausalLM {
    /// Writes this model (no adapter may be attached: merge it first) as a Hugging Face
    /// directory `out_dir`, taking `config.json`, the dtypes and the tokenizer files from
    /// `source_dir` (the directory it was loaded from). `dtype` = None keeps each tensor's
    /// source dtype. `out_dir` must not exist or be empty. The weights go to one
    /// `model.safetensors` up to transformers' default shard size (50 GB), to shards above.
    pub fn save_pretrained(
        &self,
        out_dir: &Path,
        source_dir: &Path,
        dtype: Option<Kind>,
    ) -> Result<()> {
        let opts = SaveOptions { dtype, ..SaveOptions::default() };
        self.save_pretrained_with(None, out_dir, source_dir, &opts).map(|_| ())
    }

    /// [`save_pretrained`](Self::save_pretrained) with its options: the largest weight file,
    /// and writing into an existing folder. `weights`, when given (ZeRO-3: the full weights
    /// gathered from every rank), are written instead of the model's own tensors: they must
    /// hold exactly the keys of `named_weights` (a tied `lm_head` left out), each once. Returns
    /// the files written: the weight files, the index when sharded, `config.json`, the copies.
    pub fn save_pretrained_with(
        &self,
        weights: Option<Vec<(String, Tensor)>>,
        out_dir: &Path,
        source_dir: &Path,
        opts: &SaveOptions,
    ) -> Result<Vec<PathBuf>> {
        let attached = self
            .linears()
            .into_iter()
            .find_map(|(_, l)| l.adapter_names().chain(l.copy_names()).next().map(str::to_string));
        if let Some(name) = attached {
            bail!("save_pretrained: adapter `{name}` is still attached; merge it (merge_adapter) or save it as a PEFT directory (save_peft_adapter)");
        }
        if let Some((name, _)) = self.linears().into_iter().find(|(_, l)| l.quantized.is_some()) {
            bail!("save_pretrained: `{name}` is stored quantized; make the weights dense first (dequantize them)");
        }
        if let Some(kind) = opts.dtype {
            super::weights::check_compute_dtype(kind)?;
        }
        if opts.max_shard_bytes == 0 {
            bail!("save_pretrained: max_shard_bytes must be above 0");
        }
        if opts.into_existing {
            if out_dir.exists() && !out_dir.is_dir() {
                bail!("{} exists and is not a folder", out_dir.display());
            }
        } else if out_dir.exists()
            && std::fs::read_dir(out_dir).map(|mut d| d.next().is_some()).unwrap_or(true)
        {
            bail!(
                "{} already exists and is not empty; choose a new folder for the model",
                out_dir.display()
            );
        }
        let source_config = source_dir.join("config.json");
        let mut config: Value = serde_json::from_str(
            &std::fs::read_to_string(&source_config)
                .with_context(|| format!("cannot read {}", source_config.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", source_config.display()))?;
        let mut source_dtypes: HashMap<String, Kind> = checkpoint_dtypes(source_dir)?;
        let is_vl = self.vision_config().is_some();
        if is_vl {
            // An older Qwen2-VL source names its tensors `visual.*`, `model.layers.*`.
            source_dtypes = source_dtypes
                .into_iter()
                .map(|(k, v)| (super::qwen2vl::rename_legacy_key(&k).unwrap_or(k), v))
                .collect();
        }
        let embed_kind = source_dtypes
            .get(&format!("{}.weight", self.embed_tokens_path()))
            .copied()
            .unwrap_or(Kind::Float);

        // A value head (PPO's critic) is training state, never part of a model directory; a
        // sequence classifier (a score head) is saved as transformers' `…ForSequenceClassification`,
        // which has no lm_head.
        let classifier = self.score_head().is_some();
        let kept = |k: &str| {
            let value_head = k.starts_with(&format!("{}.", super::llama::VALUE_HEAD));
            let head = classifier && k == "lm_head.weight";
            !(value_head || head)
        };
        let (keys, own): (Vec<String>, Vec<Tensor>) =
            self.named_weights().into_iter().filter(|(k, _)| kept(k)).unzip();
        let tensors = match weights {
            None => own,
            Some(given) => {
                match_weights(&keys, given.into_iter().filter(|(k, _)| kept(k)).collect())?
            }
        };
        // Each weight's dtype (lm_head.weight of a head untied by a merge takes the
        // embeddings') and saved key, in the order transformers saves them.
        let kinds: Vec<Kind> = keys
            .iter()
            .map(|k| opts.dtype.or_else(|| source_dtypes.get(k).copied()).unwrap_or(embed_kind))
            .collect();
        let order = in_transformers_order(&keys);
        let saved_keys: Vec<String> =
            if is_vl { keys.iter().map(|k| super::qwen2vl::saved_key(k)).collect() } else { keys };
        let sizes: Vec<(String, u64)> = order
            .iter()
            .map(|&i| {
                (saved_keys[i].clone(), (tensors[i].numel() * kinds[i].elt_size_in_bytes()) as u64)
            })
            .collect();
        let total_size: u64 = sizes.iter().map(|(_, b)| b).sum();
        let total_parameters: u64 = tensors.iter().map(|t| t.numel() as u64).sum();
        let shards = name_shards(split_into_shards(&sizes, opts.max_shard_bytes));
        let target = match shards.as_slice() {
            [one] => out_dir.join(&one.file),
            _ => out_dir.to_path_buf(),
        };

        // A NaN or Inf weight (a diverged run, a diverged adapter merged in, or an overflow of
        // the chosen dtype) is refused by name before anything is written; each is checked in
        // its saved dtype, one at a time.
        let mut bad = Vec::new();
        for ((key, t), kind) in saved_keys.iter().zip(&tensors).zip(&kinds) {
            if is_stand_in(t) {
                bail!(
                    "save_pretrained: `{key}` is held as a shard on each rank (ZeRO-3): gather the weights \
                     (CausalLM::gathered_weights) and pass them to save_pretrained_with"
                );
            }
            let t = t.f_detach()?.f_to_kind(*kind)?;
            if safetensors::non_finite_counts(&t)?.is_some() {
                bad.push((key.clone(), t));
            }
        }
        crate::peft::refuse_non_finite(&bad, &target)?;
        drop(bad);

        let obj = config
            .as_object_mut()
            .with_context(|| format!("{}: expected a JSON object", source_config.display()))?;
        if self.config().tie_word_embeddings && !self.lm_head_is_tied() {
            obj.insert("tie_word_embeddings".into(), Value::Bool(false));
            // Pre-v5 Qwen2-VL saves may also say so inside text_config, which transformers reads.
            if let Some(text) = obj.get_mut("text_config").and_then(Value::as_object_mut) {
                text.insert("tie_word_embeddings".into(), Value::Bool(false));
            }
        }
        if classifier {
            let arch = self.config().architecture().seq_cls_name().with_context(|| {
                format!(
                    "save_pretrained: the model has a score head, and transformers has no sequence-classification class for {}",
                    self.config().architecture().hf_name()
                )
            })?;
            obj.insert("architectures".into(), serde_json::json!([arch]));
            obj.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            obj.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        }
        if let Some(kind) = opts.dtype {
            for key in ["dtype", "torch_dtype"] {
                if obj.contains_key(key) {
                    obj.insert(key.into(), Value::String(dtype_name(kind).into()));
                }
            }
        }

        // Every file of the save, in the order it is put in place: weights, index, config.
        let position: HashMap<&str, usize> =
            saved_keys.iter().enumerate().map(|(i, k)| (k.as_str(), i)).collect();
        let mut files: Vec<(String, Content)> = shards
            .iter()
            .map(|s| {
                let held = s
                    .keys
                    .iter()
                    .map(|k| {
                        let i = position[k.as_str()];
                        (saved_keys[i].as_str(), &tensors[i], kinds[i])
                    })
                    .collect();
                (s.file.clone(), Content::Weights(held))
            })
            .collect();
        if shards.len() > 1 {
            files.push((
                INDEX_FILE.to_string(),
                Content::Text(index_json(&shards, total_size, total_parameters)),
            ));
        }
        files.push((
            "config.json".into(),
            Content::Text(serde_json::to_string_pretty(&config)? + "\n"),
        ));
        for name in COPIED_FILES {
            let src = source_dir.join(name);
            if src.is_file() {
                files.push((name.to_string(), Content::Copy(src)));
            }
        }

        if opts.into_existing {
            write_into_existing(out_dir, &files)?;
        } else {
            write_new_folder(out_dir, &files)?;
        }
        tracing::info!(
            "wrote {} tensors ({total_size} bytes) in {} weight file(s) to {}",
            saved_keys.len(),
            shards.len(),
            out_dir.display()
        );
        Ok(files.iter().map(|(name, _)| out_dir.join(name)).collect())
    }
}

/// Builds the folder beside `out_dir` (absent or empty) and renames it into place.
fn write_new_folder(out_dir: &Path, files: &[(String, Content)]) -> Result<()> {
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = atomic::temp_path(out_dir);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let guard = TempGuard::new(staging.clone());
    for (name, content) in files {
        write_content(&staging.join(name), content)?;
    }
    if out_dir.exists() {
        std::fs::remove_dir(out_dir)
            .with_context(|| format!("cannot replace the empty folder {}", out_dir.display()))?;
    }
    std::fs::rename(&staging, out_dir)
        .with_context(|| format!("cannot move {} to {}", staging.display(), out_dir.display()))?;
    guard.keep();
    Ok(())
}

/// Writes every file as a temporary in `out_dir` (created when missing), renames each into
/// place, then removes the weight files of an earlier save that this one did not write (and
/// the temporaries of a killed save).
fn write_into_existing(out_dir: &Path, files: &[(String, Content)]) -> Result<()> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut staged = Vec::with_capacity(files.len());
    for (name, content) in files {
        let tmp = atomic::temp_path(&out_dir.join(name));
        let guard = TempGuard::new(tmp.clone());
        write_content(&tmp, content)?;
        staged.push((guard, tmp, out_dir.join(name)));
    }
    // The weights are in place before the earlier ones go: a loader reads `model.safetensors`
    // before an index, so an earlier single file is the model until it is removed.
    for (guard, tmp, path) in staged {
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        guard.keep();
    }
    let written: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let entries =
        std::fs::read_dir(out_dir).with_context(|| format!("cannot read {}", out_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", out_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale_temp = atomic::is_stale_temp(&name)
            && name
                .strip_prefix('.')
                .and_then(|n| n.rsplit_once(".tmp-"))
                .is_some_and(|(inner, _)| is_weight_file(inner));
        let earlier = is_weight_file(&name) && !written.contains(&name.as_str());
        if (earlier || stale_temp) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path()).with_context(|| {
                format!("cannot remove {} of an earlier save", entry.path().display())
            })?;
        }
    }
    Ok(())
}

/// The tensors of a saved model directory by key (its single file or every shard), sorted by
/// key (what tests and tools compare).
pub fn read_model_tensors(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for file in super::weights::checkpoint_files(dir)? {
        out.extend(safetensors::read(&file)?);
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::adapters::tests::{additive, tiny_model};
    use crate::peft::PeftModel;

    /// A fresh folder holding `model` in bf16 as its source checkpoint (config.json,
    /// model.safetensors, a tokenizer file).
    fn source_dir(tag: &str, model: &PeftModel, tied: bool) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("ferrotune-save-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let src = root.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let cfg = format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "vocab_size": 16,
               "tie_word_embeddings": {tied}, "rms_norm_eps": 1e-6, "dtype": "bfloat16"}}"#
        );
        std::fs::write(src.join("config.json"), cfg).unwrap();
        std::fs::write(src.join("tokenizer.json"), "{}").unwrap();
        let bf16: Vec<_> = model
            .named_weights()
            .into_iter()
            .map(|(k, t)| (k, t.to_kind(Kind::BFloat16)))
            .collect();
        safetensors::write(&src.join(SINGLE_FILE), &bf16).unwrap();
        root
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn merged_model_round_trips_through_a_directory() {
        let mut m = tiny_model(true);
        let root = source_dir("merge", &m, true);
        let src = root.join("src");
        m.attach_adapter("default", additive(&["q_proj", "lm_head"])).unwrap();
        assert!(m
            .save_pretrained(&root.join("x"), &src, None)
            .unwrap_err()
            .to_string()
            .contains("merge it"));
        let sd: Vec<_> =
            m.adapter_state_dict().unwrap().into_iter().map(|(k, t)| (k, t.randn_like())).collect();
        m.load_adapter_state_dict(sd).unwrap();
        m.merge_adapter().unwrap();

        let out = root.join("merged");
        m.save_pretrained(&out, &src, None).unwrap();
        assert_eq!(names(&out), ["config.json", "model.safetensors", "tokenizer.json"]);
        let saved = read_model_tensors(&out).unwrap();
        assert!(saved.iter().all(|(_, t)| t.kind() == Kind::BFloat16), "source dtype kept");
        assert!(saved.iter().any(|(k, _)| k == "lm_head.weight"), "the untied head is saved");
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["tie_word_embeddings"], false);
        assert!(m.save_pretrained(&out, &src, None).unwrap_err().to_string().contains("not empty"));

        let out32 = root.join("merged32");
        m.save_pretrained(&out32, &src, Some(Kind::Float)).unwrap();
        let saved = read_model_tensors(&out32).unwrap();
        assert!(saved.iter().all(|(_, t)| t.kind() == Kind::Float));
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out32.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["dtype"], "float32");
        let q = saved
            .iter()
            .find(|(k, _)| k == "model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .1
            .shallow_clone();
        assert_eq!(
            (q - &m.linears()[0].1.weight).abs().max().double_value(&[]),
            0.0,
            "the merged weight is what is saved"
        );
        std::fs::remove_dir_all(root).ok();
    }

    /// The splits huggingface_hub 2.4's `split_torch_state_dict_into_shards` makes of these
    /// sizes (printed by it), including its docstring's example.
    #[test]
    fn shards_are_split_as_huggingface_hub_splits_them() {
        let split = |sizes: &[u64], max| {
            let sizes: Vec<(String, u64)> =
                sizes.iter().enumerate().map(|(i, &b)| (format!("t{i}"), b)).collect();
            name_shards(split_into_shards(&sizes, max))
                .into_iter()
                .map(|s| (s.file, s.keys.join(" ")))
                .collect::<Vec<_>>()
        };
        let of = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(f, k)| (f.to_string(), k.to_string())).collect::<Vec<_>>()
        };
        assert_eq!(
            split(&[6, 6, 2, 6, 2, 2], 10),
            of(&[
                ("model-00001-of-00003.safetensors", "t0"),
                ("model-00002-of-00003.safetensors", "t1 t2"),
                ("model-00003-of-00003.safetensors", "t3 t4 t5"),
            ])
        );
        // A tensor above the limit takes a shard of its own, ahead of the one being filled.
        assert_eq!(
            split(&[3, 12, 4], 10),
            of(&[
                ("model-00001-of-00002.safetensors", "t1"),
                ("model-00002-of-00002.safetensors", "t0 t2"),
            ])
        );
        assert_eq!(
            split(&[10, 1], 10),
            of(&[
                ("model-00001-of-00002.safetensors", "t0"),
                ("model-00002-of-00002.safetensors", "t1"),
            ])
        );
        assert_eq!(split(&[4, 4], 10), of(&[("model.safetensors", "t0 t1")]));
    }

    /// The bytes Python's `json.dumps(index, indent=2, sort_keys=True) + "\n"` writes, as
    /// transformers 5.24 writes the index.
    #[test]
    fn the_index_is_written_as_transformers_writes_it() {
        let shards = vec![
            Shard {
                file: "model-00001-of-00002.safetensors".into(),
                keys: vec!["b.weight".into()],
            },
            Shard {
                file: "model-00002-of-00002.safetensors".into(),
                keys: vec!["a.weight".into()],
            },
        ];
        assert_eq!(
            index_json(&shards, 28, 7),
            "{\n  \"metadata\": {\n    \"total_parameters\": 7,\n    \"total_size\": 28\n  },\n  \"weight_map\": {\n    \"a.weight\": \"model-00002-of-00002.safetensors\",\n    \"b.weight\": \"model-00001-of-00002.safetensors\"\n  }\n}\n"
        );
        assert!(is_weight_file("model-00002-of-00012.safetensors"));
        assert!(is_weight_file(INDEX_FILE) && is_weight_file(SINGLE_FILE));
        for other in ["model-1-of-2.safetensors", "model-00001-of-00002.bin", "metrics.jsonl"] {
            assert!(!is_weight_file(other), "{other}");
        }
    }

    /// Values huggingface_hub's `parse_size_to_int` and transformers'
    /// `convert_file_size_to_int` give.
    #[test]
    fn sizes_parse_as_transformers_reads_them() {
        for (s, bytes) in [
            ("5GB", 5_000_000_000),
            ("500MB", 500_000_000),
            ("1.5GB", 1_500_000_000),
            (" 2 kb", 2_000),
            ("0.1GB", 100_000_000),
            ("1TB", 1_000_000_000_000),
            ("2GiB", 2_147_483_648),
            ("3MiB", 3_145_728),
            ("1KiB", 1_024),
            ("123456", 123_456),
            (DEFAULT_MAX_SHARD_SIZE, DEFAULT_MAX_SHARD_BYTES),
        ] {
            assert_eq!(parse_size(s).unwrap(), bytes, "{s}");
        }
        for bad in ["", "GB", "abcGB", "-1GB", "5 PB", "infGB", "0", "0.0000000001KB"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }

    /// The order Python's `sorted(keys, key=dot_natural_key)` gives (transformers 5.24).
    #[test]
    fn keys_are_ordered_as_transformers_saves_them() {
        let keys: Vec<String> = [
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.2.self_attn.q_proj.bias",
            "model.layers.2.input_layernorm.weight",
            "lm_head.weight",
            "model.visual.blocks.0.norm1.weight",
            "model.language_model.norm.weight",
            "model.embed_tokens.weight",
            "model.visual.merger.mlp.0.weight",
            "model.layers.2.mlp.down_proj.weight",
            "a.shard_11",
            "a.shard_2",
            "a.shard",
            "a.007",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(in_transformers_order(&keys), [12, 11, 10, 9, 3, 6, 5, 2, 8, 1, 0, 4, 7]);
    }

    #[test]
    fn a_save_into_an_existing_folder_replaces_only_the_earlier_weights() {
        let m = tiny_model(false);
        let root = source_dir("existing", &m, false);
        let src = root.join("src");
        let out = root.join("run");
        std::fs::create_dir_all(out.join("checkpoint-1")).unwrap();
        std::fs::write(out.join("metrics.jsonl"), "{}\n").unwrap();
        std::fs::write(out.join("checkpoint-1").join(SINGLE_FILE), "kept").unwrap();
        std::fs::write(out.join("model-00009-of-00012.safetensors"), "stale").unwrap();
        std::fs::write(out.join(".model.safetensors.tmp-99999999"), "killed save").unwrap();
        std::fs::write(out.join("model-notes.txt"), "not a weight file").unwrap();
        let new = SaveOptions { dtype: Some(Kind::Float), ..SaveOptions::default() };
        assert!(m
            .save_pretrained_with(None, &out, &src, &new)
            .unwrap_err()
            .to_string()
            .contains("not empty"));

        // One file: the earlier shard and the killed save's temporary go.
        let single = SaveOptions { into_existing: true, ..new.clone() };
        let written = m.save_pretrained_with(None, &out, &src, &single).unwrap();
        assert_eq!(
            written,
            ["model.safetensors", "config.json", "tokenizer.json"].map(|f| out.join(f))
        );
        let others = ["checkpoint-1", "metrics.jsonl", "model-notes.txt"];
        let want = |weights: &[&str]| {
            let mut n: Vec<String> = ["config.json", "tokenizer.json"]
                .iter()
                .chain(&others)
                .chain(weights)
                .map(|s| s.to_string())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&out), want(&[SINGLE_FILE]));
        let single_tensors = read_model_tensors(&out).unwrap();

        // Sharded: the single file goes (a loader would read it before the index).
        let sharded = SaveOptions { max_shard_bytes: 600, ..single.clone() };
        let written = m.save_pretrained_with(None, &out, &src, &sharded).unwrap();
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(INDEX_FILE)).unwrap()).unwrap();
        let shards: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("model-"))
            .collect();
        assert!(shards.len() >= 3, "{shards:?}");
        let mut expected_files = shards.iter().map(String::as_str).collect::<Vec<_>>();
        expected_files.push(INDEX_FILE);
        assert_eq!(names(&out), want(&expected_files));
        let total: u64 = single_tensors.iter().map(|(_, t)| t.numel() as u64 * 4).sum();
        assert_eq!(index["metadata"]["total_size"], total);
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), single_tensors.len());
        let mut shard_bytes = Vec::new();
        for shard in &shards {
            let keys: Vec<String> = safetensors::read_header(&out.join(shard))
                .unwrap()
                .into_iter()
                .map(|e| e.key)
                .collect();
            assert!(keys.iter().all(|k| map[k] == shard.as_str()), "{shard}: {keys:?}");
            let bytes: u64 = single_tensors
                .iter()
                .filter(|(k, _)| keys.contains(k))
                .map(|(_, t)| t.numel() as u64 * 4)
                .sum();
            assert!(bytes <= 600, "{shard}: {bytes} bytes");
            shard_bytes.push(bytes);
        }
        // Greedy: a shard is closed only when the next tensor does not fit.
        assert!(shard_bytes.windows(2).all(|w| w[0] + w[1] > 600), "{shard_bytes:?}");
        let back = read_model_tensors(&out).unwrap();
        assert_eq!(back.len(), single_tensors.len());
        for ((k, a), (l, b)) in back.iter().zip(&single_tensors) {
            assert!(k == l && a.equal(b), "{k}");
        }
        // weights.rs reads the sharded folder as the model.
        let loaded = CausalLM::load(&out, Device::Cpu, Kind::Float).unwrap();
        assert!(loaded.embed_tokens().equal(m.embed_tokens()));

        // Back to one file: the shards and the index go.
        m.save_pretrained_with(None, &out, &src, &single).unwrap();
        assert_eq!(names(&out), want(&[SINGLE_FILE]));
        assert_eq!(
            std::fs::read_to_string(out.join("checkpoint-1").join(SINGLE_FILE)).unwrap(),
            "kept"
        );
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn given_weights_replace_the_models_and_must_match_its_keys() {
        let m = tiny_model(true);
        let root = source_dir("given", &m, true);
        let src = root.join("src");
        let opts = SaveOptions { max_shard_bytes: 300, ..SaveOptions::default() };
        let own = m.named_weights();
        let save = |weights: Vec<(String, Tensor)>, tag: &str| {
            m.save_pretrained_with(Some(weights), &root.join(tag), &src, &opts)
        };
        let doubled: Vec<(String, Tensor)> =
            own.iter().map(|(k, t)| (k.clone(), t * 2.0)).collect();
        save(doubled.iter().rev().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(), "ok")
            .unwrap();
        let saved = read_model_tensors(&root.join("ok")).unwrap();
        assert_eq!(saved.len(), own.len());
        for (k, t) in &saved {
            let want = &doubled.iter().find(|(n, _)| n == k).unwrap().1;
            assert!(t.equal(&want.to_kind(Kind::BFloat16)), "{k}: the given tensor is saved");
        }

        let mut missing: Vec<_> = own.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        missing.retain(|(k, _)| k != "model.norm.weight");
        let e = save(missing, "missing").unwrap_err().to_string();
        assert!(e.contains("lack `model.norm.weight`"), "{e}");
        let mut extra: Vec<_> = own.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        extra.push(("lm_head.weight".into(), m.embed_tokens().shallow_clone()));
        let e = save(extra, "extra").unwrap_err().to_string();
        assert!(e.contains("`lm_head.weight`") && e.contains("tied lm_head"), "{e}");
        let mut twice: Vec<_> = own.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        twice.push((twice[1].0.clone(), twice[1].1.shallow_clone()));
        let e = save(twice, "twice").unwrap_err().to_string();
        assert!(e.contains(&format!("`{}` more than once", own[1].0)), "{e}");

        // The stand-in of a ZeRO-3 shard is not a weight.
        let mut stand_in: Vec<_> =
            own.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        let ones = vec![1i64; own[3].1.dim()];
        stand_in[3].1 = Tensor::zeros(ones.as_slice(), (Kind::Float, Device::Cpu))
            .expand(own[3].1.size(), false);
        let e = save(stand_in, "stand-in").unwrap_err().to_string();
        assert!(e.contains(&format!("`{}` is held as a shard", own[3].0)), "{e}");

        // A NaN in a given weight is refused by name; nothing is written.
        let nan: Vec<_> = own.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        let _ = nan[2].1.get(0).get(0).fill_(f64::NAN);
        let e = save(nan, "nan").unwrap_err().to_string();
        assert!(e.contains(&format!("`{}`", own[2].0)) && e.contains("nothing was written"), "{e}");
        for tag in ["missing", "extra", "twice", "stand-in", "nan"] {
            assert!(!root.join(tag).exists(), "{tag}");
        }
        std::fs::remove_dir_all(root).ok();
    }
}
