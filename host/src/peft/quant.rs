//! Quantized base weights (QLoRA): which linear layers a quantizer plugin stores, the
//! `quantization.json` record a run leaves beside its adapter (so that `generate --adapter`
//! and `merge` rebuild the same model), and the merge of a quantized run with its error.
//!
//! Which layers: those the adapter targets, minus `skip_modules` (default: the vision tower
//! `visual` and `lm_head`, as Qwen2-VL-Finetune's QLoRA leaves them). When: before the adapter
//! is attached, so that adapters see the quantized base (peft on a bitsandbytes model: DoRA's
//! magnitude is the norm of the dequantized weight); except for initialisations that rewrite
//! the base (PiSSA, OLoRA, LoftQ), which start from the full-precision weight and whose
//! rewritten base (the residual; LoftQ's Q) is then quantized. LoftQ's Q is re-quantized
//! without loss when the quantizer uses the same NF4 blocks without double quantization
//! (each block's absmax is a code ±1 times itself); the largest difference is measured and
//! recorded (`requantization_max_error`), so a lossy combination shows.
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{AdapterMethod, Quantizer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tch::{Kind, Tensor};

use super::PeftModel;
use crate::model::linear::FrozenLinear;
use crate::model::{CausalLM, ForwardArgs};
use crate::peft::adapters::{AttachReport, CAP_INIT_REWRITES_BASE};
use crate::plugins::Registry;

/// The record of a quantized run, beside its adapter.
pub const QUANTIZATION_FILE: &str = "quantization.json";

/// Modules never quantized unless `skip_modules` says otherwise.
pub const DEFAULT_SKIP_MODULES: [&str; 2] = ["visual", "lm_head"];

/// The `quantization:` section of a run config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct QuantizationConfig {
    /// The quantizer plugin: `nf4` or `int8`.
    pub plugin: String,
    /// Module names (or path components, e.g. `visual`) never quantized. Default
    /// `[visual, lm_head]`.
    #[serde(default = "default_skip")]
    pub skip_modules: Vec<String>,
    /// The plugin's own keys (`double_quant`, `blocksize`, `compute_dtype`).
    #[serde(flatten)]
    pub config: Map<String, Value>,
}

fn default_skip() -> Vec<String> {
    DEFAULT_SKIP_MODULES.iter().map(|s| s.to_string()).collect()
}

impl QuantizationConfig {
    /// Whether `module` is left unquantized: a `skip_modules` entry equals one of its
    /// dot-separated path segments or a run of them (`visual` skips `model.visual.blocks.0.attn.qkv`).
    pub fn skips(&self, module: &str) -> bool {
        let padded = format!(".{module}.");
        self.skip_modules.iter().any(|s| padded.contains(&format!(".{s}.")))
    }

    fn quantizer(&self, registry: &Registry) -> Result<Box<dyn Quantizer>> {
        let json = Value::Object(self.config.clone()).to_string();
        let q = registry
            .quantizer(&self.plugin, &json)
            .with_context(|| format!("quantization: plugin `{}`", self.plugin))?;
        Ok(Box::new(q))
    }
}

/// What was quantized: the record written as `quantization.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantizationRecord {
    pub quantization: QuantizationConfig,
    /// The quantized modules (checkpoint paths, model order).
    pub modules: Vec<String>,
    /// Bytes the packed weights take.
    pub packed_bytes: u64,
    /// Bytes the same weights take in bf16.
    pub bf16_bytes: u64,
    /// Largest |dequantize(quantize(B)) − B| over the bases an initialisation rewrote (PiSSA,
    /// OLoRA, LoftQ's Q): 0 when the stored base is exactly the one the init computed.
    pub requantization_max_error: Option<f64>,
}

impl QuantizationRecord {
    /// `packed_bytes / bf16_bytes`.
    pub fn ratio_to_bf16(&self) -> f64 {
        self.packed_bytes as f64 / self.bf16_bytes.max(1) as f64
    }
}

