//! Qwen2-VL image preprocessing, equal to transformers 5.24's `Qwen2VLImageProcessor`, and
//! video preprocessing ([`plan_video`] + [`read_and_process`]: qwen-vl-utils' frame sampling, transformers'
//! `Qwen2VLVideoProcessor`).
//!
//! Without torchvision (the reference stack has none), transformers' `AutoImageProcessor`
//! gives the Pillow-backed `Qwen2VLImageProcessorPil` (`image_processing_pil_qwen2_vl.py`), and
//! this module reproduces that one: transformers' `convert_to_rgb` (alpha composited onto
//! white), `smart_resize` to multiples of `patch_size * merge_size`, Pillow's bicubic
//! `Image.resize` re-implemented with Pillow's own fixed-point arithmetic (so the resized bytes
//! are Pillow's), rescale and normalise with numpy's float64/float32 steps, and the patch
//! layout of its `patchify`. Reference:
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py>.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use ferrotune::vision::{
//!     load_image, process_image, stack_images, ImageProcessorConfig, DEFAULT_MAX_IMAGE_PIXELS,
//! };
//! let cfg = ImageProcessorConfig::from_dir(std::path::Path::new("models/qwen2-vl"))?;
//! let a = process_image(&load_image("cat.jpg".as_ref(), DEFAULT_MAX_IMAGE_PIXELS)?, &cfg)?;
//! let tokens = a.num_image_tokens(cfg.merge_size); // <|image_pad|> tokens in the prompt
//! let (pixel_values, image_grid_thw) = stack_images(&[a])?;
//! # let _ = (tokens, pixel_values, image_grid_thw); Ok(()) }
//! ```
mod config;
mod decode;
mod processor;
mod resize;
pub mod video;

pub use config::{
    ImageProcessorConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PREPROCESSOR_CONFIG_FILE,
};
pub use decode::{
    decode_image, image_dimensions, load_image, pixel_cap_for, to_rgb8, ImageTooLarge,
    DEFAULT_MAX_IMAGE_PIXELS,
};
pub use processor::{process_image, stack_images, ProcessedImage};
pub use resize::{resize_bicubic, smart_resize, MAX_ASPECT_RATIO};
pub use video::{
    frame_files, plan_video, process_frames, read_and_process, read_frames, sample_indices,
    ProcessedVideo, VideoKind, VideoOptions, VideoPlan, DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES,
    DEFAULT_VIDEO_FPS, DEFAULT_VIDEO_MAX_PIXELS, DEFAULT_VIDEO_MIN_PIXELS,
    DEFAULT_VIDEO_TOTAL_PIXELS, FRAME_EXTENSIONS, FRAME_FACTOR, MAX_VIDEO_FRAMES,
    VIDEO_FILE_DECODING, VIDEO_FILE_EXTENSIONS, VIDEO_PREPROCESSOR_CONFIG_FILE,
};
