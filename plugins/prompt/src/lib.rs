//! `prompt_tuning`, `p_tuning` and `prefix_tuning`: peft 0.21's prompt-learning methods, which
//! adapt no layer but add positions before the input: virtual-token embeddings before the
//! input embeddings (prompt tuning, https://arxiv.org/abs/2104.08691; P-tuning,
//! https://arxiv.org/abs/2103.10385) or keys and values before every layer's own (prefix
//! tuning, https://arxiv.org/abs/2101.00190). `config.rs` (keys, validation,
//! `adapter_config.json`), `encoder.rs` (tensors, forward, saved state), wiring here.
//!
//! The host puts the prompt before the input (mask widened with ones, plain positions over
//! prompt and input; a prefix seeded into the KV cache, the input's positions after it) and
//! keeps only the input's outputs.
//!
//! Saved state: one tensor, `prompt_embeddings` (peft's `get_prompt_embedding_to_save`): the
//! table, or the encoder's output for P-tuning and a projected prefix. A directory is loaded
//! as that table (peft's inference mode, which the host's PEFT_METHODS rows set).
use std::sync::Mutex;

use ferrotune_plugin_api::prelude::*;
use serde_json::Value;
use tch::Tensor;

pub mod config;
pub mod encoder;

use config::{
    Common, Dims, EncoderType, Init, PTuningConfig, PrefixTuningConfig, PromptTuningConfig,
};
use encoder::{Encoder, Slot};

/// Capability: rows of one batch may use different adapters (decode steps are the base
/// model's; the host prefills each prompt adapter's rows alone).
pub const MIXED_BATCH: &str = "mixed_batch";

/// What the three methods share: the common keys, the model's sizes and the live tensors.
struct Core {
    common: Common,
    kind: PromptKind,
    /// The method in messages (`P-tuning`).
    what: &'static str,
    dims: Mutex<Option<Dims>>,
    encoder: Slot,
}

impl Core {
    fn new(common: Common, kind: PromptKind, what: &'static str) -> Self {
        Self { common, kind, what, dims: Mutex::new(None), encoder: Slot::default() }
    }

    /// Checks the configuration against the model and records its sizes.
    fn begin(&self, model: &ModelInfo) -> PluginResult<Dims> {
        let dims = self.common.dims(model, self.kind == PromptKind::KvPrefix)?;
        *self.dims.lock().map_err(|_| PluginError::runtime("poisoned lock"))? = Some(dims);
        Ok(dims)
    }

    fn dims(&self) -> Option<Dims> {
        self.dims.lock().ok().and_then(|d| *d)
    }

    fn prompt(&self) -> Option<PromptSpec> {
        Some(PromptSpec { kind: self.kind, num_virtual_tokens: self.common.num_virtual_tokens })
    }

    fn n(&self) -> i64 {
        self.common.num_virtual_tokens
    }

    fn root_parameters(&self) -> PluginResult<Vec<TrainParam>> {
        self.encoder.with(|e| Ok(e.parameters()))
    }

    fn root_state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.encoder.with(Encoder::state_dict)
    }

    fn load_root_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.encoder.with(|e| e.load_state_dict(self.what, tensors))
    }

    fn prompt_forward(&self, train: bool) -> PluginResult<Tensor> {
        self.encoder.with(|e| e.forward(train))
    }
}

fn to_json(v: &Value) -> PluginResult<String> {
    serde_json::to_string_pretty(v).map_err(|e| PluginError::runtime(e.to_string()))
}

/// A prompt method adapts no layer.
fn no_layer(module: &str) -> PluginResult<Box<dyn AdapterLayer>> {
    Err(PluginError::runtime(format!(
        "a prompt-learning method adapts no layer (asked to adapt `{module}`)"
    )))
}

