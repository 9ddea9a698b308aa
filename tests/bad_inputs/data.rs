//! Bad-input cases: training data and the data commands.
//!
//! | input | answer |
//! | --- | --- |
//! | a decompression-bomb PNG (20000 × 20000 grey, ~400 KB) in a data row or `generate --image` | `data check`, `train` and `generate` refuse it from its header, naming row, file and size, in seconds, without decoding it |
//! | `data.max_image_pixels: 0` | refused, naming the key |
//! | relative image paths, run from another working directory | joined to the data file's folder (alpaca/sharegpt `images`, llava `image_folder`) |
//! | `ferrotune … \| head` (stdout closed early) | quiet exit, status 141, no panic |
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use ferrotune_tests::*;

/// A tiny random Qwen2-VL with the real Qwen2 tokenizer, made once for this file's cases.
fn vl_model() -> &'static Path {
    static MODEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let out = temp_dir("bad-data-vl").join("model");
        init_tiny_vl_model(&out, 5);
        out
    })
}

/// What a run of the CLI did, with its own peak RSS (wait4's rusage of that child alone).
struct Measured {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    peak_rss_mb: f64,
    secs: f64,
}

// The child is reaped by wait4 (for its rusage), which clippy does not see.
#[allow(clippy::zombie_processes)]
fn measured(args: &[&str], cwd: Option<&Path>) -> Measured {
    let start = Instant::now();
    let mut cmd = Command::new(ferrotune_bin());
    cmd.args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().expect("run ferrotune");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut err, &mut stderr).ok();
    let stdout = reader.join().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Measured {
        code,
        stdout,
        stderr,
        peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn llava_config(dir: &Path, data: &Path, extra_data: &str) -> PathBuf {
    let config = dir.join("train.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {}\noutput_dir: {}\nadapter: {{plugin: lora, r: 4, target_modules: [q_proj, v_proj]}}\n\
             data: {{plugin: llava, path: {}, image_max_pixels: 200704{extra_data}}}\n\
             training: {{max_steps: 1, micro_batch_size: 1, progress_bar: false}}\n",
            vl_model().display(),
            dir.join("out").display(),
            data.display()
        ),
    )
    .unwrap();
    config
}

fn llava_rows(dir: &Path, images: &[&str]) -> PathBuf {
    let turn = |from: &str, value: &str| serde_json::json!({"from": from, "value": value});
    let rows: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            serde_json::json!({"id": format!("row{i}"), "image": img,
                "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "A frame.")]})
        })
        .collect();
    let data = dir.join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    data
}

fn small_png(path: &Path) {
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
    img.save(path).unwrap();
}

#[test]
fn a_decompression_bomb_in_the_data_is_refused_from_its_header() {
    let dir = temp_dir("bad-data-bomb");
    let bomb = zero_png(20_000, 20_000);
    // It is a real bomb: 400 MB of pixels in a few hundred KB that an image decoder accepts.
    assert!(bomb.len() < 1_500_000, "{} bytes", bomb.len());
    std::fs::write(dir.join("bomb.png"), &bomb).unwrap();
    small_png(&dir.join("ok.png"));
    let data = llava_rows(&dir, &["ok.png", "bomb.png"]);
    let config = llava_config(&dir, &data, "");

    let check = measured(&["data", "check", config.to_str().unwrap()], None);
    assert_eq!(check.code, Some(1), "{}\n{}", check.stdout, check.stderr);
    for want in ["row 1: error:", "bomb.png", "20000x20000", "above the limit of 1048576 pixels"] {
        assert!(check.stdout.contains(want), "`{want}` not in:\n{}", check.stdout);
    }
    assert!(!check.stdout.contains("row 0: error"), "{}", check.stdout);

    let train = measured(&["train", config.to_str().unwrap()], None);
    assert_eq!(train.code, Some(1), "{}", train.stderr);
    assert!(
        train.stderr.contains("row 1:")
            && train.stderr.contains("bomb.png")
            && train.stderr.contains("data.max_image_pixels"),
        "{}",
        train.stderr
    );
    assert!(!dir.join("out/adapter_model.safetensors").exists());
    eprintln!(
        "bomb: data check {:.1} s, peak RSS {:.0} MB; train {:.1} s, peak RSS {:.0} MB",
        check.secs, check.peak_rss_mb, train.secs, train.peak_rss_mb
    );
    // Decoding it would take 400 MB (grey) to 1.6 GB (RGBA): neither run comes near.
    for m in [&check, &train] {
        assert!(m.peak_rss_mb < 900.0, "peak RSS {:.0} MB", m.peak_rss_mb);
        assert!(m.secs < 60.0, "{:.1} s", m.secs);
    }

    // `generate --image` takes the same cap (`--max-image-pixels`).
    let model = vl_model().to_str().unwrap();
    let bomb_file = dir.join("bomb.png");
    let gen = |image: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", model, "--chat", "--prompt", "hi"];
        args.extend(["--max-new-tokens", "1", "--image", image.to_str().unwrap()]);
        args.extend_from_slice(extra);
        measured(&args, None)
    };
    let o = gen(&bomb_file, &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("bomb.png") && o.stderr.contains("20000x20000"), "{}", o.stderr);
    assert!(o.peak_rss_mb < 900.0, "generate: peak RSS {:.0} MB", o.peak_rss_mb);
    let o = gen(&dir.join("ok.png"), &["--max-image-pixels", "1000"]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("ok.png") && o.stderr.contains("limit of 1000"), "{}", o.stderr);
    assert_eq!(gen(&dir.join("ok.png"), &[]).code, Some(0));

    // The cap is a config key: the small image (3072 pixels) passes 4096 and fails 1000.
    let low = llava_config(&dir, &llava_rows(&dir, &["ok.png"]), ", max_image_pixels: 1000");
    let o = measured(&["data", "check", low.to_str().unwrap()], None);
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    assert!(o.stdout.contains("64x48") && o.stdout.contains("limit of 1000"), "{}", o.stdout);
    let zero = llava_config(&dir, &llava_rows(&dir, &["ok.png"]), ", max_image_pixels: 0");
    let o = measured(&["data", "check", zero.to_str().unwrap()], None);
    assert_eq!(o.code, Some(1));
    assert!(o.stderr.contains("data.max_image_pixels"), "{}", o.stderr);
    let fine = llava_config(&dir, &llava_rows(&dir, &["ok.png"]), ", max_image_pixels: 4096");
    let o = measured(&["data", "check", fine.to_str().unwrap()], None);
    assert_eq!(o.code, Some(0), "{}\n{}", o.stdout, o.stderr);
}

