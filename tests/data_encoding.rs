//! The `alpaca` and `sharegpt` dataset plugins (the built `plugins/textdata` library, loaded
//! through the ABI) and the host's encoding, against transformers.
//!
//! `tests/python/data_reference.py` reads the same files with its own converter, renders
//! each conversation with `AutoTokenizer.apply_chat_template` on the Qwen2 tokenizer
//! (`assets/qwen2-tokenizer`) and labels each assistant turn by prefix rendering; ids,
//! labels and truncation must be equal here, row for row. The other tests check what the
//! plugins report for bad input. Build the plugin first: `cargo build -p ferrotune-textdata`
//! (and `cargo build -p ferrotune` for the CLI check).
use std::path::{Path, PathBuf};

use ferrotune::data::{encode_sample, load_samples, EncodeError, EncodeOptions, IGNORE_INDEX};
use ferrotune::plugins::Registry;
use ferrotune::text::Tokenizer;
use ferrotune_plugin_api::{ImageSource, Message, Sample};
use ferrotune_tests::{
    build_dir, ferrotune, registry, repo_root, run_python, stderr, stdout, temp_dir,
};
use serde_json::{json, Value};

fn textdata() -> Registry {
    let lib = build_dir().join("libferrotune_textdata.so");
    assert!(
        lib.exists(),
        "{} is missing: build it first with `cargo build -p ferrotune-textdata`",
        lib.display()
    );
    registry()
}

fn qwen2() -> PathBuf {
    let dir = repo_root().join("assets/qwen2-tokenizer");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: generate it with `make .stamps/qwen-tokenizer`",
        dir.display()
    );
    dir
}

fn load(reg: &Registry, plugin: &str, config: &str, path: &Path) -> Vec<Sample> {
    load_samples(reg, plugin, config, path, "train").unwrap_or_else(|e| panic!("{e:#}"))
}

