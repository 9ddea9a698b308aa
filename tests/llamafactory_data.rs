//! LLaMA-Factory's data registry end to end: data sets of a `dataset_info.json` named in a
//! config (`data.dataset_dir` + `data.datasets`) load by name alone, pass `ferrotune data
//! check` (reported per data set), and train two steps with their objective (SFT, DPO, KTO);
//! a mix of three with `interleave_probs` draws the expected rows (seeded); hub entries are
//! refused; `{{name}}` placeholders are replaced or warned about. Our fixtures are in
//! `tests/fixtures/llamafactory/`. One more test runs over LLaMA-Factory's own demo data
//! where `../shared/peers/llamafactory/data` is present (skipped with a note otherwise).
//!
//! Needs `cargo build --workspace --features ferrotune/ffmpeg` (the CLI and the lora, align,
//! sft, textdata plugins).
use std::path::{Path, PathBuf};

use ferrotune::data::registry::{mix, MixStrategy};
use ferrotune_tests::*;
use serde_json::{json, Value};

const WORDS: usize = 24;

struct Fixture {
    work: TempDir,
    model: PathBuf,
}

/// A work folder (removed when the test ends) with a chat tokenizer and a tiny model on it.
fn fixture(tag: &str) -> Fixture {
    let work = TempDir::new(tag);
    write_chat_tokenizer(&work.0.join("tokenizer"), WORDS);
    let model = work.0.join("model");
    init_tiny_model(&work.0.join("tokenizer"), &model, 3);
    Fixture { work, model }
}

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/llamafactory")
}

