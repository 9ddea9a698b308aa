//! `ferrotune config import`: translates an LLaMA-Factory YAML config or a Qwen2-VL-Finetune
//! `finetune*.sh` script into a ferrotune run config, and lists every key it could not
//! translate with the reason. `ferrotune train LF.yaml` runs the same translation when the file
//! is an LLaMA-Factory config ([`translate_if_llamafactory`]).
//!
//! Both sources are Hugging Face `TrainingArguments` underneath, so the keys they share
//! (batch sizes, learning rate, schedule, logging, saving, DeepSpeed) go through one
//! translator ([`Translator::hf_training_args`]) that writes transformers' defaults where they
//! differ from ferrotune's (learning rate 5e-5, linear schedule, 3 epochs, micro-batch 8,
//! logging and saving every 500 steps), so the translated run is the run the source described.
//! Reference: LLaMA-Factory's `hparams/*.py` and `model/adapter.py`, Qwen2-VL-Finetune's
//! `src/params.py` and `src/train/train_sft.py`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_yaml::{Mapping, Value};

use crate::train::config::TrainConfig;

/// Which trainer the imported file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// An LLaMA-Factory YAML config (`llamafactory-cli train FILE`).
    Llamafactory,
    /// A Qwen2-VL-Finetune launch script (`bash scripts/finetune*.sh`).
    QwenVlFinetune,
}

/// A key of the source that the translated config does not carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Untranslated {
    /// The key as the source spells it (`deepspeed:zero_optimization.offload_param` for a key
    /// of the DeepSpeed JSON).
    pub key: String,
    /// Its value, as written.
    pub value: String,
    /// Why it is not in the config, and what to do.
    pub reason: String,
    /// True when leaving it out changes nothing a run computes (a worker count, a cache, a
    /// plot that ferrotune always draws): the documented keys of the README's table.
    pub no_effect: bool,
}

/// The result of an import: the config, what stayed behind, and notes on what was translated
/// with a difference worth knowing.
#[derive(Debug, Clone)]
pub struct Translation {
    /// The ferrotune config, top-level keys in the config reference's order.
    pub config: Mapping,
    pub untranslated: Vec<Untranslated>,
    pub notes: Vec<String>,
    /// `resume_from_checkpoint` of the source (`ferrotune train --resume` takes it).
    pub resume: Option<String>,
}

impl Translation {
    /// The config as YAML, with a comment naming the source.
    pub fn to_yaml(&self, source: &Path, format: ImportFormat) -> Result<String> {
        let body = serde_yaml::to_string(&Value::Mapping(self.config.clone()))
            .context("cannot write the translated config as YAML")?;
        let what = match format {
            ImportFormat::Llamafactory => "LLaMA-Factory config",
            ImportFormat::QwenVlFinetune => "Qwen2-VL-Finetune script",
        };
        let mut head = format!(
            "# Translated by `ferrotune config import` from the {what} {}.\n",
            source.display()
        );
        for u in &self.untranslated {
            let kind = if u.no_effect { "not needed" } else { "UNTRANSLATED" };
            head.push_str(&format!("# {kind}: {} = {}: {}\n", u.key, u.value, one_line(&u.reason)));
        }
        Ok(head + &body)
    }

    /// The report for stderr: every untranslated key with its reason, then the notes.
    pub fn report(&self) -> String {
        let mut s = String::new();
        if self.untranslated.is_empty() {
            s.push_str("every key was translated\n");
        } else {
            s.push_str(&format!("untranslated keys ({}):\n", self.untranslated.len()));
            for u in &self.untranslated {
                s.push_str(&format!(
                    "  {} = {}: {}{}\n",
                    u.key,
                    u.value,
                    if u.no_effect { "no effect in ferrotune: " } else { "" },
                    u.reason
                ));
            }
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }

    /// The untranslated keys that change the run (not the documented no-effect ones).
    pub fn significant(&self) -> Vec<&Untranslated> {
        self.untranslated.iter().filter(|u| !u.no_effect).collect()
    }
}

/// How the paths of the source are written into the config.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The directory the source's relative paths are read from (LLaMA-Factory and
    /// Qwen2-VL-Finetune read them from the working directory).
    pub cwd: PathBuf,
    /// Write relative paths as absolute ones (joined to `cwd`): when the config is read from
    /// another folder than `cwd`. Otherwise they are kept as written.
    pub absolute_paths: bool,
    /// The `device:` to write.
    pub device: String,
}

impl ImportOptions {
    /// Paths kept as written, device from `device` or this machine (cuda when available).
    pub fn here(device: Option<String>) -> Result<Self> {
        Ok(Self {
            cwd: std::env::current_dir().context("cannot read the current directory")?,
            absolute_paths: false,
            device: device.unwrap_or_else(default_device),
        })
    }
}

fn default_device() -> String {
    if tch::Cuda::is_available() {
        "cuda".into()
    } else {
        "cpu".into()
    }
}

/// `ferrotune config import FORMAT FILE [--out OUT] [--device D]`.
pub fn run(a: &crate::cli::args::ImportArgs) -> Result<()> {
    let mut opts = ImportOptions::here(a.device.clone())?;
    if let Some(out) = &a.out {
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let same = match (dir.canonicalize(), opts.cwd.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        opts.absolute_paths = !same;
    }
    let tr = import_file(a.format, &a.file, &opts)?;
    let yaml = tr.to_yaml(&a.file, a.format)?;
    match &a.out {
        Some(out) => {
            write_atomically(out, &yaml)?;
            eprintln!("wrote {} (from {})", out.display(), a.file.display());
        }
        None => print!("{yaml}"),
    }
    eprint!("{}", tr.report());
    if a.out.is_none() && !opts.absolute_paths {
        eprintln!(
            "note: relative paths are kept as written; ferrotune reads them from the config's folder, so save it in {}",
            opts.cwd.display()
        );
    }
    Ok(())
}

/// Translates `file` as `format`.
pub fn import_file(format: ImportFormat, file: &Path, opts: &ImportOptions) -> Result<Translation> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    match format {
        ImportFormat::Llamafactory => {
            let value: Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not YAML", file.display()))?;
            let Value::Mapping(map) = value else {
                bail!("{}: an LLaMA-Factory config is a mapping of keys", file.display());
            };
            translate_llamafactory(&map, opts, &[dir])
                .with_context(|| format!("cannot import {}", file.display()))
        }
        ImportFormat::QwenVlFinetune => {
            let script = parse_launch_script(&text)
                .with_context(|| format!("cannot read the launch command of {}", file.display()))?;
            let mut dirs = vec![dir.clone()];
            dirs.extend(dir.parent().map(Path::to_path_buf));
            translate_qwen_vl_finetune(&script, opts, &dirs)
                .with_context(|| format!("cannot import {}", file.display()))
        }
    }
}

/// Whether a YAML mapping is an LLaMA-Factory config rather than a ferrotune one: no `model:`
/// and one of LLaMA-Factory's own keys.
pub fn looks_like_llamafactory(map: &Mapping) -> bool {
    !map.contains_key("model")
        && ["model_name_or_path", "stage", "finetuning_type"].iter().any(|k| map.contains_key(*k))
}

/// For `ferrotune train FILE`: when FILE is an LLaMA-Factory config, its translation (paths
/// resolved from the working directory as LLaMA-Factory resolves them, untranslated keys
/// printed on stderr) and its `resume_from_checkpoint`; `None` for anything else.
pub fn translate_if_llamafactory(file: &Path) -> Result<Option<(TrainConfig, Option<String>)>> {
    let Ok(text) = std::fs::read_to_string(file) else { return Ok(None) };
    let Ok(Value::Mapping(map)) = serde_yaml::from_str::<Value>(&text) else { return Ok(None) };
    if !looks_like_llamafactory(&map) {
        return Ok(None);
    }
    let mut opts = ImportOptions::here(None)?;
    opts.absolute_paths = true;
    let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let tr = translate_llamafactory(&map, &opts, &[dir]).with_context(|| {
        format!("{} is an LLaMA-Factory config; cannot translate it", file.display())
    })?;
    eprintln!(
        "{} is an LLaMA-Factory config: training its translation (`ferrotune config import llamafactory {}` prints it)",
        file.display(),
        file.display()
    );
    eprint!("{}", tr.report());
    let yaml = serde_yaml::to_string(&Value::Mapping(tr.config.clone()))?;
    let cfg = TrainConfig::from_yaml(&yaml)
        .with_context(|| format!("the translation of {} is not a valid config", file.display()))?;
    Ok(Some((cfg, tr.resume)))
}

fn write_atomically(out: &Path, text: &str) -> Result<()> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().with_context(|| format!("--out {} names no file", out.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", out.display())
    })
}

// ------------------------------------------------------------------ values

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => one_line(serde_yaml::to_string(other).unwrap_or_default().trim()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().map(|i| i != 0),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => {
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
        }
        Value::String(s) => s.trim().parse::<i64>().ok().or_else(|| {
            s.trim().parse::<f64>().ok().filter(|f| f.fract() == 0.0).map(|f| f as i64)
        }),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A comma-separated string or a list, as LLaMA-Factory's list arguments.
fn as_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Sequence(items) => items.iter().map(as_str).collect(),
        other => as_str(other).map(|s| {
            s.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
        }),
    }
}

/// The source's keys, taken one by one; what is left at the end is reported.
struct Keys(Vec<(String, Value)>);

impl Keys {
    fn from_mapping(map: &Mapping) -> Result<Self> {
        map.iter()
            .map(|(k, v)| match k {
                Value::String(k) => Ok((k.clone(), v.clone())),
                other => bail!("key {} is not a string", show(other)),
            })
            .collect::<Result<_>>()
            .map(Keys)
    }

    /// The value of `key`, removed; `null` counts as not set.
    fn take(&mut self, key: &str) -> Option<Value> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        let (_, v) = self.0.remove(i);
        (!v.is_null()).then_some(v)
    }
}

/// Model families by what ferrotune loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// A decoder ferrotune loads (`llama`, `qwen2`, `qwen3`, `mistral`).
    Text(&'static str),
    /// Qwen2-VL / Qwen2.5-VL.
    Vision(&'static str),
    /// A name ferrotune cannot place (a local folder without config.json, a hub id it does not
    /// recognise): translated as a text model, with a note.
    Unknown,
}

const SUPPORTED: &str = "Llama, Mistral, Qwen2 / Qwen2.5, Qwen3 (dense), Qwen2-VL, Qwen2.5-VL";

/// The family of `model` (a local folder's config.json `model_type`, else the hub id's name),
/// or the name of a family ferrotune does not support.
fn model_family(model: &str, local: Option<&Path>) -> std::result::Result<Family, String> {
    if let Some(dir) = local {
        if let Ok(text) = std::fs::read_to_string(dir.join("config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(t) = v.get("model_type").and_then(|t| t.as_str()) {
                    return match t {
                        "llama" => Ok(Family::Text("llama")),
                        "qwen2" => Ok(Family::Text("qwen2")),
                        "qwen3" => Ok(Family::Text("qwen3")),
                        "mistral" => Ok(Family::Text("mistral")),
                        "qwen2_vl" => Ok(Family::Vision("qwen2_vl")),
                        "qwen2_5_vl" => Ok(Family::Vision("qwen2_5_vl")),
                        other => Err(format!("model_type `{other}`")),
                    };
                }
            }
        }
    }
    let name = model.rsplit('/').next().unwrap_or(model).to_ascii_lowercase();
    let has = |pats: &[&str]| pats.iter().any(|p| name.contains(p));
    if has(&["qwen3-vl", "qwen3_vl", "qwen3vl", "qwen3.5", "qwen3-omni", "qwen2.5-omni"]) {
        return Err(format!("`{model}` (Qwen3-VL / Omni)"));
    }
    if has(&["qwen2.5-vl", "qwen2_5_vl", "qwen2.5vl", "qwen25vl"]) {
        return Ok(Family::Vision("qwen2_5_vl"));
    }
    if has(&["qwen2-vl", "qwen2_vl", "qwen2vl", "qvq"]) {
        return Ok(Family::Vision("qwen2_vl"));
    }
    if has(&[
        "-a3b",
        "-a22b",
        "moe",
        "qwen3-next",
        "mixtral",
        "llava",
        "vision",
        "llama-4",
        "llama4",
    ]) {
        return Err(format!("`{model}` (a mixture-of-experts or vision model of another family)"));
    }
    if name.contains("qwen3") {
        return Ok(Family::Text("qwen3"));
    }
    if has(&["qwen2", "qwen1.5", "qwq"]) {
        return Ok(Family::Text("qwen2"));
    }
    if name.contains("llama") {
        return Ok(Family::Text("llama"));
    }
    if name.contains("mistral") {
        return Ok(Family::Text("mistral"));
    }
    Ok(Family::Unknown)
}

