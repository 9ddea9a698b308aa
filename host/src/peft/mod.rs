//! PEFT adapter directories, as peft 0.21 writes and reads them: `adapter_config.json` (the
//! method's configuration) and `adapter_model.safetensors` (the adapter's tensors under peft's
//! keys, `base_model.model.<module>.lora_A.weight`, and the modules of `modules_to_save` as
//! `base_model.model.<module>.weight`).
//!
//! Loading maps a peft configuration onto an adapter plugin through [`PEFT_METHODS`], one row
//! per `peft_type`: the keys the plugin implements are passed on; the informational keys
//! ([`INFORMATIONAL_KEYS`]), keys set to null and keys at peft's default value are ignored;
//! any other key is refused by name. An adapter is never loaded with part of its configuration
//! silently dropped. Adding a method is one row here plus its plugin (the row also says which
//! tensors a saved adapter holds per layer, so a directory is checked against the model from
//! its config and safetensors header before anything is allocated).
//!
//! A method peft does not have (a third-party plugin, built without touching the host) needs
//! no row: the `adapter_config.json` its plugin writes names the plugin under
//! [`PLUGIN_KEY`] and gives a `peft_type` outside [`PEFT_METHODS`]. Its configuration goes to
//! that plugin as written (the informational keys and [`PLUGIN_KEY`] taken out; the plugin
//! validates its own keys), and the saved tensors are checked by name and shape against the
//! layers the plugin builds from that configuration (`load_adapter_state_dict`) before any is
//! copied in. The name only selects among the adapter plugins already on the plugin path:
//! nothing in a configuration makes the host open a library.
pub mod adapters;
pub mod merge;
mod methods;
mod model;
pub mod non_lora;
pub mod quant;

pub use methods::PEFT_METHODS;
pub use model::PeftModel;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use tch::Device;

use crate::peft::adapters::{AttachReport, LayerTensors, DEFAULT_ADAPTER};
use crate::plugins::Registry;

/// The configuration file of a PEFT directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The tensors of a PEFT directory.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Keys every peft configuration carries that describe the file or the run, not the adapter's
/// function; ignored on load. (`peft_type` picks the plugin.)
pub const INFORMATIONAL_KEYS: [&str; 7] = [
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "auto_mapping",
    "peft_version",
];

/// The `adapter_config.json` key naming the adapter plugin of a method outside
/// [`PEFT_METHODS`] (see the module docs). peft ignores keys it does not know, but cannot load
/// such a method anyway (its `peft_type` is not peft's).
pub const PLUGIN_KEY: &str = "ferrotune_plugin";

/// How one peft method maps onto an adapter plugin.
pub struct PeftMethod {
    /// peft's `peft_type` (`LORA`).
    pub peft_type: &'static str,
    /// The adapter plugin that implements it.
    pub plugin: &'static str,
    /// The configuration keys the plugin implements (passed on as they are).
    pub keys: &'static [&'static str],
    /// Keys with peft's default value (JSON), ignored at that value. A key the plugin does
    /// not implement is refused at any other value. A null value is always ignored (peft's
    /// "not set").
    pub defaults: &'static [(&'static str, &'static str)],
    /// Adjusts the plugin configuration for loading saved weights.
    pub for_loading: fn(&mut Map<String, Value>),
    /// The tensors a saved adapter holds for one adapted layer, from the plugin's
    /// `peft_config()` and the layer's `[out, in]`: checked against the file's header before
    /// anything is allocated (the rank within the layer's widths, every shape).
    pub layer_tensors: LayerTensors,
    /// The configuration keys the shapes follow from (named when they disagree).
    pub shape_keys: &'static [&'static str],
}

/// A peft configuration mapped onto an adapter plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub plugin: String,
    /// The row of [`PEFT_METHODS`] it was mapped through (its `peft_type`), or `None` for a
    /// method named by [`PLUGIN_KEY`].
    pub peft_type: Option<&'static str>,
    pub config_json: String,
    /// Keys ignored (informational, null or at peft's default).
    pub ignored: Vec<String>,
}

