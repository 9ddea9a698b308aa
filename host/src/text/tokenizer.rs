//! The tokenizer of a Hugging Face model folder, behaving as transformers' `AutoTokenizer`
//! (tokenizers backend, transformers 5).
//!
//! `tokenizer.json` is run by the `tokenizers` crate, the library transformers itself calls.
//! `tokenizer_config.json` adds what transformers layers on top: the named special tokens
//! (given as strings or as `{"content": …}` objects), `added_tokens_decoder` entries missing
//! from `tokenizer.json`, `split_special_tokens`, `clean_up_tokenization_spaces` and the
//! chat template (a string, or a list of named templates; a `chat_template.jinja` file next
//! to it takes priority, as in transformers). As in transformers 5, what `encode(…, true)`
//! adds is decided by `tokenizer.json`'s post-processor; `add_bos_token`/`add_eos_token` are
//! read and reported but do not override it (transformers drops them when a
//! `tokenizer.json` exists). Truncation and padding stored in `tokenizer.json` are off, as
//! transformers turns them off unless a call asks for them.
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ferrotune_plugin_api::Message;
use minijinja::Value as TemplateValue;
use serde_json::Value as Json;
use tokenizers::models::ModelWrapper;
use tokenizers::AddedToken;

use super::chat_template::{messages_from_json, variables_from_json, ChatTemplate};
use super::tool_calls;

/// File names inside a model folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const CHAT_TEMPLATES_DIR: &str = "chat_templates";

/// The named special tokens transformers knows (`SPECIAL_TOKENS_ATTRIBUTES`); each is also
/// a chat-template variable when set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub sep_token: Option<String>,
    pub pad_token: Option<String>,
    pub cls_token: Option<String>,
    pub mask_token: Option<String>,
}

impl SpecialTokens {
    const KEYS: [&'static str; 7] = [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ];

    fn slot(&mut self, key: &str) -> &mut Option<String> {
        match key {
            "bos_token" => &mut self.bos_token,
            "eos_token" => &mut self.eos_token,
            "unk_token" => &mut self.unk_token,
            "sep_token" => &mut self.sep_token,
            "pad_token" => &mut self.pad_token,
            "cls_token" => &mut self.cls_token,
            _ => &mut self.mask_token,
        }
    }

    /// `(key, token)` for every token that is set, in transformers' order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let all = [
            &self.bos_token,
            &self.eos_token,
            &self.unk_token,
            &self.sep_token,
            &self.pad_token,
            &self.cls_token,
            &self.mask_token,
        ];
        Self::KEYS.into_iter().zip(all).filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

/// An `added_tokens_decoder` entry of `tokenizer_config.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AddedTokenSpec {
    content: String,
    special: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
    normalized: bool,
}

/// What ferrotune reads from `tokenizer_config.json`.
#[derive(Debug, Default)]
struct TokenizerConfig {
    special: SpecialTokens,
    /// Named extra special tokens (transformers 5 `extra_special_tokens` given as an object,
    /// such as `image_token`); also template variables.
    named_extra: Vec<(String, String)>,
    /// `additional_special_tokens` / `extra_special_tokens` given as a list.
    extra: Vec<String>,
    added_tokens: BTreeMap<u32, AddedTokenSpec>,
    chat_templates: Option<Vec<(String, String)>>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    clean_up_tokenization_spaces: bool,
    split_special_tokens: bool,
}

fn kind(v: &Json) -> String {
    match v {
        Json::Null => "null".into(),
        Json::Bool(b) => format!("the boolean {b}"),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) if s.len() > 40 => "a string".into(),
        Json::String(s) => format!("the string {s:?}"),
        Json::Array(_) => "an array".into(),
        Json::Object(_) => "an object".into(),
    }
}

