//! Parity of the built `lora` plugin with peft 0.21, through the host's plugin registry.
//!
//! For each variant (plain LoRA, rsLoRA, DoRA, PiSSA, PiSSA + DoRA, OLoRA, gaussian init)
//! `tests/python/lora_reference.py` builds peft's LoRA layer on one `nn.Linear(24, 16)` from
//! the config the plugin writes, and this test checks, each to 1e-5:
//! * our init from W alone against peft's (for PiSSA/OLoRA the product B·A, free of the sign
//!   ambiguity of singular vectors, and the residual base weight; DoRA's magnitude);
//! * peft's saved `adapter_model.safetensors` loads into our layer by its own keys, minus
//!   the module prefix, and our state dict gives the same names and values back;
//! * forward output, gradients of A, B, the magnitude and the input for a fixed loss;
//! * our `merged_weight` against `merge_and_unload`, and the unmerge round trip;
//! * peft loads the PEFT directory the plugin writes (`PeftModel.from_pretrained`, which also
//!   loads its `adapter_config.json` through `LoraConfig`) and computes our output.
//!
//! And `target_modules` selects the same layers of a tiny Llama as peft does.
//!
//! Needs the plugin built (`cargo build -p ferrotune-testkit -p ferrotune-lora`) and a Python
//! with torch 2.11 and peft 0.21: `$PYTHON`, else the repository's `.venv/bin/python`. A missing reference stack fails the test, never skips it.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferrotune::model::linear::FrozenLinear;
use ferrotune_plugin_api::{AdapterLayer, AdapterMethod};
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

/// Largest difference accepted between our numbers and peft's (float32).
const TOL: f64 = 1e-5;
/// The adapted layer's name in the reference model.
const MODULE: &str = "proj";
/// What peft's `save_pretrained` puts before a layer's own state-dict names.
const PEFT_PREFIX: &str = "base_model.model.proj.";
/// The plugin's capability for inits that rewrite the base weight.
const INIT_REWRITES_BASE: &str = "init_rewrites_base";

/// (name, plugin config) of each variant checked against peft.
const VARIANTS: &[(&str, &str)] = &[
    ("lora", r#"{"r": 4, "lora_alpha": 8, "target_modules": ["proj"]}"#),
    ("rslora", r#"{"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "use_rslora": true}"#),
    ("dora", r#"{"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "use_dora": true}"#),
    (
        "pissa",
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "init_lora_weights": "pissa"}"#,
    ),
    (
        "pissa_dora",
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "init_lora_weights": "pissa", "use_dora": true}"#,
    ),
    (
        "olora",
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "init_lora_weights": "olora"}"#,
    ),
    (
        "gaussian",
        r#"{"r": 4, "lora_alpha": 16, "target_modules": ["proj"], "init_lora_weights": "gaussian"}"#,
    ),
];

