//! One image to Qwen2-VL pixel patches, as transformers' `Qwen2VLImageProcessor._preprocess`.
use anyhow::{bail, Context, Result};
use image::{DynamicImage, RgbImage};
use tch::{Kind, Tensor};

use super::config::ImageProcessorConfig;
use super::decode::to_rgb8;
use super::resize::{resize_bicubic, smart_resize};

/// The patches of one image and what the language side needs to place them.
#[derive(Debug)]
pub struct ProcessedImage {
    /// `[grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size]` f32 on
    /// the CPU: one row per patch, in transformers' order (merge windows row-major, the
    /// `merge_size` x `merge_size` patches of a window row-major, then per patch channel, frame,
    /// row, column).
    pub pixel_values: Tensor,
    /// `[grid_t, grid_h, grid_w]`: frames (1 for an image) and patches per column and row.
    pub grid_thw: [i64; 3],
    /// `(height, width)` of the decoded image.
    pub original_size: (u32, u32),
    /// `(height, width)` after resizing (both multiples of `patch_size * merge_size`).
    pub resized_size: (u32, u32),
}

impl ProcessedImage {
    /// Image placeholder tokens in the prompt: `t * h * w / merge_size²` (the vision merger
    /// turns each `merge_size` x `merge_size` block of patches into one token).
    pub fn num_image_tokens(&self, merge_size: u32) -> usize {
        let [t, h, w] = self.grid_thw;
        (t * h * w) as usize / (merge_size as usize * merge_size as usize).max(1)
    }
}

/// Turns one image into patches: RGB conversion, [`smart_resize`] to multiples of
/// `patch_size * merge_size`, Pillow-exact bicubic resize, rescale (float64, then float32),
/// normalisation (float32), and transformers' patch layout with the single frame repeated to
/// `temporal_patch_size`.
pub fn process_image(img: &DynamicImage, cfg: &ImageProcessorConfig) -> Result<ProcessedImage> {
    cfg.validate()?;
    let rgb = rgb_input(img, cfg)?;
    let (height, width) = (rgb.height(), rgb.width());
    let factor = cfg.factor();
    let rgb = if cfg.do_resize {
        let (h, w) = smart_resize(height, width, factor, cfg.min_pixels, cfg.max_pixels)?;
        resize_bicubic(&rgb, w, h)?
    } else {
        if height % factor != 0 || width % factor != 0 {
            bail!(
                "do_resize is false but the image is {height}x{width} (height x width), not a multiple of \
                 patch_size * merge_size = {factor} on both sides"
            );
        }
        rgb
    };
    let (rh, rw) = (rgb.height(), rgb.width());
    let (p, m, t) = (cfg.patch_size as i64, cfg.merge_size as i64, cfg.temporal_patch_size as i64);
    let (grid_h, grid_w) = (rh as i64 / p, rw as i64 / p);
    let chw = Tensor::from_slice(&normalized_chw(&rgb, cfg));
    let pixel_values =
        patchify(&chw, 3, grid_h, grid_w, p, m, t).context("cannot lay out the image patches")?;
    Ok(ProcessedImage {
        pixel_values,
        grid_thw: [1, grid_h, grid_w],
        original_size: (height, width),
        resized_size: (rh, rw),
    })
}

/// The 8-bit RGB image transformers would resize.
fn rgb_input(img: &DynamicImage, cfg: &ImageProcessorConfig) -> Result<RgbImage> {
    if !cfg.do_convert_rgb {
        let colour = img.color();
        if colour.channel_count() != 3 || colour.has_alpha() {
            bail!(
                "the image is {colour:?} ({} channels) and do_convert_rgb is false: only RGB images can be \
                 processed without conversion",
                colour.channel_count()
            );
        }
    }
    to_rgb8(img)
}

