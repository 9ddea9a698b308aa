//! Images of multimodal samples (Qwen2-VL): found, decoded, checked and sized when the data set
//! is loaded; turned into `pixel_values` only when their batch is built.
//!
//! A sample's text holds one `<image>` placeholder per image, in order. For a Qwen2-VL model
//! each placeholder becomes `<|vision_start|>` + N × `<|image_pad|>` + `<|vision_end|>`, with
//! N the image's merged patch count (`grid_t · grid_h · grid_w / merge²`) after `smart_resize`
//! — what transformers' Qwen2-VL processor writes into the text, and what Qwen2-VL-Finetune
//! does with LLaVA's `<image>`. Image-pad tokens never carry labels.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{ImageSource, Sample};
use tch::Tensor;

use super::encode::{encode_sample, EncodeError, EncodeOptions, Encoded, IGNORE_INDEX};
pub use super::encode::{ImageData, SampleImage};
use crate::model::VisionInputs;
use crate::text::Tokenizer;
use crate::vision::{
    decode_image, load_image, pixel_cap_for, process_image, smart_resize, stack_images,
    ImageProcessorConfig, ProcessedImage,
};

/// The placeholder dataset plugins write, one per image.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";
const IMAGE_PAD: &str = "<|image_pad|>";

/// A sample's image that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("image {index} ({what}): {reason}")]
pub struct BadImage {
    pub index: usize,
    pub what: String,
    pub reason: String,
}

/// What a vision model needs to turn samples' images into tokens and pixel values.
pub struct ImagePrep {
    pub processor: ImageProcessorConfig,
    /// Overrides from the run's config (`data.image_min_pixels` / `image_max_pixels`).
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Images above this many pixels (from their header) are refused before decoding
    /// (`data.max_image_pixels`; default 4 × the max_pixels they are resized to).
    pub max_image_pixels: Option<u64>,
    merge_size: u32,
    image_pad_id: i64,
}

impl ImagePrep {
    /// The image settings of the model in `model_dir` (its `preprocessor_config.json`), or
    /// `None` for a model without a vision tower (no `vision_config` in its config.json). The
    /// tokenizer must know Qwen2-VL's vision tokens, with the ids the model's config names.
    pub fn for_model_dir(model_dir: &Path, tok: &Tokenizer) -> Result<Option<Self>> {
        let file = model_dir.join("config.json");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        if config.get("vision_config").is_none() {
            return Ok(None);
        }
        let image_token_id = config["image_token_id"].as_i64().with_context(|| {
            format!("{}: a vision model needs `image_token_id`", file.display())
        })?;
        for token in [VISION_START, IMAGE_PAD, VISION_END] {
            if tok.token_to_id(token).is_none() {
                bail!(
                    "the tokenizer of {} has no {token} token, which Qwen2-VL's image blocks need",
                    model_dir.display()
                );
            }
        }
        let pad = tok.token_to_id(IMAGE_PAD).unwrap_or(-1);
        if pad != image_token_id {
            bail!(
                "{}: image_token_id is {image_token_id} but the tokenizer's {IMAGE_PAD} is {pad}",
                file.display()
            );
        }
        let processor = ImageProcessorConfig::from_dir(model_dir)?;
        let merge_size = processor.merge_size;
        Ok(Some(Self {
            processor,
            min_pixels: None,
            max_pixels: None,
            max_image_pixels: None,
            merge_size,
            image_pad_id: image_token_id,
        }))
    }

    pub fn image_pad_id(&self) -> i64 {
        self.image_pad_id
    }

    /// Pixel bounds for one sample: the run's config, else the sample's own
    /// (`extra.image_min_pixels`), else the processor's.
    fn bounds(&self, sample: &Sample) -> (u64, u64) {
        let from_sample = |key: &str| sample.extra.get(key).and_then(|v| v.as_u64());
        (
            self.min_pixels
                .or_else(|| from_sample("image_min_pixels"))
                .unwrap_or(self.processor.min_pixels),
            self.max_pixels
                .or_else(|| from_sample("image_max_pixels"))
                .unwrap_or(self.processor.max_pixels),
        )
    }

    /// The most pixels an image resized to at most `max_pixels` may have before decoding.
    fn decode_cap(&self, max_pixels: u64) -> u64 {
        self.max_image_pixels.unwrap_or_else(|| pixel_cap_for(max_pixels))
    }

    /// Finds, decodes and sizes every image of `sample` (consuming its blobs).
    pub fn sample_images(&self, sample: &mut Sample) -> Result<Vec<SampleImage>, BadImage> {
        self.sized_images(sample, |_, _| Ok(()))
    }

