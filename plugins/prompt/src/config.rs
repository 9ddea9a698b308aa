//! The configurations of the three prompt-learning methods: peft 0.21's
//! `PromptTuningConfig`, `PromptEncoderConfig` (P-tuning) and `PrefixTuningConfig` keys, their
//! defaults and validation (errors name the key), the keys every prompt-learning configuration
//! carries (`num_virtual_tokens`, `token_dim`, `num_transformer_submodules`,
//! `num_attention_heads`, `num_layers`), checked against the model, and the
//! `adapter_config.json` peft loads.
//!
//! Example (`adapter: {plugin: p_tuning, ...}` in a run config):
//! ```text
//! {"num_virtual_tokens": 8, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 32}
//! ```
use ferrotune_plugin_api::{ModelInfo, PluginError, PluginResult};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The keys every peft prompt-learning configuration has (`PromptLearningConfig`), as given.
#[derive(Debug, Clone)]
pub struct Common {
    pub num_virtual_tokens: i64,
    pub token_dim: Option<i64>,
    pub num_transformer_submodules: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub num_layers: Option<i64>,
    /// peft's "loaded for inference": the saved `prompt_embeddings` is the whole adapter (a
    /// table, no encoder), as peft's `PeftModel.from_pretrained` runs it.
    pub inference_mode: bool,
}

/// The model's sizes a prompt-learning configuration records (peft's
/// `_prepare_prompt_learning_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// peft's `token_dim`: the hidden size, or for prefix tuning `num_key_value_heads ·
    /// head_dim` (its grouped-query adjustment).
    pub token_dim: i64,
    /// peft's `num_attention_heads` (`num_key_value_heads` for prefix tuning).
    pub num_attention_heads: i64,
    pub num_layers: i64,
}

/// Defines a configuration struct: the [`Common`] keys, then the method's own.
macro_rules! prompt_config {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Deserialize, JsonSchema, Debug, Clone)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Positions the adapter puts before the input (required, ≥ 1; the host bounds it
            /// by the model's `max_position_embeddings`).
            #[schemars(required, range(min = 1))]
            pub num_virtual_tokens: Option<i64>,
            /// The model's width peft recorded (`hidden_size`; prefix tuning:
            /// `num_key_value_heads · head_dim`): accepted when it agrees with the model.
            #[serde(default)]
            #[schemars(range(min = 1))]
            pub token_dim: Option<i64>,
            /// 1 for a decoder-only model (accepted only at 1).
            #[serde(default)]
            #[schemars(range(min = 1, max = 1))]
            pub num_transformer_submodules: Option<i64>,
            /// The model's attention heads peft recorded (prefix tuning: key/value heads).
            #[serde(default)]
            #[schemars(range(min = 1))]
            pub num_attention_heads: Option<i64>,
            /// The model's decoder layers peft recorded.
            #[serde(default)]
            #[schemars(range(min = 1))]
            pub num_layers: Option<i64>,
            /// Not supported for prompt-learning methods (null or empty only).
            #[serde(default)]
            pub modules_to_save: Option<Vec<String>>,
            /// `true`: the adapter is its saved `prompt_embeddings` table (peft's inference
            /// mode; set when a PEFT directory is loaded). Default false.
            #[serde(default)]
            pub inference_mode: bool,
            $($(#[$fm])* pub $field: $ty,)*
        }

        impl $name {
            pub fn common(&self) -> PluginResult<Common> {
                let n = self.num_virtual_tokens.ok_or_else(|| {
                    PluginError::config("num_virtual_tokens", "is required (the number of virtual tokens, e.g. 8)")
                })?;
                if n < 1 {
                    return Err(PluginError::config("num_virtual_tokens", format!("= {n}: must be at least 1")));
                }
                for (key, v) in [
                    ("token_dim", self.token_dim),
                    ("num_attention_heads", self.num_attention_heads),
                    ("num_layers", self.num_layers),
                ] {
                    if let Some(v) = v.filter(|v| *v < 1) {
                        return Err(PluginError::config(key, format!("= {v}: must be at least 1")));
                    }
                }
                if let Some(s) = self.num_transformer_submodules.filter(|s| *s != 1) {
                    return Err(PluginError::config(
                        "num_transformer_submodules",
                        format!("= {s}: a decoder-only model has 1 (2 is peft's value for encoder-decoder models)"),
                    ));
                }
                if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
                    return Err(PluginError::config(
                        "modules_to_save",
                        "is not supported with a prompt-learning method (leave it null or empty)",
                    ));
                }
                Ok(Common {
                    num_virtual_tokens: n,
                    token_dim: self.token_dim,
                    num_transformer_submodules: self.num_transformer_submodules,
                    num_attention_heads: self.num_attention_heads,
                    num_layers: self.num_layers,
                    inference_mode: self.inference_mode,
                })
            }
        }
    };
}

