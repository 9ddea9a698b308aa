//! Chat templates: the Jinja programs in `tokenizer_config.json` that turn a conversation
//! into the model's prompt text, rendered with minijinja the way transformers renders them.
//!
//! transformers compiles each template in an `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` with `loopcontrols`, Jinja2's default `Undefined`, its own `tojson`
//! filter and the globals `raise_exception` and `strftime_now`, then renders with `messages`,
//! `tools`, `documents`, `add_generation_prompt`, the named special tokens and any extra
//! keyword arguments. This file builds the same environment: Python's string methods
//! (`.strip()`, `.startswith()`, `.split()` …) come from minijinja-contrib's `pycompat`, and
//! printed values use Python's spelling (`True`, `None`). Reference:
//! <https://huggingface.co/docs/transformers/main/en/chat_templating_writing>.
//!
//! transformers' `{% generation %}` … `{% endgeneration %}` tags (its `AssistantTracker`
//! extension, which TRL's training templates such as `qwen3_training.jinja` use to mark what the
//! assistant writes) compile here as a filter block that renders its body unchanged; the text
//! ranges they cover come back from [`ChatTemplate::render_with_generation_spans`], as
//! transformers' `generation_indices` (there counted in characters, here in bytes).
//!
//! Known difference: objects keep minijinja's key order (sorted, since neither minijinja's
//! nor serde_json's `preserve_order` feature is on), where Python keeps insertion order; it
//! shows only where a template prints a whole object with `tojson`. Tool schemas and call
//! arguments given as JSON text keep their order (`super::tool_calls` parses them so).
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use minijinja::value::Kwargs;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};

use super::pyformat;

/// Name under which a single (unnamed) template is stored, as in transformers.
pub const DEFAULT_TEMPLATE: &str = "default";
/// The named template transformers picks when tools are passed and it exists.
pub const TOOL_USE_TEMPLATE: &str = "tool_use";

