//! ferrotune's Qwen2-VL video preprocessing (`ferrotune::vision::plan_video` / `read_frames` /
//! `process_frames`) against transformers' video processor and qwen-vl-utils' frame sampling.
//!
//! `tests/python/video_reference.py` writes folders of PNG frames (odd counts, sizes off the
//! 28-pixel grid, below `min_pixels`) and runs transformers 5.24's `Qwen2VLVideoProcessor`
//! steps on them; here the same folders go through ferrotune, and `pixel_values_videos`,
//! `video_grid_thw` and the `<|video_pad|>` count must be identical (max difference 0). For the
//! mp4 fixture (`tests/fixtures/video/counter.mp4`: 25 frames at 10 fps, frame k a flat grey of
//! 8 + 9k), the frames sampled must be the ones qwen-vl-utils' rule picks for the same fps and
//! frame count, and each decoded frame must be that frame. The test fails, never skips, when
//! Python with transformers is missing.
use std::path::{Path, PathBuf};

use ferrotune::vision::{
    plan_video, process_frames, read_and_process, read_frames, ImageProcessorConfig, VideoKind,
    VideoOptions, VIDEO_FILE_DECODING,
};
use ferrotune_tests::{one_torch_thread, repo_root, run_python, temp_dir};
use serde_json::Value;
use tch::{Kind, Tensor};

/// Removes a test's folder when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MP4_FRAMES: usize = 25;
const MP4_FPS: f64 = 10.0;

fn mp4() -> PathBuf {
    repo_root().join("tests/fixtures/video/counter.mp4")
}

fn reference(dir: &Path) -> (Value, Vec<(String, Tensor)>) {
    one_torch_thread();
    let script = repo_root().join("tests/python/video_reference.py");
    let (frames, fps) = (MP4_FRAMES.to_string(), MP4_FPS.to_string());
    run_python(&[script.as_os_str(), dir.as_os_str(), frames.as_ref(), fps.as_ref()]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    (manifest, Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap())
}

fn tensor<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor {name}")).1
}

/// Qwen2-VL's processor settings (patch 14, merge 2, temporal 2, CLIP mean/std).
fn processor() -> ImageProcessorConfig {
    let obj = serde_json::json!({
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": 12845056
    });
    ImageProcessorConfig::from_json(obj.as_object().unwrap()).unwrap()
}

