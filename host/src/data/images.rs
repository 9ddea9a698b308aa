//! Images and videos of multimodal samples (Qwen2-VL, Qwen2.5-VL): found, decoded, checked and
//! sized when the data set is loaded; turned into `pixel_values` (`pixel_values_videos`) only
//! when their batch is built.
//!
//! A sample's text holds one `<image>` placeholder per image, in order. For a Qwen2-VL model
//! each placeholder becomes `<|vision_start|>` + N × `<|image_pad|>` + `<|vision_end|>`, with
//! N the image's merged patch count (`grid_t · grid_h · grid_w / merge²`) after `smart_resize`
//! — what transformers' Qwen2-VL processor writes into the text, and what Qwen2-VL-Finetune
//! does with LLaVA's `<image>`. Image-pad tokens never carry labels.
//!
//! Videos work the same way with `<video>` and `<|video_pad|>`: a video file or frame folder
//! is planned (frames counted and sampled, frame size chosen; [`crate::vision::plan_video`])
//! when the data set is loaded, and its frames are decoded and patched when its batch is
//! built (`pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{ImageSource, Sample};
use tch::Tensor;

use super::encode::{encode_sample, EncodeError, EncodeOptions, Encoded, IGNORE_INDEX};
pub use super::encode::{ImageData, SampleImage};
use crate::model::{VideoInputs, VisionInputs};
use crate::text::Tokenizer;
use crate::vision::{
    decode_image, load_image, pixel_cap_for, plan_video, process_image, read_and_process,
    smart_resize, stack_images, ImageProcessorConfig, ProcessedImage, ProcessedVideo, VideoOptions,
    VideoPlan,
};

/// The placeholder dataset plugins write, one per image.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// The placeholder dataset plugins write, one per video.
pub const VIDEO_PLACEHOLDER: &str = "<video>";
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";
const IMAGE_PAD: &str = "<|image_pad|>";
const VIDEO_PAD: &str = "<|video_pad|>";

