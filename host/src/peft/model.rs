//! The PEFT model: a [`CausalLM`] wrapped with the adapters attached to it, as peft's
//! `PeftModel` wraps a transformers model. The decoder holds no adapter state; this wrapper
//! owns the adapter sets (which adapter is active, what each one adapted, the trainable
//! copies of the token embedding), attaching and detaching them (`adapters.rs`), their PEFT
//! state dicts and directories (`mod.rs`) and merging them into the weights.
//!
//! Each adapted linear layer keeps its base and the plugin's layer, as peft's `LoraLayer`
//! keeps its `base_layer`; [`PeftModel::forward`] runs the active adapter through them.
//! Everything else of the model is reached through `Deref` (peft's `__getattr__`).
use std::ops::{Deref, DerefMut};

use anyhow::{bail, Result};
use ferrotune_plugin_api::{ForwardFlags, PromptKind};
use tch::Tensor;

use super::adapters::AdapterSet;
use crate::model::linear::LinearMode;
use crate::model::{CausalLM, ForwardArgs, PromptInput};

/// A model and its adapters.
pub struct PeftModel {
    pub(crate) base: CausalLM,
    /// Adapters attached to the linear layers, by name, and the active one.
    pub(crate) adapters: AdapterSet,
    /// Trainable copies of the token embedding (`modules_to_save`), by adapter name: the
    /// input embedding while that adapter runs.
    pub(crate) embed_copies: Vec<(String, Tensor)>,
}

impl PeftModel {
    /// Wraps `base` with no adapter attached.
    pub fn new(base: CausalLM) -> Self {
        Self { base, adapters: AdapterSet::default(), embed_copies: Vec::new() }
    }

    /// The [`LinearMode`] of a forward pass: the active adapter unless `flags` has
    /// `DISABLE_ADAPTER` (the reference model); `train` turns adapter dropout on. (`NO_GRAD` is
    /// the caller's: wrap the call in `tch::no_grad`.)
    pub fn mode(&self, flags: ForwardFlags, train: bool) -> LinearMode<'_> {
        let adapter = if flags.contains(ForwardFlags::DISABLE_ADAPTER) {
            None
        } else {
            self.active_adapter()
        };
        LinearMode { adapter, train, rows: None }
    }

    /// The mode of an evaluation pass through the active adapter.
    pub fn eval_mode(&self) -> LinearMode<'_> {
        self.mode(ForwardFlags::NONE, false)
    }

    /// Adapter `name`'s trainable copy of the embedding matrix (`modules_to_save`), if any.
    pub fn embed_tokens_copy(&self, name: &str) -> Option<&Tensor> {
        self.embed_copies.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// [`CausalLM::forward`] through the active adapter in evaluation mode unless `args.mode`
    /// says otherwise, with the token embedding of the adapter that runs (its
    /// `modules_to_save` copy, if it keeps one).
    ///
    /// A prompt-learning adapter (prompt tuning, P-tuning, prefix tuning) adds its positions
    /// before the input at a pass without a cache or at the prefill of an empty one; the
    /// outputs are the input's positions only. A caller that keeps decoding on the cache widens
    /// its attention mask by [`PeftModel::prompt_positions`] after the prefill.
    pub fn forward<'a>(&'a self, mut args: ForwardArgs<'a>) -> Result<Tensor> {
        let mode = *args.mode.get_or_insert_with(|| self.eval_mode());
        if args.embed_tokens.is_none() {
            args.embed_tokens = mode.adapter.and_then(|name| self.embed_tokens_copy(name));
        }
        let prefill = args.cache.as_ref().is_none_or(|c| c.seq_len() == 0);
        let prompt = match (mode.adapter, mode.rows) {
            (Some(name), None) if prefill => match self.adapter_prompt(name)? {
                Some(spec) => Some((spec.kind, self.adapter_prompt_forward(name, mode.train)?)),
                None => None,
            },
            (None, Some(rows)) if prefill => {
                if let Some(name) = rows.iter().flatten().find(|n| {
                    self.adapter_prompt(n).is_ok_and(|p| p.is_some())
                }) {
                    bail!("adapter `{name}` is a prompt-learning method: its rows start alone (a prefill per adapter), not in a batch of several adapters");
                }
                None
            }
            _ => None,
        };
        let Some((kind, table)) = &prompt else { return self.base.forward(args) };
        let mut args: ForwardArgs<'_> = args;
        args.prompt = Some(match kind {
            PromptKind::VirtualTokens => PromptInput::VirtualTokens(table),
            PromptKind::KvPrefix => PromptInput::KvPrefix(table),
        });
        self.base.forward(args)
    }

    /// The positions adapter `adapter` puts before the input (`num_virtual_tokens` of a
    /// prompt-learning method; 0 for other adapters and the base model).
    pub fn prompt_positions(&self, adapter: Option<&str>) -> Result<i64> {
        Ok(match adapter {
            Some(name) => self.adapter_prompt(name)?.map_or(0, |p| p.num_virtual_tokens),
            None => 0,
        })
    }

    /// The attention mask `[B, S]` of a prefill through `adapter`, widened to what the cache
    /// now holds: ones for the prompt's positions first (unchanged for other adapters).
    pub fn mask_after_prefill(&self, adapter: Option<&str>, mask: Tensor) -> Result<Tensor> {
        let n = self.prompt_positions(adapter)?;
        if n == 0 {
            return Ok(mask);
        }
        let ones = Tensor::f_ones([mask.size()[0], n], (mask.kind(), mask.device()))?;
        Ok(Tensor::f_cat(&[&ones, &mask], 1)?)
    }
}

impl Deref for PeftModel {
    type Target = CausalLM;
    fn deref(&self) -> &CausalLM {
        &self.base
    }
}

impl DerefMut for PeftModel {
    fn deref_mut(&mut self) -> &mut CausalLM {
        &mut self.base
    }
}
