//! `ferrotune train` against transformers + peft + torch: the same 20 optimizer steps of LoRA
//! SFT (harness and run in `common/train_parity.rs`). Variants: LoRA, rsLoRA, DoRA (each
//! starting from the adapter peft saved right after `get_peft_model`, through
//! `adapter_init`), and PiSSA (both sides initialise from W by SVD).
//!
//! Also checked: the encoded samples (ids and labels) equal Python's.
//!
//! Needs `cargo build --workspace` (the CLI, `lora`, `sft`, `single`, `alpaca`) and the
//! reference stack (`$PYTHON` or `.venv`). One Python run serves every test.
use std::path::Path;
use std::sync::OnceLock;

use ferrotune_tests::train_parity::{check_variant, prepare, Fixture, Variant};
use ferrotune_tests::*;
use serde_json::{json, Value};

const fn lora(name: &'static str, config: &'static str, from_init: bool) -> Variant {
    Variant {
        name,
        plugin: "lora",
        peft_type: "LORA",
        config,
        from_init,
        steps: 20,
        loss_tol: 1e-4,
    }
}

const VARIANTS: &[Variant] = &[
    lora(
        "lora",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}"#,
        true,
    ),
    lora(
        "rslora",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "use_rslora": true}"#,
        true,
    ),
    lora(
        "dora",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "use_dora": true}"#,
        true,
    ),
    lora(
        "pissa",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "init_lora_weights": "pissa"}"#,
        false,
    ),
];

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| prepare("train-parity", VARIANTS))
}

fn check(name: &str) {
    check_variant(fixture(), VARIANTS, name)
}

#[test]
fn encoded_samples_equal_the_python_encoding() {
    let f = fixture();
    let theirs: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(f.work.join("encoded.json")).unwrap())
            .unwrap();
    let registry = registry();
    let samples =
        ferrotune::data::load_samples(&registry, "alpaca", "{}", &f.data, "train").unwrap();
    let tok = ferrotune::text::Tokenizer::from_dir(&f.model).unwrap();
    assert_eq!(samples.len(), theirs.len());
    for (i, (s, t)) in samples.iter().zip(&theirs).enumerate() {
        let e = ferrotune::data::encode_sample(&tok, s, &Default::default()).unwrap();
        assert_eq!(json!(e.input_ids), t["input_ids"], "sample {i}: ids");
        assert_eq!(json!(e.labels), t["labels"], "sample {i}: labels");
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let read = |dir: &str| std::fs::read(f.work.join(dir).join(file)).unwrap();
        assert_eq!(
            read("model"),
            read("tokenizer"),
            "Python reads {file} from the tokenizer folder, the trainer from the model's copy"
        );
    }
    let pad = |p: &Path| ferrotune::text::Tokenizer::from_dir(p).unwrap().pad_token_id();
    assert_eq!(pad(&f.model), Some(0), "right padding with `<|endoftext|>`, as Python pads");
}

#[test]
fn lora_matches_peft() {
    check("lora");
}

#[test]
fn rslora_matches_peft() {
    check("rslora");
}

#[test]
fn dora_matches_peft() {
    check("dora");
}

#[test]
fn pissa_matches_peft() {
    check("pissa");
}