/// LLaMA-Factory templates and the families whose own chat template they are.
fn template_matches(template: &str, family: Family) -> bool {
    let fam = match family {
        Family::Text(f) | Family::Vision(f) => f,
        Family::Unknown => return false,
    };
    match template {
        "qwen" | "qwen2" | "qwen2_5" => fam == "qwen2",
        "qwen3" | "qwen3_nothink" => fam == "qwen3",
        "qwen2_vl" | "qwen2_5_vl" => fam == "qwen2_vl" || fam == "qwen2_5_vl",
        "llama2" | "llama3" | "llama3_1" | "llama3_2" => fam == "llama",
        "mistral" | "ministral" => fam == "mistral",
        _ => false,
    }
}

// ------------------------------------------------------------------ the translator

/// Builds the config and the report.
struct Translator<'a> {
    out: Mapping,
    untranslated: Vec<Untranslated>,
    notes: Vec<String>,
    resume: Option<String>,
    opts: &'a ImportOptions,
    /// Where a relative DeepSpeed JSON path is looked for after the working directory.
    search_dirs: Vec<PathBuf>,
}

impl<'a> Translator<'a> {
    fn new(opts: &'a ImportOptions, search_dirs: &[PathBuf]) -> Self {
        Self {
            out: Mapping::new(),
            untranslated: Vec::new(),
            notes: Vec::new(),
            resume: None,
            opts,
            search_dirs: search_dirs.to_vec(),
        }
    }

    /// Sets `a.b.c` (sections made as needed).
    fn set(&mut self, path: &str, value: impl Into<Value>) {
        let mut map = &mut self.out;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            let entry =
                map.entry(Value::from(*part)).or_insert_with(|| Value::Mapping(Mapping::new()));
            if !entry.is_mapping() {
                *entry = Value::Mapping(Mapping::new());
            }
            map = entry.as_mapping_mut().expect("a mapping was just put there");
        }
        map.insert(Value::from(parts[parts.len() - 1]), value.into());
    }

    fn get(&self, path: &str) -> Option<&Value> {
        let mut v = self.out.get(path.split('.').next()?)?;
        for part in path.split('.').skip(1) {
            v = v.as_mapping()?.get(part)?;
        }
        Some(v)
    }

    fn no_effect(&mut self, key: &str, value: &Value, reason: &str) {
        self.untranslated.push(Untranslated {
            key: key.into(),
            value: show(value),
            reason: reason.into(),
            no_effect: true,
        });
    }

    fn unsupported(&mut self, key: &str, value: &Value, reason: impl Into<String>) {
        self.untranslated.push(Untranslated {
            key: key.into(),
            value: show(value),
            reason: reason.into(),
            no_effect: false,
        });
    }

    fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    /// A path of the source as the config should hold it.
    fn path(&self, p: &str) -> String {
        if Path::new(p).is_absolute() || !self.opts.absolute_paths {
            p.to_string()
        } else {
            self.opts.cwd.join(p).display().to_string()
        }
    }

    /// `key: value` as a number, or reported as unreadable.
    fn number(&mut self, key: &str, v: &Value) -> Option<f64> {
        let n = as_f64(v);
        if n.is_none() {
            self.unsupported(key, v, "not a number");
        }
        n
    }

    fn integer(&mut self, key: &str, v: &Value) -> Option<i64> {
        let n = as_i64(v);
        if n.is_none() {
            self.unsupported(key, v, "not an integer");
        }
        n
    }

    fn boolean(&mut self, key: &str, v: &Value) -> Option<bool> {
        let b = as_bool(v);
        if b.is_none() {
            self.unsupported(key, v, "not true or false");
        }
        b
    }

    /// Model path and family; an unsupported family is an error (no config is written).
    fn model(&mut self, key: &str, model: &str) -> Result<Family> {
        let local = self.opts.cwd.join(model);
        let is_local =
            Path::new(model).is_absolute() && Path::new(model).is_dir() || local.is_dir();
        let family = model_family(model, is_local.then_some(local.as_path()))
            .map_err(|what| {
                anyhow::anyhow!(
                    "`{key}: {model}`: {what} is not a model family ferrotune trains (supported: {SUPPORTED}); nothing was translated"
                )
            })?;
        if is_local {
            self.set("model", self.path(model));
        } else {
            self.set("model", model.to_string());
            self.note(format!(
                "model `{model}` is not a local folder: ferrotune reads a downloaded model directory \
                 (`huggingface-cli download {model} --local-dir DIR`), then set `model: DIR`"
            ));
        }
        if family == Family::Unknown {
            self.note(format!(
                "cannot tell the model family of `{model}`; translated as a text model (ferrotune supports {SUPPORTED})"
            ));
        }
        Ok(family)
    }

    /// The `TrainingArguments` keys both sources share.
    fn hf_training_args(
        &mut self,
        keys: &mut Keys,
        gradient_checkpointing_default: bool,
    ) -> Result<()> {
        let output_dir = keys
            .take("output_dir")
            .and_then(|v| as_str(&v))
            .context("`output_dir` is required (where the run writes)")?;
        self.set("output_dir", self.path(&output_dir));
        if let Some(v) = keys.take("overwrite_output_dir") {
            if let Some(b) = self.boolean("overwrite_output_dir", &v) {
                if b {
                    self.set("training.overwrite_output_dir", true);
                }
            }
        }
        if let Some(v) = keys.take("seed") {
            if let Some(n) = self.integer("seed", &v) {
                self.set("seed", n);
            }
        }
        // Precision.
        let bf16 = ["bf16", "pure_bf16"]
            .iter()
            .filter_map(|k| keys.take(k).map(|v| (*k, v)))
            .collect::<Vec<_>>();
        for (k, v) in bf16 {
            if self.boolean(k, &v) == Some(true) {
                self.set("dtype", "bf16");
                if k == "pure_bf16" {
                    self.note("pure_bf16: ferrotune's bf16 keeps fp32 adapter weights / master weights and AdamW state, as LLaMA-Factory's plain bf16 does");
                }
            }
        }
        if let Some(v) = keys.take("fp16") {
            if as_bool(&v) == Some(true) {
                self.unsupported(
                    "fp16",
                    &v,
                    "ferrotune refuses f16 training (it would need loss scaling); use bf16: true",
                );
            }
        }
        // Batches and length of the run.
        let micro = keys.take("per_device_train_batch_size");
        let micro = match micro {
            Some(v) => self.integer("per_device_train_batch_size", &v),
            None => Some(8),
        };
        if let Some(n) = micro {
            self.set("training.micro_batch_size", n);
        }
        if let Some(v) = keys.take("gradient_accumulation_steps") {
            if let Some(n) = self.integer("gradient_accumulation_steps", &v) {
                self.set("training.gradient_accumulation_steps", n);
            }
        }
        let lr = match keys.take("learning_rate") {
            Some(v) => self.number("learning_rate", &v),
            None => Some(5e-5),
        };
        if let Some(lr) = lr {
            self.set("optimizer.lr", lr);
        }
        let epochs = match keys.take("num_train_epochs") {
            Some(v) => self.number("num_train_epochs", &v).map(|e| (e, Some(v))),
            None => Some((3.0, None)),
        };
        let max_steps =
            keys.take("max_steps").and_then(|v| self.integer("max_steps", &v)).filter(|&n| n > 0);
        if let Some(n) = max_steps {
            self.set("training.max_steps", n);
        }
        if let Some((e, v)) = epochs {
            let whole = e.ceil().max(1.0) as i64;
            self.set("training.epochs", whole);
            if e.fract() != 0.0 && max_steps.is_none() {
                self.unsupported(
                    "num_train_epochs",
                    &v.unwrap_or(Value::from(e)),
                    format!("ferrotune counts whole epochs: written as {whole}; set training.max_steps to stop part-way"),
                );
            }
        }
        // Optimizer.
        match keys.take("optim") {
            None => {}
            Some(v) => match as_str(&v).as_deref() {
                Some("adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "adamw") => {}
                _ => self.unsupported("optim", &v, "ferrotune's optimizer is AdamW (adamw_torch)"),
            },
        }
        for (key, path) in
            [("weight_decay", "optimizer.weight_decay"), ("adam_epsilon", "optimizer.eps")]
        {
            if let Some(v) = keys.take(key) {
                if let Some(x) = self.number(key, &v) {
                    self.set(path, x);
                }
            }
        }
        let b1 = keys.take("adam_beta1").and_then(|v| self.number("adam_beta1", &v));
        let b2 = keys.take("adam_beta2").and_then(|v| self.number("adam_beta2", &v));
        if b1.is_some() || b2.is_some() {
            self.set(
                "optimizer.betas",
                Value::Sequence(vec![
                    Value::from(b1.unwrap_or(0.9)),
                    Value::from(b2.unwrap_or(0.999)),
                ]),
            );
        }
        if let Some(v) = keys.take("max_grad_norm") {
            if let Some(x) = self.number("max_grad_norm", &v) {
                if x > 0.0 {
                    self.set("optimizer.max_grad_norm", x);
                } else {
                    self.set("optimizer.max_grad_norm", Value::Null);
                }
            }
        }
        // Schedule (transformers' default: linear).
        let kind = keys.take("lr_scheduler_type");
        let kind_name = kind.as_ref().and_then(as_str).unwrap_or_else(|| "linear".into());
        let warmup_steps = keys
            .take("warmup_steps")
            .and_then(|v| self.integer("warmup_steps", &v))
            .filter(|&n| n > 0);
        let warmup_ratio = keys
            .take("warmup_ratio")
            .and_then(|v| self.number("warmup_ratio", &v))
            .filter(|&r| r > 0.0);
        let mut warmup_allowed = true;
        match kind_name.as_str() {
            "linear" | "cosine" => self.set("scheduler.type", kind_name.clone()),
            "constant_with_warmup" => self.set("scheduler.type", "constant"),
            "constant" => {
                self.set("scheduler.type", "constant");
                warmup_allowed = false;
            }
            _ => {
                self.set("scheduler.type", "cosine");
                self.unsupported(
                    "lr_scheduler_type",
                    &kind.clone().unwrap_or(Value::from(kind_name.clone())),
                    "ferrotune schedules are constant, linear and cosine (to 0); written as cosine",
                );
            }
        }
        if warmup_allowed {
            if let Some(n) = warmup_steps {
                self.set("scheduler.warmup_steps", n);
            } else if let Some(r) = warmup_ratio {
                self.set("scheduler.warmup_ratio", r);
            }
        } else if warmup_steps.is_some() || warmup_ratio.is_some() {
            self.note("lr_scheduler_type constant: transformers' `constant` schedule ignores warm-up, so none is written (use constant_with_warmup for one)");
        }
        // Logging, saving, evaluation (transformers' defaults: every 500 steps).
        let logging = match keys.take("logging_steps") {
            Some(v) => self.integer("logging_steps", &v),
            None => Some(500),
        };
        if let Some(n) = logging {
            self.set("training.logging_steps", n.max(1));
        }
        let strategy = keys.take("save_strategy");
        let save_steps = keys.take("save_steps");
        match strategy.as_ref().and_then(as_str).as_deref() {
            None | Some("steps") => {
                let n = match &save_steps {
                    Some(v) => self.integer("save_steps", v),
                    None => Some(500),
                };
                if let Some(n) = n {
                    self.set("training.save_steps", n.max(1));
                }
            }
            Some("no") => {}
            Some(_) => self.unsupported(
                "save_strategy",
                strategy.as_ref().unwrap_or(&Value::Null),
                "ferrotune saves every training.save_steps steps (and at the end); per-epoch saving has no key",
            ),
        }
        if let Some(v) = keys.take("save_total_limit") {
            if let Some(n) = self.integer("save_total_limit", &v) {
                self.set("training.save_total_limit", n);
            }
        }
        let eval_strategy = keys.take("eval_strategy").or_else(|| keys.take("evaluation_strategy"));
        if let Some(v) = keys.take("eval_steps") {
            if let Some(n) = self.integer("eval_steps", &v) {
                self.set("training.eval_steps", n.max(1));
            }
        }
        if let Some(v) = eval_strategy {
            match as_str(&v).as_deref() {
                Some("steps") => {}
                Some("no") => self.no_effect("eval_strategy", &v, "ferrotune evaluates when data.eval_ratio holds samples out (every training.eval_steps and at the end)"),
                _ => self.unsupported("eval_strategy", &v, "ferrotune evaluates every training.eval_steps steps and at the end; per-epoch evaluation has no key"),
            }
        }
        // Activation checkpointing.
        let gc = match keys.take("gradient_checkpointing") {
            Some(v) => {
                self.boolean("gradient_checkpointing", &v).unwrap_or(gradient_checkpointing_default)
            }
            None => gradient_checkpointing_default,
        };
        let gc = match keys.take("disable_gradient_checkpointing") {
            Some(v) => gc && !self.boolean("disable_gradient_checkpointing", &v).unwrap_or(false),
            None => gc,
        };
        if gc {
            self.set("training.gradient_checkpointing", true);
        }
        // Tracking.
        if let Some(v) = keys.take("report_to") {
            let names = as_list(&v).unwrap_or_default();
            let mut kept = Vec::new();
            for n in &names {
                match n.as_str() {
                    "none" => {}
                    "tensorboard" | "all" => kept.push(Value::from("tensorboard")),
                    other => self.unsupported(
                        "report_to",
                        &Value::from(other),
                        "ferrotune reports to TensorBoard (training.report_to: [tensorboard]) and always to metrics.jsonl",
                    ),
                }
            }
            if !kept.is_empty() {
                kept.dedup();
                self.set("training.report_to", Value::Sequence(kept));
            }
        }
        if let Some(v) = keys.take("logging_dir") {
            match as_str(&v) {
                Some(p) => {
                    let p = self.path(&p);
                    self.set("training.logging_dir", p);
                }
                None => self.unsupported("logging_dir", &v, "expected a folder"),
            }
        }
        if let Some(v) = keys.take("resume_from_checkpoint") {
            match as_str(&v) {
                Some(p) if p != "false" && p != "False" => {
                    self.resume = Some(self.path(&p));
                    self.no_effect(
                        "resume_from_checkpoint",
                        &v,
                        "resuming is a command-line flag in ferrotune: `ferrotune train CONFIG --resume PATH` (`ferrotune train` on the LLaMA-Factory file applies it)",
                    );
                }
                _ => {}
            }
        }
        if let Some(v) = keys.take("deepspeed") {
            self.deepspeed(&v)?;
        }
        Ok(())
    }

    /// `deepspeed: FILE.json`: ZeRO stage and offloading → the `memory` plugin.
    fn deepspeed(&mut self, v: &Value) -> Result<()> {
        let Some(file) = as_str(v) else {
            self.unsupported("deepspeed", v, "expected the path of a DeepSpeed JSON file");
            return Ok(());
        };
        let candidates: Vec<PathBuf> = if Path::new(&file).is_absolute() {
            vec![PathBuf::from(&file)]
        } else {
            std::iter::once(self.opts.cwd.join(&file))
                .chain(self.search_dirs.iter().map(|d| d.join(&file)))
                .collect()
        };
        let Some(found) = candidates.iter().find(|p| p.is_file()) else {
            self.unsupported(
                "deepspeed",
                v,
                format!(
                    "cannot find the file (looked at {}); write `memory: {{plugin: zero, stage: N}}` by hand",
                    candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            );
            return Ok(());
        };
        let text = std::fs::read_to_string(found)
            .with_context(|| format!("cannot read the DeepSpeed config {}", found.display()))?;
        let ds: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("the DeepSpeed config {} is not JSON", found.display()))?;
        let zero = ds.get("zero_optimization");
        let stage = zero.and_then(|z| z.get("stage")).and_then(|s| s.as_i64()).unwrap_or(0);
        let offload = |key: &str| -> Option<String> {
            let d = zero?.get(key)?.get("device")?.as_str()?.to_string();
            (d != "none").then_some(d)
        };
        let (opt_off, param_off) = (offload("offload_optimizer"), offload("offload_param"));
        let mut memory = Mapping::new();
        match stage {
            0 => {
                memory.insert("plugin".into(), "ddp".into());
            }
            1..=3 => {
                memory.insert("plugin".into(), "zero".into());
                memory.insert("stage".into(), Value::from(stage));
            }
            other => {
                self.unsupported(
                    "deepspeed:zero_optimization.stage",
                    &Value::from(other),
                    "ZeRO stages are 0 to 3",
                );
                return Ok(());
            }
        }
        if let Some(d) = opt_off {
            if d == "cpu" {
                memory.insert("offload_optimizer".into(), "cpu".into());
            } else {
                self.unsupported(
                    "deepspeed:zero_optimization.offload_optimizer",
                    &Value::from(d),
                    "ferrotune offloads to the CPU only",
                );
            }
        }
        if let Some(d) = param_off {
            if d == "cpu" && stage == 3 {
                memory.insert("offload_param".into(), "cpu".into());
            } else {
                self.unsupported(
                    "deepspeed:zero_optimization.offload_param",
                    &Value::from(d),
                    "ferrotune offloads parameters to the CPU under ZeRO stage 3 only",
                );
            }
        }
        if ds.pointer("/fp16/enabled").and_then(|e| e.as_bool()) == Some(true) {
            self.unsupported(
                "deepspeed:fp16.enabled",
                &Value::from(true),
                "ferrotune refuses f16 training; use bf16",
            );
        }
        if ds.pointer("/bf16/enabled").and_then(|e| e.as_bool()) == Some(true) {
            self.set("dtype", "bf16");
        }
        if let Some(c) = ds.get("gradient_clipping").and_then(|c| c.as_f64()) {
            if self.get("optimizer.max_grad_norm").is_none() {
                self.set("optimizer.max_grad_norm", c);
            }
        }
        self.set("memory", Value::Mapping(memory));
        self.note(format!(
            "deepspeed {}: ZeRO stage {stage} → the `memory` section; start several processes with `ferrotune launch --nproc N train CONFIG` \
             (DeepSpeed's tuning keys — bucket sizes, overlap_comm, stage3 thresholds, `auto` batch sizes — have no counterpart and are not needed)",
            found.display()
        ));
        Ok(())
    }

    /// Vision-language data keys shared by both sources (`image_max_pixels`, …).
    fn media_keys(&mut self, keys: &mut Keys, names: &[(&str, &str)]) {
        for (key, path) in names {
            if let Some(v) = keys.take(key) {
                if let Some(n) = as_f64(&v) {
                    if path.ends_with("fps") {
                        self.set(path, n);
                    } else {
                        self.set(path, n.round() as i64);
                    }
                } else {
                    self.unsupported(key, &v, "not a number");
                }
            }
        }
    }

    fn finish(mut self, keys: Keys, known_no_effect: &[(&str, &str)]) -> Translation {
        for (k, v) in keys.0 {
            if v.is_null() {
                continue;
            }
            match known_no_effect.iter().find(|(n, _)| *n == k) {
                Some((_, reason)) => self.no_effect(&k, &v, reason),
                None => self.unsupported(
                    &k,
                    &v,
                    "not a key ferrotune's importer knows; nothing in the config does it",
                ),
            }
        }
        self.set("device", self.opts.device.clone());
        let mut config = Mapping::new();
        for k in crate::train::config::KEY_ORDER {
            if let Some(v) = self.out.remove(k) {
                config.insert(Value::from(k), v);
            }
        }
        for (k, v) in std::mem::take(&mut self.out) {
            config.insert(k, v);
        }
        Translation {
            config,
            untranslated: self.untranslated,
            notes: self.notes,
            resume: self.resume,
        }
    }
}

