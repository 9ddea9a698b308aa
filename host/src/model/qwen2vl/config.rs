//! The Qwen2-VL parts of `config.json`: the vision tower (`vision_config`), the image / video /
//! vision-start / vision-end token ids, and the flattening of the text part into a
//! [`LlamaConfig`](crate::model::LlamaConfig).
//!
//! Two layouts are read, as transformers 5.24 reads them: the nested one it saves
//! (`text_config`, `vision_config`, `text_config.rope_parameters.mrope_section`) and the older
//! flat one (text keys at the top level, `rope_scaling: {"type": "mrope", "mrope_section": [...]}`).
//!
//! Reference: transformers `models/qwen2_vl/configuration_qwen2_vl.py`.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `vision_config.rope_parameters`: the vision tower's 2-D rotary embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionRopeParameters {
    /// Default 10000.
    #[serde(default = "default_vision_theta")]
    pub rope_theta: f64,
    /// Only `axial` (the default) exists for Qwen2-VL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
}

impl Default for VisionRopeParameters {
    fn default() -> Self {
        Self { rope_theta: default_vision_theta(), rope_type: None }
    }
}

/// `vision_config` of a Qwen2-VL checkpoint. Field names are the Hugging Face keys; the
/// defaults are transformers' (Qwen2-VL 7B).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Vision transformer blocks (32).
    #[serde(default = "d_depth")]
    pub depth: i64,
    /// Width of the vision blocks (1280).
    #[serde(default = "d_embed_dim")]
    pub embed_dim: i64,
    /// Output width of the patch merger: must equal the text `hidden_size`.
    #[serde(default = "d_hidden_size")]
    pub hidden_size: i64,
    /// Activation of the block MLPs: `quick_gelu` (default), `gelu`, `gelu_pytorch_tanh`, `silu`.
    #[serde(default = "d_hidden_act")]
    pub hidden_act: String,
    /// MLP width = `int(embed_dim * mlp_ratio)` (4).
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Attention heads (16); `embed_dim / num_heads` must be a multiple of 4 (2-D rotary).
    #[serde(default = "d_num_heads")]
    pub num_heads: i64,
    /// Image channels (3); older configs call it `in_chans`.
    #[serde(default = "d_in_channels", alias = "in_chans")]
    pub in_channels: i64,
    /// Side of a square patch in pixels (14).
    #[serde(default = "d_patch_size")]
    pub patch_size: i64,
    /// `m`: the merger joins `m × m` neighbouring patches into one LLM token (2).
    #[serde(default = "d_spatial_merge_size")]
    pub spatial_merge_size: i64,
    /// Frames per patch (2; an image is repeated to fill them).
    #[serde(default = "d_temporal_patch_size")]
    pub temporal_patch_size: i64,
    /// Default 0.02; used by `init-model`.
    #[serde(default = "d_initializer_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub rope_parameters: Option<VisionRopeParameters>,
    /// Qwen2.5-VL only: the width of the SwiGLU block MLPs (3420). Qwen2.5-VL's own
    /// `vision_config.hidden_size` is read as [`VisionConfig::embed_dim`] and its
    /// `out_hidden_size` as [`VisionConfig::hidden_size`] (see [`Qwen2VLConfig::from_value`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<i64>,
    /// Qwen2.5-VL only: the side of an attention window in pixels (112, i.e. 4 × 4 merged
    /// tokens of 2 × 2 patches of 14 pixels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<i64>,
    /// Qwen2.5-VL only: the blocks that attend over whole frames (`[7, 15, 23, 31]`); the
    /// others attend within windows.
    #[serde(default)]
    pub fullatt_block_indexes: Vec<i64>,
    /// Qwen2.5-VL only: temporal M-RoPE positions per second of video (4); a video's time
    /// positions step by `tokens_per_second × second_per_grid_ts` per temporal patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Whether this is Qwen2.5-VL's tower (RMSNorm, SwiGLU MLP with biases, window attention,
    /// RMSNorm `ln_q`), set from the model's architecture.
    #[serde(skip)]
    pub qwen25: bool,
}

