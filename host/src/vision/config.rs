//! Settings of the Qwen2-VL image processor: `preprocessor_config.json`, read as transformers'
//! `Qwen2VLImageProcessor` (5.24) reads it.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value as Json};

/// File name of the image processor settings in a model folder.
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";

/// OpenAI CLIP's per-channel mean (transformers' `OPENAI_CLIP_MEAN`), Qwen2-VL's default.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel standard deviation (`OPENAI_CLIP_STD`).
#[allow(clippy::excessive_precision)] // transformers' digits, verbatim; they round to the same f32
pub const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Pillow's `Image.BICUBIC`, the only `resample` value implemented (Qwen2-VL's).
const PIL_BICUBIC: i64 = 3;

/// How an image becomes Qwen2-VL pixel patches. Field names are the file's keys; the defaults
/// are the class defaults of transformers' `Qwen2VLImageProcessor`, used when the model folder
/// has no `preprocessor_config.json` or the file leaves a key out.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// Fewest pixels after resizing (`size.shortest_edge`; the older `min_pixels` key wins).
    /// Default 56 * 56 = 3136.
    pub min_pixels: u64,
    /// Most pixels after resizing (`size.longest_edge`; the older `max_pixels` key wins).
    /// Default 28 * 28 * 1280 = 1_003_520; the released Qwen2-VL checkpoints set 12_845_056.
    /// Each 28 x 28 block becomes one token in the language model.
    pub max_pixels: u64,
    /// Side of one vision-encoder patch in pixels. Default 14.
    pub patch_size: u32,
    /// Frames per patch; a still image is repeated to fill them. Default 2.
    pub temporal_patch_size: u32,
    /// Patches merged per side into one language-model token. Default 2.
    pub merge_size: u32,
    /// Per-channel mean subtracted after rescaling. Default [`OPENAI_CLIP_MEAN`].
    pub image_mean: [f32; 3],
    /// Per-channel divisor after subtracting the mean. Default [`OPENAI_CLIP_STD`].
    pub image_std: [f32; 3],
    /// Factor from 0..=255 to the rescaled range. Default 1 / 255. Double precision because
    /// transformers rescales in float64 before casting to float32 (an f32 factor changes
    /// about half of the 256 values by one ulp).
    pub rescale_factor: f64,
    /// Resize to [`super::smart_resize`]'s size (bicubic). Default true; when false, both sides
    /// must already be multiples of `patch_size * merge_size`.
    pub do_resize: bool,
    /// Multiply by `rescale_factor`. Default true.
    pub do_rescale: bool,
    /// Subtract `image_mean`, divide by `image_std`. Default true.
    pub do_normalize: bool,
    /// Turn grey and alpha images into RGB (alpha composited onto white). Default true; when
    /// false, only 3-channel images are accepted (transformers fails on others too).
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads `model_dir/preprocessor_config.json`; without it, the defaults.
    pub fn from_dir(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join(PREPROCESSOR_CONFIG_FILE);
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// Reads one `preprocessor_config.json`. Both spellings of the pixel bounds are accepted:
    /// `size: {shortest_edge, longest_edge}` and the older top-level `min_pixels` /
    /// `max_pixels`, which win over `size` as in transformers. Keys not listed on the fields
    /// (`image_processor_type`, `processor_class`, ...) are ignored.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Json = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let obj = json
            .as_object()
            .with_context(|| format!("{}: expected a JSON object", path.display()))?;
        Self::from_json(obj).with_context(|| format!("in {}", path.display()))
    }

    /// The settings of a parsed `preprocessor_config.json` object.
    pub fn from_json(obj: &Map<String, Json>) -> Result<Self> {
        let mut cfg = Self::default();
        if let Some(kind) = obj.get("image_processor_type").and_then(Json::as_str) {
            if !kind.starts_with("Qwen2VLImageProcessor") {
                tracing::warn!("image_processor_type is {kind:?}: processing images as Qwen2VLImageProcessor does");
            }
        }
        for (key, field) in [
            ("do_resize", &mut cfg.do_resize),
            ("do_rescale", &mut cfg.do_rescale),
            ("do_normalize", &mut cfg.do_normalize),
            ("do_convert_rgb", &mut cfg.do_convert_rgb),
        ] {
            if let Some(v) = present(obj, key) {
                *field = v
                    .as_bool()
                    .with_context(|| format!("key `{key}` must be true or false, got {v}"))?;
            }
        }
        for (key, field) in [
            ("patch_size", &mut cfg.patch_size),
            ("temporal_patch_size", &mut cfg.temporal_patch_size),
            ("merge_size", &mut cfg.merge_size),
        ] {
            if let Some(v) = present(obj, key) {
                *field = v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .with_context(|| format!("key `{key}` must be a positive integer, got {v}"))?;
            }
        }
        if let Some(v) = present(obj, "rescale_factor") {
            cfg.rescale_factor = v
                .as_f64()
                .with_context(|| format!("key `rescale_factor` must be a number, got {v}"))?;
        }
        if let Some(v) = present(obj, "image_mean") {
            cfg.image_mean = per_channel("image_mean", v)?;
        }
        if let Some(v) = present(obj, "image_std") {
            cfg.image_std = per_channel("image_std", v)?;
        }
        if let Some(v) = present(obj, "resample") {
            if v.as_i64() != Some(PIL_BICUBIC) {
                bail!("key `resample` is {v}: only 3 (bicubic, Qwen2-VL's) is implemented");
            }
        }
        // transformers: `size` (or the class default when absent), then `min_pixels` /
        // `max_pixels` written over its `shortest_edge` / `longest_edge`.
        let mut min_pixels = Some(cfg.min_pixels);
        let mut max_pixels = Some(cfg.max_pixels);
        if let Some(size) = present(obj, "size") {
            let size = size
                .as_object()
                .with_context(|| format!("key `size` must be an object, got {size}"))?;
            min_pixels = pixels(size, "size.shortest_edge", "shortest_edge")?;
            max_pixels = pixels(size, "size.longest_edge", "longest_edge")?;
        }
        if let Some(v) = pixels(obj, "min_pixels", "min_pixels")? {
            min_pixels = Some(v);
        }
        if let Some(v) = pixels(obj, "max_pixels", "max_pixels")? {
            max_pixels = Some(v);
        }
        match (min_pixels, max_pixels) {
            (Some(min), Some(max)) => (cfg.min_pixels, cfg.max_pixels) = (min, max),
            _ if !cfg.do_resize => {}
            _ => bail!(
                "key `size` must hold both `shortest_edge` and `longest_edge` (the fewest and most pixels \
                 after resizing), or give `min_pixels` and `max_pixels` at the top level"
            ),
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same settings with the pixel bounds replaced where given (a command-line or data
    /// set override); checks the result.
    pub fn with_pixels(mut self, min: Option<u64>, max: Option<u64>) -> Result<Self> {
        if let Some(min) = min {
            self.min_pixels = min;
        }
        if let Some(max) = max {
            self.max_pixels = max;
        }
        self.validate()?;
        Ok(self)
    }

    /// Resize granularity in pixels: `patch_size * merge_size` (28 for Qwen2-VL).
    pub fn factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }

    /// Checks the settings, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("merge_size", self.merge_size),
        ] {
            if v == 0 {
                bail!("`{key}` must be at least 1");
            }
        }
        if self.patch_size.checked_mul(self.merge_size).is_none() {
            bail!("`patch_size` * `merge_size` overflows");
        }
        if self.do_resize {
            if self.max_pixels == 0 {
                bail!("`max_pixels` (size.longest_edge) must be positive");
            }
            if self.min_pixels > self.max_pixels {
                bail!(
                    "`min_pixels` (size.shortest_edge, {}) is larger than `max_pixels` (size.longest_edge, {})",
                    self.min_pixels,
                    self.max_pixels
                );
            }
        }
        if self.do_normalize && self.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            bail!("`image_std` must be finite and non-zero, got {:?}", self.image_std);
        }
        Ok(())
    }
}

