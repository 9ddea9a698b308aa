//! Videos for Qwen2-VL and Qwen2.5-VL: frames sampled as qwen-vl-utils samples them, then
//! resized and patched as transformers 5.24's `Qwen2VLVideoProcessor` does.
//!
//! A video is a file (mp4, avi, webm, mkv, mov; decoded with FFmpeg's libraries, cargo feature
//! `ffmpeg`) or a folder of frames (PNG, JPEG, WebP, BMP) in file-name order. Sampling
//! follows qwen-vl-utils' `smart_nframes` (`fps` frames a second, default 2, within
//! `min_frames`..`max_frames`, or a fixed `nframes`, rounded to [`FRAME_FACTOR`]) and picks
//! `linspace(0, total - 1, n).round()`; each frame is resized with [`smart_resize`] under
//! qwen-vl-utils' per-frame bound (`max(min(max_pixels, total_pixels / n · 2), min_pixels ·
//! 1.05)`). The pixels then go the way of transformers' video processor: torchvision's
//! native-uint8 bicubic antialiased resize (libtorch's own kernel, so the bytes are equal),
//! the fused rescale + normalise in float32 (`(x - mean/rescale) / (std/rescale)`), frames
//! grouped by `temporal_patch_size` with the last one repeated to fill the final group, and
//! its patch layout. References:
//! <https://github.com/QwenLM/Qwen2.5-VL/blob/main/qwen-vl-utils/src/qwen_vl_utils/vision_process.py>,
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_vl/video_processing_qwen2_vl.py>.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use ferrotune::vision::{plan_video, read_and_process, ImageProcessorConfig, VideoOptions};
//! let model = std::path::Path::new("models/qwen2-vl");
//! let cfg = ImageProcessorConfig::from_dir(model)?;
//! let opts = VideoOptions::from_dir(model)?; // qwen-vl-utils' defaults unless the model sets them
//! let clip = std::path::Path::new("clip.mp4"); // or a folder of frames
//! let plan = plan_video(clip, &opts, &cfg)?; // frames kept and their size; nothing resized yet
//! let video = read_and_process(clip, &plan, opts.frame_pixel_cap(), &cfg)?;
//! let tokens = plan.num_video_tokens(cfg.merge_size); // <|video_pad|> tokens in the prompt
//! println!("{}: {tokens} tokens", plan.describe());
//! # let _ = video; Ok(()) }
//! ```
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;
use serde_json::{Map, Value as Json};
use tch::{Device, Kind, Tensor};

use super::config::ImageProcessorConfig;
use super::decode::{image_dimensions, load_image, pixel_cap_for, to_rgb8};
use super::resize::smart_resize;

/// Frames are sampled in multiples of this (qwen-vl-utils' `FRAME_FACTOR`, Qwen2-VL's
/// `temporal_patch_size`).
pub const FRAME_FACTOR: u32 = 2;
/// Frames a second sampled from a video file (qwen-vl-utils' `FPS`).
pub const DEFAULT_VIDEO_FPS: f64 = 2.0;
/// qwen-vl-utils' `FPS_MIN_FRAMES` / `FPS_MAX_FRAMES`.
pub const DEFAULT_MIN_FRAMES: u32 = 4;
pub const DEFAULT_MAX_FRAMES: u32 = 768;
/// qwen-vl-utils' per-frame pixel bounds: 128 and 768 tokens of 28 × 28 pixels.
pub const DEFAULT_VIDEO_MIN_PIXELS: u64 = 128 * 28 * 28;
pub const DEFAULT_VIDEO_MAX_PIXELS: u64 = 768 * 28 * 28;
/// qwen-vl-utils' whole-video budget: 90 % of a 128k-token context of 28 × 28 pixels.
pub const DEFAULT_VIDEO_TOTAL_PIXELS: u64 = 128_000 * 28 * 28 * 9 / 10;
/// Frames a video may have (counted from the file, or the folder's frame files): longer ones
/// are refused before their frames are converted.
pub const MAX_VIDEO_FRAMES: usize = 100_000;
/// The video processor settings file of newer Qwen2-VL / Qwen2.5-VL checkpoints.
pub const VIDEO_PREPROCESSOR_CONFIG_FILE: &str = "video_preprocessor_config.json";
/// File extensions read as video files (anything else that is a file is tried as one too).
pub const VIDEO_FILE_EXTENSIONS: &[&str] = &["mp4", "avi", "webm", "mkv", "mov", "m4v"];
/// File extensions of the frames of a frame folder.
pub const FRAME_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// Whether this build decodes video files (cargo feature `ffmpeg`); frame folders work either
/// way.
pub const VIDEO_FILE_DECODING: bool = cfg!(feature = "ffmpeg");