    /// [`Self::sample_images`], handing each decoded image to `decoded` beside its sizes (one
    /// decode for callers that need the pixels at once, such as `serve`).
    fn sized_images(
        &self,
        sample: &mut Sample,
        mut decoded: impl FnMut(image::DynamicImage, &SampleImage) -> Result<()>,
    ) -> Result<Vec<SampleImage>, BadImage> {
        let (min_pixels, max_pixels) = self.bounds(sample);
        let factor = self.processor.patch_size * self.merge_size;
        let blobs: Vec<Arc<Vec<u8>>> =
            std::mem::take(&mut sample.blobs).into_iter().map(Arc::new).collect();
        let mut out = Vec::with_capacity(sample.images.len());
        for (index, source) in sample.images.iter().enumerate() {
            let (data, what) = match source {
                ImageSource::Path(p) => (ImageData::File(PathBuf::from(p)), p.clone()),
                ImageSource::Blob(i) => match blobs.get(*i) {
                    Some(b) => {
                        (ImageData::Bytes(b.clone()), format!("embedded, {} bytes", b.len()))
                    }
                    None => {
                        return Err(BadImage {
                            index,
                            what: format!("blob {i}"),
                            reason: format!("the sample has only {} blobs", blobs.len()),
                        })
                    }
                },
            };
            let bad = |reason: String| BadImage { index, what: what.clone(), reason };
            let img =
                decode(&data, self.decode_cap(max_pixels)).map_err(|e| bad(format!("{e:#}")))?;
            let (w, h) = (img.width(), img.height());
            let (rh, rw) = smart_resize(h, w, factor, min_pixels, max_pixels)
                .map_err(|e| bad(format!("{e:#}")))?;
            let p = self.processor.patch_size as i64;
            let grid_thw = [1, rh as i64 / p, rw as i64 / p];
            let tokens = (grid_thw[0] * grid_thw[1] * grid_thw[2]) as usize
                / (self.merge_size * self.merge_size) as usize;
            let sized = SampleImage {
                data,
                min_pixels,
                max_pixels,
                original_size: (w, h),
                resized_size: (rw, rh),
                grid_thw,
                tokens,
            };
            decoded(img, &sized).map_err(|e| bad(format!("{e:#}")))?;
            out.push(sized);
        }
        Ok(out)
    }

    /// Checks that `sample` has one `<image>` placeholder per image, finds and sizes its
    /// images, and writes each image's block of vision tokens in place of its placeholder.
    pub fn expand(&self, sample: &mut Sample) -> Result<Vec<SampleImage>, EncodeError> {
        self.expand_with(sample, |_, _| Ok(()))
    }

    /// [`Self::expand`] and the images' `pixel_values` and grids from the same decode: what a
    /// request needs at once (`serve`), where the trainer sizes images when the data set is
    /// loaded and decodes them again only when their batch is built.
    pub fn expand_with_pixels(
        &self,
        sample: &mut Sample,
    ) -> Result<(Vec<SampleImage>, Option<VisionInputs>), EncodeError> {
        let mut processed = Vec::with_capacity(sample.images.len());
        let images = self.expand_with(sample, |img, im| {
            processed.push(self.process(&img, im)?);
            Ok(())
        })?;
        if processed.is_empty() {
            return Ok((images, None));
        }
        let id = sample.id.clone().unwrap_or_else(|| "(no id)".into());
        let (pixel_values, image_grid_thw) = stack_images(&processed)
            .map_err(|e| EncodeError::BadSample { id, reason: format!("{e:#}") })?;
        Ok((images, Some(VisionInputs::images(pixel_values, image_grid_thw))))
    }

    fn expand_with(
        &self,
        sample: &mut Sample,
        decoded: impl FnMut(image::DynamicImage, &SampleImage) -> Result<()>,
    ) -> Result<Vec<SampleImage>, EncodeError> {
        let id = sample.id.clone().unwrap_or_else(|| "(no id)".into());
        let placeholders: usize =
            sample.messages.iter().map(|m| m.content.matches(IMAGE_PLACEHOLDER).count()).sum();
        if placeholders != sample.images.len() {
            return Err(EncodeError::BadSample {
                id,
                reason: format!("its text has {placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but it has {} image(s)", sample.images.len()),
            });
        }
        let images = self
            .sized_images(sample, decoded)
            .map_err(|e| EncodeError::BadSample { id, reason: e.to_string() })?;
        let mut next = images.iter();
        for m in &mut sample.messages {
            if m.content.contains(IMAGE_PLACEHOLDER) {
                m.content = expand_placeholders(&m.content, &mut next);
            }
        }
        Ok(images)
    }

    /// The patches of `img`, decoded from `im`, resized within `im`'s bounds to the grid it was
    /// sized to.
    fn process(&self, img: &image::DynamicImage, im: &SampleImage) -> Result<ProcessedImage> {
        let cfg = self.processor.clone().with_pixels(Some(im.min_pixels), Some(im.max_pixels))?;
        let p = process_image(img, &cfg)?;
        if p.grid_thw != im.grid_thw {
            bail!(
                "the image changed since it was checked: grid {:?}, expected {:?}",
                p.grid_thw,
                im.grid_thw
            );
        }
        Ok(p)
    }

