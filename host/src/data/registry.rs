//! LLaMA-Factory's data registry: `data.dataset_dir` (a folder holding `dataset_info.json`)
//! and `data.datasets` (names in it) instead of one `data.plugin` + `data.path`.
//!
//! Each entry maps onto the `alpaca` / `sharegpt` dataset plugins with LLaMA-Factory's own
//! semantics (`src/llamafactory/data/parser.py`, `loader.py`, `converter.py`):
//!
//! * `file_name` (a file or a folder of `.json` / `.jsonl` files) relative to `dataset_dir`.
//!   Entries that point at a hub (`hf_hub_url`, `ms_hub_url`, `om_hub_url`, `script_url`,
//!   `cloud_file_name`) with no local `file_name` are refused: download the files.
//! * `formatting`: `alpaca` (default), `sharegpt`, or `openai` (sharegpt whose tags default to
//!   `role` / `content` / `user` / `assistant` / `tool` / `system`).
//! * `columns`: without the object, alpaca reads `instruction` / `input` / `output` and
//!   sharegpt `conversations`; with it, every column it does not name is off (as
//!   `DatasetAttr.join` sets them to `None`). `tags` likewise (sharegpt, openai).
//! * `ranking`, `kto_tag` (a column), `images` / `videos` (columns, paths found under
//!   `media_dir`: the entry's own, else `data.media_dir`, else `dataset_dir`).
//! * `split`: `train`, or a slice of it as Hugging Face datasets writes one (`train[:100]`,
//!   `train[10%:20%]`, `train[:50%]+train[-10:]`); a local file has no other split.
//! * `num_samples`: that many rows drawn at random (seeded by the run's seed), repeating rows
//!   when the file has fewer; then `data.max_samples` keeps each data set's first N.
//! * `subset` and `folder` select nothing in a local file (as in HF datasets) and are noted.
//!
//! Several data sets mix by `data.mix_strategy` as HF datasets' `concatenate_datasets` /
//! `interleave_datasets` do: `concat` one after another; `interleave_under` draws a data set
//! per row (round robin, or at random with `data.interleave_probs`, seeded) and stops when the
//! first is exhausted; `interleave_over` goes on, restarting exhausted ones, until every data
//! set has been exhausted once. `data.replacements` fills `{{key}}` placeholders (as
//! LLaMA-Factory's `identity.json` asks its users to), and placeholders left are warned about.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::records::kind_of as kind;
use ferrotune_plugin_api::Sample;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};

use crate::plugins::Registry;
use crate::train::config::DataConfig;

/// The registry's file name inside `dataset_dir`.
pub const INFO_FILE: &str = "dataset_info.json";

// ---------------------------------------------------------------- config keys

/// `data.datasets`: a list of names, or one string of comma-separated names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Names(pub Vec<String>);

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let list = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a list of data set names or `a,b` (a string)")
        })? {
            Raw::One(s) => vec![s],
            Raw::Many(v) => v,
        };
        Ok(Names(
            list.iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ))
    }
}

/// `data.interleave_probs`: a list of numbers, or `0.5,0.3,0.2` as LLaMA-Factory writes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Probs(pub Vec<f64>);

impl<'de> Deserialize<'de> for Probs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            One(f64),
            Many(Vec<f64>),
        }
        let bad =
            || serde::de::Error::custom("expected a list of probabilities or `0.5,0.5` (a string)");
        Ok(Probs(match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::Text(s) => s
                .split(',')
                .map(|p| p.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad())?,
            Raw::One(p) => vec![p],
            Raw::Many(v) => v,
        }))
    }
}

/// `data.mix_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixStrategy {
    /// One data set after another (default).
    #[default]
    Concat,
    /// Interleaved; stop when the first data set is exhausted.
    InterleaveUnder,
    /// Interleaved, restarting exhausted data sets, until all have been exhausted once.
    InterleaveOver,
}

impl MixStrategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Concat => "concat",
            Self::InterleaveUnder => "interleave_under",
            Self::InterleaveOver => "interleave_over",
        }
    }
}

