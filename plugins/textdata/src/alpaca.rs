//! The alpaca format: one instruction (+ optional input) and its response per row, with
//! optional system prompt, history, preference pair, KTO tag and images.
//!
//! LLaMA-Factory's conventions (`data/README.md`): the user turn is the non-empty ones of
//! `instruction` and `input` joined by `"\n"`; `history` is a list of `[user, assistant]`
//! pairs that come before it; `system` opens the conversation. With `ranking`, `chosen` and
//! `rejected` are the two candidate responses (strings) instead of `output`. A boolean
//! `kto_tag` becomes [`Sample::label`].
use ferrotune_plugin_api::{Message, PluginError, PluginResult, Sample};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::columns::{check_pair_columns, pair_and_label, with_messages};
use crate::source::{column, kind_of, str_column};

/// `{"columns": {…}, "ranking": false, "skip_bad_rows": false}`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlpacaConfig {
    /// Which row keys hold what (LLaMA-Factory's `dataset_info.json` `columns`).
    #[serde(default)]
    pub columns: AlpacaColumns,
    /// Preference rows: `chosen` / `rejected` responses instead of `output`. Default false.
    #[serde(default)]
    pub ranking: bool,
    /// Skip and count bad rows instead of failing on the first. Default false.
    #[serde(default)]
    pub skip_bad_rows: bool,
}

/// Column names; `null` turns an optional column off.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AlpacaColumns {
    /// The instruction. Default `instruction`.
    pub prompt: Option<String>,
    /// Input appended to the instruction after a newline. Default `input`.
    pub query: Option<String>,
    /// The response (not used with `ranking`). Default `output`.
    pub response: Option<String>,
    /// Default `system`.
    pub system: Option<String>,
    /// Earlier `[user, assistant]` pairs. Default `history`.
    pub history: Option<String>,
    /// Preferred response (with `ranking`). Default `chosen`.
    pub chosen: Option<String>,
    /// Dispreferred response (with `ranking`). Default `rejected`.
    pub rejected: Option<String>,
    /// KTO desirability, a boolean. Default `kto_tag`.
    pub kto_tag: Option<String>,
    /// Image paths, one `<image>` placeholder each. Default `images`.
    pub images: Option<String>,
    /// Video files or frame folders, one `<video>` placeholder each. Default `videos`.
    pub videos: Option<String>,
}

impl Default for AlpacaColumns {
    fn default() -> Self {
        let s = |v: &str| Some(v.to_string());
        Self {
            prompt: s("instruction"),
            query: s("input"),
            response: s("output"),
            system: s("system"),
            history: s("history"),
            chosen: s("chosen"),
            rejected: s("rejected"),
            kto_tag: s("kto_tag"),
            images: s("images"),
            videos: s("videos"),
        }
    }
}

impl AlpacaConfig {
    pub fn validate(&self) -> PluginResult<()> {
        let c = &self.columns;
        if c.prompt.is_none() && c.query.is_none() {
            return Err(PluginError::config(
                "columns.prompt",
                "`prompt` and `query` cannot both be null: the user turn needs one",
            ));
        }
        if self.ranking {
            check_pair_columns(&c.chosen, &c.rejected)?;
        } else if c.response.is_none() {
            return Err(PluginError::config(
                "columns.response",
                "needs a column unless `ranking: true`",
            ));
        }
        Ok(())
    }