/// Quantizes the linear layers `select` picks (and `cfg` does not skip). Returns the record.
fn quantize_layers(
    model: &mut CausalLM,
    cfg: &QuantizationConfig,
    registry: &Registry,
    select: &dyn Fn(&str) -> Result<bool>,
) -> Result<QuantizationRecord> {
    let quantizer = cfg.quantizer(registry)?;
    let mut record = QuantizationRecord {
        quantization: cfg.clone(),
        modules: Vec::new(),
        packed_bytes: 0,
        bf16_bytes: 0,
        requantization_max_error: None,
    };
    for lin in model.linears_mut() {
        let name = lin.name.clone();
        if lin.quantized.is_some() || cfg.skips(&name) || !select(&name)? {
            continue;
        }
        quantize_one(lin, quantizer.as_ref())?;
    }
    // The record covers every quantized layer, those quantized while loading included.
    for (name, lin) in model.linears() {
        if let Some(q) = &lin.quantized {
            record.packed_bytes +=
                q.storage_bytes().with_context(|| format!("size of quantized `{name}`"))?;
            record.bf16_bytes += 2 * lin.weight.numel() as u64;
            record.modules.push(name.to_string());
        }
    }
    if record.modules.is_empty() {
        bail!(
            "quantization: no linear layer to quantize: the adapter's targets are all in skip_modules ({})",
            cfg.skip_modules.join(", ")
        );
    }
    tracing::info!(
        "quantized {} module(s) with `{}`: {:.1} MiB packed, {:.2}× their bf16 size",
        record.modules.len(),
        cfg.plugin,
        record.packed_bytes as f64 / (1 << 20) as f64,
        record.ratio_to_bf16()
    );
    Ok(record)
}

/// Stores one layer's base with `quantizer` (a ZeRO-3 shard is gathered first: the packed
/// weight stays whole on every rank).
fn quantize_one(lin: &mut FrozenLinear, quantizer: &dyn Quantizer) -> Result<()> {
    lin.unshard()?;
    lin.base_mut().quantize_with(quantizer)?;
    Ok(())
}

/// Quantization while the model loads (`CausalLM::load_with`): the returned hook quantizes
/// each layer that [`attach_quantized`] would quantize before attaching `method` (its targets
/// that `cfg` does not skip) as soon as the layer is read, and says whether it did, so that
/// loading never holds more than the packed layers plus one dense one. `None` without `cfg`,
/// or when `method`'s initialisation rewrites the base (PiSSA, OLoRA, LoftQ), which must see
/// the full-precision weight: those layers are quantized after the attach, as before.
pub fn quantize_while_loading<'a>(
    cfg: Option<&QuantizationConfig>,
    registry: &Registry,
    method: &'a dyn AdapterMethod,
) -> Result<Option<impl FnMut(&mut FrozenLinear) -> Result<bool> + 'a>> {
    let Some(cfg) = cfg else { return Ok(None) };
    if method.capabilities().iter().any(|c| c == CAP_INIT_REWRITES_BASE) {
        return Ok(None);
    }
    let quantizer = cfg.quantizer(registry)?;
    let cfg = cfg.clone();
    Ok(Some(move |lin: &mut FrozenLinear| -> Result<bool> {
        if lin.quantized.is_some() || cfg.skips(&lin.name) || !method.targets(&lin.name)? {
            return Ok(false);
        }
        quantize_one(lin, quantizer.as_ref())?;
        Ok(true)
    }))
}

/// [`CausalLM::load_with`] for a run that attaches `method` with quantization `cfg`: each
/// decoder linear layer is quantized as it is read when [`quantize_while_loading`] picks it,
/// and handed to `other` otherwise (ZeRO-3 sharding, or nothing).
pub fn load_for_adapter(
    dir: &Path,
    device: tch::Device,
    dtype: Kind,
    cfg: Option<&QuantizationConfig>,
    registry: &Registry,
    method: &dyn AdapterMethod,
    other: &mut dyn FnMut(&mut FrozenLinear) -> Result<()>,
) -> Result<CausalLM> {
    let mut quantize = quantize_while_loading(cfg, registry, method)?;
    CausalLM::load_with(dir, device, dtype, &mut |lin| {
        if let Some(quantize) = quantize.as_mut() {
            if quantize(lin).with_context(|| format!("quantizing `{}`", lin.name))? {
                return Ok(());
            }
        }
        other(lin)
    })
}