/// One or more compiled chat templates (transformers allows a list of named ones).
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template names in the order they were given.
    names: Vec<String>,
    /// Their source texts, in the same order.
    sources: Vec<String>,
    /// Where the templates came from, for error messages (`…/tokenizer_config.json`).
    origin: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("names", &self.names)
            .field("origin", &self.origin)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles named templates; `origin` names the file they came from. A syntax error is
    /// reported with the origin and the template's name.
    pub fn new(templates: Vec<(String, String)>, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        if templates.is_empty() {
            bail!("{origin}: no chat template given");
        }
        let mut env = jinja_environment();
        let mut names = Vec::with_capacity(templates.len());
        let mut sources = Vec::with_capacity(templates.len());
        for (name, source) in templates {
            if names.contains(&name) {
                bail!("{origin}: chat template `{name}` is given twice");
            }
            let compiled = translate_generation_tags(&source);
            env.add_template_owned(name.clone(), compiled).map_err(|e| {
                anyhow!("{origin}: chat template `{name}` does not compile: {}", describe(&e))
            })?;
            names.push(name);
            sources.push(source);
        }
        Ok(Self { env, names, sources, origin })
    }

    /// A single template stored as `default`.
    pub fn single(source: impl Into<String>, origin: impl Into<String>) -> Result<Self> {
        Self::new(vec![(DEFAULT_TEMPLATE.to_string(), source.into())], origin)
    }

    /// Where the templates came from (`…/tokenizer_config.json`), for error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template names (`["default"]` for a single template).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The source text of a named template.
    pub fn source(&self, name: &str) -> Option<&str> {
        self.names.iter().position(|n| n == name).map(|i| self.sources[i].as_str())
    }

    /// Whether the named template reads the `tools` variable, and whether it mentions
    /// `tool_calls` (the attribute assistant messages carry calls in); (false, false) for an
    /// unknown name.
    pub fn tool_support(&self, name: &str) -> (bool, bool) {
        let reads_tools = self
            .env
            .get_template(name)
            .is_ok_and(|t| t.undeclared_variables(false).contains("tools"));
        let mentions_calls = self.source(name).is_some_and(|s| s.contains("tool_calls"));
        (reads_tools, mentions_calls)
    }

    /// The template transformers would use: `tool_use` when tools are given and it exists,
    /// else `default`, else the only one; with several and no `default`, an error.
    pub fn select(&self, with_tools: bool) -> Result<&str> {
        if self.names.len() == 1 {
            return Ok(&self.names[0]);
        }
        for wanted in
            [with_tools.then_some(TOOL_USE_TEMPLATE), Some(DEFAULT_TEMPLATE)].into_iter().flatten()
        {
            if let Some(n) = self.names.iter().find(|n| n.as_str() == wanted) {
                return Ok(n);
            }
        }
        bail!(
            "{}: several chat templates ({}) and none named `default`",
            self.origin,
            self.names.join(", ")
        )
    }

    /// Renders the selected template with `messages` (a list of message objects),
    /// `add_generation_prompt`, and `variables` (special tokens and extras; an object).
    /// `tools` and `documents` are `none` unless `variables` sets them, as in transformers.
    pub fn render(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        variables: BTreeMap<String, Value>,
    ) -> Result<String> {
        Ok(self.render_with_generation_spans(messages, add_generation_prompt, variables)?.0)
    }

    /// [`ChatTemplate::render`] with the byte ranges of the text that `{% generation %}` blocks
    /// wrote (what the assistant says, in templates that mark it), in the order the blocks
    /// closed, as transformers' `generation_indices`; empty for templates without such blocks.
    pub fn render_with_generation_spans(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        variables: BTreeMap<String, Value>,
    ) -> Result<(String, Vec<Range<usize>>)> {
        if messages.len() == Some(0) {
            bail!(
                "cannot apply a chat template to an empty conversation; give at least one message"
            );
        }
        let with_tools = variables.get("tools").is_some_and(|t| !t.is_none() && !t.is_undefined());
        let name = self.select(with_tools)?;
        let mut ctx = variables;
        ctx.entry("tools".into()).or_insert(Value::from(()));
        ctx.entry("documents".into()).or_insert(Value::from(()));
        ctx.insert("messages".into(), messages);
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let template = self
            .env
            .get_template(name)
            .map_err(|e| anyhow!("{}: {}", self.origin, describe(&e)))?;
        let text = template.render(Value::from(ctx)).map_err(|e| {
            anyhow!("{}: chat template `{name}` failed: {}", self.origin, describe(&e))
        })?;
        take_generation_spans(&text)
            .map_err(|e| anyhow!("{}: chat template `{name}`: {e}", self.origin))
    }

    /// [`ChatTemplate::render_with_generation_spans`] for messages and extra variables given as
    /// JSON (see [`messages_from_json`] and [`variables_from_json`]).
    pub fn render_json_with_generation_spans(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<(String, Vec<Range<usize>>)> {
        self.render_with_generation_spans(
            messages_from_json(messages)?,
            add_generation_prompt,
            variables_from_json(extra, "extra template variables")?,
        )
    }
}

