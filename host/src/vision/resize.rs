//! Target size and resampling of the Qwen2-VL image processor.
//!
//! [`smart_resize`] is transformers' `smart_resize` (Python's round-half-to-even included);
//! [`resize_bicubic`] is Pillow's `Image.resize(..., BICUBIC)` on an 8-bit RGB image
//! (`src/libImaging/Resample.c`): a separable two-pass convolution through an 8-bit
//! intermediate image (horizontal pass first unless the height shrinks much more than the
//! width, see [`resize_bicubic`]), with Keys' cubic (a = -0.5) widened by the
//! downscale factor, coefficients normalised to sum 1 and turned into 22-bit fixed point, and
//! every output rounded and clipped to 0..=255. Being the same arithmetic, it gives the same
//! bytes as Pillow.
use anyhow::{bail, Result};
use image::RgbImage;

/// Largest `max(h, w) / min(h, w)` transformers accepts.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// The `(height, width)` transformers resizes a `height` x `width` image to: both multiples of
/// `factor` (patch size x merge size, 28 for Qwen2-VL), the area within
/// `[min_pixels, max_pixels]` where possible, the aspect ratio kept as closely as possible.
///
/// Same steps and float arithmetic as transformers' `smart_resize` (5.24): round each side to
/// the nearest multiple of `factor` (ties to even, as Python's `round`); when that area is above
/// `max_pixels`, scale both sides down by `sqrt(h * w / max_pixels)` and floor to multiples
/// (never below `factor`); when below `min_pixels`, scale up by `sqrt(min_pixels / (h * w))`
/// and ceil. Errors: a zero side or factor, an aspect ratio above 200 (transformers raises the
/// same), and a result with a zero side (possible only with `min_pixels` 0, where transformers
/// would fail later).
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32)> {
    if height == 0 || width == 0 {
        bail!("image has a zero side ({height}x{width} pixels, height x width): nothing to resize");
    }
    if factor == 0 {
        bail!("resize factor (patch_size * merge_size) is 0");
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        bail!(
            "absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} \
             ({height}x{width} pixels, height x width); crop or pad the image"
        );
    }
    let f64_to_side = |v: f64| -> u64 { v as u64 };
    let mut h_bar = f64_to_side((h / f).round_ties_even()) * factor as u64;
    let mut w_bar = f64_to_side((w / f).round_ties_even()) * factor as u64;
    if h_bar * w_bar > max_pixels {
        let beta = ((height as u64 * width as u64) as f64 / max_pixels as f64).sqrt();
        h_bar = (factor as u64).max(f64_to_side((h / beta / f).floor()) * factor as u64);
        w_bar = (factor as u64).max(f64_to_side((w / beta / f).floor()) * factor as u64);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (height as u64 * width as u64) as f64).sqrt();
        h_bar = f64_to_side((h * beta / f).ceil()) * factor as u64;
        w_bar = f64_to_side((w * beta / f).ceil()) * factor as u64;
    }
    if h_bar == 0 || w_bar == 0 {
        bail!(
            "a {height}x{width} image (height x width) resizes to {h_bar}x{w_bar} with factor {factor}, \
             min_pixels {min_pixels}, max_pixels {max_pixels}: raise min_pixels"
        );
    }
    let side = |v: u64| -> Result<u32> {
        u32::try_from(v).map_err(|_| {
            anyhow::anyhow!("resized side {v} does not fit in 32 bits: lower min_pixels")
        })
    };
    Ok((side(h_bar)?, side(w_bar)?))
}

/// Pillow's fixed-point precision for 8-bit resampling: `32 - 8 - 2` bits.
const PRECISION_BITS: u32 = 22;

/// Keys' cubic convolution kernel with a = -0.5 (Pillow's `bicubic_filter`).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Support of the bicubic filter at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// One output line's taps: first input index and fixed-point weights.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `in_size` samples
/// (the box `0..in_size`) to `out_size`.
fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero; `as i64` does too.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> =
            (0..n).map(|x| bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        let fixed = k
            .iter()
            .map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    Taps { start, weights }
}

/// Pillow's `clip8`: the fixed-point sum back to a byte, clamped to 0..=255.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over packed RGB rows: `out[.., i, ..] = clip8(sum_k w_k * in[.., start_i + k, ..])`
/// along one axis. `lines` lines of `len_in` pixels each, `line_stride` / `pixel_stride` in bytes.
struct Pass {
    lines: usize,
    len_in: usize,
    len_out: usize,
    /// Input and output byte offsets between consecutive lines.
    line_stride: (usize, usize),
    /// Input and output byte offsets between consecutive pixels along the line.
    pixel_stride: (usize, usize),
}

