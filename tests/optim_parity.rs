//! The built `single` (AdamW) and `sft` plugins against their references in Python:
//! `torch.optim.AdamW` + `clip_grad_norm_`, and transformers' `ForCausalLMLoss`
//! (tests/python/optim_reference.py), tensors exchanged as safetensors files. Also: a
//! resumed AdamW run continues bit-identically, and errors name the offending key.
use std::path::{Path, PathBuf};
use std::process::Command;

use ferrotune::dist::collectives::SingleProcess;
use ferrotune_plugin_api::kinds::objective::{ObjectiveContext, RewardScores};
use ferrotune_plugin_api::{
    Batch, Collectives, ErrorCode, ForwardFlags, MemoryStrategy, Objective, PluginResult, ReduceOp,
    RewardInput, TrainParam,
};
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------- the Python side

/// Runs `optim_reference.py <mode> <dir>`, failing with its output if it fails.
fn run_reference(mode: &str, dir: &Path) {
    let script = repo_root().join("tests/python/optim_reference.py");
    let py = python();
    let out = Command::new(&py)
        .arg(&script)
        .arg(mode)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    assert!(
        out.status.success(),
        "{} {} {mode} failed ({}):\n{}\n{}",
        py.display(),
        script.display(),
        out.status,
        stdout(&out),
        stderr(&out)
    );
}

fn read_safetensors(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor `{name}`")).1
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// A seeded generator of test data (splitmix64), independent of libtorch's global one,
/// which the tests running in parallel threads would share.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal samples (Box-Muller), fp32.
    fn normal(&mut self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                ((-2.0 * self.uniform().ln()).sqrt()
                    * (std::f64::consts::TAU * self.uniform()).cos()) as f32
            })
            .collect();
        Tensor::from_slice(&v).view(shape)
    }
    fn below(&mut self, n: i64) -> i64 {
        (self.next_u64() % n as u64) as i64
    }
}

// ---------------------------------------------------------------- AdamW

const STEPS: i64 = 20;
const RESUME_AFTER: i64 = 10;

struct ParamSpec {
    name: &'static str,
    shape: &'static [i64],
    lr_scale: f64,
    weight_decay_scale: f64,
}

/// A LoRA+-style mix: a B matrix with 16× the learning rate, a bias without weight decay.
const PARAMS: [ParamSpec; 4] = [
    ParamSpec {
        name: "layers.0.q_proj.lora_A.weight",
        shape: &[4, 16],
        lr_scale: 1.0,
        weight_decay_scale: 1.0,
    },
    ParamSpec {
        name: "layers.0.q_proj.lora_B.weight",
        shape: &[16, 4],
        lr_scale: 16.0,
        weight_decay_scale: 1.0,
    },
    ParamSpec { name: "layers.0.bias", shape: &[16], lr_scale: 1.0, weight_decay_scale: 0.0 },
    ParamSpec { name: "head.weight", shape: &[5, 3], lr_scale: 1.0, weight_decay_scale: 1.0 },
];

/// Linear warm-up over 3 steps, then linear decay towards 0 (transformers'
/// `get_linear_schedule_with_warmup`): the learning rate of step `s` (from 1).
fn linear_lr(s: i64) -> f64 {
    let (base, warmup) = (1e-2, 3);
    let k = s - 1;
    if k < warmup {
        base * (k + 1) as f64 / warmup as f64
    } else {
        base * (STEPS - k) as f64 / (STEPS - warmup) as f64
    }
}

/// Initial parameters and the gradients of every step, from a fixed seed. The gradient
/// scale moves between ~0.2 and ~3 in global norm so that a clip at 1.0 acts on some steps
/// and not on others.
fn adamw_inputs() -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    let mut rng = Rng(20240611);
    let init: Vec<Tensor> = PARAMS.iter().map(|p| rng.normal(p.shape) * 0.5).collect();
    let grads = (1..=STEPS)
        .map(|s| {
            let scale = 0.015 * (1 + (s * 5) % 13) as f64;
            PARAMS.iter().map(|p| rng.normal(p.shape) * scale).collect()
        })
        .collect();
    (init, grads)
}

fn fresh_params(values: &[Tensor]) -> Vec<Tensor> {
    values.iter().map(|v| v.detach().copy().set_requires_grad(true)).collect()
}

