//! Broken model directories and bad requests are errors that say what is wrong, never panics:
//! a missing, truncated or corrupt checkpoint, a missing shard or tensor, a tensor whose shape
//! disagrees with config.json, an unsupported architecture, a prompt longer than the context.
use ferrotune::model::ForwardArgs;
use std::path::{Path, PathBuf};

use ferrotune::generate::{generate, SamplingParams};
use ferrotune::model::{write_random_model, CausalLM, InitOptions};
use ferrotune::util::safetensors::write as write_safetensors;
use ferrotune_tests::{temp_dir, write_tiny_tokenizer};
use tch::{Device, Kind, Tensor};

/// A fresh tiny model directory (fp32, 64 positions) under a test's temporary folder.
fn tiny_model(tag: &str) -> PathBuf {
    ferrotune_tests::one_torch_thread();
    let root = temp_dir(tag);
    write_tiny_tokenizer(&root.join("tok"), 40);
    let mut opts =
        InitOptions::preset("tiny", root.join("tok/tokenizer.json"), root.join("model")).unwrap();
    opts.dtype = Kind::Float;
    opts.max_position_embeddings = 64;
    write_random_model(&opts).unwrap().dir
}

/// Loads `dir`, expecting an error (a panic fails the test) and returning its full message.
fn load_error(dir: &Path) -> String {
    match CausalLM::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "error message lacks `{p}`:\n{message}");
    }
}

#[test]
fn a_good_directory_loads() {
    let dir = tiny_model("errors-good");
    let model = CausalLM::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let logits =
        model.forward(ForwardArgs::ids(&Tensor::from_slice(&[3i64, 4, 5]).view([1, 3]))).unwrap();
    assert_eq!(logits.size(), [1, 3, 43]);
}

#[test]
fn missing_safetensors() {
    let dir = tiny_model("errors-missing");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_error(&dir);
    assert_mentions(
        &e,
        &["no model.safetensors or model.safetensors.index.json", &dir.display().to_string()],
    );
}

#[test]
fn missing_config() {
    let dir = tiny_model("errors-noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(&load_error(&dir), &["config.json"]);
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_model("errors-truncated");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_error(&dir), &[&file.display().to_string(), "truncated or corrupt"]);
    std::fs::write(&file, &bytes[..4]).unwrap();
    assert_mentions(&load_error(&dir), &[&file.display().to_string(), "truncated or corrupt"]);
}

#[test]
fn corrupt_safetensors() {
    let dir = tiny_model("errors-corrupt");
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8..24].copy_from_slice(b"not a json head!");
    std::fs::write(&file, &bytes).unwrap();
    assert_mentions(&load_error(&dir), &[&file.display().to_string(), "truncated or corrupt"]);
}

#[test]
fn shape_disagrees_with_config() {
    let dir = tiny_model("errors-shape");
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"intermediate_size\": 176", "\"intermediate_size\": 128");
    std::fs::write(&config, text).unwrap();
    let e = load_error(&dir);
    assert_mentions(
        &e,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[176, 64]",
            "[128, 64]",
            "model.safetensors",
            "config.json",
            "intermediate_size",
        ],
    );
}

#[test]
fn missing_tensor() {
    let dir = tiny_model("errors-tensor");
    let file = dir.join("model.safetensors");
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.self_attn.k_proj.bias")
        .collect();
    write_safetensors(&file, &tensors).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model.layers.1.self_attn.k_proj.bias", "missing", "model.safetensors"],
    );
}

#[test]
fn sharded_index_with_a_missing_shard() {
    let dir = tiny_model("errors-shard");
    std::fs::rename(dir.join("model.safetensors"), dir.join("model-00001-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"],
    );
    // With the index pointing at the one shard that holds everything, the model loads.
    let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    CausalLM::load(&dir, Device::Cpu, Kind::Float).unwrap();
}

