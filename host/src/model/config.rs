//! `config.json` of a Llama-family checkpoint (Llama, Qwen2, Qwen3, Mistral), read with the
//! Hugging Face key names, checked, and resolved into what the decoder needs (head sizes,
//! biases, per-head q/k norms, the RoPE variant, sliding-window layers).
//!
//! Both the transformers 5 layout (`rope_parameters` holding `rope_theta` and the scaling) and
//! the 4.x one (top-level `rope_theta`, `rope_scaling` keyed by `type` or `rope_type`) are read.
//! A Qwen2-VL `config.json` is read too: its text part (the nested `text_config`, or the older
//! flat keys) becomes this config; the vision part is [`super::qwen2vl::Qwen2VLConfig`]'s.
//!
//! Qwen3 (`Qwen3ForCausalLM`) features this decoder does not implement are refused by key:
//! `use_sliding_window: true`, `sliding_attention` in `layer_types`, a non-zero
//! `attention_dropout`, and (as for every member) RoPE types other than default, linear and
//! llama3 (Qwen3's long-context `yarn` included).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The architectures this decoder implements, by their `architectures` name.
pub const SUPPORTED_ARCHITECTURES: [&str; 6] = [
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
];

/// Which member of the family a checkpoint is; decides the biases and the sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// q/k/v/o biases when `attention_bias`, MLP biases when `mlp_bias`.
    Llama,
    /// q/k/v biases always, no o_proj bias; sliding window only with `use_sliding_window`.
    Qwen2,
    /// Qwen3: q/k/v/o biases when `attention_bias`; an RMSNorm over each head of q and of k
    /// (`self_attn.q_norm`, `self_attn.k_norm`) before RoPE; an explicit `head_dim`.
    Qwen3,
    /// No biases; every layer uses `sliding_window` when it is set.
    Mistral,
    /// Qwen2-VL: a Qwen2 decoder (under `model.language_model`) with M-RoPE and a vision tower.
    Qwen2VL,
    /// Qwen2.5-VL: Qwen2-VL's decoder and M-RoPE (time scaled by `second_per_grid_ts`) with a
    /// windowed RMSNorm / SwiGLU vision tower.
    Qwen25VL,
}

impl Architecture {
    /// Qwen2-VL or Qwen2.5-VL: a vision tower and M-RoPE over a Qwen2 decoder.
    pub fn is_qwen_vl(self) -> bool {
        matches!(self, Architecture::Qwen2VL | Architecture::Qwen25VL)
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2VL => "Qwen2VLForConditionalGeneration",
            Architecture::Qwen25VL => "Qwen2_5_VLForConditionalGeneration",
        }
    }
    /// transformers' sequence-classification class of this architecture (a reward model's),
    /// if it has one.
    pub fn seq_cls_name(self) -> Option<&'static str> {
        match self {
            Architecture::Llama => Some("LlamaForSequenceClassification"),
            Architecture::Qwen2 => Some("Qwen2ForSequenceClassification"),
            Architecture::Qwen3 => Some("Qwen3ForSequenceClassification"),
            Architecture::Mistral => Some("MistralForSequenceClassification"),
            Architecture::Qwen2VL | Architecture::Qwen25VL => None,
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2VL => "qwen2_vl",
            Architecture::Qwen25VL => "qwen2_5_vl",
        }
    }
    fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2VLForConditionalGeneration" => Some(Architecture::Qwen2VL),
            "Qwen2_5_VLForConditionalGeneration" => Some(Architecture::Qwen25VL),
            "LlamaForSequenceClassification" => Some(Architecture::Llama),
            "Qwen2ForSequenceClassification" => Some(Architecture::Qwen2),
            "Qwen3ForSequenceClassification" => Some(Architecture::Qwen3),
            "MistralForSequenceClassification" => Some(Architecture::Mistral),
            _ => None,
        }
    }
    fn from_model_type(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            "qwen3" => Some(Architecture::Qwen3),
            "mistral" => Some(Architecture::Mistral),
            "qwen2_vl" => Some(Architecture::Qwen2VL),
            "qwen2_5_vl" => Some(Architecture::Qwen25VL),
            _ => None,
        }
    }
}

/// One token id or several (`eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (4.x): the RoPE variant and its knobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `default`, `linear` or `llama3` (others are refused). Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The 4.x spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// RoPE base; overrides the top-level `rope_theta`. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `linear`: positions divided by `factor`; `llama3`: low frequencies divided by it (8 for Llama 3.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3` only (1 for Llama 3.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3` only (4 for Llama 3.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// `llama3` only (8192 for Llama 3.1); defaults to `max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<i64>,
    /// Only 1.0 (the whole head rotated) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Qwen2-VL's M-RoPE: how many of the `head_dim / 2` frequencies follow the temporal, height
    /// and width position (`[16, 24, 24]` for Qwen2-VL 7B); must sum to `head_dim / 2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrope_section: Option<Vec<i64>>,
}

