//! The full weights of a vision-language model a run trains beside its adapter
//! (Qwen2-VL-Finetune's `freeze_vision_tower` / `tune_merger` / `vision_lr` / `merger_lr`);
//! they are saved by [`crate::peft::non_lora`].
use anyhow::{bail, Result};
use ferrotune_plugin_api::TrainParam;

use super::config::VisionTrainConfig;
use crate::peft::PeftModel;

/// The merger's weights are those under this prefix; the rest of `model.visual.` is the tower.
const MERGER: &str = "model.visual.merger.";
const VISUAL: &str = "model.visual.";

/// The vision weights `cfg` trains in full, as trainable parameters (named by checkpoint key,
/// `requires_grad` switched on) with their learning-rate scales relative to `lr`. Empty for a
/// text-only model or a fully frozen vision side.
pub fn vision_parameters(
    model: &PeftModel,
    cfg: &VisionTrainConfig,
    lr: f64,
) -> Result<Vec<TrainParam>> {
    if model.vision_config().is_none() {
        if !cfg.freeze_vision_tower
            || cfg.tune_merger
            || cfg.vision_lr.is_some()
            || cfg.merger_lr.is_some()
        {
            bail!(
                "config section `vision` trains vision weights, but the model has no vision tower"
            );
        }
        return Ok(Vec::new());
    }
    let lora_on_tower: Vec<String> = model
        .adapted_modules()
        .into_iter()
        .filter(|m| m.starts_with(VISUAL))
        .map(str::to_string)
        .collect();
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