/// Writes `<name>.yaml`: `model`, output `<name>`, LoRA, then `body`; returns its path.
fn config(work: &Path, model: &Path, name: &str, body: &str) -> PathBuf {
    let yaml = format!(
        "model: {}\noutput_dir: {}\nadapter: {{plugin: lora, r: 4, target_modules: [q_proj, v_proj]}}\n{body}",
        model.display(),
        work.join(name).display()
    );
    let path = work.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `data check --json CONFIG`: the report (the run must succeed).
fn check(cfg: &Path) -> Value {
    let o = ferrotune_one_thread(&["data", "check", "--json", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "data check {}: {}\n{}", cfg.display(), stdout(&o), stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

/// `train CONFIG` (two steps): the losses logged.
fn train2(work: &Path, name: &str, cfg: &Path) -> Vec<f64> {
    let o = ferrotune_one_thread(&["train", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "train {name}: {}", stderr(&o));
    let losses: Vec<f64> = read_jsonl(&work.join(name).join("metrics.jsonl"))
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 2, "{name}: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
    losses
}

fn datasets(report: &Value) -> Vec<(String, u64, u64, u64)> {
    report["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["rows"].as_u64().unwrap(),
                d["usable"].as_u64().unwrap(),
                d["errors"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn fixtures_load_by_name_pass_check_and_train_two_steps() {
    let f = &fixture("llamafactory-fixtures");
    let dir = fixtures();
    let run = |name: &str, objective: &str, sets: &str, extra: &str| -> (Value, Vec<f64>) {
        let cfg = config(
            &f.work.0,
            &f.model,
            name,
            &format!(
                "objective: {objective}\n\
                 data: {{dataset_dir: {}, datasets: {sets}, cutoff_len: 64{extra}}}\n\
                 training: {{max_steps: 2, micro_batch_size: 2, save_steps: 1, progress_bar: false}}\n",
                dir.display()
            ),
        );
        let report = check(&cfg);
        let losses = train2(&f.work.0, name, &cfg);
        println!("{name}: data sets {:?}; losses {losses:?}", datasets(&report));
        (report, losses)
    };
    // SFT on four formattings at once; LLaMA-Factory's comma-separated string form.
    let (r, _) =
        run("sft", "{plugin: sft}", "'alpaca_demo, sharegpt_demo,openai_demo,folder_demo'", "");
    assert_eq!(
        datasets(&r),
        vec![
            ("alpaca_demo".into(), 8, 8, 0),
            // split train[:75%] of 8 rows
            ("sharegpt_demo".into(), 6, 6, 0),
            ("openai_demo".into(), 8, 8, 0),
            // num_samples 10 of a folder of 2 files × 3 rows: every row once, 4 drawn again
            ("folder_demo".into(), 10, 10, 0),
        ]
    );
    assert_eq!(r["rows"], 32);
    // Preference pairs and KTO with their objectives.
    let (r, _) = run("dpo", "{plugin: dpo, beta: 0.1}", "[dpo_demo]", "");
    assert_eq!(datasets(&r), vec![("dpo_demo".into(), 8, 8, 0)]);
    let (r, _) = run("kto", "{plugin: kto, beta: 0.1}", "[kto_demo]", ", max_samples: 6");
    assert_eq!(datasets(&r), vec![("kto_demo".into(), 6, 6, 0)], "max_samples caps the data set");
    // The checkpoint records the registry keys: another max_samples is another run.
    let yaml = f.work.0.join("kto.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, text.replace("max_samples: 6", "max_samples: 5")).unwrap();
    let first = f.work.0.join("kto/checkpoint-1");
    let o = ferrotune_one_thread(&[
        "train",
        yaml.to_str().unwrap(),
        "--resume",
        first.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("data.max_samples: 6 vs 5"), "{}", stderr(&o));
    std::fs::write(&yaml, text).unwrap();
    let o = ferrotune_one_thread(&[
        "train",
        yaml.to_str().unwrap(),
        "--resume",
        first.to_str().unwrap(),
    ]);
    assert!(o.status.success() && stderr(&o).contains("resumed from"), "{}", stderr(&o));
    // identity: placeholders replaced by data.replacements, none left.
    let (r, _) = run(
        "identity",
        "{plugin: sft}",
        "[identity_demo]",
        ", replacements: {name: w5, author: w6}",
    );
    assert_eq!(r["warnings"], 0, "{r}");
}

#[test]
fn placeholders_left_are_warned_and_hubs_refused() {
    let f = &fixture("llamafactory-warnings");
    let dir = fixtures();
    let cfg = config(
        &f.work.0,
        &f.model,
        "identity-raw",
        &format!(
            "data: {{dataset_dir: {}, datasets: [identity_demo], cutoff_len: 64}}\n",
            dir.display()
        ),
    );
    let o = ferrotune_one_thread(&["data", "check", cfg.to_str().unwrap()]);
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("data set `identity_demo`: 6 row(s) hold placeholders {{author}}, {{name}}")
            && err.contains("data.replacements"),
        "{err}"
    );
    assert!(out.contains("placeholders {{author}}, {{name}} left unreplaced"), "{out}");
    assert!(
        out.contains(
            "data set identity_demo: 6 rows, 6 usable, 0 with errors, 0 skipped, 6 warnings"
        ),
        "{out}"
    );

    let cfg = config(
        &f.work.0,
        &f.model,
        "hub",
        &format!("data: {{dataset_dir: {}, datasets: [alpaca_demo, hub_demo]}}\n", dir.display()),
    );
    let o = ferrotune_one_thread(&["data", "check", cfg.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("data set `hub_demo`")
            && err.contains("hf_hub_url, ms_hub_url")
            && err.contains("download the files and use file_name"),
        "{err}"
    );
    let cfg = config(&f.work.0, &f.model, "none", "data: {cutoff_len: 64}\n");
    let o = ferrotune_one_thread(&["train", cfg.to_str().unwrap()]);
    assert!(stderr(&o).contains("no data named"), "{}", stderr(&o));
}

/// Three data sets of 300 rows interleaved with probabilities 0.5 / 0.3 / 0.2 until the first
/// runs out: the rows of each are those HF datasets' rule draws from the run's seed (the
/// library's own `mix`), near 300 / 180 / 120, and another seed draws another mix.
#[test]
fn a_mix_of_three_follows_interleave_probs() {
    let f = &fixture("llamafactory-mix");
    let dir = f.work.0.join("mix");
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = ferrotune_tests::align::Lcg(9);
    for k in 0..3 {
        let rows: Vec<String> = (0..300)
            .map(|_| {
                json!({"instruction": g.words(2, 0, 24), "output": g.words(2, 0, 24)}).to_string()
            })
            .collect();
        std::fs::write(dir.join(format!("s{k}.jsonl")), rows.join("\n")).unwrap();
    }
    std::fs::write(
        dir.join("dataset_info.json"),
        r#"{"s0": {"file_name": "s0.jsonl"}, "s1": {"file_name": "s1.jsonl"}, "s2": {"file_name": "s2.jsonl"}}"#,
    )
    .unwrap();
    let counts = |seed: u64| -> Vec<u64> {
        let cfg = config(
            &f.work.0,
            &f.model,
            &format!("mix{seed}"),
            &format!(
                "seed: {seed}\ndata: {{dataset_dir: {}, datasets: [s0, s1, s2], mix_strategy: interleave_under, \
                 interleave_probs: '0.5,0.3,0.2', cutoff_len: 16}}\n",
                dir.display()
            ),
        );
        datasets(&check(&cfg)).into_iter().map(|d| d.1).collect()
    };
    let (a, b) = (counts(42), counts(7));
    let expect = |seed: u64| -> Vec<u64> {
        let m = mix(&[300, 300, 300], MixStrategy::InterleaveUnder, Some(&[0.5, 0.3, 0.2]), seed);
        (0..3).map(|d| m.iter().filter(|(x, _)| *x == d).count() as u64).collect()
    };
    println!("rows per data set: seed 42 {a:?}, seed 7 {b:?}");
    assert_eq!(a, expect(42));
    assert_eq!(b, expect(7));
    assert_ne!(a, b);
    for c in [&a, &b] {
        let total: u64 = c.iter().sum();
        assert!(c.contains(&300), "stops when a data set is exhausted: {c:?}");
        for (d, p) in [0.5, 0.3, 0.2].iter().enumerate() {
            let share = c[d] as f64 / total as f64;
            assert!(
                (share - p).abs() < 0.06,
                "data set s{d}: share {share:.3} for probability {p}"
            );
        }
    }
}

/// A run over the demo data: its name, objective, and data sets with their rows in the files.
type PeerRun = (&'static str, &'static str, &'static [(&'static str, u64)]);

/// LLaMA-Factory's own demo data (`../shared/peers/llamafactory/data`), where present.
fn peers() -> Option<PathBuf> {
    [
        PathBuf::from("/work/shared/peers/llamafactory/data"),
        repo_root().join("../shared/peers/llamafactory/data"),
    ]
    .into_iter()
    .find(|p| p.join("dataset_info.json").is_file())
}

#[test]
fn llamafactorys_demo_data_loads_by_name() {
    let Some(data) = peers() else {
        println!(
            "note: LLaMA-Factory's demo data (../shared/peers/llamafactory/data) is not here; skipped"
        );
        return;
    };
    let work = TempDir::new("llamafactory-peers");
    // One tiny Qwen2-VL (the real Qwen2 tokenizer) for every file: text rows train on it too.
    let model = work.0.join("vl");
    init_tiny_vl_model(&model, 3);
    let t0 = std::time::Instant::now();
    let cfg = |name: &str, objective: &str, sets: &str, extra: &str| {
        config(
            &work.0,
            &model,
            name,
            &format!(
                "objective: {objective}\n\
                 data: {{dataset_dir: {}, datasets: {sets}{extra}}}\n\
                 training: {{max_steps: 2, micro_batch_size: 2, progress_bar: false}}\n",
                data.display()
            ),
        )
    };
    // Every row through `data check` (cutoff_len 1024), then two steps on a few rows: the SFT
    // files interleaved round robin (unshuffled: the 4 rows of the 2 steps are one of each).
    // (run, objective, data sets and their rows in the files)
    let runs: [PeerRun; 3] = [
        (
            "sft",
            "{plugin: sft}",
            &[("alpaca_en_demo", 999), ("identity", 91), ("mllm_demo", 6), ("mllm_video_demo", 3)],
        ),
        ("dpo", "{plugin: dpo, beta: 0.1}", &[("dpo_en_demo", 300)]),
        ("kto", "{plugin: kto, beta: 0.1}", &[("kto_en_demo", 300)]),
    ];
    let media = ", video_max_frames: 4, video_max_pixels: 12544, \
                 replacements: {name: Ferro, author: ferrotune}";
    let few = ", cutoff_len: 256, max_samples: 2, mix_strategy: interleave_under, shuffle: false";
    // The three runs at once (each its own processes), then the tool-call file.
    let (cfg, work_dir) = (&cfg, &work.0);
    std::thread::scope(|scope| {
        for (name, objective, expect) in runs {
            scope.spawn(move || {
                let sets =
                    format!("[{}]", expect.iter().map(|e| e.0).collect::<Vec<_>>().join(", "));
                let check_cfg = cfg(
                    &format!("{name}-check"),
                    objective,
                    &sets,
                    &format!(", cutoff_len: 1024{media}"),
                );
                let report = check(&check_cfg);
                let per = datasets(&report);
                println!(
                    "{name}: data check {per:?} (name, rows, usable, errors); {} skipped, \
                     {} warnings, {} images, {} videos ({:.1?})",
                    report["skipped"],
                    report["warnings"],
                    report["images"],
                    report["videos"],
                    t0.elapsed()
                );
                let got: Vec<(&str, u64, u64)> =
                    per.iter().map(|d| (d.0.as_str(), d.1, d.3)).collect();
                let want: Vec<(&str, u64, u64)> = expect.iter().map(|&(n, r)| (n, r, 0)).collect();
                assert_eq!(got, want, "{name}: every row loads, none with errors");
                assert!(
                    !report["notes"].to_string().contains("left unreplaced"),
                    "identity's placeholders are replaced"
                );
                let train_cfg = cfg(name, objective, &sets, &format!("{few}{media}"));
                let losses = train2(work_dir, name, &train_cfg);
                println!("{name}: 2 steps, losses {losses:?} ({:.1?})", t0.elapsed());
            });
        }
    });
    // The tool-call file needs a chat template that reads `tools` (Qwen2-Instruct's and
    // Qwen2-VL's have none: every such row is refused by name): a tiny Qwen2 whose tokenizer
    // carries Qwen2.5-Instruct's template (TRL's copy) checks and trains on it.
    let tools_tok = work.0.join("qwen25-tokenizer");
    std::fs::create_dir_all(&tools_tok).unwrap();
    let qwen2 = qwen2_tokenizer();
    std::fs::copy(qwen2.join("tokenizer.json"), tools_tok.join("tokenizer.json")).unwrap();
    let trl = run_python(&[
        std::ffi::OsStr::new("-c"),
        std::ffi::OsStr::new("import trl, os; print(os.path.dirname(trl.__file__))"),
    ]);
    let template = std::fs::read_to_string(
        PathBuf::from(stdout(&trl).trim()).join("chat_templates/qwen2_5.jinja"),
    )
    .unwrap();
    let mut tok_config: Value = serde_json::from_str(
        &std::fs::read_to_string(qwen2.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    tok_config["chat_template"] = Value::String(template);
    std::fs::write(tools_tok.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
    let tools_model = work.0.join("qwen25");
    init_tiny_model(&tools_tok, &tools_model, 3);
    let glaive = |name: &str, extra: &str| {
        config(
            &work.0,
            &tools_model,
            name,
            &format!(
                "objective: {{plugin: sft}}\n\
                 data: {{dataset_dir: {}, datasets: [glaive_toolcall_en_demo]{extra}}}\n\
                 training: {{max_steps: 2, micro_batch_size: 2, progress_bar: false}}\n",
                data.display()
            ),
        )
    };
    let report = check(&glaive("glaive-check", ", cutoff_len: 1024"));
    let per = datasets(&report);
    println!("glaive_toolcall_en_demo: data check {per:?} ({:.1?})", t0.elapsed());
    // Every row renders with its tools; a row too long for cutoff_len is skipped, not an error.
    let (name, rows, usable, errors) = per[0].clone();
    assert_eq!((name.as_str(), rows, errors, per.len()), ("glaive_toolcall_en_demo", 300, 0, 1));
    assert!(usable >= 295, "{per:?}, skipped {}", report["skipped"]);
    let losses = train2(&work.0, "glaive", &glaive("glaive", ", cutoff_len: 1024, max_samples: 4"));
    println!("glaive_toolcall_en_demo: 2 steps, losses {losses:?} ({:.1?})", t0.elapsed());
}