/// Equal JSON values, numbers compared by value (`16` = `16.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Maps an `adapter_config.json` (read from `path`, named in errors) onto its plugin's
/// configuration for loading saved weights (see the module docs).
pub fn plugin_config(config: &Value, path: &Path) -> Result<PluginConfig> {
    let obj = config
        .as_object()
        .with_context(|| format!("{}: expected a JSON object, got {config}", path.display()))?;
    let supported = || {
        PEFT_METHODS
            .iter()
            .map(|m| format!("{} (plugin `{}`)", m.peft_type, m.plugin))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let peft_type = match obj.get("peft_type") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => bail!("{}: key `peft_type` must be a string, got {other}", path.display()),
        None => bail!(
            "{}: key `peft_type` is missing; peft writes it (supported: {})",
            path.display(),
            supported()
        ),
    };
    let named = match obj.get(PLUGIN_KEY) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.as_str()),
        Some(other) => bail!(
            "{}: key `{PLUGIN_KEY}` must be the name of an adapter plugin, got {other}",
            path.display()
        ),
    };
    let row = PEFT_METHODS.iter().find(|m| m.peft_type == peft_type);
    let method = match (row, named) {
        (Some(m), Some(p)) if p != m.plugin => bail!(
            "{}: key `{PLUGIN_KEY}` = \"{p}\" disagrees with `peft_type` = \"{peft_type}\", which plugin `{}` implements; \
             a peft method is loaded by its `peft_type` (drop `{PLUGIN_KEY}`), another method by its plugin with a `peft_type` \
             peft does not have",
            path.display(),
            m.plugin
        ),
        (Some(m), _) => m,
        (None, Some(plugin)) => {
            if let Some(m) = PEFT_METHODS.iter().find(|m| m.plugin == plugin) {
                bail!(
                    "{}: key `{PLUGIN_KEY}` = \"{plugin}\" names the plugin of peft_type {}, but `peft_type` = \"{peft_type}\"",
                    path.display(),
                    m.peft_type
                );
            }
            return Ok(plugin_named_config(obj, plugin));
        }
        (None, None) => bail!(
            "{}: key `peft_type` = \"{peft_type}\": no adapter plugin implements it (supported: {}; a method outside peft's \
             names its adapter plugin in key `{PLUGIN_KEY}`)",
            path.display(),
            supported()
        ),
    };
    let mut pass = Map::new();
    let mut ignored = Vec::new();
    let mut refused = Vec::new();
    for (key, value) in obj {
        let at_default = || {
            method.defaults.iter().any(|(k, d)| {
                k == key && serde_json::from_str::<Value>(d).is_ok_and(|d| json_eq(&d, value))
            })
        };
        if INFORMATIONAL_KEYS.contains(&key.as_str()) || value.is_null() || at_default() {
            ignored.push(key.clone());
        } else if key == PLUGIN_KEY {
            // agrees with the row (checked above)
        } else if method.keys.contains(&key.as_str()) {
            pass.insert(key.clone(), value.clone());
        } else {
            refused.push(format!("`{key}` = {value}"));
        }
    }
    ignored.extend(named.map(|_| PLUGIN_KEY.to_string()));
    if !refused.is_empty() {
        bail!(
            "{}: {} not supported by adapter plugin `{}` (peft_type {peft_type}); loading without {} would give a different \
             adapter than peft's. Supported keys: {}; other keys are accepted only at peft's default value or null",
            path.display(),
            if refused.len() == 1 { format!("key {} is", refused[0]) } else { format!("keys {} are", refused.join(", ")) },
            method.plugin,
            if refused.len() == 1 { "it" } else { "them" },
            method.keys.join(", ")
        );
    }
    (method.for_loading)(&mut pass);
    Ok(PluginConfig {
        plugin: method.plugin.to_string(),
        peft_type: Some(method.peft_type),
        config_json: Value::Object(pass).to_string(),
        ignored,
    })
}

