//! Full weights trained beside an adapter (a vision-language model's merger or vision tower),
//! saved next to the PEFT adapter as Qwen2-VL-Finetune does (`non_lora_state_dict`), under
//! the PEFT model's parameter names (`base_model.model.model.visual.merger.mlp.0.weight`), as
//! safetensors. `generate --adapter` and `merge` put them back into the base model.
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::TrainParam;
use tch::Tensor;

use crate::model::CausalLM;
use crate::train::config::VisionTrainConfig;

/// The file name beside `adapter_model.safetensors`.
pub const NON_LORA_FILE: &str = "non_lora_state_dict.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";

/// The merger's weights are those under this prefix; the rest of `model.visual.` is the tower.
const MERGER: &str = "model.visual.merger.";
const VISUAL: &str = "model.visual.";

/// The vision weights `cfg` trains in full, as trainable parameters (named by checkpoint key,
/// `requires_grad` switched on) with their learning-rate scales relative to `lr`. Empty for a
/// text-only model or a fully frozen vision side.
pub fn vision_parameters(model: &CausalLM, cfg: &VisionTrainConfig, lr: f64) -> Result<Vec<TrainParam>> {
    if model.vision_config().is_none() {
        if !cfg.freeze_vision_tower || cfg.tune_merger || cfg.vision_lr.is_some() || cfg.merger_lr.is_some() {
            bail!("config section `vision` trains vision weights, but the model has no vision tower");
        }
        return Ok(Vec::new());
    }
    let lora_on_tower: Vec<String> = model.adapted_modules().into_iter().filter(|m| m.starts_with(VISUAL)).map(str::to_string).collect();
    if !cfg.freeze_vision_tower && !lora_on_tower.is_empty() {
        bail!(
            "vision.freeze_vision_tower is false and the adapter also targets vision layers ({} …): train the tower in full or with LoRA, not both",
            lora_on_tower[0]
        );
    }
    let mut out = Vec::new();
    for (key, t) in model.named_weights() {
        let (train, group_lr) = if key.starts_with(MERGER) {
            (cfg.tune_merger, cfg.merger_lr)
        } else if key.starts_with(VISUAL) {
            (!cfg.freeze_vision_tower, cfg.vision_lr)
        } else {
            (false, None)
        };
        if !train {
            continue;
        }
        let no_decay = t.dim() == 1; // biases and norms, as transformers' Trainer groups them
        let mut p = TrainParam::new(key, t.set_requires_grad(true));
        p.lr_scale = group_lr.map_or(1.0, |g| g / lr);
        p.weight_decay_scale = if no_decay { 0.0 } else { 1.0 };
        out.push(p);
    }
    Ok(out)
}

/// Writes `params` (if any) to `dir/non_lora_state_dict.safetensors`.
pub fn save(dir: &Path, params: &[TrainParam]) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let named: Vec<(String, Tensor)> =
        params.iter().map(|p| (format!("{PEFT_PREFIX}{}", p.name), p.tensor.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let file = dir.join(NON_LORA_FILE);
    Tensor::write_safetensors(&refs, &file).with_context(|| format!("cannot write {}", file.display()))
}

/// Copies the weights of `dir/non_lora_state_dict.safetensors` (if the file exists) into the
/// model's weights; returns the keys restored. Unknown keys and shape mismatches are errors.
pub fn load_into(model: &CausalLM, dir: &Path) -> Result<Vec<String>> {
    let file = dir.join(NON_LORA_FILE);
    if !file.is_file() {
        return Ok(Vec::new());
    }
    let tensors = Tensor::read_safetensors(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let weights = model.named_weights();
    let mut restored = Vec::with_capacity(tensors.len());
    for (name, value) in tensors {
        let key = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
        let Some((_, dst)) = weights.iter().find(|(k, _)| k == key) else {
            bail!("{}: `{name}` is not a weight of this model (was it trained on another base?)", file.display());
        };
        if dst.size() != value.size() {
            bail!("{}: `{name}` has shape {:?} but the model's is {:?}", file.display(), value.size(), dst.size());
        }
        tch::no_grad(|| dst.shallow_clone().f_copy_(&value.f_to_device(dst.device())?.f_to_kind(dst.kind())?))?;
        restored.push(key.to_string());
    }
    Ok(restored)
}
