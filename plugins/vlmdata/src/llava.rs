//! The LLaVA JSON that Qwen2-VL-Finetune trains on: one row per conversation,
//!
//! ```json
//! {"id": "000001", "image": "cat.jpg",
//!  "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
//!                    {"from": "gpt", "value": "A cat."}]}
//! ```
//!
//! `image` is one path or a list (absent: a text-only row); each image has one `<image>`
//! placeholder (Qwen2-VL-Finetune's `LLAVA_IMAGE_TOKEN`) in the turns, in order. Relative
//! paths are joined to `image_folder` (default: the JSON file's folder), URLs are kept.
//! Turns alternate human → gpt after an optional leading system turn; `user` / `assistant`
//! roles and `{role, content}` turns are read too. As Qwen2-VL-Finetune's
//! `replace_image_tokens` does, one newline on each side of a placeholder is dropped (turn it
//! off with `strip_image_newlines: false`). Qwen2-VL-Finetune's DPO rows
//! (`prompt`, `chosen`, `rejected` strings) become [`Sample::chosen`] / [`Sample::rejected`].
//!
//! `video` is one video or a list (a file such as an mp4, or a folder of frames), with one
//! `<video>` placeholder each, joined to `video_folder` (default: `image_folder`, as
//! Qwen2-VL-Finetune joins videos to its `--image_folder`).
//!
//! A path is a `.json` (array) or `.jsonl` file, or a folder holding `{split}.json` or
//! `{split}.jsonl`. The file is parsed when the split is opened; a row is converted when it
//! is asked for, and a bad row's error names the file, the row index and its `id`.
use std::path::{Path, PathBuf};

use ferrotune_plugin_api::records::{kind_of, read_records, Record};
use ferrotune_plugin_api::{
    DataSource, ImageSource, Message, PluginError, PluginResult, Sample, SampleReader,
    IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `{"image_folder": …, "columns": {…}, "strip_image_newlines": true, "image_min_pixels": …,
/// "image_max_pixels": …}`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlavaConfig {
    /// Folder that relative image paths are joined to (Qwen2-VL-Finetune's `--image_folder`);
    /// itself relative to the data file's folder unless absolute.
    /// Default: the folder of the JSON file.
    #[serde(default)]
    pub image_folder: Option<String>,
    /// Folder that relative video paths are joined to (relative to the data file's folder
    /// unless absolute). Default: `image_folder`'s.
    #[serde(default)]
    pub video_folder: Option<String>,
    /// Which row keys hold what.
    #[serde(default)]
    pub columns: LlavaColumns,
    /// Drop one `\n` on each side of every `<image>`, as Qwen2-VL-Finetune does. Default true.
    #[serde(default = "default_true")]
    pub strip_image_newlines: bool,
    /// Passed on as `extra.image_min_pixels` for the host's image processor (Qwen2-VL-Finetune's
    /// `--image_min_pixels`). Default: the processor's own.
    #[serde(default)]
    pub image_min_pixels: Option<u64>,
    /// Passed on as `extra.image_max_pixels` (`--image_max_pixels`). Default: the processor's own.
    #[serde(default)]
    pub image_max_pixels: Option<u64>,
}

fn default_true() -> bool {
    true
}

/// Row key names (Qwen2-VL-Finetune's, by default).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LlavaColumns {
    /// Default `id`.
    pub id: String,
    /// One image path or a list of them. Default `image`.
    pub image: String,
    /// One video (a file or a frame folder) or a list of them. Default `video`.
    pub video: String,
    /// The turns. Default `conversations`.
    pub conversations: String,
    /// DPO rows: the user turn. Default `prompt`.
    pub prompt: String,
    /// DPO rows: the preferred answer. Default `chosen`.
    pub chosen: String,
    /// DPO rows: the dispreferred answer. Default `rejected`.
    pub rejected: String,
}

