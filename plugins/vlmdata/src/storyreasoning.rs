//! StoryReasoning (daniel3303/StoryReasoning on the Hugging Face hub) in its parquet layout:
//! `story_id` (string), `images` (a list of HF `Image` structs `{bytes, path}`, the frames
//! embedded as encoded bytes), `frame_count` (int), `chain_of_thought` (markdown tables per
//! frame, then a narrative structure table) and `story` (text grounded with `<gdi imageN>`,
//! `<gdo charN>`, `<gda charN>`, `<gdl bgN>` tags).
//!
//! A sample is shaped as the authors' `StoryReasoningAdapter` (story_reasoning_adapter.py)
//! builds it for TRL: their system prompt (asking for step-by-step reasoning inside
//! `<think></think>`, then a grounded story); a user turn made of a text prompt followed by
//! the frames (here one `<image>` each, the frames as [`ImageSource::Blob`]s); and the answer
//! `<think>\n{chain_of_thought}\n</think>\n{story}`. Differences, on purpose: the authors draw
//! the user prompt at random from ten phrasings (one of them empty); here it is one fixed
//! prompt (`user_prompt`), so a run is reproducible. With `max_images` they parse the chain
//! of thought and the story and serialize the first N frames' parts back; here the text of
//! the later frames' sections is cut out (the narrative structure table is kept, as theirs
//! keeps it), which leaves the kept text byte for byte as written. Their optional filtering
//! of entities the story does not mention is not done.
//!
//! A path is a parquet file, or a folder in the Hugging Face layout where the split picks the
//! files: `{split}.parquet`, `{split}-*.parquet` or `{split}/*.parquet`, in the folder or in
//! its `data/`. Opening reads only the footers (and checks the five columns); a sample is
//! decoded from its row group when asked for, the last decoded row group being kept, so
//! reading in order decodes each row group once.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferrotune_plugin_api::{
    DataSource, ImageSource, Message, PluginError, PluginResult, Sample, SampleReader,
    IMAGE_PLACEHOLDER,
};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use schemars::JsonSchema;
use serde::Deserialize;

/// The columns of the Hugging Face layout, in the order they are projected.
pub const COLUMNS: [&str; 5] = ["story_id", "images", "frame_count", "chain_of_thought", "story"];

/// The system prompt of the authors' adapter (`StoryReasoningAdapter.default_system_prompt`).
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are an AI storyteller that can analyze sequences of images and create creative narratives. \
First think step-by-step to analyze characters, objects, settings, and narrative structure. \
Then create a grounded story that maintains consistent character identity and object references across frames. \
Use <think></think> tags to show your reasoning process before writing the final story.";

/// The user prompt (one of the authors' phrasings), followed by the frames.
pub const DEFAULT_USER_PROMPT: &str = "Create a story based on these images.";

/// `{"max_images": 8, "min_pixels": …, "max_pixels": …, "system_prompt": …, "user_prompt": …}`.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoryReasoningConfig {
    /// Keep the first N frames of a story, and only their sections of the chain of thought and
    /// the story (the authors' `max_images`). Default: every frame.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_images: Option<usize>,
    /// Smallest image area in pixels for the host's image processor (`extra.image_min_pixels`).
    /// Default: the processor's own (Qwen2-VL: 3136).
    #[serde(default)]
    pub min_pixels: Option<u64>,
    /// Largest image area in pixels (`extra.image_max_pixels`); lower it to fit many frames in
    /// memory. Default: the processor's own (Qwen2-VL: 12845056).
    #[serde(default)]
    pub max_pixels: Option<u64>,
    /// Replaces [`DEFAULT_SYSTEM_PROMPT`]; an empty string leaves the system turn out.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Replaces [`DEFAULT_USER_PROMPT`] (may be empty: the frames alone).
    #[serde(default)]
    pub user_prompt: Option<String>,
}

impl StoryReasoningConfig {
    pub fn validate(&self) -> PluginResult<()> {
        if self.max_images == Some(0) {
            return Err(PluginError::config("max_images", "must be at least 1"));
        }
        if let (Some(lo), Some(hi)) = (self.min_pixels, self.max_pixels) {
            if lo > hi {
                return Err(PluginError::config(
                    "min_pixels",
                    format!("{lo} is above max_pixels {hi}"),
                ));
            }
        }
        Ok(())
    }

