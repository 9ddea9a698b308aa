//! `ferrotune bench train` next to bench/train_transformers.py on one tiny model directory: the
//! two print the same JSON keys, and their first step's loss (B = 0 in LoRA, so the base
//! model's loss on the shared synthetic batch) agrees; a sanity check of `make bench-train`'s
//! like-for-like comparison, not a timing.
use std::ffi::OsStr;

use ferrotune_tests::*;

#[test]
fn bench_train_matches_the_reference_script_on_a_tiny_model() {
    let dir = temp_dir("bench-train");
    let model = dir.join("qwen2-tiny");
    let tokenizer = repo_root().join("assets/qwen2-tokenizer");
    assert!(
        tokenizer.join("tokenizer.json").is_file(),
        "{} is missing: run `make .stamps/qwen-tokenizer`",
        tokenizer.display()
    );
    let out = ferrotune(&[
        "init-model",
        "--preset",
        "tiny",
        "--arch",
        "qwen2",
        "--dtype",
        "f32",
        "--seed",
        "5",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let args = [
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rank",
        "4",
        "--threads",
        "1",
    ];
    let mut ours_args = vec!["bench", "train", "--model", model.to_str().unwrap()];
    ours_args.extend(args);
    let out = ferrotune(&ours_args);
    assert!(out.status.success(), "{}", stderr(&out));
    let ours: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let script = repo_root().join("bench/train_transformers.py");
    let mut py_args: Vec<&OsStr> =
        vec![script.as_os_str(), OsStr::new("--model"), model.as_os_str()];
    py_args.extend(args.iter().map(OsStr::new));
    let theirs: serde_json::Value =
        serde_json::from_str(stdout(&run_python(&py_args)).trim()).unwrap();

    // The peer also says which attention and optimizer implementation it ran.
    let keys = |v: &serde_json::Value| {
        let peer_only = ["attention", "optimizer"];
        v.as_object()
            .unwrap()
            .keys()
            .filter(|k| !peer_only.contains(&k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&ours), keys(&theirs), "ours {ours}\ntheirs {theirs}");
    for k in ["batch", "seq_len", "steps", "warmup", "lora_r", "trainable_params", "threads"] {
        assert_eq!(ours[k], theirs[k], "`{k}`: ours {ours}\ntheirs {theirs}");
    }
    let (a, b) = (ours["first_loss"].as_f64().unwrap(), theirs["first_loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-5 * b.abs(), "first loss: ours {a}, theirs {b}");
    for r in [&ours, &theirs] {
        for k in ["tokens_per_s", "best_tokens_per_s", "peak_rss_mb", "last_loss"] {
            assert!(r[k].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "`{k}` in {r}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}
