//! Training data: samples from a dataset plugin, encoded through the model's chat template
//! into ids and labels, collated into padded batches.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use ferrotune::data::{collate, encode_sample, load_samples, EncodeOptions};
//! use ferrotune::plugins::{Registry, SearchPath};
//! use ferrotune::text::Tokenizer;
//! let registry = Registry::discover(&SearchPath::from_env(&[]));
//! let samples = load_samples(&registry, "alpaca", "{}", "datasets/alpaca_demo.json".as_ref(), "train")?;
//! let tok = Tokenizer::from_dir("assets/qwen2-tokenizer".as_ref())?;
//! let opts = EncodeOptions::default();
//! let encoded = samples.iter().map(|s| encode_sample(&tok, s, &opts)).collect::<anyhow::Result<Vec<_>>>()?;
//! let tensors = collate(&encoded[..4], tok.pad_token_id().unwrap_or(0));
//! # let _ = tensors; Ok(()) }
//! ```
mod collate;
mod encode;
pub mod check;
pub mod images;

use std::path::Path;

use anyhow::{Context, Result};
use ferrotune_plugin_api::{DataSource, DatasetFormat, Sample};

use crate::plugins::Registry;

pub use collate::collate;
pub use encode::{encode_pair, encode_sample, preview, EncodeError, EncodeOptions, Encoded, IGNORE_INDEX};
pub use images::{encode_multimodal, ImagePrep, SampleImage};

/// Every sample of `path` read by dataset plugin `plugin` configured with `config_json`.
pub fn load_samples(registry: &Registry, plugin: &str, config_json: &str, path: &Path, split: &str) -> Result<Vec<Sample>> {
    let format = registry.dataset(plugin, config_json)?;
    let source = DataSource { path: path.display().to_string(), split: split.to_string() };
    let what = || format!("reading {} (split `{split}`) with dataset plugin `{plugin}`", path.display());
    let reader = format.open(&source).with_context(what)?;
    let n = reader.len().with_context(what)?;
    (0..n).map(|i| reader.get(i).with_context(what)).collect()
}

/// Every row of `path` read by dataset plugin `plugin`: a sample, or why the plugin refused
/// that row (its message names the file and record). Failing to open the data (a missing
/// file or column) is an error.
pub fn read_rows(registry: &Registry, plugin: &str, config_json: &str, path: &Path, split: &str) -> Result<Vec<Result<Sample, String>>> {
    let format = registry.dataset(plugin, config_json)?;
    let source = DataSource { path: path.display().to_string(), split: split.to_string() };
    let what = || format!("reading {} (split `{split}`) with dataset plugin `{plugin}`", path.display());
    let reader = format.open(&source).with_context(what)?;
    let n = reader.len().with_context(what)?;
    Ok((0..n).map(|i| reader.get(i).map_err(|e| e.to_string())).collect())
}

/// Rows with a reason, one per line (at most `limit`, then a count).
pub fn rows_report(rows: &[(usize, String)], limit: usize) -> String {
    let mut lines: Vec<String> = rows.iter().take(limit).map(|(i, e)| format!("  row {i}: {e}")).collect();
    if rows.len() > limit {
        lines.push(format!("  … and {} more", rows.len() - limit));
    }
    lines.join("\n")
}

/// Rows turned into training sequences, with what could not be used, by row index.
#[derive(Debug, Default)]
pub struct Prepared {
    pub rows: usize,
    /// Usable sequences, by row.
    pub encoded: Vec<(usize, Encoded)>,
    /// Rows left without label tokens (always skipped).
    pub no_labels: Vec<(usize, String)>,
    /// Rows that cannot be used (refused by the plugin, bad images, cut image blocks).
    pub bad: Vec<(usize, String)>,
}

impl Prepared {
    pub fn truncated(&self) -> usize {
        self.encoded.iter().filter(|(_, e)| e.truncated_from.is_some()).count()
    }

    /// The bad rows, one per line (at most `limit`, then a count).
    pub fn bad_report(&self, limit: usize) -> String {
        rows_report(&self.bad, limit)
    }
}

/// Encodes every row (see [`encode_multimodal`]); errors that are not about one row (a
/// template that cannot place labels on any row, say) stop.
pub fn prepare_rows(rows: Vec<Result<Sample, String>>, tok: &crate::text::Tokenizer, prep: Option<&ImagePrep>, opts: &EncodeOptions) -> Result<Prepared> {
    let mut out = Prepared { rows: rows.len(), ..Default::default() };
    for (i, row) in rows.into_iter().enumerate() {
        let sample = match row {
            Ok(s) => s,
            Err(e) => {
                out.bad.push((i, e));
                continue;
            }
        };
        match encode_multimodal(tok, prep, sample, opts) {
            Ok(e) => out.encoded.push((i, e)),
            Err(e) => match e.downcast_ref::<EncodeError>() {
                Some(EncodeError::NoLabelTokens { .. }) => out.no_labels.push((i, format!("{e:#}"))),
                Some(_) => out.bad.push((i, format!("{e:#}"))),
                None => return Err(e.context(format!("row {i}"))),
            },
        }
    }
    Ok(out)
}