/// Keys of transformers' `TrainingArguments` and of both trainers that change nothing a
/// ferrotune run computes, with the reason.
const HF_NO_EFFECT: &[(&str, &str)] = &[
    ("do_train", "ferrotune train always trains"),
    ("dataloader_num_workers", "ferrotune reads and encodes the data in-process before training"),
    ("preprocessing_num_workers", "ferrotune reads and encodes the data in-process before training"),
    ("overwrite_cache", "ferrotune keeps no preprocessed-data cache"),
    ("ddp_timeout", "the collectives' timeout is FERROTUNE_DIST_TIMEOUT or `launch --timeout`"),
    ("plot_loss", "ferrotune always draws loss.png beside metrics.jsonl"),
    ("save_only_model", "ferrotune's checkpoints always hold the optimizer state, so every one resumes exactly"),
    ("trust_remote_code", "ferrotune runs no model code from the checkpoint"),
    ("tf32", "ferrotune leaves libtorch's TF32 setting at its default"),
    ("flash_attn", "ferrotune picks its attention kernel itself (SDPA; FlashAttention-2 varlen for packed rows)"),
    ("enable_liger_kernel", "ferrotune's loss never builds the full logits anyway"),
    ("use_liger", "ferrotune's loss never builds the full logits anyway"),
    ("use_unsloth", "ferrotune has its own kernels"),
    ("include_num_input_tokens_seen", "metrics.jsonl carries tokens/s"),
    ("per_device_eval_batch_size", "evaluation uses training.micro_batch_size"),
    ("run_name", "ferrotune names runs by output_dir"),
    ("remove_unused_columns", "a transformers Trainer detail"),
    ("lazy_preprocess", "ferrotune encodes every row before training (and reports bad ones)"),
    ("disable_flash_attn2", "ferrotune picks its attention kernel itself"),
    ("cache_dir", "ferrotune reads a local model folder"),
    ("upcast_layernorm", "ferrotune computes RMSNorm in fp32"),
    ("quantization_method", "bnb is the method ferrotune's nf4 / int8 quantizers reproduce"),
    ("double_quantization", "read with quantization_bit"),
];

// ------------------------------------------------------------------ LLaMA-Factory