/// The resolved RoPE variant: how `inv_freq` is computed (transformers' `ROPE_INIT_FUNCTIONS`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rope {
    Default {
        theta: f64,
    },
    Linear {
        theta: f64,
        factor: f64,
    },
    Llama3 {
        theta: f64,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
}

/// A Llama-family `config.json`. Field names are the Hugging Face keys; keys this decoder
/// does not use are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// e.g. `["Qwen2ForCausalLM"]`; decides the architecture when present.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// `llama`, `qwen2`, `qwen3` or `mistral`; used when `architectures` is absent.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the residual stream (64 in the `tiny` preset, 4096 for Llama 2 7B).
    pub hidden_size: i64,
    /// Width of the SwiGLU MLP (usually about 8/3 of `hidden_size`, rounded).
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Grouped-query attention: heads of keys/values. Default: `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Default: `hidden_size / num_attention_heads` (Qwen3: 128, which may differ from it).
    #[serde(default)]
    pub head_dim: Option<i64>,
    /// Default 1e-6.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// 4.x layout; transformers 5 puts it inside `rope_parameters`. Default 10000.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// 4.x layout of the RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5 layout of the RoPE parameters (wins over `rope_scaling`).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    pub max_position_embeddings: i64,
    pub vocab_size: i64,
    /// lm_head shares the embedding matrix. Default false.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama, Qwen3: biases on q/k/v/o. Default false.
    #[serde(default)]
    pub attention_bias: bool,
    /// Dropout on the attention weights in training: not implemented, so Qwen3 refuses any
    /// value but 0 by name (the other members ignore the key, as before). Default 0.
    #[serde(default)]
    pub attention_dropout: Option<f64>,
    /// Llama: biases on the MLP. Default false.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Only `silu` (SwiGLU) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Mistral: window of every layer; Qwen2: window of the sliding layers when
    /// `use_sliding_window`. A token sees the `sliding_window` latest positions, itself included.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    /// Qwen2 only (Qwen3 refuses `true`). Default false.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Qwen2: layers from this index on slide (when `layer_types` is absent). Default 28.
    #[serde(default)]
    pub max_window_layers: Option<i64>,
    /// Qwen2 (transformers 5): `full_attention` / `sliding_attention` per layer (Qwen3: only
    /// `full_attention`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Default 0.02; used by `init-model`.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// 4.x spelling of `dtype`: the dtype the weights were saved in.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_initializer_range() -> f64 {
    0.02
}

impl LlamaConfig {
    /// Reads and checks `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and checks a `config.json`; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read {}: a Hugging Face model directory needs a config.json",
                path.display()
            )
        })?;
        Self::from_json(&text, path)
    }

    /// Parses `config.json` text; `path` is only used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        // The architecture first, so that an unsupported model is refused by name rather than
        // by whichever of its keys happens not to parse.
        let value = match architecture_of(&value, path)? {
            a @ (Architecture::Qwen2VL | Architecture::Qwen25VL) => {
                super::qwen2vl::config::text_config_value(&value, path, a)?
            }
            _ => value,
        };
        let config: LlamaConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            anyhow::anyhow!("{}: key `{key}`: {}", path.display(), e.inner())
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Which architecture this is (from `architectures`, else `model_type`).
    pub fn architecture(&self) -> Architecture {
        if let Some(a) = self
            .architectures
            .as_ref()
            .and_then(|a| a.first())
            .and_then(|a| Architecture::from_hf_name(a))
        {
            return a;
        }
        self.model_type
            .as_deref()
            .and_then(Architecture::from_model_type)
            .unwrap_or(Architecture::Llama)
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `head_dim`, else transformers' default: 128 for Qwen3 (its config class's default),
    /// `hidden_size / num_attention_heads` for the others.
    pub fn head_dim(&self) -> i64 {
        match (self.head_dim, self.architecture()) {
            (Some(d), _) => d,
            (None, Architecture::Qwen3) => 128,
            (None, _) => self.hidden_size / self.num_attention_heads.max(1),
        }
    }

    /// Biases on q_proj, k_proj, v_proj.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture() {
            Architecture::Llama => self.attention_bias,
            Architecture::Qwen2 | Architecture::Qwen2VL | Architecture::Qwen25VL => true,
            Architecture::Qwen3 => self.attention_bias,
            Architecture::Mistral => false,
        }
    }

    /// Bias on o_proj.
    pub fn o_bias(&self) -> bool {
        matches!(self.architecture(), Architecture::Llama | Architecture::Qwen3)
            && self.attention_bias
    }

    /// Qwen3: an RMSNorm of `head_dim` over each head of q and of k after their projections.
    pub fn qk_norm(&self) -> bool {
        self.architecture() == Architecture::Qwen3
    }

    /// Biases on gate/up/down_proj.
    pub fn mlp_bias(&self) -> bool {
        self.architecture() == Architecture::Llama && self.mlp_bias
    }

    /// The sliding window of layer `layer`, `None` for full attention (as transformers decides).
    pub fn sliding_window_of_layer(&self, layer: i64) -> Option<i64> {
        match self.architecture() {
            // Qwen3's sliding window is refused at load (`refuse_unimplemented_qwen3`).
            Architecture::Llama | Architecture::Qwen3 => None,
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen2VL | Architecture::Qwen25VL => {
                let window = if self.use_sliding_window { self.sliding_window } else { None };
                let window = window?;
                let sliding = match &self.layer_types {
                    Some(types) => {
                        types.get(layer as usize).map(|t| t == "sliding_attention").unwrap_or(false)
                    }
                    None => layer >= self.max_window_layers.unwrap_or(28),
                };
                sliding.then_some(window)
            }
        }
    }

    /// The RoPE parameters as one dict (`rope_parameters`, else `rope_scaling`, else none).
    fn rope_dict(&self) -> (&'static str, RopeParameters) {
        match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) => ("rope_parameters", p.clone()),
            (None, Some(s)) => ("rope_scaling", s.clone()),
            (None, None) => ("rope_parameters", RopeParameters::default()),
        }
    }

    /// The RoPE variant with every parameter resolved.
    pub fn rope(&self) -> Result<Rope> {
        self.rope_checked(Path::new("config.json"))
    }

    fn rope_checked(&self, path: &Path) -> Result<Rope> {
        let (key, p) = self.rope_dict();
        let theta = p.rope_theta.or(self.rope_theta).unwrap_or(10000.0);
        if theta.is_nan() || theta <= 0.0 {
            bail!("{}: key `rope_theta` must be positive, got {theta}", path.display());
        }
        if let Some(f) = p.partial_rotary_factor {
            if f != 1.0 {
                bail!(
                    "{}: key `{key}.partial_rotary_factor` = {f} is not supported (only 1.0)",
                    path.display()
                );
            }
        }
        let kind = p.rope_type.clone().or(p.type_.clone()).unwrap_or_else(|| "default".to_string());
        let need = |name: &str, v: Option<f64>| -> Result<f64> {
            let v = v.with_context(|| {
                format!("{}: key `{key}.{name}` is required for rope_type `{kind}`", path.display())
            })?;
            if v.is_nan() || v <= 0.0 {
                bail!("{}: key `{key}.{name}` must be positive, got {v}", path.display());
            }
            Ok(v)
        };
        Ok(match kind.as_str() {
            // Qwen2-VL's 4.x configs say `mrope`: default frequencies, split by `mrope_section`.
            "default" | "mrope" => Rope::Default { theta },
            "linear" => Rope::Linear { theta, factor: need("factor", p.factor)? },
            "llama3" => {
                let low = need("low_freq_factor", p.low_freq_factor)?;
                let high = need("high_freq_factor", p.high_freq_factor)?;
                if high <= low {
                    bail!("{}: key `{key}.high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})", path.display());
                }
                Rope::Llama3 {
                    theta,
                    factor: need("factor", p.factor)?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: p.original_max_position_embeddings.unwrap_or(self.max_position_embeddings),
                }
            }
            other => bail!(
                "{}: key `{key}.rope_type` = `{other}` is not supported (supported: default, linear, llama3)",
                path.display()
            ),
        })
    }

    /// The dtype the checkpoint says its weights are in (`dtype`, else `torch_dtype`).
    pub fn saved_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    /// `eos_token_id` as a list (empty when unset).
    pub fn eos_token_ids(&self) -> Vec<i64> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let file = path.display();
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
        ] {
            if v <= 0 {
                bail!("{file}: key `{key}` must be positive, got {v}");
            }
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            bail!(
                "{file}: key `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.num_kv_heads(),
                self.num_attention_heads
            );
        }
        if self.head_dim.is_none()
            && self.architecture() != Architecture::Qwen3
            && self.hidden_size % self.num_attention_heads != 0
        {
            bail!(
                "{file}: key `hidden_size` ({}) is not a multiple of `num_attention_heads` ({}) and no `head_dim` is given",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.head_dim() % 2 != 0 {
            bail!(
                "{file}: key `head_dim` must be even for rotary embeddings, got {}",
                self.head_dim()
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "{file}: key `hidden_act` = `{}` is not supported (only `silu`)",
                self.hidden_act
            );
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            bail!("{file}: key `rms_norm_eps` must be positive, got {}", self.rms_norm_eps);
        }
        if let Some(w) = self.sliding_window {
            if w <= 0 {
                bail!("{file}: key `sliding_window` must be positive or null, got {w}");
            }
        }
        if matches!(
            self.architecture(),
            Architecture::Qwen2 | Architecture::Qwen2VL | Architecture::Qwen25VL
        ) && self.use_sliding_window
            && self.sliding_window.is_none()
        {
            bail!("{file}: key `use_sliding_window` is true but `sliding_window` is null");
        }
        if let Some(types) = &self.layer_types {
            if types.len() as i64 != self.num_hidden_layers {
                bail!(
                    "{file}: key `layer_types` has {} entries but `num_hidden_layers` is {}",
                    types.len(),
                    self.num_hidden_layers
                );
            }
            if let Some(t) =
                types.iter().find(|t| *t != "full_attention" && *t != "sliding_attention")
            {
                bail!("{file}: key `layer_types` holds `{t}` (supported: full_attention, sliding_attention)");
            }
        }
        self.rope_checked(path)?;
        if self.architecture() == Architecture::Qwen3 {
            self.refuse_unimplemented_qwen3(path)?;
        }
        if self.architecture().is_qwen_vl() {
            let (key, _) = self.rope_dict();
            let section = self.mrope_section();
            if section.len() != 3
                || section.iter().any(|&s| s < 0)
                || section.iter().sum::<i64>() != self.head_dim() / 2
            {
                bail!(
                    "{file}: key `{key}.mrope_section` = {section:?} must be 3 non-negative numbers summing to head_dim / 2 = {}",
                    self.head_dim() / 2
                );
            }
        }
        Ok(())
    }

    /// Qwen3 features this decoder does not implement, each refused by its key.
    fn refuse_unimplemented_qwen3(&self, path: &Path) -> Result<()> {
        let file = path.display();
        if self.use_sliding_window {
            bail!("{file}: key `use_sliding_window` = true is not supported for Qwen3ForCausalLM (sliding-window attention is not implemented for this architecture; set it to false)");
        }
        if let Some(i) = self.layer_types.iter().flatten().position(|t| t == "sliding_attention") {
            bail!("{file}: key `layer_types` marks layer {i} `sliding_attention`, which is not supported for Qwen3ForCausalLM (only `full_attention`)");
        }
        if let Some(p) = self.attention_dropout.filter(|&p| p != 0.0) {
            bail!("{file}: key `attention_dropout` = {p} is not supported (attention dropout is not implemented; only 0.0)");
        }
        Ok(())
    }

    /// Qwen2-VL's M-RoPE split of the `head_dim / 2` frequencies over the temporal, height and
    /// width positions (transformers' default `[16, 24, 24]` when the config has none).
    pub fn mrope_section(&self) -> Vec<i64> {
        self.rope_dict().1.mrope_section.unwrap_or_else(|| vec![16, 24, 24])
    }
}

