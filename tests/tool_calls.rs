//! Function-calling rows (LLaMA-Factory's sharegpt `function_call` / `observation` turns and
//! `tools` column) through the `sharegpt` plugin and the host's encoding, against
//! transformers' `apply_chat_template(messages, tools=…)` on Qwen2.5's chat template (Qwen2
//! with tools; `tests/python/toolcall_reference.py` converts the rows itself and writes the
//! tokenizer folder): the same text, the same ids, labels on exactly the assistant's turns
//! and calls. A template without tool support refuses tool rows by name, and the tiny model
//! trains two steps on such rows through the CLI. With LLaMA-Factory's demo data in
//! `../shared/peers/llamafactory/data`, every row of `glaive_toolcall_en_demo.json` is
//! compared too. Needs the built `textdata` plugin, `assets/qwen2-tokenizer` and the
//! reference stack.
use std::path::{Path, PathBuf};

use ferrotune::data::{encode_sample, load_samples, preview, EncodeOptions, IGNORE_INDEX};
use ferrotune::text::Tokenizer;
use ferrotune_plugin_api::{Message, Sample, FUNCTION_CALL_ROLE};
use ferrotune_tests::{
    ferrotune, init_tiny_model, qwen2_tokenizer, read_jsonl, registry, repo_root, run_python,
    stderr, stdout, write_chat_tokenizer, TempDir,
};
use serde_json::{json, Value};

fn turn(from: &str, value: &str) -> Value {
    json!({"from": from, "value": value})
}