/// Marks the start and the end of a `{% generation %}` block's output while rendering (Unicode
/// noncharacters, reserved for a program's internal use).
const GENERATION_START: char = '\u{FDD0}';
const GENERATION_END: char = '\u{FDD1}';
/// The filter a `{% generation %}` block becomes.
const GENERATION_FILTER: &str = "__generation_block";

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags (whitespace control
/// `-` / `+` kept) as `{% filter __generation_block %}` / `{% endfilter %}`: a block tag like
/// them, so `trim_blocks` and `lstrip_blocks` treat it the same, whose filter wraps the body's
/// output in [`GENERATION_START`] / [`GENERATION_END`].
fn translate_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        match parse_generation_tag(tag) {
            Some((len, end, open_mod, close_mod)) => {
                let inner = if end {
                    "endfilter".to_string()
                } else {
                    format!("filter {GENERATION_FILTER}")
                };
                out.push_str(&format!("{{%{open_mod} {inner} {close_mod}%}}"));
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// At the start of `tag` (which begins with `{%`): a `generation` or `endgeneration` tag as
/// (its length, whether it ends the block, the whitespace-control marks after `{%` and before
/// `%}`), or `None` for any other tag.
fn parse_generation_tag(tag: &str) -> Option<(usize, bool, &str, &str)> {
    let mut pos = 2;
    let modifier = |at: usize| tag[at..].chars().next().filter(|c| *c == '-' || *c == '+');
    let open_mod = modifier(pos).map_or("", |c| if c == '-' { "-" } else { "+" });
    pos += open_mod.len();
    pos += tag[pos..].len() - tag[pos..].trim_start().len();
    let word_len = tag[pos..].find(|c: char| !c.is_ascii_alphanumeric() && c != '_')?;
    let end = match &tag[pos..pos + word_len] {
        "generation" => false,
        "endgeneration" => true,
        _ => return None,
    };
    pos += word_len;
    pos += tag[pos..].len() - tag[pos..].trim_start().len();
    let close_mod = modifier(pos).map_or("", |c| if c == '-' { "-" } else { "+" });
    pos += close_mod.len();
    tag[pos..].starts_with("%}").then_some((pos + 2, end, open_mod, close_mod))
}

/// The rendered text without the generation marks, and the byte range each marked block
/// covers, in the order the blocks closed.
fn take_generation_spans(marked: &str) -> Result<(String, Vec<Range<usize>>)> {
    if !marked.contains([GENERATION_START, GENERATION_END]) {
        return Ok((marked.to_string(), Vec::new()));
    }
    let mut text = String::with_capacity(marked.len());
    let mut open = Vec::new();
    let mut spans = Vec::new();
    for c in marked.chars() {
        match c {
            GENERATION_START => open.push(text.len()),
            GENERATION_END => {
                let start = open.pop().ok_or_else(|| {
                    anyhow!("the output holds U+FDD1, which marks generation blocks")
                })?;
                spans.push(start..text.len());
            }
            c => text.push(c),
        }
    }
    if !open.is_empty() {
        bail!("the output holds U+FDD0, which marks generation blocks");
    }
    Ok((text, spans))
}

/// The minijinja environment matching transformers' Jinja2 set-up.
fn jinja_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(python_method);
    env.set_formatter(|out, _state, value| {
        out.write_str(&pyformat::to_python_str(value)).map_err(Error::from)
    });
    env.add_filter("tojson", tojson);
    env.add_filter("capitalize", |s: &str| pyformat::python_capitalize(s));
    env.add_filter(GENERATION_FILTER, |s: String| format!("{GENERATION_START}{s}{GENERATION_END}"));
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Python methods on template values (`.strip()`, `.split()`, `.items()` …) from
/// minijinja-contrib's `pycompat`, with `str.title()` and `str.capitalize()` following
/// Python's Unicode title case (pycompat upper-cases: `'ß'` → `'SS'`, Python gives `'Ss'`).
fn python_method(
    state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let (Some(s), "title" | "capitalize") = (value.as_str(), method) {
        let () = minijinja::value::from_args(args)?;
        return Ok(Value::from(if method == "title" {
            pyformat::python_title(s)
        } else {
            pyformat::python_capitalize(s)
        }));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, not HTML-escaped.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let options = pyformat::JsonOptions::from_kwargs(&kwargs)?;
    if value.is_undefined() {
        return Err(Error::new(ErrorKind::UndefinedError, "tojson: the value is undefined"));
    }
    pyformat::to_json(value, &options).map(Value::from)
}

/// `raise_exception(message)`: stops rendering with the template's own message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time formatted like Python's `strftime`. In UTC
/// (transformers uses the local time zone; servers and containers run in UTC).
fn strftime_now(format: String) -> Result<Value, Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    pyformat::strftime_utc(&format, now)
        .map(Value::from)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
}

/// A minijinja error as one line: its message and the template line it happened at.
fn describe(e: &Error) -> String {
    let what = match e.kind() {
        // `raise_exception` messages are the template author's words; show them as they are.
        ErrorKind::InvalidOperation => {
            e.detail().map(str::to_string).unwrap_or_else(|| e.to_string())
        }
        _ => {
            let mut s = e.kind().to_string();
            if let Some(d) = e.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            s
        }
    };
    match e.line() {
        Some(line) => format!("{what} (line {line})"),
        None => what,
    }
}

/// Converts an extra-variables JSON value (an object, or null for none) into template
/// variables; `what` names the argument for errors.
pub(crate) fn variables_from_json(
    extra: &serde_json::Value,
    what: &str,
) -> Result<BTreeMap<String, Value>> {
    match extra {
        serde_json::Value::Null => Ok(BTreeMap::new()),
        serde_json::Value::Object(map) => {
            Ok(map.iter().map(|(k, v)| (k.clone(), Value::from_serialize(v))).collect())
        }
        other => Err(anyhow!(
            "{what} must be a JSON object of template variables, got {}",
            json_kind(other)
        )),
    }
}

/// Messages as transformers hands them to the template: a list of objects whose `None`
/// values are dropped, with `reasoning_content`/`thinking`/`reasoning` aliased to each other.
pub(crate) fn messages_from_json(messages: &serde_json::Value) -> Result<Value> {
    let list = messages
        .as_array()
        .ok_or_else(|| anyhow!("messages must be a JSON array, got {}", json_kind(messages)))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let obj = m
            .as_object()
            .ok_or_else(|| anyhow!("message {i} must be a JSON object, got {}", json_kind(m)))?;
        let mut msg: BTreeMap<String, Value> = obj
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), Value::from_serialize(v)))
            .collect();
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|k| obj.get(*k).filter(|v| !v.is_null()));
        if let Some(r) = reasoning {
            msg.entry("thinking".into()).or_insert_with(|| Value::from_serialize(r));
            msg.insert("reasoning_content".into(), Value::from_serialize(r));
        }
        out.push(Value::from(msg));
    }
    Ok(Value::from(out))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(
        src: &str,
        messages: serde_json::Value,
        gen: bool,
        extra: serde_json::Value,
    ) -> Result<String> {
        let t = ChatTemplate::single(src, "test")?;
        t.render(messages_from_json(&messages)?, gen, variables_from_json(&extra, "extra")?)
    }

    fn user(text: &str) -> serde_json::Value {
        serde_json::json!([{"role": "user", "content": text}])
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // With trim_blocks the newline after a block tag goes; lstrip_blocks removes the
        // indentation before one; one trailing newline of the source is dropped.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(render(src, user("hi"), false, serde_json::Value::Null).unwrap(), "U: hi\n");
    }

    #[test]
    fn python_spelling_of_printed_values() {
        let src = "{{ add_generation_prompt }} {{ tools }} {{ [1, 'a'] }} {{ x }} {{ missing }}|";
        let out = render(src, user("hi"), true, serde_json::json!({"x": 0.00001})).unwrap();
        assert_eq!(out, "True None [1, 'a'] 1e-05 |");
    }

    #[test]
    fn python_string_methods_and_tojson() {
        let src =
            "{{ messages[0].content.strip().split(',')|tojson }} {{ messages[0].content.startswith('  a') }} {{ {'k': 'é<'}|tojson }}";
        assert_eq!(
            render(src, user("  a,b "), false, serde_json::Value::Null).unwrap(),
            r#"["a", "b"] True {"k": "é<"}"#
        );
    }

    #[test]
    fn raise_exception_is_an_error_value() {
        let src = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}";
        let err = render(src, user("hi"), false, serde_json::Value::Null).unwrap_err().to_string();
        assert!(err.contains("first message must be system") && err.contains("test"), "{err}");
    }

    #[test]
    fn undefined_attribute_of_undefined_is_an_error() {
        // Jinja2's default Undefined prints as "" but fails on attribute access.
        assert_eq!(
            render("[{{ nothing }}]", user("hi"), false, serde_json::Value::Null).unwrap(),
            "[]"
        );
        assert!(render("{{ nothing.field }}", user("hi"), false, serde_json::Value::Null).is_err());
    }

    #[test]
    fn syntax_error_names_origin_and_template() {
        let err =
            ChatTemplate::single("{% for %}", "dir/tokenizer_config.json").unwrap_err().to_string();
        assert!(err.contains("dir/tokenizer_config.json") && err.contains("`default`"), "{err}");
    }

    #[test]
    fn named_templates_are_selected_like_transformers() {
        let t = ChatTemplate::new(
            vec![
                ("rag".into(), "R".into()),
                ("default".into(), "D".into()),
                ("tool_use".into(), "T".into()),
            ],
            "cfg",
        )
        .unwrap();
        assert_eq!(t.select(false).unwrap(), "default");
        assert_eq!(t.select(true).unwrap(), "tool_use");
        let msgs = messages_from_json(&user("x")).unwrap();
        let tools =
            variables_from_json(&serde_json::json!({"tools": [{"name": "f"}]}), "extra").unwrap();
        assert_eq!(t.render(msgs, false, tools).unwrap(), "T");
        let no_default =
            ChatTemplate::new(vec![("a".into(), "A".into()), ("b".into(), "B".into())], "cfg")
                .unwrap();
        assert!(no_default.select(false).unwrap_err().to_string().contains("none named `default`"));
    }

    #[test]
    fn messages_drop_none_and_alias_reasoning() {
        let msgs =
            serde_json::json!([{"role": "assistant", "content": null, "reasoning": "because"}]);
        let out = render(
            "{{ messages[0].content is defined }} {{ messages[0].reasoning_content }} {{ messages[0].thinking }}",
            msgs,
            false,
            serde_json::Value::Null,
        );
        assert_eq!(out.unwrap(), "False because because");
    }

    #[test]
    fn empty_conversation_and_bad_extras_are_errors() {
        assert!(render("x", serde_json::json!([]), false, serde_json::Value::Null)
            .unwrap_err()
            .to_string()
            .contains("empty conversation"));
        assert!(variables_from_json(&serde_json::json!([1]), "extra")
            .unwrap_err()
            .to_string()
            .contains("extra must be a JSON object"));
    }

    #[test]
    fn generation_blocks_render_their_body_and_give_its_span() {
        let src = "{% for m in messages %}\n{{- m.role + ': ' }}\n{%- if m.role == 'assistant' %}\n    {%- generation %}\n{{- m.content + '!' }}\n    {%- endgeneration %}\n{%- else %}{{ m.content }}{% endif %}\n|{% endfor %}";
        let t = ChatTemplate::single(src, "test").unwrap();
        let msgs = serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]);
        let (text, spans) =
            t.render_json_with_generation_spans(&msgs, false, &serde_json::Value::Null).unwrap();
        assert_eq!(text, "user: hi|assistant: yo!|");
        assert_eq!(spans, vec![20..23]);
        assert_eq!(&text[spans[0].clone()], "yo!");
        // The same text through `render`, and a template without blocks gives no spans.
        let plain = render(src, msgs.clone(), false, serde_json::Value::Null).unwrap();
        assert_eq!(plain, text);
        let none = ChatTemplate::single("{{ messages[0].content }}", "t").unwrap();
        assert!(none
            .render_json_with_generation_spans(&msgs, false, &serde_json::Value::Null)
            .unwrap()
            .1
            .is_empty());
        // Other tags that merely start alike are left alone.
        assert_eq!(
            translate_generation_tags("{%- generations %}{%+ generation -%}{% endgeneration%}"),
            "{%- generations %}{%+ filter __generation_block -%}{% endfilter %}"
        );
    }

    #[test]
    fn strftime_now_formats_the_current_year() {
        let year =
            render("{{ strftime_now('%Y') }}", user("x"), false, serde_json::Value::Null).unwrap();
        let y: i64 = year.parse().unwrap();
        assert!((2024..3000).contains(&y), "{year}");
    }
}
