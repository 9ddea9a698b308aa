//! RLHF end to end through `ferrotune train` (issue 21): a reward model (`objective:
//! reward_model`) learns a synthetic preference and generalises to held-out pairs;
//! transformers + peft load its SEQ_CLS adapter (and the merged sequence-classification
//! model) and give our scores; two ranks give one process's losses; PPO (`objective: ppo`)
//! raises a rule-based reward and the trained reward model's score of its completions; bad
//! reward and PPO configurations are refused by name.
//!
//! Needs `cargo build --workspace` (the CLI and the lora, align, rewards, textdata plugins).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::model::{CausalLM, ForwardArgs};
use ferrotune::peft::PeftModel;
use ferrotune::train::reward_model::RewardModel;
use ferrotune_plugin_api::RewardInput;
use ferrotune_tests::adapter_parity::saved_tensors;
use ferrotune_tests::align::{
    launch2, mean, preference_rows, train, write_rows, AlignFixture, Lcg,
};
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const WORDS: usize = 24;

type Fixture = AlignFixture;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // Without a decoder, decoding joins the tokens with spaces: a completion decoded and
        // encoded again (what a reward model reads; the reward API carries text) keeps its
        // words even where the policy put no space between them.
        AlignFixture::new("rlhf-train", WORDS, |tokenizer| {
            let mut t: Value =
                serde_json::from_str(&std::fs::read_to_string(tokenizer).unwrap()).unwrap();
            t["decoder"] = Value::Null;
            std::fs::write(tokenizer, t.to_string()).unwrap();
        })
    })
}

fn config(f: &Fixture, name: &str, body: &str) -> PathBuf {
    f.config(name, body)
}

fn series(f: &Fixture, name: &str, key: &str) -> Vec<f64> {
    f.series(name, key)
}

fn metrics(f: &Fixture, name: &str) -> Vec<Value> {
    f.metrics(name)
}

fn reward_model_config(f: &Fixture, name: &str, memory: &str, training: &str) -> PathBuf {
    let data = write_rows(
        &f.work.join(format!("{name}-prefs.jsonl")),
        &preference_rows(64, 7, WORDS as u64, Some(0.5)),
    );
    config(
        f,
        name,
        &format!(
            "objective: {{plugin: reward_model}}\nmemory: {memory}\n\
             optimizer: {{lr: 5.0e-3}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: alpaca, path: {}, config: {{ranking: true}}, eval_ratio: 0.25}}\n\
             training: {training}\n",
            data.display()
        ),
    )
}

/// The reward model the PPO test scores with: trained once, its run's metrics kept.
fn reward_model() -> &'static PathBuf {
    static RM: OnceLock<PathBuf> = OnceLock::new();
    RM.get_or_init(|| {
        let f = fixture();
        let cfg = reward_model_config(
            f,
            "rm",
            "{plugin: single}",
            "{epochs: 2, micro_batch_size: 4, eval_steps: 6, progress_bar: false}",
        );
        let (out, err) = train(&cfg);
        assert!(out.status.success(), "{err}");
        f.work.join("rm")
    })
}

/// Our scores of `rows` (token ids without 0) through the base + the SEQ_CLS adapter in `dir`.
fn our_scores(f: &Fixture, dir: &Path, rows: &[Vec<i64>]) -> Vec<f64> {
    let base = CausalLM::load(&f.model, Device::Cpu, Kind::Float).unwrap();
    let mut m = PeftModel::new(base);
    m.load_reward_adapter(dir, &registry()).unwrap();
    let width = rows.iter().map(Vec::len).max().unwrap();
    let pad = |r: &Vec<i64>, v: i64, fill: i64| -> Vec<i64> {
        r.iter().map(|_| v).chain(std::iter::repeat_n(fill, width - r.len())).collect()
    };
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0, width - r.len())))
        .collect();
    let mask: Vec<i64> = rows.iter().flat_map(|r| pad(r, 1, 0)).collect();
    let b = rows.len() as i64;
    let ids = Tensor::from_slice(&ids).view([b, width as i64]);
    let mask = Tensor::from_slice(&mask).view([b, width as i64]);
    let per_position = tch::no_grad(|| {
        let hidden =
            m.forward(ForwardArgs::ids(&ids).mask(Some(&mask)).mode(m.eval_mode()).hidden())?;
        m.scores(&hidden, m.eval_mode())
    })
    .unwrap();
    let last = Tensor::from_slice(&rows.iter().map(|r| r.len() as i64 - 1).collect::<Vec<_>>());
    let s = per_position.gather(1, &last.unsqueeze(1), false).squeeze_dim(1);
    Vec::<f64>::try_from(&s.to_kind(Kind::Double)).unwrap()
}