impl Default for LlavaColumns {
    fn default() -> Self {
        Self {
            id: "id".into(),
            image: "image".into(),
            video: "video".into(),
            conversations: "conversations".into(),
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

impl LlavaConfig {
    pub fn validate(&self) -> PluginResult<()> {
        if let (Some(lo), Some(hi)) = (self.image_min_pixels, self.image_max_pixels) {
            if lo > hi {
                return Err(PluginError::config(
                    "image_min_pixels",
                    format!("{lo} is above image_max_pixels {hi}"),
                ));
            }
        }
        Ok(())
    }

    /// One row as a sample; `image_base` is the folder relative image paths are joined to.
    /// The error says what is wrong with the row (the caller adds where the row is).
    pub fn convert(&self, row: &Map<String, Value>, image_base: &Path) -> Result<Sample, String> {
        self.convert_with(row, image_base, image_base)
    }

    /// [`Self::convert`] with relative video paths joined to `video_base`.
    pub fn convert_with(
        &self,
        row: &Map<String, Value>,
        image_base: &Path,
        video_base: &Path,
    ) -> Result<Sample, String> {
        let c = &self.columns;
        let mut sample = Sample::default();
        let dpo = present(row, &c.chosen).is_some() || present(row, &c.rejected).is_some();
        if dpo {
            sample.messages = match (present(row, &c.prompt), present(row, &c.conversations)) {
                (Some(Value::String(p)), _) => vec![Message::new("user", self.text(p))],
                (Some(other), _) => {
                    return Err(format!(
                        "`{}`: expected a string, found {}",
                        c.prompt,
                        kind_of(other)
                    ))
                }
                (None, Some(turns)) => self.turns(turns, true)?,
                (None, None) => {
                    return Err(format!(
                        "a DPO row (it has `{}`/`{}`) needs `{}` or `{}`",
                        c.chosen, c.rejected, c.prompt, c.conversations
                    ))
                }
            };
            sample.chosen = Some(self.answer(row, &c.chosen)?);
            sample.rejected = Some(self.answer(row, &c.rejected)?);
        } else {
            let turns = present(row, &c.conversations)
                .ok_or_else(|| format!("no `{}` key", c.conversations))?;
            sample.messages = self.turns(turns, false)?;
        }

        let paths = path_list(row, &c.image)?;
        let videos = path_list(row, &c.video)?;
        for (what, key, list, mark) in [
            ("image", &c.image, &paths, IMAGE_PLACEHOLDER),
            ("video", &c.video, &videos, VIDEO_PLACEHOLDER),
        ] {
            let placeholders: usize =
                sample.messages.iter().map(|m| m.content.matches(mark).count()).sum();
            if placeholders != list.len() {
                return Err(format!(
                    "{} {what}(s) in `{key}` but {placeholders} `{mark}` placeholder(s) in the turns; \
                     write one `{mark}` per {what}, in order",
                    list.len(),
                ));
            }
        }
        sample.images =
            paths.into_iter().map(|p| ImageSource::Path(join_image(image_base, p))).collect();
        sample.videos =
            videos.into_iter().map(|p| ImageSource::Path(join_image(video_base, p))).collect();
        for (key, value) in [
            ("image_min_pixels", self.image_min_pixels),
            ("image_max_pixels", self.image_max_pixels),
        ] {
            if let Some(v) = value {
                sample.extra.insert(key.into(), v.into());
            }
        }
        Ok(sample)
    }

    /// A turn's text with the placeholder newlines dropped when asked.
    fn text(&self, value: &str) -> String {
        if self.strip_image_newlines {
            strip_image_newlines(value)
        } else {
            value.to_string()
        }
    }

    /// The turns: an optional system turn, then user / assistant alternating, ending with an
    /// assistant turn (or, for a DPO prompt, with a user turn).
    fn turns(&self, turns: &Value, prompt_only: bool) -> Result<Vec<Message>, String> {
        let col = &self.columns.conversations;
        let list = turns.as_array().ok_or_else(|| {
            format!("`{col}`: expected a list of turns, found {}", kind_of(turns))
        })?;
        if list.is_empty() {
            return Err(format!("`{col}`: no turns"));
        }
        let mut messages = Vec::with_capacity(list.len());
        for (i, turn) in list.iter().enumerate() {
            let (role, value) = parse_turn(turn).map_err(|e| format!("`{col}[{i}]`: {e}"))?;
            let position =
                i - usize::from(messages.first().is_some_and(|m: &Message| m.role == "system"));
            let expected = if position % 2 == 0 { "user" } else { "assistant" };
            if !(role == expected || (role == "system" && i == 0)) {
                return Err(format!("`{col}[{i}]`: a `{role}` turn where a `{expected}` turn was expected (turns alternate human, gpt after an optional first system turn)"));
            }
            if role == "assistant" && value.trim().is_empty() {
                return Err(format!("`{col}[{i}]`: empty assistant turn"));
            }
            messages.push(Message::new(role, self.text(value)));
        }
        let last = messages.last().map(|m| m.role.as_str()).unwrap_or_default();
        match (prompt_only, last) {
            (false, "assistant") | (true, "user") => Ok(messages),
            (false, _) => Err(format!(
                "`{col}`: ends with a `{last}` turn; a conversation ends with a gpt turn"
            )),
            (true, _) => Err(format!("`{col}`: a DPO prompt ends with a human turn, not `{last}`")),
        }
    }

    /// A DPO answer: a string, or a turn object.
    fn answer(&self, row: &Map<String, Value>, col: &str) -> Result<Message, String> {
        let text = match present(row, col) {
            None => {
                return Err(format!(
                    "a DPO row needs both `{}` and `{}`; `{col}` is missing",
                    self.columns.chosen, self.columns.rejected
                ))
            }
            Some(Value::String(s)) => s.as_str(),
            Some(turn @ Value::Object(_)) => {
                parse_turn(turn).map_err(|e| format!("`{col}`: {e}"))?.1
            }
            Some(other) => {
                return Err(format!(
                    "`{col}`: expected a string or a turn, found {}",
                    kind_of(other)
                ))
            }
        };
        if text.trim().is_empty() {
            return Err(format!("`{col}`: empty answer"));
        }
        Ok(Message::new("assistant", self.text(text)))
    }
}

/// A key's value unless absent or null.
fn present<'a>(row: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    row.get(key).filter(|v| !v.is_null())
}

/// `{from, value}` or `{role, content}` → (canonical role, text).
fn parse_turn(turn: &Value) -> Result<(&'static str, &str), String> {
    let obj = turn
        .as_object()
        .ok_or_else(|| format!("expected a turn object, found {}", kind_of(turn)))?;
    let field = |keys: [&str; 2]| -> Result<&Value, String> {
        keys.iter()
            .find_map(|k| obj.get(*k))
            .ok_or_else(|| format!("no `{}` (or `{}`) key", keys[0], keys[1]))
    };
    let from = field(["from", "role"])?;
    let from = from
        .as_str()
        .ok_or_else(|| format!("the role should be a string, found {}", kind_of(from)))?;
    let role = match from {
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        "system" => "system",
        other => return Err(format!("unknown role `{other}` (expected human, gpt or system; user and assistant are read too)")),
    };
    let value = field(["value", "content"])?;
    let value = value
        .as_str()
        .ok_or_else(|| format!("the text should be a string, found {}", kind_of(value)))?;
    Ok((role, value))
}

/// Drops one `\n` right before and one right after each `<image>` and `<video>`, like
/// Qwen2-VL-Finetune's `re.sub(r'\n?<image>\n?', …)` (and its `<video>` twin).
pub fn strip_image_newlines(text: &str) -> String {
    strip_newlines_around(&strip_newlines_around(text, IMAGE_PLACEHOLDER), VIDEO_PLACEHOLDER)
}

fn strip_newlines_around(text: &str, mark: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(mark) {
        let before = &rest[..pos];
        out.push_str(before.strip_suffix('\n').unwrap_or(before));
        out.push_str(mark);
        rest = &rest[pos + mark.len()..];
        rest = rest.strip_prefix('\n').unwrap_or(rest);
    }
    out.push_str(rest);
    out
}

/// The paths under `key`: absent, one string, or a list of strings.
fn path_list<'a>(row: &'a Map<String, Value>, key: &str) -> Result<Vec<&'a str>, String> {
    match present(row, key) {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.as_str()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| format!("`{key}[{i}]`: expected a path, found {}", kind_of(v)))
            })
            .collect(),
        Some(other) => {
            Err(format!("`{key}`: expected a path or a list of paths, found {}", kind_of(other)))
        }
    }
}