/// Checks the data keys of a config: one source of data (`path` + `plugin`, or
/// `dataset_dir` + `datasets`) and the registry keys that go with it.
pub fn validate(d: &DataConfig) -> Result<()> {
    let has_path = !d.path.as_os_str().is_empty();
    let has_plugin = !d.plugin.is_empty();
    match (&d.datasets, has_path || has_plugin) {
        (None, false) => bail!(
            "config key `data`: no data named: give `data.path` (a file or folder) with `data.plugin` \
             (alpaca, sharegpt, …), or `data.dataset_dir` (LLaMA-Factory's folder holding dataset_info.json) \
             with `data.datasets` (names in it)"
        ),
        (Some(_), true) => bail!(
            "config keys `data.datasets` and `data.{}`: give one source of data: a registry's data sets \
             (`dataset_dir` + `datasets`; their plugin and path come from dataset_info.json), or `path` + `plugin`",
            if has_path { "path" } else { "plugin" }
        ),
        (Some(names), false) => {
            if names.0.is_empty() {
                bail!("config key `data.datasets`: names no data set");
            }
            if d.dataset_dir.is_none() {
                bail!(
                    "config key `data.dataset_dir`: needed with data.datasets: the folder that holds \
                     LLaMA-Factory's {INFO_FILE} (its default is `data`)"
                );
            }
            let mut seen = BTreeSet::new();
            for n in &names.0 {
                if !seen.insert(n) {
                    bail!("config key `data.datasets`: `{n}` is named twice");
                }
            }
        }
        (None, true) => {
            if !has_plugin {
                bail!("config key `data.plugin`: missing: name the dataset plugin that reads data.path (alpaca, sharegpt, …)");
            }
            if !has_path {
                bail!("config key `data.path`: missing: the data file or folder that data.plugin reads");
            }
            for (key, set) in [
                ("dataset_dir", d.dataset_dir.is_some()),
                ("media_dir", d.media_dir.is_some()),
            ] {
                if set {
                    bail!("config key `data.{key}`: only read with data.datasets");
                }
            }
        }
    }
    let n = d.datasets.as_ref().map_or(1, |n| n.0.len());
    match (&d.interleave_probs, d.mix_strategy) {
        (Some(_), MixStrategy::Concat) => bail!(
            "config key `data.interleave_probs`: only read with mix_strategy interleave_under or interleave_over \
             (this run concatenates)"
        ),
        (Some(p), strategy) => {
            if p.0.len() != n {
                bail!(
                    "config key `data.interleave_probs`: {} probabilities for {n} data sets; give one per data set",
                    p.0.len()
                );
            }
            if p.0.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                bail!("config key `data.interleave_probs`: probabilities must be finite and ≥ 0, got {:?}", p.0);
            }
            let sum: f64 = p.0.iter().sum();
            if (sum - 1.0).abs() > 1e-6 {
                bail!("config key `data.interleave_probs`: the probabilities sum to {sum}, not 1");
            }
            if strategy == MixStrategy::InterleaveOver && p.0.contains(&0.0) {
                bail!(
                    "config key `data.interleave_probs`: interleave_over draws until every data set is exhausted; \
                     a data set of probability 0 never is"
                );
            }
        }
        (None, _) => {}
    }
    if d.max_samples == Some(0) {
        bail!("config key `data.max_samples`: must be at least 1 (omit it to read every row)");
    }
    for key in d.replacements.keys() {
        if key.is_empty() || !key.chars().all(|c| c.is_alphanumeric() || c == '_') {
            bail!(
                "config key `data.replacements.{key}`: a placeholder name is letters, digits and `_` \
                 (it replaces `{{{{{key}}}}}`)"
            );
        }
    }
    Ok(())
}

/// What a checkpoint records of the registry keys (only those set, so that checkpoints
/// written before they existed still resume): `data.dataset_dir`, `data.datasets`, …
pub fn record(d: &DataConfig) -> BTreeMap<String, Value> {
    let path = |p: &Path| {
        json!(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string())
    };
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            out.insert(format!("data.{k}"), v);
        }
    };
    put("dataset_dir", d.dataset_dir.as_deref().map(path));
    put("datasets", d.datasets.as_ref().map(|n| json!(n.0)));
    put("media_dir", d.media_dir.as_deref().map(path));
    put(
        "mix_strategy",
        (d.mix_strategy != MixStrategy::Concat).then(|| json!(d.mix_strategy.name())),
    );
    put("interleave_probs", d.interleave_probs.as_ref().map(|p| json!(p.0)));
    put("max_samples", d.max_samples.map(|m| json!(m)));
    put("replacements", (!d.replacements.is_empty()).then(|| json!(d.replacements)));
    out
}

// ---------------------------------------------------------------- entries

/// One entry of `dataset_info.json` as a dataset plugin reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    /// `alpaca` or `sharegpt`.
    pub plugin: &'static str,
    /// The plugin's configuration (`columns`, `tags`, `ranking`, `media_dir`, and
    /// `data.config`'s keys on top).
    pub config: Map<String, Value>,
    /// The file or folder `file_name` names.
    pub path: PathBuf,
    /// `split` (`train` or slices of it).
    pub split: String,
    pub num_samples: Option<usize>,
    /// Keys that select nothing here (`subset`, `folder`), said once.
    pub notes: Vec<String>,
}

const HUB_KEYS: [&str; 5] =
    ["hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"];
const ENTRY_KEYS: [&str; 11] = [
    "file_name",
    "formatting",
    "ranking",
    "subset",
    "split",
    "folder",
    "num_samples",
    "columns",
    "tags",
    "media_dir",
    "revision",
];
const ALPACA_COLUMNS: [&str; 10] = [
    "prompt", "query", "response", "history", "system", "images", "videos", "chosen", "rejected",
    "kto_tag",
];
const SHAREGPT_COLUMNS: [&str; 8] =
    ["messages", "system", "tools", "images", "videos", "chosen", "rejected", "kto_tag"];
const ALL_COLUMNS: [&str; 13] = [
    "prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
    "audios", "chosen", "rejected", "kto_tag",
];
const TAGS: [&str; 7] = [
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
];

/// Reads `dir/dataset_info.json` (an object of entries).
pub fn read_info(dir: &Path) -> Result<Map<String, Value>> {
    let file = dir.join(INFO_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "config key `data.dataset_dir`: cannot read {} (LLaMA-Factory's data registry)",
            file.display()
        )
    })?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => {
            bail!("{}: expected an object of data sets, found {}", file.display(), kind(&other))
        }
        Err(e) => bail!("{}: not valid JSON: {e}", file.display()),
    }
}

