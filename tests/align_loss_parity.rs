//! The alignment objectives (`ferrotune-align`: dpo, orpo, simpo, kto, grpo), loaded through
//! the plugin registry, against TRL 1.16's own trainer code (`tests/python/align_reference.py`):
//! for the same token batches and the same policy / reference logits, every loss type gives
//! TRL's loss and metrics within 1e-6. Plus GRPO's generation path and the bad-input guards.
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::sync::OnceLock;

use ferrotune_plugin_api::kinds::objective::{ObjectiveContext, RewardScores};
use ferrotune_plugin_api::{Batch, ForwardFlags, Objective, PluginResult, RewardInput};
use ferrotune_tests::*;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-6;

/// TRL's reference cases, computed once per test process: the folder and the case list.
fn reference() -> &'static (PathBuf, Vec<Value>) {
    static REF: OnceLock<(PathBuf, Vec<Value>)> = OnceLock::new();
    REF.get_or_init(|| {
        one_torch_thread();
        let dir: PathBuf = temp_dir("align-ref");
        let script = repo_root().join("tests/python/align_reference.py");
        run_python(&[script.as_os_str(), dir.as_os_str()]);
        let cases: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        (dir, cases.as_array().unwrap().clone())
    })
}

thread_local! {
    static TENSORS: Vec<(String, Tensor)> = Tensor::read_safetensors(reference().0.join("batches.safetensors")).unwrap();
}

/// A fresh copy of one reference tensor (tests may write into it).
fn t(name: &str) -> Tensor {
    TENSORS.with(|v| {
        v.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no reference tensor {name}"))
            .1
            .copy()
    })
}

/// A stand-in for the host's model: fixed policy and reference logits per `input_ids`.
/// Counts reference passes and checks they run without gradient.
struct FakeModel {
    table: Vec<(Tensor, Tensor, Tensor)>,
    reference_calls: Cell<usize>,
    generated: RefCell<Vec<Vec<i64>>>,
}

impl FakeModel {
    fn new(table: Vec<(Tensor, Tensor, Tensor)>) -> Self {
        let table = table
            .into_iter()
            .map(|(ids, p, r)| (ids, p.detach().copy().set_requires_grad(true), r))
            .collect();
        Self { table, reference_calls: Cell::new(0), generated: RefCell::new(Vec::new()) }
    }
}

impl ObjectiveContext for FakeModel {
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        let ids = &inputs.iter().find(|(n, _)| n == "input_ids").expect("input_ids").1;
        assert!(
            inputs.iter().any(|(n, _)| n == "attention_mask"),
            "forward gets the attention mask"
        );
        let (_, p, r) = self
            .table
            .iter()
            .find(|(k, _, _)| k.size() == ids.size() && k.equal(ids))
            .unwrap_or_else(|| panic!("the fake model knows no such input_ids {:?}", ids.size()));
        if flags.contains(ForwardFlags::DISABLE_ADAPTER) {
            assert!(flags.contains(ForwardFlags::NO_GRAD), "reference passes run without gradient");
            self.reference_calls.set(self.reference_calls.get() + 1);
            return Ok(vec![("logits".into(), r.shallow_clone())]);
        }
        Ok(vec![("logits".into(), p.shallow_clone())])
    }
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>> {
        let opts: Value = serde_json::from_str(options_json).unwrap();
        assert!(
            opts["max_new_tokens"].as_i64().unwrap() > 0 && opts["temperature"].as_f64().is_some()
        );
        let out = self.generated.borrow().clone();
        assert_eq!(out.len(), prompts.len());
        Ok(out)
    }
    fn decode(&self, ids: &[i64]) -> PluginResult<String> {
        Ok(ids.iter().map(|i| format!("w{i}")).collect::<Vec<_>>().join(" "))
    }
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        // Two rewards: completion length in words, and 1 for every completion of the second
        // prompt group only (a group with zero std).
        let len: Vec<f64> =
            inputs.iter().map(|i| i.completion.split_whitespace().count() as f64).collect();
        let flag: Vec<f64> =
            inputs.iter().map(|i| if i.prompt.contains("second") { 1.0 } else { 0.0 }).collect();
        Ok(vec![
            RewardScores { name: "len".into(), weight: 0.5, scores: len },
            RewardScores { name: "flag".into(), weight: 2.0, scores: flag },
        ])
    }
}

