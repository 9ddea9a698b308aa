//! Videos through `ferrotune train`, `data check` and `data preview`, on LLaMA-Factory's
//! `mllm_video_demo.json` layout (sharegpt `messages` with `<video>`, a `videos` column):
//! `tests/fixtures/video/frames_demo.json` (two clips as frame folders) and `mp4_demo.json`
//! (the mp4 fixture and a frame folder, with the `ffmpeg` feature). A LoRA on the tiny
//! Qwen2-VL (`init-model --preset tiny-vl`) and on the tiny Qwen2.5-VL (`tiny-vl25`) must
//! lower the loss; bad rows (a missing video, a placeholder without a video, a broken mp4)
//! are named by `data check`; the encoded prompt holds N `<|video_pad|>` tokens for
//! `VideoPrep`'s API (`ImagePrep::video_prompt`); and LLaMA-Factory's own
//! `mllm_video_demo.json` is checked where `../shared/peers/llamafactory` is present.
use std::path::{Path, PathBuf};

use ferrotune::data::images::ImageData;
use ferrotune::data::ImagePrep;
use ferrotune::text::Tokenizer;
use ferrotune::vision::VIDEO_FILE_DECODING;
use ferrotune_tests::{
    ferrotune, init_tiny_vl_model, qwen2_tokenizer, repo_root, stderr, stdout, temp_dir,
};

/// Removes a test's folder when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/video")
}

/// LLaMA-Factory's `mllm_video_demo` columns and tags for the sharegpt plugin.
const SHAREGPT: &str = "{columns: {messages: messages, videos: videos}, \
     tags: {role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}}";

fn write_config(dir: &Path, name: &str, model: &Path, data: &Path, extra_data: &str) -> PathBuf {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "model: {model}\noutput_dir: {out}\nseed: 1\n\
             adapter: {{plugin: lora, r: 16, lora_alpha: 32, lora_dropout: 0.0, \
             target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]}}\n\
             optimizer: {{lr: 1.0e-2}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: sharegpt, path: {data}, cutoff_len: 512, video_min_pixels: 3136, \
             video_max_pixels: 12544{extra_data}, config: {SHAREGPT}}}\n\
             training: {{max_steps: 10, micro_batch_size: 2, progress_bar: false}}\n",
            model = model.display(),
            out = dir.join(format!("out-{name}")).display(),
            data = data.display(),
        ),
    )
    .unwrap();
    config
}

/// Trains and returns (first, last) loss from the run's summary.
fn train(config: &Path) -> (f64, f64) {
    let o = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(o.status.success(), "train: {}\n{}", stdout(&o), stderr(&o));
    let out =
        config.with_file_name(format!("out-{}", config.file_stem().unwrap().to_str().unwrap()));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap())
            .unwrap();
    (summary["first_loss"].as_f64().unwrap(), summary["last_loss"].as_f64().unwrap())
}