impl TokenizerConfig {
    fn parse(json: &Json, file: &Path) -> Result<Self> {
        let f = file.display();
        let obj = json.as_object().ok_or_else(|| {
            anyhow!("{f}: expected a JSON object at the top level, found {}", kind(json))
        })?;
        let mut cfg = TokenizerConfig::default();

        let token = |key: &str, v: &Json| -> Result<Option<String>> {
            match v {
                Json::Null => Ok(None),
                Json::String(s) => Ok(Some(s.clone())),
                Json::Object(o) => match o.get("content") {
                    Some(Json::String(s)) => Ok(Some(s.clone())),
                    other => bail!(
                        "{f}: key `{key}`: a token object needs a string \"content\", found {}",
                        other.map(kind).unwrap_or_else(|| "no \"content\"".into())
                    ),
                },
                other => bail!("{f}: key `{key}`: expected a token string, an object with \"content\", or null; found {}", kind(other)),
            }
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            match obj.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::Bool(b)) => Ok(Some(*b)),
                Some(other) => {
                    bail!("{f}: key `{key}`: expected true, false or null, found {}", kind(other))
                }
            }
        };

        for key in SpecialTokens::KEYS {
            if let Some(v) = obj.get(key) {
                *cfg.special.slot(key) = token(key, v)?;
            }
        }
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            match obj.get(key) {
                None | Some(Json::Null) => {}
                Some(Json::Array(items)) => {
                    for (i, v) in items.iter().enumerate() {
                        if let Some(t) = token(&format!("{key}[{i}]"), v)? {
                            if !cfg.extra.contains(&t) {
                                cfg.extra.push(t);
                            }
                        }
                    }
                }
                Some(Json::Object(named)) => {
                    for (name, v) in named {
                        if let Some(t) = token(&format!("{key}.{name}"), v)? {
                            cfg.named_extra.push((name.clone(), t));
                        }
                    }
                }
                Some(other) => bail!("{f}: key `{key}`: expected a list of tokens or an object of named tokens, found {}", kind(other)),
            }
        }

        cfg.added_tokens = parse_added_tokens(obj, file)?;
        cfg.chat_templates = parse_chat_templates(obj, file)?;

        cfg.add_bos_token = flag("add_bos_token")?;
        cfg.add_eos_token = flag("add_eos_token")?;
        cfg.clean_up_tokenization_spaces = flag("clean_up_tokenization_spaces")?.unwrap_or(false);
        cfg.split_special_tokens = flag("split_special_tokens")?.unwrap_or(false);
        Ok(cfg)
    }
}

/// `added_tokens_decoder` of a `tokenizer_config.json`: token id → how the token is matched.
fn parse_added_tokens(
    obj: &serde_json::Map<String, Json>,
    file: &Path,
) -> Result<BTreeMap<u32, AddedTokenSpec>> {
    let f = file.display();
    let mut out = BTreeMap::new();
    match obj.get("added_tokens_decoder") {
        None | Some(Json::Null) => {}
        Some(Json::Object(entries)) => {
            for (id, v) in entries {
                let key = format!("added_tokens_decoder.{id}");
                let id: u32 = id.parse().map_err(|_| {
                    anyhow!("{f}: key `{key}`: the key must be a token id (a non-negative integer)")
                })?;
                let o = v.as_object().ok_or_else(|| {
                    anyhow!("{f}: key `{key}`: expected an object, found {}", kind(v))
                })?;
                let content = match o.get("content") {
                    Some(Json::String(s)) => s.clone(),
                    other => bail!(
                        "{f}: key `{key}.content`: expected a string, found {}",
                        other.map(kind).unwrap_or_else(|| "nothing".into())
                    ),
                };
                let b = |name: &str, default: bool| -> Result<bool> {
                    match o.get(name) {
                        None | Some(Json::Null) => Ok(default),
                        Some(Json::Bool(b)) => Ok(*b),
                        Some(other) => bail!(
                            "{f}: key `{key}.{name}`: expected true or false, found {}",
                            kind(other)
                        ),
                    }
                };
                let special = b("special", false)?;
                let spec = AddedTokenSpec {
                    content,
                    special,
                    lstrip: b("lstrip", false)?,
                    rstrip: b("rstrip", false)?,
                    single_word: b("single_word", false)?,
                    normalized: b("normalized", !special)?,
                };
                out.insert(id, spec);
            }
        }
        Some(other) => bail!(
            "{f}: key `added_tokens_decoder`: expected an object of id -> token, found {}",
            kind(other)
        ),
    }
    Ok(out)
}

