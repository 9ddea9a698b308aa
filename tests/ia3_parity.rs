//! The `ia3` adapter plugin against peft 0.21's IA³ on a tiny Qwen2 model made by
//! `ferrotune init-model` (hidden 64, float32), every logits comparison to 1e-5:
//! * we load the PEFT directory peft wrote (`IA3Config` on q/k/v/down_proj with down_proj
//!   feed-forward, every `ia3_l` drawn as 1 + 0.3·N(0, 1)) and compute peft's logits, and
//!   save it back under the same keys and values;
//! * peft loads the PEFT directory we write (same targets, our vectors perturbed) and
//!   computes our logits;
//! * merging equals the unmerged forward for bias-free output-scaled layers (o_proj) and
//!   input-scaled ones (down_proj, up_proj); merging an output-scaled layer with a bias (Qwen2's q/k/v) is refused with the layer's name and
//!   leaves the model as it was.
//!
//! Needs `cargo build --workspace` (the `ia3` plugin) and the reference stack (`$PYTHON` or
//! `.venv`: torch 2.11, transformers 5, peft 0.21); one Python run
//! (`tests/python/ia3_reference.py`) serves the file.
use std::path::Path;

use ferrotune::model::{CausalLM, ForwardArgs};
use ferrotune::peft::PeftModel;
use ferrotune::plugins::Registry;
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

/// Largest accepted |difference| between two logits tensors (float32).
const TOL: f64 = 1e-5;

/// The adapter peft writes and we write (IA3Config / plugin `ia3` keys).
const QKV_DOWN: &str = r#"{"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#;
/// An adapter whose output-scaled layer has no bias (o_proj): it merges.
const MERGEABLE: &str = r#"{"target_modules": ["o_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj", "down_proj"]}"#;

fn ids() -> Tensor {
    Tensor::from_slice(&[3i64, 17, 42, 99, 150, 7, 64, 201, 5, 5, 120, 33, 2, 180, 11, 90])
        .view([2, 8])
}

fn ids_json() -> serde_json::Value {
    let v: Vec<i64> = Vec::try_from(&ids().view([-1])).unwrap();
    serde_json::json!(v.chunks(8).map(|c| c.to_vec()).collect::<Vec<_>>())
}

fn ia3_registry() -> Registry {
    let lib = build_dir().join("libferrotune_ia3.so");
    assert!(lib.exists(), "{} is missing: `cargo build --workspace` first", lib.display());
    registry()
}

fn load(dir: &Path) -> PeftModel {
    CausalLM::load(dir, Device::Cpu, Kind::Float)
        .map(PeftModel::new)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn attach(model: &mut PeftModel, registry: &Registry, config: &str) {
    let method = registry.adapter("ia3", config).unwrap_or_else(|e| panic!("{config}: {e}"));
    let report = model
        .attach_adapter("default", Box::new(method))
        .unwrap_or_else(|e| panic!("{config}: {e:#}"));
    println!("ia3 {config}: {}", report.summary());
}

fn logits(model: &PeftModel) -> Tensor {
    tch::no_grad(|| model.forward(ForwardArgs::ids(&ids()))).unwrap()
}

fn read_logits(path: &Path) -> Tensor {
    let mut v =
        Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v.remove(v.iter().position(|(n, _)| n == "logits").expect("a `logits` tensor")).1
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = max_abs_diff(ours, theirs);
    let scale = theirs.abs().max().double_value(&[]);
    println!("{what:<58} max |diff| {d:.3e} (max |logit| {scale:.3})");
    assert!(d <= TOL, "{what}: max |diff| {d:e} > {TOL:e}");
}

/// The tensors of a PEFT directory, sorted by name.
fn saved(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    v.sort_by(|x, y| x.0.cmp(&y.0));
    v
}

/// Draws every `ia3_l` as 1 + 0.3·N(0, 1), as the reference script does for peft's.
fn perturb(model: &mut PeftModel, seed: i64) {
    tch::manual_seed(seed);
    let state = model
        .adapter_state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.randn_like() * 0.3 + 1.0))
        .collect();
    model.load_adapter_state_dict(state).unwrap();
}