#[test]
fn frame_folders_match_transformers_and_mp4_sampling_matches_qwen_vl_utils() {
    let dir = temp_dir("video-reference");
    let _cleanup = Cleanup(dir.clone());
    let (manifest, tensors) = reference(&dir);
    let cfg = processor();
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = VideoOptions {
            min_pixels: case["min_pixels"].as_u64().unwrap(),
            max_pixels: case["max_pixels"].as_u64().unwrap(),
            total_pixels: u64::MAX / 4,
            ..VideoOptions::default()
        };
        let folder = dir.join(case["folder"].as_str().unwrap());
        let plan = plan_video(&folder, &opts, &cfg).unwrap();
        assert_eq!(plan.kind, VideoKind::Frames);
        let n = case["frames"].as_u64().unwrap() as usize;
        assert_eq!((plan.total_frames, plan.indices.len()), (n, n), "{name}: every frame kept");
        let frames = read_frames(&folder, &plan, opts.frame_pixel_cap()).unwrap();
        let got = process_frames(&frames, &plan, &cfg).unwrap();
        let want = tensor(&tensors, &format!("{name}.pixel_values_videos"));
        assert_eq!(got.pixel_values.size(), want.size(), "{name}: shape");
        let max_diff = (got.pixel_values.to_kind(Kind::Double) - want.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        let grid: Vec<i64> =
            Vec::try_from(tensor(&tensors, &format!("{name}.video_grid_thw")).view([-1])).unwrap();
        let tokens = plan.num_video_tokens(cfg.merge_size);
        println!(
            "{name}: {n} frames {:?} -> {:?}, grid {:?}, {tokens} tokens, pixel_values_videos {:?}, max |diff| {max_diff}",
            plan.original_size,
            plan.resized_size,
            got.grid_thw,
            got.pixel_values.size()
        );
        assert_eq!(max_diff, 0.0, "{name}: pixel_values_videos differ");
        // Frames resized one at a time as they are read: the same tensor.
        let streamed = read_and_process(&folder, &plan, opts.frame_pixel_cap(), &cfg).unwrap();
        assert!(streamed.pixel_values.equal(&got.pixel_values), "{name}: streamed path differs");
        assert_eq!(got.grid_thw.to_vec(), grid, "{name}: video_grid_thw");
        assert_eq!(tokens as u64, case["tokens"].as_u64().unwrap(), "{name}: token count");
        let (rh, rw) = (case["resized"][0].as_u64().unwrap(), case["resized"][1].as_u64().unwrap());
        assert_eq!(plan.resized_size, (rw as u32, rh as u32), "{name}: resized size");
        // Frames sampled at the default 2 fps: two frames a temporal patch -> 1 s each.
        assert_eq!(got.second_per_grid_t, 1.0);
    }

    let mp4 = mp4();
    if !VIDEO_FILE_DECODING {
        assert!(
            std::env::var("FERROTUNE_EXPECT_FFMPEG").as_deref() != Ok("1"),
            "FFmpeg's libraries were found but ferrotune was built without the `ffmpeg` feature"
        );
        let err = plan_video(&mp4, &VideoOptions::default(), &cfg).unwrap_err();
        assert!(format!("{err:#}").contains("`ffmpeg` feature"), "{err:#}");
        println!("video files: built without the `ffmpeg` feature; the mp4 half is skipped");
        return;
    }
    let sampling = manifest["mp4"]["sampling"].as_array().unwrap();
    assert_eq!(sampling.len(), 7);
    for s in sampling {
        let o = &s["options"];
        let get = |k: &str| o.get(k).and_then(Value::as_f64);
        let mut opts = VideoOptions::default();
        if let Some(f) = get("fps") {
            opts.fps = f;
        }
        opts.nframes = get("nframes").map(|n| n as u32);
        if let Some(n) = get("min_frames") {
            opts.min_frames = n as u32;
        }
        if let Some(n) = get("max_frames") {
            opts.max_frames = n as u32;
        }
        let plan = plan_video(&mp4, &opts, &cfg).unwrap();
        assert_eq!(plan.kind, VideoKind::File);
        assert_eq!((plan.total_frames, plan.native_fps), (MP4_FRAMES, Some(MP4_FPS)));
        let want: Vec<usize> =
            s["indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(plan.indices, want, "indices for {o}");
        let want_fps = s["sample_fps"].as_f64().unwrap();
        assert!(
            (plan.fps - want_fps).abs() < 1e-9,
            "sample fps {} vs {want_fps} for {o}",
            plan.fps
        );
        println!("mp4 {o}: indices {:?} at {} fps (qwen-vl-utils: equal)", plan.indices, plan.fps);
        // Each decoded frame is the frame of its index: a flat grey 8 + 9k away from the
        // moving white square (rows 16..32), mpeg4 compression within a few levels.
        let frames = read_frames(&mp4, &plan, opts.frame_pixel_cap()).unwrap();
        for (f, &k) in frames.iter().zip(&plan.indices) {
            let px = f.get_pixel(60, 4).0;
            let want = 8.0 + 9.0 * k as f64;
            let grey = px.iter().map(|&v| v as f64).sum::<f64>() / 3.0;
            assert!((grey - want).abs() <= 6.0, "frame {k}: grey {grey}, expected {want}");
        }
        let p = process_frames(&frames, &plan, &cfg).unwrap();
        let streamed = read_and_process(&mp4, &plan, opts.frame_pixel_cap(), &cfg).unwrap();
        assert!(streamed.pixel_values.equal(&p.pixel_values), "{o}: streamed path differs");
        assert_eq!(p.grid_thw[0] as usize, plan.indices.len().div_ceil(2));
        assert!((p.second_per_grid_t - 2.0 / want_fps).abs() < 1e-12);
    }
}

/// Bad videos are refused by name: a missing file, a broken mp4, an empty frame folder, frames
/// of different sizes, an absurd frame count.
#[test]
fn bad_videos_are_named() {
    let dir = temp_dir("video-bad");
    let _cleanup = Cleanup(dir.clone());
    let cfg = processor();
    let opts = VideoOptions::default();
    let err = |p: &Path| format!("{:#}", plan_video(p, &opts, &cfg).unwrap_err());

    let missing = dir.join("nope.mp4");
    let e = err(&missing);
    assert!(e.contains("nope.mp4") && e.contains("does not exist"), "{e}");

    let empty = dir.join("empty_frames");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not a frame").unwrap();
    let e = err(&empty);
    assert!(e.contains("empty_frames") && e.contains("holds no frames"), "{e}");

    let broken = dir.join("broken.mp4");
    let bytes = std::fs::read(mp4()).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 3]).unwrap();
    let garbage = dir.join("garbage.mp4");
    std::fs::write(&garbage, b"this is not a video at all, just some text bytes").unwrap();
    for bad in [&broken, &garbage] {
        let e = err(bad);
        let name = bad.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(name), "{e}");
        if !VIDEO_FILE_DECODING {
            assert!(e.contains("`ffmpeg` feature"), "{e}");
        }
        println!("{name}: {e}");
    }

    let mixed = dir.join("mixed_frames");
    std::fs::create_dir_all(&mixed).unwrap();
    image::RgbImage::new(56, 56).save(mixed.join("a.png")).unwrap();
    image::RgbImage::new(28, 56).save(mixed.join("b.png")).unwrap();
    let plan = plan_video(&mixed, &opts, &cfg).unwrap();
    let e = format!("{:#}", read_frames(&mixed, &plan, opts.frame_pixel_cap()).unwrap_err());
    assert!(e.contains("mixed_frames") && e.contains("share one size"), "{e}");

    let huge = dir.join("huge_frames");
    std::fs::create_dir_all(&huge).unwrap();
    image::RgbImage::new(4000, 3000).save(huge.join("a.png")).unwrap();
    let e = err(&huge);
    assert!(e.contains("4000x3000") && e.contains("limit"), "{e}");

    let too_many = VideoOptions { nframes: Some(1_000_000), ..VideoOptions::default() };
    let e = format!("{:#}", plan_video(&mixed, &too_many, &cfg).unwrap_err());
    assert!(e.contains("nframes"), "{e}");
}
