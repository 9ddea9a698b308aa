//! Reading JSON data set files into records that remember where they came from: the part of
//! a dataset plugin that every JSON-based format shares (textdata's alpaca and sharegpt,
//! vlmdata's llava).
//!
//! A file is a JSON array when its first non-space character is `[`, else JSON Lines (one
//! object per non-blank line). Every record keeps its origin (`file:line` for JSON Lines,
//! `file: record [i]` with a 0-based index for arrays), so a format's errors can name the
//! row. A file that is not readable at all (missing, not UTF-8, an array with a syntax
//! error) is an error; a JSON Lines line that is not JSON is a record whose `value` says why.
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{PluginError, PluginResult};

/// One record of a file and where it came from.
#[derive(Clone, Debug)]
pub struct Record {
    /// `file:line` (JSON Lines) or `file: record [i]` (JSON array, 0-based).
    pub origin: String,
    /// The parsed JSON, or why the line is not JSON.
    pub value: Result<Value, String>,
}

/// The files a path names: the file itself, or every `.json` / `.jsonl` file of a folder,
/// sorted by name.
pub fn json_files_of(path: &Path) -> PluginResult<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(PluginError::invalid(format!("{}: no such file or folder", path.display())));
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| PluginError::runtime(format!("{}: {e}", path.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let p = entry.map_err(|e| PluginError::runtime(format!("{}: {e}", path.display())))?.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if p.is_file() && (ext == "json" || ext == "jsonl") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(PluginError::invalid(format!(
            "{}: the folder holds no .json or .jsonl file",
            path.display()
        )));
    }
    Ok(files)
}

/// The records of one file (see the module doc for the two layouts).
pub fn read_records(file: &Path) -> PluginResult<Vec<Record>> {
    let name = file.display().to_string();
    let bytes = std::fs::read(file).map_err(|e| PluginError::runtime(format!("{name}: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| PluginError::invalid(format!("{name}: not UTF-8 text ({e})")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            PluginError::invalid(format!(
                "{name}:{}:{}: not a valid JSON array: {e} (a file starting with `[` is read as one JSON array; \
                 JSON Lines files hold one object per line)",
                e.line(),
                e.column()
            ))
        })?;
        Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, v)| Record { origin: format!("{name}: record [{i}]"), value: Ok(v) })
            .collect())
    } else {
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| Record {
                origin: format!("{name}:{}", i + 1),
                value: serde_json::from_str(line)
                    .map_err(|e| format!("not valid JSON at column {}: {e}", e.column())),
            })
            .collect())
    }
}

/// "a string", "a number", … for messages.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_lines_keep_their_origin() {
        let d = std::env::temp_dir().join(format!("plugin-api-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("b.json"), "\u{feff} [{\"t\": 1}, 2]").unwrap();
        std::fs::write(d.join("a.jsonl"), "{\"t\": 1}\n\n{oops\n").unwrap();
        std::fs::write(d.join("c.txt"), "ignored").unwrap();
        let files = json_files_of(&d).unwrap();
        assert_eq!(files, vec![d.join("a.jsonl"), d.join("b.json")]);
        let lines = read_records(&files[0]).unwrap();
        assert_eq!(lines[1].origin, format!("{}:3", files[0].display()));
        assert!(lines[1].value.as_ref().unwrap_err().starts_with("not valid JSON at column 2"));
        let array = read_records(&files[1]).unwrap();
        assert_eq!(array[1].origin, format!("{}: record [1]", files[1].display()));
        assert_eq!(kind_of(array[1].value.as_ref().unwrap()), "a number");
        std::fs::write(d.join("b.json"), "[{\"t\": }]").unwrap();
        assert!(read_records(&files[1])
            .unwrap_err()
            .message()
            .contains(":1:8: not a valid JSON array"));
        assert!(json_files_of(&d.join("nope"))
            .unwrap_err()
            .message()
            .contains("no such file or folder"));
    }
}
