//! `alpaca` and `sharegpt`: LLaMA-Factory's two data set formats (see its `data/README.md`)
//! read into canonical [`Sample`]s.
//!
//! Each plugin's configuration mirrors one entry of LLaMA-Factory's `dataset_info.json`:
//! `columns` (which row keys hold what), for sharegpt `tags` (turn keys and role names),
//! `ranking` (preference pairs) and `skip_bad_rows`. Files are JSON arrays or JSON Lines,
//! told apart by content; a folder means every `.json` / `.jsonl` file in it, by name.
//! Each sample's `id` is where its row is (`file:line` or `file: record [i]`).
//!
//! * alpaca (`alpaca.rs`): instruction + input → user turn, history pairs before it,
//!   `output` → assistant turn; `chosen`/`rejected` with `ranking`.
//! * sharegpt (`sharegpt.rs`): alternating turns, observation → `tool`, function call →
//!   `assistant`; `chosen`/`rejected` turn objects with `ranking`.
//!
//! Both (`columns.rs`): a boolean `kto_tag` → `Sample::label`; `images` → `Sample::images` and
//! `videos` (video files or frame folders, LLaMA-Factory's `mllm_video_demo`) → `Sample::videos`
//! paths, relative ones joined to the data file's folder, or with the `media_dir` key (both
//! plugins; LLaMA-Factory's `media_dir`) to that folder where the file is found there;
//! `ranking` needs the `chosen` and `rejected` columns.
//! Bad rows fail with file and line, or with `skip_bad_rows` are counted (`len()` counts the
//! good rows; one summary line goes to stderr): see `source.rs`.
use std::path::PathBuf;

use ferrotune_plugin_api::prelude::*;

pub mod alpaca;
pub mod columns;
pub mod sharegpt;
pub mod source;

use alpaca::AlpacaConfig;
use sharegpt::SharegptConfig;

pub struct Alpaca(AlpacaConfig, Option<PathBuf>);

impl Plugin for Alpaca {
    const NAME: &'static str = "alpaca";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "LLaMA-Factory's alpaca format (instruction/input/output, history, ranking, KTO), JSON or JSONL";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let (config_json, media_dir) = source::media_dir(config_json)?;
        let cfg: AlpacaConfig = parse_config(&config_json)?;
        cfg.validate()?;
        Ok(Self(cfg, media_dir))
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(source::schema_with_media_dir::<AlpacaConfig>())
    }
}

impl DatasetFormat for Alpaca {
    fn open(&self, source: &DataSource) -> PluginResult<Box<dyn SampleReader>> {
        let (samples, _) =
            source::load(Self::NAME, source, self.0.skip_bad_rows, self.1.as_deref(), |row| {
                self.0.convert(row)
            })?;
        Ok(Box::new(ferrotune_plugin_api::SampleList(samples)))
    }
}

pub struct Sharegpt(SharegptConfig, Option<PathBuf>);

impl Plugin for Sharegpt {
    const NAME: &'static str = "sharegpt";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "LLaMA-Factory's sharegpt format (multi-turn, tools, ranking, KTO), JSON or JSONL";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let (config_json, media_dir) = source::media_dir(config_json)?;
        let cfg: SharegptConfig = parse_config(&config_json)?;
        cfg.validate()?;
        Ok(Self(cfg, media_dir))
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(source::schema_with_media_dir::<SharegptConfig>())
    }
}

impl DatasetFormat for Sharegpt {
    fn open(&self, source: &DataSource) -> PluginResult<Box<dyn SampleReader>> {
        let (samples, _) =
            source::load(Self::NAME, source, self.0.skip_bad_rows, self.1.as_deref(), |row| {
                self.0.convert(row)
            })?;
        Ok(Box::new(ferrotune_plugin_api::SampleList(samples)))
    }
}

export_plugin!(dataset: Alpaca, dataset: Sharegpt);

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schemas_match_the_parsers() {
        let s = assert_schema_matches::<Alpaca>(json!({}));
        assert_eq!(s["properties"]["columns"]["default"]["prompt"], "instruction");
        assert!(s["properties"]["media_dir"].is_object());
        let s = assert_schema_matches::<Sharegpt>(json!({}));
        assert_eq!(s["properties"]["tags"]["default"]["role_tag"], "from");
        assert_eq!(s["properties"]["columns"]["default"]["messages"], "conversations");
        // The nested defaults are what the parser takes, key for key.
        assert!(Sharegpt::from_config(
            &json!({"tags": s["properties"]["tags"]["default"]}).to_string()
        )
        .is_ok());
    }
}
