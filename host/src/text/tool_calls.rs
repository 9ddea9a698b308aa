//! Function calling in chat templates: a conversation's tool calls and tools as transformers'
//! `apply_chat_template(messages, tools=…)` hands them to the template.
//!
//! A canonical [`FUNCTION_CALL_ROLE`] turn (LLaMA-Factory's `function_call`) holds the JSON
//! text of one call `{"name": …, "arguments": …}` or of a list of them; it becomes the
//! assistant message transformers documents, `{"role": "assistant", "content": "",
//! "tool_calls": [{"type": "function", "function": {"name": …, "arguments": …}}]}`, and a
//! tool's result stays a `tool` message. The tools (`Sample::extra["tools"]`, a list of
//! function schemas or its JSON text) become the template's `tools`; an empty list is none.
//!
//! JSON text is parsed keeping each object's key order, as Python's `json.loads` does, so a
//! template that prints a schema or the arguments with `tojson` (Qwen2.5's does both) writes
//! them as transformers does. A template that never reads `tools` (or never mentions
//! `tool_calls`) would drop them silently; given tools (or calls) it is an error naming it.
use std::fmt;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use ferrotune_plugin_api::{Message, FUNCTION_CALL_ROLE};
use minijinja::value::{Enumerator, Object, ObjectRepr, Value, ValueKind};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use super::ChatTemplate;

/// The messages as template values, and whether any turn calls tools.
pub(crate) fn template_messages(messages: &[Message]) -> Result<(Value, bool)> {
    let mut out = Vec::with_capacity(messages.len());
    let mut calls = false;
    for (i, m) in messages.iter().enumerate() {
        if m.role == FUNCTION_CALL_ROLE {
            calls = true;
            let tool_calls = parse_calls(&m.content).map_err(|e| {
                anyhow!("turn {i} (`{FUNCTION_CALL_ROLE}`): {e}; it must be the JSON text of a call {{\"name\": …, \"arguments\": …}} or of a list of calls")
            })?;
            out.push(ordered_map(vec![
                ("role", Value::from("assistant")),
                ("content", Value::from("")),
                ("tool_calls", Value::from(tool_calls)),
            ]));
        } else {
            out.push(ordered_map(vec![
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(m.content.as_str())),
            ]));
        }
    }
    Ok((Value::from(out), calls))
}

/// A function call turn's calls as transformers' `tool_calls` entries.
fn parse_calls(text: &str) -> Result<Vec<Value>> {
    let parsed = parse_ordered_json(text).map_err(|e| anyhow!("not JSON text ({e})"))?;
    let calls = match parsed.kind() {
        ValueKind::Map => vec![parsed],
        ValueKind::Seq if parsed.len() != Some(0) => parsed.try_iter()?.collect(),
        _ => bail!("expected a call object or a non-empty list of calls, found {}", parsed.kind()),
    };
    calls
        .into_iter()
        .enumerate()
        .map(|(k, call)| {
            let field = |key: &str| call.get_attr(key).ok().filter(|v| !v.is_undefined());
            if call.kind() != ValueKind::Map {
                bail!("call {k} is {}, not an object", call.kind());
            }
            let name = field("name").filter(|n| n.kind() == ValueKind::String);
            let name = name.ok_or_else(|| anyhow!("call {k} has no string `name`"))?;
            let arguments =
                field("arguments").ok_or_else(|| anyhow!("call {k} has no `arguments`"))?;
            Ok(ordered_map(vec![
                ("type", Value::from("function")),
                ("function", ordered_map(vec![("name", name), ("arguments", arguments)])),
            ]))
        })
        .collect()
}

/// The template's `tools` from a sample's `tools` (a list of schemas, one schema, or the
/// JSON text of either); `None` for null, blank text or an empty list.
pub(crate) fn tools_value(tools: &Json) -> Result<Option<Value>> {
    let value = match tools {
        Json::Null => return Ok(None),
        Json::String(s) if s.trim().is_empty() => return Ok(None),
        Json::String(s) => {
            parse_ordered_json(s).map_err(|e| anyhow!("`tools` is not JSON text ({e})"))?
        }
        other => Value::from_serialize(other),
    };
    match value.kind() {
        ValueKind::Seq if value.len() == Some(0) => Ok(None),
        ValueKind::Seq => Ok(Some(value)),
        ValueKind::Map => Ok(Some(Value::from(vec![value]))),
        other => bail!("`tools` must be a list of tool schemas, found {other}"),
    }
}

/// Refuses tools or calls that the selected template would drop.
pub(crate) fn check_support(
    template: &ChatTemplate,
    name: &str,
    tools: bool,
    calls: bool,
) -> Result<()> {
    let (reads_tools, reads_calls) = template.tool_support(name);
    let origin = template.origin();
    if tools && !reads_tools {
        bail!(
            "{origin}: chat template `{name}` never reads `tools`, so this conversation's tool list would be dropped; \
             use a model (or a chat template) with tool support, such as Qwen2.5's, or remove the tools"
        );
    }
    if calls && !reads_calls {
        bail!(
            "{origin}: chat template `{name}` never reads `tool_calls`, so this conversation's function calls would be \
             rendered wrongly; use a model (or a chat template) with tool support, such as Qwen2.5's"
        );
    }
    Ok(())
}