/// Channel-first float32 values: `v * rescale_factor` computed in float64 and cast to float32
/// (transformers' `rescale`), then `(x - mean) / std` in float32 (its `normalize`).
fn normalized_chw(rgb: &RgbImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    // Every channel maps 256 byte values: a lookup table per channel.
    let table: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            std::array::from_fn(|v| {
                let mut x =
                    if cfg.do_rescale { (v as f64 * cfg.rescale_factor) as f32 } else { v as f32 };
                if cfg.do_normalize {
                    x = (x - cfg.image_mean[c]) / cfg.image_std[c];
                }
                x
            })
        })
        .collect();
    let hw = rgb.width() as usize * rgb.height() as usize;
    let mut out = vec![0f32; 3 * hw];
    for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * hw + i] = table[c][px[c] as usize];
        }
    }
    out
}

/// transformers' `patchify`: `[C, H, W]` -> `[C, gh/m, m, p, gw/m, m, p]` -> permute to
/// `[gh/m, gw/m, m, m, C, p, p]` -> repeat a frame axis after C to `t` ->
/// `[gh * gw, C * t * p * p]`.
fn patchify(
    chw: &Tensor,
    c: i64,
    grid_h: i64,
    grid_w: i64,
    p: i64,
    m: i64,
    t: i64,
) -> Result<Tensor> {
    let patches = chw
        .f_view(&[c, grid_h / m, m, p, grid_w / m, m, p][..])?
        .f_permute(&[1, 4, 2, 5, 0, 3, 6][..])?
        .f_unsqueeze(5)?
        .f_expand(&[grid_h / m, grid_w / m, m, m, c, t, p, p][..], false)?
        .f_reshape([grid_h * grid_w, c * t * p * p])?
        .f_contiguous()?;
    Ok(patches)
}

