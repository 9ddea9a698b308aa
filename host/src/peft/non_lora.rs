//! Full weights trained beside an adapter (a vision-language model's merger or vision tower),
//! saved next to the PEFT adapter as Qwen2-VL-Finetune does (`non_lora_state_dict`), under
//! the PEFT model's parameter names (`base_model.model.model.visual.merger.mlp.0.weight`), as
//! safetensors. `generate --adapter` and `merge` put them back into the base model.
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::TrainParam;
use tch::Tensor;

use crate::model::CausalLM;

/// The file name beside `adapter_model.safetensors`.
pub const NON_LORA_FILE: &str = "non_lora_state_dict.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";

/// Writes `params` (if any) to `dir/non_lora_state_dict.safetensors`.
pub fn save(dir: &Path, params: &[TrainParam]) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let named: Vec<(String, Tensor)> = params
        .iter()
        .map(|p| (format!("{PEFT_PREFIX}{}", p.name), p.tensor.shallow_clone()))
        .collect();
    let file = dir.join(NON_LORA_FILE);
    crate::util::safetensors::write(&file, &named)
        .with_context(|| format!("cannot write {}", file.display()))
}

/// Copies the weights of `dir/non_lora_state_dict.safetensors` (if the file exists) into the
/// model's weights; returns the keys restored. Unknown keys and shape mismatches are errors.
pub fn load_into(model: &CausalLM, dir: &Path) -> Result<Vec<String>> {
    let file = dir.join(NON_LORA_FILE);
    if !file.is_file() {
        return Ok(Vec::new());
    }
    let tensors = crate::util::safetensors::read(&file)?;
    let weights = model.named_weights();
    let mut restored = Vec::with_capacity(tensors.len());
    for (name, value) in tensors {
        let key = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
        let Some((_, dst)) = weights.iter().find(|(k, _)| k == key) else {
            bail!(
                "{}: `{name}` is not a weight of this model (was it trained on another base?)",
                file.display()
            );
        };
        if dst.size() != value.size() {
            bail!(
                "{}: `{name}` has shape {:?} but the model's is {:?}",
                file.display(),
                value.size(),
                dst.size()
            );
        }
        tch::no_grad(|| {
            dst.shallow_clone().f_copy_(&value.f_to_device(dst.device())?.f_to_kind(dst.kind())?)
        })?;
        restored.push(key.to_string());
    }
    Ok(restored)
}