/// A relative path joined to `base`; absolute paths and URLs as written.
fn join_image(base: &Path, path: &str) -> String {
    if path.starts_with("http://") || path.starts_with("https://") {
        return path.to_string();
    }
    base.join(path).to_string_lossy().into_owned()
}

/// The file a data source names: the file itself, or `{split}.json` / `{split}.jsonl` in a
/// folder.
fn split_file(source: &DataSource) -> PluginResult<PathBuf> {
    let path = Path::new(&source.path);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(PluginError::invalid(format!("{}: no such file or folder", path.display())));
    }
    let split = &source.split;
    for ext in ["json", "jsonl"] {
        let f = path.join(format!("{split}.{ext}"));
        if f.is_file() {
            return Ok(f);
        }
    }
    Err(PluginError::invalid(format!(
        "{}: no {split}.json or {split}.jsonl for split `{split}` in this folder; name the file itself as the path",
        path.display()
    )))
}

/// An opened split: the parsed rows, converted one at a time by [`SampleReader::get`].
pub struct LlavaReader {
    cfg: LlavaConfig,
    file: PathBuf,
    image_base: PathBuf,
    video_base: PathBuf,
    records: Vec<Record>,
}

impl LlavaReader {
    pub fn open(cfg: &LlavaConfig, source: &DataSource) -> PluginResult<Self> {
        let file = split_file(source)?;
        let records = read_records(&file)?;
        if records.is_empty() {
            return Err(PluginError::invalid(format!("{}: holds no rows", file.display())));
        }
        let file_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        // A relative image_folder is relative to the data file's folder, as relative image
        // paths are: the run works the same from any working directory.
        let image_base = match &cfg.image_folder {
            Some(folder) => file_dir.join(folder),
            None => file_dir.clone(),
        };
        if cfg.image_folder.is_some() && !image_base.is_dir() {
            return Err(PluginError::invalid(format!(
                "{}: image_folder {} is not a folder (a relative `image_folder` is joined to the data file's folder)",
                file.display(),
                image_base.display(),
            )));
        }
        let video_base = match &cfg.video_folder {
            Some(folder) => file_dir.join(folder),
            None => image_base.clone(),
        };
        if cfg.video_folder.is_some() && !video_base.is_dir() {
            return Err(PluginError::invalid(format!(
                "{}: video_folder {} is not a folder (a relative `video_folder` is joined to the data file's folder)",
                file.display(),
                video_base.display(),
            )));
        }
        Ok(Self { cfg: cfg.clone(), file, image_base, video_base, records })
    }
}

