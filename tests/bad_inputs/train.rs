//! Bad-input cases: `ferrotune train`.
//!
//! | input | answer |
//! | --- | --- |
//! | `optimizer.eps: 0` | refused (exit 1) naming `optimizer.eps`; no output folder |
//! | a model whose weights hold NaN | exit 1 naming the tensor (or the step); no adapter |
//! | finite weights whose forward overflows (loss and gradients NaN at every step) | exit 1 at the 3rd non-finite step in a row, naming the step, the loss / gradient norm and `training.max_nonfinite_steps`; no adapter or checkpoint; `on_nonfinite: skip` finishes and says how many steps were skipped |
//! | a new run into an earlier run's output folder | refused naming the folder, its files and `--overwrite-output-dir`; every file byte-identical |
//! | `--overwrite-output-dir` / `training.overwrite_output_dir: true` | the earlier run's checkpoints, adapter and metrics are deleted, other files kept; metrics.jsonl holds only the new run |
//! | `--resume` with a changed training key | refused naming `key: old vs new`; nothing written |
//! | `--resume` with changed data | refused naming `data.fingerprint` and the sample counts |
//! | `logging_steps`, `save_steps`, `eval_steps` 0 | refused naming the key (was a panic, exit 101) |
//! | `save_total_limit: 0` | refused naming the key (was treated as 1) |
//! | `dtype: f16` | refused naming `dtype` and f32 / bf16 |
//! | a YAML syntax error | `FILE line L column C: …` (was ``config key `?` ``) |
//! | a failed start (missing model) | no output folder left behind |
//! | `.checkpoint-N.tmp` and atomic-write temporaries of a killed run | removed at the next start, which says so |
//! | a checkpoint write that fails (file size limit: disk full) | exit 1 naming the file; no `.checkpoint-N.tmp` left |
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use ferrotune_tests::*;

const WORDS: usize = 20;

fn fixture() -> &'static TextFixture {
    static F: OnceLock<TextFixture> = OnceLock::new();
    F.get_or_init(|| text_fixture("bad-train", WORDS, 1, 4, 1))
}

/// A config training 2 steps (a checkpoint after step 1) into `work/<name>`; `edit` changes
/// its text. Returns the config's path.
fn config(name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let f = fixture();
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\n\
         adapter: {{plugin: lora, r: 2, target_modules: [q_proj, v_proj]}}\n\
         optimizer: {{lr: 1.0e-3}}\n\
         data: {{plugin: alpaca, path: {data}}}\n\
         training: {{max_steps: 2, save_steps: 1, progress_bar: false}}\n",
        model = f.model.display(),
        out = out_dir(name).display(),
        data = f.data.display(),
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, edit(yaml)).unwrap();
    path
}

fn out_dir(name: &str) -> PathBuf {
    fixture().work.join(name)
}

fn train(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    ferrotune(&args)
}

/// `train` must exit with status 1 (a refusal, not a panic); returns stderr.
fn refused(name: &str, out: Output) -> String {
    let err = stderr(&out);
    println!("--- {name}:\n{}", err.trim());
    assert_eq!(out.status.code(), Some(1), "{name}: exit status 1 expected\n{err}");
    err
}

fn succeeds(name: &str, out: Output) -> String {
    let err = stderr(&out);
    assert!(out.status.success(), "{name} failed:\n{err}");
    err
}

/// Every file under `dir` (relative name → bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn zero_eps_is_refused_by_key_and_leaves_no_output_folder() {
    let c = config("eps0", |s| s.replace("{lr: 1.0e-3}", "{lr: 1.0e-3, eps: 0}"));
    let e = refused("eps0", train(&c, &[]));
    assert!(e.contains("`optimizer.eps`") && e.contains("positive"), "{e}");
    assert!(!out_dir("eps0").exists(), "a refused config creates no output folder");
}

