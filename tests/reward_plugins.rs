//! The reward plugins (`ferrotune-rewards`: format, exact_match, length, story_grounding)
//! through the plugin registry on hand-made completions, including the bundled
//! StoryReasoning sample's own answer (a perfect grounding score), and the host's refusal of
//! a reward that answers NaN or the wrong number of scores.
use ferrotune_plugin_api::{Reward, RewardInput};
use ferrotune_tests::*;

fn input(completion: &str, sample: &str) -> RewardInput {
    RewardInput { prompt: "p".into(), completion: completion.into(), sample_json: sample.into() }
}

#[test]
fn format_reward_scores_shape() {
    let r = registry()
        .reward("format", r#"{"pattern": "<think>.*?</think>\\s*<answer>.*?</answer>"}"#)
        .unwrap();
    let got = r
        .score(&[
            input("<think>2+2</think>\n<answer>4</answer>", "{}"),
            input("4", "{}"),
            input("<answer>4</answer>", "{}"),
        ])
        .unwrap();
    assert_eq!(got, vec![1.0, 0.0, 0.0]);
    let r = registry()
        .reward("format", r#"{"required_tags": ["think", "answer"], "partial": true}"#)
        .unwrap();
    assert_eq!(r.score(&[input("<think>x</think>", "{}")]).unwrap(), vec![0.5]);
    let e = registry().reward("format", r#"{"pattern": "(("}"#).err().unwrap().to_string();
    assert!(e.contains("`pattern`") && e.contains("format"), "{e}");
}

#[test]
fn exact_match_reads_the_reference_column() {
    let r = registry().reward("exact_match", r#"{"answer_key": "solution"}"#).unwrap();
    let s = r#"{"messages": [{"role": "user", "content": "2+2?"}], "extra": {"solution": "4"}}"#;
    let got = r
        .score(&[
            input("<answer>4</answer>", s),
            input("<answer> 4. </answer>", s),
            input("<answer>5</answer>", s),
            input("4", s),
        ])
        .unwrap();
    assert_eq!(got, vec![1.0, 1.0, 0.0, 0.0]);
    let e = r.score(&[input("<answer>4</answer>", r#"{"messages": []}"#)]).unwrap_err();
    assert!(e.message().contains("extra.solution"), "{e}");
}

#[test]
fn length_reward_target_and_penalty() {
    let r = registry().reward("length", r#"{"mode": "target", "target": 4}"#).unwrap();
    assert_eq!(
        r.score(&[input("a b c d", "{}"), input("a b", "{}"), input("", "{}")]).unwrap(),
        vec![1.0, 0.5, 0.0]
    );
    let r = registry()
        .reward("length", r#"{"mode": "penalty", "max_length": 6, "soft_cache": 2}"#)
        .unwrap();
    assert_eq!(
        r.score(&[input("a b c d", "{}"), input("a b c d e", "{}"), input("a b c d e f g", "{}")])
            .unwrap(),
        vec![0.0, -0.5, -1.0]
    );
}

/// The assistant answer of the bundled StoryReasoning sample (Qwen2-VL-Finetune JSON).
fn bundled_story() -> String {
    let text =
        std::fs::read_to_string(repo_root().join("datasets/story-llava/train.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[0]["conversations"].as_array().unwrap().iter().find(|m| m["from"] == "gpt").unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn story_grounding_scores_good_and_bad_grounding() {
    let r = registry().reward("story_grounding", "{}").unwrap();
    let good = bundled_story();
    assert!(good.contains("<gdi image1>") && good.contains("| char1 |"));
    // Each broken variant loses exactly the check it breaks (each check is a quarter).
    let unclosed = good.replacen("</gdo>", "", 1);
    let undeclared = good.replace("<gdo char2>", "<gdo char9>");
    let renamed = {
        // char1 is "Grum" in the first frame's table but char3 in the last one's.
        let last = good.rfind("| char1 |").unwrap();
        format!("{}| char3 |{}", &good[..last], &good[last + "| char1 |".len()..])
    };
    let no_think = good.replace("<think>", "").replace("</think>", "");
    let scores = r
        .score(&[
            input(&good, "{}"),
            input(&unclosed, "{}"),
            input(&undeclared, "{}"),
            input(&renamed, "{}"),
            input(&no_think, "{}"),
            input("A story.", "{}"),
        ])
        .unwrap();
    assert_eq!(scores[0], 1.0, "the data set's own answer is perfectly grounded");
    assert_eq!(scores[1], 0.75, "unclosed <gdo>");
    assert!(scores[2] > 0.75 && scores[2] < 1.0, "one undeclared id: {}", scores[2]);
    assert!(scores[3] > 0.75 && scores[3] < 1.0, "one character with two ids: {}", scores[3]);
    assert!(scores[4] <= 0.25, "no think tables: {}", scores[4]);
    assert_eq!(scores[5], 0.0);
    let strict = registry().reward("story_grounding", r#"{"strict": true}"#).unwrap();
    assert_eq!(
        strict.score(&[input(&good, "{}"), input(&undeclared, "{}")]).unwrap(),
        vec![1.0, 0.0]
    );
}

#[test]
fn host_refuses_nan_and_wrong_counts() {
    let reg = registry();
    let inputs = vec![input("a", "{}"), input("b", "{}")];
    let e = reg
        .reward("testkit-misbehaving", r#"{"mode": "nan"}"#)
        .unwrap()
        .score(&inputs)
        .unwrap_err();
    assert!(e.message().contains("non-finite"), "{e}");
    let e = reg
        .reward("testkit-misbehaving", r#"{"mode": "wrong_count"}"#)
        .unwrap()
        .score(&inputs)
        .unwrap_err();
    assert!(e.message().contains("3 scores for 2 completions"), "{e}");
    // Every reward of this crate answers one finite score per input, even for empty text.
    let empty = vec![input("", r#"{"extra": {"answer": "x"}}"#); 3];
    for (name, cfg) in [
        ("format", r#"{"required_tags": ["answer"]}"#),
        ("exact_match", "{}"),
        ("length", r#"{"mode": "target", "target": 3}"#),
        ("story_grounding", "{}"),
    ] {
        let s = reg.reward(name, cfg).unwrap().score(&empty).unwrap();
        assert_eq!(s.len(), 3, "{name}");
        assert!(s.iter().all(|v| v.is_finite()), "{name}: {s:?}");
    }
}