fn default_vision_theta() -> f64 {
    10000.0
}
fn d_depth() -> i64 {
    32
}
fn d_embed_dim() -> i64 {
    1280
}
fn d_hidden_size() -> i64 {
    3584
}
fn d_hidden_act() -> String {
    "quick_gelu".into()
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_num_heads() -> i64 {
    16
}
fn d_in_channels() -> i64 {
    3
}
fn d_patch_size() -> i64 {
    14
}
fn d_spatial_merge_size() -> i64 {
    2
}
fn d_temporal_patch_size() -> i64 {
    2
}
fn d_initializer_range() -> f64 {
    0.02
}
fn d_image() -> i64 {
    151655
}
fn d_video() -> i64 {
    151656
}
fn d_vision_start() -> i64 {
    151652
}
fn d_vision_end() -> i64 {
    151653
}

/// The activations the vision MLPs may use.
pub const VISION_ACTIVATIONS: [&str; 4] = ["quick_gelu", "gelu", "gelu_pytorch_tanh", "silu"];

impl VisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.embed_dim / self.num_heads.max(1)
    }

    /// Width of the block MLPs (`int(embed_dim * mlp_ratio)`, as transformers computes it).
    pub fn mlp_hidden_dim(&self) -> i64 {
        match self.intermediate_size {
            Some(i) if self.qwen25 => i,
            _ => (self.embed_dim as f64 * self.mlp_ratio) as i64,
        }
    }

    /// The checkpoint key names of the block width and the output width: `embed_dim` and
    /// `hidden_size` for Qwen2-VL, `hidden_size` and `out_hidden_size` for Qwen2.5-VL.
    pub fn width_keys(&self) -> (&'static str, &'static str) {
        if self.qwen25 {
            ("hidden_size", "out_hidden_size")
        } else {
            ("embed_dim", "hidden_size")
        }
    }

    /// The temporal M-RoPE rate of videos: Qwen2.5-VL's `tokens_per_second` (its config read
    /// fills transformers' default), `None` for Qwen2-VL (time steps by one).
    pub fn video_tokens_per_second(&self) -> Option<f64> {
        self.tokens_per_second.filter(|_| self.qwen25)
    }

    /// Qwen2.5-VL: merged tokens per window side (`window_size / spatial_merge_size /
    /// patch_size`, 4); `None` for Qwen2-VL (full attention everywhere).
    pub fn merger_window(&self) -> Option<i64> {
        self.window_size
            .filter(|_| self.qwen25)
            .map(|w| w / self.spatial_merge_size.max(1) / self.patch_size.max(1))
    }

    /// Whether block `i` attends over whole frames (every block of Qwen2-VL).
    pub fn full_attention_block(&self, i: i64) -> bool {
        !self.qwen25 || self.fullatt_block_indexes.contains(&i)
    }

    /// Values per flattened patch: `in_channels × temporal_patch_size × patch_size²` (1176).
    pub fn patch_values(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters.as_ref().map(|r| r.rope_theta).unwrap_or_else(default_vision_theta)
    }

    fn validate(&self, path: &Path, text_hidden: i64) -> Result<()> {
        let file = path.display();
        let (embed_key, out_key) = self.width_keys();
        let mlp_key = if self.qwen25 {
            "intermediate_size"
        } else {
            "mlp_hidden_dim (embed_dim × mlp_ratio)"
        };
        for (key, v) in [
            ("depth", self.depth),
            (embed_key, self.embed_dim),
            (out_key, self.hidden_size),
            ("num_heads", self.num_heads),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("spatial_merge_size", self.spatial_merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
            (mlp_key, self.mlp_hidden_dim()),
        ] {
            if v <= 0 {
                bail!("{file}: key `vision_config.{key}` must be positive, got {v}");
            }
        }
        if self.embed_dim % self.num_heads != 0 || self.head_dim() % 4 != 0 {
            bail!(
                "{file}: key `vision_config.{embed_key}` ({}) / `num_heads` ({}) must be a whole multiple of 4 (2-D rotary embeddings)",
                self.embed_dim,
                self.num_heads
            );
        }
        if self.hidden_size != text_hidden {
            bail!(
                "{file}: key `vision_config.{out_key}` ({}) must equal the text hidden_size ({text_hidden}): the merger feeds the decoder",
                self.hidden_size
            );
        }
        if !VISION_ACTIVATIONS.contains(&self.hidden_act.as_str()) {
            bail!(
                "{file}: key `vision_config.hidden_act` = `{}` is not supported ({})",
                self.hidden_act,
                VISION_ACTIVATIONS.join(", ")
            );
        }
        if self.qwen25 {
            let window = self.window_size.unwrap_or(0);
            if self.merger_window().unwrap_or(0) <= 0 {
                bail!(
                    "{file}: key `vision_config.window_size` ({window}) must be at least spatial_merge_size × patch_size = {} pixels",
                    self.spatial_merge_size * self.patch_size
                );
            }
            if let Some(t) = self.tokens_per_second.filter(|t| !t.is_finite() || *t < 0.0) {
                bail!("{file}: key `vision_config.tokens_per_second` must be a non-negative number, got {t}");
            }
        }
        if let Some(t) = self.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()) {
            if t != "axial" && t != "default" {
                bail!("{file}: key `vision_config.rope_parameters.rope_type` = `{t}` is not supported (axial)");
            }
        }
        Ok(())
    }
}

