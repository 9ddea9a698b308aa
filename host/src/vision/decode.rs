//! Reading image files and turning them into 8-bit RGB the way transformers does with Pillow.
//!
//! Decoding applies the EXIF orientation, as `transformers.image_utils.load_image` does
//! (`ImageOps.exif_transpose`). [`to_rgb8`] is transformers' `convert_to_rgb` on a Pillow image:
//! images with alpha are composited onto opaque white with Pillow's `alpha_composite`
//! arithmetic, grey is replicated to three channels, and 16-bit data is reduced to 8 bits as
//! Pillow reads it (the high byte for RGB(A) and grey+alpha PNGs; plain 16-bit grey, Pillow's
//! mode `I;16`, is clipped at 255 as Pillow's `convert("RGB")` does).
use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// The pixel cap (width × height) of an image when no model bound is known: 64 MP.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 64_000_000;

/// The pixel cap for a model whose processor resizes images to at most `max_pixels`: 4 × that
/// (anything larger is shrunk by more than 2× per side anyway), never below 1 MP.
pub fn pixel_cap_for(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(4).max(1 << 20)
}

/// An image whose header announces more pixels than the cap: refused before decoding.
#[derive(Debug, thiserror::Error)]
#[error("the image is {width}x{height} pixels (width x height), {pixels} in all, above the limit of {limit} pixels; shrink it, or raise the limit (data.max_image_pixels / --max-image-pixels)", pixels = u64::from(*.width) * u64::from(*.height))]
pub struct ImageTooLarge {
    pub width: u32,
    pub height: u32,
    pub limit: u64,
}

/// Opens the decoder of an image held in memory: the format guessed from the bytes, the
/// decoder's allocations bounded by what `max_pixels` pixels of 16-bit RGBA need.
fn open_decoder(
    bytes: &[u8],
    max_pixels: u64,
) -> Result<(image::ImageFormat, impl ImageDecoder + '_)> {
    if bytes.is_empty() {
        bail!("cannot decode an image from 0 bytes");
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot read the image header")?;
    let Some(format) = reader.format() else {
        bail!(
            "unrecognised image format (first bytes {:02x?}); supported: PNG, JPEG, WebP, GIF",
            &bytes[..bytes.len().min(8)]
        );
    };
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let decoder =
        reader.into_decoder().with_context(|| format!("cannot decode the {format:?} image"))?;
    Ok((format, decoder))
}

/// Width and height of an image held in memory, read from its header alone (nothing decoded).
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32)> {
    let (_, decoder) = open_decoder(bytes, DEFAULT_MAX_IMAGE_PIXELS)?;
    Ok(decoder.dimensions())
}

/// Decodes an image file held in memory (PNG, JPEG, WebP or GIF; the format is guessed from
/// the bytes) and applies its EXIF orientation. An image whose header announces more than
/// `max_pixels` pixels is refused with [`ImageTooLarge`] before anything is decoded, and the
/// decoder's allocations are bounded by that cap.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage> {
    let (format, mut decoder) = open_decoder(bytes, max_pixels)?;
    let orientation = decoder.orientation().ok();
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        bail!("the {format:?} image is {w}x{h} pixels (width x height): it has no pixels");
    }
    if u64::from(w) * u64::from(h) > max_pixels {
        bail!(ImageTooLarge { width: w, height: h, limit: max_pixels });
    }
    let mut img = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("corrupt or truncated {format:?} image data"))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img)
}

/// Reads and decodes the image file at `path` (see [`decode_image`]).
pub fn load_image(path: &Path, max_pixels: u64) -> Result<DynamicImage> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read image file {}", path.display()))?;
    decode_image(&bytes, max_pixels)
        .with_context(|| format!("cannot decode image file {}", path.display()))
}

/// Converts to 8-bit RGB as transformers' `convert_to_rgb` does on the Pillow image of the same
/// file: alpha composited onto white, grey replicated (see the module docs for 16-bit data).
pub fn to_rgb8(img: &DynamicImage) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        bail!("the image is {w}x{h} pixels (width x height): it has no pixels");
    }
    let pixels = (w as usize) * (h as usize);
    let mut out = Vec::with_capacity(pixels * 3);
    match img {
        DynamicImage::ImageRgb8(i) => return Ok(i.clone()),
        DynamicImage::ImageLuma8(i) => {
            i.as_raw().iter().for_each(|&v| out.extend_from_slice(&[v, v, v]))
        }
        DynamicImage::ImageLumaA8(i) => i
            .as_raw()
            .chunks_exact(2)
            .for_each(|p| out.extend_from_slice(&over_white([p[0], p[0], p[0]], p[1]))),
        DynamicImage::ImageRgba8(i) => i
            .as_raw()
            .chunks_exact(4)
            .for_each(|p| out.extend_from_slice(&over_white([p[0], p[1], p[2]], p[3]))),
        // Pillow opens 16-bit PNGs of these kinds with the `;16B` raw modes: the high byte.
        DynamicImage::ImageRgb16(i) => i.as_raw().iter().for_each(|&v| out.push((v >> 8) as u8)),
        DynamicImage::ImageRgba16(i) => i.as_raw().chunks_exact(4).for_each(|p| {
            let hi = |v: u16| (v >> 8) as u8;
            out.extend_from_slice(&over_white([hi(p[0]), hi(p[1]), hi(p[2])], hi(p[3])))
        }),
        DynamicImage::ImageLumaA16(i) => i.as_raw().chunks_exact(2).for_each(|p| {
            let v = (p[0] >> 8) as u8;
            out.extend_from_slice(&over_white([v, v, v], (p[1] >> 8) as u8))
        }),
        // Pillow's mode `I;16`: `convert("RGB")` clips each value at 255 (it does not scale).
        DynamicImage::ImageLuma16(i) => {
            tracing::warn!(
                "16-bit greyscale image: clipped at 255 as Pillow does (most of it turns white)"
            );
            i.as_raw().iter().for_each(|&v| {
                let v = v.min(255) as u8;
                out.extend_from_slice(&[v, v, v])
            })
        }
        other => {
            // Float images (not produced by the enabled decoders): plain conversion.
            let rgba = other.to_rgba8();
            rgba.as_raw()
                .chunks_exact(4)
                .for_each(|p| out.extend_from_slice(&over_white([p[0], p[1], p[2]], p[3])))
        }
    }
    RgbImage::from_raw(w, h, out)
        .ok_or_else(|| anyhow!("internal error: RGB buffer has the wrong length"))
}