/// The full error chain of a failed load.
fn load_err(reg: &Registry, plugin: &str, config: &str, path: &Path) -> String {
    format!(
        "{:#}",
        load_samples(reg, plugin, config, path, "train").expect_err("the load should fail")
    )
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn turn(from: &str, value: &str) -> Value {
    json!({"from": from, "value": value})
}

struct Case {
    name: &'static str,
    format: &'static str,
    file: PathBuf,
    opts: EncodeOptions,
}

#[test]
fn ids_and_labels_equal_transformers() {
    let reg = textdata();
    let tok = Tokenizer::from_dir(&qwen2()).unwrap();
    let work = temp_dir("data-encoding-parity");
    let datasets = repo_root().join("datasets");

    // The alpaca demo again as JSON Lines; the sharegpt demo plus an observation row as a JSON
    // array. (Function calls need a template with tool support: tests/tool_calls.rs.)
    let alpaca_rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(datasets.join("alpaca_demo.json")).unwrap())
            .unwrap();
    let alpaca_jsonl = work.join("alpaca_demo.jsonl");
    write_lines(&alpaca_jsonl, &alpaca_rows);
    let mut sharegpt_rows: Vec<Value> =
        std::fs::read_to_string(datasets.join("sharegpt_demo.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    sharegpt_rows.push(json!({"conversations": [
        turn("human", "What is the weather in Oslo?"),
        turn("gpt", "Let me look it up."),
        turn("observation", r#"{"sky": "clear", "celsius": 4}"#),
        turn("gpt", "It is clear and 4 °C in Oslo."),
    ], "system": "You can call tools."}));
    let sharegpt_json = work.join("sharegpt_tools.json");
    std::fs::write(&sharegpt_json, serde_json::to_string_pretty(&sharegpt_rows).unwrap()).unwrap();

    let default = EncodeOptions::default;
    let cases = [
        Case {
            name: "alpaca_json",
            format: "alpaca",
            file: datasets.join("alpaca_demo.json"),
            opts: default(),
        },
        Case { name: "alpaca_jsonl", format: "alpaca", file: alpaca_jsonl, opts: default() },
        Case {
            name: "alpaca_train_on_prompt",
            format: "alpaca",
            file: datasets.join("alpaca_demo.json"),
            opts: EncodeOptions { train_on_prompt: true, ..default() },
        },
        Case {
            name: "sharegpt_jsonl",
            format: "sharegpt",
            file: datasets.join("sharegpt_demo.jsonl"),
            opts: default(),
        },
        Case {
            name: "sharegpt_json_tools",
            format: "sharegpt",
            file: sharegpt_json,
            opts: default(),
        },
        Case {
            name: "sharegpt_mask_history",
            format: "sharegpt",
            file: datasets.join("sharegpt_demo.jsonl"),
            opts: EncodeOptions { mask_history: true, ..default() },
        },
        Case {
            name: "sharegpt_cutoff_45_mask_history",
            format: "sharegpt",
            file: datasets.join("sharegpt_demo.jsonl"),
            opts: EncodeOptions { cutoff_len: 45, mask_history: true, ..default() },
        },
    ];
    let spec: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"name": c.name, "format": c.format, "file": c.file, "cutoff_len": c.opts.cutoff_len,
                   "mask_history": c.opts.mask_history, "train_on_prompt": c.opts.train_on_prompt})
        })
        .collect();
    let spec_file = work.join("cases.json");
    std::fs::write(&spec_file, serde_json::to_string(&spec).unwrap()).unwrap();
    let script = repo_root().join("tests/python/data_reference.py");
    let qwen = qwen2();
    let out = run_python(&[script.as_os_str(), qwen.as_os_str(), spec_file.as_os_str()]);
    let reference: Value =
        serde_json::from_slice(&out.stdout).expect("data_reference.py prints JSON");

    let mut failures = Vec::new();
    let (mut truncated, mut unlabelled, mut compared) = (0, 0, 0);
    for case in &cases {
        let samples = load(&reg, case.format, "{}", &case.file);
        let theirs = reference[case.name].as_array().unwrap();
        assert_eq!(samples.len(), theirs.len(), "{}: row count", case.name);
        for (sample, want) in samples.iter().zip(theirs) {
            let id = sample.id.clone().unwrap();
            let ours = encode_sample(&tok, sample, &case.opts);
            compared += 1;
            match (ours, want.get("error")) {
                (Err(e), Some(_))
                    if matches!(
                        e.downcast_ref::<EncodeError>(),
                        Some(EncodeError::NoLabelTokens { .. })
                    ) =>
                {
                    unlabelled += 1
                }
                (Err(e), _) => failures.push(format!(
                    "{}: {id}: ferrotune failed: {e:#}; transformers: {want}",
                    case.name
                )),
                (Ok(e), Some(_)) => failures.push(format!(
                    "{}: {id}: transformers has no labels, ferrotune has {}",
                    case.name,
                    e.num_label_tokens()
                )),
                (Ok(e), None) => {
                    let ids: Vec<i64> = serde_json::from_value(want["input_ids"].clone()).unwrap();
                    let labels: Vec<i64> = serde_json::from_value(want["labels"].clone()).unwrap();
                    let from: Option<usize> =
                        serde_json::from_value(want["truncated_from"].clone()).unwrap();
                    truncated += usize::from(from.is_some());
                    if e.input_ids != ids {
                        failures.push(format!(
                            "{}: {id}: ids differ\n  ours:   {:?}\n  theirs: {ids:?}",
                            case.name, e.input_ids
                        ));
                    } else if e.labels != labels {
                        let mask = |l: &[i64]| {
                            l.iter()
                                .map(|&x| if x == IGNORE_INDEX { '.' } else { '#' })
                                .collect::<String>()
                        };
                        failures.push(format!(
                            "{}: {id}: labels differ\n  ours:   {}\n  theirs: {}",
                            case.name,
                            mask(&e.labels),
                            mask(&labels)
                        ));
                    } else if e.truncated_from != from {
                        failures.push(format!(
                            "{}: {id}: truncated_from {:?} vs {from:?}",
                            case.name, e.truncated_from
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} encodings differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The cutoff case exercises both outcomes of truncation.
    assert!(
        truncated > 0 && unlabelled > 0,
        "cutoff case too weak: {truncated} truncated, {unlabelled} without labels"
    );
    assert_eq!(compared, 40 * 3 + 20 * 3 + 21);
}

#[test]
fn json_and_jsonl_read_alike_and_ids_name_the_row() {
    let reg = textdata();
    let work = temp_dir("data-encoding-formats");
    let json_file = repo_root().join("datasets/alpaca_demo.json");
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    let jsonl = work.join("a.jsonl");
    write_lines(&jsonl, &rows);
    let from_json = load(&reg, "alpaca", "{}", &json_file);
    let from_jsonl = load(&reg, "alpaca", "{}", &jsonl);
    assert_eq!(from_json.len(), 40);
    let strip =
        |s: &[Sample]| s.iter().map(|s| Sample { id: None, ..s.clone() }).collect::<Vec<_>>();
    assert_eq!(strip(&from_json), strip(&from_jsonl));
    assert_eq!(
        from_json[3].id.as_deref(),
        Some(format!("{}: record [3]", json_file.display()).as_str())
    );
    assert_eq!(from_jsonl[3].id.as_deref(), Some(format!("{}:4", jsonl.display()).as_str()));
    // alpaca's row 2: history pair, then instruction + "\n" + input.
    let m = &from_json[2].messages;
    assert_eq!(
        m.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
        ["user", "assistant", "user", "assistant"]
    );
    assert_eq!(m[2].content, "Subtract the second number from the first.\n42 and 17");
    // A folder reads its .json and .jsonl files in name order.
    std::fs::copy(&json_file, work.join("b.json")).unwrap();
    assert_eq!(load(&reg, "alpaca", "{}", &work).len(), 80);
}

#[test]
fn malformed_json_lines_name_file_and_line() {
    let reg = textdata();
    let f = temp_dir("data-encoding-malformed").join("broken.jsonl");
    std::fs::write(
        &f,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"output\": \n",
    )
    .unwrap();
    let e = load_err(&reg, "alpaca", "{}", &f);
    assert!(e.contains(&format!("{}:3: not valid JSON", f.display())), "{e}");
    assert!(e.contains("skip_bad_rows"), "the error should say how to skip: {e}");
    // A JSON array with a syntax error names its line and column.
    let a = f.with_extension("json");
    std::fs::write(&a, "[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"c\" \"output\": \"d\"}\n]\n").unwrap();
    let e = load_err(&reg, "alpaca", "{}", &a);
    assert!(
        e.contains(&format!("{}:3:", a.display())) && e.contains("not a valid JSON array"),
        "{e}"
    );
}

#[test]
fn skip_bad_rows_counts_and_reports() {
    let reg = textdata();
    let f = temp_dir("data-encoding-skip").join("mixed.jsonl");
    let good = json!({"conversations": [turn("human", "Hi"), turn("gpt", "Hello!")]});
    let lines = [
        good.to_string(),
        "{\"conversations\": [".to_string(), // not JSON
        json!({"conversations": [turn("human", "a"), turn("human", "b")]}).to_string(), // wrong role
        json!({"conversations": [turn("human", "a"), turn("gpt", "")]}).to_string(), // empty answer
        good.to_string(),
        json!({"conversations": [turn("human", "a"), turn("gpt", "b"), turn("human", "c")]})
            .to_string(), // ends on a user turn
    ];
    std::fs::write(&f, lines.join("\n")).unwrap();
    let e = load_err(&reg, "sharegpt", "{}", &f);
    assert!(e.contains(&format!("{}:2: not valid JSON", f.display())), "{e}");
    let samples = load(&reg, "sharegpt", r#"{"skip_bad_rows": true}"#, &f);
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1].id.as_deref(), Some(format!("{}:5", f.display()).as_str()));
    // The count reaches the user on stderr (here through the CLI, which opens the data set).
    let out = ferrotune(&[
        "data",
        "preview",
        "--model",
        qwen2().to_str().unwrap(),
        "--dataset",
        "sharegpt",
        "--data",
        f.to_str().unwrap(),
        "--config",
        r#"{"skip_bad_rows": true}"#,
        "--n",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "textdata: sharegpt: skipped 4 of 6 rows of {} (skip_bad_rows)",
            f.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}:3: `conversations[1]`: role `human` where `gpt` or `function_call` was expected",
            f.display()
        )),
        "{err}"
    );
    let text = stdout(&out);
    assert!(
        text.starts_with("2 samples in")
            && text.contains("<|im_start|>assistant\n«Hello!<|im_end|>»\n"),
        "{text}"
    );
}

#[test]
fn empty_assistant_turns_are_errors() {
    let reg = textdata();
    let dir = temp_dir("data-encoding-empty");
    let s = dir.join("s.jsonl");
    write_lines(
        &s,
        &[
            json!({"conversations": [turn("human", "a"), turn("gpt", "b"), turn("human", "c"), turn("gpt", "")]}),
        ],
    );
    let e = load_err(&reg, "sharegpt", "{}", &s);
    assert!(
        e.contains(&format!("{}:1: `conversations[3]`: empty assistant turn", s.display())),
        "{e}"
    );
    let a = dir.join("a.json");
    std::fs::write(
        &a,
        r#"[{"instruction": "x", "output": "y"}, {"instruction": "x", "output": ""}]"#,
    )
    .unwrap();
    let e = load_err(&reg, "alpaca", "{}", &a);
    assert!(
        e.contains(&format!("{}: record [1]: empty assistant turn (column `output`)", a.display())),
        "{e}"
    );
}

#[test]
fn unknown_config_keys_are_named() {
    let reg = textdata();
    let e = reg
        .dataset("alpaca", r#"{"columns": {"instructions": "q"}}"#)
        .err()
        .expect("unknown column key")
        .to_string();
    assert!(e.contains("unknown field `instructions`") && e.contains("columns"), "{e}");
    let e = reg
        .dataset("sharegpt", r#"{"skip_bad_row": true}"#)
        .err()
        .expect("unknown top-level key")
        .to_string();
    assert!(e.contains("unknown field `skip_bad_row`"), "{e}");
    let e = reg
        .dataset("sharegpt", r#"{"tags": {"user": "human"}}"#)
        .err()
        .expect("unknown tag key")
        .to_string();
    assert!(e.contains("unknown field `user`") && e.contains("tags"), "{e}");
    let e = reg
        .dataset("alpaca", r#"{"ranking": true, "columns": {"chosen": null}}"#)
        .err()
        .expect("ranking needs chosen")
        .to_string();
    assert!(e.contains("config key `columns.chosen`"), "{e}");
}

#[test]
fn truncation_is_reported() {
    let reg = textdata();
    let tok = Tokenizer::from_dir(&qwen2()).unwrap();
    let samples = load(&reg, "alpaca", "{}", &repo_root().join("datasets/alpaca_demo.json"));
    let whole = encode_sample(&tok, &samples[0], &EncodeOptions::default()).unwrap();
    let n = whole.input_ids.len();
    let cut = encode_sample(
        &tok,
        &samples[0],
        &EncodeOptions { cutoff_len: n - 3, ..Default::default() },
    )
    .unwrap();
    assert_eq!((cut.truncated_from, cut.input_ids.len()), (Some(n), n - 3));
    assert_eq!(cut.labels[..], whole.labels[..n - 3]);
    let e =
        encode_sample(&tok, &samples[0], &EncodeOptions { cutoff_len: 10, ..Default::default() })
            .unwrap_err();
    assert!(
        matches!(e.downcast_ref::<EncodeError>(), Some(EncodeError::NoLabelTokens { truncated_from: Some(m), .. }) if *m == n),
        "{e:#}"
    );
    let id = samples[0].id.clone().unwrap();
    assert!(e.to_string().contains(&id) && e.to_string().contains("cutoff_len 10"), "{e}");
}

#[test]
fn preference_kto_and_images_cross_the_boundary() {
    let reg = textdata();
    let f = temp_dir("data-encoding-pref").join("pref.jsonl");
    write_lines(
        &f,
        &[
            json!({"conversations": [turn("human", "<image>What is shown?")], "images": ["imgs/cat.png"],
                 "chosen": turn("gpt", "A cat."), "rejected": turn("gpt", "A dog."), "kto_tag": true}),
        ],
    );
    let s = &load(&reg, "sharegpt", r#"{"ranking": true}"#, &f)[0];
    assert_eq!(s.messages, vec![Message::new("user", "<image>What is shown?")]);
    assert_eq!(
        (s.chosen.clone().unwrap().content, s.rejected.clone().unwrap().content),
        ("A cat.".into(), "A dog.".into())
    );
    assert_eq!(s.label, Some(true));
    // Relative image paths are joined to the data file's folder.
    let want = f.parent().unwrap().join("imgs/cat.png").display().to_string();
    assert_eq!(s.images, vec![ImageSource::Path(want)]);
    let e = load_err(&reg, "sharegpt", "{}", &f);
    assert!(e.contains("ends with a `human` or `observation` turn"), "{e}");
}