impl Pass {
    fn run(&self, src: &[u8], dst: &mut [u8]) {
        let taps = taps(self.len_in, self.len_out);
        let half = 1i64 << (PRECISION_BITS - 1);
        for line in 0..self.lines {
            let (src_line, dst_line) = (line * self.line_stride.0, line * self.line_stride.1);
            for (i, (&x0, k)) in taps.start.iter().zip(&taps.weights).enumerate() {
                let mut acc = [half; 3];
                for (j, &w) in k.iter().enumerate() {
                    let p = src_line + (x0 + j) * self.pixel_stride.0;
                    for c in 0..3 {
                        acc[c] += src[p + c] as i64 * w as i64;
                    }
                }
                let o = dst_line + i * self.pixel_stride.1;
                for c in 0..3 {
                    dst[o + c] = clip8(acc[c]);
                }
            }
        }
    }
}

/// Horizontal pass: `w` x `h` -> `out_w` x `h`.
fn horizontal(src: &[u8], w: usize, h: usize, out_w: usize) -> Vec<u8> {
    let mut dst = vec![0u8; out_w * h * 3];
    Pass {
        lines: h,
        len_in: w,
        len_out: out_w,
        line_stride: (w * 3, out_w * 3),
        pixel_stride: (3, 3),
    }
    .run(src, &mut dst);
    dst
}

/// Vertical pass: `w` x `h` -> `w` x `out_h`.
fn vertical(src: &[u8], w: usize, h: usize, out_h: usize) -> Vec<u8> {
    let mut dst = vec![0u8; w * out_h * 3];
    Pass { lines: w, len_in: h, len_out: out_h, line_stride: (3, 3), pixel_stride: (w * 3, w * 3) }
        .run(src, &mut dst);
    dst
}

/// Whether Pillow runs the vertical pass first: when the height shrinks by more than twice
/// as many pixels as the width does (Pillow 13, python-pillow/Pillow#9549; before that it was
/// always horizontal first). The order matters because the intermediate image is rounded to
/// 8 bits. Measured against the installed Pillow over ~400 random size pairs plus the
/// boundary `dh == 2 * dw` (horizontal first) and `dh == 2 * dw + 1` (vertical first).
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let (dh, dw) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    out_h < in_h && dh > 2 * dw
}

