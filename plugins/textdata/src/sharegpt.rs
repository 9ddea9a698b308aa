//! The sharegpt format: a list of turns per row, `{"from": "human", "value": "…"}`, with
//! optional system prompt, tools, images, preference pair and KTO tag.
//!
//! LLaMA-Factory's conventions (`data/README.md`, `converter.py`): a leading turn tagged
//! `system_tag` is the system prompt (else the `system` column); the remaining turns
//! alternate, user or observation at even positions (0, 2, …) and assistant or function call
//! at odd ones; a conversation ends with an assistant turn, or, with `ranking`, with the
//! prompt's last user turn, the candidates being `chosen` / `rejected` turn objects. Roles
//! map to canonical ones: user → `user`, assistant → `assistant`, observation → `tool`,
//! function call → `function_call` (its text, the call's JSON, kept as the content; the host
//! renders it as the assistant's `tool_calls`). The `tools` column goes to `extra["tools"]`:
//! JSON text is checked and kept as text (so the schemas keep their key order), a JSON
//! value as it is.
use ferrotune_plugin_api::{Message, PluginError, PluginResult, Sample, FUNCTION_CALL_ROLE};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::columns::{check_pair_columns, pair_and_label, with_messages};
use crate::source::{column, kind_of, str_column};

/// `{"columns": {…}, "tags": {…}, "ranking": false, "skip_bad_rows": false}`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SharegptConfig {
    /// Which row keys hold what (LLaMA-Factory's `dataset_info.json` `columns`).
    #[serde(default)]
    pub columns: SharegptColumns,
    /// The keys and role names inside a turn (LLaMA-Factory's `tags`).
    #[serde(default)]
    pub tags: SharegptTags,
    /// Preference rows: the conversation ends with a user turn; `chosen` / `rejected` hold
    /// the candidate assistant turns. Default false.
    #[serde(default)]
    pub ranking: bool,
    /// Skip and count bad rows instead of failing on the first. Default false.
    #[serde(default)]
    pub skip_bad_rows: bool,
}

/// Column names; `null` turns an optional column off.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SharegptColumns {
    /// The list of turns. Default `conversations`.
    pub messages: String,
    /// Used when the first turn is not a system turn. Default `system`.
    pub system: Option<String>,
    /// Tool descriptions (a JSON string or JSON), to `extra["tools"]`. Default `tools`.
    pub tools: Option<String>,
    /// Image paths, one `<image>` placeholder each. Default `images`.
    pub images: Option<String>,
    /// Video files or frame folders, one `<video>` placeholder each. Default `videos`.
    pub videos: Option<String>,
    /// Preferred final turn (with `ranking`), a turn object. Default `chosen`.
    pub chosen: Option<String>,
    /// Dispreferred final turn (with `ranking`). Default `rejected`.
    pub rejected: Option<String>,
    /// KTO desirability, a boolean. Default `kto_tag`.
    pub kto_tag: Option<String>,
}

impl Default for SharegptColumns {
    fn default() -> Self {
        let s = |v: &str| Some(v.to_string());
        Self {
            messages: "conversations".into(),
            system: s("system"),
            tools: s("tools"),
            images: s("images"),
            videos: s("videos"),
            chosen: s("chosen"),
            rejected: s("rejected"),
            kto_tag: s("kto_tag"),
        }
    }
}

/// Keys and role names of a turn. For OpenAI-style rows use `role`, `content`, `user`,
/// `assistant`, `tool`, `function_call`… as LLaMA-Factory does.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SharegptTags {
    /// Default `from`.
    pub role_tag: String,
    /// Default `value`.
    pub content_tag: String,
    /// Default `human`.
    pub user_tag: String,
    /// Default `gpt`.
    pub assistant_tag: String,
    /// A tool's result, at a user position; mapped to `tool`. Default `observation`.
    pub observation_tag: Option<String>,
    /// A tool call, at an assistant position; mapped to `function_call`. Default `function_call`.
    pub function_tag: Option<String>,
    /// A leading system turn. Default `system`.
    pub system_tag: Option<String>,
}

impl Default for SharegptTags {
    fn default() -> Self {
        Self {
            role_tag: "from".into(),
            content_tag: "value".into(),
            user_tag: "human".into(),
            assistant_tag: "gpt".into(),
            observation_tag: Some("observation".into()),
            function_tag: Some("function_call".into()),
            system_tag: Some("system".into()),
        }
    }
}