/// Tool rows of our own: parallel calls with unsorted argument keys and non-ASCII text, a
/// multi-turn conversation with history calls, one without tools, and one that ends with a
/// call.
fn fixture_rows() -> Vec<Value> {
    let weather = r#"{"name": "weather", "description": "Current weather", "parameters": {"type": "object", "properties": {"zcity": {"type": "string", "description": "City name"}, "aunit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["zcity"]}}"#;
    let clock = r#"{"name": "clock", "description": "Local time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}"#;
    vec![
        json!({"conversations": [
            turn("system", "You route questions to tools."),
            turn("human", "Weather in Zürich and the time in Oslo?"),
            turn("function_call", r#"[{"name": "weather", "arguments": {"zcity": "Zürich", "aunit": "celsius"}}, {"name": "clock", "arguments": {"city": "Oslo"}}]"#),
            turn("observation", r#"{"weather": "4 °C, clear", "clock": "12:30"}"#),
            turn("gpt", "It is 4 °C and clear in Zürich; in Oslo it is 12:30."),
        ], "tools": format!("[{weather}, {clock}]")}),
        json!({"conversations": [
            turn("human", "Hi! Can you tell me the time?"),
            turn("gpt", "Sure, in which city?"),
            turn("human", "Lisbon, please."),
            turn("function_call", r#"{"name": "clock", "arguments": {"city": "Lisbon"}}"#),
            turn("observation", r#"{"time": "09:05", "tz": {"name": "WET", "offset": 0}}"#),
            turn("gpt", "It is 09:05 in Lisbon."),
            turn("human", "Thanks, and the weather there?"),
            turn("function_call", r#"{"name": "weather", "arguments": {"zcity": "Lisbon"}}"#),
            turn("observation", r#"{"weather": "sunny"}"#),
            turn("gpt", "Sunny."),
        ], "system": "Be brief.", "tools": format!("[{clock}, {weather}]")}),
        json!({"conversations": [
            turn("human", "What is 2 + 2?"),
            turn("gpt", "4."),
        ], "tools": ""}),
        json!({"conversations": [
            turn("human", "Time in Kyiv?"),
            turn("function_call", r#"{"name": "clock", "arguments": {"city": "Kyiv"}}"#),
        ], "tools": format!("[{clock}]")}),
    ]
}

/// LLaMA-Factory's glaive demo, where the shared peers folder holds it.
fn glaive_rows() -> Option<Vec<Value>> {
    let path = repo_root().join("../shared/peers/llamafactory/data/glaive_toolcall_en_demo.json");
    let text = std::fs::read_to_string(&path).ok()?;
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Runs the reference on `rows` (written to `work`): the Qwen2.5-template tokenizer folder and
/// transformers' text, ids and labels of each row.
fn reference(work: &Path, rows: &[Value]) -> (PathBuf, Vec<Value>) {
    let rows_file = work.join("reference_rows.json");
    std::fs::write(&rows_file, serde_json::to_string(rows).unwrap()).unwrap();
    let script = repo_root().join("tests/python/toolcall_reference.py");
    let qwen2 = qwen2_tokenizer();
    let out = run_python(&[
        script.as_os_str(),
        qwen2.as_os_str(),
        work.as_os_str(),
        rows_file.as_os_str(),
    ]);
    let cases: Vec<Value> =
        serde_json::from_slice(&out.stdout).expect("toolcall_reference.py prints JSON");
    (work.join("qwen25-tokenizer"), cases)
}

/// The rows of a sharegpt file as the plugin gives them.
fn load(path: &Path) -> Vec<Sample> {
    load_samples(&registry(), "sharegpt", "{}", path, "train").unwrap_or_else(|e| panic!("{e:#}"))
}

fn write_rows(path: &Path, rows: &[Value]) {
    std::fs::write(path, serde_json::to_string_pretty(rows).unwrap()).unwrap();
}

/// The template text of a sample as the encoder renders it.
fn rendered(tok: &Tokenizer, s: &Sample) -> String {
    let extra = match s.extra.get("tools") {
        Some(t) => json!({ "tools": t }),
        None => Value::Null,
    };
    tok.apply_chat_template_with(&s.messages, false, &extra).unwrap()
}

/// The labelled runs of an encoding, as text.
fn runs(tok: &Tokenizer, ids: &[i64], labels: &[i64]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if labels[i] == IGNORE_INDEX {
            i += 1;
            continue;
        }
        let j = (i..ids.len()).find(|&j| labels[j] == IGNORE_INDEX).unwrap_or(ids.len());
        out.push(tok.decode(&ids[i..j], false).unwrap());
        i = j;
    }
    out
}

#[test]
fn tool_rows_render_and_label_as_transformers_on_qwen25() {
    let work = TempDir::new("tool-calls-parity");
    let fixtures = fixture_rows();
    let glaive = glaive_rows();
    let mut rows = fixtures.clone();
    rows.extend(glaive.iter().flatten().cloned());
    let (tok_dir, want) = reference(&work.0, &rows);
    let tok = Tokenizer::from_dir(&tok_dir).unwrap();

    let fixture_file = work.0.join("tools.json");
    write_rows(&fixture_file, &fixtures);
    let mut samples = load(&fixture_file);
    assert_eq!(samples.len(), fixtures.len());
    // The plugin keeps the call as a function-call turn and the tools as their JSON text.
    assert_eq!(samples[0].messages[2].role, FUNCTION_CALL_ROLE);
    assert!(samples[0].extra["tools"].as_str().unwrap().starts_with(r#"[{"name": "weather""#));
    if let Some(g) = &glaive {
        let glaive_file = work.0.join("glaive_toolcall_en_demo.json");
        write_rows(&glaive_file, g);
        samples.extend(load(&glaive_file));
    }
    assert_eq!(samples.len(), want.len());

    let (mut calls, mut labelled_turns, mut failures) = (0, 0, Vec::new());
    for (k, (sample, want)) in samples.iter().zip(&want).enumerate() {
        let text = rendered(&tok, sample);
        let e = encode_sample(
            &tok,
            sample,
            &EncodeOptions { cutoff_len: usize::MAX, ..Default::default() },
        )
        .unwrap_or_else(|e| panic!("row {k}: {e:#}"));
        let ids: Vec<i64> = serde_json::from_value(want["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(want["labels"].clone()).unwrap();
        if text != want["text"].as_str().unwrap() {
            failures.push(format!(
                "row {k}: text differs\n  ours:   {text:?}\n  theirs: {:?}",
                want["text"]
            ));
        } else if e.input_ids != ids {
            failures.push(format!("row {k}: ids differ"));
        } else if e.labels != labels {
            failures.push(format!("row {k}: labels differ\n  ours:   {}", preview(&tok, &e)));
        }
        // Closed form: one labelled run per assistant turn, calls included.
        let turns = sample.messages.iter().filter(|m| m.is_assistant_turn()).count();
        assert_eq!(runs(&tok, &e.input_ids, &e.labels).len(), turns, "row {k}");
        labelled_turns += turns;
        calls += sample.messages.iter().filter(|m| m.role == FUNCTION_CALL_ROLE).count();
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        samples.len(),
        failures.join("\n")
    );

    // What is trained in the parallel-call row, read off the encoding.
    let e = encode_sample(&tok, &samples[0], &EncodeOptions::default()).unwrap();
    assert_eq!(
        runs(&tok, &e.input_ids, &e.labels),
        [
            "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"zcity\": \"Zürich\", \"aunit\": \"celsius\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"clock\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>",
            "It is 4 °C and clear in Zürich; in Oslo it is 12:30.<|im_end|>",
        ]
    );
    // The no-tools row renders Qwen2.5's plain system prompt, the tool rows its tool list.
    assert!(!rendered(&tok, &samples[2]).contains("<tools>"));
    assert!(rendered(&tok, &samples[1]).contains("<tools>\n{\"name\": \"clock\", \"description\""));
    println!(
        "{} rows ({} of glaive_toolcall_en_demo): text, ids and labels equal transformers; {calls} function-call turns, {labelled_turns} labelled turns",
        samples.len(),
        glaive.as_ref().map_or(0, Vec::len),
    );
}

#[test]
fn templates_without_tool_support_refuse_tool_rows_by_name() {
    let work = TempDir::new("tool-calls-refused");
    let chatml = write_chat_tokenizer(&work.0.join("chatml"), 8);
    let tok = Tokenizer::from_dir(chatml.parent().unwrap()).unwrap();
    let sample = |messages: Vec<Message>, tools: Option<&str>| Sample {
        id: Some("tools.json:7".into()),
        messages,
        extra: tools
            .map(|t| [("tools".to_string(), json!(t))].into_iter().collect())
            .unwrap_or_default(),
        ..Default::default()
    };
    let plain = vec![Message::new("user", "w0"), Message::new("assistant", "w1")];
    let with_call = vec![
        Message::new("user", "w0"),
        Message::new(FUNCTION_CALL_ROLE, r#"{"name": "f", "arguments": {}}"#),
        Message::new("tool", "w2"),
        Message::new("assistant", "w1"),
    ];
    let opts = EncodeOptions::default();
    let err =
        |s: &Sample, tok: &Tokenizer| format!("{:#}", encode_sample(tok, s, &opts).unwrap_err());

    let e = err(&sample(plain.clone(), Some(r#"[{"name": "f"}]"#)), &tok);
    assert!(
        e.starts_with("sample tools.json:7: ")
            && e.contains("chatml/tokenizer_config.json")
            && e.contains("chat template `default` never reads `tools`"),
        "{e}"
    );
    let e = err(&sample(with_call.clone(), None), &tok);
    assert!(
        e.starts_with("sample tools.json:7: ") && e.contains("never reads `tool_calls`"),
        "{e}"
    );
    // An empty tool list is no tools, and a plain row encodes as before.
    encode_sample(&tok, &sample(plain.clone(), Some("[]")), &opts).unwrap();
    encode_sample(&tok, &sample(plain, None), &opts).unwrap();
    // Qwen2-Instruct's own template (the generated assets/qwen2-tokenizer) has no tools either:
    // the rows LLaMA-Factory's glaive demo holds are refused instead of losing their tools.
    let qwen2 = Tokenizer::from_dir(&qwen2_tokenizer()).unwrap();
    let e = err(&sample(with_call, Some(r#"[{"name": "f"}]"#)), &qwen2);
    assert!(e.contains("qwen2-tokenizer") && e.contains("never reads `tools`"), "{e}");
}

#[test]
fn tiny_model_trains_two_steps_on_tool_rows() {
    let work = TempDir::new("tool-calls-train");
    let (tok_dir, _) = reference(&work.0, &[]);
    let model = work.0.join("model");
    init_tiny_model(&tok_dir, &model, 5);
    let data = work.0.join("glaive_style.json");
    let rows: Vec<Value> = fixture_rows().into_iter().cycle().take(8).collect();
    write_rows(&data, &rows);
    let out = work.0.join("run");
    let config = format!(
        "model: {model}\noutput_dir: {out}\ndevice: cpu\ndtype: f32\nseed: 3\n\
         adapter: {{plugin: lora, r: 4, lora_alpha: 8, target_modules: all-linear}}\n\
         optimizer: {{lr: 1.0e-3}}\nscheduler: {{type: constant}}\n\
         data: {{plugin: sharegpt, path: {data}, cutoff_len: 1024, eval_ratio: 0.0, shuffle: false}}\n\
         training: {{max_steps: 2, micro_batch_size: 2, logging_steps: 1, progress_bar: false}}\n",
        model = model.display(),
        out = out.display(),
        data = data.display(),
    );
    let path = work.0.join("train.yaml");
    std::fs::write(&path, config).unwrap();
    let o = ferrotune(&["train", path.to_str().unwrap()]);
    assert!(o.status.success(), "train failed:\n{}\n{}", stdout(&o), stderr(&o));
    let losses: Vec<f64> =
        read_jsonl(&out.join("metrics.jsonl")).iter().filter_map(|m| m["loss"].as_f64()).collect();
    println!("2 steps on tool rows (tiny model, Qwen2.5 template): losses {losses:?}");
    assert_eq!(losses.len(), 2, "{losses:?}");
    // A random model over Qwen2's 151k-token vocabulary: the loss starts near ln(vocab).
    assert!(losses.iter().all(|l| l.is_finite() && (8.0..16.0).contains(l)), "{losses:?}");
}