/// `chat_template` of a `tokenizer_config.json`: one template, or a list of named ones.
fn parse_chat_templates(
    obj: &serde_json::Map<String, Json>,
    file: &Path,
) -> Result<Option<Vec<(String, String)>>> {
    let f = file.display();
    let templates = match obj.get("chat_template") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(vec![(super::chat_template::DEFAULT_TEMPLATE.to_string(), s.clone())]),
        Some(Json::Array(items)) => {
            let mut list = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some(n), Some(t)) => list.push((n.to_string(), t.to_string())),
                    _ => bail!(
                        "{f}: key `chat_template[{i}]`: expected an object with string \"name\" and \"template\", found {}",
                        kind(item)
                    ),
                }
            }
            Some(list)
        }
        Some(other) => bail!(
            "{f}: key `chat_template`: expected a template string or a list of {{\"name\", \"template\"}} objects, found {}",
            kind(other)
        ),
    };
    Ok(templates)
}

/// A tokenizer loaded from `tokenizer.json` (+ `tokenizer_config.json`).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    named_extra: Vec<(String, String)>,
    extra_special_tokens: Vec<String>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    clean_up_tokenization_spaces: bool,
    chat_template: Option<ChatTemplate>,
    /// The tokenizer.json this came from, for error messages.
    origin: PathBuf,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("chat_template", &self.chat_template)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, `dir/tokenizer_config.json` when present, and
    /// `dir/chat_template.jinja` / `dir/chat_templates/*.jinja` when present (these take
    /// priority over the config's `chat_template`, as in transformers).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{} is not a folder: expected a model folder holding {TOKENIZER_FILE}",
                dir.display()
            );
        }
        let config = dir.join(TOKENIZER_CONFIG_FILE);
        let mut tok = Self::from_files(
            &dir.join(TOKENIZER_FILE),
            config.is_file().then_some(config.as_path()),
        )?;
        if let Some(t) = read_template_files(dir)? {
            tok.chat_template = Some(t);
        }
        Ok(tok)
    }

    /// Loads a `tokenizer.json` and optionally its `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config_json: Option<&Path>) -> Result<Self> {
        if !tokenizer_json.is_file() {
            bail!(
                "{} does not exist: a model folder needs a Hugging Face {TOKENIZER_FILE}",
                tokenizer_json.display()
            );
        }
        let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| {
            anyhow!("{}: not a valid {TOKENIZER_FILE}: {e}", tokenizer_json.display())
        })?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| {
            anyhow!("{}: cannot turn truncation off: {e}", tokenizer_json.display())
        })?;

        let config = match tokenizer_config_json {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let json: Json = serde_json::from_str(&text)
                    .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
                TokenizerConfig::parse(&json, path)?
            }
            None => TokenizerConfig::default(),
        };
        let chat_template = match (&config.chat_templates, tokenizer_config_json) {
            (Some(list), Some(path)) => Some(ChatTemplate::new(
                list.clone(),
                format!("{} (key `chat_template`)", path.display()),
            )?),
            _ => None,
        };

        add_missing_tokens(&mut inner, &config);
        inner.set_encode_special_tokens(config.split_special_tokens);

        Ok(Self {
            inner,
            special: config.special,
            named_extra: config.named_extra,
            extra_special_tokens: config.extra,
            add_bos_token: config.add_bos_token,
            add_eos_token: config.add_eos_token,
            clean_up_tokenization_spaces: config.clean_up_tokenization_spaces,
            chat_template,
            origin: tokenizer_json.to_path_buf(),
        })
    }

    /// Token ids of `text`. `add_special_tokens` lets `tokenizer.json`'s post-processor add
    /// its tokens (a BOS for Llama-style tokenizers; nothing for Qwen2). Special tokens
    /// written in the text are recognised unless `split_special_tokens` is set.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(|e| {
            anyhow!("{}: cannot encode a text of {} bytes: {e}", self.origin.display(), text.len())
        })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// [`encode`](Self::encode) for several texts (in parallel).
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        add_special_tokens: bool,
    ) -> Result<Vec<Vec<i64>>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encs = self.inner.encode_batch_fast(inputs, add_special_tokens).map_err(|e| {
            anyhow!(
                "{}: cannot encode a batch of {} texts: {e}",
                self.origin.display(),
                texts.len()
            )
        })?;
        Ok(encs.iter().map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect()).collect())
    }

    /// The text of `ids`. Ids the tokenizer does not know are skipped, as transformers does
    /// (a model's embedding is often larger than its vocabulary); negative ids are an error.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                u32::try_from(id).map_err(|_| {
                    anyhow!("cannot decode token id {id} at position {i}: ids are 0..{}", u32::MAX)
                })
            })
            .collect::<Result<_>>()?;
        let text = self.inner.decode(&ids, skip_special_tokens).map_err(|e| {
            anyhow!("{}: cannot decode {} ids: {e}", self.origin.display(), ids.len())
        })?;
        // transformers skips this clean-up for BPE models even when the config asks for it.
        let is_bpe = matches!(self.inner.get_model(), ModelWrapper::BPE(_));
        Ok(if self.clean_up_tokenization_spaces && !is_bpe {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// The id of a token (vocabulary entry or added token).
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The token of an id.
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id).ok().and_then(|id| self.inner.id_to_token(id))
    }

    /// Number of ids the tokenizer can produce, added tokens included (transformers'
    /// `len(tokenizer)`; 151646 for Qwen2). A model's embedding has at least this many rows.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The base vocabulary without added tokens (transformers' `tokenizer.vocab_size`).
    pub fn base_vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    /// The named special tokens from `tokenizer_config.json`.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// `additional_special_tokens` / `extra_special_tokens` (list form).
    pub fn extra_special_tokens(&self) -> &[String] {
        &self.extra_special_tokens
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special.eos_token.as_deref()
    }

    pub fn eos_token_id(&self) -> Option<i64> {
        self.special.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn pad_token_id(&self) -> Option<i64> {
        self.special.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn bos_token_id(&self) -> Option<i64> {
        self.special.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn unk_token_id(&self) -> Option<i64> {
        self.special.unk_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// `add_bos_token` as written in `tokenizer_config.json` (informational; see the module
    /// doc).
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }

    /// `add_eos_token` as written in `tokenizer_config.json` (informational).
    pub fn add_eos_token(&self) -> Option<bool> {
        self.add_eos_token
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the chat template (a template given on the command line, for example).
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// The prompt text of a conversation: transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &Json::Null)
    }

    /// [`apply_chat_template`](Self::apply_chat_template) with extra template variables
    /// (a JSON object such as `{"tools": […], "enable_thinking": false}`, or null). They
    /// override the special-token variables, as transformers' keyword arguments do.
    ///
    /// Function calling as transformers' `apply_chat_template(messages, tools=…)`: a
    /// [`FUNCTION_CALL_ROLE`](ferrotune_plugin_api::FUNCTION_CALL_ROLE) turn becomes an
    /// assistant message with `tool_calls`, and `tools` may also be the JSON text of the
    /// list (see [`tool_calls`](super::tool_calls)). Tools or calls given to a template that
    /// never reads them are an error naming the template.
    pub fn apply_chat_template_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &Json,
    ) -> Result<String> {
        let template = self.template()?;
        let (messages, calls) = tool_calls::template_messages(messages)?;
        let mut extra = extra.clone();
        let tools = match extra.as_object_mut().and_then(|m| m.remove("tools")) {
            Some(tools) => tool_calls::tools_value(&tools)?,
            None => None,
        };
        let name = template.select(tools.is_some())?;
        tool_calls::check_support(template, name, tools.is_some(), calls)?;
        let mut vars = self.template_variables(&extra)?;
        if let Some(tools) = tools {
            vars.insert("tools".into(), tools);
        }
        template.render(messages, add_generation_prompt, vars)
    }

    /// The same for messages given as JSON (tool calls, content blocks with images): a list
    /// of objects; keys whose value is null are dropped, as transformers does.
    pub fn apply_chat_template_json(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra: &Json,
    ) -> Result<String> {
        let template = self.template()?;
        let vars = self.template_variables(extra)?;
        template.render(messages_from_json(messages)?, add_generation_prompt, vars)
    }

    /// The chat template, or an error saying the tokenizer has none.
    fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: this tokenizer has no chat template (no `chat_template` in {TOKENIZER_CONFIG_FILE} and no {CHAT_TEMPLATE_FILE}); give one or use a model with one",
                self.origin.parent().unwrap_or(Path::new(".")).display()
            )
        })
    }

    /// The named special tokens, then `extra` (a JSON object or null) over them.
    fn template_variables(&self, extra: &Json) -> Result<BTreeMap<String, TemplateValue>> {
        let mut vars: BTreeMap<String, TemplateValue> = BTreeMap::new();
        for (key, token) in self.special.iter() {
            vars.insert(key.to_string(), TemplateValue::from(token));
        }
        for (key, token) in &self.named_extra {
            vars.insert(key.clone(), TemplateValue::from(token.as_str()));
        }
        vars.extend(variables_from_json(extra, "extra template variables")?);
        Ok(vars)
    }

    /// Token ids of a conversation: the rendered prompt encoded without adding special
    /// tokens (the template writes them), as transformers' `apply_chat_template(…,
    /// tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<i64>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?, false)
    }

    /// The underlying `tokenizers` tokenizer (offsets, word ids, …).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Adds what transformers adds on loading: `added_tokens_decoder` entries (by id) and the