#[test]
fn relative_image_paths_are_joined_to_the_data_files_folder() {
    let dir = temp_dir("bad-data-paths");
    let data_dir = dir.join("data");
    std::fs::create_dir_all(data_dir.join("mllm_demo_data")).unwrap();
    std::fs::create_dir_all(data_dir.join("frames")).unwrap();
    small_png(&data_dir.join("mllm_demo_data/1.png"));
    small_png(&data_dir.join("frames/1.png"));
    // LLaMA-Factory's mllm_demo.json shape: sharegpt `messages` with an `images` column.
    let rows = serde_json::json!([{
        "messages": [
            {"role": "user", "content": "<image>Who are they?"},
            {"role": "assistant", "content": "Two players."}
        ],
        "images": ["mllm_demo_data/1.png"]
    }]);
    let mllm = data_dir.join("mllm_demo.json");
    std::fs::write(&mllm, rows.to_string()).unwrap();
    let sharegpt = dir.join("sharegpt.yaml");
    std::fs::write(
        &sharegpt,
        format!(
            "model: {}\noutput_dir: {}\nadapter: {{plugin: lora, r: 4}}\n\
             data: {{plugin: sharegpt, path: {}, image_max_pixels: 200704, config: {{tags: {{role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}}, columns: {{messages: messages, images: images}}}}}}\n\
             training: {{max_steps: 1, micro_batch_size: 1, progress_bar: false}}\n",
            vl_model().display(),
            dir.join("out").display(),
            mllm.display()
        ),
    )
    .unwrap();
    // Run from a folder that holds none of the images.
    let elsewhere = temp_dir("bad-data-paths-cwd");
    let o = measured(&["data", "check", sharegpt.to_str().unwrap()], Some(&elsewhere));
    assert_eq!(o.code, Some(0), "{}\n{}", o.stdout, o.stderr);

    // llava: a relative image_folder is joined to the data file's folder too.
    let data = llava_rows(&data_dir, &["1.png"]);
    let config = llava_config(&dir, &data, ", config: {image_folder: frames}");
    let o = measured(&["data", "check", config.to_str().unwrap()], Some(&elsewhere));
    assert_eq!(o.code, Some(0), "{}\n{}", o.stdout, o.stderr);
    let config = llava_config(&dir, &data, ", config: {image_folder: no-such-frames}");
    let o = measured(&["data", "check", config.to_str().unwrap()], Some(&elsewhere));
    assert_eq!(o.code, Some(1));
    assert!(
        o.stderr.contains("image_folder") && o.stderr.contains("no-such-frames"),
        "{}",
        o.stderr
    );
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = temp_dir("bad-data-pipe");
    small_png(&dir.join("ok.png"));
    let config = llava_config(&dir, &llava_rows(&dir, &["ok.png", "ok.png", "ok.png"]), "");
    for args in [vec!["data", "check", config.to_str().unwrap()], vec!["plugins"]] {
        let mut child = Command::new(ferrotune_bin())
            .args(&args)
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("FERROTUNE_PLUGIN_PATH")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -0`: the reader goes away before anything is printed.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {:?}\n{err}", out.status);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
    }
}
