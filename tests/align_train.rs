//! Alignment objectives end to end through `ferrotune train`: DPO on a synthetic preference
//! set raises the held-out reward accuracy well above chance, GRPO with a programmatic reward
//! raises the mean reward; ORPO, SimPO and KTO train on the host's batches; and bad inputs
//! (identical pairs, a missing `rejected`, rewards that answer NaN or the wrong count, prompts
//! that leave no room for a completion, rewards without an objective that uses them) are
//! clear errors or counted skips.
//!
//! Needs `cargo build --workspace` (the CLI and the lora, align, rewards, textdata, testkit plugins).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune_tests::align::{
    launch2, mean, preference_rows, train, write_rows, AlignFixture, Lcg,
};
use ferrotune_tests::*;
use serde_json::{json, Value};

const WORDS: usize = 24;

type Fixture = AlignFixture;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| AlignFixture::new("align-train", WORDS, |_| {}))
}

fn config(f: &Fixture, name: &str, body: &str) -> PathBuf {
    f.config(name, body)
}

fn metrics(f: &Fixture, name: &str) -> Vec<Value> {
    f.metrics(name)
}

#[test]
fn dpo_raises_held_out_reward_accuracy() {
    let f = fixture();
    let data = write_rows(&f.work.join("prefs.jsonl"), &preference_rows(64, 7, WORDS as u64, None));
    let cfg = config(
        f,
        "dpo",
        &format!(
            "objective: {{plugin: dpo, beta: 0.1}}\n\
             optimizer: {{lr: 5.0e-3}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: alpaca, path: {}, config: {{ranking: true}}, eval_ratio: 0.25}}\n\
             training: {{epochs: 2, micro_batch_size: 4, eval_steps: 6, progress_bar: false}}\n",
            data.display()
        ),
    );
    let (out, err) = train(&cfg);
    assert!(out.status.success(), "{err}");
    let m = metrics(f, "dpo");
    let evals: Vec<(u64, f64, f64)> = m
        .iter()
        .filter_map(|l| {
            Some((
                l["step"].as_u64()?,
                l["eval/rewards/accuracies"].as_f64()?,
                l["eval/rewards/margins"].as_f64()?,
            ))
        })
        .collect();
    println!("held-out (step, reward accuracy, margin): {evals:?}");
    let train_losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    println!(
        "train loss first {:.4} last {:.4} ({} steps)",
        train_losses[0],
        train_losses[train_losses.len() - 1],
        train_losses.len()
    );
    // 16 held-out pairs; at step 0 the policy equals the reference (accuracy 0: no reward
    // is strictly larger), chance is 0.5.
    let (_, last_acc, last_margin) = *evals.last().expect("eval metrics logged");
    assert!(last_acc >= 0.85, "held-out reward accuracy {last_acc} (want ≥ 0.85)");
    assert!(last_margin > 0.0, "held-out margin {last_margin}");
    assert!(
        (train_losses[0] - std::f64::consts::LN_2).abs() < 1e-3,
        "the first DPO loss is ln 2 (policy = reference): {}",
        train_losses[0]
    );
    assert!(train_losses[train_losses.len() - 1] < 0.5, "{train_losses:?}");
    assert!(f.work.join("dpo/adapter_model.safetensors").is_file());
}