/// Entry `name` of `info` (read from `dataset_dir`), its images and videos found under
/// `media_dir`, with `overrides` (`data.config`) on top of its plugin configuration.
pub fn entry(
    info: &Map<String, Value>,
    name: &str,
    dataset_dir: &Path,
    media_dir: &Path,
    overrides: &Map<String, Value>,
) -> Result<Entry> {
    let file = dataset_dir.join(INFO_FILE);
    let at = || format!("data set `{name}` of {}", file.display());
    let Some(e) = info.get(name) else {
        let mut known: Vec<&str> = info.keys().map(String::as_str).collect();
        known.sort_by_key(|k| strsim_distance(k, name));
        bail!(
            "config key `data.datasets`: no data set `{name}` in {} (closest: {})",
            file.display(),
            known.iter().take(3).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        );
    };
    let Value::Object(e) = e else { bail!("{}: expected an object, found {}", at(), kind(e)) };
    let text = |key: &str| -> Result<Option<&str>> {
        match e.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => bail!("{}: key `{key}`: expected a string, found {}", at(), kind(v)),
        }
    };
    for key in e.keys() {
        if !ENTRY_KEYS.contains(&key.as_str()) && !HUB_KEYS.contains(&key.as_str()) {
            bail!("{}: unknown key `{key}` (known: {})", at(), ENTRY_KEYS.join(", "));
        }
    }
    let Some(file_name) = text("file_name")? else {
        let hubs: Vec<&str> = HUB_KEYS.iter().copied().filter(|k| e.contains_key(*k)).collect();
        if hubs.is_empty() {
            bail!(
                "{}: no `file_name` (the data file or folder in {})",
                at(),
                dataset_dir.display()
            );
        }
        bail!(
            "{}: it points at a hub or a script ({}), which ferrotune does not download: download the files \
             and use file_name (a file or folder in {})",
            at(),
            hubs.join(", "),
            dataset_dir.display()
        );
    };
    let path = dataset_dir.join(file_name);
    if !path.exists() {
        bail!("{}: file_name `{file_name}`: no such file or folder {}", at(), path.display());
    }
    let formatting = text("formatting")?.unwrap_or("alpaca");
    let openai = formatting == "openai";
    let plugin = match formatting {
        "alpaca" => "alpaca",
        "sharegpt" | "openai" => "sharegpt",
        other => bail!("{}: formatting `{other}`: expected alpaca, sharegpt or openai", at()),
    };
    let ranking = match e.get("ranking") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => bail!("{}: key `ranking`: expected true or false, found {}", at(), kind(v)),
    };
    let num_samples = match e.get("num_samples") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Some(n as usize),
            _ => bail!("{}: key `num_samples`: expected a positive whole number, found {v}", at()),
        },
    };
    let split = text("split")?.unwrap_or("train").to_string();
    let mut notes = Vec::new();
    for key in ["subset", "folder", "revision"] {
        if let Some(v) = text(key)? {
            notes.push(format!(
                "data set `{name}`: `{key}: {v}` selects nothing in a local file (as in HF datasets); ignored"
            ));
        }
    }

    // Columns: LLaMA-Factory's defaults without a `columns` object; with one, each column it
    // does not name is off.
    let columns = match e.get("columns") {
        None | Some(Value::Null) => None,
        Some(Value::Object(c)) => Some(c),
        Some(v) => bail!("{}: key `columns`: expected an object, found {}", at(), kind(v)),
    };
    let column = |key: &str| -> Result<Value> {
        match columns {
            None => Ok(match (plugin, key) {
                ("alpaca", "prompt") => json!("instruction"),
                ("alpaca", "query") => json!("input"),
                ("alpaca", "response") => json!("output"),
                ("sharegpt", "messages") => json!("conversations"),
                _ => Value::Null,
            }),
            Some(c) => match c.get(key) {
                None | Some(Value::Null) => Ok(Value::Null),
                Some(Value::String(s)) => Ok(json!(s)),
                Some(v) => {
                    bail!("{}: `columns.{key}`: expected a column name, found {}", at(), kind(v))
                }
            },
        }
    };
    if let Some(c) = columns {
        for key in c.keys() {
            if !ALL_COLUMNS.contains(&key.as_str()) {
                bail!(
                    "{}: unknown column key `columns.{key}` (known: {})",
                    at(),
                    ALL_COLUMNS.join(", ")
                );
            }
        }
    }
    if !column("audios")?.is_null() {
        bail!("{}: `columns.audios`: audio inputs are not supported (no audio model)", at());
    }
    let mut config = Map::new();
    let mut cols = Map::new();
    match plugin {
        "alpaca" => {
            if !column("tools")?.is_null() {
                bail!("{}: `columns.tools` with alpaca formatting: tools are read from sharegpt rows; use formatting sharegpt", at());
            }
            for key in ALPACA_COLUMNS {
                cols.insert(key.into(), column(key)?);
            }
        }
        _ => {
            let messages = column("messages")?;
            if messages.is_null() {
                bail!("{}: `columns.messages`: needed with {formatting} formatting (the column of turns)", at());
            }
            for key in SHAREGPT_COLUMNS {
                cols.insert(key.into(), column(key)?);
            }
            let tags = match e.get("tags") {
                None | Some(Value::Null) => None,
                Some(Value::Object(t)) => Some(t),
                Some(v) => bail!("{}: key `tags`: expected an object, found {}", at(), kind(v)),
            };
            let mut t = Map::new();
            for (i, key) in TAGS.iter().enumerate() {
                let value = match tags {
                    None if openai => {
                        [json!("role"), json!("content"), json!("user"), json!("assistant"), json!("tool"), Value::Null, json!("system")][i].clone()
                    }
                    None => json!(["from", "value", "human", "gpt", "observation", "function_call", "system"][i]),
                    Some(tags) => match tags.get(*key) {
                        None | Some(Value::Null) if i < 4 => bail!(
                            "{}: `tags.{key}`: needed when `tags` is given (LLaMA-Factory leaves tags it does not name unset)",
                            at()
                        ),
                        None | Some(Value::Null) => Value::Null,
                        Some(Value::String(s)) => json!(s),
                        Some(v) => bail!("{}: `tags.{key}`: expected a string, found {}", at(), kind(v)),
                    },
                };
                t.insert((*key).into(), value);
            }
            if let Some(tags) = tags {
                if let Some(k) = tags.keys().find(|k| !TAGS.contains(&k.as_str())) {
                    bail!("{}: unknown tag key `tags.{k}` (known: {})", at(), TAGS.join(", "));
                }
            }
            config.insert("tags".into(), Value::Object(t));
        }
    }
    config.insert("columns".into(), Value::Object(cols));
    config.insert("ranking".into(), json!(ranking));
    let media = match text("media_dir")? {
        Some(m) => dataset_dir.join(m),
        None => media_dir.to_path_buf(),
    };
    config.insert("media_dir".into(), json!(media.display().to_string()));
    for (k, v) in overrides {
        config.insert(k.clone(), v.clone());
    }
    Ok(Entry { name: name.to_string(), plugin, config, path, split, num_samples, notes })
}