#[test]
fn unsupported_architecture() {
    let dir = tiny_model("errors-arch");
    let config = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("Qwen2ForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&config, text).unwrap();
    assert_mentions(
        &load_error(&dir),
        &[
            "unsupported architecture `GPT2LMHeadModel`",
            &config.display().to_string(),
            "supported: LlamaForCausalLM",
        ],
    );
}

#[test]
fn unsupported_rope_type_names_the_key() {
    let dir = tiny_model("errors-rope");
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"");
    std::fs::write(&config, text).unwrap();
    assert_mentions(&load_error(&dir), &["rope_parameters.rope_type", "yarn", "config.json"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let dir = tiny_model("errors-context");
    let model = CausalLM::load(&dir, Device::Cpu, Kind::Float)
        .map(ferrotune::peft::PeftModel::new)
        .unwrap();
    let prompts = vec![vec![5i64; 10], vec![6i64; 60]];
    let e = generate(&model, &prompts, &SamplingParams::greedy(8)).unwrap_err().to_string();
    assert_mentions(
        &e,
        &["prompt 1 has 60 tokens", "max_new_tokens 8", "max_position_embeddings", "64"],
    );
    // Fits exactly: 56 + 8 = 64.
    let ok = generate(&model, &[vec![6i64; 56]], &SamplingParams::greedy(8)).unwrap();
    assert_eq!(ok[0].len(), 8);
}

#[test]
fn bad_inputs_are_errors() {
    let dir = tiny_model("errors-inputs");
    let model = CausalLM::load(&dir, Device::Cpu, Kind::Float)
        .map(ferrotune::peft::PeftModel::new)
        .unwrap();
    let ids = Tensor::from_slice(&[3i64, 4, 5]).view([1, 3]);
    let e = model
        .forward(
            ForwardArgs::ids(&ids).mask(Some(&Tensor::ones([1, 2], (Kind::Int64, Device::Cpu)))),
        )
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["attention_mask", "[1, 3]"]);
    let e = model
        .forward(ForwardArgs::ids(&Tensor::from_slice(&[3i64, 400]).view([1, 2])))
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["token id 400", "vocab_size 43"]);
    let e =
        model.forward(ForwardArgs::ids(&Tensor::from_slice(&[3i64, 4]))).unwrap_err().to_string();
    assert_mentions(&e, &["[batch, seq]"]);
    let mut cache = model.new_cache(2);
    let e = model.forward(ForwardArgs::ids(&ids).cache(Some(&mut cache))).unwrap_err().to_string();
    assert_mentions(&e, &["batch 2", "1 rows"]);
    let e = generate(&model, &[vec![]], &SamplingParams::greedy(4)).unwrap_err().to_string();
    assert_mentions(&e, &["prompt 0 is empty"]);
    let e = generate(&model, &[vec![1, 99]], &SamplingParams::greedy(4)).unwrap_err().to_string();
    assert_mentions(&e, &["token id 99", "vocab_size 43"]);
    let e = CausalLM::load(&dir, Device::Cpu, Kind::Int64).err().unwrap().to_string();
    assert_mentions(&e, &["unsupported model dtype"]);
}

#[test]
fn init_model_refuses_bad_options() {
    let root = temp_dir("errors-init");
    let tok = write_tiny_tokenizer(&root.join("tok"), 10);
    let mut opts = InitOptions::preset("tiny", &tok, root.join("m")).unwrap();
    opts.vocab_size = Some(5);
    assert_mentions(
        &write_random_model(&opts).unwrap_err().to_string(),
        &["vocab_size 5", "13 tokens"],
    );
    opts.vocab_size = None;
    opts.num_key_value_heads = 3;
    assert_mentions(
        &write_random_model(&opts).unwrap_err().to_string(),
        &["kv_heads (3) must divide heads (4)"],
    );
    opts.num_key_value_heads = 2;
    opts.tokenizer = root.join("nowhere");
    assert_mentions(
        &write_random_model(&opts).unwrap_err().to_string(),
        &["nowhere", "does not exist"],
    );
    opts.tokenizer = tok;
    write_random_model(&opts).unwrap();
    assert_mentions(
        &write_random_model(&opts).unwrap_err().to_string(),
        &["already holds a model"],
    );
    opts.overwrite = true;
    write_random_model(&opts).unwrap();
}
