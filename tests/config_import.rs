//! `ferrotune config import` and `ferrotune train LF.yaml`: LLaMA-Factory example configs and
//! Qwen2-VL-Finetune scripts (copies in `tests/fixtures/import/`) translate with no
//! untranslated key but the documented no-effect ones, translated configs train two steps
//! with the model swapped for a tiny one (SFT through `train LF.yaml` itself, DPO, full
//! fine-tuning under the ZeRO-3 DeepSpeed file, a Qwen2-VL vision LoRA from a launch script),
//! and every example of `../shared/peers` translates or names why not.
//!
//! Needs `cargo build --workspace` (the CLI and the lora, sft, align, dist, textdata, vlmdata
//! plugins).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferrotune_tests::*;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/import")
}

/// The CLI run from `cwd` (LLaMA-Factory and Qwen2-VL-Finetune read paths from there).
fn ferrotune_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(ferrotune_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run ferrotune")
}

/// The untranslated keys of an import's stderr: (line, is it a documented no-effect key).
fn untranslated(err: &str) -> Vec<(String, bool)> {
    err.lines()
        .skip_while(|l| !l.starts_with("untranslated keys"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| (l.trim().to_string(), l.contains(": no effect in ferrotune: ")))
        .collect()
}

/// `key: value` lines of `text` replaced (or appended when absent).
fn edit_yaml(text: &str, edits: &[(&str, String)]) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for (key, value) in edits {
        let prefix = format!("{key}:");
        match lines.iter().position(|l| l.starts_with(&prefix)) {
            Some(i) => lines[i] = format!("{key}: {value}"),
            None => lines.push(format!("{key}: {value}")),
        }
    }
    lines.join("\n") + "\n"
}

