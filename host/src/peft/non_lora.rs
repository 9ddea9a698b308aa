//! Full weights trained beside an adapter (a vision-language model's merger or vision tower),
//! saved next to the PEFT adapter as Qwen2-VL-Finetune does (`non_lora_state_dict`), under
//! the PEFT model's parameter names (`base_model.model.model.visual.merger.mlp.0.weight`), as
//! safetensors. `generate --adapter` and `merge` put them back into the base model.
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::TrainParam;
use tch::Tensor;

use crate::model::llama::VALUE_HEAD;
use crate::model::CausalLM;

/// The file name beside `adapter_model.safetensors`.
pub const NON_LORA_FILE: &str = "non_lora_state_dict.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";

/// Writes `params` (if any) to `dir/non_lora_state_dict.safetensors`, atomically; a tensor
/// holding NaN or Inf is refused by name before anything is written.
pub fn save(dir: &Path, params: &[TrainParam]) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let named: Vec<(String, Tensor)> = params
        .iter()
        .map(|p| (format!("{PEFT_PREFIX}{}", p.name), p.tensor.shallow_clone()))
        .collect();
    let file = dir.join(NON_LORA_FILE);
    super::refuse_non_finite(&named, &file)?;
    crate::util::atomic::write_with(&file, |tmp| crate::util::safetensors::write(tmp, &named))
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
    // Every tensor is checked before any is copied: a refused file leaves the model as it was.
    let mut checked = Vec::with_capacity(tensors.len());
    for (name, value) in tensors {
        let key = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).to_string();
        if key.starts_with(&format!("{VALUE_HEAD}.")) && model.value_head().is_none() {
            // PPO's critic: training state, of no use to a model that generates or merges.
            continue;
        }
        let Some((_, dst)) = weights.iter().find(|(k, _)| *k == key) else {
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
        if let Some(counts) = crate::util::safetensors::non_finite_counts(&value)? {
            bail!(
                "{}: `{name}` {}: refusing non-finite weights (saved from a diverged run?)",
                file.display(),
                crate::util::safetensors::describe_non_finite(counts, value.numel())
            );
        }
        checked.push((key, dst.shallow_clone(), value));
    }
    let mut restored = Vec::with_capacity(checked.len());
    for (key, dst, value) in checked {
        tch::no_grad(|| {
            dst.shallow_clone().f_copy_(&value.f_to_device(dst.device())?.f_to_kind(dst.kind())?)
        })?;
        restored.push(key);
    }
    Ok(restored)
}
