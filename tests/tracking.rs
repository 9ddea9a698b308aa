//! Experiment tracking: `training.report_to: [tensorboard]` writes event files that
//! TensorBoard's own reader (the `tensorboard` package's event accumulator,
//! tests/python/tensorboard_read.py) reads back to the scalars of `metrics.jsonl`: the same
//! tags under transformers' names, the same steps, equal values as float32. A resumed run
//! continues the same TensorBoard run, and what the earlier process logged after the
//! checkpoint is dropped as `metrics.jsonl`'s lines are. `loss.png` is the plotters chart.
//!
//! Needs `cargo build --workspace` (the CLI and the `lora`, `sft`, `single`, `alpaca`
//! plugins) and the reference Python with `tensorboard` (requirements/reference.txt).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferrotune_tests::*;
use serde_json::Value;

const WORDS: usize = 40;
const STEPS: usize = 6;

/// A tiny LoRA SFT run's config with eval every 2 steps and a checkpoint every 2 steps.
fn write_config(f: &TextFixture, out: &Path, report_to: &str) -> PathBuf {
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\nseed: 3\n\
         adapter: {{plugin: lora, r: 4, lora_alpha: 8, target_modules: all-linear}}\n\
         optimizer: {{lr: 2.0e-3}}\nscheduler: {{type: cosine, warmup_steps: 1}}\n\
         data: {{plugin: alpaca, path: {data}, eval_ratio: 0.25}}\n\
         training: {{max_steps: {STEPS}, micro_batch_size: 2, eval_steps: 2, save_steps: 2, \
         report_to: {report_to}, progress_bar: false}}\n",
        model = f.model.display(),
        out = out.display(),
        data = f.data.display(),
    );
    let path = out.with_extension("yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn train(args: &[&str]) {
    let o = ferrotune_one_thread(args);
    assert!(o.status.success(), "ferrotune {args:?} failed:\n{}", stderr(&o));
}

/// The TensorBoard tag of a metrics.jsonl key, as transformers' `rewrite_logs` names its
/// logs (`learning_rate`, `eval_` → `eval/`, the rest under `train/`); `None` for what is
/// not a scalar.
fn tag(key: &str) -> Option<String> {
    match key {
        "step" | "skipped" => None,
        "lr" => Some("train/learning_rate".into()),
        "eval_loss" => Some("eval/loss".into()),
        k if k.starts_with("train/") || k.starts_with("eval/") => Some(k.into()),
        k => Some(format!("train/{k}")),
    }
}

/// tag → [(step, value as f32)] of a metrics.jsonl.
fn expected(metrics: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut out: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for line in read_jsonl(metrics) {
        let step = line["step"].as_u64().unwrap();
        for (k, v) in line.as_object().unwrap() {
            let (Some(tag), Some(v)) = (tag(k), v.as_f64()) else { continue };
            out.entry(tag).or_default().push((step, v as f32));
        }
    }
    out
}

/// The event folders under `<out>/runs/`.
fn run_dirs(out: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out.join("runs"))
        .map(|e| e.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

fn event_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// What TensorBoard's event accumulator reads from `dir`: tag → [(step, value)].
fn tensorboard_scalars(dir: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    let script = repo_root().join("tests/python/tensorboard_read.py");
    let o = run_python(&[script.as_os_str(), dir.as_os_str()]);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // The accumulator keeps the number of `file_version: "brain.Event:2"`.
    assert_eq!(v["file_version"], 2.0, "{v}");
    v["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
                .collect();
            (tag.clone(), points)
        })
        .collect()
}

fn assert_same(what: &str, ours: &BTreeMap<String, Vec<(u64, f32)>>, metrics: &Path) {
    let want = expected(metrics);
    for needed in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/epoch",
        "train/mean_token_accuracy",
        "eval/loss",
        "eval/mean_token_accuracy",
    ] {
        assert!(want.contains_key(needed), "{what}: metrics.jsonl has no {needed}: {want:?}");
    }
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: the tags TensorBoard read"
    );
    for (tag, points) in &want {
        // Bitwise float32 equality, same steps in the same order.
        let bits = |p: &[(u64, f32)]| p.iter().map(|(s, v)| (*s, v.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&ours[tag]), bits(points), "{what}: {tag}: {:?} vs {points:?}", ours[tag]);
    }
    let steps: Vec<u64> = ours["train/loss"].iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>(), "{what}");
    let eval_steps: Vec<u64> = ours["eval/loss"].iter().map(|p| p.0).collect();
    assert_eq!(eval_steps, [2, 4, 6], "{what}");
    println!(
        "{what}: {} tags, {} scalars read back equal; loss {:.4} -> {:.4}, eval loss {:.4} -> {:.4}",
        ours.len(),
        ours.values().map(Vec::len).sum::<usize>(),
        ours["train/loss"][0].1,
        ours["train/loss"][STEPS - 1].1,
        ours["eval/loss"][0].1,
        ours["eval/loss"][2].1,
    );
}

