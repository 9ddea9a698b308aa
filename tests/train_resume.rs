//! `ferrotune train --resume` continues a killed run exactly.
//!
//! Run A trains 24 optimizer steps in one go (LoRA with `lora_dropout: 0.1` and per-epoch
//! shuffling, so the random streams matter; a checkpoint every 4 steps). Run B is the same
//! config in another output folder, started as a child process and killed with SIGKILL as soon
//! as `checkpoint-8` appears, then continued with `--resume`. B's final
//! `adapter_model.safetensors` and its later checkpoints must be byte-identical to A's, and
//! B's losses, learning rates and gradient norms equal A's at every step. Every checkpoint seen
//! while B runs must be complete (they are renamed into place), and a half-written
//! `.checkpoint-N.tmp` folder (planted after the kill) must never be resumed from.
//! Also: `--resume CHECKPOINT` names the folder to continue from, and `--resume` with no
//! checkpoint, or with a folder that is not one, is a clear error.
//!
//! Needs `cargo build --workspace` (the CLI and the `lora`, `sft`, `single`, `alpaca`
//! plugins); no Python.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferrotune_tests::*;
use serde_json::Value;

const STEPS: usize = 24;
const SAVE_STEPS: usize = 4;
const KILL_AT: usize = 8;
const WORDS: usize = 40;

struct Fixture {
    work: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

/// Tokenizer, model, data and run A (trained once, shared by the tests).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let work = temp_dir("train-resume");
        write_chat_tokenizer(&work.join("tokenizer"), WORDS);
        let model = work.join("model");
        init_tiny_model(&work.join("tokenizer"), &model, 9);
        let data = work.join("alpaca.jsonl");
        write_alpaca_rows(&data, 11, WORDS, 5);
        let f = Fixture { work, model, data };
        let a = train(&write_config(&f, "a"), &[]);
        assert!(a.status.success(), "run A failed:\n{}", stderr(&a));
        f
    })
}

/// The run's config, writing to `work/<name>`.
fn write_config(f: &Fixture, name: &str) -> PathBuf {
    write_config_with(f, name, 0.1)
}