fn train_params(params: &[Tensor]) -> Vec<TrainParam> {
    PARAMS
        .iter()
        .zip(params)
        .map(|(spec, t)| TrainParam {
            name: spec.name.into(),
            tensor: t.shallow_clone(),
            lr_scale: spec.lr_scale,
            weight_decay_scale: spec.weight_decay_scale,
        })
        .collect()
}

/// Gives each parameter the gradient `grad` through autograd: d/dp Σ p·g = g exactly.
fn backward_with(params: &[Tensor], grads: &[Tensor]) {
    let loss = params
        .iter()
        .zip(grads)
        .map(|(p, g)| (p * g).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap();
    loss.backward();
}

fn memory(optimizer_json: &str, params: &[Tensor]) -> impl MemoryStrategy {
    let mut m = registry().memory("single", "{}").unwrap();
    m.setup(train_params(params), optimizer_json, Device::Cpu, &SingleProcess).unwrap();
    m
}

/// Runs steps `from..=STEPS` with the plugin; returns the parameters after every step,
/// the reported norms, and a checkpoint (parameters + optimizer state) after RESUME_AFTER.
struct Run {
    params_after: Vec<Vec<Tensor>>,
    norms: Vec<f64>,
    clipped_steps: usize,
    checkpoint: Option<PathBuf>,
    final_state: Vec<(String, Tensor)>,
}

fn run_plugin(
    mem: &mut impl MemoryStrategy,
    params: &[Tensor],
    grads: &[Vec<Tensor>],
    from: i64,
    save: Option<&Path>,
) -> Run {
    let mut run = Run {
        params_after: Vec::new(),
        norms: Vec::new(),
        clipped_steps: 0,
        checkpoint: None,
        final_state: Vec::new(),
    };
    for s in from..=STEPS {
        backward_with(params, &grads[(s - 1) as usize]);
        let report = mem.step(linear_lr(s), &SingleProcess).unwrap();
        assert!(!report.skipped, "step {s} skipped");
        if report.metrics.iter().any(|(k, v)| k == "clip_coef" && *v < 1.0) {
            run.clipped_steps += 1;
        }
        run.norms.push(report.grad_norm);
        for p in params {
            assert!(!p.grad().defined(), "step drops the gradients (grad = None)");
        }
        run.params_after.push(params.iter().map(|p| p.detach().copy()).collect());
        if let (Some(path), true) = (save, s == RESUME_AFTER) {
            let mut ckpt = mem.state_dict().unwrap();
            ckpt.extend(
                PARAMS
                    .iter()
                    .zip(params)
                    .map(|(spec, p)| (format!("model.{}", spec.name), p.detach().copy())),
            );
            Tensor::write_safetensors(&ckpt, path).unwrap();
            run.checkpoint = Some(path.to_path_buf());
        }
    }
    run.final_state = mem.state_dict().unwrap();
    run
}

fn check_adamw(tag: &str, optimizer_json: &str) {
    let dir = temp_dir(&format!("adamw-{tag}"));
    let (init, grads) = adamw_inputs();

    // The reference run.
    let mut inputs: Vec<(String, Tensor)> = PARAMS
        .iter()
        .zip(&init)
        .map(|(p, t)| (format!("init.{}", p.name), t.shallow_clone()))
        .collect();
    for (s, gs) in grads.iter().enumerate() {
        inputs.extend(
            PARAMS
                .iter()
                .zip(gs)
                .map(|(p, g)| (format!("grad.{}.{}", s + 1, p.name), g.shallow_clone())),
        );
    }
    Tensor::write_safetensors(&inputs, dir.join("adamw_in.safetensors")).unwrap();
    let spec = serde_json::json!({
        "params": PARAMS.iter().map(|p| serde_json::json!({
            "name": p.name, "lr_scale": p.lr_scale, "weight_decay_scale": p.weight_decay_scale,
        })).collect::<Vec<_>>(),
        "lrs": (1..=STEPS).map(linear_lr).collect::<Vec<_>>(),
        "optimizer": serde_json::from_str::<serde_json::Value>(optimizer_json).unwrap(),
    });
    std::fs::write(dir.join("adamw_in.json"), spec.to_string()).unwrap();
    run_reference("adamw", &dir);
    let reference = read_safetensors(&dir.join("adamw_out.safetensors"));

    // The plugin, uninterrupted.
    let params = fresh_params(&init);
    let mut mem = memory(optimizer_json, &params);
    let ckpt_path = dir.join("checkpoint-10.safetensors");
    let full = run_plugin(&mut mem, &params, &grads, 1, Some(&ckpt_path));

    let mut max_diff = 0.0f64;
    for s in 1..=STEPS {
        for (i, p) in PARAMS.iter().enumerate() {
            let expected = get(&reference, &format!("param.{s}.{}", p.name));
            let d = max_abs_diff(&full.params_after[(s - 1) as usize][i], expected);
            // the same `_fused_adamw_` kernel on the same inputs: bit-identical
            assert!(d == 0.0, "[{tag}] step {s}, `{}`: max |plugin - torch| = {d:e}", p.name);
            max_diff = max_diff.max(d);
        }
    }
    let ref_norms = get(&reference, "grad_norm");
    let mut max_norm_diff = 0.0f64;
    for (s, n) in full.norms.iter().enumerate() {
        let expected = ref_norms.double_value(&[s as i64]);
        let d = (n - expected).abs();
        assert!(
            d <= 1e-6 * expected.max(1.0),
            "[{tag}] step {}: grad norm {n}, torch {expected}",
            s + 1
        );
        max_norm_diff = max_norm_diff.max(d);
    }
    let clipping = optimizer_json.contains("max_grad_norm");
    if clipping {
        assert!(
            full.clipped_steps > 0 && full.clipped_steps < STEPS as usize,
            "[{tag}] the clip should act on some steps only, acted on {}",
            full.clipped_steps
        );
    }
    eprintln!(
        "adamw [{tag}] {optimizer_json}: max |param - torch| over {STEPS} steps = {max_diff:e}, \
         max |grad_norm - torch| = {max_norm_diff:e}, clipped steps {}",
        full.clipped_steps
    );

    // Resumed from the checkpoint after step 10 into fresh tensors and a fresh plugin.
    let ckpt = read_safetensors(full.checkpoint.as_ref().unwrap());
    let resumed: Vec<Tensor> = PARAMS
        .iter()
        .map(|p| get(&ckpt, &format!("model.{}", p.name)).copy().set_requires_grad(true))
        .collect();
    let mut mem2 = memory(optimizer_json, &resumed);
    let state: Vec<(String, Tensor)> = ckpt
        .iter()
        .filter(|(n, _)| !n.starts_with("model."))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    mem2.load_state_dict(state).unwrap();
    let rest = run_plugin(&mut mem2, &resumed, &grads, RESUME_AFTER + 1, None);
    for (k, after) in rest.params_after.iter().enumerate() {
        let s = RESUME_AFTER + 1 + k as i64;
        for (i, p) in PARAMS.iter().enumerate() {
            assert!(
                after[i].equal(&full.params_after[(s - 1) as usize][i]),
                "[{tag}] resumed run differs at step {s}, `{}` (max diff {:e})",
                p.name,
                max_abs_diff(&after[i], &full.params_after[(s - 1) as usize][i])
            );
        }
    }
    assert_eq!(rest.final_state.len(), full.final_state.len());
    for ((n1, t1), (n2, t2)) in rest.final_state.iter().zip(&full.final_state) {
        assert_eq!(n1, n2);
        assert!(t1.equal(t2), "[{tag}] resumed optimizer state `{n1}` differs");
    }
    eprintln!(
        "adamw [{tag}]: resumed after step {RESUME_AFTER}: steps {}..={STEPS} bit-identical",
        RESUME_AFTER + 1
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn adamw_matches_torch_defaults() {
    check_adamw("defaults", "{}");
}

#[test]
fn adamw_matches_torch_with_clipping() {
    check_adamw("clip", r#"{"max_grad_norm": 1.0, "weight_decay": 0.1}"#);
}

#[test]
fn adamw_matches_torch_with_amsgrad() {
    check_adamw(
        "amsgrad",
        r#"{"amsgrad": true, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.05}"#,
    );
}

#[test]
fn adamw_matches_torch_with_clipping_and_amsgrad() {
    check_adamw("clip-amsgrad", r#"{"max_grad_norm": 1.0, "amsgrad": true, "weight_decay": 0.1}"#);
}

/// A world of two ranks, to see the plugin refuse it.
struct TwoRanks;

impl Collectives for TwoRanks {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce(&self, _: &Tensor, _: ReduceOp) -> PluginResult<()> {
        Ok(())
    }
    fn broadcast(&self, _: &Tensor, _: usize) -> PluginResult<()> {
        Ok(())
    }
    fn all_gather(&self, t: &Tensor) -> PluginResult<Vec<Tensor>> {
        Ok(vec![t.shallow_clone(), t.shallow_clone()])
    }
    fn reduce_scatter(&self, _: &Tensor, _: &Tensor, _: ReduceOp) -> PluginResult<()> {
        Ok(())
    }
    fn barrier(&self) -> PluginResult<()> {
        Ok(())
    }
}

#[test]
fn single_errors_cross_the_boundary_and_name_the_problem() {
    let reg = registry();
    let p = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let tp = || vec![TrainParam::new("w", p.shallow_clone())];
    let mut m = reg.memory("single", "{}").unwrap();
    let e = m
        .setup(tp(), r#"{"betas": [0.9, 0.999], "lr": 0.1}"#, Device::Cpu, &SingleProcess)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::CONFIG);
    assert!(e.message().contains("unknown field `lr`"), "{e}");
    let e = m.setup(tp(), r#"{"max_grad_norm": -1}"#, Device::Cpu, &SingleProcess).unwrap_err();
    assert!(e.message().contains("`max_grad_norm`"), "{e}");
    let e = m.setup(tp(), "{}", Device::Cpu, &TwoRanks).unwrap_err();
    assert_eq!(e.code, ErrorCode::UNSUPPORTED);
    assert!(e.message().contains("use the ddp or zero plugin"), "{e}");
    m.setup(tp(), "{}", Device::Cpu, &SingleProcess).unwrap();
    let e = m
        .load_state_dict(vec![(
            "w.momentum".into(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )])
        .unwrap_err();
    assert!(e.message().contains("`w.momentum`"), "{e}");
    let e = m
        .load_state_dict(vec![
            ("step".into(), Tensor::from(3i64)),
            ("w.exp_avg".into(), Tensor::zeros([4], (Kind::Float, Device::Cpu))),
        ])
        .unwrap_err();
    assert!(e.message().contains("`w.exp_avg` has shape [4]"), "{e}");
    // A non-finite gradient skips the step and says so.
    (&p * Tensor::from_slice(&[1.0f32, f32::INFINITY, 0.0])).sum(Kind::Float).backward();
    let r = m.step(0.1, &SingleProcess).unwrap();
    assert!(r.skipped && r.grad_norm.is_infinite(), "{r:?}");
    assert_eq!(p.abs().sum(Kind::Float).double_value(&[]), 0.0, "parameters untouched");
    let step = m.state_dict().unwrap().into_iter().find(|(n, _)| n == "step").unwrap().1;
    assert_eq!(step.int64_value(&[]), 0, "a skipped step is not counted");
}

// ---------------------------------------------------------------- SFT

/// A host "model" whose forward returns fixed logits (a leaf, so the test can read the
/// gradient the plugin's loss sends back).
struct FixedLogits {
    logits: Tensor,
}

impl ObjectiveContext for FixedLogits {
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        // The chunked path asks for target log-probabilities; a host that answers with the
        // logits is served by the plugin-API helper (the same computation the host chunks).
        assert!(flags == ForwardFlags::NONE || flags == ForwardFlags::TARGET_LOGPS, "{flags:?}");
        let names: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
        let expected: &[&str] = if flags == ForwardFlags::NONE {
            &["input_ids", "attention_mask"]
        } else {
            &["input_ids", "attention_mask", "target_ids"]
        };
        assert_eq!(names, expected, "every batch tensor but `labels` reaches the model");
        Ok(vec![("logits".into(), self.logits.shallow_clone())])
    }
    fn generate(&self, _: &[Vec<i64>], _: &str) -> PluginResult<Vec<Vec<i64>>> {
        unreachable!("sft does not generate")
    }
    fn decode(&self, _: &[i64]) -> PluginResult<String> {
        unreachable!()
    }
    fn rewards(&self, _: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        unreachable!()
    }
}

struct SftCase {
    name: &'static str,
    kind: Kind,
    num_items_extra: Option<i64>,
    label_smoothing: f64,
}

const SFT_CASES: [SftCase; 6] = [
    SftCase { name: "fp32_mean", kind: Kind::Float, num_items_extra: None, label_smoothing: 0.0 },
    SftCase {
        name: "fp32_num_items",
        kind: Kind::Float,
        num_items_extra: Some(29),
        label_smoothing: 0.0,
    },
    SftCase {
        name: "fp32_smooth_mean",
        kind: Kind::Float,
        num_items_extra: None,
        label_smoothing: 0.1,
    },
    SftCase {
        name: "fp32_smooth_num_items",
        kind: Kind::Float,
        num_items_extra: Some(29),
        label_smoothing: 0.1,
    },
    SftCase {
        name: "bf16_mean",
        kind: Kind::BFloat16,
        num_items_extra: None,
        label_smoothing: 0.0,
    },
    SftCase {
        name: "bf16_num_items",
        kind: Kind::BFloat16,
        num_items_extra: Some(7),
        label_smoothing: 0.0,
    },
];

/// Labels `[B, T]` in `[0, V)` with −100 over a 4-token prompt, in random gaps (1 in 4) and
/// over the second half of the last row (padding).
fn sft_labels(rng: &mut Rng, b: i64, t: i64, v: i64) -> Tensor {
    let labels: Vec<i64> = (0..b * t)
        .map(|i| {
            let (row, col) = (i / t, i % t);
            let gap = rng.below(4) == 0;
            let id = rng.below(v);
            if col < 4 || gap || (row == b - 1 && col >= t / 2) {
                -100
            } else {
                id
            }
        })
        .collect();
    Tensor::from_slice(&labels).view([b, t])
}

#[test]
fn sft_matches_transformers_for_causal_lm_loss() {
    let dir = temp_dir("sft");
    let (b, t, v) = (3i64, 17i64, 50i64);
    let mut rng = Rng(7);
    let mut inputs = Vec::new();
    let mut cases = Vec::new();
    let mut expected_counts = Vec::new();
    for c in &SFT_CASES {
        let logits = (rng.normal(&[b, t, v]) * 3.0).to_kind(c.kind);
        let labels = sft_labels(&mut rng, b, t, v);
        let count = labels.narrow(1, 1, t - 1).ne(-100).sum(Kind::Int64).int64_value(&[]);
        let num_items = c.num_items_extra.map(|extra| count + extra);
        inputs.push((format!("{}.logits", c.name), logits));
        inputs.push((format!("{}.labels", c.name), labels));
        cases.push(serde_json::json!({"name": c.name, "num_items_in_batch": num_items, "label_smoothing": c.label_smoothing}));
        expected_counts.push((count, num_items));
    }
    Tensor::write_safetensors(&inputs, dir.join("sft_in.safetensors")).unwrap();
    std::fs::write(dir.join("sft_in.json"), serde_json::json!({ "cases": cases }).to_string())
        .unwrap();
    run_reference("sft", &dir);
    let reference = read_safetensors(&dir.join("sft_out.safetensors"));

    let reg = registry();
    // Both paths: target log-probabilities (the default) and the full logits.
    let runs = SFT_CASES.iter().zip(expected_counts).flat_map(|c| [(c, false), (c, true)]);
    for ((c, (count, num_items)), full_logits) in runs {
        let logits =
            get(&inputs, &format!("{}.logits", c.name)).detach().copy().set_requires_grad(true);
        let labels = get(&inputs, &format!("{}.labels", c.name)).shallow_clone();
        let config =
            serde_json::json!({"label_smoothing": c.label_smoothing, "full_logits": full_logits});
        let mut obj = reg.objective("sft", &config.to_string()).unwrap();
        let meta = match num_items {
            Some(n) => {
                serde_json::json!({ "num_items_in_batch": n, "sample_ids": [0, 1, 2] }).to_string()
            }
            None => "{}".to_string(),
        };
        let batch = Batch {
            tensors: vec![
                ("input_ids".into(), Tensor::zeros([b, t], (Kind::Int64, Device::Cpu))),
                ("attention_mask".into(), Tensor::ones([b, t], (Kind::Int64, Device::Cpu))),
                ("labels".into(), labels),
            ],
            meta_json: meta,
        };
        let out = obj.loss(&batch, &FixedLogits { logits: logits.shallow_clone() }).unwrap();
        assert_eq!(
            out.num_items, count,
            "[{}] num_items is this micro-batch's label tokens",
            c.name
        );
        assert_eq!(out.loss.kind(), Kind::Float, "[{}] loss in fp32", c.name);
        let metric = |k: &str| {
            out.metrics.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no metric `{k}`")).1
        };
        assert_eq!(metric("num_label_tokens"), count as f64);
        let acc = metric("mean_token_accuracy");
        assert!((0.0..=1.0).contains(&acc));

        let ours = out.loss.double_value(&[]);
        let theirs = get(&reference, &format!("{}.loss", c.name)).double_value(&[]);
        let loss_diff = (ours - theirs).abs();
        assert!(loss_diff <= 1e-6, "[{}] loss {ours}, transformers {theirs}", c.name);
        assert_eq!(metric("loss"), ours);

        out.loss.backward();
        let grad = logits.grad();
        let ref_grad = get(&reference, &format!("{}.grad", c.name));
        assert_eq!(grad.kind(), ref_grad.kind());
        let grad_diff = max_abs_diff(&grad, ref_grad);
        assert!(grad_diff <= 1e-6, "[{}] max |dL/dlogits - transformers| = {grad_diff:e}", c.name);
        assert!(grad.abs().sum(Kind::Double).double_value(&[]) > 0.0);
        eprintln!(
            "sft [{}] ({} label tokens, num_items_in_batch {num_items:?}, smoothing {}, full_logits {full_logits}): \
             |loss - transformers| = {loss_diff:e}, max |grad - transformers| = {grad_diff:e}",
            c.name, count, c.label_smoothing
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Token accuracy against a count done here: argmax of the shifted logits vs the labels.
#[test]
fn sft_token_accuracy_and_missing_keys() {
    let mut rng = Rng(11);
    let (b, t, v) = (2i64, 9i64, 6i64);
    let logits = rng.normal(&[b, t, v]);
    let labels = sft_labels(&mut rng, b, t, v);
    let pred = logits.narrow(1, 0, t - 1).argmax(-1, false);
    let tgt = labels.narrow(1, 1, t - 1);
    let mask = tgt.ne(-100);
    let correct = pred.eq_tensor(&tgt).logical_and(&mask).sum(Kind::Int64).int64_value(&[]);
    let total = mask.sum(Kind::Int64).int64_value(&[]);
    let mut obj = registry().objective("sft", "{}").unwrap();
    let ctx = FixedLogits { logits };
    let batch = Batch {
        tensors: vec![
            ("input_ids".into(), Tensor::zeros([b, t], (Kind::Int64, Device::Cpu))),
            ("attention_mask".into(), Tensor::ones([b, t], (Kind::Int64, Device::Cpu))),
            ("labels".into(), labels.shallow_clone()),
        ],
        meta_json: String::new(),
    };
    let out = obj.loss(&batch, &ctx).unwrap();
    let acc = out.metrics.iter().find(|(n, _)| n == "mean_token_accuracy").unwrap().1;
    assert_eq!(acc, correct as f64 / total as f64);

    let no_labels = Batch {
        tensors: vec![("input_ids".into(), Tensor::zeros([b, t], (Kind::Int64, Device::Cpu)))],
        meta_json: String::new(),
    };
    let e = obj.loss(&no_labels, &ctx).unwrap_err();
    assert!(e.message().contains("`labels`") && e.message().contains("input_ids"), "{e}");
    let no_ids = Batch {
        tensors: vec![("labels".into(), labels.shallow_clone())],
        meta_json: String::new(),
    };
    let e = obj.loss(&no_ids, &ctx).unwrap_err();
    assert!(e.message().contains("`input_ids`"), "{e}");
    let bad_meta = Batch {
        tensors: batch.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
        meta_json: r#"{"num_items_in_batch": "many"}"#.into(),
    };
    let e = obj.loss(&bad_meta, &ctx).unwrap_err();
    assert!(e.message().contains("`num_items_in_batch`"), "{e}");
    let e = registry().objective("sft", r#"{"label_smoothing": 2}"#).err().unwrap().to_string();
    assert!(e.contains("`label_smoothing`") && e.contains("sft"), "{e}");
}