/// The configuration of a method outside [`PEFT_METHODS`], for the plugin `plugin` its
/// [`PLUGIN_KEY`] names: every key as written but the informational ones and [`PLUGIN_KEY`].
fn plugin_named_config(obj: &Map<String, Value>, plugin: &str) -> PluginConfig {
    let (ignored, pass): (Vec<_>, Vec<_>) =
        obj.iter().partition(|(k, _)| INFORMATIONAL_KEYS.contains(&k.as_str()) || *k == PLUGIN_KEY);
    PluginConfig {
        plugin: plugin.to_string(),
        peft_type: None,
        config_json: Value::Object(pass.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .to_string(),
        ignored: ignored.into_iter().map(|(k, _)| k.clone()).collect(),
    }
}

/// Refuses a tensor of the header of `weights` that is not floating point, by name (adapter
/// tensors are F32, BF16, F16 or F64).
pub(crate) fn refuse_non_float(
    header: &[crate::util::safetensors::HeaderEntry],
    weights: &Path,
) -> Result<()> {
    if let Some(e) = header.iter().find(|e| !e.kind.is_some_and(crate::util::safetensors::is_float))
    {
        bail!(
            "{}: tensor `{}` has dtype `{}`; adapter tensors are floating point (F32, BF16, F16 or F64)",
            weights.display(),
            e.key,
            e.dtype_name
        );
    }
    Ok(())
}

/// The two files of the PEFT directory `dir`, checked to exist; errors say what is there.
pub fn adapter_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    if !dir.is_dir() {
        bail!("adapter directory {} does not exist (a PEFT directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})", dir.display());
    }
    let holds = || {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        if names.is_empty() {
            "nothing".into()
        } else {
            names.join(", ")
        }
    };
    let config = dir.join(ADAPTER_CONFIG);
    if !config.is_file() {
        bail!(
            "{} has no {ADAPTER_CONFIG}: not a PEFT adapter directory (it holds {})",
            dir.display(),
            holds()
        );
    }
    let weights = dir.join(ADAPTER_WEIGHTS);
    if !weights.is_file() {
        let hint = if dir.join("adapter_model.bin").exists() {
            " (adapter_model.bin is not read: re-save it with peft's save_pretrained(safe_serialization=True))"
        } else {
            ""
        };
        bail!("{} has no {ADAPTER_WEIGHTS}{hint}; it holds {}", dir.display(), holds());
    }
    Ok((config, weights))
}

/// Refuses to write `tensors` to `file` when one holds NaN or Inf, naming each such tensor
/// (up to four) with its counts. Checked before anything is written.
pub fn refuse_non_finite(tensors: &[(String, tch::Tensor)], file: &Path) -> Result<()> {
    let mut bad = Vec::new();
    for (key, t) in tensors {
        if let Some(counts) = crate::util::safetensors::non_finite_counts(t)? {
            bad.push(format!(
                "`{key}` {}",
                crate::util::safetensors::describe_non_finite(counts, t.numel())
            ));
        }
    }
    if !bad.is_empty() {
        let shown = bad.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
        let more = if bad.len() > 4 {
            format!(", … ({} tensors in all)", bad.len())
        } else {
            String::new()
        };
        bail!(
            "refusing to write {}: {} tensor(s) hold non-finite values: {shown}{more}; nothing was written (the run \
             diverged: lower the learning rate, check optimizer.eps and the data)",
            file.display(),
            bad.len()
        );
    }
    Ok(())
}