prompt_config! {
    /// `prompt_tuning` (peft's `PromptTuningConfig`): a learned `[num_virtual_tokens, hidden]`
    /// table put before the input embeddings.
    PromptTuningConfig {
        /// How the table starts: `RANDOM` (default; N(0, 1), torch's `nn.Embedding`),
        /// `TEXT` (the embeddings of `prompt_tuning_init_text`'s tokens, repeated or cut to
        /// `num_virtual_tokens`) or `SAMPLE_VOCAB` (the embeddings of uniformly drawn token ids).
        #[serde(default = "default_init")]
        #[schemars(extend("enum" = ["RANDOM", "TEXT", "SAMPLE_VOCAB"]))]
        prompt_tuning_init: String,
        /// The text of `TEXT` (required with it).
        #[serde(default)]
        prompt_tuning_init_text: Option<String>,
        /// A folder holding the `tokenizer.json` that tokenizes the text of `TEXT` (required
        /// with it; peft's `AutoTokenizer.from_pretrained` argument).
        #[serde(default)]
        tokenizer_name_or_path: Option<String>,
        /// peft's arguments to `AutoTokenizer.from_pretrained` (`TEXT` only): only
        /// `trust_remote_code`, which peft drops, is accepted.
        #[serde(default)]
        tokenizer_kwargs: Option<Map<String, Value>>,
    }
}

prompt_config! {
    /// `p_tuning` (peft's `PromptEncoderConfig`): a `[num_virtual_tokens, hidden]` table
    /// reparameterized by an MLP or a bidirectional LSTM + MLP head (peft's `PromptEncoder`).
    PTuningConfig {
        /// `MLP` (default; three linear layers with ReLU) or `LSTM` (a bidirectional LSTM of
        /// `encoder_num_layers` layers, then two linear layers with ReLU).
        #[serde(default = "default_encoder_type")]
        #[schemars(extend("enum" = ["MLP", "LSTM"]))]
        encoder_reparameterization_type: String,
        /// The encoder's width (default: the model's hidden size).
        #[serde(default)]
        #[schemars(range(min = 1, max = 65536))]
        encoder_hidden_size: Option<i64>,
        /// The LSTM's layers (default 2; peft ignores it for `MLP`, which has 3 linear layers).
        #[serde(default = "default_encoder_layers")]
        #[schemars(range(min = 1, max = 64))]
        encoder_num_layers: i64,
        /// Dropout between the LSTM's layers while training (default 0.0; unused by `MLP`).
        #[serde(default)]
        #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
        encoder_dropout: f64,
    }
}

prompt_config! {
    /// `prefix_tuning` (peft's `PrefixTuningConfig`): learned keys and values of
    /// `num_virtual_tokens` positions before every layer's own.
    PrefixTuningConfig {
        /// Whether a `[num_virtual_tokens, token_dim]` table goes through a two-layer tanh MLP
        /// to the prefix (default false: the prefix is the table itself).
        #[serde(default)]
        prefix_projection: bool,
        /// The projection's width (default: `token_dim`).
        #[serde(default)]
        #[schemars(range(min = 1, max = 65536))]
        encoder_hidden_size: Option<i64>,
        /// `"zero"`: the prefix starts at zeros (the table, or the projection's last layer);
        /// default null: random.
        #[serde(default)]
        #[schemars(extend("enum" = ["zero", null]))]
        init_weights: Option<String>,
    }
}