/// Where a sample's image or video is, and how to name it: a path, or an embedded blob
/// (`Err((what, reason))` for a blob index past the sample's blobs).
fn source_data(
    source: &ImageSource,
    blobs: &[Arc<Vec<u8>>],
) -> std::result::Result<(ImageData, String), (String, String)> {
    match source {
        ImageSource::Path(p) => Ok((ImageData::File(PathBuf::from(p)), p.clone())),
        ImageSource::Blob(i) => match blobs.get(*i) {
            Some(b) => Ok((ImageData::Bytes(b.clone()), format!("embedded, {} bytes", b.len()))),
            None => {
                Err((format!("blob {i}"), format!("the sample has only {} blobs", blobs.len())))
            }
        },
    }
}

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
    /// How videos are sampled and sized (the model's `video_preprocessor_config.json` or
    /// qwen-vl-utils' defaults, then `data.video_*`).
    pub video: VideoOptions,
    merge_size: u32,
    image_pad_id: i64,
    /// `<|video_pad|>`'s id (the config's `video_token_id`), `None` for a model without one.
    video_pad_id: Option<i64>,
    /// Qwen2.5-VL's `vision_config.tokens_per_second` (default 4), `None` for Qwen2-VL.
    tokens_per_second: Option<f64>,
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
        let video_pad_id = match config.get("video_token_id").and_then(|v| v.as_i64()) {
            None => None,
            Some(id) => {
                let pad = tok.token_to_id(VIDEO_PAD).unwrap_or(-1);
                if pad != id {
                    bail!(
                        "{}: video_token_id is {id} but the tokenizer's {VIDEO_PAD} is {pad}",
                        file.display()
                    );
                }
                Some(id)
            }
        };
        let tokens_per_second = crate::model::qwen2vl::config::video_tokens_per_second(&config);
        let processor = ImageProcessorConfig::from_dir(model_dir)?;
        let merge_size = processor.merge_size;
        Ok(Some(Self {
            processor,
            min_pixels: None,
            max_pixels: None,
            max_image_pixels: None,
            video: VideoOptions::from_dir(model_dir)?,
            merge_size,
            image_pad_id: image_token_id,
            video_pad_id,
            tokens_per_second,
        }))
    }

    /// Qwen2.5-VL's `tokens_per_second` (temporal M-RoPE positions per second of video),
    /// `None` for Qwen2-VL.
    pub fn tokens_per_second(&self) -> Option<f64> {
        self.tokens_per_second
    }

    pub fn image_pad_id(&self) -> i64 {
        self.image_pad_id
    }

    /// `<|video_pad|>`'s id, `None` when the model takes no videos.
    pub fn video_pad_id(&self) -> Option<i64> {
        self.video_pad_id
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
        let blobs = take_blobs(sample);
        self.sized_images(sample, &blobs, |_, _| Ok(()))
    }

    /// Finds and plans every video of `sample` (frames counted and sampled, frame size
    /// chosen), naming the video at fault. `blobs` are the sample's encoded videos.
    fn sized_videos(
        &self,
        sample: &Sample,
        blobs: &[Arc<Vec<u8>>],
    ) -> Result<Vec<SampleImage>, String> {
        let mut out = Vec::with_capacity(sample.videos.len());
        for (index, source) in sample.videos.iter().enumerate() {
            let (data, what) = source_data(source, blobs)
                .map_err(|(what, reason)| format!("video {index} ({what}): {reason}"))?;
            let plan =
                with_video_path(&data, |path| plan_video(path, &self.video, &self.processor))
                    .map_err(|e| format!("video {index} ({what}): {e:#}"))?;
            out.push(self.video_item(data, plan));
        }
        Ok(out)
    }

    /// A planned video as an item of [`Encoded::images`].
    fn video_item(&self, data: ImageData, plan: VideoPlan) -> SampleImage {
        let tokens = plan.num_video_tokens(self.merge_size);
        SampleImage {
            data,
            min_pixels: plan.min_pixels,
            max_pixels: plan.max_pixels,
            original_size: plan.original_size,
            resized_size: plan.resized_size,
            grid_thw: plan.grid_thw,
            tokens,
            video: Some(plan),
        }
    }

    /// The prompt text and model inputs of one video (a file, a frame folder, or an encoded
    /// file's bytes), for `generate` and `serve`: `<|vision_start|>` + N × `<|video_pad|>` +
    /// `<|vision_end|>` to put where the video goes, the video's patches, grid and
    /// `second_per_grid_t`, and its plan (frames kept of total, fps, size).
    pub fn video_prompt(&self, video: &ImageData) -> Result<(String, VideoInputs, VideoPlan)> {
        if self.video_pad_id.is_none() {
            bail!("this model's config.json has no video_token_id: it takes no videos");
        }
        let plan = with_video_path(video, |path| plan_video(path, &self.video, &self.processor))
            .with_context(|| format!("video {video:?}"))?;
        let item = self.video_item(video.clone(), plan.clone());
        let p = self.process_video(&item).with_context(|| format!("video {video:?}"))?;
        let text = format!("{VISION_START}{}{VISION_END}", VIDEO_PAD.repeat(item.tokens));
        let inputs = VideoInputs {
            pixel_values: p.pixel_values,
            grid_thw: vec![p.grid_thw],
            second_per_grid_ts: vec![p.second_per_grid_t],
        };
        Ok((text, inputs, plan))
    }

    /// The patches of a planned video (its frames decoded again).
    fn process_video(&self, im: &SampleImage) -> Result<ProcessedVideo> {
        let Some(plan) = &im.video else {
            bail!("internal: an image where a video was expected");
        };
        with_video_path(&im.data, |path| {
            read_and_process(path, plan, self.video.frame_pixel_cap(), &self.processor)
        })
    }

    /// [`Self::sample_images`], handing each decoded image to `decoded` beside its sizes (one
    /// decode for callers that need the pixels at once, such as `serve`).
    fn sized_images(
        &self,
        sample: &Sample,
        blobs: &[Arc<Vec<u8>>],
        mut decoded: impl FnMut(image::DynamicImage, &SampleImage) -> Result<()>,
    ) -> Result<Vec<SampleImage>, BadImage> {
        let (min_pixels, max_pixels) = self.bounds(sample);
        let factor = self.processor.patch_size * self.merge_size;
        let mut out = Vec::with_capacity(sample.images.len());
        for (index, source) in sample.images.iter().enumerate() {
            let (data, what) = source_data(source, blobs).map_err(|(what, reason)| BadImage {
                index,
                what,
                reason,
            })?;
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
                video: None,
            };
            decoded(img, &sized).map_err(|e| bad(format!("{e:#}")))?;
            out.push(sized);
        }
        Ok(out)
    }

    /// Checks that `sample` has one `<image>` placeholder per image and one `<video>` per
    /// video, finds and sizes its images and videos, and writes each one's block of vision
    /// tokens in place of its placeholder. The result holds the images, then the videos.
    pub fn expand(&self, sample: &mut Sample) -> Result<Vec<SampleImage>, EncodeError> {
        self.expand_with(sample, |_, _| Ok(()))
    }

    /// [`Self::expand`] and the images' `pixel_values` and grids from the same decode (and the
    /// videos' `pixel_values_videos`, grids and `second_per_grid_ts`): what a request needs at
    /// once (`serve`, `generate`), where the trainer sizes images when the data set is loaded
    /// and decodes them again only when their batch is built.
    pub fn expand_with_pixels(
        &self,
        sample: &mut Sample,
    ) -> Result<(Vec<SampleImage>, Option<VisionInputs>), EncodeError> {
        let mut processed = Vec::with_capacity(sample.images.len());
        let images = self.expand_with(sample, |img, im| {
            processed.push(self.process(&img, im)?);
            Ok(())
        })?;
        let id = sample.id.clone().unwrap_or_else(|| "(no id)".into());
        let bad =
            |e: anyhow::Error| EncodeError::BadSample { id: id.clone(), reason: format!("{e:#}") };
        let mut videos = Vec::new();
        for (k, im) in images.iter().filter(|im| im.video.is_some()).enumerate() {
            videos.push(
                self.process_video(im)
                    .with_context(|| format!("video {k} ({:?})", im.data))
                    .map_err(bad)?,
            );
        }
        let vision = self.assemble(processed, videos).map_err(bad)?;
        Ok((images, vision))
    }

    /// Images' and videos' patches as one forward's [`VisionInputs`], `None` without any.
    fn assemble(
        &self,
        images: Vec<ProcessedImage>,
        videos: Vec<ProcessedVideo>,
    ) -> Result<Option<VisionInputs>> {
        let videos = if videos.is_empty() {
            None
        } else {
            let parts: Vec<&Tensor> = videos.iter().map(|v| &v.pixel_values).collect();
            Some(VideoInputs {
                pixel_values: Tensor::f_cat(&parts, 0)?,
                grid_thw: videos.iter().map(|v| v.grid_thw).collect(),
                second_per_grid_ts: videos.iter().map(|v| v.second_per_grid_t).collect(),
            })
        };
        let (pixel_values, image_grid_thw) = if images.is_empty() {
            let width = videos.as_ref().map_or(0, |v| v.pixel_values.size()[1]);
            (Tensor::zeros([0, width], (tch::Kind::Float, tch::Device::Cpu)), Vec::new())
        } else {
            stack_images(&images)?
        };
        if image_grid_thw.is_empty() && videos.is_none() {
            return Ok(None);
        }
        Ok(Some(VisionInputs { pixel_values, image_grid_thw, videos }))
    }

    fn expand_with(
        &self,
        sample: &mut Sample,
        decoded: impl FnMut(image::DynamicImage, &SampleImage) -> Result<()>,
    ) -> Result<Vec<SampleImage>, EncodeError> {
        let id = sample.id.clone().unwrap_or_else(|| "(no id)".into());
        let count = |p: &str| -> usize {
            sample.messages.iter().map(|m| m.content.matches(p).count()).sum()
        };
        let (image_marks, video_marks) = (count(IMAGE_PLACEHOLDER), count(VIDEO_PLACEHOLDER));
        if image_marks != sample.images.len() {
            return Err(EncodeError::BadSample {
                id,
                reason: format!("its text has {image_marks} `{IMAGE_PLACEHOLDER}` placeholder(s) but it has {} image(s)", sample.images.len()),
            });
        }
        if video_marks != sample.videos.len() {
            return Err(EncodeError::BadSample {
                id,
                reason: format!("its text has {video_marks} `{VIDEO_PLACEHOLDER}` placeholder(s) but it has {} video(s)", sample.videos.len()),
            });
        }
        if !sample.videos.is_empty() && self.video_pad_id.is_none() {
            return Err(EncodeError::BadSample {
                id,
                reason: format!("it has {} video(s) but the model's config.json has no video_token_id (it takes no videos)", sample.videos.len()),
            });
        }
        let blobs = take_blobs(sample);
        let mut images = self
            .sized_images(sample, &blobs, decoded)
            .map_err(|e| EncodeError::BadSample { id: id.clone(), reason: e.to_string() })?;
        let videos = self
            .sized_videos(sample, &blobs)
            .map_err(|reason| EncodeError::BadSample { id, reason })?;
        let (mut next_image, mut next_video) = (images.iter(), videos.iter());
        for m in &mut sample.messages {
            if m.content.contains(IMAGE_PLACEHOLDER) {
                m.content =
                    expand_placeholders(&m.content, IMAGE_PLACEHOLDER, IMAGE_PAD, &mut next_image);
            }
            if m.content.contains(VIDEO_PLACEHOLDER) {
                m.content =
                    expand_placeholders(&m.content, VIDEO_PLACEHOLDER, VIDEO_PAD, &mut next_video);
            }
        }
        images.extend(videos);
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

    /// `pixel_values` and grids of `images` (and of the videos among them: their
    /// `pixel_values_videos`, grids and `second_per_grid_ts`), in order, for the model's
    /// forward.
    pub fn vision_inputs<'a>(
        &self,
        images: impl IntoIterator<Item = &'a SampleImage>,
    ) -> Result<Option<VisionInputs>> {
        let (mut processed, mut videos) = (Vec::new(), Vec::new());
        for im in images {
            if im.video.is_some() {
                let k = videos.len();
                videos.push(
                    self.process_video(im).with_context(|| format!("video {k} ({:?})", im.data))?,
                );
                continue;
            }
            let i = processed.len();
            let img = decode(&im.data, self.decode_cap(im.max_pixels))
                .with_context(|| format!("image {i} ({:?})", im.data))?;
            processed.push(
                self.process(&img, im).with_context(|| format!("image {i} ({:?})", im.data))?,
            );
        }
        self.assemble(processed, videos)
    }

    /// The batch tensors `pixel_values` `[patches, C·T·P·P]` and `image_grid_thw` `[n, 3]`
    /// (int64) of a batch's images, none when it has no image; and for its videos
    /// `pixel_values_videos`, `video_grid_thw` and `second_per_grid_ts` (float64 `[n]`).
    pub fn batch_tensors(&self, batch: &[&Encoded]) -> Result<Vec<(String, Tensor)>> {
        self.item_tensors(batch.iter().flat_map(|e| e.images.iter()))
    }

    /// [`Self::batch_tensors`] of images and videos in order (a GRPO prompts batch's).
    pub fn item_tensors<'a>(
        &self,
        items: impl IntoIterator<Item = &'a SampleImage>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let Some(v) = self.vision_inputs(items)? else {
            return Ok(out);
        };
        if !v.image_grid_thw.is_empty() {
            out.push(("pixel_values".into(), v.pixel_values));
            out.push(("image_grid_thw".into(), grid_tensor(&v.image_grid_thw)));
        }
        if let Some(videos) = v.videos {
            out.push(("pixel_values_videos".into(), videos.pixel_values));
            out.push(("video_grid_thw".into(), grid_tensor(&videos.grid_thw)));
            out.push(("second_per_grid_ts".into(), Tensor::from_slice(&videos.second_per_grid_ts)));
        }
        Ok(out)
    }
}

