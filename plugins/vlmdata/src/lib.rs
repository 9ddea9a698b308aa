//! `llava` and `storyreasoning`: vision-language data set formats read into canonical
//! [`Sample`](ferrotune_plugin_api::Sample)s whose user turns hold one `<image>` per image.
//!
//! * llava (`llava.rs`): Qwen2-VL-Finetune's LLaVA-style JSON (`id`, `image`,
//!   `conversations` of `{from, value}` turns; `prompt`/`chosen`/`rejected` for DPO), image
//!   paths joined to `image_folder`. Files are read when the split is opened; each row is
//!   converted (and checked) when it is asked for, so the host can stop or skip a bad row.
//! * storyreasoning (`storyreasoning.rs`): the Hugging Face parquet of
//!   daniel3303/StoryReasoning (`story_id`, `images` with embedded bytes, `frame_count`,
//!   `chain_of_thought`, `story`), shaped as its authors trained on it: a system prompt, a
//!   user turn with one `<image>` per frame, and `<think>\n{cot}\n</think>\n{story}`.
//!
//! The host decodes the images (checking that files exist), expands `<image>` into the
//! model's vision tokens and applies `extra.image_min_pixels` / `extra.image_max_pixels`.
use ferrotune_plugin_api::prelude::*;

pub mod llava;
pub mod storyreasoning;

use llava::LlavaConfig;
use storyreasoning::StoryReasoningConfig;

pub struct Llava(LlavaConfig);

impl Plugin for Llava {
    const NAME: &'static str = "llava";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Qwen2-VL-Finetune / LLaVA JSON (id, image, conversations; prompt/chosen/rejected), JSON or JSONL";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: LlavaConfig = parse_config(config_json)?;
        cfg.validate()?;
        Ok(Self(cfg))
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<LlavaConfig>())
    }
}

impl DatasetFormat for Llava {
    fn open(&self, source: &DataSource) -> PluginResult<Box<dyn SampleReader>> {
        Ok(Box::new(llava::LlavaReader::open(&self.0, source)?))
    }
}

pub struct StoryReasoning(StoryReasoningConfig);

impl Plugin for StoryReasoning {
    const NAME: &'static str = "storyreasoning";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "StoryReasoning's Hugging Face parquet (frames as embedded images, chain of thought + grounded story)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: StoryReasoningConfig = parse_config(config_json)?;
        cfg.validate()?;
        Ok(Self(cfg))
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<StoryReasoningConfig>())
    }
}

impl DatasetFormat for StoryReasoning {
    fn open(&self, source: &DataSource) -> PluginResult<Box<dyn SampleReader>> {
        Ok(Box::new(storyreasoning::StoryReader::open(&self.0, source)?))
    }
}

export_plugin!(dataset: Llava, dataset: StoryReasoning);

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schemas_match_the_parsers() {
        let s = assert_schema_matches::<Llava>(json!({}));
        assert_eq!(s["properties"]["columns"]["default"]["conversations"], "conversations");
        assert_eq!(s["properties"]["strip_image_newlines"]["default"], true);
        let s = assert_schema_matches::<StoryReasoning>(json!({}));
        assert_eq!(s["properties"]["max_images"]["minimum"], 1);
    }
}