/// The Qwen2-VL keys of `config.json` beyond the text decoder's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VLConfig {
    pub vision_config: VisionConfig,
    /// `<|image_pad|>`: one per merged image patch (151655).
    #[serde(default = "d_image")]
    pub image_token_id: i64,
    /// `<|video_pad|>` (151656).
    #[serde(default = "d_video")]
    pub video_token_id: i64,
    /// `<|vision_start|>` (151652).
    #[serde(default = "d_vision_start")]
    pub vision_start_token_id: i64,
    /// `<|vision_end|>` (151653).
    #[serde(default = "d_vision_end")]
    pub vision_end_token_id: i64,
}

impl Qwen2VLConfig {
    /// The Qwen2-VL part of a parsed `config.json` (either layout); `text_hidden` is the text
    /// decoder's `hidden_size`, which the merger's output must equal. `path` is for messages.
    pub fn from_value(value: &Value, path: &Path, text_hidden: i64) -> Result<Self> {
        let mut v = value.clone();
        let obj = v
            .as_object_mut()
            .with_context(|| format!("{}: expected a JSON object", path.display()))?;
        if !obj.get("vision_config").is_some_and(Value::is_object) {
            bail!("{}: key `vision_config` (an object) is required for Qwen2-VL", path.display());
        }
        let qwen25 = is_qwen25vl(value);
        if qwen25 {
            let vc =
                obj.get_mut("vision_config").and_then(Value::as_object_mut).expect("checked above");
            qwen25_vision_keys(vc);
        }
        let mut config: Qwen2VLConfig = serde_path_to_error::deserialize(v).map_err(|e| {
            let key = e.path().to_string();
            anyhow::anyhow!("{}: key `{key}`: {}", path.display(), e.inner())
        })?;
        config.vision_config.qwen25 = qwen25;
        config.vision_config.validate(path, text_hidden)?;
        Ok(config)
    }

    /// Reads the Qwen2-VL part of `dir/config.json`, `None` for other architectures.
    pub fn from_dir(dir: &Path, text_hidden: i64) -> Result<Option<Self>> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if !is_qwen2vl(&value) {
            return Ok(None);
        }
        Self::from_value(&value, &path, text_hidden).map(Some)
    }
}

/// Whether a parsed `config.json` is a Qwen2-VL or Qwen2.5-VL one (by `architectures`, else
/// `model_type`).
pub fn is_qwen2vl(value: &Value) -> bool {
    vl_model_type(value).is_some()
}