/// How frames are sampled and sized (`data.video_*` in a run's config; qwen-vl-utils'
/// defaults, or the model's `video_preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct VideoOptions {
    /// Frames a second to sample (default 2.0).
    pub fps: f64,
    /// A fixed frame count instead of `fps` (rounded to [`FRAME_FACTOR`]).
    pub nframes: Option<u32>,
    /// Bounds on the sampled frames with `fps` (defaults 4 and 768).
    pub min_frames: u32,
    pub max_frames: u32,
    /// Per-frame pixel bounds after resizing (defaults 128 · 28² and 768 · 28²).
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// The whole video's pixel budget, shared by its frames (default 0.9 · 128000 · 28²).
    pub total_pixels: u64,
    /// Frames above this many pixels are refused before decoding (default 4 × `max_pixels`,
    /// at least 1 MP).
    pub max_frame_pixels: Option<u64>,
}

impl Default for VideoOptions {
    fn default() -> Self {
        Self {
            fps: DEFAULT_VIDEO_FPS,
            nframes: None,
            min_frames: DEFAULT_MIN_FRAMES,
            max_frames: DEFAULT_MAX_FRAMES,
            min_pixels: DEFAULT_VIDEO_MIN_PIXELS,
            max_pixels: DEFAULT_VIDEO_MAX_PIXELS,
            total_pixels: DEFAULT_VIDEO_TOTAL_PIXELS,
            max_frame_pixels: None,
        }
    }
}

impl VideoOptions {
    /// qwen-vl-utils' defaults, with what the model's `video_preprocessor_config.json` sets
    /// (`fps`, `num_frames`, `min_frames`, `max_frames`, `size.shortest_edge` /
    /// `size.longest_edge` or `min_pixels` / `max_pixels`) when the file exists.
    pub fn from_dir(model_dir: &Path) -> Result<Self> {
        let file = model_dir.join(VIDEO_PREPROCESSOR_CONFIG_FILE);
        if !file.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let obj: Map<String, Json> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON object", file.display()))?;
        Self::default().with_json(&obj).with_context(|| format!("in {}", file.display()))
    }