/// The sample's blobs, shared by its images and videos.
fn take_blobs(sample: &mut Sample) -> Vec<Arc<Vec<u8>>> {
    std::mem::take(&mut sample.blobs).into_iter().map(Arc::new).collect()
}

/// Runs `f` on the path of a video: its file or folder, or a temporary file holding its
/// bytes (removed afterwards).
fn with_video_path<T>(data: &ImageData, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    match data {
        ImageData::File(p) => f(p),
        ImageData::Bytes(bytes) => {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "ferrotune-video-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, bytes.as_slice())
                .with_context(|| format!("cannot write the video to {}", path.display()))?;
            let out = f(&path);
            let _ = std::fs::remove_file(&path);
            out
        }
    }
}

/// `text` with each `placeholder` replaced by the next item's vision-token block of `pad`.
fn expand_placeholders<'a>(
    text: &str,
    placeholder: &str,
    pad: &str,
    images: &mut impl Iterator<Item = &'a SampleImage>,
) -> String {
    let mut out = String::with_capacity(text.len());
    for (k, part) in text.split(placeholder).enumerate() {
        if k > 0 {
            let tokens = images.next().map_or(0, |im| im.tokens);
            out.push_str(VISION_START);
            out.push_str(&pad.repeat(tokens));
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
        if !sample.videos.is_empty() {
            bail!(EncodeError::BadSample {
                id,
                reason: format!("it has {} video(s) but the model has no vision tower (use a vision-language model such as Qwen2-VL)", sample.videos.len())
            });
        }
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
    let (pad, video_pad) = (prep.image_pad_id, prep.video_pad_id.unwrap_or(prep.image_pad_id));
    for (l, &t) in encoded.labels.iter_mut().zip(&encoded.input_ids) {
        if t == pad || t == video_pad {
            *l = IGNORE_INDEX;
        }
    }
    for (is_video, pad) in [(false, pad), (true, video_pad)] {
        let kept = encoded.input_ids.iter().filter(|&&t| t == pad).count();
        let total: usize =
            images.iter().filter(|im| im.video.is_some() == is_video).map(|im| im.tokens).sum();
        if kept != total {
            bail!(EncodeError::ImageBlockCut {
                id: id.clone(),
                kept,
                total,
                cutoff_len: opts.cutoff_len
            });
        }
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