/// Whether a parsed `config.json` is a Qwen2.5-VL one.
pub fn is_qwen25vl(value: &Value) -> bool {
    vl_model_type(value) == Some("qwen2_5_vl")
}

/// transformers' `Qwen2_5_VLVisionConfig.tokens_per_second` default.
pub const QWEN25_TOKENS_PER_SECOND: f64 = 4.0;

/// The temporal M-RoPE rate of a parsed `config.json`'s videos: Qwen2.5-VL's
/// `vision_config.tokens_per_second` (default 4), `None` for Qwen2-VL (time steps by one).
pub fn video_tokens_per_second(value: &Value) -> Option<f64> {
    is_qwen25vl(value).then(|| {
        value["vision_config"]["tokens_per_second"].as_f64().unwrap_or(QWEN25_TOKENS_PER_SECOND)
    })
}

/// `qwen2_vl` or `qwen2_5_vl` from `architectures` (else `model_type`), `None` for others.
fn vl_model_type(value: &Value) -> Option<&'static str> {
    match value
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
    {
        Some("Qwen2VLForConditionalGeneration") => Some("qwen2_vl"),
        Some("Qwen2_5_VLForConditionalGeneration") => Some("qwen2_5_vl"),
        Some(_) => None,
        None => match value.get("model_type").and_then(|m| m.as_str()) {
            Some("qwen2_vl") => Some("qwen2_vl"),
            Some("qwen2_5_vl") => Some("qwen2_5_vl"),
            _ => None,
        },
    }
}

/// Rewrites a Qwen2.5-VL `vision_config` into [`VisionConfig`]'s keys, with transformers 5.24's
/// `Qwen2_5_VLVisionConfig` defaults: its `hidden_size` (block width, 3584) becomes
/// `embed_dim`, `out_hidden_size` (3584) becomes `hidden_size`; `hidden_act` silu,
/// `intermediate_size` 3420, `window_size` 112, `fullatt_block_indexes` [7, 15, 23, 31],
/// `tokens_per_second` 4.
fn qwen25_vision_keys(vc: &mut serde_json::Map<String, Value>) {
    let take =
        |vc: &mut serde_json::Map<String, Value>, k: &str| vc.remove(k).filter(|v| !v.is_null());
    let width = take(vc, "hidden_size").unwrap_or(json!(3584));
    let out = take(vc, "out_hidden_size").unwrap_or(json!(3584));
    vc.remove("embed_dim");
    vc.remove("mlp_ratio");
    vc.insert("embed_dim".into(), width);
    vc.insert("hidden_size".into(), out);
    for (k, v) in [
        ("hidden_act", json!("silu")),
        ("intermediate_size", json!(3420)),
        ("window_size", json!(112)),
        ("fullatt_block_indexes", json!([7, 15, 23, 31])),
        ("tokens_per_second", json!(QWEN25_TOKENS_PER_SECOND)),
    ] {
        if vc.get(k).is_none_or(Value::is_null) {
            vc.insert(k.into(), v);
        }
    }
}

