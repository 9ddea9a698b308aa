//! `exact_match`: 1 when the answer in the completion equals the sample's reference answer,
//! else 0. The reference is the sample's `extra.<answer_key>` (or a top-level key of that
//! name), a string or a number; the answer is extracted from the completion (the last
//! `<answer>…</answer>`, the last `\boxed{…}`, a regex group, or the whole text) and both are
//! normalised (trimmed, whitespace collapsed, lowercased, a trailing period dropped unless
//! `normalize: false`). When both parse as numbers they are compared as numbers.
use ferrotune_plugin_api::prelude::*;
use regex::Regex;
use schemars::JsonSchema;
use serde::Deserialize;

/// Configuration (`rewards: [{plugin: exact_match, ...}]`).
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ExactMatchConfig {
    /// Key of the reference answer in the sample's `extra` (the data set's answer column).
    /// Default `answer`.
    #[serde(default = "default_key")]
    pub answer_key: String,
    /// `answer_tag` (default: the last `<answer>…</answer>`), `boxed` (the last `\boxed{…}`),
    /// `regex` (group 1 of the last match of `extract_pattern`) or `whole`.
    #[serde(default = "default_extract")]
    #[schemars(extend("enum" = ["answer_tag", "boxed", "regex", "whole"]))]
    pub extract: String,
    /// For `extract: regex`.
    #[serde(default)]
    pub extract_pattern: Option<String>,
    /// Normalise before comparing. Default true.
    #[serde(default = "yes")]
    pub normalize: bool,
}

fn default_key() -> String {
    "answer".into()
}
fn default_extract() -> String {
    "answer_tag".into()
}
fn yes() -> bool {
    true
}

enum Extract {
    AnswerTag,
    Boxed,
    Regex(Regex),
    Whole,
}

pub struct ExactMatch {
    key: String,
    extract: Extract,
    normalize: bool,
}

impl Plugin for ExactMatch {
    const NAME: &'static str = "exact_match";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "reward 1 when the completion's answer equals the sample's reference answer";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<ExactMatchConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: ExactMatchConfig = parse_config(config_json)?;
        let extract = match cfg.extract.as_str() {
            "answer_tag" => Extract::AnswerTag,
            "boxed" => Extract::Boxed,
            "whole" => Extract::Whole,
            "regex" => {
                let p = cfg.extract_pattern.as_deref().ok_or_else(|| {
                    PluginError::config("extract_pattern", "required with `extract: regex`")
                })?;
                let r = Regex::new(&format!("(?s){p}")).map_err(|e| {
                    PluginError::config(
                        "extract_pattern",
                        format!("not a valid regular expression: {e}"),
                    )
                })?;
                if r.captures_len() < 2 {
                    return Err(PluginError::config(
                        "extract_pattern",
                        "needs a capture group: the answer is group 1",
                    ));
                }
                Extract::Regex(r)
            }
            other => {
                return Err(PluginError::config(
                    "extract",
                    format!("`{other}`: use answer_tag, boxed, regex or whole"),
                ))
            }
        };
        if cfg.answer_key.is_empty() {
            return Err(PluginError::config("answer_key", "must not be empty"));
        }
        Ok(Self { key: cfg.answer_key, extract, normalize: cfg.normalize })
    }
}

/// The content of the last `\boxed{…}` (braces balanced).
fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

impl ExactMatch {
    pub fn extract(&self, completion: &str) -> Option<String> {
        match &self.extract {
            Extract::Whole => Some(completion.to_string()),
            Extract::Boxed => last_boxed(completion),
            Extract::AnswerTag => {
                let end = completion.rfind("</answer>")?;
                let start = completion[..end].rfind("<answer>")? + "<answer>".len();
                Some(completion[start..end].to_string())
            }
            Extract::Regex(r) => r
                .captures_iter(completion)
                .last()
                .and_then(|c| c.get(1))
                .map(|m| m.as_str().to_string()),
        }
    }

    fn norm(&self, s: &str) -> String {
        if !self.normalize {
            return s.to_string();
        }
        let s = s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        s.strip_suffix('.').unwrap_or(&s).trim().to_string()
    }