    /// The training sample of one story.
    pub fn sample(&self, row: StoryRow) -> Sample {
        let StoryRow { story_id, mut images, frame_count, mut chain_of_thought, mut story } = row;
        if let Some(keep) = self.max_images.filter(|&n| images.len() > n) {
            images.truncate(keep);
            chain_of_thought = trim_cot(&chain_of_thought, keep);
            story = trim_story(&story, keep);
        }
        let mut sample = Sample { id: Some(story_id.clone()), ..Default::default() };
        let system = self.system_prompt.as_deref().unwrap_or(DEFAULT_SYSTEM_PROMPT);
        if !system.is_empty() {
            sample.messages.push(Message::new("system", system));
        }
        let prompt = self.user_prompt.as_deref().unwrap_or(DEFAULT_USER_PROMPT);
        sample.messages.push(Message::new(
            "user",
            format!("{prompt}{}", IMAGE_PLACEHOLDER.repeat(images.len())),
        ));
        sample.messages.push(Message::new(
            "assistant",
            format!("<think>\n{chain_of_thought}\n</think>\n{story}"),
        ));
        for image in images {
            match image {
                FrameImage::Bytes(bytes) => {
                    sample.images.push(ImageSource::Blob(sample.blobs.len()));
                    sample.blobs.push(bytes);
                }
                FrameImage::Path(path) => sample.images.push(ImageSource::Path(path)),
            }
        }
        sample.extra.insert("story_id".into(), story_id.into());
        sample.extra.insert("frame_count".into(), frame_count.into());
        for (key, value) in
            [("image_min_pixels", self.min_pixels), ("image_max_pixels", self.max_pixels)]
        {
            if let Some(v) = value {
                sample.extra.insert(key.into(), v.into());
            }
        }
        sample
    }
}

/// One frame: embedded bytes, or (when a writer stored only a path) a path joined to the
/// parquet file's folder.
#[derive(Clone, Debug, PartialEq)]
pub enum FrameImage {
    Bytes(Vec<u8>),
    Path(String),
}

/// One row, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct StoryRow {
    pub story_id: String,
    pub images: Vec<FrameImage>,
    pub frame_count: i64,
    pub chain_of_thought: String,
    pub story: String,
}

/// The position of the first `{prefix}{K}` with `K > keep` whose number ends at a character
/// for which `ends` holds (or at the end of the text).
fn first_section_after(
    text: &str,
    prefix: &str,
    keep: usize,
    ends: impl Fn(char) -> bool,
) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find(prefix) {
        let start = from + found;
        let digits_at = start + prefix.len();
        let digits: String = text[digits_at..].chars().take_while(char::is_ascii_digit).collect();
        let after = text[digits_at + digits.len()..].chars().next();
        if let Ok(k) = digits.parse::<usize>() {
            if k > keep && after.is_none_or(&ends) {
                return Some(start);
            }
        }
        from = digits_at;
    }
    None
}

/// The chain of thought without the `## Image K` sections for `K > keep` (cut up to the
/// `## Narrative Structure` section, which stays).
pub fn trim_cot(cot: &str, keep: usize) -> String {
    let Some(cut) = first_section_after(cot, "## Image ", keep, char::is_whitespace) else {
        return cot.to_string();
    };
    let resume = cot[cut..].find("## Narrative Structure").map_or(cot.len(), |i| cut + i);
    format!("{}{}", &cot[..cut], &cot[resume..])
}

/// The story up to its first `<gdi imageK>` section with `K > keep` (trailing space trimmed).
pub fn trim_story(story: &str, keep: usize) -> String {
    match first_section_after(story, "<gdi image", keep, |c| c == '>') {
        Some(cut) => story[..cut].trim_end().to_string(),
        None => story.to_string(),
    }
}

// ---------------------------------------------------------------- files