fn default_init() -> String {
    "RANDOM".into()
}
fn default_encoder_type() -> String {
    "MLP".into()
}
fn default_encoder_layers() -> i64 {
    2
}

/// How prompt tuning's table starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    Random,
    SampleVocab,
    Text { text: String, tokenizer: String },
}

impl PromptTuningConfig {
    pub fn from_json(json: &str) -> PluginResult<(Self, Common, Init)> {
        let cfg: Self = ferrotune_plugin_api::parse_config(json)?;
        let common = cfg.common()?;
        let init = match cfg.prompt_tuning_init.as_str() {
            "RANDOM" => Init::Random,
            "SAMPLE_VOCAB" => Init::SampleVocab,
            "TEXT" => {
                let text = cfg.prompt_tuning_init_text.clone().ok_or_else(|| {
                    PluginError::config(
                        "prompt_tuning_init_text",
                        "is required when prompt_tuning_init is TEXT",
                    )
                })?;
                let tokenizer = cfg.tokenizer_name_or_path.clone().filter(|t| !t.is_empty()).ok_or_else(|| {
                    PluginError::config(
                        "tokenizer_name_or_path",
                        "is required when prompt_tuning_init is TEXT (a folder holding tokenizer.json)",
                    )
                })?;
                Init::Text { text, tokenizer }
            }
            other => {
                return Err(PluginError::config(
                    "prompt_tuning_init",
                    format!("\"{other}\" is not one of RANDOM, TEXT, SAMPLE_VOCAB"),
                ))
            }
        };
        if let Some(kw) = cfg.tokenizer_kwargs.as_ref().filter(|k| !k.is_empty()) {
            if !matches!(init, Init::Text { .. }) {
                return Err(PluginError::config(
                    "tokenizer_kwargs",
                    "is only valid with prompt_tuning_init TEXT (as peft)",
                ));
            }
            // a saved table is not initialised: the tokenizer is not read
            let unread = common.inference_mode;
            if let Some(k) = kw.keys().find(|k| *k != "trust_remote_code").filter(|_| !unread) {
                return Err(PluginError::config(
                    &format!("tokenizer_kwargs.{k}"),
                    "is not supported: the text is tokenized with the folder's tokenizer.json as it is",
                ));
            }
        }
        Ok((cfg, common, init))
    }

    pub fn peft_config(&self, c: &Common, dims: Option<Dims>) -> Value {
        let mut v = common_json("PROMPT_TUNING", c, dims);
        let o = v.as_object_mut().expect("object");
        o.insert("prompt_tuning_init".into(), json!(self.prompt_tuning_init));
        o.insert("prompt_tuning_init_text".into(), json!(self.prompt_tuning_init_text));
        o.insert("tokenizer_name_or_path".into(), json!(self.tokenizer_name_or_path));
        o.insert("tokenizer_kwargs".into(), json!(self.tokenizer_kwargs));
        v
    }
}

/// P-tuning's encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderType {
    Mlp,
    Lstm,
}