fn summary(out_dir: &Path) -> Value {
    let path = out_dir.join("train_summary.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// `ferrotune config import FORMAT FILE --out OUT --device cpu` run in `cwd`.
fn import_output(cwd: &Path, format: &str, file: &Path, out: &Path) -> std::process::Output {
    ferrotune_in(
        cwd,
        &[
            "config",
            "import",
            format,
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    )
}

/// [`import_output`], which must succeed: the config written and the report on stderr.
fn import(cwd: &Path, format: &str, file: &Path, out: &Path) -> (String, String) {
    let o = import_output(cwd, format, file, out);
    let err = stderr(&o);
    assert!(o.status.success(), "import {}: {err}", file.display());
    (std::fs::read_to_string(out).unwrap(), err)
}

#[test]
fn llamafactory_examples_translate_with_only_documented_keys_left() {
    let tmp = TempDir::new("config-import-lf");
    let dir = fixtures().join("llamafactory");
    let expect: &[(&str, &[&str])] = &[
        (
            "qwen3_lora_sft.yaml",
            &["plugin: sft", "target_modules: all-linear", "- alpaca_en_demo", "lora_alpha: 16.0"],
        ),
        ("qwen3_lora_kto.yaml", &["plugin: kto", "beta: 0.1"]),
        ("qwen3_lora_reward.yaml", &["plugin: reward_model"]),
        ("llama3_lora_dpo.yaml", &["plugin: dpo", "loss_type: sigmoid", "lr: 5e-6"]),
        (
            "qwen2vl_lora_sft.yaml",
            &[
                "target_modules: .*\\.layers\\.\\d+\\..*",
                "image_max_pixels: 262144",
                "video_max_pixels: 16384",
            ],
        ),
        ("llama3_lora_sft_otfq.yaml", &["plugin: nf4", "double_quant: true"]),
        (
            "llama3_full_sft.yaml",
            &["finetuning: full", "plugin: zero", "stage: 3", "gradient_accumulation_steps: 2"],
        ),
        (
            "qwen2vl_full_sft.yaml",
            &[
                "freeze_vision_tower: true",
                "tune_merger: false",
                "offload_param: cpu",
                "offload_optimizer: cpu",
                "eval_ratio: 0.1",
                "eval_steps: 500",
                "- tensorboard",
            ],
        ),
    ];
    for (file, wanted) in expect {
        let out = tmp.0.join(file);
        let (yaml, err) = import(&dir, "llamafactory", &dir.join(file), &out);
        let left = untranslated(&err);
        let significant: Vec<&String> = left.iter().filter(|(_, ok)| !ok).map(|(l, _)| l).collect();
        assert!(
            significant.is_empty(),
            "{file}: untranslated keys that change the run: {significant:#?}\n{err}"
        );
        assert!(
            left.iter().any(|(l, _)| l.starts_with("trust_remote_code")),
            "{file}: the no-effect keys are listed: {err}"
        );
        for w in *wanted {
            assert!(yaml.contains(w), "{file}: `{w}` missing from\n{yaml}");
        }
        assert!(yaml.contains("dtype: bf16") && yaml.contains("device: cpu"), "{file}:\n{yaml}");
        println!(
            "{file}: {} no-effect keys: {}",
            left.len(),
            left.iter().map(|(l, _)| l.split(" = ").next().unwrap()).collect::<Vec<_>>().join(", ")
        );
    }
}

#[test]
fn unsupported_models_and_bad_files_are_refused_by_name() {
    let tmp = TempDir::new("config-import-bad");
    let qwen3vl = tmp.0.join("qwen3vl.yaml");
    std::fs::write(&qwen3vl, "model_name_or_path: Qwen/Qwen3-VL-4B-Instruct\nstage: sft\ndataset: mllm_demo\noutput_dir: o\n").unwrap();
    let out = tmp.0.join("out.yaml");
    let o = ferrotune_in(
        &tmp.0,
        &[
            "config",
            "import",
            "llamafactory",
            qwen3vl.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let err = stderr(&o);
    assert!(
        !o.status.success()
            && err.contains("Qwen3-VL")
            && err.contains("not a model family ferrotune trains"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for an unsupported model");
    // `train` detects the file and gives the same reason.
    let o = ferrotune_in(&tmp.0, &["train", qwen3vl.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("Qwen3-VL"), "{}", stderr(&o));
    let bad = tmp.0.join("bad.sh");
    std::fs::write(&bad, "echo nothing to see\n").unwrap();
    let o = ferrotune_in(&tmp.0, &["config", "import", "qwen-vl-finetune", bad.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("train_*.py"), "{}", stderr(&o));
}

/// A tiny model, an alpaca data set and a preference data set under a `dataset_info.json`.
fn registry_fixture(work: &Path) -> (PathBuf, PathBuf) {
    write_chat_tokenizer(&work.join("tokenizer"), 24);
    let model = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &model, 5);
    let data = work.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_alpaca_rows(&data.join("demo.jsonl"), 24, 24, 9);
    let prefs: Vec<String> = (0..16)
        .map(|i| json!({"instruction": format!("w{i} w{}", i + 1), "chosen": format!("w{}", i % 12), "rejected": format!("w{}", 12 + i % 12)}).to_string())
        .collect();
    std::fs::write(data.join("prefs.jsonl"), prefs.join("\n") + "\n").unwrap();
    let info = json!({
        "demo": {"file_name": "demo.jsonl"},
        "prefs": {"file_name": "prefs.jsonl", "ranking": true, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}
    });
    std::fs::write(data.join("dataset_info.json"), info.to_string()).unwrap();
    (model, data)
}

#[test]
fn translated_configs_train_on_a_tiny_model() {
    let tmp = TempDir::new("config-import-train");
    let work = &tmp.0;
    let (model, data) = registry_fixture(work);
    let lf = fixtures().join("llamafactory");
    let common = |dataset: &str, out: &str| -> Vec<(&'static str, String)> {
        vec![
            ("model_name_or_path", model.display().to_string()),
            ("dataset", dataset.to_string()),
            ("dataset_dir", data.display().to_string()),
            ("output_dir", work.join(out).display().to_string()),
            ("cutoff_len", "64".into()),
            ("bf16", "false".into()),
            ("max_steps", "2".into()),
            ("template", "qwen".into()),
            ("disable_gradient_checkpointing", "true".into()),
        ]
    };

    // SFT: `ferrotune train` on the LLaMA-Factory file itself.
    let sft = work.join("lf_sft.yaml");
    std::fs::write(
        &sft,
        edit_yaml(
            &std::fs::read_to_string(lf.join("qwen3_lora_sft.yaml")).unwrap(),
            &common("demo", "sft"),
        ),
    )
    .unwrap();
    let o = ferrotune_in(work, &["train", sft.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(o.status.success(), "train LF.yaml: {err}");
    assert!(
        err.contains("is an LLaMA-Factory config")
            && err.contains("trust_remote_code = true: no effect"),
        "{err}"
    );
    let s = summary(&work.join("sft"));
    assert_eq!(s["steps"], 2, "{s}");
    assert!(work.join("sft/adapter_model.safetensors").is_file());
    println!("sft via train LF.yaml: loss {} -> {}", s["first_loss"], s["last_loss"]);

    // DPO: imported to a file, then trained.
    let dpo = work.join("lf_dpo.yaml");
    std::fs::write(
        &dpo,
        edit_yaml(
            &std::fs::read_to_string(lf.join("llama3_lora_dpo.yaml")).unwrap(),
            &common("prefs", "dpo"),
        ),
    )
    .unwrap();
    let (yaml, _) = import(work, "llamafactory", &dpo, &work.join("dpo.yaml"));
    assert!(yaml.contains("plugin: dpo"), "{yaml}");
    let o = ferrotune_in(work, &["train", work.join("dpo.yaml").to_str().unwrap()]);
    assert!(o.status.success(), "train dpo: {}", stderr(&o));
    let s = summary(&work.join("dpo"));
    assert_eq!(s["steps"], 2, "{s}");
    let metrics = std::fs::read_to_string(work.join("dpo/metrics.jsonl")).unwrap();
    assert!(metrics.contains("rewards/accuracies"), "the DPO objective ran: {metrics}");
    println!("dpo: loss {} -> {}", s["first_loss"], s["last_loss"]);

    // Full fine-tuning under LLaMA-Factory's ZeRO-3 file (one process), imported from the
    // fixture folder so that `examples/deepspeed/…` resolves as in LLaMA-Factory's checkout.
    let full = work.join("lf_full.yaml");
    std::fs::write(
        &full,
        edit_yaml(
            &std::fs::read_to_string(lf.join("llama3_full_sft.yaml")).unwrap(),
            &common("demo", "full"),
        ),
    )
    .unwrap();
    let (yaml, _) = import(&lf, "llamafactory", &full, &work.join("full.yaml"));
    assert!(yaml.contains("plugin: zero") && yaml.contains("stage: 3"), "{yaml}");
    let o = ferrotune_in(work, &["train", work.join("full.yaml").to_str().unwrap()]);
    assert!(o.status.success(), "train full zero-3: {}", stderr(&o));
    let s = summary(&work.join("full"));
    assert_eq!(s["steps"], 2, "{s}");
    assert!(work.join("full/config.json").is_file(), "a full run writes a model directory");
    println!("full zero-3: loss {} -> {}", s["first_loss"], s["last_loss"]);
}

#[test]
fn qwen_vl_finetune_scripts_translate_and_train() {
    let qvf = fixtures().join("qwen-vl-finetune");
    let tmp = TempDir::new("config-import-qvf");
    let work = &tmp.0;
    // The scripts as published: every argument translated or documented.
    let (yaml, err) = import(
        &qvf,
        "qwen-vl-finetune",
        &qvf.join("scripts/finetune_lora_vision.sh"),
        &work.join("lora_vision.yaml"),
    );
    let left = untranslated(&err);
    assert!(left.iter().all(|(_, ok)| *ok), "{err}");
    for w in [
        "plugin: llava",
        "target_modules: all-linear",
        "r: 64",
        "lora_alpha: 64.0",
        "lora_dropout: 0.05",
        "gradient_accumulation_steps: 4",
        "micro_batch_size: 4",
        "image_min_pixels: 200704",
        "image_max_pixels: 1003520",
        "plugin: zero",
        "stage: 3",
        "tune_merger: false",
        "- tensorboard",
        "save_total_limit: 10",
        "weight_decay: 0.1",
    ] {
        assert!(yaml.contains(w), "`{w}` missing from\n{yaml}");
    }
    let (yaml, err) =
        import(&qvf, "qwen-vl-finetune", &qvf.join("scripts/finetune.sh"), &work.join("full.yaml"));
    assert!(untranslated(&err).iter().all(|(_, ok)| *ok), "{err}");
    for w in [
        "finetuning: full",
        "freeze_vision_tower: false",
        "tune_merger: true",
        "vision_lr: 2e-6",
        "merger_lr: 0.00001",
        "offload_param: cpu",
    ] {
        assert!(yaml.contains(w), "`{w}` missing from\n{yaml}");
    }

    // The vision-LoRA script with the tiny Qwen2-VL, a four-row llava file, smaller images,
    // rank 8 (the tiny tower is 32 wide) and 2 steps: it trains.
    let model = work.join("model");
    init_tiny_vl_model(&model, 7);
    let images = work.join("images");
    std::fs::create_dir_all(&images).unwrap();
    image::RgbImage::from_fn(56, 56, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 90]))
        .save(images.join("a.png"))
        .unwrap();
    let rows = json!([
        {"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A gradient."}]},
        {"id": "1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"id": "2", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColours?"}, {"from": "gpt", "value": "Red and green."}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Count to two."}, {"from": "gpt", "value": "One, two."}]}
    ]);
    std::fs::write(work.join("data.json"), rows.to_string()).unwrap();
    std::fs::create_dir_all(work.join("scripts")).unwrap();
    std::fs::copy(qvf.join("scripts/zero3.json"), work.join("scripts/zero3.json")).unwrap();
    let script = std::fs::read_to_string(qvf.join("scripts/finetune_lora_vision.sh"))
        .unwrap()
        .replace(
            "MODEL_NAME=\"Qwen/Qwen2.5-VL-3B-Instruct\"",
            &format!("MODEL_NAME=\"{}\"", model.display()),
        )
        .replace("/path/to/your/training/data.json", &work.join("data.json").display().to_string())
        .replace("/path/to/your/image/folder", &images.display().to_string())
        .replace("output/lora_vision_test", &work.join("run").display().to_string())
        .replace("BATCH_PER_DEVICE=4", "BATCH_PER_DEVICE=1")
        .replace("GLOBAL_BATCH_SIZE=128", "GLOBAL_BATCH_SIZE=16")
        .replace("$((256 * 28 * 28))", "$((4 * 28 * 28))")
        .replace("$((1280 * 28 * 28))", "$((16 * 28 * 28))")
        .replace("--bf16 True", "--bf16 False")
        .replace("--lora_rank 64", "--lora_rank 8")
        .replace("--lora_alpha 64", "--lora_alpha 16")
        .replace("--gradient_checkpointing True", "--gradient_checkpointing False")
        + " \\\n    --max_steps 2\n";
    std::fs::write(work.join("finetune.sh"), script).unwrap();
    let (yaml, _) =
        import(work, "qwen-vl-finetune", &work.join("finetune.sh"), &work.join("tiny.yaml"));
    assert!(
        yaml.contains("max_steps: 2") && yaml.contains("gradient_accumulation_steps: 2"),
        "{yaml}"
    );
    let o = ferrotune_in(work, &["train", work.join("tiny.yaml").to_str().unwrap()]);
    assert!(o.status.success(), "train the translated script: {}", stderr(&o));
    let s = summary(&work.join("run"));
    assert_eq!(s["steps"], 2, "{s}");
    println!("qwen-vl-finetune vision LoRA: loss {} -> {}", s["first_loss"], s["last_loss"]);
}

/// `../shared/peers` (LLaMA-Factory's examples, Qwen2-VL-Finetune's scripts) where present.
fn peers() -> Option<PathBuf> {
    [repo_root().join("../shared/peers"), PathBuf::from("/work/shared/peers")]
        .into_iter()
        .find(|p| p.join("llamafactory/examples").is_dir())
}

#[test]
fn every_shared_example_translates_or_names_its_model_family() {
    let Some(peers) = peers() else {
        println!("note: ../shared/peers is absent; skipping the check over LLaMA-Factory's and Qwen2-VL-Finetune's own files");
        return;
    };
    let tmp = TempDir::new("config-import-peers");
    let lf = peers.join("llamafactory");
    let mut files: Vec<PathBuf> = std::fs::read_dir(lf.join("examples"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let (mut translated, mut refused) = (0, 0);
    for file in &files {
        let name = file.strip_prefix(&lf).unwrap().display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        let out = tmp.0.join("out.yaml");
        let o = import_output(&lf, "llamafactory", file, &out);
        let err = stderr(&o);
        if text.contains("Qwen3-VL") {
            assert!(
                !o.status.success() && err.contains("not a model family ferrotune trains"),
                "{name}: {err}"
            );
            println!("{name}: refused: {}", err.lines().last().unwrap_or_default());
            refused += 1;
            continue;
        }
        assert!(o.status.success(), "{name}: {err}");
        let left = untranslated(&err);
        let significant: Vec<&String> = left.iter().filter(|(_, ok)| !ok).map(|(l, _)| l).collect();
        assert!(significant.is_empty(), "{name}: {significant:#?}");
        println!(
            "{name}: translated; not needed: {}",
            left.iter().map(|(l, _)| l.split(" = ").next().unwrap()).collect::<Vec<_>>().join(", ")
        );
        translated += 1;
    }
    println!("LLaMA-Factory examples: {translated} translated, {refused} refused (Qwen3-VL)");
    assert!(translated >= 6 && refused >= 2, "{translated} / {refused}");

    let qvf = peers.join("qwen-vl-finetune");
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(qvf.join("scripts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("finetune"))
        .collect();
    scripts.sort();
    for script in &scripts {
        let name = script.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.0.join("qvf.yaml");
        let o = import_output(&qvf, "qwen-vl-finetune", script, &out);
        let err = stderr(&o);
        assert!(o.status.success(), "{name}: {err}");
        let left = untranslated(&err);
        let significant: Vec<&str> =
            left.iter().filter(|(_, ok)| !ok).map(|(l, _)| l.as_str()).collect();
        if name.contains("grpo") {
            // Its rewards are Python code, its prompt limit and per-epoch saving have no key.
            let expected = ["reward_funcs", "--max_prompt_length", "--save_strategy"];
            assert!(
                significant.iter().all(|l| expected.iter().any(|e| l.starts_with(e))),
                "{name}: {significant:#?}"
            );
        } else {
            assert!(significant.is_empty(), "{name}: {significant:#?}");
        }
        println!(
            "{name}: translated; untranslated: {}",
            left.iter().map(|(l, _)| l.split(" = ").next().unwrap()).collect::<Vec<_>>().join(", ")
        );
    }
}