#[test]
fn tensorboard_reads_back_the_metrics_and_a_resumed_run_continues_them() {
    let f = text_fixture("tracking", WORDS, 5, 16, 11);
    let _guard = TempDir(f.work.clone());
    let out = f.work.join("run");
    let cfg = write_config(&f, &out, "[tensorboard]");
    train(&["train", cfg.to_str().unwrap()]);

    let dirs = run_dirs(&out);
    assert_eq!(dirs.len(), 1, "one TensorBoard run under runs/: {dirs:?}");
    let name = dirs[0].file_name().unwrap().to_string_lossy().into_owned();
    // transformers' default_logdir: `<Mon><DD>_<HH>-<MM>-<SS>_<host>`.
    let b = name.as_bytes();
    assert!(
        name.len() > 16
            && b[..3].iter().all(u8::is_ascii_alphabetic)
            && b[5] == b'_'
            && b[8] == b'-'
            && b[11] == b'-'
            && b[14] == b'_',
        "{name}"
    );
    let files = event_files(&dirs[0]);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("events.out.tfevents."), "{files:?}");
    // `events.out.tfevents.<10-digit time>.<host>.<pid>`
    let parts: Vec<&str> = files[0].split('.').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    assert!(parts.len() >= 6 && parts[3].len() == 10 && digits(parts[3]), "{files:?}");
    assert!(digits(parts[parts.len() - 1]), "{files:?}");
    assert_same("fresh run", &tensorboard_scalars(&dirs[0]), &out.join("metrics.jsonl"));

    // loss.png: the plotters chart at its size, not blank: the raw and smoothed training
    // loss in blue, the eval loss in orange, dark text.
    let png = image::open(out.join("loss.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (800, 500));
    let count = |f: &dyn Fn(&image::Rgb<u8>) -> bool| png.pixels().filter(|p| f(p)).count();
    let blue = count(&|p| p.0 == [31, 119, 180]);
    let orange = count(&|p| p.0 == [255, 127, 14]);
    let dark = count(&|p| p.0.iter().all(|&c| c < 80));
    let white = count(&|p| p.0 == [255, 255, 255]);
    println!("loss.png: {blue} blue, {orange} orange, {dark} dark, {white} white pixels");
    assert!(blue > 200 && orange > 50 && dark > 500, "{blue} {orange} {dark}");
    assert!(white < 800 * 500 * 98 / 100);

    // Resume from checkpoint-2: the same TensorBoard run gets a second file, which starts a
    // session at step 3; TensorBoard drops the first file's steps 3.. and reads the new ones,
    // equal to the rewound and continued metrics.jsonl.
    let ckpt = out.join("checkpoint-2");
    assert!(ckpt.is_dir());
    train(&["train", cfg.to_str().unwrap(), "--resume", ckpt.to_str().unwrap()]);
    assert_eq!(run_dirs(&out), dirs, "the resumed run writes into the same folder");
    assert_eq!(event_files(&dirs[0]).len(), 2);
    assert_same("resumed run", &tensorboard_scalars(&dirs[0]), &out.join("metrics.jsonl"));
}

#[test]
fn report_to_none_writes_no_events_and_unknown_names_are_refused_by_key() {
    let f = text_fixture("tracking-none", WORDS, 5, 8, 11);
    let _guard = TempDir(f.work.clone());
    let out = f.work.join("run");
    let bad = write_config(&f, &out, "[tensorboard, wandb]");
    let o = ferrotune_one_thread(&["train", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("training.report_to") && e.contains("`wandb`") && e.contains("tensorboard"),
        "{e}"
    );
    assert!(!out.exists(), "a refused config writes nothing");
    let cfg = write_config(&f, &out, "none");
    train(&["train", cfg.to_str().unwrap()]);
    assert!(out.join("metrics.jsonl").is_file());
    assert!(!out.join("runs").exists());
}
