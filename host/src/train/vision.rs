//! The full weights of a vision-language model a run trains beside its adapter
//! (Qwen2-VL-Finetune's `freeze_vision_tower` / `tune_merger` / `vision_lr` / `merger_lr`);
//! they are saved by [`crate::peft::non_lora`].
use anyhow::{bail, Result};
use ferrotune_plugin_api::TrainParam;

use super::config::{Finetuning, VisionTrainConfig};
use super::trainable::{part_of, train_param, Part, VISUAL};
use crate::peft::PeftModel;

/// The vision weights `cfg` trains in full, as trainable parameters (named by checkpoint key,
/// `requires_grad` switched on) with their learning-rate scales relative to `lr`. Empty for a
/// text-only model or a fully frozen vision side.
pub fn vision_parameters(
    model: &PeftModel,
    cfg: &VisionTrainConfig,
    lr: f64,
) -> Result<Vec<TrainParam>> {
    if model.vision_config().is_none() {
        if !cfg.tower_frozen(Finetuning::Adapter)
            || cfg.merger_trained(Finetuning::Adapter)
            || cfg.freeze_llm
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
    let (tower_frozen, merger_trained) =
        (cfg.tower_frozen(Finetuning::Adapter), cfg.merger_trained(Finetuning::Adapter));
    if !tower_frozen && !lora_on_tower.is_empty() {
        bail!(
            "vision.freeze_vision_tower is false and the adapter also targets vision layers ({} …): train the tower in full or with LoRA, not both",
            lora_on_tower[0]
        );
    }
    let mut out = Vec::new();
    for (key, t) in model.named_weights() {
        let (train, group_lr) = match part_of(&key) {
            Part::Merger => (merger_trained, cfg.merger_lr),
            Part::Tower => (!tower_frozen, cfg.vision_lr),
            Part::Language => (false, None),
        };
        if train {
            out.push(train_param(&key, &t, group_lr, lr));
        }
    }
    Ok(out)
}