/// Resizes an 8-bit RGB image to `width` x `height` exactly as Pillow 13's
/// `Image.resize((width, height), Image.BICUBIC)` does (no `box`, no `reducing_gap`): each
/// pass runs only when its side changes, in Pillow's order (see [`vertical_first`]), with
/// the intermediate image rounded and clipped to 8 bits.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        bail!(
            "cannot resize a {in_w}x{in_h} image to {out_w}x{out_h} (width x height): a side is 0"
        );
    }
    let src = img.as_raw();
    let data = match (out_w != in_w, out_h != in_h) {
        (false, false) => src.clone(),
        (true, false) => horizontal(src, in_w, in_h, out_w),
        (false, true) => vertical(src, in_w, in_h, out_h),
        (true, true) if vertical_first(in_w, in_h, out_w, out_h) => {
            horizontal(&vertical(src, in_w, in_h, out_h), in_w, out_h, out_w)
        }
        (true, true) => vertical(&horizontal(src, in_w, in_h, out_w), out_w, in_h, out_h),
    };
    RgbImage::from_raw(width, height, data)
        .ok_or_else(|| anyhow::anyhow!("internal error: resized buffer has the wrong length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 56 * 56;
    const MAX: u64 = 28 * 28 * 1280;

    #[test]
    fn smart_resize_rounds_to_multiples_of_the_factor() {
        // 333 / 28 = 11.89 -> 12 * 28 = 336; 517 / 28 = 18.46 -> 18 * 28 = 504.
        assert_eq!(smart_resize(333, 517, 28, MIN, MAX).unwrap(), (336, 504));
        // Already multiples: unchanged.
        assert_eq!(smart_resize(224, 448, 28, MIN, MAX).unwrap(), (224, 448));
    }

    #[test]
    fn smart_resize_rounds_ties_to_even() {
        // 70 / 28 = 2.5 -> 2 (Python's round; half-up would give 3 -> 84).
        // 42 / 28 = 1.5 -> 2.   126 / 28 = 4.5 -> 4.   98 / 28 = 3.5 -> 4.
        assert_eq!(smart_resize(70, 126, 28, MIN, MAX).unwrap(), (56, 112));
        assert_eq!(smart_resize(98, 126, 28, MIN, MAX).unwrap(), (112, 112));
        // 210 / 28 = 7.5 -> 8; 42 / 28 = 1.5 -> 2 (56 * 224 >= MIN).
        assert_eq!(smart_resize(210, 42, 28, 0, MAX).unwrap(), (224, 56));
    }

    #[test]
    fn smart_resize_scales_up_to_min_pixels() {
        // 29x41: rounds to 28x28 = 784 < 3136; beta = sqrt(3136 / 1189) = 1.6241;
        // ceil(29 * 1.6241 / 28) = ceil(1.682) = 2 -> 56; ceil(41 * 1.6241 / 28) = ceil(2.378) = 3 -> 84.
        assert_eq!(smart_resize(29, 41, 28, MIN, MAX).unwrap(), (56, 84));
        // A side that rounds to 0 still ends up positive: 10x1000 -> beta path.
        let (h, w) = smart_resize(10, 1000, 28, MIN, MAX).unwrap();
        assert!(h >= 28 && h % 28 == 0 && w % 28 == 0 && (h as u64 * w as u64) >= MIN, "{h}x{w}");
    }

    #[test]
    fn smart_resize_scales_down_to_max_pixels() {
        // 2000x3000 -> rounded 2016x3024 > MAX; beta = sqrt(6e6 / 1003520) = 2.44515;
        // floor(2000 / 2.44515 / 28) = floor(29.21) = 29 -> 812; floor(3000 / 2.44515 / 28) = floor(43.82) = 43 -> 1204.
        assert_eq!(smart_resize(2000, 3000, 28, MIN, MAX).unwrap(), (812, 1204));
        let (h, w) = smart_resize(2000, 3000, 28, MIN, MAX).unwrap();
        assert!(h as u64 * w as u64 <= MAX);
        // A small max_pixels: 640x480 with max 200_000 -> beta = sqrt(307200 / 200000) = 1.23935;
        // floor(640 / 1.23935 / 28) = 18 -> 504; floor(480 / 1.23935 / 28) = 13 -> 364.
        assert_eq!(smart_resize(640, 480, 28, MIN, 200_000).unwrap(), (504, 364));
        // Never below one factor per side.
        assert_eq!(smart_resize(28, 5000, 28, MIN, 28 * 28 * 4).unwrap().0, 28);
    }

    #[test]
    fn smart_resize_rejects_extreme_aspect_ratios_and_zero_sides() {
        let err = smart_resize(10, 2001, 28, MIN, MAX).unwrap_err().to_string();
        assert!(err.contains("aspect ratio"), "{err}");
        // Exactly 200 is allowed.
        assert!(smart_resize(10, 2000, 28, MIN, MAX).is_ok());
        assert!(smart_resize(0, 10, 28, MIN, MAX).unwrap_err().to_string().contains("zero side"));
        assert!(smart_resize(10, 10, 0, MIN, MAX).is_err());
        // min_pixels 0 lets a side round to 0: an error, not a 0-sized image.
        assert!(smart_resize(13, 56, 28, 0, MAX).is_err());
    }

    #[test]
    fn bicubic_filter_is_keys_cubic() {
        assert_eq!(bicubic_filter(0.0), 1.0);
        assert_eq!(bicubic_filter(1.0), 0.0);
        assert_eq!(bicubic_filter(2.0), 0.0);
        // a = -0.5 at x = 0.5: (1.5 * 0.5 - 2.5) * 0.25 + 1 = 0.5625; at 1.5: -0.0625.
        assert!((bicubic_filter(0.5) - 0.5625).abs() < 1e-15);
        assert!((bicubic_filter(-1.5) + 0.0625).abs() < 1e-15);
    }

    #[test]
    fn resize_keeps_constant_images_and_identity() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 255]));
        for (w, h) in [(56, 28), (14, 9), (37, 50), (80, 23)] {
            let out = resize_bicubic(&img, w, h).unwrap();
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [12, 200, 255]), "{w}x{h}");
        }
        let noisy = RgbImage::from_fn(9, 7, |x, y| {
            image::Rgb([(x * 29 + y * 7) as u8, (x * y) as u8, 255 - x as u8])
        });
        assert_eq!(resize_bicubic(&noisy, 9, 7).unwrap(), noisy);
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        // (in_w, in_h, out_w, out_h) and the order Pillow 13 was seen to use.
        assert!(!vertical_first(100, 100, 80, 60)); // dh 40 == 2 * dw 20: horizontal first
        assert!(vertical_first(100, 100, 80, 59)); // dh 41 > 40
        assert!(vertical_first(333, 517, 336, 504)); // height shrinks, width grows
        assert!(!vertical_first(75, 1000, 84, 1008)); // both grow
        assert!(!vertical_first(517, 333, 504, 336)); // height grows
        assert!(vertical_first(50, 5000, 40, 1000));
    }

    #[test]
    fn resize_matches_pillow_on_one_row() {
        // Reference bytes from Pillow 13: `Image.fromarray(a).resize((w, 1), Image.BICUBIC)`.
        let row = |vals: &[u8]| {
            RgbImage::from_fn(vals.len() as u32, 1, |x, _| image::Rgb([vals[x as usize]; 3]))
        };
        let first = |img: &RgbImage| img.pixels().map(|p| p.0[0]).collect::<Vec<u8>>();
        // Downscale by 2 of a step edge (support widened to 4, negative lobes clipped).
        let out = resize_bicubic(&row(&[0, 0, 0, 0, 255, 255, 255, 255]), 4, 1).unwrap();
        assert_eq!(first(&out), [0, 17, 238, 255]);
        // Upscale 5 -> 12 of a spike (overshoot below 0 clipped, rounding of the 22-bit sums).
        let out = resize_bicubic(&row(&[0, 0, 200, 50, 0]), 12, 1).unwrap();
        assert_eq!(first(&out), [0, 0, 0, 0, 76, 178, 190, 114, 46, 17, 3, 0]);
    }
}
