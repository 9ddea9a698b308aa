//! Parity of the built quantizer plugins (`nf4`, `int8`) and the `lora` plugin's LoftQ
//! initialisation with bitsandbytes 0.50 and peft 0.21, through the host's plugin registry.
//!
//! `tests/python/quant_reference.py` (cached in `target/quant-reference/`) quantizes a few
//! weights with bitsandbytes and runs peft's `loftq_init`; this test quantizes the same
//! weights with the plugins and checks:
//! * NF4: packed codes and absmax constants identical to `quantize_4bit`, and with double
//!   quantization the 8-bit absmax codes, their absmax and the offset identical to
//!   bitsandbytes' nearest-code (`default`) kernel; dequantized values equal (f32 and bf16);
//! * int8: codes and row absmax equal `int8_vectorwise_quant`, dequantized values equal, and
//!   the round-trip error is at most half a step (absmax / 254) per row;
//! * LoftQ: ‖W − (Q + B·A)‖ after 1, 2 and 3 iterations falls and equals peft's to 1e-4
//!   relative; after one iteration Q is bitsandbytes' NF4 of W exactly.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::model::linear::FrozenLinear;
use ferrotune_plugin_api::{AdapterMethod, QuantizedWeight, Quantizer};
use ferrotune_tests::*;
use tch::{Kind, Tensor};

/// The weights the reference quantizes with NF4.
const NF4_CASES: &[&str] = &["full", "odd", "many", "bf16", "zero_block", "cols160"];

fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    one_torch_thread();
    DIR.get_or_init(|| cached_reference("quant_reference.py", "quant-reference"))
}

fn read(file: &str) -> HashMap<String, Tensor> {
    let path = reference().join(file);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    map.get(key).unwrap_or_else(|| panic!("reference lacks `{key}`"))
}

fn quantize(plugin: &str, config: &str, weight: &Tensor) -> Box<dyn QuantizedWeight> {
    let registry = registry();
    let q = registry.quantizer(plugin, config).unwrap_or_else(|e| panic!("{plugin} {config}: {e}"));
    q.quantize("proj", weight).unwrap_or_else(|e| panic!("{plugin}: {e}"))
}

fn state(q: &dyn QuantizedWeight) -> HashMap<String, Tensor> {
    q.state_dict().unwrap().into_iter().collect()
}

/// Number of elements where `a` and `b` differ (compared as f64), after checking the shapes
/// (flattened) agree.
fn mismatches(what: &str, a: &Tensor, b: &Tensor) -> i64 {
    let (a, b) = (a.reshape([-1]).to_kind(Kind::Double), b.reshape([-1]).to_kind(Kind::Double));
    assert_eq!(a.size(), b.size(), "{what}: sizes differ");
    a.ne_tensor(&b).sum(Kind::Int64).int64_value(&[])
}

fn assert_identical(what: &str, ours: &Tensor, theirs: &Tensor) {
    let n = mismatches(what, ours, theirs);
    assert_eq!(n, 0, "{what}: {n} of {} values differ from bitsandbytes'", theirs.numel());
}