/// Translates an LLaMA-Factory config (its keys as `llamafactory-cli train` reads them).
pub fn translate_llamafactory(
    map: &Mapping,
    opts: &ImportOptions,
    search_dirs: &[PathBuf],
) -> Result<Translation> {
    let mut keys = Keys::from_mapping(map)?;
    let mut t = Translator::new(opts, search_dirs);
    let model = keys
        .take("model_name_or_path")
        .and_then(|v| as_str(&v))
        .context("`model_name_or_path` is required")?;
    let family = t.model("model_name_or_path", &model)?;
    let vision = matches!(family, Family::Vision(_));

    // What trains.
    let ft_value = keys.take("finetuning_type");
    let ft = ft_value.as_ref().and_then(as_str).unwrap_or_else(|| "lora".into());
    let fvt = keys.take("freeze_vision_tower");
    let fmmp = keys.take("freeze_multi_modal_projector");
    let flm = keys.take("freeze_language_model");
    let freeze_vision_tower = fvt.as_ref().and_then(as_bool).unwrap_or(true);
    let freeze_projector = fmmp.as_ref().and_then(as_bool).unwrap_or(true);
    let freeze_language = flm.as_ref().and_then(as_bool).unwrap_or(false);
    if !vision {
        for (k, v) in [
            ("freeze_vision_tower", &fvt),
            ("freeze_multi_modal_projector", &fmmp),
            ("freeze_language_model", &flm),
        ] {
            if let Some(v) = v {
                t.no_effect(k, v, "a text model has no vision tower or projector");
            }
        }
    }
    match ft.as_str() {
        "lora" => lf_lora(&mut t, &mut keys, vision, freeze_vision_tower, freeze_language)?,
        "full" | "freeze" => {
            t.set("finetuning", ft.clone());
            if ft == "freeze" {
                if let Some(v) = keys.take("freeze_trainable_layers") {
                    if let Some(n) = t.integer("freeze_trainable_layers", &v) {
                        t.set("freeze.trainable_layers", n);
                    }
                }
                for (key, path) in [
                    ("freeze_trainable_modules", "freeze.trainable_modules"),
                    ("freeze_extra_modules", "freeze.extra_modules"),
                ] {
                    if let Some(v) = keys.take(key) {
                        let list = as_list(&v).unwrap_or_default();
                        t.set(path, Value::Sequence(list.into_iter().map(Value::from).collect()));
                    }
                }
            }
            if vision {
                t.set("vision.freeze_vision_tower", freeze_vision_tower);
                t.set("vision.tune_merger", !freeze_projector);
                if freeze_language {
                    t.set("vision.freeze_llm", true);
                }
            }
        }
        other => {
            bail!("`finetuning_type: {other}`: ferrotune's importer knows lora, full and freeze")
        }
    }
    if vision && ft == "lora" {
        if let Some(v) = &fmmp {
            t.no_effect(
                "freeze_multi_modal_projector",
                v,
                "LLaMA-Factory's LoRA never adapts or trains the projector; ferrotune's adapter runs keep it frozen too (vision.tune_merger: false)",
            );
        }
        if let Some(v) = &fvt {
            t.note(format!("freeze_vision_tower: {} → the LoRA targets {} the vision blocks, as LLaMA-Factory's `lora_target: all`", show(v), if freeze_vision_tower { "leave out" } else { "include" }));
        }
        if let Some(v) = &flm {
            if freeze_language {
                t.note(format!(
                    "freeze_language_model: {} → the LoRA targets leave out the language model",
                    show(v)
                ));
            }
        }
    }
    if let Some(v) = keys.take("adapter_name_or_path") {
        match as_list(&v).as_deref() {
            Some([one]) if ft == "lora" => {
                let p = t.path(one);
                t.set("adapter_init", p);
            }
            _ => t.unsupported(
                "adapter_name_or_path",
                &v,
                "ferrotune starts from one adapter (adapter_init) in a LoRA run; merge the others first (`ferrotune merge`)",
            ),
        }
    }
    if let Some(v) = keys.take("quantization_bit") {
        let bits = as_i64(&v);
        let qtype =
            keys.take("quantization_type").and_then(|q| as_str(&q)).unwrap_or_else(|| "nf4".into());
        let double = keys.take("double_quantization").and_then(|d| as_bool(&d)).unwrap_or(true);
        if let Some(m) = keys.take("quantization_method") {
            if as_str(&m).as_deref() != Some("bnb") && as_str(&m).as_deref() != Some("bitsandbytes")
            {
                t.unsupported("quantization_method", &m, "ferrotune quantizes as bitsandbytes does (nf4, int8); hqq / eetq have no counterpart");
            }
        }
        match (bits, ft.as_str()) {
            (_, "full" | "freeze") => t.unsupported(
                "quantization_bit",
                &v,
                "a quantized base trains only under an adapter (LLaMA-Factory refuses it too)",
            ),
            (Some(4), _) if qtype == "nf4" => {
                let mut q = Mapping::new();
                q.insert("plugin".into(), "nf4".into());
                q.insert("double_quant".into(), double.into());
                t.set("quantization", Value::Mapping(q));
            }
            (Some(4), _) => t.unsupported(
                "quantization_type",
                &Value::from(qtype),
                "ferrotune's 4-bit quantizer is NF4",
            ),
            (Some(8), _) => {
                let mut q = Mapping::new();
                q.insert("plugin".into(), "int8".into());
                t.set("quantization", Value::Mapping(q));
            }
            _ => t.unsupported(
                "quantization_bit",
                &v,
                "ferrotune quantizes to 4 bits (nf4) or 8 bits (int8)",
            ),
        }
    }
    if ["awq", "gptq", "aqlm", "-bnb-4bit", "int4", "int8"]
        .iter()
        .any(|q| model.to_ascii_lowercase().contains(q))
    {
        t.note(format!("`{model}` looks pre-quantized (AWQ / GPTQ / AQLM / bnb): ferrotune loads full-precision checkpoints and quantizes them itself (quantization_bit)"));
    }

    lf_objective(&mut t, &mut keys, &model)?;
    lf_data(&mut t, &mut keys, family)?;
    t.hf_training_args(&mut keys, true)?;
    if let Some(v) = keys.take("template") {
        let name = as_str(&v).unwrap_or_default();
        if template_matches(&name, family) {
            t.no_effect("template", &v, "ferrotune renders samples with the model's own chat template (tokenizer_config.json / chat_template.jinja), which this template reproduces");
        } else {
            t.unsupported(
                "template",
                &v,
                format!("ferrotune renders samples with the model's own chat template; LLaMA-Factory's `{name}` template is not applied (put the template you want in the model folder's chat_template.jinja)"),
            );
        }
    }
    if let Some(v) = keys.take("do_train") {
        if as_bool(&v) == Some(false) {
            t.unsupported("do_train", &v, "ferrotune's importer translates training runs (`ferrotune eval` evaluates a model)");
        } else {
            t.no_effect("do_train", &v, "ferrotune train always trains");
        }
    }
    for k in ["do_eval", "do_predict"] {
        if let Some(v) = keys.take(k) {
            if as_bool(&v) == Some(true) {
                t.unsupported(k, &v, "a separate evaluation / prediction run: use `ferrotune eval` / `ferrotune generate`");
            }
        }
    }
    Ok(t.finish(keys, HF_NO_EFFECT))
}

/// `finetuning_type: lora`: the adapter section.
fn lf_lora(
    t: &mut Translator,
    keys: &mut Keys,
    vision: bool,
    freeze_vision_tower: bool,
    freeze_language: bool,
) -> Result<()> {
    let mut a = Mapping::new();
    a.insert("plugin".into(), "lora".into());
    let rank = match keys.take("lora_rank") {
        Some(v) => t.integer("lora_rank", &v).unwrap_or(8),
        None => 8,
    };
    a.insert("r".into(), rank.into());
    // LLaMA-Factory's default alpha is twice the rank.
    let alpha = match keys.take("lora_alpha") {
        Some(v) => t.number("lora_alpha", &v).unwrap_or(rank as f64 * 2.0),
        None => rank as f64 * 2.0,
    };
    a.insert("lora_alpha".into(), alpha.into());
    let dropout =
        keys.take("lora_dropout").and_then(|v| t.number("lora_dropout", &v)).unwrap_or(0.0);
    a.insert("lora_dropout".into(), dropout.into());
    let target = keys.take("lora_target");
    let names = target.as_ref().and_then(as_list).unwrap_or_else(|| vec!["all".into()]);
    let all = names.len() == 1 && names[0] == "all";
    // Ferrotune's module paths: decoder linears under `…layers.N.`, Qwen2-VL's vision blocks
    // under `model.visual.blocks.N.`, its merger under `model.visual.merger.` (never targeted
    // by LLaMA-Factory's `all`: the projector is forbidden).
    let targets: Value = if !vision {
        if all {
            "all-linear".into()
        } else {
            Value::Sequence(names.iter().map(|n| Value::from(n.as_str())).collect())
        }
    } else {
        let scope = match (freeze_vision_tower, freeze_language) {
            (true, false) => r".*\.layers\.\d+\.",
            (false, false) => r".*\.(?:layers|blocks)\.\d+\.",
            (false, true) => r".*\.visual\.blocks\.\d+\.",
            (true, true) => bail!(
                "freeze_vision_tower and freeze_language_model both true leave the LoRA nothing to adapt"
            ),
        };
        if all {
            format!("{scope}.*").into()
        } else {
            format!("{scope}(?:.*\\.)?(?:{})", names.join("|")).into()
        }
    };
    a.insert("target_modules".into(), targets);
    if let Some(v) = keys.take("additional_target") {
        let list = as_list(&v).unwrap_or_default();
        a.insert(
            "modules_to_save".into(),
            Value::Sequence(list.into_iter().map(Value::from).collect()),
        );
    }
    for key in ["use_dora", "use_rslora"] {
        if let Some(v) = keys.take(key) {
            if let Some(b) = t.boolean(key, &v) {
                if b {
                    a.insert(key.into(), true.into());
                }
            }
        }
    }
    if let Some(v) = keys.take("pissa_init") {
        if t.boolean("pissa_init", &v) == Some(true) {
            a.insert("init_lora_weights".into(), "pissa".into());
            let iters = keys.take("pissa_iter").and_then(|i| as_i64(&i)).unwrap_or(16);
            if iters != -1 {
                t.note(format!("pissa_init: ferrotune's PiSSA takes the exact SVD; LLaMA-Factory's pissa_iter {iters} takes a fast randomised one (pissa_iter: -1 is the exact one)"));
            }
        }
    }
    keys.take("pissa_iter");
    if let Some(v) = keys.take("pissa_convert") {
        if as_bool(&v) == Some(true) {
            t.unsupported("pissa_convert", &v, "ferrotune saves the PiSSA adapter as trained (with its residual base); no conversion to a plain LoRA");
        }
    }
    if let Some(v) = keys.take("loraplus_lr_ratio") {
        if let Some(x) = t.number("loraplus_lr_ratio", &v) {
            a.insert("loraplus_lr_ratio".into(), x.into());
        }
    }
    if let Some(v) = keys.take("loraplus_lr_embedding") {
        t.unsupported(
            "loraplus_lr_embedding",
            &v,
            "ferrotune's LoRA+ has one ratio (loraplus_lr_ratio)",
        );
    }
    if let Some(v) = keys.take("create_new_adapter") {
        if as_bool(&v) == Some(true) {
            t.unsupported("create_new_adapter", &v, "ferrotune trains one adapter; merge adapter_name_or_path first (`ferrotune merge`) and train a new one on the merged model");
        }
    }
    t.set("finetuning", "adapter");
    t.set("adapter", Value::Mapping(a));
    Ok(())
}