fn batch(tensors: Vec<(&str, Tensor)>, meta: Value) -> Batch {
    Batch {
        tensors: tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
        meta_json: meta.to_string(),
    }
}

/// Compares loss and every metric TRL logged; returns the largest absolute difference.
fn compare(case: &Value, loss: f64, metrics: &[(String, f64)]) -> f64 {
    let name = case["name"].as_str().unwrap();
    let want = case["loss"].as_f64().unwrap();
    let mut worst = (loss - want).abs();
    assert!(worst < TOL, "{name}: loss {loss} vs TRL {want}");
    for (k, v) in case["metrics"].as_object().unwrap() {
        let v = v.as_f64().unwrap();
        let got = metrics
            .iter()
            .find(|(m, _)| m == k)
            .unwrap_or_else(|| panic!("{name}: no metric {k} in {metrics:?}"))
            .1;
        assert!((got - v).abs() < TOL, "{name}: metric {k} {got} vs TRL {v}");
        worst = worst.max((got - v).abs());
    }
    worst
}

fn cases_of(objectives: &[&str]) -> Vec<Value> {
    reference()
        .1
        .iter()
        .filter(|c| objectives.contains(&c["objective"].as_str().unwrap()))
        .cloned()
        .collect()
}

#[test]
fn dpo_orpo_simpo_losses_match_trl() {
    let reg = registry();
    let cases = cases_of(&["dpo", "orpo", "simpo"]);
    assert!(cases.len() >= 25, "{} pair cases", cases.len());
    let mut worst = 0.0f64;
    for case in &cases {
        let model = FakeModel::new(vec![(
            t("pair.input_ids"),
            t("pair.policy_logits"),
            t("pair.ref_logits"),
        )]);
        let mut obj = reg
            .objective(case["objective"].as_str().unwrap(), &case["config"].to_string())
            .unwrap();
        let mut tensors = vec![
            ("input_ids", t("pair.input_ids")),
            ("attention_mask", t("pair.attention_mask")),
            ("completion_mask", t("pair.completion_mask")),
        ];
        let ref_mode = case["ref_mode"].as_str().unwrap();
        if ref_mode == "precomputed" {
            tensors.push(("ref_chosen_logps", t("pair.ref_chosen_logps")));
            tensors.push(("ref_rejected_logps", t("pair.ref_rejected_logps")));
        }
        let out = obj.loss(&batch(tensors, serde_json::json!({})), &model).unwrap();
        assert_eq!(out.num_items, 4);
        let expected_ref_calls = usize::from(ref_mode == "model");
        assert_eq!(
            model.reference_calls.get(),
            expected_ref_calls,
            "{}: reference passes",
            case["name"]
        );
        worst = worst.max(compare(case, out.loss.double_value(&[]), &out.metrics));
        out.loss.backward();
        let g = model.table[0].1.grad();
        assert!(
            g.defined() && g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
            "{}: gradient reaches the policy",
            case["name"]
        );
    }
    eprintln!("pair objectives: {} cases, max |plugin − TRL| = {worst:.3e}", cases.len());
}