    /// These options with the keys of a video processor config applied.
    pub fn with_json(mut self, obj: &Map<String, Json>) -> Result<Self> {
        let num = |key: &str| -> Result<Option<f64>> {
            match obj.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => {
                    v.as_f64().map(Some).with_context(|| format!("`{key}` must be a number"))
                }
            }
        };
        let int = |key: &str, v: Option<&Json>| -> Result<Option<u64>> {
            match v {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .with_context(|| format!("`{key}` must be a non-negative integer, got {v}")),
            }
        };
        if let Some(f) = num("fps")? {
            self.fps = f;
        }
        if let Some(n) = int("num_frames", obj.get("num_frames"))? {
            self.nframes = Some(u32::try_from(n).context("`num_frames` is too large")?);
        }
        if let Some(n) = int("min_frames", obj.get("min_frames"))? {
            self.min_frames = u32::try_from(n).context("`min_frames` is too large")?;
        }
        if let Some(n) = int("max_frames", obj.get("max_frames"))? {
            self.max_frames = u32::try_from(n).context("`max_frames` is too large")?;
        }
        let size = obj.get("size").and_then(Json::as_object);
        let min = int("min_pixels", obj.get("min_pixels"))?
            .or(int("size.shortest_edge", size.and_then(|s| s.get("shortest_edge")))?);
        let max = int("max_pixels", obj.get("max_pixels"))?
            .or(int("size.longest_edge", size.and_then(|s| s.get("longest_edge")))?);
        if let Some(v) = min {
            self.min_pixels = v;
        }
        if let Some(v) = max {
            self.max_pixels = v;
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the options, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.fps.is_finite() && self.fps > 0.0,
            "video fps must be a positive number, got {}",
            self.fps
        );
        if let Some(n) = self.nframes {
            ensure!(
                n >= FRAME_FACTOR && n as usize <= MAX_VIDEO_FRAMES,
                "video nframes must be in {FRAME_FACTOR}..={MAX_VIDEO_FRAMES}, got {n}"
            );
        }
        ensure!(
            self.min_frames <= self.max_frames,
            "video min_frames ({}) is above max_frames ({})",
            self.min_frames,
            self.max_frames
        );
        ensure!(
            self.max_frames as usize <= MAX_VIDEO_FRAMES,
            "video max_frames must be at most {MAX_VIDEO_FRAMES}, got {}",
            self.max_frames
        );
        ensure!(
            self.min_pixels > 0 && self.min_pixels <= self.max_pixels,
            "video min_pixels ({}) must be positive and at most max_pixels ({})",
            self.min_pixels,
            self.max_pixels
        );
        ensure!(self.total_pixels > 0, "video total_pixels must be positive");
        Ok(())
    }

    /// The most pixels a source frame may have.
    pub fn frame_pixel_cap(&self) -> u64 {
        self.max_frame_pixels.unwrap_or_else(|| pixel_cap_for(self.max_pixels))
    }

    /// qwen-vl-utils' `smart_nframes`: how many frames to sample from a video of `total`
    /// frames at `video_fps`.
    pub fn smart_nframes(&self, total: usize, video_fps: f64) -> Result<usize> {
        let f = FRAME_FACTOR as f64;
        let n = match self.nframes {
            Some(n) => (n as f64 / f).round_ties_even() * f,
            None => {
                let min_frames = (self.min_frames as f64 / f).ceil() * f;
                let max_frames = (self.max_frames.min(total as u32) as f64 / f).floor() * f;
                let n = total as f64 / video_fps * self.fps;
                let n = n.max(min_frames).min(max_frames).min(total as f64);
                (n / f).floor() * f
            }
        };
        if !(f <= n && n <= total as f64) {
            bail!(
                "{n} frames would be sampled but the video has {total}: a video needs at least \
                 {FRAME_FACTOR} frames and the sample count must be in {FRAME_FACTOR}..={total} \
                 (data.video_fps / video_nframes / video_min_frames / video_max_frames)"
            );
        }
        Ok(n as usize)
    }

    /// The per-frame pixel bound for `nframes` frames (qwen-vl-utils' `fetch_video`):
    /// `max(min(max_pixels, total_pixels / nframes · 2), floor(min_pixels · 1.05))`.
    pub fn frame_max_pixels(&self, nframes: usize) -> u64 {
        let share = self.total_pixels as f64 / nframes.max(1) as f64 * FRAME_FACTOR as f64;
        let floor = (self.min_pixels as f64 * 1.05) as u64;
        (self.max_pixels.min(share as u64)).max(floor)
    }
}

/// Where a video is: a file or a frame folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoKind {
    File,
    Frames,
}

/// What was learnt about a video before its frames are converted: its frame count and rate,
/// the frames kept, and their size after resizing.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoPlan {
    pub kind: VideoKind,
    /// Frames in the file (or frame files in the folder).
    pub total_frames: usize,
    /// The file's average frame rate (`None` for a frame folder).
    pub native_fps: Option<f64>,
    /// Indices of the sampled frames, in order.
    pub indices: Vec<usize>,
    /// Frames a second of the sampled frames (qwen-vl-utils' `sample_fps`); Qwen2.5-VL's
    /// `second_per_grid_t` is `temporal_patch_size / fps`.
    pub fps: f64,
    /// `(width, height)` of the source frames.
    pub original_size: (u32, u32),
    /// `(width, height)` after [`smart_resize`].
    pub resized_size: (u32, u32),
    /// Per-frame pixel bounds the size came from.
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// `[t, h, w]` in patches, `t` = frames (padded to `temporal_patch_size`) / that size.
    pub grid_thw: [i64; 3],
}

impl VideoPlan {
    /// `<|video_pad|>` tokens in the prompt: `t · h · w / merge²`.
    pub fn num_video_tokens(&self, merge_size: u32) -> usize {
        let [t, h, w] = self.grid_thw;
        (t * h * w) as usize / (merge_size as usize * merge_size as usize).max(1)
    }

    /// Seconds per temporal patch (`temporal_patch_size / fps`).
    pub fn second_per_grid_t(&self, temporal_patch_size: u32) -> f64 {
        temporal_patch_size as f64 / self.fps
    }

    /// `N of M frames at F fps, W×H → W'×H', grid t×h×w`.
    pub fn describe(&self) -> String {
        let ((w, h), (rw, rh)) = (self.original_size, self.resized_size);
        let [t, gh, gw] = self.grid_thw;
        let native = self.native_fps.map_or(String::new(), |f| format!(" (file {f:.3} fps)"));
        format!(
            "{} of {} frames at {:.3} fps{native}, {w}×{h} → {rw}×{rh}, grid {t}×{gh}×{gw}",
            self.indices.len(),
            self.total_frames,
            self.fps
        )
    }
}