/// Resolves the architecture of a parsed `config.json`, refusing any other by name.
fn architecture_of(value: &serde_json::Value, path: &Path) -> Result<Architecture> {
    let supported = SUPPORTED_ARCHITECTURES.join(", ");
    if let Some(archs) = value.get("architectures").filter(|a| !a.is_null()) {
        let names: Vec<&str> = archs
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let Some(first) = names.first() else {
            bail!("{}: key `architectures` must be a non-empty list of names (supported: {supported})", path.display());
        };
        return Architecture::from_hf_name(first).with_context(|| {
            format!(
                "unsupported architecture `{first}` in {}; supported: {supported}",
                path.display()
            )
        });
    }
    match value.get("model_type").and_then(|m| m.as_str()) {
        Some(m) => Architecture::from_model_type(m).with_context(|| {
            format!(
                "unsupported architecture (model_type `{m}`) in {}; supported: {supported}",
                path.display()
            )
        }),
        None => bail!(
            "{}: neither `architectures` nor `model_type` is set (supported: {supported})",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<LlamaConfig> {
        let text = format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
                "vocab_size": 100{extra}}}"#
        );
        LlamaConfig::from_json(&text, Path::new("m/config.json"))
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse("").unwrap();
        assert_eq!(c.num_kv_heads(), 4);
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.rope().unwrap(), Rope::Default { theta: 10000.0 });
        assert!(!c.tie_word_embeddings && !c.qkv_bias() && !c.o_bias());
    }

    #[test]
    fn old_and_new_rope_layouts_agree() {
        let old =
            parse(r#", "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}"#)
                .unwrap();
        let new = parse(r#", "rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}"#).unwrap();
        assert_eq!(old.rope().unwrap(), Rope::Linear { theta: 500000.0, factor: 4.0 });
        assert_eq!(old.rope().unwrap(), new.rope().unwrap());
        let l3 = parse(
            r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}"#,
        )
        .unwrap();
        assert_eq!(
            l3.rope().unwrap(),
            Rope::Llama3 {
                theta: 10000.0,
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 128
            }
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse(r#", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json")
                && e.contains("rope_parameters.rope_type")
                && e.contains("yarn"),
            "{e}"
        );
        let e = parse(r#", "num_key_value_heads": 3"#).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = parse(r#", "rms_norm_eps": "small""#).unwrap_err().to_string();
        assert!(e.contains("m/config.json") && e.contains("`rms_norm_eps`"), "{e}");
        let e = parse(r#", "hidden_act": "gelu""#).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
        let e = LlamaConfig::from_json(r#"{"hidden_size": 64}"#.replace('{', r#"{"architectures": ["LlamaForCausalLM"], "#).as_str(), Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x/config.json") && e.contains("intermediate_size"), "{e}");
    }

    #[test]
    fn unsupported_architecture_is_refused_by_name() {
        let e = LlamaConfig::from_json(
            r#"{"architectures": ["GPT2LMHeadModel"], "n_embd": 8}"#,
            Path::new("d/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported architecture `GPT2LMHeadModel` in d/config.json; supported: LlamaForCausalLM"), "{e}");
    }

    fn qwen3(extra: &str) -> Result<LlamaConfig> {
        let text = format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
                "vocab_size": 100, "sliding_window": null, "use_sliding_window": false{extra}}}"#
        );
        LlamaConfig::from_json(&text, Path::new("q3/config.json"))
    }

    #[test]
    fn qwen3_head_dim_biases_and_norms() {
        let c = qwen3(r#", "head_dim": 24, "layer_types": ["full_attention", "full_attention"]"#)
            .unwrap();
        assert_eq!(c.architecture(), Architecture::Qwen3);
        assert_eq!(c.head_dim(), 24);
        assert!(c.qk_norm() && !c.qkv_bias() && !c.o_bias() && !c.mlp_bias());
        assert_eq!(c.sliding_window_of_layer(1), None);
        // transformers' Qwen3Config default head_dim is 128, whatever hidden / heads is.
        assert_eq!(qwen3("").unwrap().head_dim(), 128);
        let b = qwen3(r#", "attention_bias": true, "attention_dropout": 0.0"#).unwrap();
        assert!(b.qkv_bias() && b.o_bias());
        let q2 = parse(r#", "head_dim": 24"#).unwrap();
        assert!(!q2.qk_norm());
    }

    #[test]
    fn qwen3_unimplemented_features_are_refused_by_key() {
        for (extra, key) in [
            (r#", "use_sliding_window": true"#, "`use_sliding_window`"),
            (r#", "layer_types": ["full_attention", "sliding_attention"]"#, "`layer_types`"),
            (r#", "attention_dropout": 0.1"#, "`attention_dropout`"),
            (
                r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
                "`rope_scaling.rope_type`",
            ),
        ] {
            let e = qwen3(extra).unwrap_err().to_string();
            assert!(e.contains("q3/config.json") && e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn sliding_layers() {
        let q = |extra: &str| {
            let text = format!(
                r#"{{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 128,
                    "vocab_size": 100, "sliding_window": 16{extra}}}"#
            );
            LlamaConfig::from_json(&text, Path::new("q/config.json")).unwrap()
        };
        let off = q("");
        assert_eq!(
            (0..3).map(|l| off.sliding_window_of_layer(l)).collect::<Vec<_>>(),
            vec![None, None, None]
        );
        let on = q(r#", "use_sliding_window": true, "max_window_layers": 1"#);
        assert_eq!(
            (0..3).map(|l| on.sliding_window_of_layer(l)).collect::<Vec<_>>(),
            vec![None, Some(16), Some(16)]
        );
        let typed = q(
            r#", "use_sliding_window": true, "layer_types": ["sliding_attention", "full_attention", "full_attention"]"#,
        );
        assert_eq!(typed.sliding_window_of_layer(0), Some(16));
        assert_eq!(typed.sliding_window_of_layer(1), None);
        assert!(on.qkv_bias() && !on.o_bias());
    }
}