#[test]
fn kto_loss_matches_trl() {
    let reg = registry();
    let cases = cases_of(&["kto"]);
    assert_eq!(cases.len(), 4);
    let mut worst = 0.0f64;
    for case in &cases {
        let model = FakeModel::new(vec![
            (t("kto.input_ids"), t("kto.policy_logits"), t("kto.ref_logits")),
            (t("kto.KL_input_ids"), t("kto.KL_policy_logits"), t("kto.KL_ref_logits")),
        ]);
        let mut obj = reg.objective("kto", &case["config"].to_string()).unwrap();
        let mut tensors = vec![
            ("input_ids", t("kto.input_ids")),
            ("attention_mask", t("kto.attention_mask")),
            ("completion_mask", t("kto.completion_mask")),
            ("kto_desirable", t(case["label"].as_str().unwrap())),
        ];
        let with_kl = case["config"]["loss_type"] == "kto";
        if with_kl {
            tensors.push(("KL_input_ids", t("kto.KL_input_ids")));
            tensors.push(("KL_attention_mask", t("kto.KL_attention_mask")));
            tensors.push(("KL_completion_mask", t("kto.KL_completion_mask")));
        }
        let out = obj
            .loss(&batch(tensors, serde_json::json!({"sample_ids": [1, 2, 3, 4, 5, 6]})), &model)
            .unwrap();
        assert_eq!(model.reference_calls.get(), if with_kl { 2 } else { 1 });
        worst = worst.max(compare(case, out.loss.double_value(&[]), &out.metrics));
    }
    eprintln!("kto: {} cases, max |plugin − TRL| = {worst:.3e}", cases.len());
}

fn grpo_tensors(case: &Value) -> Vec<(&'static str, Tensor)> {
    let mut v = vec![
        ("prompt_ids", t("grpo.prompt_ids")),
        ("prompt_mask", t("grpo.prompt_mask")),
        ("completion_ids", t("grpo.completion_ids")),
        ("completion_mask", t("grpo.completion_mask")),
        ("advantages", t("grpo.advantages")),
    ];
    if let Some(old) = case["old"].as_str() {
        v.push(("old_per_token_logps", t(old)));
    }
    v
}

fn grpo_model() -> FakeModel {
    let ids = Tensor::cat(&[t("grpo.prompt_ids"), t("grpo.completion_ids")], 1);
    FakeModel::new(vec![(ids, t("grpo.policy_logits"), t("grpo.ref_logits"))])
}

#[test]
fn grpo_loss_matches_trl_for_each_loss_type_and_beta() {
    let reg = registry();
    let cases = cases_of(&["grpo"]);
    assert_eq!(cases.len(), 10);
    let mut worst = 0.0f64;
    for case in &cases {
        let model = grpo_model();
        let mut obj = reg.objective("grpo", &case["config"].to_string()).unwrap();
        let meta = serde_json::json!({"num_items_in_batch": case["num_items_in_batch"]});
        let out = obj.loss(&batch(grpo_tensors(case), meta), &model).unwrap();
        let beta = case["config"]["beta"].as_f64().unwrap();
        assert_eq!(model.reference_calls.get(), usize::from(beta != 0.0), "{}", case["name"]);
        worst = worst.max(compare(case, out.loss.double_value(&[]), &out.metrics));
        if beta == 0.0 {
            assert!(out.metrics.iter().all(|(k, _)| k != "kl"), "no KL metric without a reference");
        }
    }
    eprintln!("grpo: {} cases, max |plugin − TRL| = {worst:.3e}", cases.len());
}

