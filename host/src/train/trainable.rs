//! Which of the model's own weights a run trains: `finetuning: full` (all of them) or
//! `finetuning: freeze` (LLaMA-Factory's `freeze_trainable_layers` / `_modules` /
//! `freeze_extra_modules`), with Qwen2-VL-Finetune's `vision:` switches in every mode
//! (`freeze_vision_tower`, `tune_merger`, `freeze_llm`, `vision_lr`, `merger_lr`).
//!
//! A trained weight becomes a [`TrainParam`] named by its checkpoint key, with
//! `requires_grad` switched on (on the model's own tensor: the layers see it). Weight decay
//! applies to tensors of two or more dimensions only: biases and norm weights get none, which
//! is what transformers' `Trainer.get_decay_parameter_names` gives for these models (its name
//! patterns `bias`, `layernorm`, `rmsnorm`, `norm`, `_norm` and its `nn.LayerNorm` rule select
//! exactly their 1-D tensors). A tied `lm_head` is the embedding: one tensor, trained once.
use anyhow::{bail, Result};
use ferrotune_plugin_api::TrainParam;

use super::config::{Finetuning, FreezeConfig, TrainConfig};
use crate::peft::PeftModel;

/// The merger's weights are those under this prefix; the rest of `model.visual.` is the tower.
pub const MERGER: &str = "model.visual.merger.";
pub const VISUAL: &str = "model.visual.";

/// Where a weight belongs, for the vision switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Merger,
    Tower,
    Language,
}

pub fn part_of(key: &str) -> Part {
    if key.starts_with(MERGER) {
        Part::Merger
    } else if key.starts_with(VISUAL) {
        Part::Tower
    } else {
        Part::Language
    }
}

/// A trainable parameter for `key`: `requires_grad` on, no weight decay for 1-D tensors, the
/// learning rate `part_lr` (if set) relative to the run's `lr`.
pub fn train_param(key: &str, t: &tch::Tensor, part_lr: Option<f64>, lr: f64) -> TrainParam {
    let no_decay = t.dim() <= 1;
    let mut p = TrainParam::new(key, t.shallow_clone().set_requires_grad(true));
    p.lr_scale = part_lr.map_or(1.0, |g| g / lr);
    p.weight_decay_scale = if no_decay { 0.0 } else { 1.0 };
    p
}

/// The weights `finetuning: full | freeze` trains, as parameters in model order (see the
/// module docs). Errors name the `freeze.*` key that selects nothing, and a run that would
/// train nothing.
pub fn full_weight_parameters(model: &PeftModel, cfg: &TrainConfig) -> Result<Vec<TrainParam>> {
    let mode = cfg.finetuning();
    let v = &cfg.vision;
    let has_vision = model.vision_config().is_some();
    if !has_vision
        && (v.freeze_llm
            || v.freeze_vision_tower == Some(false)
            || v.tune_merger == Some(true)
            || v.vision_lr.is_some()
            || v.merger_lr.is_some())
    {
        bail!("config section `vision` trains or freezes vision weights, but the model has no vision tower");
    }
    let select = LayerSelection::new(model, mode, &cfg.freeze_config())?;
    let mut out = Vec::new();
    for (key, t) in model.named_weights() {
        let (train, part_lr) = match part_of(&key) {
            Part::Merger => (v.merger_trained(mode), v.merger_lr),
            Part::Tower => (!v.tower_frozen(mode), v.vision_lr),
            Part::Language => (!v.freeze_llm && select.selects(&key), None),
        };
        if train {
            out.push(train_param(&key, &t, part_lr, cfg.optimizer.lr));
        }
    }
    select.check_every_name_matched()?;
    if out.is_empty() {
        bail!("finetuning: {}: the configuration selects no weight to train (vision.freeze_llm with a frozen vision tower and merger?)", mode.name());
    }
    Ok(out)
}

/// The language-model weights full or freeze fine-tuning selects.
struct LayerSelection {
    mode: Finetuning,
    /// `{decoder}.layers.`
    layers_prefix: String,
    layer_ids: std::ops::Range<i64>,
    modules: Option<Vec<String>>,
    extra: Vec<String>,
    /// Which `modules` / `extra` names selected something.
    matched: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl LayerSelection {
    fn new(model: &PeftModel, mode: Finetuning, f: &FreezeConfig) -> Result<Self> {
        let n = model.config().num_hidden_layers;
        // LLaMA-Factory: the last N layers, or the first −N; clamped to the model's layers.
        let layer_ids = if f.trainable_layers > 0 {
            (n - f.trainable_layers).max(0)..n
        } else {
            0..(-f.trainable_layers).min(n)
        };
        Ok(Self {
            mode,
            layers_prefix: format!("{}.layers.", model.decoder_path()),
            layer_ids,
            modules: (!f.trainable_modules.is_all()).then(|| f.trainable_modules.0.clone()),
            extra: f.extra_modules.0.clone(),
            matched: Default::default(),
        })
    }

    fn selects(&self, key: &str) -> bool {
        match self.mode {
            Finetuning::Full => true,
            Finetuning::Adapter => false,
            Finetuning::Freeze => self.freeze_selects(key),
        }
    }

    fn freeze_selects(&self, key: &str) -> bool {
        // The module path: the key without its tensor name (`.weight`, `.bias`).
        let module = key.rsplit_once('.').map_or(key, |(m, _)| m);
        let Some(rest) = module.strip_prefix(&self.layers_prefix) else {
            // Outside the layers: the extra modules, by their path's last segment(s).
            let hit = self
                .extra
                .iter()
                .find(|m| module == m.as_str() || module.ends_with(&format!(".{m}")));
            if let Some(m) = hit {
                self.matched.borrow_mut().insert(format!("extra:{m}"));
            }
            return hit.is_some();
        };
        let (idx, inner) = rest.split_once('.').unwrap_or((rest, ""));
        let Ok(idx) = idx.parse::<i64>() else { return false };
        if !self.layer_ids.contains(&idx) {
            return false;
        }
        let Some(modules) = &self.modules else { return true };
        // `mlp` matches `mlp.gate_proj`; `q_proj` and `self_attn.q_proj` match that module.
        let segments: Vec<&str> = inner.split('.').collect();
        let hit = modules.iter().find(|m| {
            (1..=segments.len()).any(|k| {
                let candidate = segments[..k].join(".");
                candidate == **m || candidate.ends_with(&format!(".{m}"))
            })
        });
        if let Some(m) = hit {
            self.matched.borrow_mut().insert(format!("module:{m}"));
        }
        hit.is_some()
    }

    fn check_every_name_matched(&self) -> Result<()> {
        if self.mode != Finetuning::Freeze {
            return Ok(());
        }
        let matched = self.matched.borrow();
        for m in self.modules.iter().flatten() {
            if !matched.contains(&format!("module:{m}")) {
                bail!("config key `freeze.trainable_modules`: `{m}` names no module of decoder layers {}..{} (modules of a layer: self_attn, self_attn.q_proj … o_proj, mlp, mlp.gate_proj … down_proj, input_layernorm, post_attention_layernorm)", self.layer_ids.start, self.layer_ids.end);
            }
        }
        for m in &self.extra {
            if !matched.contains(&format!("extra:{m}")) {
                bail!("config key `freeze.extra_modules`: `{m}` names no weight outside the decoder layers (e.g. embed_tokens, norm, lm_head; a tied lm_head is embed_tokens)");
            }
        }
        Ok(())
    }
}