#[test]
fn nf4_state_and_dequantized_values_equal_bitsandbytes() {
    let inputs = read("inputs.safetensors");
    let want = read("nf4.safetensors");
    for case in NF4_CASES {
        let w = get(&inputs, case);
        // plain absmax
        let q = quantize("nf4", r#"{"double_quant": false}"#, w);
        let s = state(q.as_ref());
        assert_identical(
            &format!("{case}: packed codes"),
            get(&s, "weight"),
            get(&want, &format!("{case}.packed")),
        );
        assert_identical(
            &format!("{case}: absmax"),
            get(&s, "weight.absmax"),
            get(&want, &format!("{case}.absmax")),
        );
        let deq = q.dequantize(w.kind()).unwrap();
        assert_eq!(deq.kind(), w.kind());
        assert_eq!(deq.size(), w.size());
        assert_identical(
            &format!("{case}: dequantized"),
            &deq,
            get(&want, &format!("{case}.dequant")),
        );

        // double quantization (the default)
        let q = quantize("nf4", "{}", w);
        let s = state(q.as_ref());
        assert_identical(
            &format!("{case}: packed codes (double quant)"),
            get(&s, "weight"),
            get(&want, &format!("{case}.packed")),
        );
        for (ours, theirs) in [
            ("weight.absmax", "dq.absmax"),
            ("weight.nested_absmax", "dq.nested_absmax"),
            ("weight.nested_offset", "dq.offset"),
        ] {
            assert_identical(
                &format!("{case}: {ours}"),
                get(&s, ours),
                get(&want, &format!("{case}.{theirs}")),
            );
        }
        let deq = q.dequantize(w.kind()).unwrap();
        assert_identical(
            &format!("{case}: dequantized (double quant)"),
            &deq,
            get(&want, &format!("{case}.dq.dequant")),
        );
        // 4 bits a value plus 8-bit constants: about half a byte a value
        let bytes = q.storage_bytes().unwrap();
        let n = w.numel() as f64;
        assert!(
            (bytes as f64) < n / 2.0 + n / 64.0 + 3.0 * 4.0 + 4.0 * (n / 64.0 / 256.0).ceil() + 1.0,
            "{case}: {bytes} bytes for {n} values"
        );
    }
}

#[test]
fn int8_matches_bitsandbytes_and_round_trips_within_half_a_step() {
    let inputs = read("inputs.safetensors");
    let want = read("int8.safetensors");
    let w = get(&inputs, "int8_w");
    let q = quantize("int8", "{}", w);
    let s = state(q.as_ref());
    assert_identical("int8 codes", get(&s, "weight"), get(&want, "q"));
    assert_identical("int8 row absmax (SCB)", get(&s, "SCB"), get(&want, "scb"));
    let deq = q.dequantize(Kind::Float).unwrap();
    assert_identical("int8 dequantized", &deq, get(&want, "dequant"));
    let err = (&deq - w).abs();
    let half_step = w.abs().amax([1i64].as_slice(), true) / 254.0;
    let excess = (&err - &half_step * (1.0 + 1e-5)).max().double_value(&[]);
    assert!(excess <= 0.0, "int8 round trip exceeds half a step by {excess:e}");
    let worst = err.max().double_value(&[]);
    assert!(worst > 0.0, "a round trip without error means nothing was quantized");
}

#[test]
fn loftq_error_falls_with_iterations_and_equals_peft() {
    let inputs = read("inputs.safetensors");
    let want = read("loftq.safetensors");
    let w = get(&inputs, "loftq_w");
    let registry = registry();
    let mut errors = Vec::new();
    for k in 1..=3 {
        let config = format!(
            r#"{{"r": 4, "lora_alpha": 4, "target_modules": ["proj"], "init_lora_weights": "loftq", "loftq_config": {{"loftq_bits": 4, "loftq_iter": {k}}}}}"#
        );
        let method = registry.adapter("lora", &config).unwrap_or_else(|e| panic!("{config}: {e}"));
        let base = FrozenLinear::new("proj", w.copy(), None);
        let layer = method.adapt_linear("proj", &base).unwrap();
        // the init_rewrites_base contract: the host's base becomes unmerged_weight(W) = Q
        let q = layer.unmerged_weight(w).unwrap();
        let s: HashMap<String, Tensor> = layer.state_dict().unwrap().into_iter().collect();
        let (a, b) = (get(&s, "lora_A.weight"), get(&s, "lora_B.weight"));
        let ours = (w - &q - b.matmul(a)).norm().double_value(&[]);
        let peft = get(&want, &format!("err{k}")).double_value(&[0]);
        let rel = (ours - peft).abs() / peft;
        println!("loftq iter {k}: ours {ours:.6} peft {peft:.6} (relative {rel:.2e})");
        assert!(
            rel < 1e-4,
            "iteration {k}: ||W - (Q + BA)|| {ours} vs peft's {peft} (relative {rel:e})"
        );
        let ba_rel = relative_error(
            &b.matmul(a),
            &get(&want, &format!("b{k}")).matmul(get(&want, &format!("a{k}"))),
        );
        assert!(ba_rel < 1e-3, "iteration {k}: B·A differs from peft's by {ba_rel:e} relative");
        if k == 1 {
            assert_identical("LoftQ Q after one iteration vs peft's", &q, get(&want, "q1"));
        }
        errors.push(ours);
    }
    assert!(
        errors[1] < errors[0] && errors[2] < errors[1],
        "the error does not fall with iterations: {errors:?}"
    );
}