/// A small edit distance, to suggest the names closest to a mistyped one.
fn strsim_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------- selecting and mixing rows

/// The rows of `split` (`train`, or slices of it joined by `+`: `train[:10]`, `train[10%:]`,
/// `train[-5:]`, as HF datasets reads them; percentages round to the closest row) of a data
/// set of `n` rows.
pub fn select_split(split: &str, n: usize) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in split.split('+').map(str::trim) {
        let (name, slice) = match part.find('[') {
            Some(i) if part.ends_with(']') => (&part[..i], Some(&part[i + 1..part.len() - 1])),
            Some(_) => return Err(format!("`{part}`: a slice is written `train[from:to]`")),
            None => (part, None),
        };
        if name.trim() != "train" {
            return Err(format!(
                "`{}`: a local file holds one split, `train` (as HF datasets reads it); slice it \
                 (`train[:90%]`, `train[90%:]`) or name another file",
                name.trim()
            ));
        }
        let Some(slice) = slice else {
            out.extend(0..n);
            continue;
        };
        let Some((from, to)) = slice.split_once(':') else {
            return Err(format!("`{part}`: a slice is written `train[from:to]`"));
        };
        let bound = |b: &str, default: usize| -> std::result::Result<usize, String> {
            let b = b.trim();
            if b.is_empty() {
                return Ok(default);
            }
            let (num, pct) = match b.strip_suffix('%') {
                Some(p) => (p.trim(), true),
                None => (b, false),
            };
            let v: i64 = num
                .parse()
                .map_err(|_| format!("`{part}`: `{b}` is not a row number or a percentage"))?;
            let abs = if pct {
                if !(-100..=100).contains(&v) {
                    return Err(format!("`{part}`: `{b}` is outside -100%..100%"));
                }
                (v as f64 * n as f64 / 100.0).round_ties_even() as i64
            } else {
                v
            };
            let abs = if abs < 0 { n as i64 + abs } else { abs };
            Ok(abs.clamp(0, n as i64) as usize)
        };
        let (a, b) = (bound(from, 0)?, bound(to, n)?);
        out.extend(a..b.max(a));
    }
    Ok(out)
}

/// `num_samples` row indices of `rows` rows: a seeded permutation's first ones, then rows
/// drawn again at random when `num_samples` is more than there are (LLaMA-Factory's
/// oversampling).
pub fn sample_rows(rows: usize, num_samples: usize, seed: u64) -> Vec<usize> {
    let mut rng = crate::util::rng::SplitMix64(seed);
    let mut out: Vec<usize> = rng.permutation(rows).into_iter().take(num_samples).collect();
    while out.len() < num_samples && rows > 0 {
        out.push((rng.next_u64() % rows as u64) as usize);
    }
    out
}