#[test]
fn ia3_matches_peft_both_ways_and_merges() {
    one_torch_thread();
    let work = TempDir::new("ia3-parity");
    let w = &work.0;
    let tokenizer = w.join("tokenizer");
    write_tiny_tokenizer(&tokenizer, 200);
    let base = w.join("base");
    let o = ferrotune(&[
        "init-model",
        "--preset",
        "tiny",
        "--dtype",
        "f32",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        base.to_str().unwrap(),
        "--seed",
        "5",
    ]);
    assert!(o.status.success(), "init-model: {}", stderr(&o));
    let registry = ia3_registry();

    // ours, written before the reference run so that peft can load it
    let ours_dir = w.join("ours");
    let mut ours = load(&base);
    attach(&mut ours, &registry, QKV_DOWN);
    let base_logits = logits(&ours);
    check("ia3_l = 1 at init: the base model", &base_logits, &logits(&load(&base)));
    perturb(&mut ours, 7);
    let ours_logits = logits(&ours);
    assert!(max_abs_diff(&ours_logits, &base_logits) > 1e-2, "our adapter must matter");
    ours.save_peft_adapter(&ours_dir).unwrap();

    let peft_dir = w.join("peft");
    let plan = serde_json::json!({
        "base": base,
        "ids": ids_json(),
        "peft_writes": {"config": serde_json::from_str::<serde_json::Value>(QKV_DOWN).unwrap(),
                        "seed": 11, "dir": peft_dir, "out": w.join("peft.logits.safetensors")},
        "peft_loads": [{"dir": ours_dir, "out": w.join("peft-loads-ours.logits.safetensors")}],
    });
    std::fs::write(w.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/ia3_reference.py");
    let out = run_python(&[script.as_os_str(), w.as_os_str()]);
    println!("{}", stdout(&out).trim());

    // peft loads ours
    check(
        "peft loads our IA³ directory: logits",
        &read_logits(&w.join("peft-loads-ours.logits.safetensors")),
        &ours_logits,
    );

    // we load peft's: the same keys as ours, peft's logits, saved back unchanged
    let mut model = load(&base);
    let report = model
        .load_peft_adapter(&peft_dir, &registry)
        .unwrap_or_else(|e| panic!("peft's IA³ directory: {e:#}"));
    println!("peft's IA³: {}", report.summary());
    let theirs = read_logits(&w.join("peft.logits.safetensors"));
    assert!(max_abs_diff(&theirs, &base_logits) > 1e-2, "peft's adapter must matter");
    check("we load peft's IA³ directory: logits", &logits(&model), &theirs);
    let (peft_saved, ours_saved) = (saved(&peft_dir), saved(&ours_dir));
    let names = |v: &[(String, Tensor)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&peft_saved), names(&ours_saved), "peft's keys are ours");
    assert!(
        peft_saved
            .iter()
            .any(|(k, t)| k == "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
                && t.size()[0] == 1)
            && peft_saved
                .iter()
                .any(|(k, t)| k == "base_model.model.model.layers.0.self_attn.q_proj.ia3_l"
                    && t.size()[1] == 1),
        "feed-forward [1, in], others [out, 1]: {:?}",
        peft_saved.iter().map(|(k, t)| (k, t.size())).collect::<Vec<_>>()
    );
    let resaved = w.join("peft-resaved");
    model.save_peft_adapter(&resaved).unwrap();
    let again = saved(&resaved);
    assert_eq!(names(&again), names(&peft_saved));
    assert!(again.iter().zip(&peft_saved).all(|(x, y)| x.1.equal(&y.1)), "values saved back");

    // merging q/k/v (output scaling over a bias) is refused by name, the model untouched
    let e = format!("{:#}", model.merge_adapter().unwrap_err());
    assert!(e.contains("self_attn.q_proj") && e.contains("bias"), "{e}");
    check("a refused merge leaves the model as it was", &logits(&model), &theirs);

    // a bias-free output scaling and two input scalings merge exactly
    let mut model = load(&base);
    attach(&mut model, &registry, MERGEABLE);
    perturb(&mut model, 13);
    let unmerged = logits(&model);
    assert!(max_abs_diff(&unmerged, &base_logits) > 1e-2, "the adapter must matter");
    let merged = model.merge_adapter().unwrap();
    assert!(
        !merged.is_empty()
            && merged.iter().all(|m| ["o_proj", "up_proj", "down_proj"]
                .iter()
                .any(|t| m.ends_with(&format!(".{t}")))),
        "{merged:?}"
    );
    check("merged IA³ (o_proj, up_proj, down_proj) vs unmerged", &logits(&model), &unmerged);
    drop(work);
}
