//! ferrotune's Qwen2-VL image preprocessing against transformers' (`ferrotune::vision`).
//!
//! `tests/python/image_reference.py` writes synthetic images of odd sizes (RGB, RGBA, grey,
//! palette with transparency, JPEG; one below `min_pixels`, one above a small `max_pixels`, one
//! already on the 28-pixel grid) and runs the processor AutoImageProcessor picks for a Qwen2-VL
//! `preprocessor_config.json`, saving every stage. Here the same files go through
//! `ferrotune::vision`, and each stage is compared on its own: decode + RGB conversion,
//! the bicubic resize (fed Pillow's own RGB bytes so that decoding differences cannot hide a
//! resize difference: must be byte-identical), sizes and grids (identical), and the final
//! `pixel_values` (identical to 1e-6 where the decoders agree; JPEG decoders may differ).
//! The test fails, never skips, when Python with transformers is missing.
use std::path::PathBuf;

use ferrotune::vision::{
    decode_image, load_image, process_image, resize_bicubic, smart_resize, stack_images, to_rgb8,
    ImageProcessorConfig, DEFAULT_MAX_IMAGE_PIXELS,
};
use ferrotune_tests::{one_torch_thread, repo_root, run_python, temp_dir};
use image::RgbImage;
use serde_json::Value;
use tch::{Kind, Tensor};

/// The reference folder (the script runs once per test process), its manifest, and the
/// reference tensors (loaded per caller: tensors are not `Sync`).
fn reference() -> (PathBuf, Value, Vec<(String, Tensor)>) {
    static REF: std::sync::OnceLock<(PathBuf, Value)> = std::sync::OnceLock::new();
    let (dir, manifest) = REF.get_or_init(|| {
        one_torch_thread();
        let dir = temp_dir("image-reference");
        let script = repo_root().join("tests/python/image_reference.py");
        run_python(&[script.as_os_str(), dir.as_os_str()]);
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        (dir, manifest)
    });
    let tensors = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap();
    (dir.clone(), manifest.clone(), tensors)
}

fn tensor<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("reference has no tensor {name}"))
        .1
}

fn rgb_tensor(img: &RgbImage) -> Tensor {
    Tensor::from_slice(img.as_raw()).view([img.height() as i64, img.width() as i64, 3])
}

fn rgb_image(t: &Tensor) -> RgbImage {
    let size = t.size();
    let bytes = Vec::<u8>::try_from(t.flatten(0, -1)).unwrap();
    RgbImage::from_raw(size[1] as u32, size[0] as u32, bytes).unwrap()
}

/// (max, mean) of |a - b| as f64.
fn diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs();
    (d.max().double_value(&[]), d.mean(Kind::Double).double_value(&[]))
}