#[test]
fn orpo_simpo_and_kto_train_on_the_hosts_batches() {
    let f = fixture();
    let data =
        write_rows(&f.work.join("prefs-small.jsonl"), &preference_rows(16, 11, WORDS as u64, None));
    let mut g = Lcg(5);
    let kto_rows: Vec<Value> = (0..16)
        .map(|i| {
            let good = i % 2 == 0;
            let answer = if good { g.words(3, 0, 12) } else { g.words(3, 12, 24) };
            json!({"instruction": g.words(3, 0, 24), "output": answer, "kto_tag": good})
        })
        .collect();
    let kto_data = write_rows(&f.work.join("kto.jsonl"), &kto_rows);
    for (name, objective, path, ranking) in [
        ("orpo", "{plugin: orpo, beta: 0.1}", &data, true),
        ("simpo", "{plugin: simpo, beta: 2.0, simpo_gamma: 0.5}", &data, true),
        ("kto", "{plugin: kto, beta: 0.1}", &kto_data, false),
    ] {
        let cfg = config(
            f,
            name,
            &format!(
                "objective: {objective}\noptimizer: {{lr: 5.0e-3}}\nscheduler: {{type: constant}}\n\
                 data: {{plugin: alpaca, path: {}, config: {{ranking: {ranking}}}}}\n\
                 training: {{epochs: 3, micro_batch_size: 4, progress_bar: false}}\n",
                path.display()
            ),
        );
        let (out, err) = train(&cfg);
        assert!(out.status.success(), "{name}: {err}");
        let m = metrics(f, name);
        let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
        let (first, last) = (mean(&losses[..3]), mean(&losses[losses.len() - 3..]));
        println!("{name}: mean loss of the first 3 steps {first:.4}, of the last 3 {last:.4}; last line {}", m.last().unwrap());
        assert!(last < first, "{name}: loss did not fall: {losses:?}");
        assert!(
            m.last().unwrap().get("train/rewards/chosen").is_some() || name == "simpo",
            "{name}: {}",
            m.last().unwrap()
        );
    }
}

/// GRPO on a toy task: 16 prompts; `rewards` decides what is good (the tests reward the word
/// `w3` in the completion).
fn grpo_config(
    f: &Fixture,
    name: &str,
    rewards: &str,
    max_completion_length: usize,
    training: &str,
) -> PathBuf {
    let mut g = Lcg(3);
    let rows: Vec<Value> =
        (0..16).map(|_| json!({"instruction": g.words(3, 0, 24), "output": "w3"})).collect();
    let data = write_rows(&f.work.join(format!("{name}-prompts.jsonl")), &rows);
    config(
        f,
        name,
        &format!(
            "objective: {{plugin: grpo, num_generations: 8, max_completion_length: {max_completion_length}, temperature: 1.0, seed: 1}}\n\
             rewards: {rewards}\n\
             optimizer: {{lr: 2.0e-2}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: alpaca, path: {}}}\ntraining: {training}\n",
            data.display()
        ),
    )
}

#[test]
fn grpo_raises_the_mean_reward() {
    let f = fixture();
    let cfg = grpo_config(
        f,
        "grpo",
        r#"[{plugin: format, name: has_w3, pattern: 'w3', full_match: false}]"#,
        8,
        "{max_steps: 60, micro_batch_size: 4, progress_bar: false, num_iterations: 2}",
    );
    let (out, err) = train(&cfg);
    assert!(out.status.success(), "{err}");
    let m = metrics(f, "grpo");
    let rewards: Vec<f64> =
        m.iter().filter_map(|l| l["train/rewards/has_w3/mean"].as_f64()).collect();
    assert_eq!(rewards.len(), 60, "a reward metric per step: {:?}", m.last());
    for key in [
        "train/reward_std",
        "train/completions/mean_length",
        "train/clip_ratio/region_mean",
        "train/entropy",
    ] {
        assert!(m.last().unwrap().get(key).is_some(), "{key} missing: {}", m.last().unwrap());
    }
    // num_iterations 2: steps 2k and 2k+1 share a generation batch, so their rewards agree.
    assert!(rewards.chunks(2).all(|c| c[0] == c[1]), "{rewards:?}");
    let (first, last) = (mean(&rewards[..10]), mean(&rewards[rewards.len() - 10..]));
    println!("GRPO mean reward: first 10 steps {first:.3}, last 10 steps {last:.3}; per step {rewards:?}");
    assert!(last > first + 0.15, "mean reward did not rise: {first:.3} → {last:.3}");
}