/// Parses JSON text into template values whose objects keep their key order.
pub fn parse_ordered_json(text: &str) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let Ordered(value) = Ordered::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// An object of template values in insertion order (minijinja's own maps sort their keys).
fn ordered_map(entries: Vec<(&str, Value)>) -> Value {
    Value::from_object(OrderedMap(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// A JSON object with Python's key order.
struct OrderedMap(Vec<(String, Value)>);

impl fmt::Debug for OrderedMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, v)| (k, v))).finish()
    }
}

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| Value::from(k.as_str())).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// Deserializes any JSON into a template value, objects as [`OrderedMap`].
struct Ordered(Value);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedVisitor).map(Ordered)
    }
}

struct OrderedVisitor;

impl<'de> Visitor<'de> for OrderedVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::from(()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Ordered(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::from(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries: Vec<(String, Value)> = Vec::new();
        while let Some((key, Ordered(v))) = map.next_entry::<String, Ordered>()? {
            // Python's dict keeps a repeated key where it first appeared, with the last value.
            match entries.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = v,
                None => entries.push((key, v)),
            }
        }
        Ok(Value::from_object(OrderedMap(entries)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::pyformat::{to_json, JsonOptions};

    fn dumps(v: &Value) -> String {
        to_json(v, &JsonOptions::default()).unwrap()
    }

    #[test]
    fn ordered_json_keeps_python_key_order() {
        let text = r#"{"name": "f", "description": "d", "parameters": {"type": "object", "b": 1.0, "a": [true, null, -2, 3e2]}, "name": "g"}"#;
        let v = parse_ordered_json(text).unwrap();
        // Python: json.dumps(json.loads(text)); the repeated key keeps its place, last value.
        assert_eq!(
            dumps(&v),
            r#"{"name": "g", "description": "d", "parameters": {"type": "object", "b": 1.0, "a": [true, null, -2, 300.0]}}"#
        );
        assert_eq!(v.get_attr("description").unwrap().as_str(), Some("d"));
        assert!(parse_ordered_json("{} x").is_err() && parse_ordered_json("[1,").is_err());
    }

    #[test]
    fn function_call_turns_become_tool_calls() {
        let msgs = [
            Message::new("user", "q"),
            Message::new(
                FUNCTION_CALL_ROLE,
                r#"[{"name": "a", "arguments": {"z": 1, "y": "2"}}, {"name": "b", "arguments": "{}"}]"#,
            ),
            Message::new("tool", "r"),
        ];
        let (v, calls) = template_messages(&msgs).unwrap();
        assert!(calls);
        assert_eq!(
            dumps(&v),
            r#"[{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "a", "arguments": {"z": 1, "y": "2"}}}, {"type": "function", "function": {"name": "b", "arguments": "{}"}}]}, {"role": "tool", "content": "r"}]"#
        );
        let (_, calls) = template_messages(&msgs[..1]).unwrap();
        assert!(!calls);
    }

    #[test]
    fn bad_calls_say_which_turn_and_why() {
        let err = |content: &str| {
            let msgs = [Message::new("user", "q"), Message::new(FUNCTION_CALL_ROLE, content)];
            template_messages(&msgs).unwrap_err().to_string()
        };
        assert!(err("call f(1)").starts_with("turn 1 (`function_call`): not JSON text"));
        assert!(err(r#"{"arguments": {}}"#).contains("call 0 has no string `name`"));
        assert!(err(r#"[{"name": "f", "arguments": {}}, {"name": "g"}]"#)
            .contains("call 1 has no `arguments`"));
        assert!(err("[]").contains("a non-empty list of calls"));
        assert!(err("[3]").contains("call 0 is number, not an object"));
    }

    #[test]
    fn tools_from_text_lists_and_single_schemas() {
        assert!(tools_value(&Json::Null).unwrap().is_none());
        assert!(tools_value(&Json::from(" ")).unwrap().is_none());
        assert!(tools_value(&Json::from("[]")).unwrap().is_none());
        let t =
            tools_value(&Json::from(r#"[{"name": "f", "description": "d"}]"#)).unwrap().unwrap();
        assert_eq!(dumps(&t), r#"[{"name": "f", "description": "d"}]"#);
        let one = tools_value(&serde_json::json!({"name": "f"})).unwrap().unwrap();
        assert_eq!(dumps(&one), r#"[{"name": "f"}]"#);
        assert!(tools_value(&Json::from("[oops")).unwrap_err().to_string().contains("not JSON"));
        assert!(tools_value(&Json::from(3)).unwrap_err().to_string().contains("list of tool"));
    }

    #[test]
    fn templates_without_tools_are_refused_by_name() {
        let plain = ChatTemplate::single(
            "{% for m in messages %}{{ m.content }}{% endfor %}",
            "plain.json",
        )
        .unwrap();
        let e = check_support(&plain, "default", true, false).unwrap_err().to_string();
        assert!(e.contains("plain.json: chat template `default` never reads `tools`"), "{e}");
        let e = check_support(&plain, "default", false, true).unwrap_err().to_string();
        assert!(e.contains("never reads `tool_calls`"), "{e}");
        check_support(&plain, "default", false, false).unwrap();
        let tools = ChatTemplate::single(
            "{% if tools %}{{ tools|tojson }}{% endif %}{% for m in messages %}{{ m.tool_calls }}{% endfor %}",
            "t",
        )
        .unwrap();
        check_support(&tools, "default", true, true).unwrap();
    }
}