#[test]
fn zero_step_counts_limit_and_f16_are_refused_by_key() {
    for (name, key, edit) in [
        ("log0", "training.logging_steps", "logging_steps: 0, "),
        ("save0", "training.save_steps", "save_steps: 0, "),
        ("eval0", "training.eval_steps", "eval_steps: 0, "),
        ("limit0", "training.save_total_limit", "save_total_limit: 0, "),
    ] {
        let c = config(name, |s| {
            s.replace("save_steps: 1, ", "").replace("{max_steps", &format!("{{{edit}max_steps"))
        });
        let e = refused(name, train(&c, &[]));
        assert!(e.contains(&format!("`{key}`")) && e.contains("at least 1"), "{name}: {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!out_dir(name).exists(), "{name}: no output folder");
    }
    let c = config("f16", |s| s + "dtype: f16\n");
    let e = refused("f16", train(&c, &[]));
    assert!(e.contains("`dtype`") && e.contains("f16") && e.contains("f32 or bf16"), "{e}");
}

#[test]
fn a_yaml_syntax_error_is_named_by_file_line_and_column() {
    // Line 4 closes a flow mapping twice.
    let c = config("yaml", |s| s.replace("optimizer: {lr: 1.0e-3}", "optimizer: {lr: 1.0e-3}}"));
    let e = refused("yaml", train(&c, &[]));
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(last.contains(&format!("{} line 4 column ", c.display())), "{e}");
    assert!(!e.contains("config key `?`"), "{e}");
}

#[test]
fn a_failed_start_leaves_no_output_folder() {
    let missing = fixture().work.join("no-such-model");
    let c = config("no-model", |s| {
        s.replace(&fixture().model.display().to_string(), &missing.display().to_string())
    });
    let e = refused("no-model", train(&c, &[]));
    assert!(e.contains("no-such-model"), "{e}");
    assert!(
        !out_dir("no-model").exists(),
        "the failed start left {}",
        out_dir("no-model").display()
    );
}

/// A copy of the fixture's model whose final norm weight is `value` everywhere.
fn model_with_norm(name: &str, value: f64) -> PathBuf {
    let f = fixture();
    let dir = f.work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&f.model).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let file = dir.join("model.safetensors");
    let mut tensors = ferrotune::util::safetensors::read(&file).unwrap();
    let (_, norm) = tensors.iter_mut().find(|(k, _)| k == "model.norm.weight").unwrap();
    *norm = norm.full_like(value);
    ferrotune::util::safetensors::write(&file, &tensors).unwrap();
    dir
}

fn with_model(model: &Path) -> impl Fn(String) -> String + '_ {
    move |s| s.replace(&fixture().model.display().to_string(), &model.display().to_string())
}

#[test]
fn nan_model_weights_end_the_run_with_status_1() {
    let model = model_with_norm("nan-model", f64::NAN);
    let e = refused("nan-model", train(&config("nan-run", with_model(&model)), &[]));
    // Refused as the weights load (naming the tensor), or at the steps they poison.
    assert!(e.contains("model.norm.weight") || (e.contains("step 3:") && e.contains("NaN")), "{e}");
    assert!(!out_dir("nan-run").join("adapter_model.safetensors").exists());
}

#[test]
fn a_run_whose_loss_is_not_finite_stops_at_the_limit_or_counts_skipped_steps() {
    // Finite weights whose forward overflows: the final norm scales every hidden state by
    // 1e38, the logits reach ±inf, and neither loss nor gradient is finite at any step.
    let model = model_with_norm("overflow-model", 1e38);
    let overflowing = |s: String| {
        with_model(&model)(s).replace("max_steps: 2, save_steps: 1", "max_steps: 5, save_steps: 1")
    };
    let e = refused("overflow", train(&config("overflow", overflowing), &[]));
    assert!(
        e.contains("step 3: loss ")
            && e.contains("gradient norm NaN, 3 step(s) in a row")
            && e.contains("training.max_nonfinite_steps: 3"),
        "{e}"
    );
    let out = out_dir("overflow");
    assert!(!out.join("adapter_model.safetensors").exists(), "nothing is saved from NaN");
    // A skipped step updates nothing: a checkpoint written meanwhile holds the finite start.
    let lines = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(lines.len(), 3, "steps 1-3 are logged, then the run stops");
    assert!(lines.iter().all(|l| l["skipped"] == true && l["loss"].is_null()), "{lines:?}");

    let limit = |s: String| {
        overflowing(s).replace("save_steps: 1", "save_steps: 1, max_nonfinite_steps: 1")
    };
    let e = refused("overflow-1", train(&config("overflow-1", limit), &[]));
    assert!(e.contains("step 1: loss ") && e.contains("1 step(s) in a row"), "{e}");

    let skip =
        |s: String| overflowing(s).replace("save_steps: 1", "save_steps: 1, on_nonfinite: skip");
    let e = succeeds("overflow-skip", train(&config("overflow-skip", skip), &[]));
    assert!(e.contains("5 of 5 steps were skipped"), "{e}");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir("overflow-skip").join("train_summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["nonfinite_steps"], 5);
}

#[test]
fn a_new_run_never_mixes_with_an_earlier_one() {
    let c = config("mix", |s| s);
    succeeds("mix first run", train(&c, &[]));
    let out = out_dir("mix");
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&out);
    assert!(before.keys().any(|k| k.starts_with("checkpoint-1")), "{:?}", before.keys());

    let e = refused("mix again", train(&c, &[]));
    assert!(
        e.contains(&out.display().to_string())
            && e.contains("metrics.jsonl")
            && e.contains("checkpoint-1")
            && e.contains("--overwrite-output-dir"),
        "{e}"
    );
    assert!(snapshot(&out) == before, "the earlier run's files must stay byte-identical");

    // Overwriting: the earlier run's files go, others stay, metrics hold one run.
    let c2 = config("mix", |s| s.replace("max_steps: 2, save_steps: 1", "max_steps: 3"));
    let e = succeeds("mix overwrite", train(&c2, &["--overwrite-output-dir"]));
    assert!(e.contains("removed the earlier run's"), "{e}");
    // A skipped step updates nothing: the checkpoints written meanwhile hold the finite start.
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    let steps: Vec<_> =
        read_jsonl(&out.join("metrics.jsonl")).iter().map(|l| l["step"].clone()).collect();
    assert_eq!(steps, [1, 2, 3], "metrics.jsonl holds only the new run");

    // The config key does the same.
    let c3 = config("mix", |s| {
        s.replace("progress_bar: false", "progress_bar: false, overwrite_output_dir: true")
    });
    succeeds("mix overwrite key", train(&c3, &[]));
    assert_eq!(read_jsonl(&out.join("metrics.jsonl")).len(), 2);
    assert!(out.join("checkpoint-1").is_dir());
}