/// Attaches adapter `name` to `model` with the base weights of its targets quantized as `cfg`
/// says (see the module docs for the order); without `cfg`, a plain attach.
pub fn attach_quantized(
    model: &mut PeftModel,
    name: &str,
    method: Box<dyn AdapterMethod>,
    cfg: Option<&QuantizationConfig>,
    registry: &Registry,
) -> Result<(AttachReport, Option<QuantizationRecord>)> {
    let Some(cfg) = cfg else { return Ok((model.attach_adapter(name, method)?, None)) };
    let rewrites = method.capabilities().iter().any(|c| c == CAP_INIT_REWRITES_BASE);
    if !rewrites {
        let targets = |m: &str| Ok(method.targets(m)?);
        let record = quantize_layers(model, cfg, registry, &targets)?;
        return Ok((model.attach_adapter(name, method)?, Some(record)));
    }
    let report = model.attach_adapter(name, method)?;
    let rewritten: Vec<(String, Tensor)> = model
        .linears()
        .into_iter()
        .filter(|(m, _)| report.rewritten_base.iter().any(|r| r == m))
        .map(|(m, l)| (m.to_string(), l.weight.shallow_clone()))
        .collect();
    let mut record =
        quantize_layers(model, cfg, registry, &|m| Ok(report.modules.iter().any(|(r, _)| r == m)))?;
    let mut worst = 0f64;
    for (m, lin) in model.linears() {
        if let (Some((_, before)), Some(_)) =
            (rewritten.iter().find(|(r, _)| r == m), &lin.quantized)
        {
            let after = lin.dense_weight()?;
            worst = worst.max(after.f_sub(before)?.f_abs()?.f_max()?.f_double_value(&[])?);
        }
    }
    if worst > 0.0 {
        tracing::warn!(
            "quantization: the base weights the initialisation computed change by up to {worst:.3e} when stored by `{}` \
             (with nf4, double_quant: false stores LoftQ's Q exactly)",
            cfg.plugin
        );
    }
    record.requantization_max_error = Some(worst);
    Ok((report, Some(record)))
}

/// Writes `quantization.json` into `dir`.
pub fn write_record(dir: &Path, record: &QuantizationRecord) -> Result<()> {
    let path = dir.join(QUANTIZATION_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(record)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The `quantization.json` of an adapter directory, if it has one.
pub fn read_record(dir: &Path) -> Result<Option<QuantizationRecord>> {
    let path = dir.join(QUANTIZATION_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a quantization record", path.display()))?,
    ))
}

/// For a model that just loaded the adapter of `dir`: quantizes the modules the run quantized
/// when `dir` has a `quantization.json` (the adapter was trained on that base). Returns the
/// record, None for an adapter of an unquantized run.
pub fn apply_record(
    model: &mut CausalLM,
    dir: &Path,
    registry: &Registry,
) -> Result<Option<QuantizationRecord>> {
    let Some(saved) = read_record(dir)? else { return Ok(None) };
    let wanted = saved.modules.clone();
    let record = quantize_layers(model, &saved.quantization, registry, &|m| {
        Ok(wanted.iter().any(|w| w == m))
    })
    .with_context(|| format!("rebuilding the quantized base of {}", dir.display()))?;
    if record.modules != saved.modules {
        bail!(
            "{}: the run quantized {} module(s), this model has {} of them",
            dir.display(),
            saved.modules.len(),
            record.modules.len()
        );
    }
    Ok(Some(record))
}

/// Makes every quantized base weight dense again (its dequantized values).
pub fn dequantize_all(model: &mut CausalLM) -> Result<()> {
    for lin in model.linears_mut() {
        lin.base_mut().dequantize_in_place()?;
    }
    Ok(())
}

/// Which base a quantized run's adapter is merged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeBase {
    /// The full-precision weights the run quantized (the residual, for PiSSA/OLoRA; LoftQ's Q).
    Original,
    /// The dequantized weights the adapter was trained against.
    Dequantized,
}