/// Implements the parts of [`AdapterMethod`] that are [`Core`]'s.
macro_rules! core_methods {
    () => {
        fn targets(&self, _module: &str) -> PluginResult<bool> {
            Ok(false)
        }
        fn adapt_linear(
            &self,
            module: &str,
            _base: &dyn BaseLinear,
        ) -> PluginResult<Box<dyn AdapterLayer>> {
            no_layer(module)
        }
        fn capabilities(&self) -> Vec<String> {
            vec![MIXED_BATCH.to_string()]
        }
        fn root_parameters(&self) -> PluginResult<Vec<TrainParam>> {
            self.core.root_parameters()
        }
        fn root_state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
            self.core.root_state_dict()
        }
        fn load_root_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
            self.core.load_root_state_dict(tensors)
        }
        fn prompt(&self) -> PluginResult<Option<PromptSpec>> {
            Ok(self.core.prompt())
        }
        fn prompt_forward(&self, train: bool) -> PluginResult<Tensor> {
            self.core.prompt_forward(train)
        }
    };
}

// ---------------------------------------------------------------- prompt tuning

/// `prompt_tuning`: a learned table of virtual-token embeddings.
pub struct PromptTuning {
    cfg: PromptTuningConfig,
    init: Init,
    core: Core,
}

impl Plugin for PromptTuning {
    const NAME: &'static str = "prompt_tuning";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "prompt tuning: learned virtual-token embeddings (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let (cfg, common, init) = PromptTuningConfig::from_json(config_json)?;
        Ok(Self { cfg, init, core: Core::new(common, PromptKind::VirtualTokens, "prompt tuning") })
    }
    fn config_schema() -> Option<Value> {
        Some(schema_of::<PromptTuningConfig>())
    }
}

/// The token ids of `text` (the folder's `tokenizer.json`, special tokens added as
/// transformers' tokenizer call adds them), repeated or cut to `n` (peft's TEXT init).
fn text_ids(text: &str, folder: &str, n: i64, vocab: i64) -> PluginResult<Vec<i64>> {
    let file = std::path::Path::new(folder).join("tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&file).map_err(|e| {
        PluginError::config(
            "tokenizer_name_or_path",
            format!("cannot read {}: {e}", file.display()),
        )
    })?;
    let enc = tok.encode(text, true).map_err(|e| {
        PluginError::config(
            "prompt_tuning_init_text",
            format!("cannot be tokenized with {}: {e}", file.display()),
        )
    })?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
    if ids.is_empty() {
        return Err(PluginError::config("prompt_tuning_init_text", "gives no token"));
    }
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
        return Err(PluginError::config(
            "tokenizer_name_or_path",
            format!(
                "{} gives token id {bad}, outside the model's vocabulary of {vocab}",
                file.display()
            ),
        ));
    }
    Ok(ids.iter().cycle().take(n as usize).copied().collect())
}

impl AdapterMethod for PromptTuning {
    core_methods!();
    fn begin(&self, model: &ModelInfo) -> PluginResult<()> {
        let dims = self.core.begin(model)?;
        let (n, device) = (self.core.n(), model.word_embeddings.device());
        let rows = |ids: Tensor| -> PluginResult<Tensor> {
            Ok(model
                .word_embeddings
                .f_index_select(0, &ids.f_to_device(device)?)?
                .f_to_kind(tch::Kind::Float)?
                .f_detach_copy()?)
        };
        let table = if self.core.common.inference_mode {
            Encoder::random_table(n, dims.token_dim, device, false)?
        } else {
            match &self.init {
                Init::Random => Encoder::random_table(n, dims.token_dim, device, false)?,
                Init::SampleVocab => {
                    rows(Tensor::f_randint(model.vocab_size, [n], (tch::Kind::Int64, device))?)?
                }
                Init::Text { text, tokenizer } => {
                    rows(Tensor::from_slice(&text_ids(text, tokenizer, n, model.vocab_size)?))?
                }
            }
        };
        self.core.encoder.set(Encoder::table(table))
    }
    fn peft_config(&self) -> PluginResult<String> {
        to_json(&self.cfg.peft_config(&self.core.common, self.core.dims()))
    }
}

// ---------------------------------------------------------------- P-tuning

/// `p_tuning`: virtual tokens from a table through peft's `PromptEncoder` (MLP or LSTM).
pub struct PTuning {
    cfg: PTuningConfig,
    encoder_type: EncoderType,
    core: Core,
}