impl PTuningConfig {
    pub fn from_json(json: &str) -> PluginResult<(Self, Common, EncoderType)> {
        let cfg: Self = ferrotune_plugin_api::parse_config(json)?;
        let common = cfg.common()?;
        let kind = match cfg.encoder_reparameterization_type.as_str() {
            "MLP" => EncoderType::Mlp,
            "LSTM" => EncoderType::Lstm,
            other => {
                return Err(PluginError::config(
                    "encoder_reparameterization_type",
                    format!("\"{other}\" is not one of MLP, LSTM"),
                ))
            }
        };
        check_hidden(cfg.encoder_hidden_size)?;
        if cfg.encoder_num_layers < 1 || cfg.encoder_num_layers > 64 {
            return Err(PluginError::config(
                "encoder_num_layers",
                format!("= {}: must be between 1 and 64", cfg.encoder_num_layers),
            ));
        }
        if !(0.0..1.0).contains(&cfg.encoder_dropout) {
            return Err(PluginError::config(
                "encoder_dropout",
                format!("= {}: must be in [0, 1)", cfg.encoder_dropout),
            ));
        }
        Ok((cfg, common, kind))
    }

    pub fn peft_config(&self, c: &Common, dims: Option<Dims>) -> Value {
        let mut v = common_json("P_TUNING", c, dims);
        let o = v.as_object_mut().expect("object");
        o.insert(
            "encoder_reparameterization_type".into(),
            json!(self.encoder_reparameterization_type),
        );
        o.insert(
            "encoder_hidden_size".into(),
            json!(self.encoder_hidden_size.or(dims.map(|d| d.token_dim))),
        );
        o.insert("encoder_num_layers".into(), json!(self.encoder_num_layers));
        o.insert("encoder_dropout".into(), json!(self.encoder_dropout));
        v
    }
}

impl PrefixTuningConfig {
    pub fn from_json(json: &str) -> PluginResult<(Self, Common)> {
        let cfg: Self = ferrotune_plugin_api::parse_config(json)?;
        let common = cfg.common()?;
        check_hidden(cfg.encoder_hidden_size)?;
        if let Some(w) = cfg.init_weights.as_deref().filter(|w| *w != "zero") {
            return Err(PluginError::config(
                "init_weights",
                format!("\"{w}\" is not supported: null (random) or \"zero\""),
            ));
        }
        Ok((cfg, common))
    }

    pub fn peft_config(&self, c: &Common, dims: Option<Dims>) -> Value {
        let mut v = common_json("PREFIX_TUNING", c, dims);
        let o = v.as_object_mut().expect("object");
        o.insert("prefix_projection".into(), json!(self.prefix_projection));
        o.insert(
            "encoder_hidden_size".into(),
            json!(self.encoder_hidden_size.or(dims.map(|d| d.token_dim))),
        );
        o.insert("init_weights".into(), json!(self.init_weights));
        v
    }
}

fn check_hidden(h: Option<i64>) -> PluginResult<()> {
    match h {
        Some(h) if !(1..=1 << 16).contains(&h) => Err(PluginError::config(
            "encoder_hidden_size",
            format!("= {h}: must be between 1 and 65536"),
        )),
        _ => Ok(()),
    }
}

/// The keys peft writes for every prompt-learning method.
fn common_json(peft_type: &str, c: &Common, dims: Option<Dims>) -> Value {
    json!({
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "revision": null,
        "inference_mode": true,
        "modules_to_save": null,
        "num_virtual_tokens": c.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "token_dim": dims.map(|d| d.token_dim).or(c.token_dim),
        "num_attention_heads": dims.map(|d| d.num_attention_heads).or(c.num_attention_heads),
        "num_layers": dims.map(|d| d.num_layers).or(c.num_layers),
    })
}

