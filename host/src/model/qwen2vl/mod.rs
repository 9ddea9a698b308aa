//! Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL
//! (`Qwen2_5_VLForConditionalGeneration`): a Qwen2 decoder under `model.language_model` with 3-D
//! multimodal rotary positions (M-RoPE), and a vision tower under `model.visual` whose image and
//! video embeddings replace the `<|image_pad|>` and `<|video_pad|>` tokens. Qwen2.5-VL's tower
//! (RMSNorm, SwiGLU MLPs, window attention) is [`VisionTower`] with `vision_config.qwen25`; its
//! videos' temporal positions step by `tokens_per_second × second_per_grid_ts`.
//!
//! The model itself is a [`CausalLM`](crate::model::CausalLM) with a vision tower, so adapters,
//! training, merging, saving and generation work on it unchanged; the multimodal entry points
//! are [`CausalLM::forward`](crate::model::CausalLM::forward) with [`ForwardArgs::images`](crate::model::ForwardArgs::images).
//! Both checkpoint layouts load: transformers 5's module paths (`model.visual.*`,
//! `model.language_model.*`) and the original one (`visual.*`, `model.layers.*`,
//! `model.embed_tokens`, `model.norm`), renamed at load by [`rename_legacy_key`]. Saving writes
//! the original layout ([`saved_key`]), as transformers 5.24's `save_pretrained` does.
//!
//! Reference: transformers `models/qwen2_vl/modeling_qwen2_vl.py` and
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py`.
pub mod config;
pub mod rope_index;
pub mod vision;

use tch::Tensor;

pub use config::{Qwen2VLConfig, VisionConfig};
pub use rope_index::{rope_index, rope_index_vision, RopeIndex, RopeInputs};
pub use vision::VisionTower;

/// The decoder's module path in transformers 5 Qwen2-VL checkpoints.
pub const LANGUAGE_MODEL: &str = "model.language_model";

/// The images and videos of one forward pass, as Qwen2-VL's image and video processors give them.
pub struct VisionInputs {
    /// `[sum over images of t·h·w, 3·2·14·14]` f32 (any float dtype; cast to the model's):
    /// every image's patches, flattened channel-major (`C, T, P, P`), images in order. May be
    /// `[0, D]` with an empty `image_grid_thw` when the pass has videos only.
    pub pixel_values: Tensor,
    /// `[t, h, w]` of each image in patches (`t` = 1 for an image; `h`, `w` multiples of the
    /// merge size). Image `i` fills the `i`-th block of `<|image_pad|>` tokens, row 0's first.
    pub image_grid_thw: Vec<[i64; 3]>,
    /// The videos of the pass (`None`: none), filling the `<|video_pad|>` blocks in order.
    pub videos: Option<VideoInputs>,
}

/// The videos of one forward pass (transformers' `pixel_values_videos`, `video_grid_thw`,
/// `second_per_grid_ts`).
pub struct VideoInputs {
    /// `[sum over videos of t·h·w, 3·2·14·14]`: every video's patches, as for images.
    pub pixel_values: Tensor,
    /// `[t, h, w]` of each video in patches (`t` = frames / temporal_patch_size).
    pub grid_thw: Vec<[i64; 3]>,
    /// Seconds per temporal patch of each video (`temporal_patch_size / fps`); Qwen2.5-VL's
    /// temporal M-RoPE scales time positions by it (Qwen2-VL ignores it). Empty: 1.0 each.
    pub second_per_grid_ts: Vec<f64>,
}

impl VideoInputs {
    pub fn to_device(&self, device: tch::Device) -> anyhow::Result<Self> {
        Ok(Self {
            pixel_values: self.pixel_values.f_to_device(device)?,
            grid_thw: self.grid_thw.clone(),
            second_per_grid_ts: self.second_per_grid_ts.clone(),
        })
    }
}

impl VisionInputs {
    /// Images only.
    pub fn images(pixel_values: Tensor, image_grid_thw: Vec<[i64; 3]>) -> Self {
        Self { pixel_values, image_grid_thw, videos: None }
    }

    /// Whether the pass has no image and no video.
    pub fn is_empty(&self) -> bool {
        self.image_grid_thw.is_empty() && self.videos.as_ref().is_none_or(|v| v.grid_thw.is_empty())
    }

    /// Tensors on another device (for a model there).
    pub fn to_device(&self, device: tch::Device) -> anyhow::Result<Self> {
        Ok(Self {
            pixel_values: self.pixel_values.f_to_device(device)?,
            image_grid_thw: self.image_grid_thw.clone(),
            videos: self.videos.as_ref().map(|v| v.to_device(device)).transpose()?,
        })
    }
}

/// The transformers 5 key of a tensor saved in the older Qwen2-VL layout (`visual.*` →
/// `model.visual.*`, `model.{layers,embed_tokens,norm}.*` → `model.language_model.*`), `None`
/// when the key is already in the new layout (or is `lm_head.*`).
pub fn rename_legacy_key(key: &str) -> Option<String> {
    if let Some(rest) = key.strip_prefix("visual.") {
        return Some(format!("model.visual.{rest}"));
    }
    for part in ["layers.", "embed_tokens.", "norm."] {
        if let Some(rest) = key.strip_prefix("model.").filter(|r| r.starts_with(part)) {
            return Some(format!("{LANGUAGE_MODEL}.{rest}"));
        }
    }
    None
}

/// The key a tensor is saved under: transformers 5.24's `save_pretrained` writes Qwen2-VL in
/// its original checkpoint layout (`save_original_format=True`: `visual.*`, `model.layers.*`,
/// `model.embed_tokens.*`, `model.norm.*`), the inverse of [`rename_legacy_key`]. Module paths
/// (adapters, `named_weights`) stay transformers 5's.
pub fn saved_key(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("model.visual.") {
        return format!("visual.{rest}");
    }
    match key.strip_prefix(LANGUAGE_MODEL).and_then(|r| r.strip_prefix('.')) {
        Some(rest) => format!("model.{rest}"),
        None => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_keys_map_to_transformers_5_paths() {
        assert_eq!(
            rename_legacy_key("visual.blocks.0.attn.qkv.weight").as_deref(),
            Some("model.visual.blocks.0.attn.qkv.weight")
        );
        assert_eq!(
            rename_legacy_key("model.layers.1.mlp.up_proj.weight").as_deref(),
            Some("model.language_model.layers.1.mlp.up_proj.weight")
        );
        assert_eq!(
            rename_legacy_key("model.embed_tokens.weight").as_deref(),
            Some("model.language_model.embed_tokens.weight")
        );
        assert_eq!(
            rename_legacy_key("model.norm.weight").as_deref(),
            Some("model.language_model.norm.weight")
        );
        assert_eq!(rename_legacy_key("model.visual.merger.mlp.0.bias"), None);
        assert_eq!(rename_legacy_key("model.language_model.norm.weight"), None);
        assert_eq!(rename_legacy_key("lm_head.weight"), None);
        for key in [
            "model.visual.blocks.0.attn.qkv.weight",
            "model.language_model.layers.1.mlp.up_proj.weight",
            "model.language_model.norm.weight",
        ] {
            assert_eq!(rename_legacy_key(&saved_key(key)).as_deref(), Some(key), "round trip");
        }
        assert_eq!(saved_key("lm_head.weight"), "lm_head.weight");
    }
}