/// A reward model on a synthetic preference (chosen answers from one half of the vocabulary,
/// rejected from the other) reaches held-out accuracy ≥ 0.9; its adapter is peft's SEQ_CLS
/// layout, which transformers' AutoModelForSequenceClassification + peft load with our
/// scores, and `ferrotune merge` writes a sequence-classification model that transformers
/// loads with the same scores.
#[test]
fn reward_model_learns_held_out_preferences_and_transformers_loads_it() {
    let f = fixture();
    let rm = reward_model();
    let m = metrics(f, "rm");
    let evals: Vec<(u64, f64, f64)> = m
        .iter()
        .filter_map(|l| {
            Some((l["step"].as_u64()?, l["eval/accuracy"].as_f64()?, l["eval/margin"].as_f64()?))
        })
        .collect();
    let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    println!("reward model held-out (step, accuracy, margin): {evals:?}");
    println!(
        "train loss first {:.4} last {:.4} ({} steps)",
        losses[0],
        losses[losses.len() - 1],
        losses.len()
    );
    let (_, acc, margin) = *evals.last().expect("eval metrics logged");
    assert!(acc >= 0.9, "held-out accuracy {acc} (want ≥ 0.9)");
    assert!(margin > 0.0, "held-out margin {margin}");
    for key in [
        "train/accuracy",
        "train/margin",
        "train/mean_reward",
        "train/min_reward",
        "train/max_reward",
    ] {
        assert!(m.iter().any(|l| l.get(key).is_some()), "{key} never logged");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(rm.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS", "{config}");
    assert!(config["modules_to_save"].as_array().unwrap().contains(&json!("score")), "{config}");
    let names: Vec<String> = saved_tensors(rm).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"base_model.model.score.weight".to_string()), "{names:?}");

    let merged = f.work.join("rm-merged");
    let o = ferrotune(&[
        "merge",
        "--model",
        f.model.to_str().unwrap(),
        "--adapter",
        rm.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "merge: {}", stderr(&o));
    // A reward model's adapter scores; `generate` refuses it by name.
    let o = ferrotune(&[
        "generate",
        "--model",
        f.model.to_str().unwrap(),
        "--adapter",
        rm.to_str().unwrap(),
        "--prompt",
        "w1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not generate"), "{}", stderr(&o));
    let rows: Vec<Vec<i64>> = vec![
        vec![1, 7, 4, 20, 12, 2, 4, 1, 8, 4, 9, 10, 11, 2, 4],
        vec![1, 7, 4, 20, 12, 2, 4, 1, 8, 4, 25, 26, 30, 2, 4],
        vec![1, 7, 4, 15, 2, 4, 1, 8, 4, 13],
        vec![5, 6, 7],
    ];
    let ids = f.work.join("rm-ids.json");
    std::fs::write(&ids, json!(rows).to_string()).unwrap();
    let out = f.work.join("rm-reference.json");
    let py = repo_root().join("tests/python/reward_model_reference.py");
    run_python(&[
        py.as_os_str(),
        f.model.as_os_str(),
        rm.as_os_str(),
        merged.as_os_str(),
        ids.as_os_str(),
        out.as_os_str(),
    ]);
    let theirs: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(theirs["architectures"], json!(["Qwen2ForSequenceClassification"]));
    let ours = our_scores(f, rm, &rows);
    for key in ["adapter", "merged"] {
        let t: Vec<f64> =
            theirs[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let worst = ours.iter().zip(&t).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!(
            "scores, ours {ours:?}, transformers + peft ({key}) {t:?}: max |diff| {worst:.2e}"
        );
        assert!(worst <= 1e-5, "{key}: our scores differ from transformers' by {worst}");
    }
    // A chosen-style answer out-scores a rejected-style one for the same prompt.
    assert!(ours[0] > ours[1], "{ours:?}");

    // As a reward of a run: each completion is encoded as the training rows were (the
    // sample's prompt, the completion as the final assistant turn, the chat template's end),
    // and scored at its last token: the scores of the same rows encoded by hand.
    let scorer =
        RewardModel::load(&f.model, Some(rm), Device::Cpu, Kind::Float, &registry(), 256).unwrap();
    let sample = json!({"messages": [{"role": "user", "content": "w11 w3"}, {"role": "assistant", "content": "w5"}]});
    let inputs: Vec<RewardInput> = ["w0 w1 w2", "w16 w17 w21"]
        .iter()
        .map(|c| RewardInput {
            prompt: "ignored when the sample is given".into(),
            completion: c.to_string(),
            sample_json: sample.to_string(),
        })
        .collect();
    let as_reward = scorer.score(&inputs).unwrap();
    // `<|im_start|>user\nw11 w3<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>\n`
    let row = |completion: &[i64]| -> Vec<i64> {
        [&[1, 7, 4, 20, 5, 12, 2, 4, 1, 8, 4][..], completion, &[2, 4]].concat()
    };
    let by_hand = our_scores(f, rm, &[row(&[9, 5, 10, 5, 11]), row(&[25, 5, 26, 5, 30])]);
    println!("as a reward: {as_reward:?}, the rows encoded by hand: {by_hand:?}");
    for (a, b) in as_reward.iter().zip(&by_hand) {
        assert!(
            (a - b).abs() <= 1e-5,
            "reward-model scores {as_reward:?} vs the rows' {by_hand:?}"
        );
    }
    assert!(as_reward[0] > as_reward[1], "{as_reward:?}");
}

/// The reward model under `ddp` on 2 ranks with 2 pairs each gives one process's losses and
/// accuracies with 4.
#[test]
fn reward_model_on_two_ranks_equals_one_process() {
    let f = fixture();
    let training =
        |micro: usize| format!("{{max_steps: 4, micro_batch_size: {micro}, progress_bar: false}}");
    let (out, err) = train(&reward_model_config(f, "rm-one", "{plugin: single}", &training(4)));
    assert!(out.status.success(), "{err}");
    let (out, err) = launch2(&reward_model_config(f, "rm-ddp", "{plugin: ddp}", &training(2)));
    assert!(out.status.success(), "{err}");
    for key in ["loss", "grad_norm", "train/accuracy", "train/margin", "train/mean_reward"] {
        let (a, b) = (series(f, "rm-one", key), series(f, "rm-ddp", key));
        assert_eq!((a.len(), b.len()), (4, 4), "{key}: {a:?} vs {b:?}");
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        println!(
            "reward model {key}: one process {a:?}, 2 ranks {b:?}, max difference {worst:.2e}"
        );
        assert!(worst <= 1e-5, "{key} on 2 ranks differs from one process by {worst}");
    }
}

fn ppo_config(f: &Fixture, name: &str, rewards: &str, extra: &str, training: &str) -> PathBuf {
    let mut g = Lcg(3);
    let rows: Vec<Value> =
        (0..32).map(|_| json!({"instruction": g.words(3, 0, 24), "output": "w3"})).collect();
    let data = write_rows(&f.work.join(format!("{name}-prompts.jsonl")), &rows);
    config(
        f,
        name,
        &format!(
            "objective: {{plugin: ppo, response_length: 8, num_ppo_epochs: 2, seed: 1{extra}}}\n\
             rewards: {rewards}\n\
             optimizer: {{lr: 2.0e-2}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: alpaca, path: {}}}\ntraining: {training}\n",
            data.display()
        ),
    )
}

/// PPO with a rule-based reward (the completion contains `w3`) raises the mean reward between
/// its first and last rollouts, logs TRL's metrics, and leaves a causal-LM adapter (the value
/// head is kept beside it, not in it).
#[test]
fn ppo_raises_a_rule_based_reward() {
    let f = fixture();
    let cfg = ppo_config(
        f,
        "ppo",
        r#"[{plugin: format, name: has_w3, pattern: 'w3', full_match: false}]"#,
        "",
        "{max_steps: 40, micro_batch_size: 32, progress_bar: false}",
    );
    let (out, err) = train(&cfg);
    assert!(out.status.success(), "{err}");
    let m = metrics(f, "ppo");
    let scores = series(f, "ppo", "train/objective/scores");
    assert!(scores.len() >= 20, "a rollout every other step: {scores:?}");
    for key in [
        "train/objective/kl",
        "train/objective/rlhf_reward",
        "train/objective/non_score_reward",
        "train/policy/approxkl_avg",
        "train/policy/clipfrac_avg",
        "train/loss/policy_avg",
        "train/loss/value_avg",
        "train/val/clipfrac_avg",
        "train/val/ratio",
    ] {
        assert!(
            m.iter().any(|l| l.get(key).is_some()),
            "{key} never logged: {}",
            m.last().unwrap()
        );
    }
    // Every rollout samples all 32 prompts (TRL's default temperature 0.7).
    let (first, last) = (mean(&scores[..3]), mean(&scores[scores.len() - 10..]));
    println!(
        "PPO mean reward: first 3 rollouts {first:.3}, last 10 {last:.3}; per rollout {scores:?}"
    );
    assert!(last > first + 0.15, "mean reward did not rise: {first:.3} → {last:.3}");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(f.work.join("ppo/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "CAUSAL_LM", "{config}");
    let names: Vec<String> =
        saved_tensors(&f.work.join("ppo")).into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n.contains("v_head") || n.contains("score")), "{names:?}");
}

/// PPO scored by the reward model trained above: its score of the policy's completions rises.
#[test]
fn ppo_raises_the_reward_models_score() {
    let f = fixture();
    let rm = reward_model();
    let rewards = format!("[{{model: {}, adapter: {}}}]", f.model.display(), rm.display());
    let cfg = ppo_config(
        f,
        "ppo-rm",
        &rewards,
        "",
        "{max_steps: 30, micro_batch_size: 16, progress_bar: false}",
    );
    let (out, err) = train(&cfg);
    assert!(out.status.success(), "{err}");
    let scores = series(f, "ppo-rm", "train/objective/scores");
    assert!(scores.len() >= 15, "{scores:?}");
    let (first, last) = (mean(&scores[..3]), mean(&scores[scores.len() - 5..]));
    println!("PPO with the reward model, mean score: first 3 rollouts {first:.3}, last 5 {last:.3}; per rollout {scores:?}");
    assert!(last > first + 0.3, "the reward model's score did not rise: {first:.3} → {last:.3}");
}

/// PPO under ZeRO stage 2 on 2 ranks (ranks generate completions of different lengths) runs
/// every step with its rollout metrics logged.
#[test]
fn ppo_on_two_ranks() {
    let f = fixture();
    let cfg = ppo_config(
        f,
        "ppo-ranks",
        r#"[{plugin: format, name: has_w3, pattern: 'w3', full_match: false}]"#,
        "",
        "{max_steps: 4, micro_batch_size: 4, progress_bar: false}",
    );
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{yaml}memory: {{plugin: zero, stage: 2}}\n")).unwrap();
    let (out, err) = launch2(&cfg);
    assert!(out.status.success(), "{err}");
    let losses = series(f, "ppo-ranks", "loss");
    let scores = series(f, "ppo-ranks", "train/objective/scores");
    println!("PPO on 2 ranks: losses {losses:?}, rollout scores {scores:?}");
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert_eq!(scores.len(), 2, "a rollout every num_ppo_epochs = 2 steps: {scores:?}");
}

/// Wrong reward and PPO configurations are refused by name before training.
#[test]
fn bad_reward_model_and_ppo_configs_are_refused_by_name() {
    let f = fixture();
    let rule = r#"[{plugin: format, pattern: 'w3'}]"#;
    let training = "{max_steps: 1, micro_batch_size: 2, progress_bar: false}";
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "both",
            format!("[{{plugin: format, model: {}}}]", f.model.display()),
            String::new(),
            "`plugin` and `model` both given",
        ),
        (
            "not-rm",
            format!("[{{model: {}}}]", f.model.display()),
            String::new(),
            "not a reward model",
        ),
        ("epochs", rule.to_string(), ", num_ppo_epochs: 0".to_string(), "num_ppo_epochs"),
    ];
    for (name, rewards, extra, want) in cases {
        let (out, err) = train(&ppo_config(f, &format!("bad-{name}"), &rewards, &extra, training));
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(want), "{name}: want `{want}` in: {err}");
    }
    // training.num_iterations must agree with PPO's num_ppo_epochs × num_mini_batches.
    let (out, err) = train(&ppo_config(
        f,
        "bad-iterations",
        rule,
        "",
        "{max_steps: 1, micro_batch_size: 2, num_iterations: 3, progress_bar: false}",
    ));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("training.num_iterations"), "{err}");
}