impl SharegptConfig {
    pub fn validate(&self) -> PluginResult<()> {
        let t = &self.tags;
        let named = [
            ("tags.user_tag", Some(&t.user_tag)),
            ("tags.assistant_tag", Some(&t.assistant_tag)),
            ("tags.observation_tag", t.observation_tag.as_ref()),
            ("tags.function_tag", t.function_tag.as_ref()),
            ("tags.system_tag", t.system_tag.as_ref()),
        ];
        for (i, (key, tag)) in named.iter().enumerate() {
            if let Some(tag) = tag {
                if let Some((other, _)) = named[..i].iter().find(|(_, t)| *t == Some(*tag)) {
                    return Err(PluginError::config(
                        key,
                        format!("`{tag}` is already the value of `{other}`; role tags must differ"),
                    ));
                }
            }
        }
        if self.ranking {
            check_pair_columns(&self.columns.chosen, &self.columns.rejected)?;
        }
        Ok(())
    }

    /// The canonical role of a tag at a user (even) or assistant (odd) position.
    fn role_at(&self, tag: &str, assistant_position: bool) -> Option<&'static str> {
        let t = &self.tags;
        let is = |o: &Option<String>| o.as_deref() == Some(tag);
        match assistant_position {
            false if tag == t.user_tag => Some("user"),
            false if is(&t.observation_tag) => Some("tool"),
            true if tag == t.assistant_tag => Some("assistant"),
            true if is(&t.function_tag) => Some(FUNCTION_CALL_ROLE),
            _ => None,
        }
    }

    fn expected(&self, assistant_position: bool) -> String {
        let t = &self.tags;
        let (main, alt) = if assistant_position {
            (&t.assistant_tag, &t.function_tag)
        } else {
            (&t.user_tag, &t.observation_tag)
        };
        match alt {
            Some(alt) => format!("`{main}` or `{alt}`"),
            None => format!("`{main}`"),
        }
    }

    /// A turn object's (role tag, content).
    fn turn<'a>(&self, turn: &'a Value, what: &str) -> Result<(&'a str, &'a str), String> {
        let t = &self.tags;
        let obj = turn
            .as_object()
            .ok_or_else(|| format!("{what}: expected a turn object, found {}", kind_of(turn)))?;
        let field = |key: &str| match obj.get(key) {
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => {
                Err(format!("{what}: `{key}` should be a string, found {}", kind_of(other)))
            }
            None => Err(format!("{what}: no `{key}` key")),
        };
        Ok((field(&t.role_tag)?, field(&t.content_tag)?))
    }

    /// One row as a sample (the error says what is wrong with the row).
    pub fn convert(&self, row: &Map<String, Value>) -> Result<Sample, String> {
        let c = &self.columns;
        let col = &c.messages;
        let turns = match row.get(col) {
            Some(Value::Array(turns)) => turns.as_slice(),
            Some(other) => {
                return Err(format!(
                    "column `{col}`: expected a list of turns, found {}",
                    kind_of(other)
                ))
            }
            None => return Err(format!("column `{col}` is missing")),
        };
        let mut messages = Vec::new();
        let mut rest = turns;
        let mut system = None;
        if let (Some(system_tag), Some(first)) = (&self.tags.system_tag, turns.first()) {
            let (role, content) = self.turn(first, &format!("`{col}[0]`"))?;
            if role == system_tag {
                rest = &turns[1..];
                system = Some(content);
            }
        }
        let offset = turns.len() - rest.len();
        if system.is_none() {
            system = str_column(row, c.system.as_deref())?;
        }
        if let Some(system) = system.filter(|s| !s.is_empty()) {
            messages.push(Message::new("system", system));
        }
        for (k, turn) in rest.iter().enumerate() {
            let what = format!("`{col}[{}]`", k + offset);
            let (tag, content) = self.turn(turn, &what)?;
            let assistant_position = k % 2 == 1;
            let role = self.role_at(tag, assistant_position).ok_or_else(|| {
                format!(
                    "{what}: role `{tag}` where {} was expected (turns alternate user/observation, then assistant/function call)",
                    self.expected(assistant_position)
                )
            })?;
            if assistant_position && content.is_empty() {
                return Err(format!("{what}: empty assistant turn"));
            }
            messages.push(Message::new(role, content));
        }
        let n = rest.len();
        if n == 0 {
            return Err(format!("column `{col}`: no turns"));
        }
        if !self.ranking && n % 2 == 1 {
            return Err(format!(
                "column `{col}`: ends with a {} turn; a conversation ends with {}",
                self.expected(false),
                self.expected(true)
            ));
        }
        if self.ranking && n % 2 == 0 {
            return Err(format!(
                "column `{col}`: with `ranking`, the turns end with the prompt's {} turn",
                self.expected(false)
            ));
        }

        let candidate = |name: Option<&str>| -> Result<Message, String> {
            let name = name.unwrap_or_default();
            let v = column(row, Some(name)).ok_or_else(|| format!("column `{name}` is missing"))?;
            let (tag, content) = self.turn(v, &format!("column `{name}`"))?;
            let role = self.role_at(tag, true).ok_or_else(|| {
                format!("column `{name}`: role `{tag}` where {} was expected", self.expected(true))
            })?;
            if content.is_empty() {
                return Err(format!("column `{name}`: empty assistant turn"));
            }
            Ok(Message::new(role, content))
        };
        let mut sample = pair_and_label(
            row,
            self.ranking,
            [c.chosen.as_deref(), c.rejected.as_deref()],
            c.kto_tag.as_deref(),
            candidate,
        )?;
        if let Some(tools) = column(row, c.tools.as_deref()) {
            let name = c.tools.as_deref().unwrap_or_default();
            let value = match tools {
                Value::String(s) if s.trim().is_empty() => None,
                Value::String(s) => {
                    serde_json::from_str::<Value>(s)
                        .map_err(|e| format!("column `{name}`: not JSON text ({e})"))?;
                    Some(tools.clone())
                }
                other => Some(other.clone()),
            };
            if let Some(v) = value {
                sample.extra.insert("tools".into(), v);
            }
        }
        with_messages(row, [c.images.as_deref(), c.videos.as_deref()], sample, messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_api::parse_config;

    fn row(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    fn pairs(s: &Sample) -> Vec<(&str, &str)> {
        s.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect()
    }

    #[test]
    fn turns_roles_system_and_tools() {
        let cfg: SharegptConfig = parse_config("{}").unwrap();
        let s = cfg
            .convert(&row(r#"{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "weather?"},
                    {"from": "function_call", "value": "{\"name\": \"w\"}"}, {"from": "observation", "value": "sunny"},
                    {"from": "gpt", "value": "It is sunny."}], "system": "ignored", "tools": "[{\"name\": \"w\"}]"}"#))
            .unwrap();
        assert_eq!(
            pairs(&s),
            vec![
                ("system", "S"),
                ("user", "weather?"),
                ("function_call", "{\"name\": \"w\"}"),
                ("tool", "sunny"),
                ("assistant", "It is sunny.")
            ]
        );
        assert_eq!(s.extra["tools"], serde_json::json!("[{\"name\": \"w\"}]"));
        // The system column is used when there is no leading system turn.
        let s = cfg
            .convert(&row(r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "system": "S2"}"#))
            .unwrap();
        assert_eq!(pairs(&s), vec![("system", "S2"), ("user", "a"), ("assistant", "b")]);
    }

    #[test]
    fn openai_tags_ranking_and_kto() {
        let cfg: SharegptConfig = parse_config(
            r#"{"ranking": true, "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let s = cfg
            .convert(&row(r#"{"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "good"},
                    "rejected": {"role": "assistant", "content": "bad"}}"#))
            .unwrap();
        assert_eq!(pairs(&s), vec![("user", "q")]);
        assert_eq!(
            (s.chosen.unwrap().content, s.rejected.unwrap().content),
            ("good".to_string(), "bad".to_string())
        );
        let cfg: SharegptConfig = parse_config("{}").unwrap();
        let s = cfg
            .convert(&row(r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "kto_tag": true}"#))
            .unwrap();
        assert_eq!(s.label, Some(true));
    }

    #[test]
    fn bad_turns_say_which() {
        let cfg: SharegptConfig = parse_config("{}").unwrap();
        let err = |j: &str| cfg.convert(&row(j)).unwrap_err();
        let e = err(
            r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}"#,
        );
        assert!(
            e.starts_with(
                "`conversations[1]`: role `human` where `gpt` or `function_call` was expected"
            ),
            "{e}"
        );
        let e = err(
            r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "b"}]}"#,
        );
        assert!(
            e.starts_with(
                "`conversations[1]`: role `gpt` where `human` or `observation` was expected"
            ),
            "{e}"
        );
        assert_eq!(
            err(
                r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}"#
            ),
            "`conversations[1]`: empty assistant turn"
        );
        assert!(err(r#"{"conversations": [{"from": "human", "value": "a"}]}"#)
            .contains("ends with a `human` or `observation` turn"));
        assert_eq!(
            err(r#"{"conversations": [{"from": "human"}]}"#),
            "`conversations[0]`: no `value` key"
        );
        assert_eq!(err(r#"{"conversations": []}"#), "column `conversations`: no turns");
        assert_eq!(err(r#"{"turns": []}"#), "column `conversations` is missing");
        assert!(err(r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "tools": "[oops"}"#)
            .contains("column `tools`: not JSON text"));
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = parse_config::<SharegptConfig>(r#"{"tags": {"role": "from"}}"#).unwrap_err();
        assert!(
            e.message().contains("unknown field `role`") && e.message().contains("tags"),
            "{e}"
        );
        let cfg: SharegptConfig = parse_config(r#"{"tags": {"assistant_tag": "human"}}"#).unwrap();
        let e = cfg.validate().unwrap_err();
        assert!(
            e.message().contains(
                "config key `tags.assistant_tag`: `human` is already the value of `tags.user_tag`"
            ),
            "{e}"
        );
    }
}