/// The parquet files of a data source (see the module doc).
fn split_files(source: &DataSource) -> PluginResult<Vec<PathBuf>> {
    let path = Path::new(&source.path);
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(PluginError::invalid(format!("{}: no such file or folder", path.display())));
    }
    let split = source.split.as_str();
    let parquet_in = |dir: &Path| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "parquet"))
            .collect();
        files.sort();
        files
    };
    let mut found = Vec::new();
    let mut splits_seen = Vec::new();
    for dir in [path.to_path_buf(), path.join("data")] {
        for file in parquet_in(&dir) {
            let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            let name = stem.split('-').next().unwrap_or_default().to_string();
            if name == split {
                found.push(file);
            } else if !splits_seen.contains(&name) {
                splits_seen.push(name);
            }
        }
        let sub = parquet_in(&dir.join(split));
        found.extend(sub);
    }
    if found.is_empty() {
        let seen = if splits_seen.is_empty() {
            "no parquet files at all".to_string()
        } else {
            format!("splits found: {}", splits_seen.join(", "))
        };
        return Err(PluginError::invalid(format!(
            "{}: no parquet file for split `{split}` (looked for {split}.parquet, {split}-*.parquet and {split}/*.parquet, \
             here and under data/); {seen}",
            path.display()
        )));
    }
    Ok(found)
}

/// One parquet file: its reader, the five columns to read, and its row groups' sizes.
struct StoryFile {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    projection: Type,
}

impl StoryFile {
    fn open(path: &Path) -> PluginResult<(Self, Vec<usize>)> {
        let name = path.display();
        let file = File::open(path).map_err(|e| PluginError::runtime(format!("{name}: {e}")))?;
        let reader = SerializedFileReader::new(file).map_err(|e| {
            PluginError::invalid(format!("{name}: not a readable parquet file: {e}"))
        })?;
        let schema = reader.metadata().file_metadata().schema();
        let mut fields = Vec::with_capacity(COLUMNS.len());
        for column in COLUMNS {
            let field = schema.get_fields().iter().find(|f| f.name() == column).ok_or_else(|| {
                let have: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
                PluginError::invalid(format!(
                    "{name}: no column `{column}` (StoryReasoning's layout has {}; this file has {})",
                    COLUMNS.join(", "),
                    have.join(", ")
                ))
            })?;
            fields.push(field.clone());
        }
        let projection = Type::group_type_builder(schema.name())
            .with_fields(fields)
            .build()
            .map_err(|e| PluginError::runtime(format!("{name}: {e}")))?;
        let groups = reader.metadata().row_groups().iter().map(|g| g.num_rows() as usize).collect();
        Ok((Self { path: path.to_path_buf(), reader, projection }, groups))
    }

    /// The rows of one row group, each decoded or with why it could not be.
    fn read_group(&self, group: usize) -> PluginResult<Vec<Result<StoryRow, String>>> {
        let name = self.path.display();
        let fail = |e: parquet::errors::ParquetError| {
            let hint = if e.to_string().contains("codec") {
                " (this build reads snappy-compressed and uncompressed parquet)"
            } else {
                ""
            };
            PluginError::runtime(format!("{name}: row group {group}: {e}{hint}"))
        };
        let reader = self.reader.get_row_group(group).map_err(fail)?;
        let rows = reader.get_row_iter(Some(self.projection.clone())).map_err(fail)?;
        let base = self.path.parent().unwrap_or(Path::new(""));
        rows.map(|row| row.map(|r| decode_row(r, base)).map_err(fail)).collect()
    }
}