/// How far a merged model is from the adapter-applied quantized model.
#[derive(Debug, Clone, Serialize)]
pub struct MergeError {
    pub merge_base: String,
    pub probe_tokens: i64,
    pub max_abs_logit_diff: f64,
    pub mean_abs_logit_diff: f64,
}

/// A fixed probe batch: 2 rows of 32 token ids drawn with a fixed seed below `vocab`.
fn probe_ids(vocab: i64, device: tch::Device) -> Result<Tensor> {
    let gen_seed = 1234;
    tch::manual_seed(gen_seed);
    Ok(Tensor::f_randint_low(3.min(vocab - 1), vocab, [2, 32], (Kind::Int64, device))?)
}

/// Merges the active adapter of `model`, which carries the quantized base of `record`:
/// measures the logits of the adapter-applied quantized model on a probe batch, puts the
/// chosen base in place (`originals`: the full-precision base weights by module, taken before
/// quantizing), merges, and measures the merged model's logits on the same batch.
pub fn merge_quantized(
    model: &mut PeftModel,
    originals: Vec<(String, Tensor)>,
    base: MergeBase,
) -> Result<MergeError> {
    let probe = probe_ids(model.config().vocab_size, model.device())?;
    let quantized_logits =
        tch::no_grad(|| model.forward(ForwardArgs::ids(&probe).mode(model.eval_mode())))?;
    match base {
        MergeBase::Dequantized => dequantize_all(model)?,
        MergeBase::Original => {
            for lin in model.linears_mut() {
                if lin.quantized.is_some() {
                    let (_, w) = originals
                        .iter()
                        .find(|(m, _)| *m == lin.name)
                        .with_context(|| format!("no original weight of `{}`", lin.name))?;
                    lin.set_base_weight(w.shallow_clone())?;
                }
            }
        }
    }
    model.merge_adapter()?;
    let merged_logits =
        tch::no_grad(|| model.forward(ForwardArgs::ids(&probe).mode(model.eval_mode())))?;
    let diff = merged_logits.f_sub(&quantized_logits)?.f_abs()?;
    Ok(MergeError {
        merge_base: format!("{base:?}").to_lowercase(),
        probe_tokens: probe.numel() as i64,
        max_abs_logit_diff: diff.f_max()?.f_double_value(&[])?,
        mean_abs_logit_diff: diff.f_mean(Kind::Double)?.f_double_value(&[])?,
    })
}

/// The full-precision weights of the modules a record quantized (shallow clones), taken
/// before [`apply_record`].
pub fn dense_weights_of(model: &CausalLM, record: &QuantizationRecord) -> Vec<(String, Tensor)> {
    model
        .linears()
        .into_iter()
        .filter(|(m, _)| record.modules.iter().any(|r| r == m))
        .map(|(m, l)| (m.to_string(), l.weight.shallow_clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_modules_match_path_segments() {
        let cfg: QuantizationConfig =
            serde_json::from_str(r#"{"plugin": "nf4", "double_quant": true}"#).unwrap();
        assert_eq!(cfg.skip_modules, vec!["visual", "lm_head"]);
        assert_eq!(cfg.config.get("double_quant"), Some(&Value::Bool(true)));
        assert!(cfg.skips("model.visual.blocks.0.attn.qkv") && cfg.skips("lm_head"));
        assert!(!cfg.skips("model.layers.0.self_attn.q_proj") && !cfg.skips("model.visualx.q"));
        let cfg: QuantizationConfig =
            serde_json::from_str(r#"{"plugin": "nf4", "skip_modules": ["mlp.down_proj"]}"#)
                .unwrap();
        assert!(cfg.skips("model.layers.3.mlp.down_proj") && !cfg.skips("lm_head"));
    }
}