impl Common {
    /// The model's sizes as peft records them (`prefix`: the grouped-query adjustment), each
    /// key the configuration gives checked against them (refused by name when they disagree).
    pub fn dims(&self, model: &ModelInfo, prefix: bool) -> PluginResult<Dims> {
        let dims = if prefix {
            Dims {
                token_dim: model.num_key_value_heads * model.head_dim,
                num_attention_heads: model.num_key_value_heads,
                num_layers: model.num_layers,
            }
        } else {
            Dims {
                token_dim: model.hidden_size,
                num_attention_heads: model.num_attention_heads,
                num_layers: model.num_layers,
            }
        };
        let why = if prefix {
            "prefix tuning's token_dim is num_key_value_heads · head_dim and num_attention_heads the key/value heads"
        } else {
            "the model's hidden size and attention heads"
        };
        for (key, given, want) in [
            ("token_dim", self.token_dim, dims.token_dim),
            ("num_attention_heads", self.num_attention_heads, dims.num_attention_heads),
            ("num_layers", self.num_layers, dims.num_layers),
        ] {
            if let Some(g) = given.filter(|g| *g != want) {
                return Err(PluginError::config(
                    key,
                    format!("= {g} does not agree with the model, which gives {want} ({why}): the adapter was made for another model"),
                ));
            }
        }
        Ok(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: PluginResult<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn keys_are_validated_by_name() {
        for (json, key) in [
            (r#"{}"#, "`num_virtual_tokens`"),
            (r#"{"num_virtual_tokens": 0}"#, "`num_virtual_tokens`"),
            (r#"{"num_virtual_tokens": 4, "r": 8}"#, "`r`"),
            (r#"{"num_virtual_tokens": 4, "prompt_tuning_init": "ZERO"}"#, "`prompt_tuning_init`"),
            (
                r#"{"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"}"#,
                "`prompt_tuning_init_text`",
            ),
            (
                r#"{"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}"#,
                "`tokenizer_name_or_path`",
            ),
            (
                r#"{"num_virtual_tokens": 4, "tokenizer_kwargs": {"use_fast": true}}"#,
                "`tokenizer_kwargs`",
            ),
            (
                r#"{"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi",
                    "tokenizer_name_or_path": "t", "tokenizer_kwargs": {"use_fast": true}}"#,
                "`tokenizer_kwargs.use_fast`",
            ),
            (
                r#"{"num_virtual_tokens": 4, "num_transformer_submodules": 2}"#,
                "`num_transformer_submodules`",
            ),
            (r#"{"num_virtual_tokens": 4, "modules_to_save": ["lm_head"]}"#, "`modules_to_save`"),
            (r#"{"num_virtual_tokens": 4, "prefix_projection": true}"#, "`prefix_projection`"),
        ] {
            let e = err(PromptTuningConfig::from_json(json));
            assert!(e.contains(key), "{json}: {e}");
        }
        for (json, key) in [
            (
                r#"{"num_virtual_tokens": 4, "encoder_reparameterization_type": "GRU"}"#,
                "`encoder_reparameterization_type`",
            ),
            (r#"{"num_virtual_tokens": 4, "encoder_hidden_size": 0}"#, "`encoder_hidden_size`"),
            (r#"{"num_virtual_tokens": 4, "encoder_dropout": 1.5}"#, "`encoder_dropout`"),
            (r#"{"num_virtual_tokens": 4, "encoder_num_layers": 0}"#, "`encoder_num_layers`"),
        ] {
            let e = err(PTuningConfig::from_json(json));
            assert!(e.contains(key), "{json}: {e}");
        }
        let e = err(PrefixTuningConfig::from_json(
            r#"{"num_virtual_tokens": 4, "init_weights": "ones"}"#,
        ));
        assert!(e.contains("`init_weights`"), "{e}");
        // a saved directory (inference mode) never reads its tokenizer
        PromptTuningConfig::from_json(
            r#"{"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi",
                "tokenizer_name_or_path": "t", "tokenizer_kwargs": {"use_fast": true}, "inference_mode": true}"#,
        )
        .unwrap();
        let (_, c, init) = PromptTuningConfig::from_json(r#"{"num_virtual_tokens": 4}"#).unwrap();
        assert_eq!((c.num_virtual_tokens, c.inference_mode, init), (4, false, Init::Random));
        let (cfg, _, kind) = PTuningConfig::from_json(r#"{"num_virtual_tokens": 4}"#).unwrap();
        assert_eq!((kind, cfg.encoder_num_layers, cfg.encoder_dropout), (EncoderType::Mlp, 2, 0.0));
    }
}