/// named and extra special tokens that are not yet added tokens of `tokenizer.json`. A
/// special token already in the base vocabulary keeps its id but becomes an added special
/// token (matched whole in text, skipped by `skip_special_tokens`), as in transformers.
fn add_missing_tokens(inner: &mut tokenizers::Tokenizer, config: &TokenizerConfig) {
    let mut added: HashSet<String> =
        inner.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
    let named: HashSet<&str> = config
        .special
        .iter()
        .map(|(_, t)| t)
        .chain(config.named_extra.iter().map(|(_, t)| t.as_str()))
        .collect();
    for (&id, spec) in &config.added_tokens {
        if added.contains(&spec.content) {
            continue;
        }
        let token = AddedToken::from(
            spec.content.clone(),
            spec.special || named.contains(spec.content.as_str()),
        )
        .lstrip(spec.lstrip)
        .rstrip(spec.rstrip)
        .single_word(spec.single_word)
        .normalized(spec.normalized);
        inner.add_tokens(&[token]);
        added.insert(spec.content.clone());
        let got = inner.token_to_id(&spec.content);
        if got != Some(id) {
            tracing::warn!(token = %spec.content, declared = id, assigned = ?got, "added token got another id than added_tokens_decoder declares");
        }
    }
    let specials = config.special.iter().map(|(_, t)| t.to_string());
    let extras =
        config.named_extra.iter().map(|(_, t)| t.clone()).chain(config.extra.iter().cloned());
    for t in specials.chain(extras) {
        if added.insert(t.clone()) {
            inner.add_tokens(&[AddedToken::from(t, true)]);
        }
    }
}

