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
            (Some(name), None) if prefill => match self.adapter_prompt(name) {
                Some(spec) => Some((spec.kind, self.adapter_prompt_forward(name, mode.train)?)),
                None => None,
            },
            (None, Some(rows)) if prefill => {
                if let Some(name) = rows.iter().flatten().find(|n| self.adapter_prompt(n).is_some())
                {
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
            Some(name) => self.adapter_prompt(name).map_or(0, |p| p.num_virtual_tokens),
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ferrotune_plugin_api::{
        AdapterLayer, AdapterMethod, BaseLinear, PluginError, PluginResult, PromptSpec,
    };
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::peft::adapters::tests::tiny_model;

    /// A prompt method whose virtual tokens or prefix are a fixed table.
    struct Fixed {
        kind: PromptKind,
        table: Mutex<Tensor>,
    }

    impl AdapterMethod for Fixed {
        fn targets(&self, _: &str) -> PluginResult<bool> {
            Ok(false)
        }
        fn adapt_linear(&self, m: &str, _: &dyn BaseLinear) -> PluginResult<Box<dyn AdapterLayer>> {
            Err(PluginError::runtime(format!("no layer: {m}")))
        }
        fn peft_config(&self) -> PluginResult<String> {
            Ok("{}".into())
        }
        fn prompt(&self) -> PluginResult<Option<PromptSpec>> {
            let n = self.table.lock().unwrap().size()[0];
            Ok(Some(PromptSpec { kind: self.kind, num_virtual_tokens: n }))
        }
        fn prompt_forward(&self, _: bool) -> PluginResult<Tensor> {
            Ok(self.table.lock().unwrap().shallow_clone())
        }
    }

    fn attach(m: &mut PeftModel, kind: PromptKind, table: Tensor) {
        m.attach_adapter("p", Box::new(Fixed { kind, table: Mutex::new(table) })).unwrap();
        m.set_active_adapter(Some("p")).unwrap();
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Virtual tokens equal to real tokens' embeddings, and a prefix equal to real tokens'
    /// keys and values, give the logits of those tokens followed by the input; uncached and
    /// through a prefill + decode step on a cache.
    #[test]
    fn prompts_equal_the_tokens_they_stand_for() {
        let p = Tensor::from_slice(&[3i64, 9, 4]).view([1, 3]);
        let x = Tensor::from_slice(&[1i64, 5, 2, 7]).view([1, 4]);
        let both = Tensor::cat(&[&p, &x], 1);
        let base = tiny_model(false);
        let want = base.forward(ForwardArgs::ids(&both)).unwrap().narrow(1, 3, 4);
        // The prefix: the keys and values the model caches for p.
        let mut c = base.new_cache(1);
        let _ = base.forward(ForwardArgs::ids(&p).cache(Some(&mut c))).unwrap();
        let (layers, kv, hd) = (1, 1, 4);
        let mut parts = Vec::new();
        for l in 0..layers {
            let (k, v) = c.layer(l).unwrap();
            parts.push(k.get(0).permute([1, 0, 2]));
            parts.push(v.get(0).permute([1, 0, 2]));
        }
        let prefix = Tensor::stack(&parts, 1).reshape([3, (layers as i64) * 2 * kv * hd]);
        let embeds = Tensor::embedding(base.embed_tokens(), &p.get(0), -1, false, false);
        for (kind, table) in [(PromptKind::VirtualTokens, embeds), (PromptKind::KvPrefix, prefix)] {
            let mut m = tiny_model(false);
            attach(&mut m, kind, table);
            let mask = Tensor::ones([1, 4], (Kind::Int64, Device::Cpu));
            let got = m.forward(ForwardArgs::ids(&x).mask(Some(&mask))).unwrap();
            assert_eq!(got.size(), [1, 4, 16], "{kind:?}: the input's positions only");
            assert!(max_diff(&got, &want) < 1e-5, "{kind:?}: {}", max_diff(&got, &want));
            // Prefill the first three tokens, then one decode step with the widened mask.
            let mut cache = m.new_cache(1);
            let head = x.narrow(1, 0, 3);
            let first = m
                .forward(
                    ForwardArgs::ids(&head)
                        .mask(Some(&mask.narrow(1, 0, 3)))
                        .cache(Some(&mut cache))
                        .last(),
                )
                .unwrap();
            assert!(max_diff(&first, &want.select(1, 2)) < 1e-5, "{kind:?}: prefill");
            assert_eq!(cache.seq_len(), 6, "{kind:?}: the cache holds the prompt's positions");
            let mask = m.mask_after_prefill(Some("p"), mask.narrow(1, 0, 3)).unwrap();
            let mask = Tensor::cat(&[&mask, &Tensor::ones([1, 1], (Kind::Int64, Device::Cpu))], 1);
            let next = m
                .forward(
                    ForwardArgs::ids(&x.narrow(1, 3, 1))
                        .mask(Some(&mask))
                        .cache(Some(&mut cache))
                        .last(),
                )
                .unwrap();
            assert!(max_diff(&next, &want.select(1, 3)) < 1e-5, "{kind:?}: decode step");
            // Explicit positions (packed rows) are refused, and merging names the method.
            let pos = Tensor::arange(4, (Kind::Int64, Device::Cpu)).view([1, 4]);
            let e = m.forward(ForwardArgs::ids(&x).positions(Some(&pos))).unwrap_err().to_string();
            assert!(e.contains("packing"), "{e}");
            let e = m.merge_adapter().unwrap_err().to_string();
            assert!(e.contains("prompt-learning") && e.contains("3 virtual tokens"), "{e}");
        }
    }

    #[test]
    fn a_prompt_longer_than_the_model_s_positions_is_refused_before_it_is_attached() {
        let mut m = tiny_model(false);
        let table = Tensor::zeros([64, 8], (Kind::Float, Device::Cpu));
        let method = Fixed { kind: PromptKind::VirtualTokens, table: Mutex::new(table) };
        let e = m.attach_adapter("p", Box::new(method)).unwrap_err().to_string();
        assert!(e.contains("num_virtual_tokens = 64") && e.contains("63"), "{e}");
        assert!(m.adapter_names().is_empty());
    }
}