    pub fn matches(&self, answer: &str, reference: &str) -> bool {
        let (a, r) = (self.norm(answer), self.norm(reference));
        let num = |s: &str| s.replace(',', "").parse::<f64>().ok().filter(|v| v.is_finite());
        match (num(&a), num(&r)) {
            (Some(x), Some(y)) if self.normalize => (x - y).abs() <= 1e-9 * y.abs().max(1.0),
            _ => a == r,
        }
    }

    /// The reference answer of one sample, or an error naming the key.
    fn reference(&self, sample_json: &str, index: usize) -> PluginResult<String> {
        let v: serde_json::Value = serde_json::from_str(sample_json).map_err(|e| {
            PluginError::invalid(format!("completion {index}: its sample is not valid JSON: {e}"))
        })?;
        let found = v.get("extra").and_then(|e| e.get(&self.key)).or_else(|| v.get(&self.key));
        match found {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
            Some(other) => Err(PluginError::invalid(format!("completion {index}: reference `{}` is {other}, not a string or number", self.key))),
            None => Err(PluginError::invalid(format!(
                "completion {index}: its sample has no reference answer `extra.{}` (set `answer_key` to the data set's answer column)",
                self.key
            ))),
        }
    }
}

impl Reward for ExactMatch {
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| {
                let reference = self.reference(&inp.sample_json, i)?;
                Ok(match self.extract(&inp.completion) {
                    Some(a) if self.matches(&a, &reference) => 1.0,
                    _ => 0.0,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(completion: &str, sample: &str) -> RewardInput {
        RewardInput {
            prompt: String::new(),
            completion: completion.into(),
            sample_json: sample.into(),
        }
    }

    #[test]
    fn extracts_and_compares() {
        let m = ExactMatch::from_config("{}").unwrap();
        let s = r#"{"messages": [], "extra": {"answer": "Paris"}}"#;
        let got = m
            .score(&[
                input("<think>x</think><answer> paris. </answer>", s),
                input("<answer>Lyon</answer>", s),
                input("Paris", s),
            ])
            .unwrap();
        assert_eq!(got, vec![1.0, 0.0, 0.0]);
        let m =
            ExactMatch::from_config(r#"{"extract": "boxed", "answer_key": "solution"}"#).unwrap();
        let s = r#"{"messages": [], "extra": {"solution": 1200}}"#;
        assert_eq!(
            m.score(&[input("so \\boxed{1,200.0}", s), input("\\boxed{\\frac{1}{2}}", s)]).unwrap(),
            vec![1.0, 0.0]
        );
        assert_eq!(last_boxed("a \\boxed{\\frac{1}{2}} b").as_deref(), Some("\\frac{1}{2}"));
        let m = ExactMatch::from_config(
            r#"{"extract": "regex", "extract_pattern": "answer is (\\w+)", "normalize": false}"#,
        )
        .unwrap();
        let s = r#"{"messages": [], "answer": "B"}"#;
        assert_eq!(
            m.score(&[
                input("the answer is A, no, the answer is B", s),
                input("the answer is b", s)
            ])
            .unwrap(),
            vec![1.0, 0.0]
        );
    }

    #[test]
    fn missing_reference_and_config_errors() {
        let m = ExactMatch::from_config("{}").unwrap();
        let e = m.score(&[input("<answer>1</answer>", r#"{"messages": []}"#)]).unwrap_err();
        assert!(
            e.message().contains("completion 0") && e.message().contains("extra.answer"),
            "{e}"
        );
        assert!(ExactMatch::from_config(r#"{"extract": "regex"}"#)
            .err()
            .unwrap()
            .message()
            .contains("`extract_pattern`"));
        assert!(ExactMatch::from_config(r#"{"extract": "regex", "extract_pattern": "\\d+"}"#)
            .err()
            .unwrap()
            .message()
            .contains("capture group"));
        assert!(ExactMatch::from_config(r#"{"extract": "last"}"#)
            .err()
            .unwrap()
            .message()
            .contains("`extract`"));
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<ExactMatch>(json!({}));
        assert_eq!(s["properties"]["answer_key"]["default"], "answer");
        assert_eq!(s["properties"]["extract"]["default"], "answer_tag");
        assert!(ExactMatch::from_config(r#"{"extract": "first"}"#).is_err());
    }
}