/// Reads and parses `adapter_config.json`.
pub fn read_adapter_config(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

impl PeftModel {
    /// Writes the active adapter as a PEFT directory peft loads (`PeftModel.from_pretrained`):
    /// `adapter_config.json` (the plugin's `peft_config()`, `base_model_name_or_path` set to the
    /// model directory when known) and `adapter_model.safetensors` (contiguous CPU tensors in
    /// the adapter's dtype: float32 unless the adapter itself is bf16; the copies of
    /// `modules_to_save` in the model's dtype, as peft saves them). A tensor holding NaN or Inf
    /// is refused by name before anything is written. Each file is written atomically; `dir`
    /// is created (and removed again when a write fails).
    pub fn save_peft_adapter(&self, dir: &Path) -> Result<()> {
        let mut config = self.adapter_peft_config()?;
        if let (Some(obj), Some(src)) = (config.as_object_mut(), self.source_dir()) {
            let src = src.canonicalize().unwrap_or_else(|_| src.to_path_buf());
            obj.insert("base_model_name_or_path".into(), Value::String(src.display().to_string()));
        }
        let tensors = self
            .adapter_state_dict()?
            .into_iter()
            .map(|(k, t)| Ok((k, t.f_to_device(Device::Cpu)?.f_contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        refuse_non_finite(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
        let created = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let written = crate::util::atomic::write_with(&dir.join(ADAPTER_WEIGHTS), |tmp| {
            crate::util::safetensors::write(tmp, &tensors)
        })
        .and_then(|()| {
            crate::util::atomic::write(
                &dir.join(ADAPTER_CONFIG),
                serde_json::to_string_pretty(&config)? + "\n",
            )
        });
        if let Err(e) = written {
            if created {
                // Nothing half-written stays behind: the folder was ours.
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(e);
        }
        tracing::info!("saved adapter ({} tensors) to {}", tensors.len(), dir.display());
        Ok(())
    }

    /// Loads the PEFT directory `dir` (ours or one peft wrote) as adapter `default` and makes it
    /// active: the plugin comes from `peft_type` ([`PEFT_METHODS`]), its configuration from
    /// `adapter_config.json` ([`plugin_config`]; unsupported keys are refused by name). Before
    /// a byte of the weights is read or an adapter tensor created, the configuration is checked
    /// against the model (LoRA's `r` within each targeted layer's widths, every
    /// `target_modules` name matching a layer) and the safetensors header against what the
    /// configuration implies (missing, unexpected, mis-shaped or non-float tensors are refused
    /// by name); then each tensor is read and refused by name if it holds NaN or Inf. On any
    /// error the model is left as it was.
    pub fn load_peft_adapter(&mut self, dir: &Path, registry: &Registry) -> Result<AttachReport> {
        self.load_peft_adapter_as(dir, registry, DEFAULT_ADAPTER)
    }

    /// [`PeftModel::load_peft_adapter`] under the adapter name `name` (`serve` holds many).
    /// A sequence-classification adapter (a reward model's, peft's `SEQ_CLS` task) is refused
    /// on a model without a score head: it scores, it does not generate
    /// ([`PeftModel::load_reward_adapter`] loads one).
    pub fn load_peft_adapter_as(
        &mut self,
        dir: &Path,
        registry: &Registry,
        name: &str,
    ) -> Result<AttachReport> {
        self.load_adapter_dir(dir, registry, name, false)
    }

    /// Loads a reward model's adapter (peft's `SEQ_CLS` task, what `objective: reward_model`
    /// saves; any other adapter too) as adapter `default`: the model gets the score head the
    /// adapter trains a copy of (`merge` writes a sequence classifier from it).
    pub fn load_reward_adapter(&mut self, dir: &Path, registry: &Registry) -> Result<AttachReport> {
        self.load_adapter_dir(dir, registry, DEFAULT_ADAPTER, true)
    }

    fn load_adapter_dir(
        &mut self,
        dir: &Path,
        registry: &Registry,
        name: &str,
        scores: bool,
    ) -> Result<AttachReport> {
        let (config_path, weights_path) = adapter_files(dir)?;
        let raw = read_adapter_config(&config_path)?;
        // A reward model's adapter (peft's SEQ_CLS task) trains a copy of the score head: the
        // model gets one first (its values are the adapter's), and loses it again on error.
        let seq_cls = raw.get("task_type").and_then(Value::as_str) == Some(adapters::SEQ_CLS_TASK);
        if seq_cls && self.score_head().is_none() && !scores {
            bail!(
                "{}: a sequence-classification adapter (task_type SEQ_CLS: a reward model) scores sequences and does not \
                 generate; use it as a reward (`rewards: [{{model: BASE, adapter: DIR}}]`) or merge it into a \
                 sequence-classification model (`ferrotune merge`)",
                config_path.display()
            );
        }
        if seq_cls && self.score_head().is_none() && !self.adapter_names().is_empty() {
            bail!(
                "{}: a sequence-classification adapter (task_type SEQ_CLS: a reward model) cannot join the adapters already \
                 attached ({}) to a causal language model",
                config_path.display(),
                self.adapter_names().join(", ")
            );
        }
        let added_head = seq_cls && self.base.add_score_head()?;
        let loaded =
            self.load_mapped_adapter(&raw, &config_path, &weights_path, dir, registry, name);
        if loaded.is_err() && added_head {
            self.base.remove_score_head();
        }
        loaded
    }

    fn load_mapped_adapter(
        &mut self,
        raw: &Value,
        config_path: &Path,
        weights_path: &Path,
        dir: &Path,
        registry: &Registry,
        name: &str,
    ) -> Result<AttachReport> {
        let (config_path, weights_path) = (config_path.to_path_buf(), weights_path.to_path_buf());
        let mapped = plugin_config(raw, &config_path)?;
        tracing::debug!(
            "{}: plugin `{}` with {} (ignored keys: {})",
            config_path.display(),
            mapped.plugin,
            mapped.config_json,
            mapped.ignored.join(", ")
        );
        let method = registry
            .adapter(&mapped.plugin, &mapped.config_json)
            .with_context(|| format!("{}", config_path.display()))?;
        let header = crate::util::safetensors::read_header(&weights_path)?;
        match mapped.peft_type.and_then(|t| PEFT_METHODS.iter().find(|m| m.peft_type == t)) {
            // A peft method: everything is checked against the model before a byte of the
            // weights is read or an adapter tensor is created: the configuration, then the
            // header's names, dtypes, shapes.
            Some(row) => {
                self.check_saved_adapter(name, &method, row, &config_path, &weights_path, &header)?
            }
            // A method named by its plugin: the host knows its tensors only from the layers the
            // plugin builds (sized by its configuration, not by the file), so names and shapes
            // are checked by `load_adapter_state_dict` below, before any tensor is copied in.
            None => refuse_non_float(&header, &weights_path)?,
        }
        let tensors = header
            .iter()
            .map(|e| {
                let t = crate::util::safetensors::read_tensor(&weights_path, e)?;
                if let Some(counts) = crate::util::safetensors::non_finite_counts(&t)? {
                    bail!(
                        "tensor `{}` in {} {}: refusing a non-finite adapter (saved from a diverged run?)",
                        e.key,
                        weights_path.display(),
                        crate::util::safetensors::describe_non_finite(counts, t.numel())
                    );
                }
                Ok((e.key.clone(), t))
            })
            .collect::<Result<Vec<_>>>()?;
        let before = self.active_adapter().map(str::to_string);
        let (report, originals) = self
            .attach_keeping_originals(name, Box::new(method))
            .with_context(|| format!("attaching the adapter of {}", dir.display()))?;
        self.set_active_adapter(Some(name))?;
        if let Err(e) = self.load_adapter_state_dict(tensors) {
            self.detach_fresh_adapter(name, originals);
            self.set_active_adapter(before.as_deref())?;
            return Err(e.context(format!("loading {}", weights_path.display())));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Result<PluginConfig> {
        plugin_config(&v, Path::new("a/adapter_config.json"))
    }

    /// What peft 0.21.2's `LoraConfig(r=4, target_modules=["q_proj", "v_proj"]).to_dict()` holds.
    fn peft_written() -> Value {
        json!({
            "task_type": "CAUSAL_LM", "peft_type": "LORA", "auto_mapping": null, "peft_version": "0.21.2",
            "base_model_name_or_path": "/m", "revision": null, "inference_mode": true, "r": 4,
            "target_modules": ["v_proj", "q_proj"], "exclude_modules": null, "lora_alpha": 8, "lora_dropout": 0.0,
            "fan_in_fan_out": false, "bias": "none", "use_rslora": false, "modules_to_save": null,
            "init_lora_weights": true, "layers_to_transform": null, "layers_pattern": null, "rank_pattern": {},
            "alpha_pattern": {}, "megatron_config": null, "megatron_core": "megatron.core",
            "trainable_token_indices": null, "loftq_config": {}, "eva_config": null, "corda_config": null,
            "lora_ga_config": null, "use_dora": false, "velora_config": null, "alora_invocation_tokens": null,
            "use_qalora": false, "qalora_group_size": 16, "monteclora_config": null, "layer_replication": null,
            "lora_bias": false, "target_parameters": null, "use_bdlora": null, "arrow_config": null,
            "kasa_config": null, "ensure_weight_tying": false
        })
    }

    #[test]
    fn a_peft_lora_config_maps_onto_the_plugin() {
        let m = map(peft_written()).unwrap();
        assert_eq!(m.plugin, "lora");
        let c: Value = serde_json::from_str(&m.config_json).unwrap();
        assert_eq!(
            c,
            json!({"r": 4, "target_modules": ["v_proj", "q_proj"], "lora_alpha": 8, "lora_dropout": 0.0, "fan_in_fan_out": false,
                   "bias": "none", "use_rslora": false, "init_lora_weights": true, "use_dora": false})
        );
        for k in [
            "peft_version",
            "task_type",
            "rank_pattern",
            "qalora_group_size",
            "layers_to_transform",
            "modules_to_save",
        ] {
            assert!(m.ignored.contains(&k.to_string()), "{k} ignored");
        }
        // a list reaches the plugin, whose peft_config() states it for the host (adapters.rs)
        let mut v = peft_written();
        v["modules_to_save"] = json!(["lm_head", "embed_tokens"]);
        let c: Value = serde_json::from_str(&map(v).unwrap().config_json).unwrap();
        assert_eq!(c["modules_to_save"], json!(["lm_head", "embed_tokens"]));
    }

    #[test]
    fn unsupported_keys_are_refused_by_name() {
        let mut v = peft_written();
        v["rank_pattern"] = json!({"q_proj": 8});
        v["layers_to_transform"] = json!([0]);
        let e = map(v).unwrap_err().to_string();
        assert!(e.contains("a/adapter_config.json"), "{e}");
        assert!(e.contains(r#"keys `layers_to_transform` = [0], `rank_pattern` = {"q_proj":8} are not supported by adapter plugin `lora`"#), "{e}");
        let mut v = peft_written();
        v["use_qalora"] = json!(true);
        assert!(map(v).unwrap_err().to_string().contains("key `use_qalora` = true is"));
        let mut v = peft_written();
        v["qalora_group_size"] = json!(16.0);
        assert!(map(v).is_ok(), "16.0 is peft's default 16");
        let mut v = peft_written();
        v["brand_new_key"] = json!(null);
        assert!(map(v).is_ok(), "null means not set");
    }

    /// What peft 0.21.2's `IA3Config(target_modules=[...], feedforward_modules=["down_proj"],
    /// init_ia3_weights=False)` writes maps onto the `ia3` plugin (saved vectors replace the
    /// random init), an unsupported key is refused by name, and the saved vector's shape
    /// follows `feedforward_modules`.
    #[test]
    fn ia3_configs_map_onto_the_ia3_plugin() {
        let v = json!({
            "task_type": "CAUSAL_LM", "peft_type": "IA3", "auto_mapping": null, "peft_version": "0.21.2",
            "base_model_name_or_path": "/m", "revision": null, "inference_mode": true,
            "target_modules": ["q_proj", "down_proj"], "exclude_modules": null,
            "feedforward_modules": ["down_proj"], "fan_in_fan_out": false, "modules_to_save": null,
            "init_ia3_weights": false, "layers_to_transform": null, "layers_pattern": null
        });
        let m = map(v.clone()).unwrap();
        assert_eq!(m.plugin, "ia3");
        let c: Value = serde_json::from_str(&m.config_json).unwrap();
        assert_eq!(c["init_ia3_weights"], json!(true));
        assert_eq!(c["feedforward_modules"], json!(["down_proj"]));
        let mut bad = v.clone();
        bad["layers_to_transform"] = json!([0]);
        let e = map(bad).unwrap_err().to_string();
        assert!(e.contains("`layers_to_transform` = [0]") && e.contains("`ia3`"), "{e}");
        let shape = |c: Value, m: &str| {
            methods::ia3::ia3_layer_tensors(&c, m, 32, 176).map(|t| t[0].1.clone())
        };
        let down = "model.layers.0.mlp.down_proj";
        assert_eq!(shape(c.clone(), down), Ok(vec![1, 176]));
        assert_eq!(shape(c, "model.layers.0.self_attn.q_proj"), Ok(vec![32, 1]));
        assert_eq!(shape(json!({"feedforward_modules": ".*mlp\\..*"}), down), Ok(vec![1, 176]));
        let e = shape(json!({"feedforward_modules": "mlp("}), down).unwrap_err();
        assert!(e.contains("`feedforward_modules`"), "{e}");
    }

    #[test]
    fn peft_type_must_name_a_method() {
        let e = map(json!({"r": 4})).unwrap_err().to_string();
        assert!(e.contains("`peft_type` is missing") && e.contains("LORA"), "{e}");
        let e = map(json!({"peft_type": "BOFT"})).unwrap_err().to_string();
        assert!(
            e.contains("`peft_type` = \"BOFT\"")
                && e.contains("LORA (plugin `lora`)")
                && e.contains("IA3 (plugin `ia3`)"),
            "{e}"
        );
        assert!(map(json!([1])).unwrap_err().to_string().contains("expected a JSON object"));
    }

    /// A method outside PEFT_METHODS is routed to the plugin its config names, with its keys as
    /// written (the plugin validates them); a name that disagrees with a peft_type is refused.
    #[test]
    fn a_config_naming_its_plugin_goes_to_that_plugin_as_written() {
        let v = json!({
            "peft_type": "EXTERNAL_SCALE", "ferrotune_plugin": "external-scale", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "/m", "inference_mode": true, "target_modules": ["o_proj"],
            "shift": true, "anything": null
        });
        let m = map(v).unwrap();
        assert_eq!((m.plugin.as_str(), m.peft_type), ("external-scale", None));
        let c: Value = serde_json::from_str(&m.config_json).unwrap();
        assert_eq!(c, json!({"target_modules": ["o_proj"], "shift": true, "anything": null}));
        assert!(
            m.ignored.contains(&PLUGIN_KEY.to_string()) && m.ignored.contains(&"peft_type".into())
        );
        // a peft method may carry its own plugin's name, not another's
        let mut lora = peft_written();
        lora[PLUGIN_KEY] = json!("lora");
        assert_eq!(map(lora.clone()).unwrap().peft_type, Some("LORA"));
        lora[PLUGIN_KEY] = json!("external-scale");
        let e = map(lora).unwrap_err().to_string();
        assert!(
            e.contains(
                "`ferrotune_plugin` = \"external-scale\" disagrees with `peft_type` = \"LORA\""
            ),
            "{e}"
        );
        let e = map(json!({"peft_type": "X", "ferrotune_plugin": "ia3"})).unwrap_err().to_string();
        assert!(e.contains("names the plugin of peft_type IA3"), "{e}");
        for bad in [json!(""), json!(3), json!(["a"])] {
            let e =
                map(json!({"peft_type": "X", "ferrotune_plugin": bad})).unwrap_err().to_string();
            assert!(
                e.contains("key `ferrotune_plugin` must be the name of an adapter plugin"),
                "{e}"
            );
        }
        let e = map(json!({"peft_type": "X"})).unwrap_err().to_string();
        assert!(e.contains("names its adapter plugin in key `ferrotune_plugin`"), "{e}");
    }

    /// A plugin name that looks like a path is only ever looked up among loaded plugins.
    #[test]
    fn a_plugin_name_never_opens_a_library() {
        let dir = std::env::temp_dir().join(format!("ferrotune-peft-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lib = dir.join("libevil.so");
        std::fs::write(&lib, "not a library").unwrap();
        let m =
            map(json!({"peft_type": "X", "ferrotune_plugin": lib.display().to_string()})).unwrap();
        let registry = Registry::discover(&crate::plugins::SearchPath::new(&[], None, false));
        let e = registry.adapter(&m.plugin, &m.config_json).err().unwrap().to_string();
        assert!(
            e.contains(&lib.display().to_string())
                && registry.libraries.is_empty()
                && registry.refused.is_empty(),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn random_inits_become_the_default_and_deterministic_ones_stay() {
        let init = |v: Value| {
            let c: Value = serde_json::from_str(
                &map(json!({"peft_type": "LORA", "init_lora_weights": v})).unwrap().config_json,
            )
            .unwrap();
            c["init_lora_weights"].clone()
        };
        assert_eq!(init(json!(false)), json!(true));
        assert_eq!(init(json!("gaussian")), json!(true));
        assert_eq!(init(json!("pissa")), json!("pissa"));
        assert_eq!(init(json!("olora")), json!("olora"));
        let c: Value =
            serde_json::from_str(&map(json!({"peft_type": "LORA"})).unwrap().config_json).unwrap();
        assert_eq!(c, json!({"init_lora_weights": true}));
    }

    #[test]
    fn missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("ferrotune-peft-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(adapter_files(&dir).unwrap_err().to_string().contains("does not exist"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("README.md"), "").unwrap();
        let e = adapter_files(&dir).unwrap_err().to_string();
        assert!(e.contains("has no adapter_config.json") && e.contains("README.md"), "{e}");
        std::fs::write(dir.join(ADAPTER_CONFIG), "{}").unwrap();
        std::fs::write(dir.join("adapter_model.bin"), "").unwrap();
        let e = adapter_files(&dir).unwrap_err().to_string();
        assert!(
            e.contains("has no adapter_model.safetensors")
                && e.contains("adapter_model.bin is not read"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_non_finite_adapter_is_never_saved() {
        use crate::peft::adapters::tests::{additive, tiny_model};
        let mut m = tiny_model(true);
        m.attach_adapter("default", additive(&["q_proj", "v_proj"])).unwrap();
        let state: Vec<_> = m
            .adapter_state_dict()
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                if k.contains("v_proj") {
                    let _ = t.get(0).get(1).fill_(f64::NAN);
                    let _ = t.get(2).get(3).fill_(f64::INFINITY);
                }
                (k, t)
            })
            .collect();
        m.load_adapter_state_dict(state).unwrap();
        let dir = std::env::temp_dir().join(format!("ferrotune-peft-nan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = m.save_peft_adapter(&dir.join("adapter")).unwrap_err().to_string();
        assert!(
            e.contains("adapter_model.safetensors")
                && e.contains("`base_model.model.model.layers.0.self_attn.v_proj.delta` holds 1 NaN and 1 infinite value(s) of 32")
                && !e.contains("q_proj"),
            "{e}"
        );
        assert!(!dir.exists(), "nothing written, not even the folder");
    }

    #[test]
    fn save_writes_peft_keys_and_config() {
        use crate::peft::adapters::tests::{additive, tiny_model};
        let mut m = tiny_model(true);
        m.attach_adapter("default", additive(&["q_proj", "v_proj"])).unwrap();
        let dir = std::env::temp_dir().join(format!("ferrotune-peft-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        m.save_peft_adapter(&dir).unwrap();
        let config = read_adapter_config(&dir.join(ADAPTER_CONFIG)).unwrap();
        assert_eq!(config["peft_type"], "ADDITIVE");
        let saved = crate::util::safetensors::read(&dir.join(ADAPTER_WEIGHTS)).unwrap();
        let keys: Vec<_> = saved
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            keys,
            vec![
                "base_model.model.model.layers.0.self_attn.q_proj.delta",
                "base_model.model.model.layers.0.self_attn.v_proj.delta"
            ]
        );
        assert!(
            std::fs::read_dir(&dir).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')),
            "no temporary left"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