/// A row of the projected columns as a [`StoryRow`].
fn decode_row(row: Row, base: &Path) -> Result<StoryRow, String> {
    let mut out = StoryRow {
        story_id: String::new(),
        images: Vec::new(),
        frame_count: 0,
        chain_of_thought: String::new(),
        story: String::new(),
    };
    for (name, field) in row.into_columns() {
        let text = |field: Field| match field {
            Field::Str(s) => Ok(s),
            other => Err(format!("column `{name}`: expected a string, found {other:?}")),
        };
        match name.as_str() {
            "story_id" => out.story_id = text(field)?,
            "chain_of_thought" => out.chain_of_thought = text(field)?,
            "story" => out.story = text(field)?,
            "frame_count" => {
                out.frame_count = match field {
                    Field::Byte(v) => v.into(),
                    Field::Short(v) => v.into(),
                    Field::Int(v) => v.into(),
                    Field::Long(v) => v,
                    Field::UByte(v) => v.into(),
                    Field::UShort(v) => v.into(),
                    Field::UInt(v) => v.into(),
                    other => {
                        return Err(format!(
                            "column `frame_count`: expected an integer, found {other:?}"
                        ))
                    }
                }
            }
            "images" => {
                let Field::ListInternal(list) = field else {
                    return Err(format!(
                        "column `images`: expected a list of images, found {field:?}"
                    ));
                };
                for (k, element) in list.elements().iter().enumerate() {
                    out.images.push(
                        decode_image(element, base)
                            .map_err(|e| format!("column `images[{k}]`: {e}"))?,
                    );
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A Hugging Face `Image` struct: `bytes` when embedded, else `path`.
fn decode_image(element: &Field, base: &Path) -> Result<FrameImage, String> {
    let Field::Group(image) = element else {
        return Err(format!("expected an image struct {{bytes, path}}, found {element:?}"));
    };
    let mut path = None;
    for (name, value) in image.get_column_iter() {
        match (name.as_str(), value) {
            ("bytes", Field::Bytes(b)) if !b.data().is_empty() => {
                return Ok(FrameImage::Bytes(b.data().to_vec()))
            }
            ("path", Field::Str(p)) if !p.is_empty() => path = Some(p.clone()),
            _ => {}
        }
    }
    path.map(|p| FrameImage::Path(base.join(p).to_string_lossy().into_owned()))
        .ok_or_else(|| "neither `bytes` nor `path`".into())
}

// ---------------------------------------------------------------- reader

/// Where a row group is: file, group within the file, its first row in the split.
struct GroupSlot {
    file: usize,
    group: usize,
    first_row: u64,
    rows: u64,
}

/// The last decoded row group: its slot index and rows.
type CachedGroup = (usize, Arc<Vec<Result<StoryRow, String>>>);

/// An opened split (see the module doc).
pub struct StoryReader {
    cfg: StoryReasoningConfig,
    files: Vec<StoryFile>,
    slots: Vec<GroupSlot>,
    total: u64,
    cache: Mutex<Option<CachedGroup>>,
}

impl StoryReader {
    pub fn open(cfg: &StoryReasoningConfig, source: &DataSource) -> PluginResult<Self> {
        let mut files = Vec::new();
        let mut slots = Vec::new();
        let mut total = 0u64;
        for path in split_files(source)? {
            let (file, groups) = StoryFile::open(&path)?;
            for (group, rows) in groups.into_iter().enumerate() {
                slots.push(GroupSlot {
                    file: files.len(),
                    group,
                    first_row: total,
                    rows: rows as u64,
                });
                total += rows as u64;
            }
            files.push(file);
        }
        if total == 0 {
            return Err(PluginError::invalid(format!(
                "{} (split `{}`): holds no rows",
                source.path, source.split
            )));
        }
        Ok(Self { cfg: cfg.clone(), files, slots, total, cache: Mutex::new(None) })
    }

    fn group(&self, slot: usize) -> PluginResult<Arc<Vec<Result<StoryRow, String>>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((cached, rows)) = cache.as_ref() {
            if *cached == slot {
                return Ok(rows.clone());
            }
        }
        let s = &self.slots[slot];
        let rows = Arc::new(self.files[s.file].read_group(s.group)?);
        *cache = Some((slot, rows.clone()));
        Ok(rows)
    }
}

impl SampleReader for StoryReader {
    fn len(&self) -> PluginResult<u64> {
        Ok(self.total)
    }

    fn get(&self, index: u64) -> PluginResult<Sample> {
        if index >= self.total {
            return Err(PluginError::invalid(format!(
                "sample {index} out of range (0..{})",
                self.total
            )));
        }
        let slot = self.slots.partition_point(|s| s.first_row + s.rows <= index);
        let s = &self.slots[slot];
        let rows = self.group(slot)?;
        let within = (index - s.first_row) as usize;
        let file = &self.files[s.file].path;
        let row_in_file = within as u64
            + self.slots[..slot].iter().filter(|o| o.file == s.file).map(|o| o.rows).sum::<u64>();
        match rows.get(within) {
            Some(Ok(row)) => Ok(self.cfg.sample(row.clone())),
            Some(Err(why)) => Err(PluginError::invalid(format!(
                "{}: row {row_in_file}: {why} (plugin `storyreasoning`)",
                file.display()
            ))),
            None => Err(PluginError::runtime(format!(
                "{}: row group {} has {} rows, its footer says {}",
                file.display(),
                s.group,
                rows.len(),
                s.rows
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_api::parse_config;

    const COT: &str = "## Image 1\n\n### Characters\n| Character ID | Name |\n|---|---|\n| char1 | Mira |\n\n\n\
## Image 2\n\n### Characters\n| char1 | Mira |\n\n\n## Image 10\n\nx\n\n\n## Narrative Structure\n\n| Introduction | Images 1-2 |";
    const STORY: &str = "<gdi image1>\n<gdo char1>Mira</gdo> <gda char1>waves</gda>.\n</gdi>\n\n<gdi image2>\nShe runs.\n</gdi>\n\n<gdi image10>\nEnd.\n</gdi>";

    #[test]
    fn trimming_keeps_the_first_frames_sections() {
        let cot = trim_cot(COT, 1);
        assert!(
            cot.starts_with("## Image 1\n")
                && !cot.contains("## Image 2")
                && !cot.contains("## Image 10"),
            "{cot}"
        );
        assert!(
            cot.ends_with(
                "| char1 | Mira |\n\n\n## Narrative Structure\n\n| Introduction | Images 1-2 |"
            ),
            "{cot}"
        );
        // `## Image 1` must not match `## Image 10`.
        let cot = trim_cot(COT, 2);
        assert!(
            cot.contains("## Image 2")
                && !cot.contains("## Image 10")
                && cot.contains("## Narrative Structure"),
            "{cot}"
        );
        assert_eq!(trim_cot(COT, 10), COT);
        assert_eq!(
            trim_story(STORY, 1),
            "<gdi image1>\n<gdo char1>Mira</gdo> <gda char1>waves</gda>.\n</gdi>"
        );
        assert!(trim_story(STORY, 2).ends_with("She runs.\n</gdi>"));
        assert_eq!(trim_story(STORY, 10), STORY);
    }

    #[test]
    fn sample_shape_and_options() {
        let row = StoryRow {
            story_id: "s1".into(),
            images: vec![
                FrameImage::Bytes(vec![1]),
                FrameImage::Bytes(vec![2]),
                FrameImage::Path("/f/3.png".into()),
            ],
            frame_count: 3,
            chain_of_thought: COT.into(),
            story: STORY.into(),
        };
        let s = StoryReasoningConfig::default().sample(row.clone());
        let roles: Vec<&str> = s.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(s.messages[0].content, DEFAULT_SYSTEM_PROMPT);
        assert_eq!(s.messages[1].content, format!("{DEFAULT_USER_PROMPT}<image><image><image>"));
        assert_eq!(s.messages[2].content, format!("<think>\n{COT}\n</think>\n{STORY}"));
        assert_eq!(
            s.images,
            vec![ImageSource::Blob(0), ImageSource::Blob(1), ImageSource::Path("/f/3.png".into())]
        );
        assert_eq!(s.blobs, vec![vec![1], vec![2]]);
        assert_eq!(
            (s.extra["story_id"].as_str(), s.extra["frame_count"].as_i64()),
            (Some("s1"), Some(3))
        );
        let cfg: StoryReasoningConfig =
            parse_config(r#"{"max_images": 1, "min_pixels": 3136, "max_pixels": 50176, "system_prompt": "", "user_prompt": "Go."}"#).unwrap();
        let s = cfg.sample(row);
        assert_eq!(s.messages.len(), 2);
        assert_eq!(s.messages[0].content, "Go.<image>");
        assert_eq!(
            s.messages[1].content,
            format!("<think>\n{}\n</think>\n{}", trim_cot(COT, 1), trim_story(STORY, 1))
        );
        assert_eq!((s.images.len(), s.blobs.len()), (1, 1));
        assert_eq!(
            (s.extra["image_min_pixels"].as_u64(), s.extra["image_max_pixels"].as_u64()),
            (Some(3136), Some(50176))
        );
        assert!(parse_config::<StoryReasoningConfig>(r#"{"max_images": 0}"#)
            .unwrap()
            .validate()
            .is_err());
    }
}
