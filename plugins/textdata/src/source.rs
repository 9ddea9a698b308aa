//! Reading a data set path (a JSON or JSON Lines file, or a folder of them) into records,
//! converting each record with a format's row function, and serving the samples.
//!
//! Files are read by plugin-api's `records` (a JSON array when the first non-space character
//! is `[`, else JSON Lines). Every record keeps where it came from (`file:line` for JSON
//! Lines, `file: record [i]` with a 0-based index for arrays) and that origin becomes the
//! sample's `id`, so later errors can name the row too.
//!
//! Bad rows (not JSON, not an object, a column of the wrong type, broken turn order, an
//! empty assistant turn) are an error naming the row, unless `skip_bad_rows` is set: then
//! they are counted, `len()` counts only the good rows, and one summary line (the count and
//! the first few reasons) goes to stderr when the data set is opened. A file that is not
//! readable at all (missing, not UTF-8, an array with a syntax error) is always an error.
use std::path::Path;

pub use ferrotune_plugin_api::records::kind_of;
use ferrotune_plugin_api::records::{json_files_of, read_records};
use ferrotune_plugin_api::{
    DataSource, ImageSource, PluginError, PluginResult, Sample, IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
};
use serde_json::{Map, Value};

/// How many skip reasons the stderr summary quotes.
const REASONS_SHOWN: usize = 3;

/// What a load skipped (only with `skip_bad_rows`).
#[derive(Debug, Default, PartialEq)]
pub struct SkipReport {
    pub rows: usize,
    pub skipped: usize,
    /// `origin: reason` of the first [`REASONS_SHOWN`] skipped rows.
    pub first_reasons: Vec<String>,
}

impl SkipReport {
    /// The one-line summary written to stderr.
    pub fn summary(&self, format: &str, path: &str) -> String {
        format!(
            "textdata: {format}: skipped {} of {} rows of {path} (skip_bad_rows): {}{}",
            self.skipped,
            self.rows,
            self.first_reasons.join("; "),
            if self.skipped > self.first_reasons.len() { "; …" } else { "" }
        )
    }
}

/// Reads every record under `source.path` and converts each with `convert`. The split name
/// selects nothing: each path is one split (give an evaluation file as its own path).
/// Relative image and video paths are joined to `media_dir` when given (see
/// [`resolve_media`]), else to the data file's folder.
pub fn load(
    format: &str,
    source: &DataSource,
    skip_bad_rows: bool,
    media_dir: Option<&Path>,
    convert: impl Fn(&Map<String, Value>) -> Result<Sample, String>,
) -> PluginResult<(Vec<Sample>, SkipReport)> {
    let mut samples = Vec::new();
    let mut report = SkipReport::default();
    for file in json_files_of(Path::new(&source.path))? {
        for record in read_records(&file)? {
            report.rows += 1;
            let converted = record.value.and_then(|v| match v {
                Value::Object(row) => convert(&row),
                other => Err(format!("expected a JSON object, found {}", kind_of(&other))),
            });
            match converted {
                Ok(mut sample) => {
                    sample.id = Some(record.origin);
                    match media_dir {
                        Some(dir) => resolve_media(&mut sample, dir),
                        None => resolve_images(&mut sample, file.parent().unwrap_or(Path::new(""))),
                    }
                    samples.push(sample);
                }
                Err(reason) if skip_bad_rows => {
                    report.skipped += 1;
                    if report.first_reasons.len() < REASONS_SHOWN {
                        report.first_reasons.push(format!("{}: {reason}", record.origin));
                    }
                }
                Err(reason) => {
                    return Err(PluginError::invalid(format!(
                    "{}: {reason} (plugin `{format}`; set `skip_bad_rows: true` to skip bad rows)",
                    record.origin
                )))
                }
            }
        }
    }
    if report.skipped > 0 {
        eprintln!("{}", report.summary(format, &source.path));
    }
    if samples.is_empty() {
        let why = if report.rows == 0 {
            "it holds no rows".to_string()
        } else {
            format!("all {} rows are bad", report.rows)
        };
        return Err(PluginError::invalid(format!(
            "{}: no usable sample ({why}; plugin `{format}`)",
            source.path
        )));
    }
    Ok((samples, report))
}