    /// One row as a sample (the error says what is wrong with the row).
    pub fn convert(&self, row: &Map<String, Value>) -> Result<Sample, String> {
        let c = &self.columns;
        let mut messages = Vec::new();
        if let Some(system) = str_column(row, c.system.as_deref())?.filter(|s| !s.is_empty()) {
            messages.push(Message::new("system", system));
        }
        if let Some(history) = column(row, c.history.as_deref()) {
            let name = c.history.as_deref().unwrap_or_default();
            let pairs = history.as_array().ok_or_else(|| {
                format!(
                    "column `{name}`: expected a list of [user, assistant] pairs, found {}",
                    kind_of(history)
                )
            })?;
            for (i, pair) in pairs.iter().enumerate() {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(user), Value::String(assistant)]) => {
                        if assistant.is_empty() {
                            return Err(format!("column `{name}[{i}]`: empty assistant turn"));
                        }
                        messages.push(Message::new("user", user.as_str()));
                        messages.push(Message::new("assistant", assistant.as_str()));
                    }
                    _ => {
                        return Err(format!(
                            "column `{name}[{i}]`: expected a pair of strings [user, assistant]"
                        ))
                    }
                }
            }
        }
        let parts: Vec<&str> =
            [str_column(row, c.prompt.as_deref())?, str_column(row, c.query.as_deref())?]
                .into_iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .collect();
        if parts.is_empty() {
            let cols: Vec<&str> =
                [c.prompt.as_deref(), c.query.as_deref()].into_iter().flatten().collect();
            return Err(format!("empty prompt: no text in column(s) `{}`", cols.join("`, `")));
        }
        messages.push(Message::new("user", parts.join("\n")));

        let response = |col: Option<&str>| -> Result<Message, String> {
            let name = col.unwrap_or_default();
            match str_column(row, col)? {
                None => Err(format!("column `{name}` is missing")),
                Some("") => Err(format!("empty assistant turn (column `{name}`)")),
                Some(text) => Ok(Message::new("assistant", text)),
            }
        };
        if !self.ranking {
            messages.push(response(c.response.as_deref())?);
        }
        let sample = pair_and_label(
            row,
            self.ranking,
            [c.chosen.as_deref(), c.rejected.as_deref()],
            c.kto_tag.as_deref(),
            response,
        )?;
        with_messages(row, [c.images.as_deref(), c.videos.as_deref()], sample, messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_api::{parse_config, ImageSource};

    fn row(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    fn roles_contents(s: &Sample) -> Vec<(String, String)> {
        s.messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect()
    }

    #[test]
    fn instruction_input_history_system() {
        let cfg: AlpacaConfig = parse_config("{}").unwrap();
        let s = cfg
            .convert(&row(r#"{"instruction": "Add them.", "input": "2 and 3", "output": "5", "system": "Be brief.",
                    "history": [["Hi", "Hello!"], ["Ready?", "Yes."]]}"#))
            .unwrap();
        let want = [
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Ready?"),
            ("assistant", "Yes."),
            ("user", "Add them.\n2 and 3"),
            ("assistant", "5"),
        ];
        assert_eq!(roles_contents(&s), want.map(|(r, c)| (r.to_string(), c.to_string())));
        assert_eq!((s.chosen.as_ref(), s.label), (None, None));
        // An empty input adds no newline; an instruction-less row uses the input alone.
        let s = cfg
            .convert(&row(r#"{"instruction": "Name a colour.", "input": "", "output": "Red."}"#))
            .unwrap();
        assert_eq!(s.messages[0].content, "Name a colour.");
        let s = cfg.convert(&row(r#"{"input": "only input", "output": "ok"}"#)).unwrap();
        assert_eq!(s.messages[0].content, "only input");
    }

    #[test]
    fn ranking_kto_images_and_custom_columns() {
        let cfg: AlpacaConfig = parse_config(r#"{"ranking": true}"#).unwrap();
        let s = cfg.convert(&row(r#"{"instruction": "<image>Which?", "chosen": "A", "rejected": "B", "images": ["x.png"]}"#)).unwrap();
        assert_eq!(s.messages.len(), 1);
        assert_eq!(s.chosen, Some(Message::new("assistant", "A")));
        assert_eq!(s.rejected, Some(Message::new("assistant", "B")));
        assert_eq!(s.images, vec![ImageSource::Path("x.png".into())]);
        let v = cfg
            .convert(&row(r#"{"instruction": "<video>Which?", "chosen": "A", "rejected": "B", "videos": "clip.mp4"}"#))
            .unwrap();
        assert_eq!(v.videos, vec![ImageSource::Path("clip.mp4".into())]);
        let e = cfg
            .convert(&row(r#"{"instruction": "Which?", "chosen": "A", "rejected": "B", "videos": ["clip.mp4"]}"#))
            .unwrap_err();
        assert!(e.contains("column `videos` has 1 video(s)"), "{e}");
        let cfg: AlpacaConfig = parse_config(
            r#"{"columns": {"prompt": "q", "query": null, "response": "a", "kto_tag": "good"}}"#,
        )
        .unwrap();
        let s = cfg
            .convert(&row(r#"{"q": "Is it?", "input": "ignored", "a": "Yes", "good": false}"#))
            .unwrap();
        assert_eq!(roles_contents(&s)[0].1, "Is it?");
        assert_eq!(s.label, Some(false));
    }

    #[test]
    fn bad_rows_say_why() {
        let cfg: AlpacaConfig = parse_config("{}").unwrap();
        let err = |j: &str| cfg.convert(&row(j)).unwrap_err();
        assert_eq!(
            err(r#"{"instruction": "x", "output": ""}"#),
            "empty assistant turn (column `output`)"
        );
        assert_eq!(err(r#"{"instruction": "x"}"#), "column `output` is missing");
        assert_eq!(
            err(r#"{"instruction": "", "input": "", "output": "y"}"#),
            "empty prompt: no text in column(s) `instruction`, `input`"
        );
        assert_eq!(
            err(r#"{"instruction": 3, "output": "y"}"#),
            "column `instruction`: expected a string, found a number"
        );
        assert!(err(r#"{"instruction": "x", "output": "y", "history": [["a"]]}"#)
            .contains("`history[0]`: expected a pair"));
        assert_eq!(
            err(r#"{"instruction": "x", "output": "y", "kto_tag": "yes"}"#),
            "column `kto_tag`: expected true or false, found a string"
        );
        assert!(err(r#"{"instruction": "x", "output": "y", "images": ["a.png"]}"#)
            .contains("1 image(s) but the turns hold 0"));
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = parse_config::<AlpacaConfig>(r#"{"columns": {"promt": "q"}}"#).unwrap_err();
        assert!(
            e.message().contains("unknown field `promt`") && e.message().contains("columns"),
            "{e}"
        );
        let e = parse_config::<AlpacaConfig>(r#"{"skip_bad_row": true}"#).unwrap_err();
        assert!(e.message().contains("unknown field `skip_bad_row`"), "{e}");
        let cfg: AlpacaConfig =
            parse_config(r#"{"ranking": true, "columns": {"rejected": null}}"#).unwrap();
        assert!(cfg.validate().unwrap_err().message().contains("`columns.rejected`"));
    }
}