/// `obj[key]` unless absent or null.
fn present<'a>(obj: &'a Map<String, Json>, key: &str) -> Option<&'a Json> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A pixel count under `key` (null or absent: none).
fn pixels(obj: &Map<String, Json>, name: &str, key: &str) -> Result<Option<u64>> {
    match present(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .with_context(|| format!("key `{name}` must be a non-negative integer, got {v}")),
    }
}

/// Three per-channel values, or one number for all channels (transformers accepts both).
fn per_channel(key: &str, v: &Json) -> Result<[f32; 3]> {
    if let Some(x) = v.as_f64() {
        return Ok([x as f32; 3]);
    }
    let list: Vec<f32> = v
        .as_array()
        .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
        .with_context(|| format!("key `{key}` must be a number or a list of 3 numbers, got {v}"))?;
    <[f32; 3]>::try_from(list.as_slice())
        .map_err(|_| anyhow::anyhow!("key `{key}` must have 3 values (R, G, B), got {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Json) -> Result<ImageProcessorConfig> {
        ImageProcessorConfig::from_json(v.as_object().unwrap())
    }

    #[test]
    fn defaults_are_transformers_class_defaults() {
        let cfg = ImageProcessorConfig::default();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (3136, 1_003_520));
        assert_eq!(
            (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size, cfg.factor()),
            (14, 2, 2, 28)
        );
        assert_eq!(parse(json!({})).unwrap(), cfg);
        assert_eq!(
            ImageProcessorConfig::from_dir(Path::new("/nonexistent-model-dir")).unwrap(),
            cfg
        );
    }

    #[test]
    fn reads_both_spellings_of_the_pixel_bounds() {
        // Qwen2-VL-7B-Instruct's file.
        let cfg = parse(json!({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
            "temporal_patch_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor"}))
        .unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (3136, 12_845_056));
        let cfg = parse(json!({"size": {"shortest_edge": 100, "longest_edge": 200000}})).unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (100, 200_000));
        // The top-level keys win over `size`.
        let cfg = parse(
            json!({"size": {"shortest_edge": 100, "longest_edge": 200000}, "min_pixels": 999}),
        )
        .unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (999, 200_000));
    }

    #[test]
    fn bad_keys_are_named() {
        let err = |v: Json| format!("{:#}", parse(v).unwrap_err());
        assert!(err(json!({"size": {"shortest_edge": 100}})).contains("longest_edge"));
        assert!(err(json!({"size": {"min_pixels": 1, "max_pixels": 2}})).contains("shortest_edge"));
        assert!(err(json!({"patch_size": "14"})).contains("patch_size"));
        assert!(err(json!({"merge_size": 0})).contains("merge_size"));
        assert!(err(json!({"image_mean": [0.5, 0.5]})).contains("image_mean"));
        assert!(err(json!({"resample": 2})).contains("resample"));
        assert!(err(json!({"min_pixels": 5000, "max_pixels": 4000})).contains("min_pixels"));
        assert!(err(json!({"do_resize": 1})).contains("do_resize"));
    }

    #[test]
    fn with_pixels_overrides_and_checks() {
        let cfg = ImageProcessorConfig::default().with_pixels(Some(100), None).unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (100, 1_003_520));
        let cfg = cfg.with_pixels(None, Some(50_000)).unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (100, 50_000));
        assert!(ImageProcessorConfig::default().with_pixels(Some(10_000), Some(9_000)).is_err());
        assert!(ImageProcessorConfig::default().with_pixels(None, Some(0)).is_err());
    }

    #[test]
    fn scalar_mean_and_std_apply_to_all_channels() {
        let cfg = parse(json!({"image_mean": 0.5, "image_std": 0.25})).unwrap();
        assert_eq!((cfg.image_mean, cfg.image_std), ([0.5; 3], [0.25; 3]));
    }
}
