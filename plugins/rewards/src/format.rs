//! `format`: does the completion have the expected shape? A regular expression over the
//! whole completion (TRL's `think_format_reward` style) and/or required `<tag>…</tag>` pairs.
//! Score in [0, 1]: 1 when every check passes, else 0; with `partial: true` the fraction of
//! checks passed.
use ferrotune_plugin_api::prelude::*;
use regex::Regex;
use schemars::JsonSchema;
use serde::Deserialize;

/// Configuration (`rewards: [{plugin: format, ...}]`).
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    /// Regular expression (Rust `regex` syntax) the completion must match. `.` also matches
    /// newlines (Python's `re.DOTALL`). Example: `^<think>.*?</think>\s*<answer>.*?</answer>$`.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Whether `pattern` must match the whole completion (default true, as `re.fullmatch`) or
    /// only somewhere in it.
    #[serde(default = "yes")]
    pub full_match: bool,
    /// Tag names that must each appear as exactly one well-ordered `<tag>…</tag>` pair
    /// (e.g. `[think, answer]`). Default none.
    #[serde(default)]
    pub required_tags: Vec<String>,
    /// Give the fraction of checks passed instead of all-or-nothing. Default false.
    #[serde(default)]
    pub partial: bool,
}

fn yes() -> bool {
    true
}

pub struct Format {
    regex: Option<Regex>,
    tags: Vec<String>,
    partial: bool,
}

impl Plugin for Format {
    const NAME: &'static str = "format";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "reward 1 when the completion matches a regex and holds the required tag pairs";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<FormatConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: FormatConfig = parse_config(config_json)?;
        if cfg.pattern.is_none() && cfg.required_tags.is_empty() {
            return Err(PluginError::config(
                "pattern",
                "give a `pattern`, `required_tags`, or both",
            ));
        }
        let regex = match &cfg.pattern {
            None => None,
            Some(p) => {
                let anchored =
                    if cfg.full_match { format!("(?s)^(?:{p})$") } else { format!("(?s){p}") };
                Some(Regex::new(&anchored).map_err(|e| {
                    PluginError::config("pattern", format!("not a valid regular expression: {e}"))
                })?)
            }
        };
        for t in &cfg.required_tags {
            if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(PluginError::config(
                    "required_tags",
                    format!("`{t}` is not a tag name (letters, digits, _ and -)"),
                ));
            }
        }
        Ok(Self { regex, tags: cfg.required_tags, partial: cfg.partial })
    }
}

/// Whether `text` holds exactly one `<tag>` and one `</tag>`, the opening first.
pub fn has_tag_pair(text: &str, tag: &str) -> bool {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let (no, nc) = (text.matches(&open).count(), text.matches(&close).count());
    no == 1 && nc == 1 && text.find(&open) < text.find(&close)
}

impl Format {
    pub fn score_one(&self, completion: &str) -> f64 {
        let mut checks = Vec::new();
        if let Some(r) = &self.regex {
            checks.push(r.is_match(completion));
        }
        checks.extend(self.tags.iter().map(|t| has_tag_pair(completion, t)));
        let passed = checks.iter().filter(|c| **c).count();
        if self.partial {
            passed as f64 / checks.len() as f64
        } else if passed == checks.len() {
            1.0
        } else {
            0.0
        }
    }
}

impl Reward for Format {
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        Ok(inputs.iter().map(|i| self.score_one(&i.completion)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_tags_and_partial() {
        let f = Format::from_config(r#"{"pattern": "<think>.*?</think>\\s*<answer>.*?</answer>"}"#)
            .unwrap();
        assert_eq!(f.score_one("<think>a\nb</think>\n<answer>4</answer>"), 1.0);
        assert_eq!(f.score_one("x <think>a</think><answer>4</answer>"), 0.0, "full match");
        let f = Format::from_config(r#"{"required_tags": ["think", "answer"], "partial": true}"#)
            .unwrap();
        assert_eq!(f.score_one("<think>a</think><answer>4</answer>"), 1.0);
        assert_eq!(f.score_one("<think>a</think> 4"), 0.5);
        assert_eq!(f.score_one("</think>a<think> <answer>1</answer><answer>2</answer>"), 0.0);
        let f = Format::from_config(r#"{"pattern": "\\d+", "full_match": false}"#).unwrap();
        assert_eq!(f.score_one("the answer is 42."), 1.0);
    }

    #[test]
    fn config_errors_name_the_key() {
        assert!(Format::from_config("{}").err().unwrap().message().contains("`pattern`"));
        assert!(Format::from_config(r#"{"pattern": "(("}"#)
            .err()
            .unwrap()
            .message()
            .contains("regular expression"));
        assert!(Format::from_config(r#"{"required_tags": ["a b"]}"#)
            .err()
            .unwrap()
            .message()
            .contains("`required_tags`"));
        assert!(Format::from_config(r#"{"pattern": "a", "patern": 1}"#)
            .err()
            .unwrap()
            .message()
            .contains("unknown field"));
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<Format>(json!({"required_tags": ["answer"]}));
        assert_eq!(
            (&s["properties"]["full_match"]["default"], &s["required"]),
            (&json!(true), &json!([]))
        );
        // Neither check given: the defaults alone are refused, naming `pattern`.
        assert!(Format::from_config("{}").err().unwrap().to_string().contains("pattern"));
    }
}