/// The text decoder's keys of a Qwen2-VL `config.json` as one flat Llama-style object:
/// `text_config` when present (else the top-level keys), with transformers' Qwen2-VL text
/// defaults (`rms_norm_eps` 1e-5, `rope_theta` 1e6), the top-level `tie_word_embeddings` and
/// dtype, and `architectures` / `model_type` naming Qwen2-VL.
pub fn text_config_value(
    value: &Value,
    path: &Path,
    arch: crate::model::Architecture,
) -> Result<Value> {
    let top =
        value.as_object().with_context(|| format!("{}: expected a JSON object", path.display()))?;
    let mut text = match top.get("text_config") {
        Some(Value::Object(t)) => t.clone(),
        Some(Value::Null) | None => {
            let mut t = top.clone();
            t.remove("vision_config");
            t
        }
        Some(_) => bail!("{}: key `text_config` must be an object", path.display()),
    };
    // Nested configs may still carry the RoPE keys at the top level (hand-written ones).
    for key in ["rope_parameters", "rope_scaling", "rope_theta"] {
        if !text.contains_key(key) {
            if let Some(v) = top.get(key).filter(|v| !v.is_null()) {
                text.insert(key.into(), v.clone());
            }
        }
    }
    let has_theta = text.get("rope_theta").is_some_and(|v| !v.is_null())
        || ["rope_parameters", "rope_scaling"]
            .iter()
            .any(|k| text.get(*k).and_then(|r| r.get("rope_theta")).is_some_and(|v| !v.is_null()));
    if !has_theta {
        text.insert("rope_theta".into(), json!(1_000_000.0));
    }
    if text.get("rms_norm_eps").is_none_or(|v| v.is_null()) {
        text.insert("rms_norm_eps".into(), json!(1e-5));
    }
    // transformers 5 reads `tie_word_embeddings` at the top level, falling back to a true one
    // that pre-v5 saves left inside text_config.
    let tied = top.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false)
        || text.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
    text.insert("tie_word_embeddings".into(), Value::Bool(tied));
    for key in ["dtype", "torch_dtype"] {
        if let Some(v) = top.get(key).filter(|v| !v.is_null()) {
            text.insert(key.into(), v.clone());
        }
    }
    text.insert("architectures".into(), json!([arch.hf_name()]));
    text.insert("model_type".into(), json!(arch.model_type()));
    Ok(Value::Object(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    const NESTED: &str = r#"{"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "image_token_id": 295, "video_token_id": 296, "vision_start_token_id": 292, "vision_end_token_id": 293,
        "tie_word_embeddings": false, "dtype": "float32",
        "text_config": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 300, "eos_token_id": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}},
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}}}"#;

    const FLAT: &str = r#"{"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "image_token_id": 295, "video_token_id": 296, "vision_start_token_id": 292, "vision_end_token_id": 293,
        "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 300, "eos_token_id": 1,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "torch_dtype": "float32",
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "in_chans": 3,
            "model_type": "qwen2_vl"}}"#;

    #[test]
    fn nested_and_flat_layouts_agree() {
        let p = Path::new("vl/config.json");
        let (a, b) =
            (LlamaConfig::from_json(NESTED, p).unwrap(), LlamaConfig::from_json(FLAT, p).unwrap());
        for c in [&a, &b] {
            assert_eq!(c.architecture(), crate::model::Architecture::Qwen2VL);
            assert_eq!((c.hidden_size, c.head_dim(), c.rms_norm_eps), (64, 16, 1e-5));
            assert_eq!(c.rope().unwrap(), crate::model::Rope::Default { theta: 1e6 });
            assert_eq!(c.mrope_section(), vec![2, 3, 3]);
            assert_eq!(c.eos_token_ids(), vec![1]);
            assert!(c.qkv_bias() && !c.o_bias() && !c.tie_word_embeddings);
        }
        let va = Qwen2VLConfig::from_value(&serde_json::from_str(NESTED).unwrap(), p, 64).unwrap();
        let vb = Qwen2VLConfig::from_value(&serde_json::from_str(FLAT).unwrap(), p, 64).unwrap();
        assert_eq!(va.vision_config.mlp_hidden_dim(), 64);
        assert_eq!((va.image_token_id, va.vision_start_token_id), (295, 292));
        assert_eq!(va.vision_config.rope_theta(), vb.vision_config.rope_theta());
        assert_eq!((vb.vision_config.depth, vb.vision_config.patch_values()), (2, 1176));
    }

    #[test]
    fn qwen25_vision_keys_map_to_the_tower_and_out_widths() {
        let p = Path::new("vl25/config.json");
        let text = NESTED
            .replace("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
            .replace(r#""model_type": "qwen2_vl""#, r#""model_type": "qwen2_5_vl""#)
            .replace(
                r#""depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,"#,
                r#""depth": 3, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 48, "num_heads": 2,
                   "window_size": 56, "fullatt_block_indexes": [1],"#,
            );
        let c = LlamaConfig::from_json(&text, p).unwrap();
        assert_eq!(c.architecture(), crate::model::Architecture::Qwen25VL);
        assert_eq!(c.mrope_section(), vec![2, 3, 3]);
        let v: Value = serde_json::from_str(&text).unwrap();
        let vc = Qwen2VLConfig::from_value(&v, p, 64).unwrap().vision_config;
        assert!(vc.qwen25);
        assert_eq!((vc.embed_dim, vc.hidden_size, vc.mlp_hidden_dim()), (32, 64, 48));
        assert_eq!((vc.merger_window(), vc.hidden_act.as_str()), (Some(2), "silu"));
        assert_eq!(vc.tokens_per_second, Some(4.0), "transformers' default");
        assert!(vc.full_attention_block(1) && !vc.full_attention_block(0));
        // Out width and window size are checked under their own names.
        let bad: Value = serde_json::from_str(
            &text.replace(r#""out_hidden_size": 64"#, r#""out_hidden_size": 32"#),
        )
        .unwrap();
        let e = Qwen2VLConfig::from_value(&bad, p, 64).unwrap_err().to_string();
        assert!(e.contains("vision_config.out_hidden_size"), "{e}");
        let bad: Value =
            serde_json::from_str(&text.replace(r#""window_size": 56"#, r#""window_size": 20"#))
                .unwrap();
        let e = Qwen2VLConfig::from_value(&bad, p, 64).unwrap_err().to_string();
        assert!(e.contains("vision_config.window_size") && e.contains("28"), "{e}");
    }

    #[test]
    fn flat_qwen25_config_as_the_hub_ships_it() {
        // Qwen2.5-VL-3B-Instruct's layout (sizes shrunk): text keys at the top level, mrope in
        // rope_scaling, the vision widths as hidden_size / out_hidden_size.
        let flat = r#"{"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 300, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": true, "torch_dtype": "bfloat16", "image_token_id": 295, "video_token_id": 296,
            "vision_start_token_id": 292, "vision_end_token_id": 293,
            "vision_config": {"depth": 4, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 48,
                "num_heads": 2, "in_chans": 3, "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [1, 3],
                "tokens_per_second": 2, "temporal_patch_size": 2}}"#;
        let p = Path::new("vl25-old/config.json");
        let c = LlamaConfig::from_json(flat, p).unwrap();
        assert_eq!(c.architecture(), crate::model::Architecture::Qwen25VL);
        assert_eq!((c.mrope_section(), c.tie_word_embeddings), (vec![2, 3, 3], true));
        let v: Value = serde_json::from_str(flat).unwrap();
        let vc = Qwen2VLConfig::from_value(&v, p, 64).unwrap().vision_config;
        assert_eq!((vc.embed_dim, vc.hidden_size, vc.merger_window()), (32, 64, Some(4)));
        assert_eq!(
            (vc.tokens_per_second, vc.fullatt_block_indexes.clone()),
            (Some(2.0), vec![1, 3])
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let p = Path::new("vl/config.json");
        let e = LlamaConfig::from_json(&NESTED.replace("[2, 3, 3]", "[2, 3, 4]"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mrope_section") && e.contains("head_dim / 2 = 8"), "{e}");
        let v: Value = serde_json::from_str(
            &NESTED
                .replace(r#""hidden_size": 64, "num_heads""#, r#""hidden_size": 32, "num_heads""#),
        )
        .unwrap();
        let e = Qwen2VLConfig::from_value(&v, p, 64).unwrap_err().to_string();
        assert!(e.contains("vision_config.hidden_size") && e.contains("64"), "{e}");
        let v: Value = serde_json::from_str(
            &NESTED.replace(r#""depth": 2"#, r#""depth": 2, "hidden_act": "relu""#),
        )
        .unwrap();
        let e = Qwen2VLConfig::from_value(&v, p, 64).unwrap_err().to_string();
        assert!(e.contains("vision_config.hidden_act") && e.contains("relu"), "{e}");
    }
}