fn init_tiny_vl25_model(out: &Path) {
    let o = ferrotune(&[
        "init-model",
        "--preset",
        "tiny-vl25",
        "--dtype",
        "f32",
        "--seed",
        "5",
        "--tokenizer",
        qwen2_tokenizer().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "init-model tiny-vl25: {}", stderr(&o));
}

#[test]
fn video_lora_sft_lowers_the_loss_on_qwen2_vl_and_qwen25_vl() {
    let dir = temp_dir("video-train");
    let _cleanup = Cleanup(dir.clone());
    let frames = fixtures().join("frames_demo.json");
    let mp4 = fixtures().join("mp4_demo.json");
    let mut models = vec![("qwen2-vl", dir.join("tiny-vl"))];
    init_tiny_vl_model(&models[0].1, 3);
    if ferrotune::model::init::PRESETS.contains(&"tiny-vl25") {
        models.push(("qwen2.5-vl", dir.join("tiny-vl25")));
        init_tiny_vl25_model(&models[1].1);
    }
    // Each model on the mp4 rows (the frame-folder rows without the `ffmpeg` feature); the
    // Qwen2-VL also on packed rows (M-RoPE positions per packed sample).
    let main = if VIDEO_FILE_DECODING { &mp4 } else { &frames };
    let mut runs = vec![("qwen2-vl", &models[0].1, "qwen2vl-packed", &frames, ", packing: true")];
    for (arch, model) in &models {
        runs.push((
            *arch,
            model,
            if *arch == "qwen2-vl" { "qwen2vl" } else { "qwen25vl" },
            main,
            "",
        ));
    }
    for (arch, model, run, data, extra) in runs {
        let config = write_config(&dir, run, model, data, extra);
        let (first, last) = train(&config);
        println!("{arch} {run} ({}): loss {first:.4} -> {last:.4} in 10 steps", data.display());
        assert!(last < first * 0.6, "{run}: loss {first} -> {last} did not fall");
    }

    // data check reports the videos; data preview shows them and their pad blocks.
    let config = write_config(&dir, "check", &models[0].1, &frames, "");
    let o = ferrotune(&["data", "check", config.to_str().unwrap()]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    // 4 frames of 56×56 at 2 fps: grid 2×4×4 -> 8 tokens each.
    assert!(out.contains("2 videos (8 of 8 frames kept, 16 video tokens)"), "{out}");
    let o = ferrotune(&["data", "preview", config.to_str().unwrap()]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(
        out.contains(
            "video 0: video: 4 of 4 frames at 2.000 fps, 56×56 → 56×56, grid 2×4×4, 8 tokens"
        ),
        "{out}"
    );
    assert!(out.contains("<|vision_start|><|video_pad|>×8<|vision_end|>"), "{out}");
}

/// `ImagePrep::video_prompt`, the call `generate` / `serve` make for a video: the text block
/// holds one `<|video_pad|>` per merged patch and the inputs match the plan.
#[test]
fn video_prompt_gives_text_and_inputs() {
    let dir = temp_dir("video-prompt");
    let _cleanup = Cleanup(dir.clone());
    let model = dir.join("tiny-vl");
    init_tiny_vl_model(&model, 3);
    let tok = Tokenizer::from_dir(&model).unwrap();
    let mut prep = ImagePrep::for_model_dir(&model, &tok).unwrap().expect("a vision model");
    prep.video.min_pixels = 3136;
    prep.video.max_pixels = 12544;
    let video = ImageData::File(fixtures().join("clip_right"));
    let (text, inputs, plan) = prep.video_prompt(&video).unwrap();
    assert_eq!(text.matches("<|video_pad|>").count(), 8);
    assert!(text.starts_with("<|vision_start|>") && text.ends_with("<|vision_end|>"));
    assert_eq!(inputs.grid_thw, vec![[2, 4, 4]]);
    assert_eq!(inputs.pixel_values.size(), [32, 1176]);
    assert_eq!(inputs.second_per_grid_ts, vec![1.0]);
    assert_eq!((plan.indices.len(), plan.total_frames), (4, 4));
    // Encoded bytes of a video file go through a temporary file.
    if VIDEO_FILE_DECODING {
        let bytes = std::fs::read(fixtures().join("counter.mp4")).unwrap();
        let (text, inputs, plan) =
            prep.video_prompt(&ImageData::Bytes(std::sync::Arc::new(bytes))).unwrap();
        assert_eq!((plan.total_frames, plan.indices.clone()), (25, vec![0, 8, 16, 24]));
        assert_eq!(text.matches("<|video_pad|>").count(), 8);
        assert_eq!(inputs.second_per_grid_ts, vec![2.0 / 1.6]);
    }
}

/// Bad video rows are named: a missing video, a broken mp4, an empty frame folder (per row,
/// by `data check`), and a `<video>` without a video or a video without its `<video>` (the
/// plugin refuses the file, naming the record).
#[test]
fn bad_video_rows_are_named() {
    let dir = temp_dir("video-bad-rows");
    let _cleanup = Cleanup(dir.clone());
    let model = dir.join("tiny-vl");
    init_tiny_vl_model(&model, 3);
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let bytes = std::fs::read(fixtures().join("counter.mp4")).unwrap();
    std::fs::write(dir.join("broken.mp4"), &bytes[..bytes.len() / 3]).unwrap();
    let clip = fixtures().join("clip_right");
    let row = |text: &str, videos: serde_json::Value| serde_json::json!({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "It moves."}], "videos": videos});
    let check = |name: &str, rows: serde_json::Value| {
        let data = dir.join(format!("{name}.json"));
        std::fs::write(&data, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        let config = write_config(&dir, name, &model, &data, "");
        let o = ferrotune(&["data", "check", config.to_str().unwrap()]);
        (o.status.code(), stdout(&o), stderr(&o))
    };

    let (code, out, err) = check(
        "bad",
        serde_json::json!([
            row("<video>What moves?", serde_json::json!([clip.to_str().unwrap()])),
            row("<video>What moves?", serde_json::json!(["missing.mp4"])),
            row("<video>What moves?", serde_json::json!(["broken.mp4"])),
            row("<video>What moves?", serde_json::json!(["empty"])),
        ]),
    );
    println!("{out}");
    assert_eq!(code, Some(1), "{out}\n{err}");
    let broken = if VIDEO_FILE_DECODING { "broken.mp4" } else { "`ffmpeg` feature" };
    for want in [
        "row 1: error:",
        "video 0 (",
        "missing.mp4",
        "does not exist",
        "row 2: error:",
        broken,
        "row 3: error:",
        "holds no frames",
        "4 rows, 1 usable, 3 with errors",
    ] {
        assert!(out.contains(want), "`{want}` not in:\n{out}");
    }
    assert!(!out.contains("row 0:"), "{out}");

    // A `<video>` with no video, and a video with no `<video>`: never text-only rows.
    let (code, _, err) =
        check("no-video", serde_json::json!([row("<video>What moves?", serde_json::json!([]))]));
    assert_ne!(code, Some(0));
    assert!(
        err.contains("record [0]")
            && err.contains("0 video(s) but the turns hold 1 `<video>` placeholder(s)"),
        "{err}"
    );
    let (code, _, err) = check(
        "no-placeholder",
        serde_json::json!([row("What moves?", serde_json::json!([clip.to_str().unwrap()]))]),
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("record [0]")
            && err.contains("1 video(s) but the turns hold 0 `<video>` placeholder(s)"),
        "{err}"
    );
}

/// LLaMA-Factory's own `mllm_video_demo.json` (an mp4, an avi, an mp4), where its folder is
/// present: every row is usable and its video counted.
#[test]
fn llamafactory_mllm_video_demo_checks() {
    let demo = repo_root().join("../shared/peers/llamafactory/data/mllm_video_demo.json");
    if !demo.is_file() {
        println!("{} is not here: nothing to check", demo.display());
        return;
    }
    let dir = temp_dir("video-llamafactory");
    let _cleanup = Cleanup(dir.clone());
    let model = dir.join("tiny-vl");
    init_tiny_vl_model(&model, 3);
    let config = write_config(&dir, "demo", &model, &demo, ", video_max_frames: 8");
    let o = ferrotune(&["data", "check", config.to_str().unwrap()]);
    let out = stdout(&o);
    println!("{out}");
    if !VIDEO_FILE_DECODING {
        assert!(out.contains("`ffmpeg` feature"), "{out}");
        return;
    }
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("3 rows, 3 usable, 0 with errors"), "{out}");
    assert!(out.contains("3 videos ("), "{out}");
}
