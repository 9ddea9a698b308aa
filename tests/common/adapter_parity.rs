//! What the adapter-method parity tests (`ia3_parity`, `vera_parity`, `lycoris_parity`,
//! `prompt_parity`) share: the tiny Qwen2 model and token ids both sides run, loading and
//! attaching on our side, reading the reference's logits and comparing, and editing PEFT
//! directories into hostile ones.
use std::path::{Path, PathBuf};

use ferrotune::model::{CausalLM, ForwardArgs};
use ferrotune::peft::PeftModel;
use ferrotune::plugins::Registry;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::*;

/// Largest accepted |difference| between two logits tensors (float32).
pub const LOGITS_TOL: f64 = 1e-5;

/// The `[2, 8]` token ids both sides compute logits for.
pub fn parity_ids() -> Tensor {
    Tensor::from_slice(&[3i64, 17, 42, 99, 150, 7, 64, 201, 5, 5, 120, 33, 2, 180, 11, 90])
        .view([2, 8])
}

/// [`parity_ids`] as rows, for the reference script's plan.
pub fn parity_ids_rows() -> Vec<Vec<i64>> {
    let v: Vec<i64> = Vec::try_from(&parity_ids().view([-1])).unwrap();
    v.chunks(8).map(|c| c.to_vec()).collect()
}

/// The registry, after checking that the plugin library `lib` (`libferrotune_ia3.so`) is built.
pub fn plugin_registry(lib: &str) -> Registry {
    let path = build_dir().join(lib);
    assert!(path.exists(), "{} is missing: `cargo build --workspace` first", path.display());
    registry()
}

/// A model directory as a [`PeftModel`] (float32, CPU).
pub fn load_model(dir: &Path) -> PeftModel {
    CausalLM::load(dir, Device::Cpu, Kind::Float)
        .map(PeftModel::new)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

/// Attaches adapter plugin `plugin` with `config` as `default`.
pub fn attach_plugin(model: &mut PeftModel, registry: &Registry, plugin: &str, config: &str) {
    let method =
        registry.adapter(plugin, config).unwrap_or_else(|e| panic!("{plugin} {config}: {e}"));
    let report = model
        .attach_adapter("default", Box::new(method))
        .unwrap_or_else(|e| panic!("{plugin} {config}: {e:#}"));
    println!("{plugin} {config}: {}", report.summary());
}

/// The logits of `ids` through the active adapter, without a graph.
pub fn logits_of(model: &PeftModel, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward(ForwardArgs::ids(ids))).unwrap()
}

/// The `logits` tensor of a safetensors file the reference wrote.
pub fn read_logits(path: &Path) -> Tensor {
    let mut v =
        Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v.remove(v.iter().position(|(n, _)| n == "logits").expect("a `logits` tensor")).1
}

/// Max |a − b| in float64; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Prints and asserts that two logits tensors agree within [`LOGITS_TOL`].
pub fn check_logits(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = max_abs_diff(ours, theirs);
    let scale = theirs.abs().max().double_value(&[]);
    println!("{what:<66} max |diff| {d:.3e} (max |logit| {scale:.3})");
    assert!(d <= LOGITS_TOL, "{what}: max |diff| {d:e} > {LOGITS_TOL:e}");
}

/// The tensors of a PEFT directory, sorted by name.
pub fn saved_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    v.sort_by(|x, y| x.0.cmp(&y.0));
    v
}

/// The names of named tensors.
pub fn tensor_names(v: &[(String, Tensor)]) -> Vec<String> {
    v.iter().map(|x| x.0.clone()).collect()
}

/// A tiny Qwen2 model under `w/base` (`ferrotune init-model`, seed 5, a 200-word ChatML
/// tokenizer).
pub fn tiny_parity_model(w: &Path) -> PathBuf {
    let tokenizer = w.join("tokenizer");
    write_chat_tokenizer(&tokenizer, 200);
    let base = w.join("base");
    init_tiny_model(&tokenizer, &base, 5);
    base
}

/// Copies the PEFT directory `from` to `to` with its `adapter_config.json` edited by `config`
/// and its tensors replaced by `tensors` (copied as they are when `None`).
pub fn edited_adapter(
    from: &Path,
    to: &Path,
    config: impl FnOnce(&mut Value),
    tensors: Option<Vec<(String, Tensor)>>,
) {
    std::fs::create_dir_all(to).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    config(&mut cfg);
    std::fs::write(to.join("adapter_config.json"), cfg.to_string()).unwrap();
    match tensors {
        Some(t) => Tensor::write_safetensors(&t, to.join("adapter_model.safetensors")).unwrap(),
        None => {
            std::fs::copy(
                from.join("adapter_model.safetensors"),
                to.join("adapter_model.safetensors"),
            )
            .unwrap();
        }
    }
}
