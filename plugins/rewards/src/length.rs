//! `length`: a reward on the completion's length, in characters or whitespace-separated
//! words. Two modes:
//! * `target`: `max(0, 1 − |len − target| / tolerance)`, in [0, 1] (1 at the target);
//! * `penalty`: DAPO's soft overlong punishment (TRL's `get_soft_overlong_punishment`):
//!   0 up to `max_length − soft_cache`, then falling linearly to −1 at `max_length`, and −1
//!   beyond; in [−1, 0].
use ferrotune_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

/// Configuration (`rewards: [{plugin: length, ...}]`).
#[derive(Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LengthConfig {
    /// `target` or `penalty`.
    #[schemars(extend("enum" = ["target", "penalty"]))]
    pub mode: String,
    /// `words` (default) or `chars` (Unicode scalar values).
    #[serde(default = "default_unit")]
    #[schemars(extend("enum" = ["words", "chars"]))]
    pub unit: String,
    /// `target` mode: the preferred length (required there).
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub target: Option<f64>,
    /// `target` mode: how far from the target the score reaches 0. Default = `target`.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub tolerance: Option<f64>,
    /// `penalty` mode: the length from which the score is −1 (required there).
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub max_length: Option<f64>,
    /// `penalty` mode: the width of the linear ramp before `max_length`, at most
    /// `max_length`. Default 0 (a step).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub soft_cache: f64,
}

fn default_unit() -> String {
    "words".into()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Target { target: f64, tolerance: f64 },
    Penalty { max_length: f64, soft_cache: f64 },
}

pub struct Length {
    mode: Mode,
    words: bool,
}

impl Plugin for Length {
    const NAME: &'static str = "length";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "reward for closeness to a target length, or DAPO's soft overlong penalty";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<LengthConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: LengthConfig = parse_config(config_json)?;
        let words = match cfg.unit.as_str() {
            "words" => true,
            "chars" => false,
            other => {
                return Err(PluginError::config("unit", format!("`{other}`: use words or chars")))
            }
        };
        let positive = |key: &str, v: Option<f64>| -> PluginResult<f64> {
            match v {
                Some(v) if v.is_finite() && v > 0.0 => Ok(v),
                Some(v) => {
                    Err(PluginError::config(key, format!("must be a positive number, got {v}")))
                }
                None => Err(PluginError::config(key, format!("required in `{}` mode", cfg.mode))),
            }
        };
        // A length given for the other mode is checked all the same: a typo there is a
        // mistake the run would otherwise hide.
        for (key, v) in
            [("target", cfg.target), ("tolerance", cfg.tolerance), ("max_length", cfg.max_length)]
        {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(PluginError::config(
                    key,
                    format!("must be a positive number, got {v}"),
                ));
            }
        }
        if !(cfg.soft_cache.is_finite() && cfg.soft_cache >= 0.0) {
            return Err(PluginError::config(
                "soft_cache",
                format!("must be a non-negative number, got {}", cfg.soft_cache),
            ));
        }
        let mode = match cfg.mode.as_str() {
            "target" => {
                let target = positive("target", cfg.target)?;
                let tolerance = positive("tolerance", Some(cfg.tolerance.unwrap_or(target)))?;
                Mode::Target { target, tolerance }
            }
            "penalty" => {
                let max_length = positive("max_length", cfg.max_length)?;
                if !cfg.soft_cache.is_finite()
                    || cfg.soft_cache < 0.0
                    || cfg.soft_cache > max_length
                {
                    return Err(PluginError::config(
                        "soft_cache",
                        format!("must lie in [0, max_length], got {}", cfg.soft_cache),
                    ));
                }
                Mode::Penalty { max_length, soft_cache: cfg.soft_cache }
            }
            other => {
                return Err(PluginError::config(
                    "mode",
                    format!("`{other}`: use target or penalty"),
                ))
            }
        };
        Ok(Self { mode, words })
    }
}

impl Length {
    pub fn measure(&self, text: &str) -> f64 {
        if self.words {
            text.split_whitespace().count() as f64
        } else {
            text.chars().count() as f64
        }
    }

    pub fn score_len(&self, len: f64) -> f64 {
        match self.mode {
            Mode::Target { target, tolerance } => (1.0 - (len - target).abs() / tolerance).max(0.0),
            Mode::Penalty { max_length, soft_cache } => {
                let expected = max_length - soft_cache;
                if len <= expected {
                    0.0
                } else if len <= max_length {
                    (expected - len) / soft_cache
                } else {
                    -1.0
                }
            }
        }
    }
}

impl Reward for Length {
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        Ok(inputs.iter().map(|i| self.score_len(self.measure(&i.completion))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_and_penalty_values() {
        let l = Length::from_config(r#"{"mode": "target", "target": 4}"#).unwrap();
        assert_eq!(l.measure("a b  c\nd"), 4.0);
        assert_eq!(l.score_len(4.0), 1.0);
        assert_eq!(l.score_len(6.0), 0.5);
        assert_eq!(l.score_len(9.0), 0.0);
        let l = Length::from_config(
            r#"{"mode": "penalty", "unit": "chars", "max_length": 10, "soft_cache": 4}"#,
        )
        .unwrap();
        assert_eq!(l.measure("héllo"), 5.0);
        assert_eq!(l.score_len(6.0), 0.0);
        assert_eq!(l.score_len(8.0), -0.5);
        assert_eq!(l.score_len(10.0), -1.0);
        assert_eq!(l.score_len(11.0), -1.0);
        let l = Length::from_config(r#"{"mode": "penalty", "max_length": 3}"#).unwrap();
        assert_eq!((l.score_len(3.0), l.score_len(4.0)), (0.0, -1.0));
    }

    #[test]
    fn config_errors_name_the_key() {
        assert!(Length::from_config(r#"{"mode": "target"}"#)
            .err()
            .unwrap()
            .message()
            .contains("`target`"));
        assert!(Length::from_config(r#"{"mode": "penalty", "max_length": 3, "soft_cache": 5}"#)
            .err()
            .unwrap()
            .message()
            .contains("`soft_cache`"));
        assert!(Length::from_config(r#"{"mode": "x"}"#)
            .err()
            .unwrap()
            .message()
            .contains("`mode`"));
        assert!(Length::from_config(r#"{"mode": "target", "target": 3, "unit": "tokens"}"#)
            .err()
            .unwrap()
            .message()
            .contains("`unit`"));
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<Length>(json!({"mode": "target", "target": 20}));
        assert_eq!(s["required"], json!(["mode"]));
        assert_schema_matches::<Length>(json!({"mode": "penalty", "max_length": 100}));
        let e = Length::from_config(r#"{"mode": "target", "target": 5, "max_length": -1}"#);
        assert!(e.err().unwrap().to_string().contains("max_length"));
    }
}