/// `chat_template.jinja` and `chat_templates/*.jinja` of a folder, if any.
fn read_template_files(dir: &Path) -> Result<Option<ChatTemplate>> {
    let mut templates = Vec::new();
    let single = dir.join(CHAT_TEMPLATE_FILE);
    if single.is_file() {
        let text = std::fs::read_to_string(&single)
            .with_context(|| format!("reading {}", single.display()))?;
        templates.push((super::chat_template::DEFAULT_TEMPLATE.to_string(), text));
    }
    let folder = dir.join(CHAT_TEMPLATES_DIR);
    if folder.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
            .with_context(|| format!("listing {}", folder.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
            .collect();
        files.sort();
        for p in files {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            templates.push((name, text));
        }
    }
    if templates.is_empty() {
        return Ok(None);
    }
    ChatTemplate::new(
        templates,
        format!("{} ({CHAT_TEMPLATE_FILE}, {CHAT_TEMPLATES_DIR}/)", dir.display()),
    )
    .map(Some)
}

/// transformers' `clean_up_tokenization` (spaces before punctuation and contractions).
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE tokenizer.json over a handful of merges, with `<|end|>` and
    /// `<|user|>` as special tokens and a post-processor that adds `<s>` (Llama-style).
    fn tiny_tokenizer_json() -> Json {
        // GPT-2 byte-level alphabet for the printable ASCII used here; 'Ġ' is the space.
        let mut vocab = serde_json::Map::new();
        for (i, c) in "abcdehilnorstwxyĠ!,".chars().enumerate() {
            vocab.insert(c.to_string(), Json::from(i));
        }
        let merges = [
            ("h", "e"),
            ("he", "l"),
            ("hel", "l"),
            ("hell", "o"),
            ("Ġ", "w"),
            ("o", "r"),
            ("Ġw", "or"),
            ("Ġwor", "l"),
            ("Ġworl", "d"),
        ];
        let mut next = vocab.len();
        for (a, b) in merges {
            vocab.insert(format!("{a}{b}"), Json::from(next));
            next += 1;
        }
        let n = next;
        serde_json::json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
            "padding": null,
            "added_tokens": [
                {"id": n, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": n + 1, "content": "<|user|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": n + 2, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [n + 2], "tokens": ["<s>"]}}
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
        })
    }

    fn write_dir(tag: &str, config: Option<Json>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrotune-text-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(TOKENIZER_FILE), tiny_tokenizer_json().to_string()).unwrap();
        if let Some(c) = config {
            std::fs::write(dir.join(TOKENIZER_CONFIG_FILE), c.to_string()).unwrap();
        }
        dir
    }

    fn config() -> Json {
        serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "special": true},
            "eos_token": "<|end|>",
            "pad_token": null,
            "add_bos_token": true,
            "added_tokens_decoder": {
                "31": {"content": "<|tool|>", "special": true}
            },
            "additional_special_tokens": ["<|user|>"],
            "chat_template": [
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ '<|' + m.role + '|>' + m.content + eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"},
                {"name": "tool_use", "template": "{{ tools|length }} tools"}
            ]
        })
    }

    #[test]
    fn encode_decode_and_special_tokens() {
        let dir = write_dir("basic", Some(config()));
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let hello = tok.token_to_id("hello").unwrap();
        let world = tok.token_to_id("Ġworld").unwrap();
        let bos = tok.bos_token_id().unwrap();
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![hello, world]);
        // The post-processor adds <s>; truncation from tokenizer.json (max 2) is off.
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![bos, hello, world]);
        assert_eq!(
            tok.encode_batch(&["hello", "hello world"], false).unwrap(),
            vec![vec![hello], vec![hello, world]]
        );
        let end = tok.eos_token_id().unwrap();
        assert_eq!(tok.encode("hello<|end|>", false).unwrap(), vec![hello, end]);
        assert_eq!(tok.decode(&[bos, hello, world, end], false).unwrap(), "<s>hello world<|end|>");
        assert_eq!(tok.decode(&[bos, hello, world, end], true).unwrap(), "hello world");
        assert_eq!(tok.pad_token_id(), None);
        assert_eq!(tok.add_bos_token(), Some(true));
        // The added token from added_tokens_decoder got the next free id, 31.
        assert_eq!(tok.token_to_id("<|tool|>"), Some(31));
        assert_eq!(tok.vocab_size(), 32);
        assert_eq!(tok.base_vocab_size(), 28);
        // Unknown ids are skipped like transformers; negative ones are an error.
        assert_eq!(tok.decode(&[hello, 9999], false).unwrap(), "hello");
        assert!(tok.decode(&[-1], false).unwrap_err().to_string().contains("position 0"));
    }

    /// transformers (checked with `AutoTokenizer` on the same files) makes a special token
    /// that is only in the base vocabulary an added special token: same id, skipped when
    /// decoding with `skip_special_tokens`.
    #[test]
    fn special_token_from_base_vocabulary_becomes_special() {
        let dir = write_dir("vocab-special", Some(serde_json::json!({"unk_token": "x"})));
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let x = tok.unk_token_id().unwrap();
        assert_eq!(x, 14, "keeps its base-vocabulary id");
        let hello = tok.token_to_id("hello").unwrap();
        assert_eq!(tok.decode(&[hello, x], true).unwrap(), "hello");
        assert_eq!(tok.decode(&[hello, x], false).unwrap(), "hellox");
        assert_eq!(tok.vocab_size(), 31);
    }

    #[test]
    fn chat_template_list_and_special_token_variables() {
        let dir = write_dir("chat", Some(config()));
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert!(tok.has_chat_template());
        let msgs = [Message::new("user", "hello"), Message::new("assistant", "world")];
        assert_eq!(
            tok.apply_chat_template(&msgs, true).unwrap(),
            "<s><|user|>hello<|end|><|assistant|>world<|end|><|assistant|>"
        );
        let with_tools = tok
            .apply_chat_template_with(&msgs, false, &serde_json::json!({"tools": [{}, {}]}))
            .unwrap();
        assert_eq!(with_tools, "2 tools");
        // Extra variables override the special tokens.
        let out = tok
            .apply_chat_template_with(&msgs[..1], false, &serde_json::json!({"bos_token": "B"}))
            .unwrap();
        assert!(out.starts_with("B<|user|>"), "{out}");
        let ids = tok.encode_chat(&msgs[..1], false).unwrap();
        assert_eq!(ids[0], tok.bos_token_id().unwrap());
    }

    #[test]
    fn chat_template_jinja_file_takes_priority() {
        let dir = write_dir("jinja", Some(config()));
        std::fs::write(dir.join(CHAT_TEMPLATE_FILE), "from file: {{ messages[0].content }}\n")
            .unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            tok.apply_chat_template(&[Message::new("user", "x")], false).unwrap(),
            "from file: x"
        );
    }

    #[test]
    fn without_config_there_is_no_template_and_no_special_tokens() {
        let dir = write_dir("noconfig", None);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert!(!tok.has_chat_template());
        assert_eq!(tok.eos_token_id(), None);
        let err =
            tok.apply_chat_template(&[Message::new("user", "x")], false).unwrap_err().to_string();
        assert!(err.contains("no chat template"), "{err}");
    }

    #[test]
    fn missing_tokenizer_json_names_the_path() {
        let dir = write_dir("missing", None);
        std::fs::remove_file(dir.join(TOKENIZER_FILE)).unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains(&dir.join(TOKENIZER_FILE).display().to_string()), "{err}");
    }

    #[test]
    fn malformed_config_names_file_and_key() {
        for (bad, key) in [
            (serde_json::json!({"eos_token": 5}), "`eos_token`"),
            (serde_json::json!({"bos_token": {"special": true}}), "`bos_token`"),
            (serde_json::json!({"chat_template": 3}), "`chat_template`"),
            (serde_json::json!({"chat_template": [{"name": "default"}]}), "`chat_template[0]`"),
            (
                serde_json::json!({"added_tokens_decoder": {"x": {"content": "a"}}}),
                "`added_tokens_decoder.x`",
            ),
            (
                serde_json::json!({"added_tokens_decoder": {"7": {"content": "a", "special": "yes"}}}),
                "`added_tokens_decoder.7.special`",
            ),
            (serde_json::json!({"add_bos_token": "true"}), "`add_bos_token`"),
            (
                serde_json::json!({"additional_special_tokens": "<x>"}),
                "`additional_special_tokens`",
            ),
            (serde_json::json!({"chat_template": "{% if %}"}), "`chat_template`"),
        ] {
            let dir = write_dir("bad", Some(bad.clone()));
            let err = format!("{:#}", Tokenizer::from_dir(&dir).unwrap_err());
            assert!(err.contains(TOKENIZER_CONFIG_FILE) && err.contains(key), "{bad}: {err}");
        }
        let dir = write_dir("notjson", None);
        std::fs::write(dir.join(TOKENIZER_CONFIG_FILE), "{ not json").unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains(TOKENIZER_CONFIG_FILE) && err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn malformed_tokenizer_json_names_the_file() {
        let dir = write_dir("badjson", None);
        std::fs::write(dir.join(TOKENIZER_FILE), r#"{"model": {"type": "Nope"}}"#).unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains(TOKENIZER_FILE) && err.contains("not a valid"), "{err}");
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("a , b . c ! d ? it 's I 'm we 're do n't"),
            "a, b. c! d? it's I'm we're don't"
        );
    }
}