#[test]
fn grpo_precomputed_reference_and_gradient_accumulation() {
    let reg = registry();
    let case = cases_of(&["grpo"]).into_iter().find(|c| c["name"] == "grpo-grpo-beta0.04").unwrap();
    let model = grpo_model();
    let mut obj = reg.objective("grpo", &case["config"].to_string()).unwrap();
    // The reference log-probabilities TRL used, computed by the plugin's own reference pass,
    // handed back as a precomputed tensor: same loss, no reference pass; with 2 accumulation
    // steps the loss halves (TRL divides by current_gradient_accumulation_steps).
    let p = t("grpo.prompt_ids").size()[1];
    let c = t("grpo.completion_ids").size()[1];
    let ref_logits = t("grpo.ref_logits").narrow(1, p - 1, c);
    let ref_lp = ref_logits
        .log_softmax(-1, Kind::Double)
        .gather(-1, &t("grpo.completion_ids").unsqueeze(-1), false)
        .squeeze_dim(-1);
    let mut tensors = grpo_tensors(&case);
    tensors.push(("ref_per_token_logps", ref_lp));
    let out = obj
        .loss(&batch(tensors, serde_json::json!({"gradient_accumulation_steps": 2})), &model)
        .unwrap();
    assert_eq!(model.reference_calls.get(), 0);
    let want = case["loss"].as_f64().unwrap() / 2.0;
    assert!(
        (out.loss.double_value(&[]) - want).abs() < TOL,
        "{} vs {want}",
        out.loss.double_value(&[])
    );
}

/// The prompts-only form: the plugin generates, scores with the host's rewards and computes
/// group-relative advantages; the loss equals the scored form's with those advantages.
#[test]
fn grpo_rollout_generates_scores_and_trains() {
    let reg = registry();
    // Two prompts (left-padded), three generations each.
    let prompt_ids = Tensor::from_slice(&[0i64, 5, 6, 7, 8, 9]).view([2, 3]);
    let prompt_mask = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1]).view([2, 3]);
    let completions: Vec<Vec<i64>> =
        vec![vec![3, 4], vec![1], vec![2, 2, 2, 2], vec![6, 1, 2], vec![5], vec![7, 7]];
    let lens = [2.0, 1.0, 4.0, 3.0, 1.0, 2.0];
    // Rows: prompt repeated per generation + completion padded to 4 with 0.
    let (c, g) = (4i64, 3i64);
    let mut comp_ids = vec![0i64; 6 * c as usize];
    let mut comp_mask = vec![0i64; 6 * c as usize];
    for (i, comp) in completions.iter().enumerate() {
        for (j, &tok) in comp.iter().enumerate() {
            comp_ids[i * c as usize + j] = tok;
            comp_mask[i * c as usize + j] = 1;
        }
    }
    let comp_ids = Tensor::from_slice(&comp_ids).view([6, c]);
    let comp_mask = Tensor::from_slice(&comp_mask).view([6, c]);
    let ids = Tensor::cat(
        &[prompt_ids.repeat_interleave_self_int(g, 0, None), comp_ids.shallow_clone()],
        1,
    );
    tch::manual_seed(5);
    let policy = Tensor::randn([6, 3 + c, 10], (Kind::Double, Device::Cpu));
    let model = FakeModel::new(vec![(ids, policy.shallow_clone(), policy.shallow_clone())]);
    *model.generated.borrow_mut() = completions.clone();
    let cfg = r#"{"num_generations": 3, "loss_type": "grpo", "max_completion_length": 4}"#;
    let mut obj = reg.objective("grpo", cfg).unwrap();
    assert_eq!(obj.needs(), vec!["generation".to_string(), "rewards".to_string()]);
    let meta = serde_json::json!({"prompts": ["first", "second"], "samples": [{"messages": []}, {"messages": []}]});
    let out = obj
        .loss(
            &batch(
                vec![
                    ("prompt_ids", prompt_ids.shallow_clone()),
                    ("prompt_mask", prompt_mask.shallow_clone()),
                ],
                meta,
            ),
            &model,
        )
        .unwrap();
    let metric = |k: &str| {
        out.metrics
            .iter()
            .find(|(m, _)| m == k)
            .unwrap_or_else(|| panic!("no {k}: {:?}", out.metrics))
            .1
    };
    // Rewards: 0.5 · words + 2 · [second prompt]; group std with Bessel's correction.
    let rewards: Vec<f64> =
        lens.iter().enumerate().map(|(i, l)| 0.5 * l + if i >= 3 { 2.0 } else { 0.0 }).collect();
    let mut adv = vec![0.0; 6];
    for grp in 0..2 {
        let r = &rewards[grp * 3..grp * 3 + 3];
        let mean = r.iter().sum::<f64>() / 3.0;
        let std = (r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
        for j in 0..3 {
            adv[grp * 3 + j] = (r[j] - mean) / (std + 1e-4);
        }
    }
    assert!((metric("reward") - rewards.iter().sum::<f64>() / 6.0).abs() < 1e-9);
    assert!((metric("rewards/flag/mean") - 0.5).abs() < 1e-12);
    assert_eq!(metric("frac_reward_zero_std"), 0.0);
    assert_eq!((metric("completions/min_length"), metric("completions/max_length")), (1.0, 4.0));
    assert_eq!(metric("clip_ratio/region_mean"), 0.0, "on-policy: the ratio is 1");
    // The same loss through the scored form with the hand-computed advantages.
    let model2 = FakeModel::new(vec![(
        Tensor::cat(
            &[prompt_ids.repeat_interleave_self_int(g, 0, None), comp_ids.shallow_clone()],
            1,
        ),
        policy.shallow_clone(),
        policy,
    )]);
    let scored = batch(
        vec![
            ("prompt_ids", prompt_ids.repeat_interleave_self_int(g, 0, None)),
            ("prompt_mask", prompt_mask.repeat_interleave_self_int(g, 0, None)),
            ("completion_ids", comp_ids),
            ("completion_mask", comp_mask),
            ("advantages", Tensor::from_slice(&adv)),
        ],
        serde_json::json!({}),
    );
    let want =
        reg.objective("grpo", cfg).unwrap().loss(&scored, &model2).unwrap().loss.double_value(&[]);
    let got = out.loss.double_value(&[]);
    assert!((got - want).abs() < 1e-9, "rollout loss {got} vs scored {want}");
    // On-policy, the loss value is −mean(advantages) = 0 per group, its gradient is not.
    out.loss.backward();
    assert!(
        model.table[0].1.grad().abs().max().double_value(&[]) > 1e-6,
        "the advantages move the policy"
    );
}