impl Plugin for PTuning {
    const NAME: &'static str = "p_tuning";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "P-tuning: virtual tokens from an MLP or LSTM prompt encoder (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let (cfg, common, encoder_type) = PTuningConfig::from_json(config_json)?;
        Ok(Self {
            cfg,
            encoder_type,
            core: Core::new(common, PromptKind::VirtualTokens, "P-tuning"),
        })
    }
    fn config_schema() -> Option<Value> {
        Some(schema_of::<PTuningConfig>())
    }
}

impl AdapterMethod for PTuning {
    core_methods!();
    fn begin(&self, model: &ModelInfo) -> PluginResult<()> {
        let dims = self.core.begin(model)?;
        let (n, d, device) = (self.core.n(), dims.token_dim, model.word_embeddings.device());
        let h = self.cfg.encoder_hidden_size.unwrap_or(d);
        let e = if self.core.common.inference_mode {
            Encoder::table(Encoder::random_table(n, d, device, false)?)
        } else {
            match self.encoder_type {
                EncoderType::Mlp => Encoder::mlp(n, d, &[h, h, d], false, device)?,
                EncoderType::Lstm => Encoder::lstm(
                    n,
                    d,
                    h,
                    self.cfg.encoder_num_layers,
                    self.cfg.encoder_dropout,
                    device,
                )?,
            }
        };
        self.core.encoder.set(e)
    }
    fn peft_config(&self) -> PluginResult<String> {
        to_json(&self.cfg.peft_config(&self.core.common, self.core.dims()))
    }
}

// ---------------------------------------------------------------- prefix tuning

/// `prefix_tuning`: learned keys and values before every layer's own (peft's `PrefixEncoder`).
pub struct PrefixTuning {
    cfg: PrefixTuningConfig,
    core: Core,
}

impl Plugin for PrefixTuning {
    const NAME: &'static str = "prefix_tuning";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "prefix tuning: learned keys and values before every layer's (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let (cfg, common) = PrefixTuningConfig::from_json(config_json)?;
        Ok(Self { cfg, core: Core::new(common, PromptKind::KvPrefix, "prefix tuning") })
    }
    fn config_schema() -> Option<Value> {
        Some(schema_of::<PrefixTuningConfig>())
    }
}

impl AdapterMethod for PrefixTuning {
    core_methods!();
    fn begin(&self, model: &ModelInfo) -> PluginResult<()> {
        let dims = self.core.begin(model)?;
        let (n, d, device) = (self.core.n(), dims.token_dim, model.word_embeddings.device());
        let width = dims.num_layers * 2 * d;
        let zero = self.cfg.init_weights.is_some();
        let e = if self.cfg.prefix_projection && !self.core.common.inference_mode {
            let h = self.cfg.encoder_hidden_size.unwrap_or(d);
            let e = Encoder::mlp(n, d, &[h, width], true, device)?;
            if zero {
                e.zero_last()?;
            }
            e
        } else {
            Encoder::table(Encoder::random_table(
                n,
                width,
                device,
                zero && !self.core.common.inference_mode,
            )?)
        };
        self.core.encoder.set(e)
    }
    fn peft_config(&self) -> PluginResult<String> {
        to_json(&self.cfg.peft_config(&self.core.common, self.core.dims()))
    }
}

export_plugin!(adapter: PromptTuning, adapter: PTuning, adapter: PrefixTuning);

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schemas_match_the_parsers() {
        let required = json!({"num_virtual_tokens": 4});
        let s = assert_schema_matches::<PromptTuning>(required.clone());
        assert_eq!(s["required"], json!(["num_virtual_tokens"]));
        assert_eq!(s["properties"]["prompt_tuning_init"]["default"], "RANDOM");
        let s = assert_schema_matches::<PTuning>(required.clone());
        assert_eq!(s["properties"]["encoder_num_layers"]["default"], 2);
        assert_eq!(s["properties"]["encoder_num_layers"]["maximum"], 64);
        assert_eq!(s["required"], json!(["num_virtual_tokens"]));
        assert_schema_matches::<PrefixTuning>(required);
        let e = PTuning::from_config("{}").err().unwrap().to_string();
        assert!(e.contains("num_virtual_tokens"), "{e}");
    }
}