impl SampleReader for LlavaReader {
    fn len(&self) -> PluginResult<u64> {
        Ok(self.records.len() as u64)
    }

    fn get(&self, index: u64) -> PluginResult<Sample> {
        let record = self.records.get(index as usize).ok_or_else(|| {
            PluginError::invalid(format!(
                "{}: row {index} out of range (0..{})",
                self.file.display(),
                self.records.len()
            ))
        })?;
        let row = match &record.value {
            Ok(Value::Object(row)) => row,
            Ok(other) => {
                return Err(PluginError::invalid(format!(
                    "{}: expected a JSON object, found {}",
                    record.origin,
                    kind_of(other)
                )))
            }
            Err(why) => return Err(PluginError::invalid(format!("{}: {why}", record.origin))),
        };
        let id = match present(row, &self.cfg.columns.id) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(v @ Value::Number(_)) => Some(v.to_string()),
            _ => None,
        };
        let mut sample =
            self.cfg.convert_with(row, &self.image_base, &self.video_base).map_err(|why| {
                let id = id.as_deref().map(|id| format!(" (id `{id}`)")).unwrap_or_default();
                PluginError::invalid(format!("{}{id}: {why} (plugin `llava`)", record.origin))
            })?;
        sample.id = Some(id.unwrap_or_else(|| record.origin.clone()));
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_api::parse_config;

