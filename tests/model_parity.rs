//! The Llama-family decoder against transformers: tiny random Llama / Qwen2 / Mistral
//! checkpoints built by `tests/python/make_parity_models.py` (tied and untied heads, GQA, MQA,
//! biases, llama3 and linear RoPE, sliding windows, a sharded bf16 checkpoint, a 4.x-style
//! config.json), compared on fp32 logits (no padding and left padding), greedy generations
//! (single prompts and a left-padded batch), seeded sampling and the logits warpers; and a
//! directory written by `write_random_model` loaded by transformers.
use ferrotune::model::ForwardArgs;
use ferrotune::peft::PeftModel;
use std::path::{Path, PathBuf};

use ferrotune::generate::{generate, generate_with_stats, warp_logits, SamplingParams};
use ferrotune::model::config::Architecture;
use ferrotune::model::{CausalLM, InitOptions};
use ferrotune_tests::{parity_models, relative_error, run_python, temp_dir, write_tiny_tokenizer};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const CASES: [&str; 5] = [
    "qwen2-tied",
    "qwen2-untied-swa",
    "llama-gqa-sharded-bf16",
    "llama3-rope-bias",
    "mistral-swa-linear-oldcfg",
];
const TOLERANCE: f64 = 1e-4;

fn json(path: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn tensor2(rows: &[Vec<i64>]) -> Tensor {
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}

fn reference_logits(dir: &Path, case: &str) -> (Tensor, Tensor) {
    let tensors = Tensor::read_safetensors(dir.join(format!("{case}.logits.safetensors"))).unwrap();
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).unwrap().1.shallow_clone();
    (get("full"), get("padded"))
}

fn load(dir: &Path, case: &str) -> PeftModel {
    CausalLM::load(&dir.join(case), Device::Cpu, Kind::Float)
        .map(PeftModel::new)
        .unwrap_or_else(|e| panic!("{case}: {e:#}"))
}

/// Logits at the positions where `mask` is 1, flattened.
fn unpadded(logits: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.ne(0).unsqueeze(-1).expand_as(logits);
    logits.masked_select(&m)
}

#[test]
fn logits_match_transformers() {
    let dir = parity_models();
    let inputs = json(&dir.join("inputs.json"));
    let full_ids = tensor2(&ids(&inputs["full_ids"]));
    let padded_ids = tensor2(&ids(&inputs["padded_ids"]));
    let padded_mask = tensor2(&ids(&inputs["padded_mask"]));
    for case in CASES {
        let model = load(&dir, case);
        let (want_full, want_padded) = reference_logits(&dir, case);
        let full = model.forward(ForwardArgs::ids(&full_ids)).unwrap();
        assert_eq!(full.kind(), Kind::Float);
        let err_full = relative_error(&full, &want_full);
        let padded = model.forward(ForwardArgs::ids(&padded_ids).mask(Some(&padded_mask))).unwrap();
        let err_padded =
            relative_error(&unpadded(&padded, &padded_mask), &unpadded(&want_padded, &padded_mask));
        assert!(
            padded.isfinite().all().int64_value(&[]) == 1,
            "{case}: padding rows must stay finite"
        );
        eprintln!("{case}: max relative logit error {err_full:.2e} (no padding), {err_padded:.2e} (left padding)");
        assert!(err_full <= TOLERANCE, "{case}: relative error {err_full:e} > {TOLERANCE:e}");
        assert!(
            err_padded <= TOLERANCE,
            "{case}: relative error with padding {err_padded:e} > {TOLERANCE:e}"
        );
    }
}