/// One pixel with straight alpha `a` over opaque white: Pillow's `alpha_composite` with an
/// opaque destination (`src->a * 255 * 255 << 7 / outa255` coefficients, rounded
/// divisions by 255), then the alpha dropped.
fn over_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    if a == 255 {
        return rgb;
    }
    if a == 0 {
        return [255; 3];
    }
    const PRECISION_BITS: u32 = 7;
    let a = a as u32;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let shift_div_255 = |v: u32| ((v >> 8) + v) >> 8;
    rgb.map(|c| {
        let t = c as u32 * coef1 + 255 * coef2;
        (shift_div_255(t + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_over_white_matches_pillow_values() {
        // Pillow 13: alpha_composite(white, (v, v, v, a)).convert("RGB") for a few (v, a).
        assert_eq!(over_white([0, 0, 0], 0), [255; 3]);
        assert_eq!(over_white([10, 20, 30], 255), [10, 20, 30]);
        assert_eq!(over_white([0, 100, 200], 128), [127, 177, 227]);
        assert_eq!(over_white([0, 0, 0], 1), [254; 3]);
    }

    #[test]
    fn grey_and_alpha_become_rgb() {
        let grey =
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(2, 1, vec![7, 250]).unwrap());
        assert_eq!(to_rgb8(&grey).unwrap().as_raw(), &vec![7, 7, 7, 250, 250, 250]);
        let rgba = DynamicImage::ImageRgba8(
            image::RgbaImage::from_raw(1, 1, vec![0, 100, 200, 128]).unwrap(),
        );
        assert_eq!(to_rgb8(&rgba).unwrap().as_raw(), &vec![127, 177, 227]);
        let g16 = DynamicImage::ImageLuma16(
            image::ImageBuffer::from_raw(2, 1, vec![200u16, 1000]).unwrap(),
        );
        assert_eq!(to_rgb8(&g16).unwrap().as_raw(), &vec![200, 200, 200, 255, 255, 255]);
    }

    /// A PNG whose header says `w`×`h` greyscale, with a token IDAT: what a decompression bomb
    /// looks like before its data is inflated.
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        }
        let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        };
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn an_image_above_the_pixel_cap_is_refused_from_its_header() {
        let bomb = png_header_only(20_000, 20_000);
        assert_eq!(image_dimensions(&bomb).unwrap(), (20_000, 20_000));
        let start = std::time::Instant::now();
        let err = decode_image(&bomb, DEFAULT_MAX_IMAGE_PIXELS).unwrap_err();
        assert!(start.elapsed().as_secs_f64() < 1.0);
        let too_large = err.downcast_ref::<ImageTooLarge>().expect("ImageTooLarge");
        assert_eq!((too_large.width, too_large.height), (20_000, 20_000));
        let msg = err.to_string();
        assert!(msg.contains("20000x20000") && msg.contains("64000000"), "{msg}");
        // Under the cap, the same header goes on to the decoder (which finds the data short).
        let small = png_header_only(4, 4);
        let err = format!("{:#}", decode_image(&small, 16).unwrap_err());
        assert!(!err.contains("above the limit"), "{err}");
        let err = format!("{:#}", decode_image(&small, 15).unwrap_err());
        assert!(err.contains("4x4 pixels") && err.contains("limit of 15"), "{err}");
        assert_eq!(pixel_cap_for(12_845_056), 51_380_224);
        assert_eq!(pixel_cap_for(10), 1 << 20);
    }

    #[test]
    fn corrupt_and_empty_data_are_errors() {
        assert!(decode_image(&[], DEFAULT_MAX_IMAGE_PIXELS)
            .unwrap_err()
            .to_string()
            .contains("0 bytes"));
        let err = format!(
            "{:#}",
            decode_image(b"definitely not an image", DEFAULT_MAX_IMAGE_PIXELS).unwrap_err()
        );
        assert!(err.contains("unrecognised image format"), "{err}");
        // A PNG signature followed by garbage.
        let mut bad = b"\x89PNG\r\n\x1a\n".to_vec();
        bad.extend_from_slice(&[0u8; 40]);
        let err = format!("{:#}", decode_image(&bad, DEFAULT_MAX_IMAGE_PIXELS).unwrap_err());
        assert!(err.contains("Png"), "{err}");
    }
}