fn pair(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

#[test]
fn default_processor_is_the_pillow_one() {
    let (_, manifest, _) = &reference();
    // Without torchvision transformers falls back to the Pillow processor; the module
    // reproduces that one. If the reference stack gains torchvision this fails: re-check.
    assert_eq!(manifest["processor_class"], "Qwen2VLImageProcessorPil", "{manifest}");
}

#[test]
fn every_stage_matches_transformers() {
    let (dir, manifest, tensors) = &reference();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in manifest["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let file = dir.join(case["file"].as_str().unwrap());
        let is_jpeg = file.extension().is_some_and(|e| e == "jpg");
        let cfg =
            ImageProcessorConfig::from_dir(&dir.join(case["config"].as_str().unwrap())).unwrap();
        let img = load_image(&file, DEFAULT_MAX_IMAGE_PIXELS).unwrap();

        // 1. Decode + convert_to_rgb.
        let ours_rgb = to_rgb8(&img).unwrap();
        let (rgb_max, rgb_mean) =
            diff(&rgb_tensor(&ours_rgb), tensor(tensors, &format!("{name}.rgb")));

        // 2. Sizes, from the original size alone.
        let original = pair(&case["original"]);
        let resized = pair(&case["resized"]);
        let grid: Vec<i64> =
            case["grid"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(
            smart_resize(original.0, original.1, cfg.factor(), cfg.min_pixels, cfg.max_pixels)
                .unwrap(),
            resized,
            "{name}"
        );

        // 3. The resize alone, on Pillow's RGB bytes: must be Pillow's bytes.
        let pil_rgb = rgb_image(tensor(tensors, &format!("{name}.rgb")));
        let ours_resized = resize_bicubic(&pil_rgb, resized.1, resized.0).unwrap();
        let (rs_max, _) =
            diff(&rgb_tensor(&ours_resized), tensor(tensors, &format!("{name}.resized")));
        if rs_max != 0.0 {
            failures.push(format!(
                "{name}: bicubic resize differs from Pillow by up to {rs_max} (must be 0)"
            ));
        }

        // 4. The whole pipeline.
        let out = process_image(&img, &cfg).unwrap();
        assert_eq!(out.original_size, original, "{name}: original (height, width)");
        assert_eq!(out.resized_size, resized, "{name}: resized (height, width)");
        assert_eq!(out.grid_thw.to_vec(), grid, "{name}: image_grid_thw");
        assert_eq!(
            Vec::<i64>::try_from(tensor(tensors, &format!("{name}.grid")).flatten(0, -1)).unwrap(),
            grid
        );
        assert_eq!(
            out.num_image_tokens(cfg.merge_size),
            (grid[0] * grid[1] * grid[2] / 4) as usize
        );
        let (pv_max, pv_mean) =
            diff(&out.pixel_values, tensor(tensors, &format!("{name}.pixel_values")));
        report.push(format!(
            "{name:>14}: {}x{} -> {}x{}  decode max {rgb_max} mean {rgb_mean:.5}  resize max {rs_max}  \
             pixel_values max {pv_max:.3e} mean {pv_mean:.3e}",
            original.0, original.1, resized.0, resized.1
        ));
        if is_jpeg {
            // Different JPEG decoders (zune-jpeg here, libjpeg-turbo in Pillow). Measured:
            // decode max 4 / mean 0.365 levels, pixel_values max 0.058 / mean 0.0060; the bound
            // leaves ~1.5x room. The resize itself is checked exactly above on Pillow's bytes.
            if rgb_max > 6.0 || rgb_mean > 0.55 || pv_max > 0.09 || pv_mean > 0.009 {
                failures.push(format!(
                    "{name}: JPEG decode/pixel differences above the measured bound"
                ));
            }
        } else {
            if rgb_max != 0.0 {
                failures.push(format!(
                    "{name}: decoded RGB differs from Pillow + convert_to_rgb by up to {rgb_max}"
                ));
            }
            if pv_max > 1e-6 {
                failures.push(format!(
                    "{name}: pixel_values differ by up to {pv_max} (must be <= 1e-6)"
                ));
            }
        }
        if name.starts_with("exact_") {
            assert_eq!(resized, original, "{name} is meant to need no resize");
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), report.join("\n"));
}

#[test]
fn a_wrong_filter_would_be_caught() {
    // Bilinear instead of bicubic on the same image: the bound above must be far tighter than
    // this difference, or the parity test could not tell the filters apart.
    let (_, _, tensors) = &reference();
    let pil_rgb = rgb_image(tensor(tensors, "rgb_333x517.rgb"));
    let bilinear =
        image::imageops::resize(&pil_rgb, 504, 336, image::imageops::FilterType::Triangle);
    let (max, mean) = diff(&rgb_tensor(&bilinear), tensor(tensors, "rgb_333x517.resized"));
    println!("bilinear vs Pillow bicubic: max {max} mean {mean:.3} (uint8 grid)");
    assert!(
        max >= 10.0 && mean > 0.5,
        "a wrong filter should differ visibly: max {max} mean {mean}"
    );
}

#[test]
fn stacked_batch_matches_one_transformers_call() {
    let (dir, manifest, tensors) = &reference();
    let cfg = ImageProcessorConfig::from_dir(&dir.join("model")).unwrap();
    let names: Vec<&str> =
        manifest["batch"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let cases = manifest["cases"].as_array().unwrap();
    let processed: Vec<_> = names
        .iter()
        .map(|n| {
            let case = cases.iter().find(|c| c["name"] == *n).unwrap();
            process_image(
                &load_image(&dir.join(case["file"].as_str().unwrap()), DEFAULT_MAX_IMAGE_PIXELS)
                    .unwrap(),
                &cfg,
            )
            .unwrap()
        })
        .collect();
    let (pixel_values, grids) = stack_images(&processed).unwrap();
    let want_grids = tensor(tensors, "batch.grid");
    let want: Vec<i64> = Vec::try_from(want_grids.flatten(0, -1)).unwrap();
    assert_eq!(grids.iter().flatten().copied().collect::<Vec<_>>(), want);
    let reference = tensor(tensors, "batch.pixel_values");
    assert_eq!(pixel_values.size(), reference.size());
    // Row ranges of non-JPEG images must be equal; the JPEG's bounded as above.
    let mut row = 0i64;
    for (n, p) in names.iter().zip(&processed) {
        let rows = p.pixel_values.size()[0];
        let (max, _) = diff(&pixel_values.narrow(0, row, rows), &reference.narrow(0, row, rows));
        let bound = if n.starts_with("photo_") { 0.09 } else { 1e-6 };
        assert!(max <= bound, "{n}: rows {row}..{} differ by {max}", row + rows);
        row += rows;
    }
}

#[test]
fn corrupt_missing_and_degenerate_images_are_clear_errors() {
    let dir = temp_dir("image-errors");
    // Missing file: the path is named.
    let missing = dir.join("no-such-image.png");
    let err = format!("{:#}", load_image(&missing, DEFAULT_MAX_IMAGE_PIXELS).unwrap_err());
    assert!(err.contains("no-such-image.png") && err.contains("cannot read"), "{err}");

    // Not an image at all.
    let err = format!(
        "{:#}",
        decode_image(b"GIF? no, plain text", DEFAULT_MAX_IMAGE_PIXELS).unwrap_err()
    );
    assert!(err.contains("unrecognised image format"), "{err}");

    // A real PNG cut in half: the file is named and the data called corrupt.
    let good = dir.join("good.png");
    RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 7]))
        .save(&good)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", load_image(&cut, DEFAULT_MAX_IMAGE_PIXELS).unwrap_err());
    assert!(
        err.contains("cut.png") && (err.contains("corrupt") || err.contains("cannot decode")),
        "{err}"
    );
    // A JPEG start-of-image marker followed by garbage.
    let jpg = dir.join("bad.jpg");
    let mut jpeg = b"\xff\xd8\xff\xdb\x00\x43".to_vec();
    jpeg.extend_from_slice(&[0x55; 40]);
    std::fs::write(&jpg, &jpeg).unwrap();
    let err = format!("{:#}", load_image(&jpg, DEFAULT_MAX_IMAGE_PIXELS).unwrap_err());
    assert!(err.contains("bad.jpg"), "{err}");

    // Degenerate images: no pixels, and an aspect ratio transformers refuses.
    let cfg = ImageProcessorConfig::default();
    let empty = image::DynamicImage::ImageRgb8(RgbImage::new(0, 0));
    assert!(format!("{:#}", process_image(&empty, &cfg).unwrap_err()).contains("no pixels"));
    let sliver =
        image::DynamicImage::ImageRgb8(RgbImage::from_pixel(1000, 4, image::Rgb([0, 0, 0])));
    let err = format!("{:#}", process_image(&sliver, &cfg).unwrap_err());
    assert!(err.contains("aspect ratio"), "{err}");
}