// ---------------------------------------------------------------- column access

/// The value of column `col` (`None` when the column is not mapped, absent or null).
pub fn column<'a>(row: &'a Map<String, Value>, col: Option<&str>) -> Option<&'a Value> {
    col.and_then(|c| row.get(c)).filter(|v| !v.is_null())
}

/// A text column; absent and null are `None`.
pub fn str_column<'a>(
    row: &'a Map<String, Value>,
    col: Option<&str>,
) -> Result<Option<&'a str>, String> {
    match column(row, col) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!(
            "column `{}`: expected a string, found {}",
            col.unwrap_or_default(),
            kind_of(other)
        )),
    }
}

/// A KTO tag column: a boolean (absent and null are `None`).
pub fn bool_column(row: &Map<String, Value>, col: Option<&str>) -> Result<Option<bool>, String> {
    match column(row, col) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!(
            "column `{}`: expected true or false, found {}",
            col.unwrap_or_default(),
            kind_of(other)
        )),
    }
}

/// Relative image paths of `sample` joined to `base`, the folder of the data file the row
/// comes from (LLaMA-Factory's `media_dir` default, the data set folder); absolute paths and
/// URLs as written.
pub fn resolve_images(sample: &mut Sample, base: &Path) {
    for image in sample.images.iter_mut().chain(sample.videos.iter_mut()) {
        if let ImageSource::Path(p) = image {
            let lower = p.get(..8).unwrap_or(p).to_ascii_lowercase();
            if !(lower.starts_with("http://") || lower.starts_with("https://")) {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        }
    }
}

/// LLaMA-Factory's `media_dir` (`converter.py` `_find_medias`): a relative image or video
/// path is `media_dir/path` where that exists, else the path as written where that exists
/// (relative to the working folder), else `media_dir/path` (so that the error names it).
pub fn resolve_media(sample: &mut Sample, media_dir: &Path) {
    for image in sample.images.iter_mut().chain(sample.videos.iter_mut()) {
        if let ImageSource::Path(p) = image {
            let lower = p.get(..8).unwrap_or(p).to_ascii_lowercase();
            if lower.starts_with("http://") || lower.starts_with("https://") {
                continue;
            }
            let joined = media_dir.join(&*p);
            if joined.exists() || !Path::new(&*p).exists() {
                *p = joined.to_string_lossy().into_owned();
            }
        }
    }
}

/// The plugins' shared `media_dir` key (a string), taken out of `config_json` before the
/// format's own keys are parsed.
pub fn media_dir(config_json: &str) -> PluginResult<(String, Option<std::path::PathBuf>)> {
    let mut v: Value = serde_json::from_str(config_json)
        .map_err(|e| PluginError::config("(config)", format!("not JSON: {e}")))?;
    let dir = match v.as_object_mut().and_then(|m| m.remove("media_dir")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(std::path::PathBuf::from(s)),
        Some(other) => {
            return Err(PluginError::config(
                "media_dir",
                format!("expected a folder path, found {}", kind_of(&other)),
            ))
        }
    };
    Ok((v.to_string(), dir))
}

/// `T`'s schema with the shared `media_dir` key that [`media_dir`] takes out.
pub fn schema_with_media_dir<T: ferrotune_plugin_api::JsonSchema>() -> Value {
    let mut schema = ferrotune_plugin_api::schema_of::<T>();
    schema["properties"]["media_dir"] = serde_json::json!({
        "type": ["string", "null"],
        "default": null,
        "description": "Folder that relative image and video paths are joined to (default: the data file's folder)."
    });
    schema
}

/// An images column: one path or a list of paths, as written (`load` joins relative paths to
/// the data file's folder). Checked against the `<image>` placeholders of the
/// turns: one placeholder per image, as LLaMA-Factory requires.
pub fn images_column(
    row: &Map<String, Value>,
    col: Option<&str>,
    texts: &[&str],
) -> Result<Vec<ImageSource>, String> {
    media_column(row, col, texts, IMAGE_PLACEHOLDER, "image")
}

/// A videos column (LLaMA-Factory's `videos`: video files or frame folders), checked against
/// the `<video>` placeholders as [`images_column`] checks images.
pub fn videos_column(
    row: &Map<String, Value>,
    col: Option<&str>,
    texts: &[&str],
) -> Result<Vec<ImageSource>, String> {
    media_column(row, col, texts, VIDEO_PLACEHOLDER, "video")
}

fn media_column(
    row: &Map<String, Value>,
    col: Option<&str>,
    texts: &[&str],
    placeholder: &str,
    what: &str,
) -> Result<Vec<ImageSource>, String> {
    let name = col.unwrap_or_default();
    let paths: Vec<String> = match column(row, col) {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    format!("column `{name}[{i}]`: expected a path, found {}", kind_of(v))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "column `{name}`: expected a path or a list of paths, found {}",
                kind_of(other)
            ))
        }
    };
    let placeholders: usize = texts.iter().map(|t| t.matches(placeholder).count()).sum();
    if placeholders != paths.len() {
        return Err(format!(
            "column `{name}` has {} {what}(s) but the turns hold {placeholders} `{placeholder}` placeholder(s); write one per {what}, in order",
            paths.len()
        ));
    }
    Ok(paths.into_iter().map(ImageSource::Path).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("textdata-source-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn id_sample(row: &Map<String, Value>) -> Result<Sample, String> {
        match str_column(row, Some("t"))? {
            Some(t) => Ok(Sample {
                messages: vec![ferrotune_plugin_api::Message::new("user", t)],
                ..Default::default()
            }),
            None => Err("column `t` is missing".into()),
        }
    }

    #[test]
    fn detects_array_and_lines_and_names_origins() {
        let d = temp("detect");
        std::fs::write(d.join("b.json"), "\u{feff}  \n [{\"t\": \"x\"}, {\"t\": \"y\"}]").unwrap();
        std::fs::write(d.join("a.jsonl"), "{\"t\": \"1\"}\n\n{\"t\": \"2\"}\n").unwrap();
        std::fs::write(d.join("notes.txt"), "ignored").unwrap();
        let src = DataSource { path: d.display().to_string(), split: "train".into() };
        let (samples, report) = load("t", &src, false, None, id_sample).unwrap();
        let ids: Vec<String> = samples.iter().map(|s| s.id.clone().unwrap()).collect();
        let a = d.join("a.jsonl").display().to_string();
        let b = d.join("b.json").display().to_string();
        assert_eq!(
            ids,
            vec![
                format!("{a}:1"),
                format!("{a}:3"),
                format!("{b}: record [0]"),
                format!("{b}: record [1]")
            ]
        );
        assert_eq!(report, SkipReport { rows: 4, skipped: 0, first_reasons: vec![] });
    }

    #[test]
    fn bad_rows_fail_or_are_counted() {
        let d = temp("bad");
        let f = d.join("x.jsonl");
        std::fs::write(&f, "{\"t\": \"1\"}\n{\"t\": 2}\n{oops\n[1]\n{\"t\": \"5\"}\n").unwrap();
        let src = DataSource { path: f.display().to_string(), split: "train".into() };
        let e = load("t", &src, false, None, id_sample).unwrap_err();
        assert!(
            e.message().contains(&format!(
                "{}:2: column `t`: expected a string, found a number",
                f.display()
            )),
            "{e}"
        );
        let (samples, report) = load("t", &src, true, None, id_sample).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!((report.rows, report.skipped), (5, 3));
        assert!(
            report.first_reasons[1].starts_with(&format!("{}:3: not valid JSON", f.display())),
            "{:?}",
            report.first_reasons
        );
        assert!(
            report.first_reasons[2].contains("expected a JSON object, found a list"),
            "{:?}",
            report.first_reasons
        );
        assert!(report.summary("t", "x").starts_with("textdata: t: skipped 3 of 5 rows of x"));
    }

    #[test]
    fn broken_arrays_and_empty_sources_are_errors() {
        let d = temp("broken");
        let f = d.join("x.json");
        std::fs::write(&f, "[{\"t\": \"1\"},\n {\"t\": }]").unwrap();
        let src = DataSource { path: f.display().to_string(), split: "train".into() };
        let e = load("t", &src, true, None, id_sample).unwrap_err();
        assert!(
            e.message().contains(&format!("{}:2:", f.display()))
                && e.message().contains("not a valid JSON array"),
            "{e}"
        );
        std::fs::write(&f, "  \n").unwrap();
        let e = load("t", &src, true, None, id_sample).unwrap_err();
        assert!(e.message().contains("no usable sample (it holds no rows"), "{e}");
        let missing =
            DataSource { path: d.join("nope.json").display().to_string(), split: "train".into() };
        assert!(load("t", &missing, false, None, id_sample)
            .unwrap_err()
            .message()
            .contains("no such file or folder"));
    }

    /// `media_dir`: joined where the file is there, else as written where that exists, else
    /// joined (so that the error names the media_dir path); URLs and absolute paths kept.
    #[test]
    fn media_dir_resolves_as_llamafactory() {
        let d = temp("media");
        std::fs::create_dir_all(d.join("media/sub")).unwrap();
        std::fs::write(d.join("media/sub/a.png"), b"x").unwrap();
        let abs = d.join("elsewhere.png");
        std::fs::write(&abs, b"x").unwrap();
        let mut s = Sample {
            images: ["sub/a.png", "missing.png", "https://x.org/c.png", abs.to_str().unwrap()]
                .map(|p| ImageSource::Path(p.into()))
                .to_vec(),
            ..Default::default()
        };
        resolve_media(&mut s, &d.join("media"));
        let paths: Vec<String> = s
            .images
            .iter()
            .map(|i| match i {
                ImageSource::Path(p) => p.clone(),
                ImageSource::Blob(_) => unreachable!(),
            })
            .collect();
        assert_eq!(
            paths,
            vec![
                d.join("media/sub/a.png").display().to_string(),
                d.join("media/missing.png").display().to_string(),
                "https://x.org/c.png".to_string(),
                abs.display().to_string(),
            ]
        );
        let (rest, dir) = media_dir(r#"{"ranking": true, "media_dir": "/m"}"#).unwrap();
        assert_eq!((rest.as_str(), dir), (r#"{"ranking":true}"#, Some("/m".into())));
        assert!(media_dir(r#"{"media_dir": 3}"#).unwrap_err().message().contains("media_dir"));
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn images_match_placeholders() {
        let row: Map<String, Value> =
            serde_json::from_str(r#"{"images": ["a.png", "sub/b.jpg"]}"#).unwrap();
        let imgs = images_column(&row, Some("images"), &["<image>look", "and <image>"]).unwrap();
        assert_eq!(
            imgs,
            vec![ImageSource::Path("a.png".into()), ImageSource::Path("sub/b.jpg".into())]
        );
        let e = images_column(&row, Some("images"), &["<image>"]).unwrap_err();
        assert!(e.contains("2 image(s) but the turns hold 1"), "{e}");
        let one: Map<String, Value> = serde_json::from_str(r#"{"images": "a.png"}"#).unwrap();
        assert_eq!(images_column(&one, Some("images"), &["<image>"]).unwrap().len(), 1);
        let row: Map<String, Value> =
            serde_json::from_str(r#"{"videos": ["mllm_demo_data/1.mp4"]}"#).unwrap();
        let v = videos_column(&row, Some("videos"), &["<video>Why is this funny?"]).unwrap();
        assert_eq!(v, vec![ImageSource::Path("mllm_demo_data/1.mp4".into())]);
        let e = videos_column(&row, Some("videos"), &["no placeholder"]).unwrap_err();
        assert!(e.contains("1 video(s)") && e.contains("0 `<video>`"), "{e}");
    }
}