/// PPO on Qwen2-VL prompts that carry images (the story sample's frames): every rollout
/// generates with its rows' images, and the policy, reference and value forwards carry them.
#[test]
fn ppo_on_image_prompts_of_a_vision_model() {
    let f = fixture();
    let model = f.work.join("vl-model");
    init_tiny_vl_model(&model, 3);
    let story = repo_root().join("datasets/story-llava");
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(story.join("train.json")).unwrap()).unwrap();
    let prompts: Vec<Value> = rows[..4]
        .iter()
        .map(|row| {
            let image = story.join(row["image"][0].as_str().unwrap()).display().to_string();
            json!({"id": row["id"], "image": [image], "conversations": [
                {"from": "human", "value": "Create a story based on this image.\n<image>"},
                {"from": "gpt", "value": "A story."}]})
        })
        .collect();
    let data = f.work.join("vl-prompts.json");
    std::fs::write(&data, Value::Array(prompts).to_string()).unwrap();
    let out = f.work.join("ppo-vl");
    let cfg = f.work.join("ppo-vl.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {}\noutput_dir: {}\n\
             adapter: {{plugin: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}}\n\
             objective: {{plugin: ppo, response_length: 4, num_ppo_epochs: 2, seed: 1}}\n\
             rewards: [{{plugin: format, pattern: 'a', full_match: false}}]\n\
             data: {{plugin: llava, path: {}, cutoff_len: 512, image_max_pixels: 50176}}\n\
             training: {{max_steps: 4, micro_batch_size: 2, progress_bar: false}}\n",
            model.display(),
            out.display(),
            data.display()
        ),
    )
    .unwrap();
    let (o, err) = train(&cfg);
    assert!(o.status.success(), "{err}");
    let m = read_jsonl(&out.join("metrics.jsonl"));
    let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    let lengths: Vec<f64> =
        m.iter().filter_map(|l| l["train/completions/mean_length"].as_f64()).collect();
    println!("PPO on image prompts: losses {losses:?}, completion lengths {lengths:?}");
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert_eq!(lengths.len(), 2, "a rollout every num_ppo_epochs = 2 steps");
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// A reward model trained in full (`finetuning: full`): the score head trains with the model's
/// weights and the output is a `…ForSequenceClassification` directory (no lm_head) that loads
/// as a reward model; transformers reads its architecture.
#[test]
fn reward_model_with_full_finetuning_writes_a_sequence_classifier() {
    let f = fixture();
    let data = write_rows(
        &f.work.join("rm-full-prefs.jsonl"),
        &preference_rows(8, 5, WORDS as u64, Some(0.5)),
    );
    let out = f.work.join("rm-full");
    let cfg = f.work.join("rm-full.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {}\noutput_dir: {}\nfinetuning: full\nobjective: {{plugin: reward_model}}\n\
             optimizer: {{lr: 1.0e-3}}\n\
             data: {{plugin: alpaca, path: {}, config: {{ranking: true}}}}\n\
             training: {{max_steps: 2, micro_batch_size: 4, progress_bar: false}}\n",
            f.model.display(),
            out.display(),
            data.display()
        ),
    )
    .unwrap();
    let (o, err) = train(&cfg);
    assert!(o.status.success(), "{err}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"], json!(["Qwen2ForSequenceClassification"]), "{config}");
    let names: Vec<String> = Tensor::read_safetensors(out.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"score.weight".to_string()), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("lm_head") || n.starts_with("v_head")),
        "{names:?}"
    );
    let scorer = RewardModel::load(&out, None, Device::Cpu, Kind::Float, &registry(), 256).unwrap();
    let input = RewardInput {
        prompt: "w1 w2".into(),
        completion: " w3".into(),
        sample_json: String::new(),
    };
    let s = scorer.score(&[input]).unwrap();
    assert!(s[0].is_finite(), "{s:?}");
}