/// The patches of several images in order, concatenated as transformers batches them, and
/// their grids.
pub fn stack_images(images: &[ProcessedImage]) -> Result<(Tensor, Vec<[i64; 3]>)> {
    let Some(first) = images.first() else {
        bail!("no images to stack");
    };
    let width = first.pixel_values.size().get(1).copied();
    for (i, img) in images.iter().enumerate() {
        let size = img.pixel_values.size();
        if size.len() != 2 || Some(size[1]) != width || img.pixel_values.kind() != Kind::Float {
            bail!(
                "image {i} has pixel_values of shape {size:?} ({:?}), image 0 {:?}: images processed with \
                 different patch settings cannot be stacked",
                img.pixel_values.kind(),
                first.pixel_values.size()
            );
        }
    }
    let tensors: Vec<&Tensor> = images.iter().map(|i| &i.pixel_values).collect();
    let pixel_values = Tensor::f_cat(&tensors, 0)?;
    Ok((pixel_values, images.iter().map(|i| i.grid_thw).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config without resize or normalisation, so that pixel values are the bytes.
    fn raw_cfg(p: u32, m: u32, t: u32) -> ImageProcessorConfig {
        ImageProcessorConfig {
            patch_size: p,
            merge_size: m,
            temporal_patch_size: t,
            do_resize: false,
            do_rescale: false,
            do_normalize: false,
            ..Default::default()
        }
    }

    #[test]
    fn patch_layout_follows_transformers() {
        // 4x8 image, patch 2, merge 2, 2 frames: grid 2x4, windows of 2x2 patches.
        // Channel c of pixel (y, x) holds 100 * c + 10 * y + x (distinct, exact in f32).
        let (h, w) = (4u32, 8u32);
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb(std::array::from_fn(|c| (100 * c as u32 + 10 * y + x) as u8))
        });
        let out = process_image(&DynamicImage::ImageRgb8(img), &raw_cfg(2, 2, 2)).unwrap();
        assert_eq!(out.grid_thw, [1, 2, 4]);
        assert_eq!(out.pixel_values.size(), vec![8, 3 * 2 * 2 * 2]);
        assert_eq!(out.num_image_tokens(2), 2);
        let values: Vec<f32> = Vec::try_from(out.pixel_values.flatten(0, -1)).unwrap();
        // Independent index arithmetic: row r = window (wy, wx) row-major over a 1x2 window
        // grid, then (my, mx) inside it; column = ((c * T + f) * p + py) * p + px.
        for wy in 0..1 {
            for wx in 0..2 {
                for my in 0..2 {
                    for mx in 0..2 {
                        let row = ((wy * 2 + wx) * 2 + my) * 2 + mx;
                        for c in 0..3 {
                            for f in 0..2 {
                                for py in 0..2 {
                                    for px in 0..2 {
                                        let col = ((c * 2 + f) * 2 + py) * 2 + px;
                                        let y = (wy * 2 + my) * 2 + py;
                                        let x = (wx * 2 + mx) * 2 + px;
                                        let want = (100 * c + 10 * y + x) as f32;
                                        assert_eq!(
                                            values[row * 24 + col],
                                            want,
                                            "row {row} col {col}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rescale_and_normalize_follow_numpy_precision() {
        let cfg = ImageProcessorConfig {
            do_resize: false,
            patch_size: 1,
            merge_size: 1,
            temporal_patch_size: 1,
            ..Default::default()
        };
        let img = RgbImage::from_pixel(1, 1, image::Rgb([0, 128, 255]));
        let out = process_image(&DynamicImage::ImageRgb8(img), &cfg).unwrap();
        let v: Vec<f32> = Vec::try_from(out.pixel_values.flatten(0, -1)).unwrap();
        for (c, byte) in [0u8, 128, 255].into_iter().enumerate() {
            let want = ((byte as f64 / 255.0) as f32 - OPENAI[c]) / STD[c];
            assert_eq!(v[c], want);
        }
        // Closed form: 0 -> -0.48145466 / 0.26862954 = -1.79226; 255 -> (1 - 0.40821073) / 0.27577711 = 2.14589.
        assert!((v[0] + 1.792_261).abs() < 1e-5, "{}", v[0]);
        assert!((v[2] - 2.145_897).abs() < 1e-5, "{}", v[2]);
    }
    use super::super::config::{OPENAI_CLIP_MEAN as OPENAI, OPENAI_CLIP_STD as STD};

    #[test]
    fn resize_and_token_count() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(41, 29, image::Rgb([9, 9, 9])));
        let out = process_image(&img, &ImageProcessorConfig::default()).unwrap();
        assert_eq!((out.original_size, out.resized_size), ((29, 41), (56, 84)));
        assert_eq!(out.grid_thw, [1, 4, 6]);
        assert_eq!(out.pixel_values.size(), vec![24, 1176]);
        assert_eq!(out.num_image_tokens(2), 6);
    }

    #[test]
    fn stacking_keeps_order_and_rejects_mismatches() {
        let cfg = raw_cfg(2, 2, 2);
        let a = process_image(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 4, image::Rgb([1, 1, 1]))),
            &cfg,
        )
        .unwrap();
        let b = process_image(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 4, image::Rgb([2, 2, 2]))),
            &cfg,
        )
        .unwrap();
        let (pv, grids) = stack_images(&[a, b]).unwrap();
        assert_eq!(pv.size(), vec![12, 24]);
        assert_eq!(grids, vec![[1, 2, 2], [1, 2, 4]]);
        assert_eq!(pv.double_value(&[3, 0]), 1.0);
        assert_eq!(pv.double_value(&[4, 0]), 2.0);
        assert!(stack_images(&[]).is_err());
        let c = process_image(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 4, image::Rgb([1, 1, 1]))),
            &cfg,
        )
        .unwrap();
        let d = process_image(
            &DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 4, image::Rgb([1, 1, 1]))),
            &raw_cfg(2, 2, 1),
        )
        .unwrap();
        assert!(stack_images(&[c, d]).unwrap_err().to_string().contains("cannot be stacked"));
    }

    #[test]
    fn unresized_sizes_must_fit_the_grid_and_rgb_is_required_without_conversion() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(6, 4, image::Rgb([0, 0, 0])));
        assert!(process_image(&img, &raw_cfg(2, 2, 2))
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 4, image::Luma([3])));
        let cfg = ImageProcessorConfig { do_convert_rgb: false, ..raw_cfg(2, 2, 2) };
        assert!(process_image(&grey, &cfg).unwrap_err().to_string().contains("do_convert_rgb"));
        let empty = DynamicImage::ImageRgb8(RgbImage::new(0, 0));
        assert!(process_image(&empty, &ImageProcessorConfig::default()).is_err());
    }
}
