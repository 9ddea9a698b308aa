//! Training data: samples from a dataset plugin, encoded through the model's chat template
//! into ids and labels ([`encode_sample`], with images [`encode_multimodal`]), prepared in the
//! batch layout of the run's objective ([`layout::prepare`]), collated into padded batches
//! ([`collate`]).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use ferrotune::data::{collate, encode_sample, load_samples, EncodeOptions, Item, Layout};
//! use ferrotune::plugins::{Registry, SearchPath};
//! use ferrotune::text::Tokenizer;
//! let registry = Registry::discover(&SearchPath::from_env(&[]));
//! let samples = load_samples(&registry, "alpaca", "{}", "datasets/alpaca_demo.json".as_ref(), "train")?;
//! let tok = Tokenizer::from_dir("assets/qwen2-tokenizer".as_ref())?;
//! let opts = EncodeOptions::default();
//! let items = samples.iter().map(|s| Ok(Item::Seq(encode_sample(&tok, s, &opts)?))).collect::<anyhow::Result<Vec<_>>>()?;
//! let batch: Vec<&Item> = items[..4].iter().collect();
//! let (tensors, _meta) = collate(Layout::Sequences, &batch, tok.pad_token_id().unwrap_or(0), None)?;
//! # let _ = tensors; Ok(()) }
//! ```
pub mod check;
mod collate;
mod encode;
pub mod images;
pub mod layout;
pub mod pack;
pub mod registry;

use std::path::Path;

use anyhow::{Context, Result};
use ferrotune_plugin_api::{DataSource, DatasetFormat, Sample};

use crate::plugins::Registry;

pub use collate::collate;
pub use encode::{
    compress_image_pads, encode_pair, encode_sample, preview, EncodeError, EncodeOptions, Encoded,
    IGNORE_INDEX,
};
pub use images::{encode_multimodal, ImageData, ImagePrep, SampleImage};
pub use layout::{Item, Layout, Prepared};

/// Every sample of `path` read by dataset plugin `plugin` configured with `config_json`.
pub fn load_samples(
    registry: &Registry,
    plugin: &str,
    config_json: &str,
    path: &Path,
    split: &str,
) -> Result<Vec<Sample>> {
    let format = registry.dataset(plugin, config_json)?;
    let source = DataSource { path: path.display().to_string(), split: split.to_string() };
    let what =
        || format!("reading {} (split `{split}`) with dataset plugin `{plugin}`", path.display());
    let reader = format.open(&source).with_context(what)?;
    let n = reader.len().with_context(what)?;
    (0..n).map(|i| reader.get(i).with_context(what)).collect()
}

/// Every row of `path` read by dataset plugin `plugin`: a sample, or why the plugin refused
/// that row (its message names the file and record). Failing to open the data (a missing
/// file or column) is an error.
pub fn read_rows(
    registry: &Registry,
    plugin: &str,
    config_json: &str,
    path: &Path,
    split: &str,
) -> Result<Vec<Result<Sample, String>>> {
    let format = registry.dataset(plugin, config_json)?;
    let source = DataSource { path: path.display().to_string(), split: split.to_string() };
    let what =
        || format!("reading {} (split `{split}`) with dataset plugin `{plugin}`", path.display());
    let reader = format.open(&source).with_context(what)?;
    let n = reader.len().with_context(what)?;
    Ok((0..n).map(|i| reader.get(i).map_err(|e| e.to_string())).collect())
}

/// Rows with a reason, one per line (at most `limit`, then a count).
pub fn rows_report(rows: &[(usize, String)], limit: usize) -> String {
    let mut lines: Vec<String> =
        rows.iter().take(limit).map(|(i, e)| format!("  row {i}: {e}")).collect();
    if rows.len() > limit {
        lines.push(format!("  … and {} more", rows.len() - limit));
    }
    lines.join("\n")
}