#[test]
fn kv_cache_steps_match_the_full_forward() {
    let dir = parity_models();
    let inputs = json(&dir.join("inputs.json"));
    let full_ids = tensor2(&ids(&inputs["full_ids"]));
    let padded_ids = tensor2(&ids(&inputs["padded_ids"]));
    let padded_mask = tensor2(&ids(&inputs["padded_mask"]));
    for case in CASES {
        let model = load(&dir, case);
        let (want_full, want_padded) = reference_logits(&dir, case);
        // No mask: a 5-token prefix, then chunks of 1, 2, 1, 3 tokens.
        let mut cache = model.new_cache(3);
        let mut parts = Vec::new();
        let mut start = 0;
        for len in [5, 1, 2, 1, 3] {
            parts.push(
                model
                    .forward(
                        ForwardArgs::ids(&full_ids.narrow(1, start, len)).cache(Some(&mut cache)),
                    )
                    .unwrap(),
            );
            start += len;
        }
        assert_eq!(cache.seq_len(), 12);
        let err = relative_error(&Tensor::cat(&parts, 1), &want_full);
        // Left padding: prefix of 6 columns, then one token at a time with the growing mask.
        let mut cache = model.new_cache(3);
        let mut parts = vec![model
            .forward(
                ForwardArgs::ids(&padded_ids.narrow(1, 0, 6))
                    .mask(Some(&padded_mask.narrow(1, 0, 6)))
                    .cache(Some(&mut cache)),
            )
            .unwrap()];
        for t in 6..padded_ids.size()[1] {
            parts.push(
                model
                    .forward(
                        ForwardArgs::ids(&padded_ids.narrow(1, t, 1))
                            .mask(Some(&padded_mask.narrow(1, 0, t + 1)))
                            .cache(Some(&mut cache)),
                    )
                    .unwrap(),
            );
        }
        let got = Tensor::cat(&parts, 1);
        let err_padded =
            relative_error(&unpadded(&got, &padded_mask), &unpadded(&want_padded, &padded_mask));
        eprintln!("{case}: cached steps vs transformers: {err:.2e} (no padding), {err_padded:.2e} (left padding)");
        assert!(err <= TOLERANCE && err_padded <= TOLERANCE, "{case}: {err:e} / {err_padded:e}");
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let dir = parity_models();
    let inputs = json(&dir.join("inputs.json"));
    let new_tokens = inputs["new_tokens"].as_u64().unwrap() as usize;
    let params = SamplingParams {
        pad_token_id: inputs["pad_token_id"].as_i64().unwrap(),
        ..SamplingParams::greedy(new_tokens)
    };
    for case in CASES {
        let model = load(&dir, case);
        let want = json(&dir.join(format!("{case}.generations.json")));
        let mut matched = 0;
        for (prompt, expected) in
            ids(&inputs["single_prompts"]).iter().zip(ids(&want["greedy_single"]))
        {
            let got = generate(&model, std::slice::from_ref(prompt), &params).unwrap();
            assert_eq!(
                got[0],
                expected,
                "{case}: greedy tokens of a single prompt of {} tokens",
                prompt.len()
            );
            matched += got[0].len();
        }
        let batch = ids(&inputs["batch_prompts"]);
        let got = generate_with_stats(&model, &batch, &params).unwrap();
        assert_eq!(
            got.tokens,
            ids(&want["greedy_batch"]),
            "{case}: greedy tokens of the left-padded batch"
        );
        matched += got.tokens.iter().map(Vec::len).sum::<usize>();
        let s = &got.stats;
        assert_eq!(s.prefill_tokens, batch.iter().map(Vec::len).sum::<usize>());
        assert_eq!(
            (s.decode_steps, s.decode_tokens),
            (new_tokens - 1, batch.len() * (new_tokens - 1))
        );
        eprintln!(
            "{case}: {matched} greedy tokens identical to transformers (min top-1/top-2 gap {:.1e}); batch of {}: \
             prefill {:.0} tok/s, decode {:.0} tok/s",
            want["min_greedy_gap"].as_f64().unwrap(),
            batch.len(),
            s.prefill_tokens_per_second(),
            s.decode_tokens_per_second()
        );
    }
}

#[test]
fn generation_stops_each_row_at_its_eos() {
    let dir = parity_models();
    let inputs = json(&dir.join("inputs.json"));
    let case = "qwen2-tied";
    let model = load(&dir, case);
    let want = ids(&json(&dir.join(format!("{case}.generations.json")))["greedy_batch"]);
    // An "eos" that row 0 produces at step 3: row 0 must stop there, the other rows at their
    // own first occurrence of it (or run the full length), each equal to the reference prefix.
    let eos = want[0][3];
    let params =
        SamplingParams { eos_token_ids: vec![-7, eos], ..SamplingParams::greedy(want[0].len()) };
    let got = generate(&model, &ids(&inputs["batch_prompts"]), &params).unwrap();
    for (row, (g, w)) in got.iter().zip(&want).enumerate() {
        let stop = w.iter().position(|&t| t == eos).unwrap_or(w.len());
        assert_eq!(g, &w[..stop], "row {row} with eos {eos}");
    }
    assert_eq!(got[0].len(), want[0].iter().position(|&t| t == eos).unwrap());
}

#[test]
fn seeded_sampling() {
    let dir = parity_models();
    let inputs = json(&dir.join("inputs.json"));
    let s = &inputs["sample"];
    let batch = ids(&inputs["batch_prompts"]);
    let params = SamplingParams {
        max_new_tokens: inputs["new_tokens"].as_u64().unwrap() as usize,
        temperature: s["temperature"].as_f64().unwrap(),
        top_k: s["top_k"].as_u64().unwrap() as usize,
        top_p: s["top_p"].as_f64().unwrap(),
        seed: s["seed"].as_u64().unwrap(),
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    for case in CASES {
        let model = load(&dir, case);
        let first = generate(&model, &batch, &params).unwrap();
        let again = generate(&model, &batch, &params).unwrap();
        assert_eq!(first, again, "{case}: the same seed must give the same tokens");
        let other =
            generate(&model, &batch, &SamplingParams { seed: params.seed + 1, ..params.clone() })
                .unwrap();
        assert_ne!(first, other, "{case}: another seed should give other tokens");
        // libtorch's generator and multinomial are PyTorch's: the same seed draws the same tokens.
        let want = ids(&json(&dir.join(format!("{case}.generations.json")))["sampled_batch"]);
        assert_eq!(
            first, want,
            "{case}: sampled tokens differ from transformers' with the same seed"
        );
    }
}

#[test]
fn logits_warpers_match_transformers() {
    let dir = parity_models();
    let tensors = Tensor::read_safetensors(dir.join("warpers.safetensors")).unwrap();
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).unwrap().1.shallow_clone();
    let scores = get("scores");
    for (tag, t, k, p) in [
        ("t07_k10_p08", 0.7, 10, 0.8),
        ("t1_k0_p05", 1.0, 0, 0.5),
        ("t13_k5_p1", 1.3, 5, 1.0),
        ("t1_k3_p099", 1.0, 3, 0.99),
    ] {
        let want = get(tag);
        let got = warp_logits(&scores, t, k, p).unwrap();
        assert!(
            got.isfinite().eq_tensor(&want.isfinite()).all().int64_value(&[]) == 1,
            "{tag}: kept tokens differ"
        );
        let keep = want.isfinite();
        let err = relative_error(&got.masked_select(&keep), &want.masked_select(&keep));
        assert!(err < 1e-6, "{tag}: {err}");
    }
}

#[test]
fn bf16_weights_and_compute() {
    let dir = parity_models();
    let inputs = json(&dir.join("inputs.json"));
    let full_ids = tensor2(&ids(&inputs["full_ids"]));
    let case = "llama-gqa-sharded-bf16";
    let (want, _) = reference_logits(&dir, case);
    let model =
        CausalLM::load(&dir.join(case), Device::Cpu, Kind::BFloat16).map(PeftModel::new).unwrap();
    let got = model.forward(ForwardArgs::ids(&full_ids)).unwrap();
    assert_eq!(got.kind(), Kind::Float, "logits are returned as f32");
    let err = relative_error(&got, &want);
    eprintln!("{case}: bf16 compute vs transformers fp32: relative error {err:.2e}");
    assert!(err < 5e-2, "{err}");
}

#[test]
fn linears_are_named_by_checkpoint_path() {
    let dir = parity_models();
    let model = load(&dir, "qwen2-tied");
    let names: Vec<&str> = model.linears().iter().map(|(n, _)| *n).collect();
    assert_eq!(names.len(), 2 * 7 + 1);
    assert_eq!(
        &names[..7],
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.down_proj"
        ]
    );
    assert_eq!(names[14], "lm_head");
    let (_, q) = model.linears()[0];
    assert!(q.bias.is_some(), "Qwen2 q_proj has a bias");
    assert_eq!((q.out_features(), q.in_features()), (64, 64));
    let (_, head) = model.linears()[14];
    assert_eq!(
        head.weight.data_ptr(),
        model.embed_tokens().data_ptr(),
        "tied lm_head shares the embedding"
    );
    let mut model = model;
    assert_eq!(model.linears_mut().len(), 15);
}