#[test]
fn bad_inputs_are_errors_and_no_nan_reaches_the_optimizer() {
    let reg = registry();
    let pair = |extra: Vec<(&'static str, Tensor)>| {
        let mut v = vec![
            ("input_ids", t("pair.input_ids")),
            ("attention_mask", t("pair.attention_mask")),
            ("completion_mask", t("pair.completion_mask")),
        ];
        v.extend(extra);
        batch(v, serde_json::json!({"sample_ids": ["a", "b", "c", "d"]}))
    };
    let model = || {
        FakeModel::new(vec![(t("pair.input_ids"), t("pair.policy_logits"), t("pair.ref_logits"))])
    };
    // NaN in a precomputed reference: named, refused.
    let nan_ref = t("pair.ref_chosen_logps");
    let _ = nan_ref.narrow(0, 1, 1).fill_(f64::NAN);
    let mut dpo = reg.objective("dpo", "{}").unwrap();
    let e = dpo
        .loss(
            &pair(vec![
                ("ref_chosen_logps", nan_ref),
                ("ref_rejected_logps", t("pair.ref_rejected_logps")),
            ]),
            &model(),
        )
        .unwrap_err();
    assert!(e.message().contains("ref_chosen_logps") && e.message().contains("non-finite"), "{e}");
    // Only one of the two precomputed references.
    let e = dpo
        .loss(&pair(vec![("ref_chosen_logps", t("pair.ref_chosen_logps"))]), &model())
        .unwrap_err();
    assert!(e.message().contains("give both"), "{e}");
    // NaN policy logits.
    let bad_logits = t("pair.policy_logits");
    let _ = bad_logits.narrow(0, 2, 1).fill_(f64::NAN);
    let nan_model = FakeModel::new(vec![(t("pair.input_ids"), bad_logits, t("pair.ref_logits"))]);
    for name in ["dpo", "orpo", "simpo"] {
        let e = reg.objective(name, "{}").unwrap().loss(&pair(vec![]), &nan_model).unwrap_err();
        assert!(e.message().contains("non-finite"), "{name}: {e}");
    }
    // A β that overflows the hinge? No: a loss that is itself non-finite. An IPO with a
    // β this small gives (… − 1/2β)² = inf: refused, naming the objective and the batch.
    let mut tiny = reg.objective("dpo", r#"{"loss_type": "ipo", "beta": 1e-300}"#).unwrap();
    let e = tiny.loss(&pair(vec![]), &model()).unwrap_err();
    assert!(
        e.message().contains("objective `dpo`") && e.message().contains(r#"["a","b","c","d"]"#),
        "{e}"
    );
    // Identical chosen and rejected: a legal pair with zero gradient and loss ln 2.
    let ids = t("pair.input_ids");
    let chosen = ids.narrow(0, 0, 4);
    let same_ids = Tensor::cat(&[chosen.shallow_clone(), chosen], 0);
    let cm = t("pair.completion_mask").narrow(0, 0, 4);
    let am = t("pair.attention_mask").narrow(0, 0, 4);
    let pl = t("pair.policy_logits").narrow(0, 0, 4);
    let rl = t("pair.ref_logits").narrow(0, 0, 4);
    let same = FakeModel::new(vec![(
        same_ids.shallow_clone(),
        Tensor::cat(&[&pl, &pl], 0),
        Tensor::cat(&[&rl, &rl], 0),
    )]);
    let b = batch(
        vec![
            ("input_ids", same_ids),
            ("attention_mask", Tensor::cat(&[&am, &am], 0)),
            ("completion_mask", Tensor::cat(&[&cm, &cm], 0)),
        ],
        serde_json::json!({}),
    );
    for name in ["dpo", "orpo", "simpo"] {
        let out = reg.objective(name, "{}").unwrap().loss(&b, &same).unwrap();
        assert!(out.loss.double_value(&[]).is_finite(), "{name}");
        assert_eq!(out.metrics.iter().find(|(k, _)| k == "pairs/identical").unwrap().1, 4.0);
    }
    let out = reg.objective("dpo", "{}").unwrap().loss(&b, &same).unwrap();
    assert!((out.loss.double_value(&[]) - std::f64::consts::LN_2).abs() < 1e-12);
    out.loss.backward();
    // The chosen and rejected rows are separate logits here; a model computes both from the
    // same weights, so their gradients cancel.
    let g = same.table[0].1.grad();
    let net = g.narrow(0, 0, 4) + g.narrow(0, 4, 4);
    assert!(
        g.abs().max().double_value(&[]) > 1e-6 && net.abs().max().double_value(&[]) < 1e-12,
        "identical pairs carry no gradient"
    );
    // A completion with no tokens; an odd number of rows.
    let empty = t("pair.completion_mask");
    let _ = empty.narrow(0, 5, 1).fill_(0);
    let b = batch(
        vec![
            ("input_ids", t("pair.input_ids")),
            ("attention_mask", t("pair.attention_mask")),
            ("completion_mask", empty),
        ],
        serde_json::json!({}),
    );
    let e = reg.objective("dpo", "{}").unwrap().loss(&b, &model()).unwrap_err();
    assert!(e.message().contains("pair 1: the rejected completion has no tokens"), "{e}");
    let odd = t("pair.input_ids").narrow(0, 0, 7);
    let b = batch(
        vec![
            ("input_ids", odd.shallow_clone()),
            ("attention_mask", odd.ones_like()),
            ("completion_mask", odd.ones_like()),
        ],
        serde_json::json!({}),
    );
    let e = reg.objective("dpo", "{}").unwrap().loss(&b, &model()).unwrap_err();
    assert!(e.message().contains("2·pairs rows"), "{e}");
    // GRPO: NaN advantages and a dapo count below the micro-batch's tokens.
    let case = cases_of(&["grpo"]).into_iter().find(|c| c["name"] == "grpo-dapo-beta0.0").unwrap();
    let tensors = grpo_tensors(&case);
    let _ = tensors[4].1.narrow(0, 0, 1).fill_(f64::NAN);
    let e = reg
        .objective("grpo", &case["config"].to_string())
        .unwrap()
        .loss(&batch(tensors, serde_json::json!({})), &grpo_model())
        .unwrap_err();
    assert!(e.message().contains("`advantages`") && e.message().contains("non-finite"), "{e}");
    let e = reg
        .objective("grpo", &case["config"].to_string())
        .unwrap()
        .loss(
            &batch(grpo_tensors(&case), serde_json::json!({"num_items_in_batch": 3})),
            &grpo_model(),
        )
        .unwrap_err();
    assert!(e.message().contains("`num_items_in_batch` = 3"), "{e}");
    // KTO without its KL batch.
    let b = batch(
        vec![
            ("input_ids", t("kto.input_ids")),
            ("attention_mask", t("kto.attention_mask")),
            ("completion_mask", t("kto.completion_mask")),
            ("kto_desirable", t("kto.label.kto")),
        ],
        serde_json::json!({}),
    );
    let kmodel =
        FakeModel::new(vec![(t("kto.input_ids"), t("kto.policy_logits"), t("kto.ref_logits"))]);
    let e = reg.objective("kto", "{}").unwrap().loss(&b, &kmodel).unwrap_err();
    assert!(e.message().contains("KL_input_ids"), "{e}");
}

#[test]
fn configs_are_checked_and_name_the_key() {
    let reg = registry();
    let err = |name: &str, cfg: &str| {
        reg.objective(name, cfg)
            .err()
            .unwrap_or_else(|| panic!("{name} {cfg} accepted"))
            .to_string()
    };
    assert!(err("dpo", r#"{"betta": 0.1}"#).contains("unknown field `betta`"));
    assert!(err("dpo", r#"{"loss_type": "sigmod"}"#).contains("unknown loss type `sigmod`"));
    assert!(err("dpo", r#"{"loss_type": "robust", "label_smoothing": 0.5}"#)
        .contains("`label_smoothing`"));
    assert!(err("dpo", r#"{"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}"#)
        .contains("`loss_weights`"));
    assert!(err("dpo", r#"{"beta": 0}"#).contains("`beta`"));
    assert!(err("simpo", r#"{"loss_type": "dpo"}"#).contains("`loss_type`"));
    assert!(err("kto", r#"{"desirable_weight": -1}"#).contains("`desirable_weight`"));
    assert!(err("grpo", r#"{"loss_type": "ppo"}"#).contains("`loss_type`"));
    assert!(err("grpo", r#"{"num_generations": 1}"#).contains("`num_generations`"));
    assert!(err("grpo", r#"{"scale_rewards": "sometimes"}"#).contains("`scale_rewards`"));
    assert!(err("orpo", r#"{"lambda": 0.1}"#).contains("unknown field `lambda`"));
    // `gamma` is SimPO's alias of `simpo_gamma`; `needs` says what the host must provide.
    assert!(reg.objective("simpo", r#"{"gamma": 1.0}"#).is_ok());
    assert_eq!(
        reg.objective("dpo", "{}").unwrap().needs(),
        vec!["preference_pairs".to_string(), "reference".to_string()]
    );
    assert_eq!(
        reg.objective("dpo", r#"{"reference_free": true}"#).unwrap().needs(),
        vec!["preference_pairs".to_string()]
    );
    assert_eq!(
        reg.objective("grpo", r#"{"beta": 0.04}"#).unwrap().needs(),
        vec!["generation".to_string(), "rewards".to_string(), "reference".to_string()]
    );
}