/// `stage` and the preference / PPO keys: the objective (and PPO's rewards).
fn lf_objective(t: &mut Translator, keys: &mut Keys, model: &str) -> Result<()> {
    let stage = keys.take("stage").and_then(|v| as_str(&v)).unwrap_or_else(|| "sft".into());
    let beta = keys.take("pref_beta").and_then(|v| t.number("pref_beta", &v));
    let mut o = Mapping::new();
    match stage.as_str() {
        "sft" => {
            o.insert("plugin".into(), "sft".into());
        }
        "rm" => {
            o.insert("plugin".into(), "reward_model".into());
        }
        "dpo" => {
            let loss_value = keys.take("pref_loss");
            let loss = loss_value.as_ref().and_then(as_str).unwrap_or_else(|| "sigmoid".into());
            let beta = beta.unwrap_or(0.1);
            match loss.as_str() {
                "sigmoid" | "hinge" | "ipo" => {
                    o.insert("plugin".into(), "dpo".into());
                    o.insert("beta".into(), beta.into());
                    o.insert("loss_type".into(), loss.clone().into());
                    if let Some(v) = keys.take("dpo_label_smoothing") {
                        if let Some(x) = t.number("dpo_label_smoothing", &v) {
                            o.insert("label_smoothing".into(), x.into());
                        }
                    }
                }
                "orpo" => {
                    o.insert("plugin".into(), "orpo".into());
                    o.insert("beta".into(), beta.into());
                }
                "simpo" => {
                    o.insert("plugin".into(), "simpo".into());
                    o.insert("beta".into(), beta.into());
                    let gamma = keys.take("simpo_gamma").and_then(|v| t.number("simpo_gamma", &v)).unwrap_or(0.5);
                    o.insert("simpo_gamma".into(), gamma.into());
                }
                _ => {
                    t.unsupported("pref_loss", loss_value.as_ref().unwrap_or(&Value::Null), "ferrotune's preference losses: sigmoid, hinge, ipo (dpo), orpo, simpo");
                    o.insert("plugin".into(), "dpo".into());
                    o.insert("beta".into(), beta.into());
                }
            }
            if let Some(v) = keys.take("pref_ftx") {
                if as_f64(&v).unwrap_or(0.0) != 0.0 {
                    t.unsupported("pref_ftx", &v, "ferrotune's dpo has no SFT term (simpo has cpo_alpha)");
                }
            }
            if let Some(v) = keys.take("ref_model") {
                t.unsupported("ref_model", &v, "the reference is the base without the adapter (adapter runs) or a frozen copy of the base (full runs)");
            }
        }
        "kto" => {
            o.insert("plugin".into(), "kto".into());
            o.insert("beta".into(), beta.unwrap_or(0.1).into());
            for (key, name) in [("kto_chosen_weight", "desirable_weight"), ("kto_rejected_weight", "undesirable_weight")] {
                if let Some(v) = keys.take(key) {
                    if let Some(x) = t.number(key, &v) {
                        o.insert(name.into(), x.into());
                    }
                }
            }
            if let Some(v) = keys.take("pref_ftx") {
                if as_f64(&v).unwrap_or(0.0) != 0.0 {
                    t.unsupported("pref_ftx", &v, "ferrotune's kto has no SFT term");
                }
            }
        }
        "ppo" => {
            o.insert("plugin".into(), "ppo".into());
            // LLaMA-Factory runs trl 0.9's PPOTrainer: adaptive KL from 0.2 towards ppo_target.
            o.insert("adaptive_kl".into(), true.into());
            o.insert("kl_coef".into(), 0.2.into());
            let target = keys.take("ppo_target").and_then(|v| t.number("ppo_target", &v)).unwrap_or(6.0);
            o.insert("target".into(), target.into());
            let epochs = keys.take("ppo_epochs").and_then(|v| t.integer("ppo_epochs", &v)).unwrap_or(4);
            o.insert("num_ppo_epochs".into(), epochs.into());
            if let Some(v) = keys.take("ppo_whiten_rewards") {
                if as_bool(&v) == Some(true) {
                    o.insert("whiten_rewards".into(), true.into());
                }
            }
            for (key, name) in [("max_new_tokens", "response_length"), ("top_k", "top_k"), ("top_p", "top_p"), ("temperature", "temperature")] {
                if let Some(v) = keys.take(key) {
                    if let Some(x) = as_f64(&v) {
                        let value = if key == "top_p" || key == "temperature" { Value::from(x) } else { Value::from(x as i64) };
                        o.insert(name.into(), value);
                    }
                }
            }
            let kind = keys.take("reward_model_type").and_then(|v| as_str(&v)).unwrap_or_else(|| "lora".into());
            match keys.take("reward_model") {
                Some(rm) => {
                    let rm_path = as_list(&rm).and_then(|l| l.first().cloned()).unwrap_or_default();
                    let mut r = Mapping::new();
                    match kind.as_str() {
                        "lora" => {
                            let base = t.get("model").map(show).unwrap_or_else(|| model.to_string());
                            r.insert("model".into(), base.into());
                            r.insert("adapter".into(), t.path(&rm_path).into());
                        }
                        "full" => {
                            r.insert("model".into(), t.path(&rm_path).into());
                        }
                        _ => t.unsupported("reward_model_type", &Value::from(kind.clone()), "ferrotune's reward models are a sequence classifier or its SEQ_CLS adapter"),
                    }
                    if !r.is_empty() {
                        t.set("rewards", Value::Sequence(vec![Value::Mapping(r)]));
                    }
                }
                None => bail!("`stage: ppo` needs `reward_model`"),
            }
            for k in ["ppo_buffer_size", "ppo_score_norm", "ppo_logger"] {
                if let Some(v) = keys.take(k) {
                    t.unsupported(k, &v, "trl 0.9's PPO knob with no counterpart in ferrotune's PPO (the last trl PPOTrainer's)");
                }
            }
        }
        "pt" => bail!("`stage: pt` (pre-training on raw text) has no ferrotune objective; ferrotune trains sft, rm, ppo, dpo and kto"),
        other => bail!("`stage: {other}`: ferrotune trains sft, rm, ppo, dpo and kto"),
    }
    if let Some(b) = beta {
        if !matches!(stage.as_str(), "dpo" | "kto") {
            t.unsupported(
                "pref_beta",
                &Value::from(b),
                "only read by the preference stages (dpo, kto)",
            );
        }
    }
    t.set("objective", Value::Mapping(o));
    Ok(())
}