/// The frame files of a folder, sorted by name.
pub fn frame_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read frame folder {}", dir.display()))?;
    let mut files = Vec::new();
    for e in entries {
        let path = e.with_context(|| format!("cannot read frame folder {}", dir.display()))?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if path.is_file() && ext.is_some_and(|e| FRAME_EXTENSIONS.contains(&e.as_str())) {
            files.push(path);
            if files.len() > MAX_VIDEO_FRAMES {
                bail!("frame folder {} has more than {MAX_VIDEO_FRAMES} frames", dir.display());
            }
        }
    }
    if files.is_empty() {
        bail!(
            "frame folder {} holds no frames (files ending in {})",
            dir.display(),
            FRAME_EXTENSIONS.join(", ")
        );
    }
    files.sort();
    Ok(files)
}

/// `linspace(0, total - 1, n).round()` in float32, as torch computes it (qwen-vl-utils).
pub fn sample_indices(total: usize, n: usize) -> Result<Vec<usize>> {
    ensure!(n >= 1 && total >= 1, "cannot sample {n} of {total} frames");
    let idx = Tensor::f_linspace(0.0, (total - 1) as f64, n as i64, (Kind::Float, Device::Cpu))?
        .f_round()?
        .f_to_kind(Kind::Int64)?;
    let idx: Vec<i64> = Vec::try_from(&idx)?;
    Ok(idx.into_iter().map(|i| i as usize).collect())
}

/// Plans a video: counts its frames (a file is decoded once without conversion), picks the
/// frames to keep and their size. `cfg` gives patch, merge and temporal patch sizes.
pub fn plan_video(
    path: &Path,
    opts: &VideoOptions,
    cfg: &ImageProcessorConfig,
) -> Result<VideoPlan> {
    opts.validate()?;
    let (kind, total, native_fps, (w, h)) = if path.is_dir() {
        let files = frame_files(path)?;
        let bytes = std::fs::read(&files[0])
            .with_context(|| format!("cannot read frame {}", files[0].display()))?;
        let dims = image_dimensions(&bytes)
            .with_context(|| format!("frame {} is not an image", files[0].display()))?;
        (VideoKind::Frames, files.len(), None, dims)
    } else if path.is_file() {
        let info = probe_file(path, opts.frame_pixel_cap())?;
        (VideoKind::File, info.frames, Some(info.fps), (info.width, info.height))
    } else {
        bail!("video {} does not exist", path.display());
    };
    let cap = opts.frame_pixel_cap();
    if u64::from(w) * u64::from(h) > cap {
        bail!(
            "its frames are {w}x{h} pixels (width x height), above the limit of {cap} pixels a \
             frame (data.video_max_pixels; shrink the video)"
        );
    }
    let (indices, fps) = match kind {
        VideoKind::File => {
            let native = native_fps.unwrap_or(opts.fps);
            let n = opts.smart_nframes(total, native)?;
            let fps = n as f64 / (total as f64).max(1e-6) * native;
            (sample_indices(total, n)?, fps)
        }
        VideoKind::Frames => {
            // A folder holds frames already sampled at `fps` (qwen-vl-utils' frame lists): all
            // are kept, unless `nframes` or `max_frames` asks for fewer.
            let max = (opts.max_frames / FRAME_FACTOR * FRAME_FACTOR).max(FRAME_FACTOR) as usize;
            let n = match opts.nframes {
                Some(n) => {
                    let n = ((n as f64 / FRAME_FACTOR as f64).round_ties_even()
                        * FRAME_FACTOR as f64) as usize;
                    if n > total {
                        bail!("video_nframes is {n} but the frame folder has {total} frames");
                    }
                    n
                }
                None => total.min(max),
            };
            if n == total {
                ((0..total).collect(), opts.fps)
            } else {
                (sample_indices(total, n)?, opts.fps * n as f64 / total as f64)
            }
        }
    };
    let t = cfg.temporal_patch_size.max(1) as usize;
    let padded = indices.len().div_ceil(t) * t;
    let max_pixels = opts.frame_max_pixels(padded.next_multiple_of(FRAME_FACTOR as usize));
    let (rh, rw) = smart_resize(h, w, cfg.factor(), opts.min_pixels, max_pixels)?;
    let p = cfg.patch_size as i64;
    Ok(VideoPlan {
        kind,
        total_frames: total,
        native_fps,
        indices,
        fps,
        original_size: (w, h),
        resized_size: (rw, rh),
        min_pixels: opts.min_pixels,
        max_pixels,
        grid_thw: [(padded / t) as i64, rh as i64 / p, rw as i64 / p],
    })
}