fn write_config_with(f: &Fixture, name: &str, lora_dropout: f64) -> PathBuf {
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\nseed: 17\n\
         adapter: {{plugin: lora, r: 4, lora_alpha: 8, lora_dropout: {lora_dropout}, target_modules: all-linear}}\n\
         optimizer: {{lr: 1.0e-3, weight_decay: 0.01, max_grad_norm: 1.0}}\n\
         scheduler: {{type: cosine, warmup_steps: 2}}\n\
         data: {{plugin: alpaca, path: {data}}}\n\
         training: {{max_steps: {STEPS}, micro_batch_size: 2, gradient_accumulation_steps: 2, save_steps: {SAVE_STEPS}, progress_bar: false}}\n",
        model = f.model.display(),
        out = f.work.join(name).display(),
        data = f.data.display(),
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn train(config: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    ferrotune(&args)
}

/// The metrics lines of steps (the last line of each step, in step order).
fn steps(lines: &[Value]) -> Vec<Value> {
    let mut by_step: Vec<Option<Value>> = vec![None; STEPS + 1];
    for l in lines.iter().filter(|l| l.get("loss").is_some()) {
        by_step[l["step"].as_u64().unwrap() as usize] = Some(l.clone());
    }
    by_step.into_iter().flatten().collect()
}

/// What must be equal between two runs at a step (not the timing).
fn key(l: &Value) -> (u64, u64, u64, u64) {
    let bits = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("no `{k}` in {l}")).to_bits();
    (l["step"].as_u64().unwrap(), bits("loss"), bits("lr"), bits("grad_norm"))
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Files every checkpoint folder holds.
const CHECKPOINT_FILES: [&str; 4] = [
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "optimizer.safetensors",
    "trainer_state.json",
];

fn assert_complete(checkpoint: &Path) {
    for file in CHECKPOINT_FILES {
        assert!(
            checkpoint.join(file).is_file(),
            "{} was visible without its {file}",
            checkpoint.display()
        );
    }
}

#[test]
fn a_killed_run_resumes_bit_identically() {
    let f = fixture();
    let a_dir = f.work.join("a");
    let b_dir = f.work.join("b");
    let config = write_config(f, "b");

    // B: start, watch its folder, SIGKILL as soon as checkpoint-8 is there.
    let log = |n: &str| Stdio::from(std::fs::File::create(f.work.join(n)).unwrap());
    let mut child = Command::new(ferrotune_bin())
        .args(["train", config.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .stdout(log("b-first.stdout"))
        .stderr(log("b-first.stderr"))
        .spawn()
        .unwrap();
    let target = b_dir.join(format!("checkpoint-{KILL_AT}"));
    let started = Instant::now();
    loop {
        if target.exists() {
            child.kill().unwrap(); // SIGKILL
            break;
        }
        for entry in std::fs::read_dir(&b_dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("checkpoint-") {
                assert_complete(&entry.path());
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "run B ended ({status}) before checkpoint-{KILL_AT} was seen:\n{}",
                std::fs::read_to_string(f.work.join("b-first.stderr")).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint-{KILL_AT} after 300 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "run B must die by SIGKILL, not finish ({status})");
    assert_complete(&target);
    assert!(
        !b_dir.join("adapter_model.safetensors").exists(),
        "run B finished before the kill: nothing to resume"
    );
    let later = format!("checkpoint-{}", KILL_AT + SAVE_STEPS);
    assert!(!b_dir.join(&later).exists(), "run B wrote {later} before the kill: the kill came too late to test resuming from {KILL_AT}");
    println!("run B killed at checkpoint-{KILL_AT} after {:.2} s", started.elapsed().as_secs_f64());

    // A half-written checkpoint of a later step, as a kill during a save leaves it: never a
    // checkpoint to resume from.
    let half = b_dir.join(format!(".checkpoint-{}.tmp", KILL_AT + SAVE_STEPS));
    std::fs::create_dir_all(half.join("adapter")).unwrap();
    std::fs::write(
        half.join("trainer_state.json"),
        format!("{{\"step\": {}}}", KILL_AT + SAVE_STEPS),
    )
    .unwrap();
    std::fs::write(half.join("optimizer.safetensors"), b"torn").unwrap();

    let resumed = train(&config, &["--resume"]);
    assert!(resumed.status.success(), "resume failed:\n{}", stderr(&resumed));
    let expected = format!("resumed from {} at step {KILL_AT}", target.display());
    assert!(
        stderr(&resumed).contains(&expected),
        "expected `{expected}` in:\n{}",
        stderr(&resumed)
    );

    // Weights: the final adapter and every later checkpoint, byte for byte.
    let final_file = "adapter_model.safetensors";
    assert!(
        bytes(&a_dir.join(final_file)) == bytes(&b_dir.join(final_file)),
        "final adapters differ"
    );
    for n in (KILL_AT + SAVE_STEPS..STEPS).step_by(SAVE_STEPS) {
        for file in ["adapter/adapter_model.safetensors", "optimizer.safetensors"] {
            let p = format!("checkpoint-{n}/{file}");
            assert!(bytes(&a_dir.join(&p)) == bytes(&b_dir.join(&p)), "{p} differs");
        }
    }
    println!(
        "final adapter_model.safetensors of A and B: byte-identical ({} bytes)",
        bytes(&a_dir.join(final_file)).len()
    );

    // Metrics: the resumed run logs steps 9..24 exactly as A did, and B's metrics file reads
    // as one run (the killed run's lines after the checkpoint are cut).
    let a = steps(&read_jsonl(&a_dir.join("metrics.jsonl")));
    assert_eq!(a.len(), STEPS);
    let after: Vec<Value> =
        stdout(&resumed).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        after.first().map(|l| l["step"].as_u64().unwrap()),
        Some(KILL_AT as u64 + 1),
        "the resumed run starts at step {}",
        KILL_AT + 1
    );
    assert_eq!(
        after.iter().map(key).collect::<Vec<_>>(),
        a[KILL_AT..].iter().map(key).collect::<Vec<_>>(),
        "losses after the resume"
    );
    let b_lines = read_jsonl(&b_dir.join("metrics.jsonl"));
    assert_eq!(
        b_lines.iter().map(key).collect::<Vec<_>>(),
        a.iter().map(key).collect::<Vec<_>>(),
        "B's metrics.jsonl: one line per step, as A's"
    );
    for l in &after {
        println!(
            "step {:>2}: loss {} (A: {})",
            l["step"],
            l["loss"],
            a[l["step"].as_u64().unwrap() as usize - 1]["loss"]
        );
    }
}

/// The random stream matters in these runs: without dropout the same run ends elsewhere, so the
/// bit-identity above covers restoring it.
#[test]
fn dropout_changes_the_run() {
    let f = fixture();
    let config = write_config_with(f, "nodrop", 0.0);
    let out = train(&config, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = steps(&read_jsonl(&f.work.join("a/metrics.jsonl")));
    let nodrop = steps(&read_jsonl(&f.work.join("nodrop/metrics.jsonl")));
    let differ = a.iter().zip(&nodrop).filter(|(x, y)| key(x) != key(y)).count();
    assert!(differ >= STEPS / 2, "only {differ} of {STEPS} steps differ with and without dropout");
}

#[test]
fn resume_from_a_named_checkpoint() {
    let f = fixture();
    let a_dir = f.work.join("a");
    let config = write_config(f, "c");
    let checkpoint = a_dir.join("checkpoint-4");
    let out = train(&config, &["--resume", checkpoint.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("resumed from {} at step 4", checkpoint.display())),
        "{}",
        stderr(&out)
    );
    let file = "adapter_model.safetensors";
    assert!(
        bytes(&a_dir.join(file)) == bytes(&f.work.join("c").join(file)),
        "resuming from A's checkpoint-4 must end where A ended"
    );
}

#[test]
fn resume_without_a_checkpoint_is_an_error() {
    let f = fixture();
    let config = write_config(f, "d");
    let out = train(&config, &["--resume"]);
    assert!(!out.status.success(), "--resume with nothing to resume from must fail");
    let e = stderr(&out);
    assert!(
        e.contains("no checkpoint") && e.contains(&f.work.join("d").display().to_string()),
        "{e}"
    );
    assert!(!f.work.join("d").join("adapter_model.safetensors").exists(), "no training happened");

    let missing = f.work.join("d/checkpoint-3");
    let out = train(&config, &["--resume", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains(&missing.display().to_string()) && e.contains("not a checkpoint"), "{e}");
}