#[test]
fn bad_alignment_inputs_are_clear_errors_or_counted_skips() {
    let f = fixture();
    // An identical pair is skipped and counted; the other pairs train.
    let mut rows = preference_rows(4, 13, WORDS as u64, None);
    rows[1]["rejected"] = rows[1]["chosen"].clone();
    let data = write_rows(&f.work.join("identical.jsonl"), &rows);
    let body = |data: &Path, objective: &str| {
        format!(
            "objective: {objective}\ndata: {{plugin: alpaca, path: {}, config: {{ranking: true}}}}\n\
             training: {{max_steps: 1, micro_batch_size: 4, progress_bar: false}}\n",
            data.display()
        )
    };
    let (out, err) = train(&config(f, "identical", &body(&data, "{plugin: dpo}")));
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("1 samples were skipped")
            && err.contains("`chosen` and `rejected` are identical"),
        "{err}"
    );
    // `data check` reports it as skipped, not as an error that would stop the run.
    let check = ferrotune(&["data", "check", f.work.join("identical.yaml").to_str().unwrap()]);
    let report = stdout(&check);
    assert!(
        check.status.success()
            && report.contains("4 rows, 3 usable, 0 with errors, 1 skipped")
            && report.contains("row 1: skipped:"),
        "{report}"
    );

    // A pair without `rejected`: the data plugin names the column and the row.
    let mut rows = preference_rows(3, 17, WORDS as u64, None);
    rows[2].as_object_mut().unwrap().remove("rejected");
    let data = write_rows(&f.work.join("no-rejected.jsonl"), &rows);
    let (out, err) = train(&config(f, "no-rejected", &body(&data, "{plugin: dpo}")));
    assert!(!out.status.success());
    assert!(
        err.contains("column `rejected` is missing") && err.contains("no-rejected.jsonl:3"),
        "{err}"
    );

    // SFT rows (no pairs) given to DPO: the host says what the objective needs.
    let sft =
        write_rows(&f.work.join("sft.jsonl"), &[json!({"instruction": "w1 w2", "output": "w3"})]);
    let (out, err) = train(&config(
        f,
        "sft-for-dpo",
        &format!("objective: {{plugin: dpo}}\ndata: {{plugin: alpaca, path: {}}}\ntraining: {{max_steps: 1, progress_bar: false}}\n", sft.display()),
    ));
    assert!(!out.status.success());
    assert!(
        err.contains("as preference pairs") && err.contains("needs `chosen` and `rejected`"),
        "{err}"
    );

    // KTO rows without a label.
    let (out, err) = train(&config(
        f,
        "kto-unlabelled",
        &format!("objective: {{plugin: kto}}\ndata: {{plugin: alpaca, path: {}}}\ntraining: {{max_steps: 1, progress_bar: false}}\n", sft.display()),
    ));
    assert!(!out.status.success());
    assert!(err.contains("KTO needs each row's desirability"), "{err}");

    // Rewards that answer NaN or the wrong number of scores stop the run, naming the reward.
    for (mode, says) in
        [("nan", "non-finite score"), ("wrong_count", "returned 17 scores for 16 completions")]
    {
        let name = format!("grpo-{mode}");
        let cfg = grpo_config(
            f,
            &name,
            &format!("[{{plugin: testkit-misbehaving, mode: {mode}}}]"),
            4,
            "{max_steps: 1, micro_batch_size: 2, progress_bar: false}",
        );
        let (out, err) = train(&cfg);
        assert!(!out.status.success(), "{mode}: must fail");
        assert!(
            err.contains("reward `testkit-misbehaving`") && err.contains(says),
            "{mode}: {err}"
        );
        assert!(!f.work.join(&name).join("adapter_model.safetensors").exists());
    }

    // Prompts that leave no room for a completion within cutoff_len are skipped and counted;
    // when none is left, the run says so.
    let cfg = grpo_config(
        f,
        "grpo-no-room",
        "[{plugin: format, pattern: w3}]",
        4,
        "{max_steps: 1, progress_bar: false}",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("{plugin: alpaca,", "{plugin: alpaca, cutoff_len: 8,");
    std::fs::write(&cfg, text).unwrap();
    let (out, err) = train(&cfg);
    assert!(!out.status.success());
    assert!(
        err.contains("leaves no room for a completion within cutoff_len 8")
            && err.contains("none of its 16 samples can be used as prompts"),
        "{err}"
    );

    // GRPO without rewards, and rewards for an objective that does not use them.
    let cfg = grpo_config(f, "grpo-no-rewards", "[]", 4, "{max_steps: 1, progress_bar: false}");
    let (out, err) = train(&cfg);
    assert!(!out.status.success());
    assert!(err.contains("objective `grpo` scores its completions with reward plugins, and the config names none"), "{err}");
    let mut text = body(
        &write_rows(&f.work.join("prefs-r.jsonl"), &preference_rows(2, 1, WORDS as u64, None)),
        "{plugin: dpo}",
    );
    text.push_str("rewards: [{plugin: format, pattern: w3}]\n");
    let (out, err) = train(&config(f, "dpo-with-rewards", &text));
    assert!(!out.status.success());
    assert!(err.contains("objective `dpo` does not use reward plugins"), "{err}");
}