/// The frames `plan` keeps, decoded to 8-bit RGB.
pub fn read_frames(path: &Path, plan: &VideoPlan, max_frame_pixels: u64) -> Result<Vec<RgbImage>> {
    let mut frames = Vec::with_capacity(plan.indices.len());
    each_frame(path, plan, max_frame_pixels, |_, f| {
        frames.push(f);
        Ok(())
    })?;
    Ok(frames)
}

/// Hands each frame `plan` keeps to `f` in order (its position among the kept frames, its
/// pixels), checking that it has the video's size: one frame in memory at a time.
fn each_frame(
    path: &Path,
    plan: &VideoPlan,
    max_frame_pixels: u64,
    mut f: impl FnMut(usize, RgbImage) -> Result<()>,
) -> Result<()> {
    let (w, h) = plan.original_size;
    let mut checked = |k: usize, frame: RgbImage| -> Result<()> {
        if (frame.width(), frame.height()) != (w, h) {
            bail!(
                "frame {} of {} is {}x{}, the first is {w}x{h}: a video's frames must share one size",
                plan.indices[k],
                path.display(),
                frame.width(),
                frame.height()
            );
        }
        f(k, frame)
    };
    match plan.kind {
        VideoKind::Frames => {
            let files = frame_files(path)?;
            if files.len() != plan.total_frames {
                bail!(
                    "frame folder {} changed: {} frames, {} when it was checked",
                    path.display(),
                    files.len(),
                    plan.total_frames
                );
            }
            for (k, &i) in plan.indices.iter().enumerate() {
                let file = &files[i];
                let frame = load_image(file, max_frame_pixels)
                    .and_then(|img| to_rgb8(&img))
                    .with_context(|| format!("frame {}", file.display()))?;
                checked(k, frame)?;
            }
            Ok(())
        }
        VideoKind::File => decode_file_frames(path, &plan.indices, max_frame_pixels, &mut checked),
    }
}

