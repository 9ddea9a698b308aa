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

use std::path::Path;

use anyhow::{Context, Result};
use ferrotune_plugin_api::{DataSource, DatasetFormat, Sample};

use crate::plugins::Registry;

pub use collate::collate;
pub use encode::{encode_pair, encode_sample, preview, EncodeError, EncodeOptions, Encoded, IGNORE_INDEX};

/// Every sample of `path` read by dataset plugin `plugin` configured with `config_json`.
pub fn load_samples(registry: &Registry, plugin: &str, config_json: &str, path: &Path, split: &str) -> Result<Vec<Sample>> {
    let format = registry.dataset(plugin, config_json)?;
    let source = DataSource { path: path.display().to_string(), split: split.to_string() };
    let what = || format!("reading {} (split `{split}`) with dataset plugin `{plugin}`", path.display());
    let reader = format.open(&source).with_context(what)?;
    let n = reader.len().with_context(what)?;
    (0..n).map(|i| reader.get(i).with_context(what)).collect()
}