fn write_init_model(
    tag: &str,
    arch: Architecture,
    tie: bool,
    dtype: Kind,
) -> (PathBuf, ferrotune::model::InitReport) {
    ferrotune_tests::one_torch_thread();
    let root = temp_dir(tag);
    let tokenizer = write_tiny_tokenizer(&root.join("tok"), 200);
    let mut opts = InitOptions::preset("tiny", root.join("tok"), root.join("model")).unwrap();
    opts.arch = arch;
    opts.tie_word_embeddings = tie;
    opts.dtype = dtype;
    opts.seed = 3;
    let report = ferrotune::model::write_random_model(&opts).unwrap();
    assert!(tokenizer.is_file());
    (root, report)
}

#[test]
fn init_model_loads_in_transformers_with_the_same_logits() {
    let script = r#"
import sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor([[5, 17, 42, 3, 199, 7, 1, 64], [9, 9, 120, 31, 2, 150, 11, 4]])
with torch.no_grad():
    logits = m(input_ids=ids).logits.float().contiguous()
g = m.generation_config
print("ids", g.bos_token_id, g.eos_token_id, g.pad_token_id, type(m).__name__, m.config.tie_word_embeddings)
save_file({"ids": ids, "logits": logits}, sys.argv[2])
"#;
    for (tag, arch, tie, dtype) in [
        ("init-qwen2", Architecture::Qwen2, true, Kind::Float),
        ("init-llama", Architecture::Llama, false, Kind::BFloat16),
    ] {
        let (root, report) = write_init_model(tag, arch, tie, dtype);
        let dir = report.dir.clone();
        assert_eq!(report.config.vocab_size, 203, "3 special tokens + 200 words");
        assert_eq!(
            (report.bos_token_id, report.eos_token_id, report.pad_token_id),
            (None, Some(1), Some(2))
        );
        for f in [
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(dir.join(f).is_file(), "{f} missing");
        }
        let script_path = root.join("check.py");
        std::fs::write(&script_path, script).unwrap();
        let out_path = root.join("out.safetensors");
        let out = run_python(&[script_path.as_os_str(), dir.as_os_str(), out_path.as_os_str()]);
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("ids "))
            .unwrap()
            .to_string();
        let class =
            if arch == Architecture::Qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
        assert_eq!(line, format!("ids None 1 2 {class} {}", if tie { "True" } else { "False" }));

        let tensors = Tensor::read_safetensors(&out_path).unwrap();
        let get = |name: &str| tensors.iter().find(|(n, _)| n == name).unwrap().1.shallow_clone();
        let model = CausalLM::load(&dir, Device::Cpu, Kind::Float).map(PeftModel::new).unwrap();
        let err =
            relative_error(&model.forward(ForwardArgs::ids(&get("ids"))).unwrap(), &get("logits"));
        eprintln!("{tag}: init-model directory in transformers vs ferrotune: relative logit error {err:.2e}");
        assert!(err <= TOLERANCE, "{tag}: {err}");
        // The seed decides the weights.
        let again = {
            let (_, r) = write_init_model(&format!("{tag}-again"), arch, tie, dtype);
            CausalLM::load(&r.dir, Device::Cpu, Kind::Float).map(PeftModel::new).unwrap()
        };
        assert!(again.embed_tokens().equal(model.embed_tokens()), "same seed, same weights");
        // Transformers' init: N(0, 0.02) weights, the pad row of the embedding zero.
        let std = f64::try_from(model.embed_tokens().std(true)).unwrap();
        assert!((std - 0.02).abs() < 2e-3, "embedding std {std}");
        assert_eq!(
            f64::try_from(model.embed_tokens().get(2).abs().sum(Kind::Float)).unwrap(),
            0.0,
            "pad row"
        );
    }
}