/// The (data set, row) pairs of the mixed data, for data sets of `lengths` rows (each at
/// least 1), as HF datasets' `concatenate_datasets` / `interleave_datasets` order them.
pub fn mix(
    lengths: &[usize],
    strategy: MixStrategy,
    probs: Option<&[f64]>,
    seed: u64,
) -> Vec<(usize, usize)> {
    let k = lengths.len();
    match (strategy, probs) {
        (MixStrategy::Concat, _) => {
            lengths.iter().enumerate().flat_map(|(d, &n)| (0..n).map(move |i| (d, i))).collect()
        }
        (MixStrategy::InterleaveUnder, None) => {
            let m = lengths.iter().copied().min().unwrap_or(0);
            (0..m).flat_map(|i| (0..k).map(move |d| (d, i))).collect()
        }
        (MixStrategy::InterleaveOver, None) => {
            let m = lengths.iter().copied().max().unwrap_or(0);
            (0..m).flat_map(|i| (0..k).map(move |d| (d, i % lengths[d]))).collect()
        }
        (strategy, Some(p)) => {
            let over = strategy == MixStrategy::InterleaveOver;
            let mut rng = crate::util::rng::SplitMix64(seed);
            let total: f64 = p.iter().sum();
            let (mut next, mut exhausted) = (vec![0usize; k], vec![false; k]);
            let mut out = Vec::new();
            loop {
                let stop =
                    if over { exhausted.iter().all(|&e| e) } else { exhausted.iter().any(|&e| e) };
                if stop || k == 0 {
                    return out;
                }
                // A data set drawn with probability p[d].
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
                let mut acc = 0.0;
                let mut d = k - 1;
                for (j, &pj) in p.iter().enumerate() {
                    acc += pj;
                    if u < acc && pj > 0.0 {
                        d = j;
                        break;
                    }
                }
                while p[d] == 0.0 {
                    d -= 1; // rounding past the last positive probability
                }
                out.push((d, next[d]));
                next[d] += 1;
                if next[d] >= lengths[d] {
                    exhausted[d] = true;
                    next[d] = 0;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- placeholders

/// `{{key}}` with `key` in `replacements` replaced in every turn of `sample`.
pub fn replace_placeholders(sample: &mut Sample, replacements: &BTreeMap<String, String>) {
    if replacements.is_empty() {
        return;
    }
    let turns =
        sample.messages.iter_mut().chain(sample.chosen.as_mut()).chain(sample.rejected.as_mut());
    for m in turns {
        if m.content.contains("{{") {
            for (k, v) in replacements {
                m.content = m.content.replace(&format!("{{{{{k}}}}}"), v);
            }
        }
    }
}

/// The `{{name}}` placeholders (a name of letters, digits and `_`) left in `sample`'s turns.
pub fn placeholders(sample: &Sample) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for m in sample.messages.iter().chain(sample.chosen.as_ref()).chain(sample.rejected.as_ref()) {
        let mut rest = m.content.as_str();
        while let Some(i) = rest.find("{{") {
            rest = &rest[i + 2..];
            if let Some(j) = rest.find("}}") {
                let key = &rest[..j];
                if !key.is_empty() && key.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    found.insert(format!("{{{{{key}}}}}"));
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------- reading a run's data

/// Which data set each row came from.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// Data set names (the path, without a registry).
    pub names: Vec<String>,
    /// The data set of each row.
    pub of_row: Vec<usize>,
    /// Rows whose text still holds `{{…}}` placeholders, and which.
    pub placeholders: Vec<(usize, Vec<String>)>,
}

/// A run's rows and where they came from.
pub struct Rows {
    pub rows: Vec<Result<Sample, String>>,
    pub origins: Origins,
}

/// How the run's data is named in messages: its path, or its data sets and registry.
pub fn describe(d: &DataConfig) -> String {
    match (&d.datasets, &d.dataset_dir) {
        (Some(names), Some(dir)) => {
            format!("data set(s) {} of {}", names.0.join(", "), dir.join(INFO_FILE).display())
        }
        _ => d.path.display().to_string(),
    }
}

/// The run's registry entries (none without `data.datasets`).
pub fn entries(d: &DataConfig) -> Result<Vec<Entry>> {
    let (Some(names), Some(dir)) = (&d.datasets, &d.dataset_dir) else { return Ok(Vec::new()) };
    let info = read_info(dir)?;
    let media = d.media_dir.clone().unwrap_or_else(|| dir.clone());
    names.0.iter().map(|n| entry(&info, n, dir, &media, &d.config)).collect()
}

/// The files the data fingerprint hashes: the data path, or `dataset_info.json` and each data
/// set's file or folder.
pub fn fingerprint_paths(d: &DataConfig) -> Result<Vec<PathBuf>> {
    match &d.dataset_dir {
        Some(dir) if d.datasets.is_some() => {
            let mut paths = vec![dir.join(INFO_FILE)];
            paths.extend(entries(d)?.into_iter().map(|e| e.path));
            Ok(paths)
        }
        _ => Ok(vec![d.path.clone()]),
    }
}

/// Every row of the run's data: `data.path` read by `data.plugin`, or the registry's data sets
/// each read by its plugin, its `split` / `num_samples` / `data.max_samples` applied, mixed by
/// `data.mix_strategy` (seeded by `seed`); `data.replacements` applied, placeholders left
/// warned about on stderr.
pub fn read(d: &DataConfig, seed: u64, registry: &Registry) -> Result<Rows> {
    let mut sets: Vec<(String, Vec<Result<Sample, String>>)> = Vec::new();
    if d.datasets.is_none() {
        let config = Value::Object(d.config.clone()).to_string();
        let mut rows = super::read_rows(registry, &d.plugin, &config, &d.path, &d.split)?;
        if let Some(m) = d.max_samples {
            rows.truncate(m);
        }
        sets.push((d.path.display().to_string(), rows));
    } else {
        for (k, e) in entries(d)?.into_iter().enumerate() {
            for note in &e.notes {
                eprintln!("note: {note}");
            }
            let config = Value::Object(e.config.clone()).to_string();
            let what =
                || format!("data set `{}` ({} formatting, {})", e.name, e.plugin, e.path.display());
            let all = super::read_rows(registry, e.plugin, &config, &e.path, "train")
                .with_context(what)?;
            let mut pick = select_split(&e.split, all.len())
                .map_err(|m| anyhow::anyhow!("{}: split {m}", what()))?;
            if let Some(n) = e.num_samples {
                let drawn = sample_rows(
                    pick.len(),
                    n,
                    seed ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                pick = drawn.into_iter().map(|i| pick[i]).collect();
            }
            if let Some(m) = d.max_samples {
                pick.truncate(m);
            }
            if pick.is_empty() {
                bail!("{}: split `{}` selects no row", what(), e.split);
            }
            let rows: Vec<_> = pick.iter().map(|&i| all[i].clone()).collect();
            sets.push((e.name.clone(), rows));
        }
    }
    let lengths: Vec<usize> = sets.iter().map(|(_, r)| r.len()).collect();
    let probs = d.interleave_probs.as_ref().map(|p| p.0.as_slice());
    let order = if sets.len() == 1 {
        mix(&lengths, MixStrategy::Concat, None, seed)
    } else {
        mix(&lengths, d.mix_strategy, probs, seed)
    };
    let mut origins =
        Origins { names: sets.iter().map(|(n, _)| n.clone()).collect(), ..Default::default() };
    let mut rows = Vec::with_capacity(order.len());
    let mut left: BTreeMap<usize, (BTreeSet<String>, usize)> = BTreeMap::new();
    for (d_idx, i) in order {
        let mut row = sets[d_idx].1[i].clone();
        if let Ok(sample) = &mut row {
            replace_placeholders(sample, &d.replacements);
            let found = placeholders(sample);
            if !found.is_empty() {
                let e = left.entry(d_idx).or_default();
                e.0.extend(found.iter().cloned());
                e.1 += 1;
                origins.placeholders.push((rows.len(), found.into_iter().collect()));
            }
        }
        origins.of_row.push(d_idx);
        rows.push(row);
    }
    for (d_idx, (found, n)) in &left {
        let keys: Vec<String> =
            found.iter().map(|p| p.trim_matches(['{', '}']).to_string()).collect();
        eprintln!(
            "warning: data set `{}`: {n} row(s) hold placeholders {} that nothing replaces; they would train as \
             written: set data.replacements ({{{}}})",
            origins.names[*d_idx],
            found.iter().cloned().collect::<Vec<_>>().join(", "),
            keys.iter().map(|k| format!("{k}: …")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(Rows { rows, origins })
}

// ---------------------------------------------------------------- data check, per data set

/// `data check`'s counts for one data set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DatasetCheck {
    pub name: String,
    pub rows: usize,
    pub usable: usize,
    pub errors: usize,
    pub skipped: usize,
    pub warnings: usize,
}

/// Adds a warning note for every row that holds placeholders left, and the per-data-set
/// counts, to `report`.
pub fn check_by_dataset(
    report: &mut super::check::CheckReport,
    prepared: &super::Prepared,
    origins: &Origins,
) {
    for (row, keys) in &origins.placeholders {
        report.notes.push(super::check::RowNote {
            row: *row,
            level: "warning",
            message: format!(
                "placeholders {} left unreplaced (set data.replacements); they train as written",
                keys.join(", ")
            ),
        });
        report.warnings += 1;
    }
    report.notes.sort_by_key(|n| (n.row, n.level != "error"));
    let mut per: Vec<DatasetCheck> = origins
        .names
        .iter()
        .map(|n| DatasetCheck { name: n.clone(), ..Default::default() })
        .collect();
    let of = |row: usize| origins.of_row.get(row).copied().unwrap_or(0);
    for &d in &origins.of_row {
        per[d].rows += 1;
    }
    let usable: BTreeSet<usize> = prepared.items.iter().map(|(r, _)| *r).collect();
    for r in usable {
        per[of(r)].usable += 1;
    }
    for n in &report.notes {
        let c = &mut per[of(n.row)];
        match n.level {
            "error" => c.errors += 1,
            "skipped" => c.skipped += 1,
            _ => c.warnings += 1,
        }
    }
    report.datasets = per;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    /// A dataset_dir holding `files` (empty) and `dataset_info.json` = `info`.
    fn dir(tag: &str, files: &[&str], info: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ferrotune-registry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::write(d.join(f), "[]").unwrap();
        }
        std::fs::write(d.join(INFO_FILE), info).unwrap();
        d
    }

    #[test]
    fn entries_map_onto_the_plugins_with_llamafactorys_defaults() {
        let text = r#"{
            "plain": {"file_name": "a.json"},
            "kto": {"file_name": "k.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
            "chat": {"file_name": "c.json", "formatting": "openai", "split": "train[:50%]", "num_samples": 3,
                     "subset": "x", "media_dir": "media"},
            "dpo": {"file_name": "d.json", "ranking": true, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
        }"#;
        let d = dir("entries", &["a.json", "k.json", "c.json", "d.json"], text);
        let i = info(text);
        let none = Map::new();
        let e = entry(&i, "plain", &d, &d, &none).unwrap();
        assert_eq!(e.plugin, "alpaca");
        assert_eq!(
            e.config["columns"],
            json!({"prompt": "instruction", "query": "input", "response": "output", "history": null,
                   "system": null, "images": null, "videos": null, "chosen": null, "rejected": null, "kto_tag": null})
        );
        assert_eq!(e.config["ranking"], json!(false));
        assert_eq!(e.config["media_dir"], json!(d.display().to_string()));
        let k = entry(&i, "kto", &d, &d, &none).unwrap();
        assert_eq!(k.plugin, "sharegpt");
        assert_eq!(k.config["columns"]["kto_tag"], json!("label"));
        assert_eq!(k.config["columns"]["messages"], json!("messages"));
        // Tags not named are unset, as LLaMA-Factory's DatasetAttr.join leaves them.
        assert_eq!(
            k.config["tags"],
            json!({"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                   "observation_tag": null, "function_tag": null, "system_tag": null})
        );
        let c =
            entry(&i, "chat", &d, &d, &json!({"skip_bad_rows": true}).as_object().unwrap().clone())
                .unwrap();
        assert_eq!(c.config["tags"]["role_tag"], json!("role"));
        assert_eq!(c.config["tags"]["observation_tag"], json!("tool"));
        assert_eq!(c.config["columns"]["messages"], json!("conversations"));
        assert_eq!((c.split.as_str(), c.num_samples), ("train[:50%]", Some(3)));
        assert_eq!(c.config["media_dir"], json!(d.join("media").display().to_string()));
        assert_eq!(c.config["skip_bad_rows"], json!(true));
        assert!(c.notes[0].contains("`subset: x` selects nothing"), "{:?}", c.notes);
        let p = entry(&i, "dpo", &d, &d, &none).unwrap();
        assert_eq!(p.config["ranking"], json!(true));
        assert_eq!(p.config["columns"]["chosen"], json!("chosen"));
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn hubs_unknown_names_and_bad_entries_are_refused_by_name() {
        let text = r#"{
            "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
            "nothing": {"formatting": "alpaca"},
            "missing": {"file_name": "nope.json"},
            "typo": {"file_name": "a.json", "colums": {}},
            "badfmt": {"file_name": "a.json", "formatting": "csv"},
            "audio": {"file_name": "a.json", "formatting": "sharegpt", "columns": {"messages": "m", "audios": "audios"}},
            "notags": {"file_name": "a.json", "formatting": "sharegpt", "tags": {"role_tag": "role"}}
        }"#;
        let d = dir("refused", &["a.json"], text);
        let i = info(text);
        let err = |name: &str| entry(&i, name, &d, &d, &Map::new()).unwrap_err().to_string();
        let e = err("alpaca_en");
        assert!(
            e.contains("data set `alpaca_en`")
                && e.contains("hf_hub_url, ms_hub_url")
                && e.contains("download the files and use file_name"),
            "{e}"
        );
        assert!(err("nothing").contains("no `file_name`"), "{}", err("nothing"));
        assert!(err("missing").contains("file_name `nope.json`: no such file or folder"));
        assert!(err("typo").contains("unknown key `colums`"));
        assert!(err("badfmt").contains("formatting `csv`"));
        assert!(err("audio").contains("`columns.audios`"));
        assert!(err("notags").contains("`tags.content_tag`: needed"));
        let e = err("alpaca_em");
        assert!(e.contains("no data set `alpaca_em`") && e.contains("`alpaca_en`"), "{e}");
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn splits_slice_as_hf_datasets() {
        assert_eq!(select_split("train", 4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(select_split("train[:2]", 4).unwrap(), vec![0, 1]);
        assert_eq!(select_split("train[-1:]", 4).unwrap(), vec![3]);
        // 25% of 10 = 2.5 rounds to 2 (half to even), 75% = 7.5 to 8.
        assert_eq!(select_split("train[25%:75%]", 10).unwrap(), (2..8).collect::<Vec<_>>());
        assert_eq!(select_split("train[:10%]+train[-1:]", 10).unwrap(), vec![0, 9]);
        assert!(select_split("test", 4).unwrap_err().contains("one split, `train`"));
        assert!(select_split("train[1]", 4).unwrap_err().contains("train[from:to]"));
        assert!(select_split("train[:x%]", 4).unwrap_err().contains("not a row number"));
    }

    #[test]
    fn num_samples_draws_seeded_and_repeats_past_the_end() {
        let a = sample_rows(10, 4, 7);
        assert_eq!(a, sample_rows(10, 4, 7));
        assert_ne!(a, sample_rows(10, 4, 8));
        assert_eq!(a.iter().collect::<BTreeSet<_>>().len(), 4, "no repeats within the rows");
        let b = sample_rows(3, 8, 1);
        assert_eq!(b.len(), 8);
        assert_eq!(b[..3].iter().collect::<BTreeSet<_>>().len(), 3, "each row once before repeats");
    }

    #[test]
    fn mixing_follows_hf_datasets() {
        use MixStrategy::*;
        assert_eq!(mix(&[2, 1], Concat, None, 0), vec![(0, 0), (0, 1), (1, 0)]);
        // HF's examples: lengths [3, 4, 5].
        let flat = |v: Vec<(usize, usize)>| -> Vec<usize> {
            let offsets = [0, 3, 7];
            v.into_iter().map(|(d, i)| offsets[d] + i).collect()
        };
        assert_eq!(
            flat(mix(&[3, 4, 5], InterleaveUnder, None, 0)),
            vec![0, 3, 7, 1, 4, 8, 2, 5, 9]
        );
        assert_eq!(
            flat(mix(&[3, 4, 5], InterleaveOver, None, 0)),
            vec![0, 3, 7, 1, 4, 8, 2, 5, 9, 0, 6, 10, 1, 3, 11]
        );
        // With probabilities: seeded, and the draws follow them.
        let p = [0.6, 0.3, 0.1];
        let big = [100_000, 100_000, 100_000];
        let m = mix(&big, InterleaveUnder, Some(&p), 42);
        assert_eq!(m, mix(&big, InterleaveUnder, Some(&p), 42));
        assert_ne!(m, mix(&big, InterleaveUnder, Some(&p), 43));
        // Under: stops right after the first data set runs out (the 0.6 one, at 100000 rows).
        assert_eq!(m.last().unwrap(), &(0, 99_999));
        for (d, &pd) in p.iter().enumerate() {
            let share = m.iter().filter(|(x, _)| *x == d).count() as f64 / m.len() as f64;
            assert!((share - pd).abs() < 0.01, "data set {d}: share {share}, probability {pd}");
        }
        // Over: every data set is exhausted once (the rare one last), the others restarted.
        let m = mix(&[50, 50, 5], InterleaveOver, Some(&[0.45, 0.45, 0.1]), 3);
        for d in 0..3 {
            let rows: BTreeSet<usize> =
                m.iter().filter(|(x, _)| *x == d).map(|(_, i)| *i).collect();
            assert_eq!(rows.len(), [50, 50, 5][d], "data set {d} fully visited");
        }
        let under = mix(&[50, 50, 5], InterleaveUnder, Some(&[0.45, 0.45, 0.1]), 3);
        assert!(under.len() < m.len());
        assert_eq!(
            under.iter().filter(|(d, _)| *d == 2).count(),
            5,
            "stops when the 5-row set runs out"
        );
    }

    #[test]
    fn placeholders_are_replaced_and_the_rest_found() {
        let mut s = Sample {
            messages: vec![
                ferrotune_plugin_api::Message::new("user", "who are you?"),
                ferrotune_plugin_api::Message::new(
                    "assistant",
                    "I am {{name}}, by {{author}}. {{ not one }} {{x-y}}",
                ),
            ],
            ..Default::default()
        };
        assert_eq!(
            placeholders(&s),
            BTreeSet::from(["{{author}}".to_string(), "{{name}}".to_string()])
        );
        let r = BTreeMap::from([("name".to_string(), "Ferro".to_string())]);
        replace_placeholders(&mut s, &r);
        assert_eq!(s.messages[1].content, "I am Ferro, by {{author}}. {{ not one }} {{x-y}}");
        assert_eq!(placeholders(&s), BTreeSet::from(["{{author}}".to_string()]));
    }

    #[test]
    fn config_keys_are_checked_by_name() {
        use crate::train::config::TrainConfig;
        let base = "model: m\noutput_dir: o\nadapter: {plugin: lora}\n";
        let cfg = |data: &str| TrainConfig::from_yaml(&format!("{base}data: {data}\n"));
        let c = cfg("{dataset_dir: d, datasets: 'a, b', mix_strategy: interleave_under, interleave_probs: '0.25,0.75'}")
            .unwrap();
        assert_eq!(c.data.datasets.as_ref().unwrap().0, vec!["a", "b"]);
        assert_eq!(c.data.interleave_probs.as_ref().unwrap().0, vec![0.25, 0.75]);
        let r = record(&c.data);
        assert_eq!(r["data.datasets"], json!(["a", "b"]));
        assert_eq!(r["data.mix_strategy"], json!("interleave_under"));
        assert!(!r.contains_key("data.max_samples"));
        assert!(
            record(&cfg("{plugin: alpaca, path: p}").unwrap().data).is_empty(),
            "nothing new when unset"
        );
        let e = |data: &str| cfg(data).unwrap_err().to_string();
        assert!(e("{cutoff_len: 8}").contains("no data named"), "{}", e("{cutoff_len: 8}"));
        assert!(e("{path: p}").contains("`data.plugin`: missing"));
        assert!(e("{datasets: [a]}").contains("`data.dataset_dir`: needed"));
        assert!(e("{datasets: [a], dataset_dir: d, path: p}").contains("give one source of data"));
        assert!(e("{datasets: [a, b], dataset_dir: d, interleave_probs: [0.5, 0.5]}")
            .contains("only read with mix_strategy"));
        assert!(e("{datasets: [a, b], dataset_dir: d, mix_strategy: interleave_over, interleave_probs: [1.0]}")
            .contains("1 probabilities for 2 data sets"));
        assert!(e("{datasets: [a, b], dataset_dir: d, mix_strategy: interleave_under, interleave_probs: [0.5, 0.6]}")
            .contains("sum to"));
        assert!(e("{datasets: [a, a], dataset_dir: d}").contains("named twice"));
        assert!(e("{datasets: [a], dataset_dir: d, max_samples: 0}").contains("`data.max_samples`"));
        assert!(
            e("{datasets: [a], dataset_dir: d, mix_strategy: shuffle}").contains("mix_strategy")
        );
        assert!(e("{datasets: [a], dataset_dir: d, replacements: {'a b': x}}")
            .contains("data.replacements.a b"));
    }
}