    /// `pixel_values` and grids of `images`, in order, for the model's forward.
    pub fn vision_inputs<'a>(
        &self,
        images: impl IntoIterator<Item = &'a SampleImage>,
    ) -> Result<Option<VisionInputs>> {
        let mut processed = Vec::new();
        for (i, im) in images.into_iter().enumerate() {
            let img = decode(&im.data, self.decode_cap(im.max_pixels))
                .with_context(|| format!("image {i} ({:?})", im.data))?;
            processed.push(
                self.process(&img, im).with_context(|| format!("image {i} ({:?})", im.data))?,
            );
        }
        if processed.is_empty() {
            return Ok(None);
        }
        let (pixel_values, image_grid_thw) = stack_images(&processed)?;
        Ok(Some(VisionInputs::images(pixel_values, image_grid_thw)))
    }

    /// The batch tensors `pixel_values` `[patches, C·T·P·P]` and `image_grid_thw` `[n, 3]`
    /// (int64) of a batch's images, none when it has no image.
    pub fn batch_tensors(&self, batch: &[&Encoded]) -> Result<Vec<(String, Tensor)>> {
        match self.vision_inputs(batch.iter().flat_map(|e| e.images.iter()))? {
            None => Ok(Vec::new()),
            Some(v) => Ok(vec![
                ("pixel_values".into(), v.pixel_values),
                ("image_grid_thw".into(), grid_tensor(&v.image_grid_thw)),
            ]),
        }
    }
}

/// `text` with each `<image>` replaced by the next image's vision-token block.
fn expand_placeholders<'a>(
    text: &str,
    images: &mut impl Iterator<Item = &'a SampleImage>,
) -> String {
    let mut out = String::with_capacity(text.len());
    for (k, part) in text.split(IMAGE_PLACEHOLDER).enumerate() {
        if k > 0 {
            let tokens = images.next().map_or(0, |im| im.tokens);
            out.push_str(VISION_START);
            out.push_str(&IMAGE_PAD.repeat(tokens));
            out.push_str(VISION_END);
        }
        out.push_str(part);
    }
    out
}

/// `[n, 3]` int64 of `grids`.
pub fn grid_tensor(grids: &[[i64; 3]]) -> Tensor {
    let flat: Vec<i64> = grids.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([grids.len() as i64, 3])
}

/// The grids of an `image_grid_thw` tensor `[n, 3]`.
pub fn grids_of(t: &Tensor) -> Result<Vec<[i64; 3]>> {
    let size = t.size();
    if size.len() != 2 || size[1] != 3 {
        bail!("image_grid_thw must be [images, 3], got {size:?}");
    }
    let flat: Vec<i64> = Vec::try_from(&t.f_to_kind(tch::Kind::Int64)?.f_reshape([-1])?)?;
    Ok(flat.chunks(3).map(|c| [c[0], c[1], c[2]]).collect())
}

fn decode(data: &ImageData, max_pixels: u64) -> Result<image::DynamicImage> {
    match data {
        ImageData::File(p) => load_image(p, max_pixels),
        ImageData::Bytes(b) => decode_image(b, max_pixels),
    }
}

/// Encodes a sample of any model: text-only samples as [`encode_sample`]; samples with images
/// through `prep` (an error when the model has no vision tower). Row-level problems are
/// [`EncodeError`]s the trainer stops on or skips, as configured.
pub fn encode_multimodal(
    tok: &Tokenizer,
    prep: Option<&ImagePrep>,
    mut sample: Sample,
    opts: &EncodeOptions,
) -> Result<Encoded> {
    let id = sample.id.clone().unwrap_or_else(|| "(no id)".into());
    let Some(prep) = prep else {
        if !sample.images.is_empty() {
            bail!(EncodeError::BadSample {
                id,
                reason: format!("it has {} image(s) but the model has no vision tower (use a vision-language model such as Qwen2-VL)", sample.images.len())
            });
        }
        return encode_sample(tok, &sample, opts);
    };
    let images = prep.expand(&mut sample)?;
    let mut encoded = encode_sample(tok, &sample, opts)?;
    let pad = prep.image_pad_id;
    for (l, &t) in encoded.labels.iter_mut().zip(&encoded.input_ids) {
        if t == pad {
            *l = IGNORE_INDEX;
        }
    }
    let kept = encoded.input_ids.iter().filter(|&&t| t == pad).count();
    let total: usize = images.iter().map(|im| im.tokens).sum();
    if kept != total {
        bail!(EncodeError::ImageBlockCut { id, kept, total, cutoff_len: opts.cutoff_len });
    }
    if encoded.num_label_tokens() == 0 {
        bail!(EncodeError::NoLabelTokens {
            id,
            truncated_from: encoded.truncated_from,
            cutoff_len: opts.cutoff_len
        });
    }
    encoded.images = images;
    Ok(encoded)
}