/// Reads the frames `plan` keeps and resizes each as soon as it is decoded (torchvision's
/// resize is per frame, so this equals resizing them together), then processes them: only
/// resized frames are held, whatever the source size.
pub fn read_and_process(
    path: &Path,
    plan: &VideoPlan,
    max_frame_pixels: u64,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedVideo> {
    let mut resized = Vec::with_capacity(plan.indices.len());
    each_frame(path, plan, max_frame_pixels, |_, frame| {
        resized.push(resize_uint8(&frame_tensor(&[frame])?, plan, cfg)?);
        Ok(())
    })?;
    process_tensor(Tensor::f_cat(&resized, 0)?, plan, cfg)
}

/// `[n, 3, H, W]` uint8 of same-size frames.
fn frame_tensor(frames: &[RgbImage]) -> Result<Tensor> {
    let Some(first) = frames.first() else {
        bail!("a video needs at least one frame");
    };
    let (w, h) = (first.width() as i64, first.height() as i64);
    let mut raw = Vec::with_capacity(frames.len() * (w * h * 3) as usize);
    for f in frames {
        ensure!(
            f.width() as i64 == w && f.height() as i64 == h,
            "a video's frames must share one size"
        );
        raw.extend_from_slice(f.as_raw());
    }
    let n = frames.len() as i64;
    Ok(Tensor::from_slice(&raw).f_view([n, h, w, 3])?.f_permute([0, 3, 1, 2])?.f_contiguous()?)
}

/// torchvision's `resize` of uint8 frames to `plan.resized_size`: nothing at the same size,
/// else libtorch's uint8 antialiased bicubic kernel (`_do_native_uint8_resize_on_cpu`).
fn resize_uint8(video: &Tensor, plan: &VideoPlan, cfg: &ImageProcessorConfig) -> Result<Tensor> {
    let size = video.size();
    let (h, w) = (size[2], size[3]);
    let (rw, rh) = (plan.resized_size.0 as i64, plan.resized_size.1 as i64);
    Ok(if cfg.do_resize && (rh, rw) != (h, w) {
        video.f_internal_upsample_bicubic2d_aa([rh, rw], false, None, None)?
    } else {
        video.shallow_clone()
    })
}

/// A video's patches for the model.
#[derive(Debug)]
pub struct ProcessedVideo {
    /// `[t · h · w, 3 · temporal_patch_size · patch_size²]` f32 on the CPU, in transformers'
    /// order.
    pub pixel_values: Tensor,
    pub grid_thw: [i64; 3],
    /// `temporal_patch_size / fps`.
    pub second_per_grid_t: f64,
}

/// transformers' `Qwen2VLVideoProcessor._preprocess` of the frames of one video, resized to
/// `plan.resized_size`.
pub fn process_frames(
    frames: &[RgbImage],
    plan: &VideoPlan,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedVideo> {
    cfg.validate()?;
    let video = resize_uint8(&frame_tensor(frames)?, plan, cfg)?;
    process_tensor(video, plan, cfg)
}

/// The rest of `_preprocess` for resized uint8 frames `[n, 3, H, W]`: rescale and normalise,
/// pad to a multiple of `temporal_patch_size` with the last frame, and patchify.
fn process_tensor(
    video: Tensor,
    plan: &VideoPlan,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedVideo> {
    let size = video.size();
    let (n, rh, rw) = (size[0], size[2], size[3]);
    let (p, m, t) = (cfg.patch_size as i64, cfg.merge_size as i64, cfg.temporal_patch_size as i64);
    ensure!(
        rh % (p * m) == 0 && rw % (p * m) == 0,
        "the frames are {rw}x{rh} (width x height), not multiples of patch_size * merge_size = {}",
        p * m
    );
    let video = rescale_and_normalize(&video, cfg)?;
    // Pad to a multiple of temporal_patch_size by repeating the last frame.
    let pad = (t - n % t) % t;
    let video = if pad > 0 {
        let last = video.f_narrow(0, n - 1, 1)?.f_expand([pad, 3, rh, rw], false)?;
        Tensor::f_cat(&[&video, &last], 0)?
    } else {
        video
    };
    let (grid_t, grid_h, grid_w) = ((n + pad) / t, rh / p, rw / p);
    let pixel_values = video
        .f_view(&[grid_t, t, 3, grid_h / m, m, p, grid_w / m, m, p][..])?
        .f_permute(&[0, 3, 6, 4, 7, 2, 1, 5, 8][..])?
        .f_reshape([grid_t * grid_h * grid_w, 3 * t * p * p])?
        .f_contiguous()?;
    let grid_thw = [grid_t, grid_h, grid_w];
    ensure!(
        grid_thw == plan.grid_thw,
        "the video's grid is {grid_thw:?} but it was planned as {:?}",
        plan.grid_thw
    );
    Ok(ProcessedVideo {
        pixel_values,
        grid_thw,
        second_per_grid_t: plan.second_per_grid_t(cfg.temporal_patch_size),
    })
}

/// transformers' fused `rescale_and_normalize` of its torchvision backend: with both steps,
/// `(x - mean / r) / (std / r)` in float32 (mean and std as float32 tensors times `1 / r`);
/// otherwise the one asked for.
fn rescale_and_normalize(video: &Tensor, cfg: &ImageProcessorConfig) -> Result<Tensor> {
    let x = video.f_to_kind(Kind::Float)?;
    let per_channel = |v: [f32; 3]| Tensor::from_slice(&v).view([1, 3, 1, 1]);
    if cfg.do_normalize {
        let (mean, std) = if cfg.do_rescale {
            let inv = (1.0 / cfg.rescale_factor) as f32;
            (cfg.image_mean.map(|v| v * inv), cfg.image_std.map(|v| v * inv))
        } else {
            (cfg.image_mean, cfg.image_std)
        };
        Ok(x.f_sub(&per_channel(mean))?.f_div(&per_channel(std))?)
    } else if cfg.do_rescale {
        Ok(x.f_mul_scalar(cfg.rescale_factor)?)
    } else {
        Ok(x)
    }
}

/// A video file's stream facts.
struct FileInfo {
    frames: usize,
    fps: f64,
    width: u32,
    height: u32,
}

#[cfg(not(feature = "ffmpeg"))]
fn probe_file(path: &Path, _cap: u64) -> Result<FileInfo> {
    bail!(
        "video file {} cannot be decoded: this ferrotune was built without the `ffmpeg` feature \
         (install FFmpeg's development libraries, e.g. `apt-get install libavformat-dev \
         libavcodec-dev libavutil-dev libswscale-dev clang`, then `make build`, or `cargo build \
         --features ferrotune/ffmpeg`); a folder of frames works without it",
        path.display()
    )
}

#[cfg(not(feature = "ffmpeg"))]
fn decode_file_frames(
    path: &Path,
    _keep: &[usize],
    _cap: u64,
    _each: &mut dyn FnMut(usize, RgbImage) -> Result<()>,
) -> Result<()> {
    probe_file(path, 0).map(|_| ())
}

#[cfg(feature = "ffmpeg")]
fn probe_file(path: &Path, cap: u64) -> Result<FileInfo> {
    ffmpeg::probe(path, cap).with_context(|| format!("video file {}", path.display()))
}

#[cfg(feature = "ffmpeg")]
fn decode_file_frames(
    path: &Path,
    keep: &[usize],
    cap: u64,
    each: &mut dyn FnMut(usize, RgbImage) -> Result<()>,
) -> Result<()> {
    ffmpeg::decode(path, keep, cap, each).with_context(|| format!("video file {}", path.display()))
}

#[cfg(feature = "ffmpeg")]
mod ffmpeg {
    //! Video files through FFmpeg's libraries (`ffmpeg-next`).
    use std::path::Path;

    use anyhow::{bail, Context, Result};
    use ffmpeg_next as ff;
    use image::RgbImage;

    use super::{FileInfo, MAX_VIDEO_FRAMES};

    fn init() -> Result<()> {
        static INIT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        INIT.get_or_init(|| {
            ff::util::log::set_level(ff::util::log::Level::Fatal);
            ff::init().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot initialise FFmpeg: {e}"))
    }

    /// Decodes the best video stream of `path`, handing frame `k` to `each` (converted to
    /// RGB24 when `convert`), and returns the stream's facts.
    fn walk(
        path: &Path,
        cap: u64,
        convert: impl Fn(usize) -> bool,
        mut each: impl FnMut(usize, Option<RgbImage>) -> Result<()>,
    ) -> Result<FileInfo> {
        init()?;
        let mut input = ff::format::input(&path).context("cannot open it as a video")?;
        let stream =
            input.streams().best(ff::media::Type::Video).context("it has no video stream")?;
        let index = stream.index();
        let rate = [stream.avg_frame_rate(), stream.rate()]
            .into_iter()
            .map(f64::from)
            .find(|r| r.is_finite() && *r > 0.0)
            .context("its video stream has no frame rate")?;
        let header_frames = stream.frames();
        let ctx = ff::codec::context::Context::from_parameters(stream.parameters())
            .context("cannot read its codec parameters")?;
        let mut decoder = ctx.decoder().video().context("cannot open its video decoder")?;
        let (width, height) = (decoder.width(), decoder.height());
        if width == 0 || height == 0 {
            bail!("its video stream is {width}x{height} pixels");
        }
        if u64::from(width) * u64::from(height) > cap {
            bail!(
                "its frames are {width}x{height} pixels (width x height), above the limit of {cap} \
                 pixels a frame (data.video_max_pixels; shrink the video)"
            );
        }
        if header_frames > MAX_VIDEO_FRAMES as i64 {
            bail!("it has {header_frames} frames, above the limit of {MAX_VIDEO_FRAMES}");
        }
        let mut scaler = ff::software::scaling::Context::get(
            decoder.format(),
            width,
            height,
            ff::format::Pixel::RGB24,
            width,
            height,
            ff::software::scaling::Flags::BILINEAR,
        )
        .context("cannot set up the RGB conversion")?;
        let mut count = 0usize;
        let mut frame = ff::util::frame::Video::empty();
        let mut drain = |decoder: &mut ff::decoder::Video, count: &mut usize| -> Result<()> {
            while decoder.receive_frame(&mut frame).is_ok() {
                if *count >= MAX_VIDEO_FRAMES {
                    bail!("it has more than {MAX_VIDEO_FRAMES} frames");
                }
                let rgb = if convert(*count) {
                    if (frame.width(), frame.height()) != (width, height) {
                        bail!(
                            "frame {count} is {}x{}, the stream {width}x{height}: frames of changing \
                             size are not supported",
                            frame.width(),
                            frame.height()
                        );
                    }
                    let mut out = ff::util::frame::Video::empty();
                    scaler.run(&frame, &mut out).context("cannot convert a frame to RGB")?;
                    Some(packed_rgb(&out, width, height))
                } else {
                    None
                };
                each(*count, rgb)?;
                *count += 1;
            }
            Ok(())
        };
        for (s, packet) in input.packets() {
            if s.index() != index {
                continue;
            }
            decoder.send_packet(&packet).context("cannot decode a packet: the file is damaged")?;
            drain(&mut decoder, &mut count)?;
        }
        decoder.send_eof().context("cannot finish decoding")?;
        drain(&mut decoder, &mut count)?;
        if count == 0 {
            bail!("no frame could be decoded from it (a damaged or empty file)");
        }
        Ok(FileInfo { frames: count, fps: rate, width, height })
    }

    /// Rows of an RGB24 frame without FFmpeg's line padding.
    fn packed_rgb(frame: &ff::util::frame::Video, width: u32, height: u32) -> RgbImage {
        let (stride, data) = (frame.stride(0), frame.data(0));
        let row = width as usize * 3;
        let mut out = Vec::with_capacity(row * height as usize);
        for y in 0..height as usize {
            out.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        RgbImage::from_raw(width, height, out).expect("RGB24 rows are width * 3 bytes")
    }

    pub(super) fn probe(path: &Path, cap: u64) -> Result<FileInfo> {
        walk(path, cap, |_| false, |_, _| Ok(()))
    }

    /// Decodes `path`, handing kept frame `keep[k]` to `each(k, …)` in order (`keep` is
    /// increasing), and fails when the file has fewer frames than it names.
    pub(super) fn decode(
        path: &Path,
        keep: &[usize],
        cap: u64,
        each: &mut dyn FnMut(usize, RgbImage) -> Result<()>,
    ) -> Result<()> {
        let next = std::cell::Cell::new(0usize);
        walk(
            path,
            cap,
            |k| keep.get(next.get()) == Some(&k),
            |k, rgb| {
                if let Some(rgb) = rgb {
                    if keep.get(next.get()) == Some(&k) {
                        each(next.get(), rgb)?;
                        next.set(next.get() + 1);
                    }
                }
                Ok(())
            },
        )?;
        if let Some(k) = keep.get(next.get()) {
            bail!("frame {k} could not be decoded (the file has fewer frames than counted)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_nframes_follows_qwen_vl_utils() {
        let o = VideoOptions::default();
        // 25 frames at 10 fps, 2 fps -> 5 -> floor to 4.
        assert_eq!(o.smart_nframes(25, 10.0).unwrap(), 4);
        // Short clip: min_frames 4 wins, floor to total's even part.
        assert_eq!(o.smart_nframes(5, 30.0).unwrap(), 4);
        // 300 frames at 30 fps -> 20.
        assert_eq!(o.smart_nframes(300, 30.0).unwrap(), 20);
        let fixed = VideoOptions { nframes: Some(7), ..VideoOptions::default() };
        // Python's round(3.5) = 4 -> 8.
        assert_eq!(fixed.smart_nframes(100, 30.0).unwrap(), 8);
        assert!(o.smart_nframes(1, 30.0).unwrap_err().to_string().contains("at least 2"));
    }

    #[test]
    fn indices_are_linspace_rounded() {
        assert_eq!(sample_indices(25, 4).unwrap(), vec![0, 8, 16, 24]);
        assert_eq!(sample_indices(10, 4).unwrap(), vec![0, 3, 6, 9]);
        assert_eq!(sample_indices(6, 4).unwrap(), vec![0, 2, 3, 5]);
    }

    #[test]
    fn frame_budget_shares_total_pixels() {
        let o = VideoOptions { total_pixels: 100_000, ..VideoOptions::default() };
        // 100k / 8 * 2 = 25k, below min * 1.05 = 105369.6 -> the floor.
        assert_eq!(o.frame_max_pixels(8), (DEFAULT_VIDEO_MIN_PIXELS as f64 * 1.05) as u64);
        assert_eq!(VideoOptions::default().frame_max_pixels(4), DEFAULT_VIDEO_MAX_PIXELS);
    }

    #[test]
    fn options_read_a_video_processor_config() {
        let obj: Map<String, Json> = serde_json::from_str(
            r#"{"fps": 1.0, "min_frames": 2, "max_frames": 64, "size": {"shortest_edge": 3136, "longest_edge": 50176}}"#,
        )
        .unwrap();
        let o = VideoOptions::default().with_json(&obj).unwrap();
        assert_eq!(
            (o.fps, o.min_frames, o.max_frames, o.min_pixels, o.max_pixels),
            (1.0, 2, 64, 3136, 50176)
        );
        let bad: Map<String, Json> = serde_json::from_str(r#"{"fps": "fast"}"#).unwrap();
        assert!(VideoOptions::default().with_json(&bad).unwrap_err().to_string().contains("fps"));
    }
}