/// The data keys: LLaMA-Factory's registry (`dataset` + `dataset_dir`) and the encoding keys.
fn lf_data(t: &mut Translator, keys: &mut Keys, family: Family) -> Result<()> {
    let datasets = keys
        .take("dataset")
        .and_then(|v| as_list(&v))
        .filter(|l| !l.is_empty())
        .context("`dataset` is required (names of dataset_info.json entries)")?;
    let dir = keys.take("dataset_dir").and_then(|v| as_str(&v)).unwrap_or_else(|| "data".into());
    let dir = t.path(&dir);
    t.set("data.dataset_dir", dir);
    t.set("data.datasets", Value::Sequence(datasets.into_iter().map(Value::from).collect()));
    let mut interleaved = false;
    if let Some(v) = keys.take("mix_strategy") {
        match as_str(&v).as_deref() {
            Some(s @ ("concat" | "interleave_under" | "interleave_over")) => {
                interleaved = s != "concat";
                t.set("data.mix_strategy", s.to_string())
            }
            _ => t.unsupported(
                "mix_strategy",
                &v,
                "ferrotune mixes data sets by concat, interleave_under or interleave_over",
            ),
        }
    }
    if let Some(v) = keys.take("interleave_probs") {
        let probs: Option<Vec<f64>> =
            as_list(&v).and_then(|l| l.iter().map(|p| p.parse().ok()).collect());
        match probs {
            // LLaMA-Factory reads the probabilities only when it interleaves.
            _ if !interleaved => t.no_effect(
                "interleave_probs",
                &v,
                "LLaMA-Factory ignores it unless mix_strategy interleaves",
            ),
            Some(p) => t.set(
                "data.interleave_probs",
                Value::Sequence(p.into_iter().map(Value::from).collect()),
            ),
            None => t.unsupported("interleave_probs", &v, "expected numbers"),
        }
    }
    if let Some(v) = keys.take("max_samples") {
        if let Some(n) = t.integer("max_samples", &v) {
            t.set("data.max_samples", n);
        }
    }
    let cutoff = match keys.take("cutoff_len") {
        Some(v) => t.integer("cutoff_len", &v).unwrap_or(2048),
        None => 2048,
    };
    t.set("data.cutoff_len", cutoff);
    for key in ["train_on_prompt", "mask_history"] {
        if let Some(v) = keys.take(key) {
            if t.boolean(key, &v) == Some(true) {
                t.set(&format!("data.{key}"), true);
            }
        }
    }
    let packing = keys.take("packing");
    let neat = keys.take("neat_packing");
    let neat_on = neat.as_ref().and_then(as_bool) == Some(true);
    let packing_on = packing.as_ref().and_then(as_bool) == Some(true);
    if neat_on || packing_on {
        t.set("data.packing", true);
        if packing_on && !neat_on {
            t.note("packing: ferrotune packs as LLaMA-Factory's neat_packing does (no attention across the samples of a row)");
        }
    }
    if let Some(v) = keys.take("val_size") {
        match as_f64(&v) {
            Some(r) if r > 0.0 && r < 1.0 => t.set("data.eval_ratio", r),
            Some(0.0) => {}
            _ => t.unsupported(
                "val_size",
                &v,
                "ferrotune holds out a fraction (data.eval_ratio, below 1), not a count of samples",
            ),
        }
    }
    for k in [
        "eval_dataset",
        "tokenized_path",
        "streaming",
        "buffer_size",
        "default_system",
        "tool_format",
    ] {
        if let Some(v) = keys.take(k) {
            let reason = match k {
                "eval_dataset" => "ferrotune evaluates on a held-out fraction of the training data (val_size → data.eval_ratio)",
                "tokenized_path" => "ferrotune encodes the data at every run",
                "streaming" | "buffer_size" => "ferrotune reads every row before training",
                "default_system" => "a system prompt comes from the data set (its `system` column) or the chat template",
                _ => "tool calls render through the model's own chat template",
            };
            if k == "streaming" && as_bool(&v) == Some(false) {
                continue;
            }
            t.unsupported(k, &v, reason);
        }
    }
    if let Some(v) = keys.take("enable_thinking") {
        t.unsupported(
            "enable_thinking",
            &v,
            "ferrotune renders the model's chat template with its defaults",
        );
    }
    if let Some(v) = keys.take("media_dir") {
        match as_str(&v) {
            Some(p) => {
                let p = t.path(&p);
                t.set("data.media_dir", p);
            }
            None => t.unsupported("media_dir", &v, "expected a folder"),
        }
    }

    let media = [
        ("image_max_pixels", "data.image_max_pixels"),
        ("image_min_pixels", "data.image_min_pixels"),
        ("video_max_pixels", "data.video_max_pixels"),
        ("video_min_pixels", "data.video_min_pixels"),
        ("video_fps", "data.video_fps"),
        ("video_maxlen", "data.video_max_frames"),
    ];
    if matches!(family, Family::Vision(_)) {
        t.media_keys(keys, &media);
        // LLaMA-Factory's defaults, where they cap what the model's processor would allow.
        for (path, default) in [
            ("data.image_max_pixels", 768 * 768),
            ("data.video_max_pixels", 256 * 256),
            ("data.video_max_frames", 128),
        ] {
            if t.get(path).is_none() {
                t.set(path, default as i64);
            }
        }
        if t.get("data.video_fps").is_none() {
            t.set("data.video_fps", 2.0);
        }
        t.note("image_max_pixels / video_max_pixels: ferrotune resizes within them with Qwen2-VL's smart_resize (multiples of 28); LLaMA-Factory first scales the image under the cap, then lets the processor round, so sizes can differ by a patch row");
    } else {
        for (k, _) in media {
            if let Some(v) = keys.take(k) {
                t.no_effect(k, &v, "a text model reads no images or videos");
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ Qwen2-VL-Finetune

/// The launch command of a Qwen2-VL-Finetune script: which training script, and its
/// `--name value` arguments (variables expanded, `$((…))` evaluated).
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchCommand {
    /// `src/train/train_sft.py`, `train_dpo.py`, `train_grpo.py`, …
    pub script: String,
    pub args: Vec<(String, String)>,
}

/// Reads a `finetune*.sh`: joins `\`-continued lines, drops comments, collects `NAME=VALUE`
/// assignments (with `export`), expands `$NAME` / `${NAME}` and evaluates integer `$((…))`,
/// and returns the arguments of the line that runs `src/train/train_*.py`.
pub fn parse_launch_script(text: &str) -> Result<LaunchCommand> {
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    for (lineno, raw) in joined.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let body = line.strip_prefix("export ").unwrap_or(line).trim();
        if let Some((name, value)) = body.split_once('=') {
            if !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
            {
                let words = shell_words(value, &vars)
                    .with_context(|| format!("line {}: `{line}`", lineno + 1))?;
                vars.insert(name.to_string(), words.join(" "));
                continue;
            }
        }
        let words =
            shell_words(line, &vars).with_context(|| format!("line {}: `{line}`", lineno + 1))?;
        let Some(at) = words.iter().position(|w| w.ends_with(".py") && w.contains("train")) else {
            continue;
        };
        let script = words[at].clone();
        let mut args = Vec::new();
        let rest = &words[at + 1..];
        let mut i = 0;
        while i < rest.len() {
            let w = &rest[i];
            let Some(name) = w.strip_prefix("--") else {
                bail!("line {}: `{w}` is not a `--name value` argument", lineno + 1);
            };
            if let Some((n, v)) = name.split_once('=') {
                args.push((n.to_string(), v.to_string()));
                i += 1;
            } else if i + 1 < rest.len() && !rest[i + 1].starts_with("--") {
                args.push((name.to_string(), rest[i + 1].clone()));
                i += 2;
            } else {
                args.push((name.to_string(), "True".to_string()));
                i += 1;
            }
        }
        return Ok(LaunchCommand { script, args });
    }
    bail!("no line runs a `src/train/train_*.py` script")
}

/// Splits a shell line into words: quotes, `$VAR` / `${VAR}` and `$((…))` (integers: + − * /
/// % and parentheses). An unset variable expands to nothing, as in the shell.
fn shell_words(line: &str, vars: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let chars: Vec<char> = line.chars().collect();
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match (quote, c) {
            (None, ' ' | '\t') => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                i += 1;
            }
            (None, '#') if !in_word => break,
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
                i += 1;
            }
            (Some(q), _) if c == q => {
                quote = None;
                i += 1;
            }
            (Some('\''), _) => {
                cur.push(c);
                i += 1;
            }
            (_, '$') => {
                in_word = true;
                let rest: String = chars[i..].iter().collect();
                if rest.starts_with("$((") {
                    // The `))` that closes it: parentheses inside balance.
                    let mut depth = 0i32;
                    let mut close = None;
                    for (at, ch) in rest.char_indices().skip(3) {
                        match ch {
                            '(' => depth += 1,
                            ')' if depth > 0 => depth -= 1,
                            ')' if rest[at..].starts_with("))") => {
                                close = Some(at);
                                break;
                            }
                            _ => {}
                        }
                    }
                    let end = close.context("`$((` without `))`")?;
                    let expr = &rest[3..end];
                    let value = arith(expr, vars)
                        .with_context(|| format!("cannot evaluate `$(({expr}))`"))?;
                    cur.push_str(&value.to_string());
                    i += rest[..end + 2].chars().count();
                } else if rest.starts_with("${") {
                    let end = rest.find('}').context("`${` without `}`")?;
                    cur.push_str(vars.get(&rest[2..end]).map(String::as_str).unwrap_or(""));
                    i += rest[..end + 1].chars().count();
                } else {
                    let name: String = rest[1..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name.is_empty() {
                        cur.push('$');
                        i += 1;
                    } else {
                        cur.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
                        i += 1 + name.len();
                    }
                }
            }
            (_, '\\') if i + 1 < chars.len() => {
                cur.push(chars[i + 1]);
                in_word = true;
                i += 2;
            }
            _ => {
                cur.push(c);
                in_word = true;
                i += 1;
            }
        }
    }
    if quote.is_some() {
        bail!("unclosed quote");
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Integer arithmetic of `$((…))` (bash's: / truncates).
fn arith(expr: &str, vars: &BTreeMap<String, String>) -> Result<i64> {
    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Num(i64),
        Op(char),
    }
    let mut toks = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let s: String = chars[i..].iter().take_while(|c| c.is_ascii_digit()).collect();
            i += s.len();
            toks.push(Tok::Num(s.parse()?));
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = if c == '$' { i + 1 } else { i };
            let name: String = chars[start..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .collect();
            i = start + name.len();
            let value =
                vars.get(&name).with_context(|| format!("`{name}` is not set in the script"))?;
            toks.push(Tok::Num(
                value
                    .trim()
                    .parse()
                    .with_context(|| format!("`{name}` = `{value}` is not an integer"))?,
            ));
        } else if "+-*/%()".contains(c) {
            toks.push(Tok::Op(c));
            i += 1;
        } else {
            bail!("unexpected `{c}`");
        }
    }
    fn expr_(t: &[Tok], p: &mut usize) -> Result<i64> {
        let mut v = term(t, p)?;
        while let Some(Tok::Op(o @ ('+' | '-'))) = t.get(*p) {
            *p += 1;
            let r = term(t, p)?;
            v = if *o == '+' { v + r } else { v - r };
        }
        Ok(v)
    }
    fn term(t: &[Tok], p: &mut usize) -> Result<i64> {
        let mut v = atom(t, p)?;
        while let Some(Tok::Op(o @ ('*' | '/' | '%'))) = t.get(*p) {
            *p += 1;
            let r = atom(t, p)?;
            v = match o {
                '*' => v * r,
                _ if r == 0 => bail!("division by zero"),
                '/' => v / r,
                _ => v % r,
            };
        }
        Ok(v)
    }
    fn atom(t: &[Tok], p: &mut usize) -> Result<i64> {
        match t.get(*p) {
            Some(Tok::Num(n)) => {
                *p += 1;
                Ok(*n)
            }
            Some(Tok::Op('-')) => {
                *p += 1;
                Ok(-atom(t, p)?)
            }
            Some(Tok::Op('(')) => {
                *p += 1;
                let v = expr_(t, p)?;
                match t.get(*p) {
                    Some(Tok::Op(')')) => {
                        *p += 1;
                        Ok(v)
                    }
                    _ => bail!("missing `)`"),
                }
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    let mut p = 0;
    let v = expr_(&toks, &mut p)?;
    if p != toks.len() {
        bail!("trailing tokens");
    }
    Ok(v)
}

/// Qwen2-VL-Finetune's own keys that change nothing a ferrotune run computes.
const QVF_NO_EFFECT: &[(&str, &str)] =
    &[("lora_weight_path", "unused by Qwen2-VL-Finetune's training scripts")];

/// Translates a Qwen2-VL-Finetune launch command (defaults from its `src/params.py`).
pub fn translate_qwen_vl_finetune(
    cmd: &LaunchCommand,
    opts: &ImportOptions,
    search_dirs: &[PathBuf],
) -> Result<Translation> {
    let mut map = Mapping::new();
    for (k, v) in &cmd.args {
        map.insert(Value::from(k.as_str()), Value::from(v.as_str()));
    }
    let mut keys = Keys::from_mapping(&map)?;
    let mut t = Translator::new(opts, search_dirs);
    let model = keys
        .take("model_id")
        .and_then(|v| as_str(&v))
        .unwrap_or_else(|| "Qwen/Qwen2-VL-7B-Instruct".into());
    let family = t.model("--model_id", &model)?;
    if let Family::Text(f) = family {
        bail!("`--model_id {model}` is a {f} text model; Qwen2-VL-Finetune trains Qwen2-VL / Qwen2.5-VL");
    }
    let script = Path::new(&cmd.script)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut o = Mapping::new();
    match script.as_str() {
        "train_sft.py" => {
            o.insert("plugin".into(), "sft".into());
        }
        "train_dpo.py" => {
            o.insert("plugin".into(), "dpo".into());
            let beta = keys.take("beta").and_then(|v| as_f64(&v)).unwrap_or(0.1);
            o.insert("beta".into(), beta.into());
            let loss =
                keys.take("dpo_loss").and_then(|v| as_str(&v)).unwrap_or_else(|| "sigmoid".into());
            o.insert("loss_type".into(), loss.into());
            if let Some(v) = keys.take("precompute_ref_log_probs") {
                t.no_effect("precompute_ref_log_probs", &v, "the reference log-probabilities are the base's without the adapter, computed with each batch");
            }
        }
        "train_grpo.py" => {
            o.insert("plugin".into(), "grpo".into());
            for (key, ty) in [
                ("beta", 'f'),
                ("num_generations", 'i'),
                ("max_completion_length", 'i'),
                ("temperature", 'f'),
                ("top_p", 'f'),
                ("top_k", 'i'),
            ] {
                if let Some(v) = keys.take(key) {
                    if let Some(x) = as_f64(&v) {
                        o.insert(
                            key.into(),
                            if ty == 'i' { Value::from(x as i64) } else { Value::from(x) },
                        );
                    }
                }
            }
            if !o.contains_key("beta") {
                o.insert("beta".into(), 0.04.into());
            }
            if let Some(v) = keys.take("max_prompt_length") {
                t.unsupported(
                    "max_prompt_length",
                    &v,
                    "ferrotune keeps prompt + completion within data.cutoff_len",
                );
            }
            t.unsupported(
                "reward_funcs",
                &Value::from("src/train/reward_funcs.py"),
                "Qwen2-VL-Finetune's GRPO rewards are Python functions; add a `rewards:` section (format, exact_match, … or a reward plugin)",
            );
        }
        other => bail!(
            "`{other}`: ferrotune's importer knows train_sft.py, train_dpo.py and train_grpo.py"
        ),
    }
    t.set("objective", Value::Mapping(o));

    // What trains (Qwen2-VL-Finetune's defaults: nothing frozen, no LoRA).
    let flag = |keys: &mut Keys, t: &mut Translator, k: &str, default: bool| -> bool {
        match keys.take(k) {
            Some(v) => t.boolean(&format!("--{k}"), &v).unwrap_or(default),
            None => default,
        }
    };
    let lora = flag(&mut keys, &mut t, "lora_enable", false);
    let vision_lora = flag(&mut keys, &mut t, "vision_lora", false);
    let freeze_tower = flag(&mut keys, &mut t, "freeze_vision_tower", false);
    let freeze_llm = flag(&mut keys, &mut t, "freeze_llm", false);
    let tune_merger = match (keys.take("tune_merger"), keys.take("freeze_merger")) {
        (Some(v), _) => as_bool(&v).unwrap_or(true),
        (None, Some(v)) => !as_bool(&v).unwrap_or(false),
        (None, None) => true,
    };
    let use_dora = flag(&mut keys, &mut t, "use_dora", false);
    let rank = keys.take("lora_rank").and_then(|v| as_i64(&v)).unwrap_or(64);
    let alpha = keys.take("lora_alpha").and_then(|v| as_f64(&v)).unwrap_or(16.0);
    let dropout = keys.take("lora_dropout").and_then(|v| as_f64(&v)).unwrap_or(0.05);
    let exclude = keys.take("lora_namespan_exclude");
    let num_modules = keys.take("num_lora_modules");
    let bias = keys.take("lora_bias");
    if lora {
        t.set("finetuning", "adapter");
        let mut a = Mapping::new();
        a.insert("plugin".into(), "lora".into());
        a.insert("r".into(), rank.into());
        a.insert("lora_alpha".into(), alpha.into());
        a.insert("lora_dropout".into(), dropout.into());
        // find_target_linear_names: every Linear (and Embedding) whose name contains none of
        // the excluded spans; `visual` is excluded unless vision_lora.
        let excluded =
            exclude.as_ref().and_then(as_str).map(|s| python_str_list(&s)).unwrap_or_default();
        for span in ["lm_head", "embed_tokens"] {
            if !excluded.iter().any(|e| e == span) {
                t.unsupported(
                    "--lora_namespan_exclude",
                    exclude.as_ref().unwrap_or(&Value::from("[]")),
                    format!("without `{span}` excluded Qwen2-VL-Finetune adapts it too; ferrotune's LoRA adapts linear layers but lm_head (`modules_to_save: [{span}]` trains it in full instead)"),
                );
            }
        }
        let others: Vec<&String> = excluded
            .iter()
            .filter(|e| !["lm_head", "embed_tokens", "visual"].contains(&e.as_str()))
            .collect();
        if !others.is_empty() {
            t.unsupported(
                "--lora_namespan_exclude",
                exclude.as_ref().unwrap_or(&Value::Null),
                format!("spans {others:?} are not translated; write target_modules as a regex that leaves them out"),
            );
        }
        let targets =
            if vision_lora { "all-linear".to_string() } else { r".*\.layers\.\d+\..*".to_string() };
        a.insert("target_modules".into(), targets.into());
        if use_dora {
            a.insert("use_dora".into(), true.into());
        }
        t.set("adapter", Value::Mapping(a));
        t.set("vision.freeze_vision_tower", freeze_tower);
        t.set("vision.tune_merger", tune_merger);
        if let Some(v) = num_modules {
            if as_i64(&v).unwrap_or(-1) > 0 {
                t.unsupported("--num_lora_modules", &v, "the last N linear modules depend on the model's module list: name them in target_modules (a regex)");
            }
        }
        if !freeze_llm {
            t.note("Qwen2-VL-Finetune refuses --lora_enable without --freeze_llm True; the language model stays frozen under the adapter here");
        }
    } else {
        for (k, v) in [("vision_lora", vision_lora), ("use_dora", use_dora)] {
            if v {
                t.unsupported(
                    &format!("--{k}"),
                    &Value::from(true),
                    "read only with --lora_enable True",
                );
            }
        }
        if freeze_tower && freeze_llm && !tune_merger {
            bail!("--freeze_vision_tower, --freeze_llm and --freeze_merger leave nothing to train");
        }
        t.set("finetuning", "full");
        t.set("vision.freeze_vision_tower", freeze_tower);
        t.set("vision.tune_merger", tune_merger);
        if freeze_llm {
            t.set("vision.freeze_llm", true);
        }
    }
    if let Some(v) = bias {
        if as_str(&v).as_deref() != Some("none") {
            t.unsupported("--lora_bias", &v, "ferrotune's LoRA trains no biases (bias: none)");
        }
    }
    for (key, path) in [("vision_lr", "vision.vision_lr"), ("merger_lr", "vision.merger_lr")] {
        if let Some(v) = keys.take(key) {
            if let Some(x) = t.number(&format!("--{key}"), &v) {
                t.set(path, x);
            }
        }
    }
    for k in ["unfreeze_topk_llm", "unfreeze_topk_vision"] {
        if let Some(v) = keys.take(k) {
            if as_i64(&v).unwrap_or(0) != 0 {
                t.unsupported(&format!("--{k}"), &v, "use finetuning: freeze (freeze.trainable_layers) for the language model's last layers");
            }
        }
    }
    let bits = keys.take("bits").and_then(|v| as_i64(&v)).unwrap_or(16);
    let quant_type =
        keys.take("quant_type").and_then(|v| as_str(&v)).unwrap_or_else(|| "nf4".into());
    let double = keys.take("double_quant").and_then(|v| as_bool(&v)).unwrap_or(true);
    match bits {
        16 | 32 => {}
        4 if quant_type == "nf4" && lora => {
            let mut q = Mapping::new();
            q.insert("plugin".into(), "nf4".into());
            q.insert("double_quant".into(), double.into());
            t.set("quantization", Value::Mapping(q));
        }
        8 if lora => {
            let mut q = Mapping::new();
            q.insert("plugin".into(), "int8".into());
            t.set("quantization", Value::Mapping(q));
        }
        _ => t.unsupported(
            "--bits",
            &Value::from(bits),
            "ferrotune quantizes a LoRA run's base to nf4 (4) or int8 (8)",
        ),
    }

    // Data.
    let data =
        keys.take("data_path").and_then(|v| as_str(&v)).context("`--data_path` is required")?;
    t.set("data.plugin", "llava");
    t.set("data.path", t.path(&data));
    if let Some(v) = keys.take("image_folder").and_then(|v| as_str(&v)) {
        t.set("data.config.image_folder", t.path(&v));
    }
    let cutoff = keys.take("max_seq_length").and_then(|v| as_i64(&v)).unwrap_or(32768);
    t.set("data.cutoff_len", cutoff);
    t.media_keys(
        &mut keys,
        &[
            ("image_min_pixels", "data.image_min_pixels"),
            ("image_max_pixels", "data.image_max_pixels"),
            ("video_min_pixels", "data.video_min_pixels"),
            ("video_max_pixels", "data.video_max_pixels"),
            ("fps", "data.video_fps"),
            ("nframes", "data.video_nframes"),
        ],
    );
    // Qwen2-VL-Finetune's defaults where they differ from the model's processor.
    if t.get("data.image_min_pixels").is_none() {
        t.set("data.image_min_pixels", 3136);
    }
    for k in [
        "image_resized_width",
        "image_resized_height",
        "video_resized_width",
        "video_resized_height",
    ] {
        if let Some(v) = keys.take(k) {
            t.unsupported(
                &format!("--{k}"),
                &v,
                "ferrotune resizes within min/max pixels (smart_resize), not to a fixed size",
            );
        }
    }
    for k in ["eval_path", "eval_image_folder"] {
        if let Some(v) = keys.take(k) {
            t.unsupported(
                &format!("--{k}"),
                &v,
                "ferrotune evaluates on a held-out fraction of the training data (data.eval_ratio)",
            );
        }
    }
    t.hf_training_args(&mut keys, false)?;
    let mut tr = t.finish(keys, QVF_NO_EFFECT);
    // Report keys with the `--` they were written with.
    for u in &mut tr.untranslated {
        if !u.key.starts_with("--") && !u.key.contains(':') && u.key != "reward_funcs" {
            u.key = format!("--{}", u.key);
        }
    }
    tr.untranslated.iter_mut().for_each(|u| {
        if let Some((_, reason)) = HF_NO_EFFECT.iter().find(|(k, _)| format!("--{k}") == u.key) {
            u.no_effect = true;
            u.reason = reason.to_string();
        }
    });
    Ok(tr)
}

/// `"['lm_head', 'embed_tokens']"` (a Python list literal of strings) → its strings.
fn python_str_list(s: &str) -> Vec<String> {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|p| p.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ImportOptions {
        ImportOptions {
            cwd: PathBuf::from("/nonexistent-cwd"),
            absolute_paths: false,
            device: "cpu".into(),
        }
    }

    fn lf(yaml: &str) -> Result<Translation> {
        let Value::Mapping(m) = serde_yaml::from_str(yaml).unwrap() else { panic!() };
        translate_llamafactory(&m, &opts(), &[])
    }

    fn get<'a>(t: &'a Translation, path: &str) -> Option<&'a Value> {
        let mut v = t.config.get(path.split('.').next().unwrap())?;
        for p in path.split('.').skip(1) {
            v = v.as_mapping()?.get(p)?;
        }
        Some(v)
    }

    const SFT: &str = "model_name_or_path: Qwen/Qwen3-4B-Instruct-2507\ntrust_remote_code: true\n\
        stage: sft\ndo_train: true\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n\
        dataset: identity,alpaca_en_demo\ntemplate: qwen3_nothink\ncutoff_len: 2048\nmax_samples: 1000\n\
        output_dir: saves/x\nlogging_steps: 10\nsave_steps: 500\nplot_loss: true\n\
        per_device_train_batch_size: 1\ngradient_accumulation_steps: 8\nlearning_rate: 1.0e-4\n\
        num_train_epochs: 3.0\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nbf16: true\n\
        ddp_timeout: 180000000\nresume_from_checkpoint: null\nreport_to: none\n";

    #[test]
    fn the_lora_sft_example_maps_every_key() {
        let t = lf(SFT).unwrap();
        assert_eq!(get(&t, "model").unwrap(), "Qwen/Qwen3-4B-Instruct-2507");
        assert_eq!(get(&t, "adapter.r").unwrap(), 8);
        assert_eq!(
            get(&t, "adapter.lora_alpha").unwrap(),
            16.0,
            "LLaMA-Factory's default alpha is 2 × rank"
        );
        assert_eq!(get(&t, "adapter.target_modules").unwrap(), "all-linear");
        assert_eq!(get(&t, "objective.plugin").unwrap(), "sft");
        assert_eq!(
            get(&t, "data.datasets").unwrap(),
            &serde_yaml::from_str::<Value>("[identity, alpaca_en_demo]").unwrap()
        );
        assert_eq!(get(&t, "data.dataset_dir").unwrap(), "data");
        assert_eq!(get(&t, "data.max_samples").unwrap(), 1000);
        assert_eq!(get(&t, "training.micro_batch_size").unwrap(), 1);
        assert_eq!(get(&t, "training.gradient_accumulation_steps").unwrap(), 8);
        assert_eq!(get(&t, "training.epochs").unwrap(), 3);
        assert_eq!(get(&t, "training.logging_steps").unwrap(), 10);
        assert_eq!(get(&t, "training.gradient_checkpointing").unwrap(), &Value::Bool(true));
        assert_eq!(get(&t, "scheduler.type").unwrap(), "cosine");
        assert_eq!(get(&t, "scheduler.warmup_ratio").unwrap(), 0.1);
        assert_eq!(get(&t, "optimizer.lr").unwrap(), 1e-4);
        assert_eq!(get(&t, "dtype").unwrap(), "bf16");
        assert!(get(&t, "training.report_to").is_none());
        assert!(t.significant().is_empty(), "{:?}", t.significant());
        let skipped: Vec<&str> = t.untranslated.iter().map(|u| u.key.as_str()).collect();
        for k in ["trust_remote_code", "do_train", "template", "plot_loss", "ddp_timeout"] {
            assert!(skipped.contains(&k), "{k} is reported: {skipped:?}");
        }
        let keys: Vec<&str> = t.config.keys().map(|k| k.as_str().unwrap()).collect();
        assert_eq!(&keys[..3], ["model", "output_dir", "device"]);
    }

    #[test]
    fn transformers_defaults_are_written_where_ferrotune_differs() {
        let t =
            lf("model_name_or_path: meta-llama/Llama-3.2-1B\ndataset: a\noutput_dir: o\n").unwrap();
        assert_eq!(get(&t, "optimizer.lr").unwrap(), 5e-5);
        assert_eq!(get(&t, "scheduler.type").unwrap(), "linear");
        assert_eq!(get(&t, "training.micro_batch_size").unwrap(), 8);
        assert_eq!(get(&t, "training.epochs").unwrap(), 3);
        assert_eq!(get(&t, "training.save_steps").unwrap(), 500);
        assert_eq!(get(&t, "data.cutoff_len").unwrap(), 2048);
    }

    #[test]
    fn stages_and_preference_losses() {
        let base = "model_name_or_path: Qwen/Qwen2.5-7B\ndataset: d\noutput_dir: o\n";
        let t = lf(&format!("{base}stage: dpo\npref_beta: 0.2\npref_loss: ipo\n")).unwrap();
        assert_eq!(get(&t, "objective.plugin").unwrap(), "dpo");
        assert_eq!(get(&t, "objective.beta").unwrap(), 0.2);
        assert_eq!(get(&t, "objective.loss_type").unwrap(), "ipo");
        let t = lf(&format!("{base}stage: dpo\npref_loss: simpo\nsimpo_gamma: 1.0\n")).unwrap();
        assert_eq!(get(&t, "objective.plugin").unwrap(), "simpo");
        assert_eq!(get(&t, "objective.simpo_gamma").unwrap(), 1.0);
        let t = lf(&format!("{base}stage: dpo\npref_loss: bco_pair\n")).unwrap();
        assert_eq!(t.significant()[0].key, "pref_loss");
        let t = lf(&format!("{base}stage: kto\npref_beta: 0.1\nkto_chosen_weight: 2.0\n")).unwrap();
        assert_eq!(get(&t, "objective.plugin").unwrap(), "kto");
        assert_eq!(get(&t, "objective.desirable_weight").unwrap(), 2.0);
        let t = lf(&format!("{base}stage: rm\n")).unwrap();
        assert_eq!(get(&t, "objective.plugin").unwrap(), "reward_model");
        let t =
            lf(&format!("{base}stage: ppo\nreward_model: saves/rm\nmax_new_tokens: 64\n")).unwrap();
        assert_eq!(get(&t, "objective.plugin").unwrap(), "ppo");
        assert_eq!(get(&t, "objective.response_length").unwrap(), 64);
        let r = &get(&t, "rewards").unwrap().as_sequence().unwrap()[0];
        assert_eq!(r["adapter"], "saves/rm");
        let e = lf(&format!("{base}stage: pt\n")).unwrap_err();
        assert!(format!("{e:#}").contains("stage: pt"), "{e:#}");
        let e = lf(&format!("{base}stage: ppo\n")).unwrap_err();
        assert!(format!("{e:#}").contains("reward_model"), "{e:#}");
    }

    #[test]
    fn finetuning_types_quantization_and_lora_options() {
        let base =
            "model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct\ndataset: d\noutput_dir: o\n";
        let t = lf(&format!("{base}quantization_bit: 4\nuse_dora: true\nuse_rslora: true\npissa_init: true\npissa_iter: -1\nloraplus_lr_ratio: 16\nlora_target: q_proj,v_proj\nlora_alpha: 32\nlora_dropout: 0.05\n")).unwrap();
        assert_eq!(get(&t, "quantization.plugin").unwrap(), "nf4");
        assert_eq!(get(&t, "quantization.double_quant").unwrap(), &Value::Bool(true));
        assert_eq!(get(&t, "adapter.use_dora").unwrap(), &Value::Bool(true));
        assert_eq!(get(&t, "adapter.use_rslora").unwrap(), &Value::Bool(true));
        assert_eq!(get(&t, "adapter.init_lora_weights").unwrap(), "pissa");
        assert_eq!(get(&t, "adapter.loraplus_lr_ratio").unwrap(), 16.0);
        assert_eq!(get(&t, "adapter.lora_alpha").unwrap(), 32.0);
        assert_eq!(
            get(&t, "adapter.target_modules").unwrap(),
            &serde_yaml::from_str::<Value>("[q_proj, v_proj]").unwrap()
        );
        assert!(t.significant().is_empty(), "{:?}", t.significant());
        let t = lf(&format!("{base}quantization_bit: 8\n")).unwrap();
        assert_eq!(get(&t, "quantization.plugin").unwrap(), "int8");
        let t = lf(&format!("{base}quantization_bit: 3\n")).unwrap();
        assert_eq!(t.significant()[0].key, "quantization_bit");
        let t = lf(&format!("{base}finetuning_type: freeze\nfreeze_trainable_layers: 4\nfreeze_trainable_modules: mlp,self_attn\n")).unwrap();
        assert_eq!(get(&t, "finetuning").unwrap(), "freeze");
        assert_eq!(get(&t, "freeze.trainable_layers").unwrap(), 4);
        assert!(get(&t, "adapter").is_none());
        let t = lf(&format!("{base}finetuning_type: full\nfp16: true\n")).unwrap();
        assert_eq!(get(&t, "finetuning").unwrap(), "full");
        assert_eq!(t.significant()[0].key, "fp16");
    }

    #[test]
    fn vision_models_target_the_language_model_and_qwen3_vl_is_refused() {
        let base = "dataset: mllm_demo\noutput_dir: o\nimage_max_pixels: 262144\n";
        let t = lf(&format!("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\n{base}")).unwrap();
        let re = get(&t, "adapter.target_modules").unwrap().as_str().unwrap().to_string();
        let re = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
        assert!(re.is_match("model.language_model.layers.0.self_attn.q_proj"));
        assert!(re.is_match("model.language_model.layers.11.mlp.down_proj"));
        assert!(
            !re.is_match("model.visual.blocks.0.mlp.down_proj"),
            "Qwen2.5-VL's vision MLP shares names"
        );
        assert!(!re.is_match("model.visual.merger.mlp.0"));
        assert_eq!(get(&t, "data.image_max_pixels").unwrap(), 262144);
        let t = lf(&format!(
            "model_name_or_path: Qwen/Qwen2-VL-2B-Instruct\nfreeze_vision_tower: false\n{base}"
        ))
        .unwrap();
        let re = get(&t, "adapter.target_modules").unwrap().as_str().unwrap().to_string();
        let re = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
        assert!(
            re.is_match("model.visual.blocks.1.attn.qkv")
                && !re.is_match("model.visual.merger.mlp.2")
        );
        let t = lf(&format!("model_name_or_path: Qwen/Qwen2-VL-2B-Instruct\nfinetuning_type: full\nfreeze_multi_modal_projector: false\n{base}")).unwrap();
        assert_eq!(get(&t, "vision.freeze_vision_tower").unwrap(), &Value::Bool(true));
        assert_eq!(get(&t, "vision.tune_merger").unwrap(), &Value::Bool(true));
        let e = lf(&format!("model_name_or_path: Qwen/Qwen3-VL-4B-Instruct\n{base}")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("Qwen3-VL") && msg.contains("not a model family ferrotune trains"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported_with_reasons() {
        let t = lf("model_name_or_path: Qwen/Qwen2-7B\ndataset: d\noutput_dir: o\nfrobnicate: 3\nreport_to: [wandb, tensorboard]\nlr_scheduler_type: polynomial\nval_size: 0.1\nnum_train_epochs: 1.5\nresume_from_checkpoint: saves/x/checkpoint-10\n").unwrap();
        let sig: Vec<&str> = t.significant().iter().map(|u| u.key.as_str()).collect();
        assert_eq!(
            sig,
            ["num_train_epochs", "lr_scheduler_type", "report_to", "frobnicate"],
            "{:?}",
            t.untranslated
        );
        assert!(t.report().contains("frobnicate = 3: not a key"));
        assert_eq!(
            get(&t, "training.report_to").unwrap(),
            &serde_yaml::from_str::<Value>("[tensorboard]").unwrap()
        );
        assert_eq!(get(&t, "data.eval_ratio").unwrap(), 0.1);
        assert_eq!(get(&t, "training.epochs").unwrap(), 2);
        assert_eq!(t.resume.as_deref(), Some("saves/x/checkpoint-10"));
        assert!(lf("dataset: d\noutput_dir: o\n").is_err(), "model_name_or_path is required");
        assert!(lf("model_name_or_path: m\noutput_dir: o\n").is_err(), "dataset is required");
    }

    #[test]
    fn deepspeed_files_become_memory_sections() {
        let dir = std::env::temp_dir().join(format!("ferrotune-import-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("z3.json"), r#"{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, "bf16": {"enabled": "auto"}}"#).unwrap();
        std::fs::write(dir.join("z0.json"), r#"{"zero_optimization": {"stage": 0}}"#).unwrap();
        let Value::Mapping(m) = serde_yaml::from_str("model_name_or_path: m/llama\ndataset: d\noutput_dir: o\ndeepspeed: z3.json\nfinetuning_type: full\n").unwrap() else { panic!() };
        let t = translate_llamafactory(&m, &opts(), std::slice::from_ref(&dir)).unwrap();
        assert_eq!(
            get(&t, "memory").unwrap(),
            &serde_yaml::from_str::<Value>(
                "{plugin: zero, stage: 3, offload_optimizer: cpu, offload_param: cpu}"
            )
            .unwrap()
        );
        let Value::Mapping(m) = serde_yaml::from_str(
            "model_name_or_path: m/llama\ndataset: d\noutput_dir: o\ndeepspeed: z0.json\n",
        )
        .unwrap() else {
            panic!()
        };
        let t = translate_llamafactory(&m, &opts(), std::slice::from_ref(&dir)).unwrap();
        assert_eq!(get(&t, "memory.plugin").unwrap(), "ddp");
        let Value::Mapping(m) = serde_yaml::from_str(
            "model_name_or_path: m/llama\ndataset: d\noutput_dir: o\ndeepspeed: missing.json\n",
        )
        .unwrap() else {
            panic!()
        };
        let t = translate_llamafactory(&m, &opts(), std::slice::from_ref(&dir)).unwrap();
        assert_eq!(t.significant()[0].key, "deepspeed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shell_scripts_expand_variables_and_arithmetic() {
        let script = "#!/bin/bash\nMODEL_NAME=\"Qwen/Qwen2.5-VL-3B-Instruct\"\nGLOBAL_BATCH_SIZE=128\nBATCH_PER_DEVICE=4\nNUM_DEVICES=8\n\
            GRAD_ACCUM_STEPS=$((GLOBAL_BATCH_SIZE / (BATCH_PER_DEVICE * NUM_DEVICES)))\nexport PYTHONPATH=src:$PYTHONPATH\n\
            deepspeed src/train/train_sft.py \\\n    --lora_enable True \\\n    --lora_namespan_exclude \"['lm_head', 'embed_tokens']\" \\\n    --model_id $MODEL_NAME \\\n    --gradient_accumulation_steps $GRAD_ACCUM_STEPS \\\n    --image_max_pixels $((1280 * 28 * 28)) \\\n    --bf16";
        let cmd = parse_launch_script(script).unwrap();
        assert_eq!(cmd.script, "src/train/train_sft.py");
        let arg = |k: &str| cmd.args.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(arg("model_id"), Some("Qwen/Qwen2.5-VL-3B-Instruct"));
        assert_eq!(arg("gradient_accumulation_steps"), Some("4"));
        assert_eq!(arg("image_max_pixels"), Some("1003520"));
        assert_eq!(arg("lora_namespan_exclude"), Some("['lm_head', 'embed_tokens']"));
        assert_eq!(arg("bf16"), Some("True"));
        assert!(parse_launch_script("echo hi\n").is_err());
        assert!(parse_launch_script("X=$((1 / 0))\npython src/train/train_sft.py --a 1\n").is_err());
        assert!(parse_launch_script("python src/train/train_sft.py stray\n").is_err());
    }

    #[test]
    fn qwen_vl_finetune_modes() {
        let run = |args: &str| {
            let cmd = parse_launch_script(&format!("deepspeed src/train/train_sft.py --model_id Qwen/Qwen2-VL-2B-Instruct --data_path d.json --image_folder imgs --output_dir out {args}")).unwrap();
            translate_qwen_vl_finetune(&cmd, &opts(), &[]).unwrap()
        };
        let t = run("--lora_enable True --vision_lora True --freeze_vision_tower True --freeze_llm True --freeze_merger True --lora_namespan_exclude \"['lm_head', 'embed_tokens']\" --lora_rank 64 --lora_alpha 64 --learning_rate 2e-4");
        assert_eq!(get(&t, "finetuning").unwrap(), "adapter");
        assert_eq!(get(&t, "adapter.target_modules").unwrap(), "all-linear");
        assert_eq!(get(&t, "adapter.lora_alpha").unwrap(), 64.0);
        assert_eq!(get(&t, "vision.tune_merger").unwrap(), &Value::Bool(false));
        assert_eq!(get(&t, "data.plugin").unwrap(), "llava");
        assert_eq!(get(&t, "data.config.image_folder").unwrap(), "imgs");
        assert!(t.significant().is_empty(), "{:?}", t.significant());
        let t = run("--freeze_vision_tower False --freeze_llm False --freeze_merger False --vision_lr 2e-6 --merger_lr 1e-5");
        assert_eq!(get(&t, "finetuning").unwrap(), "full");
        assert_eq!(get(&t, "vision.freeze_vision_tower").unwrap(), &Value::Bool(false));
        assert_eq!(get(&t, "vision.tune_merger").unwrap(), &Value::Bool(true));
        assert_eq!(get(&t, "vision.vision_lr").unwrap(), 2e-6);
        let t = run("--lora_enable True --freeze_llm True");
        assert_eq!(
            t.significant().len(),
            2,
            "lm_head and embed_tokens not excluded: {:?}",
            t.untranslated
        );
        let t = run("--lora_enable True --freeze_llm True --lora_namespan_exclude \"['lm_head', 'embed_tokens']\" --num_lora_modules 8 --image_resized_width 448");
        let sig: Vec<&str> = t.significant().iter().map(|u| u.key.as_str()).collect();
        assert_eq!(sig, ["--num_lora_modules", "--image_resized_width"]);
    }
}