/// Preference and generation objectives over 2 ranks (Gloo on loopback): DPO under `ddp`
/// with 2 pairs per rank gives the per-step losses and reward accuracies of one process
/// with 4; GRPO under `zero` stage 2 (ranks generate completions of different lengths)
/// finishes every step on both ranks with its rewards logged.
#[test]
fn dpo_and_grpo_on_two_ranks() {
    let f = fixture();
    let data =
        write_rows(&f.work.join("prefs-ranks.jsonl"), &preference_rows(32, 11, WORDS as u64, None));
    let dpo = |name: &str, micro: usize, memory: &str| {
        config(
            f,
            name,
            &format!(
                "objective: {{plugin: dpo, beta: 0.1}}\nmemory: {memory}\n\
                 optimizer: {{lr: 5.0e-3}}\nscheduler: {{type: constant}}\n\
                 data: {{plugin: alpaca, path: {}, config: {{ranking: true}}}}\n\
                 training: {{max_steps: 5, micro_batch_size: {micro}, progress_bar: false}}\n",
                data.display()
            ),
        )
    };
    let (out, err) = train(&dpo("dpo-one", 4, "{plugin: single}"));
    assert!(out.status.success(), "{err}");
    let (out, err) = launch2(&dpo("dpo-ddp", 2, "{plugin: ddp}"));
    assert!(out.status.success(), "{err}");
    let series = |name: &str, key: &str| -> Vec<f64> {
        metrics(f, name).iter().filter_map(|l| l[key].as_f64()).collect()
    };
    for key in [
        "loss",
        "grad_norm",
        "train/rewards/accuracies",
        "train/rewards/margins",
        "train/logps/chosen",
    ] {
        let (a, b) = (series("dpo-one", key), series("dpo-ddp", key));
        assert_eq!((a.len(), b.len()), (5, 5), "{key}: {a:?} vs {b:?}");
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        println!("DPO {key}: one process {a:?}, 2 ranks {b:?}, max difference {worst:.2e}");
        assert!(worst <= 1e-5, "DPO {key} on 2 ranks differs from one process by {worst}");
    }

    let cfg = grpo_config(
        f,
        "grpo-ranks",
        r#"[{plugin: format, name: has_w3, pattern: 'w3', full_match: false}]"#,
        8,
        "{max_steps: 3, micro_batch_size: 2, progress_bar: false}",
    );
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{yaml}memory: {{plugin: zero, stage: 2}}\n")).unwrap();
    let (out, err) = launch2(&cfg);
    assert!(out.status.success(), "{err}");
    let rewards: Vec<f64> = metrics(f, "grpo-ranks")
        .iter()
        .filter_map(|l| l["train/rewards/has_w3/mean"].as_f64())
        .collect();
    println!("GRPO on 2 ranks, mean reward per step: {rewards:?}");
    assert_eq!(rewards.len(), 3);
    assert!(rewards.iter().all(|r| r.is_finite() && (0.0..=1.0).contains(r)));
}