/// (name, plugin config) of each `target_modules` form checked against peft on a tiny Llama.
const TARGETS: &[(&str, &str)] = &[
    ("names", r#"{"target_modules": ["q_proj", "v_proj"]}"#),
    ("all_linear", r#"{"target_modules": "all-linear"}"#),
    ("regex", r#"{"target_modules": ".*\\.layers\\.1\\..*_proj"}"#),
    (
        "modules_to_save",
        r#"{"target_modules": ["down_proj", "lm_head"], "modules_to_save": ["lm_head"]}"#,
    ),
];

fn config(name: &str) -> &'static str {
    VARIANTS.iter().chain(TARGETS).find(|(n, _)| *n == name).map(|(_, c)| *c).unwrap()
}

// ---------------------------------------------------------------- set-up

fn lora_registry() -> ferrotune::plugins::Registry {
    let lib = build_dir().join("libferrotune_lora.so");
    assert!(
        lib.exists(),
        "{} is missing: `cargo build -p ferrotune-testkit -p ferrotune-lora` first",
        lib.display()
    );
    registry()
}

fn method(name: &str) -> ferrotune_plugin_api::kinds::adapter::AdapterMethodHandle {
    lora_registry().adapter("lora", config(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Runs the peft reference once for every test of this file; its folder.
fn fixture() -> &'static Path {
    static FIXTURE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match FIXTURE.get_or_init(prepare) {
        Ok(dir) => dir,
        Err(e) => panic!("peft reference failed:\n{e}"),
    }
}

fn prepare() -> Result<PathBuf, String> {
    let work = temp_dir("lora-parity");
    let mut parity = Vec::new();
    for (i, (name, _)) in VARIANTS.iter().enumerate() {
        let dir = work.join(name);
        write_our_peft_dir(name, &dir, 100 + i as i64)?;
        parity.push(serde_json::json!({"name": name, "dir": dir}));
    }
    let mut targets = Vec::new();
    for (name, _) in TARGETS {
        let dir = work.join(format!("targets-{name}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("adapter_config.json"),
            method(name).peft_config().map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        targets.push(serde_json::json!({"name": name, "dir": dir}));
    }
    let plan = serde_json::json!({"parity": parity, "targets": targets});
    std::fs::write(work.join("plan.json"), plan.to_string()).map_err(|e| e.to_string())?;

    let script = repo_root().join("tests/python/lora_reference.py");
    let py = python();
    let out = Command::new(&py)
        .arg(&script)
        .arg(&work)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", py.display()))?;
    println!("{}", stdout(&out));
    if !out.status.success() {
        return Err(format!(
            "{} {} exited with {}\n{}{}",
            py.display(),
            script.display(),
            out.status,
            stdout(&out),
            stderr(&out)
        ));
    }
    Ok(work)
}

/// The plugin's own PEFT directory for variant `name` (`dir/ours/`): its adapter_config.json
/// and, on a weight of our own, a trained state in peft's file layout; `dir/ours_io` holds
/// that weight and an input.
fn write_our_peft_dir(name: &str, dir: &Path, seed: i64) -> Result<(), String> {
    let ours = dir.join("ours");
    std::fs::create_dir_all(&ours).map_err(|e| e.to_string())?;
    let method = method(name);
    std::fs::write(
        ours.join("adapter_config.json"),
        method.peft_config().map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    tch::manual_seed(seed);
    let o = (Kind::Float, Device::Cpu);
    let (w, bias, x) =
        (Tensor::randn([16, 24], o), Tensor::randn([16], o), Tensor::randn([4, 24], o));
    let base = FrozenLinear::new(MODULE, w.copy(), Some(bias.copy()));
    let layer = method.adapt_linear(MODULE, &base).map_err(|e| e.to_string())?;
    let state: Vec<(String, Tensor)> = layer
        .state_dict()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(n, t)| {
            let noise = t.randn_like() * 0.2;
            let t = if n == "lora_magnitude_vector" { &t * (noise + 1.0) } else { &t + noise };
            (format!("{PEFT_PREFIX}{n}"), t)
        })
        .collect();
    Tensor::write_safetensors(&state, ours.join("adapter_model.safetensors"))
        .map_err(|e| e.to_string())?;
    Tensor::write_safetensors(
        &[("w_orig", w), ("bias", bias), ("x", x)],
        dir.join("ours_io.safetensors"),
    )
    .map_err(|e| e.to_string())
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// peft's saved tensors with the module prefix taken off.
fn strip_prefix(saved: HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = saved
        .into_iter()
        .map(|(k, t)| {
            let rel = k
                .strip_prefix(PEFT_PREFIX)
                .unwrap_or_else(|| panic!("peft key `{k}` lacks the prefix `{PEFT_PREFIX}`"));
            (rel.to_string(), t)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

// ---------------------------------------------------------------- comparisons

/// Named max differences of one variant, printed as a table, failing above `TOL`.
struct Report {
    variant: &'static str,
    rows: Vec<(String, f64)>,
}

impl Report {
    fn new(variant: &'static str) -> Self {
        Self { variant, rows: Vec::new() }
    }
    fn diff(&mut self, what: &str, ours: &Tensor, theirs: &Tensor) {
        assert_eq!(ours.size(), theirs.size(), "{}: {what}: shapes differ", self.variant);
        let d = (ours.to_kind(Kind::Double) - theirs.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        self.rows.push((what.to_string(), d));
    }
    fn finish(self) {
        let mut failed = Vec::new();
        for (what, d) in &self.rows {
            let ok = *d <= TOL;
            println!(
                "{:<12} {:<44} max |diff| {:.3e} {}",
                self.variant,
                what,
                d,
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failed.push(format!("{what}: {d:.3e}"));
            }
        }
        assert!(failed.is_empty(), "{}: above {TOL:e}: {}", self.variant, failed.join("; "));
    }
}

fn grad_of(layer: &dyn AdapterLayer, name: &str) -> Tensor {
    let p = layer
        .parameters()
        .unwrap()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no parameter `{name}`"));
    let g = p.tensor.grad();
    assert!(g.defined(), "`{name}` got no gradient");
    g
}

fn check_variant(variant: &'static str) {
    let dir = fixture().join(variant);
    let r = read(&dir.join("reference.safetensors"));
    let t = |k: &str| r.get(k).unwrap_or_else(|| panic!("{variant}: reference lacks `{k}`")).copy();
    let method = method(variant);
    let rewrites = method.capabilities().iter().any(|c| c == INIT_REWRITES_BASE);
    let dora = r.contains_key("m");
    let mut report = Report::new(variant);

    // 1. Our init, from the original weight alone, against peft's.
    let base0 = FrozenLinear::new(MODULE, t("w_orig"), Some(t("bias")));
    let layer0 = method.adapt_linear(MODULE, &base0).unwrap();
    let init: HashMap<_, _> = layer0.state_dict().unwrap().into_iter().collect();
    report.diff(
        "init: B·A (sign-free)",
        &init["lora_B.weight"].matmul(&init["lora_A.weight"]),
        &t("init_B").matmul(&t("init_A")),
    );
    if rewrites {
        let residual = layer0.unmerged_weight(&base0.weight).unwrap();
        report.diff("init: residual base weight", &residual, &t("w_base"));
    } else {
        assert_eq!(
            init["lora_B.weight"].abs().max().double_value(&[]),
            0.0,
            "{variant}: B starts at zero"
        );
        assert!(t("w_base").equal(&t("w_orig")), "{variant}: peft left the base weight alone");
    }
    if dora {
        report.diff("init: magnitude", &init["lora_magnitude_vector"], &t("init_m"));
    }

    // 2. peft's trained state, loaded from peft's own file by its own keys.
    let base = FrozenLinear::new(MODULE, t("w_base"), Some(t("bias")));
    let layer = method.adapt_linear(MODULE, &base).unwrap();
    let saved = strip_prefix(read(&dir.join("peft/adapter_model.safetensors")));
    let peft_keys: BTreeSet<_> = saved.iter().map(|(k, _)| k.clone()).collect();
    let our_keys: BTreeSet<_> = layer.state_dict().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(our_keys, peft_keys, "{variant}: our state-dict names vs peft's saved keys");
    layer.load_state_dict(saved).unwrap();
    let state: HashMap<_, _> = layer.state_dict().unwrap().into_iter().collect();
    report.diff("state round trip: A", &state["lora_A.weight"], &t("A"));
    report.diff("state round trip: B", &state["lora_B.weight"], &t("B"));
    if dora {
        report.diff("state round trip: magnitude", &state["lora_magnitude_vector"], &t("m"));
    }

    // Forward and gradients for loss = sum(y * gy).
    let x = t("x").set_requires_grad(true);
    let y = layer.forward(&x, &base, true).unwrap();
    report.diff("forward", &y, &t("y"));
    (&y * t("gy")).sum(Kind::Float).backward();
    report.diff("grad A", &grad_of(layer.as_ref(), "lora_A.weight"), &t("grad_A"));
    report.diff("grad B", &grad_of(layer.as_ref(), "lora_B.weight"), &t("grad_B"));
    if dora {
        report.diff(
            "grad magnitude",
            &grad_of(layer.as_ref(), "lora_magnitude_vector"),
            &t("grad_m"),
        );
    }
    report.diff("grad x", &x.grad(), &t("grad_x"));

    // Merge against merge_and_unload; the merged layer computes the adapted one; unmerge.
    let merged = layer.merged_weight(&base.weight).unwrap();
    report.diff("merged weight vs merge_and_unload", &merged, &t("merged"));
    let y_merged = tch::no_grad(|| t("x").linear(&merged, Some(&t("bias"))));
    report.diff("merged layer forward vs adapted forward", &y_merged, &y.detach());
    report.diff("unmerge(merge(W)) vs W", &layer.unmerged_weight(&merged).unwrap(), &base.weight);
    report.diff("peft's own unmerge(merge(W)) vs W", &t("peft_unmerged"), &t("w_base"));

    // 3. peft on the PEFT directory the plugin wrote, against our layer with that state.
    let io = read(&dir.join("ours_io.safetensors"));
    let base_ours = FrozenLinear::new(MODULE, io["w_orig"].copy(), Some(io["bias"].copy()));
    let ours = method.adapt_linear(MODULE, &base_ours).unwrap();
    let base_ours = if rewrites {
        let residual = ours.unmerged_weight(&base_ours.weight).unwrap();
        report.diff("our dir in peft: residual base weight", &residual, &t("ours_w_base"));
        FrozenLinear::new(MODULE, residual, Some(io["bias"].copy()))
    } else {
        base_ours
    };
    ours.load_state_dict(strip_prefix(read(&dir.join("ours/adapter_model.safetensors")))).unwrap();
    let y_ours = tch::no_grad(|| ours.forward(&io["x"], &base_ours, false)).unwrap();
    report.diff("our dir in peft: forward", &y_ours, &t("ours_y"));

    println!(
        "{variant:<12} peft keys: {}",
        peft_keys.iter().map(|k| format!("{PEFT_PREFIX}{k}")).collect::<Vec<_>>().join(", ")
    );
    report.finish();
}

// ---------------------------------------------------------------- tests

#[test]
fn lora_matches_peft() {
    check_variant("lora");
}

#[test]
fn rslora_matches_peft() {
    check_variant("rslora");
}

#[test]
fn dora_matches_peft() {
    check_variant("dora");
}

#[test]
fn pissa_matches_peft() {
    check_variant("pissa");
}

#[test]
fn pissa_with_dora_matches_peft() {
    check_variant("pissa_dora");
}

#[test]
fn olora_matches_peft() {
    check_variant("olora");
}

#[test]
fn gaussian_init_matches_peft() {
    check_variant("gaussian");
}

/// rsLoRA's scale really is α/√r (the parity above would also pass for α/r if both sides
/// agreed on the wrong one): peft's recorded scale, and the doubling against plain LoRA.
#[test]
fn scales_are_alpha_over_r_and_over_root_r() {
    let scale = |v: &str| {
        read(&fixture().join(v).join("reference.safetensors"))["scaling"].double_value(&[0])
    };
    assert_eq!(scale("lora"), 2.0);
    assert_eq!(scale("rslora"), 4.0);
    assert_eq!(scale("gaussian"), 4.0);
}

#[test]
fn target_modules_select_what_peft_selects() {
    for (name, _) in TARGETS {
        let text =
            std::fs::read_to_string(fixture().join(format!("targets-{name}")).join("targets.json"))
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let list = |k: &str| {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let (linear, targeted) = (list("linear"), list("targeted"));
        let method = method(name);
        let ours: BTreeSet<_> =
            linear.iter().filter(|n| method.targets(n).unwrap()).cloned().collect();
        assert_eq!(
            ours,
            targeted.into_iter().collect::<BTreeSet<_>>(),
            "{name}: targeted layers, ours vs peft's"
        );
        assert!(
            !ours.is_empty() && ours.len() < linear.len(),
            "{name}: a test that selects nothing or everything proves little"
        );
        println!(
            "{name:<16} {} of {} linear layers, as peft: {}",
            ours.len(),
            linear.len(),
            ours.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
}