#[test]
fn resume_refuses_another_config_or_other_data() {
    let f = fixture();
    let data = f.work.join("resume-data.jsonl");
    std::fs::copy(&f.data, &data).unwrap();
    let with_data =
        |s: String| s.replace(&f.data.display().to_string(), &data.display().to_string());
    let c = config("resume-check", with_data);
    succeeds("resume-check first run", train(&c, &[]));
    let out = out_dir("resume-check");
    let before = snapshot(&out);

    let c2 = config("resume-check", |s| with_data(s).replace("{lr: 1.0e-3}", "{lr: 2.0e-3}"));
    let e = refused("resume changed lr", train(&c2, &["--resume"]));
    assert!(e.contains("optimizer.lr: 0.001 vs 0.002") && e.contains("checkpoint-1"), "{e}");
    assert!(!e.contains("data.fingerprint"), "only what differs is named: {e}");

    let c3 = config("resume-check", |s| with_data(s).replace("r: 2,", "r: 4,"));
    let e = refused("resume changed r", train(&c3, &["--resume"]));
    assert!(e.contains("adapter.r: 2 vs 4"), "{e}");

    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"instruction\": \"w1 w2\", \"input\": \"\", \"output\": \"w3\"}\n");
    std::fs::write(&data, text).unwrap();
    let e = refused("resume changed data", train(&c, &["--resume"]));
    assert!(
        e.contains("data.fingerprint: \"fnv1a64:") && e.contains("data.train_samples: 4 vs 5"),
        "{e}"
    );
    assert!(snapshot(&out) == before, "a refused resume writes nothing");
}

#[test]
fn a_killed_runs_leftovers_are_removed_at_the_next_start() {
    let c = config("stale", |s| s);
    succeeds("stale first run", train(&c, &[]));
    let out = out_dir("stale");
    // What a run killed while saving checkpoint-2 and rewriting metrics.jsonl leaves.
    std::fs::create_dir_all(out.join(".checkpoint-2.tmp")).unwrap();
    std::fs::write(out.join(".checkpoint-2.tmp/optimizer.safetensors"), [0u8; 4096]).unwrap();
    std::fs::write(out.join(".metrics.jsonl.tmp-99999999"), "{\"step\":").unwrap();
    let e = succeeds(
        "stale resume",
        train(&c, &["--resume", out.join("checkpoint-1").to_str().unwrap()]),
    );
    assert!(
        e.contains("left half-written")
            && e.contains(".checkpoint-2.tmp")
            && e.contains(".metrics.jsonl.tmp-99999999"),
        "{e}"
    );
    assert!(
        !out.join(".checkpoint-2.tmp").exists()
            && !out.join(".metrics.jsonl.tmp-99999999").exists()
    );
}

#[test]
fn a_checkpoint_write_that_fails_removes_its_temporary() {
    // A file size limit of 8 KiB (bash's `ulimit -f` counts KiB; SIGXFSZ ignored, so a write
    // past it fails with EFBIG as a full disk fails with ENOSPC): the metrics lines fit, the
    // checkpoint's optimizer state (LoRA r 16 on every linear layer) does not.
    let c = config("disk-full", |s| {
        s.replace("r: 2, target_modules: [q_proj, v_proj]", "r: 16, target_modules: all-linear")
    });
    let out = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 8; exec \"$0\" train \"$1\"")
        .arg(ferrotune_bin())
        .arg(&c)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .output()
        .unwrap();
    let e = refused("disk-full", out);
    assert!(e.contains(".checkpoint-1.tmp"), "the error names the file: {e}");
    let dir = out_dir("disk-full");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n.contains(".tmp") || n.starts_with("checkpoint-")), "{left:?}");
}