    fn row(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn qwen2_vl_finetune_rows() {
        let cfg: LlavaConfig = parse_config("{}").unwrap();
        let s = cfg
            .convert(
                &row(r#"{"id": "a", "image": ["x.png", "/abs/y.png"], "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."},
                    {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}"#),
                Path::new("/data"),
            )
            .unwrap();
        let turns: Vec<(&str, &str)> =
            s.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(
            turns,
            [
                ("user", "<image><image>Compare."),
                ("assistant", "Same."),
                ("user", "Sure?"),
                ("assistant", "Yes.")
            ]
        );
        assert_eq!(
            s.images,
            vec![ImageSource::Path("/data/x.png".into()), ImageSource::Path("/abs/y.png".into())]
        );
        // Text-only rows, system turns, role/content turns, kept newlines.
        let cfg: LlavaConfig =
            parse_config(r#"{"strip_image_newlines": false, "image_max_pixels": 50176}"#).unwrap();
        let s = cfg
            .convert(
                &row(r#"{"image": "c.png", "conversations": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]}"#),
                Path::new("imgs"),
            )
            .unwrap();
        assert_eq!(s.messages[0], Message::new("system", "Be brief."));
        assert_eq!(s.messages[1].content, "<image>\nWhat?");
        assert_eq!(s.images, vec![ImageSource::Path("imgs/c.png".into())]);
        assert_eq!(s.extra["image_max_pixels"], 50176);
        assert!(!s.extra.contains_key("image_min_pixels"));
    }

    /// Qwen2-VL-Finetune's video rows: `video` joined to the video folder, one `<video>` each,
    /// the newlines around it dropped as around `<image>`.
    #[test]
    fn video_rows() {
        let cfg: LlavaConfig = parse_config("{}").unwrap();
        let s = cfg
            .convert_with(
                &row(r#"{"id": "v", "video": "clip.mp4", "image": "a.png", "conversations": [
                    {"from": "human", "value": "<image>\n<video>\nWhat happens?"}, {"from": "gpt", "value": "A cat runs."}]}"#),
                Path::new("/img"),
                Path::new("/vid"),
            )
            .unwrap();
        assert_eq!(s.messages[0].content, "<image><video>What happens?");
        assert_eq!(s.videos, vec![ImageSource::Path("/vid/clip.mp4".into())]);
        assert_eq!(s.images, vec![ImageSource::Path("/img/a.png".into())]);
        let two = cfg
            .convert(
                &row(r#"{"video": ["f1", "/abs/f2"], "conversations": [
                    {"from": "human", "value": "<video><video>Same?"}, {"from": "gpt", "value": "No."}]}"#),
                Path::new("/d"),
            )
            .unwrap();
        assert_eq!(
            two.videos,
            vec![ImageSource::Path("/d/f1".into()), ImageSource::Path("/abs/f2".into())]
        );
    }

    #[test]
    fn dpo_rows() {
        let cfg: LlavaConfig = parse_config("{}").unwrap();
        let s = cfg
            .convert(&row(r#"{"image": "a.png", "prompt": "<image>\nWhich?", "chosen": "Left.", "rejected": "Right."}"#), Path::new(""))
            .unwrap();
        assert_eq!(s.messages, vec![Message::new("user", "<image>Which?")]);
        assert_eq!(
            (s.chosen.unwrap().content, s.rejected.unwrap().content),
            ("Left.".into(), "Right.".into())
        );
        let e = cfg.convert(&row(r#"{"prompt": "q", "chosen": "a"}"#), Path::new("")).unwrap_err();
        assert!(e.contains("`rejected` is missing"), "{e}");
    }

    #[test]
    fn newline_stripping_matches_the_regex() {
        // Python: re.sub(r'\n?<image>\n?', '<image>', s)
        for (text, want) in [
            ("<image>\nHi", "<image>Hi"),
            ("Hi\n<image>\n<image>\n", "Hi<image><image>"),
            ("\n\n<image>\n\nx", "\n<image>\nx"),
            ("no image\n", "no image\n"),
        ] {
            assert_eq!(strip_image_newlines(text), want, "{text:?}");
        }
    }

    #[test]
    fn bad_rows_say_why() {
        let cfg: LlavaConfig = parse_config("{}").unwrap();
        let err = |j: &str| cfg.convert(&row(j), Path::new("")).unwrap_err();
        let e = err(
            r#"{"image": ["a", "b"], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}"#,
        );
        assert!(e.starts_with("2 image(s) in `image` but 1 `<image>` placeholder(s)"), "{e}");
        assert_eq!(err(r#"{"id": "q"}"#), "no `conversations` key");
        let e = err(r#"{"conversations": [{"from": "gpt", "value": "x"}]}"#);
        assert!(
            e.contains("`conversations[0]`: a `assistant` turn where a `user` turn was expected"),
            "{e}"
        );
        let e = err(r#"{"conversations": [{"from": "human", "value": "x"}]}"#);
        assert!(e.contains("ends with a `user` turn"), "{e}");
        let e = err(r#"{"conversations": [{"from": "bot", "value": "x"}]}"#);
        assert!(e.contains("unknown role `bot`"), "{e}");
        assert!(err(r#"{"video": "v.mp4", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}"#)
            .contains("1 video(s) in `video` but 0 `<video>` placeholder(s)"));
        let e = err(
            r#"{"video": 3, "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "yo"}]}"#,
        );
        assert!(e.contains("`video`: expected a path"), "{e}");
        let e = parse_config::<LlavaConfig>(r#"{"image_dir": "x"}"#).unwrap_err();
        assert!(e.message().contains("unknown field `image_dir`"), "{e}");
    }
}
