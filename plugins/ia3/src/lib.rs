//! `ia3`: IA³ adapters (https://arxiv.org/abs/2205.05638), learned vectors that rescale a
//! linear layer's output (or, for feed-forward layers, its input), matching peft 0.21 number
//! for number and file for file. `config.rs` (keys, validation, targeting,
//! `adapter_config.json`), `layer.rs` (forward, merge), wiring here.
//!
//! State-dict name per layer: `ia3_l` (`[out, 1]`, or `[1, in]` for a feed-forward layer); in
//! `adapter_model.safetensors` peft prefixes it with `base_model.model.<module path>.`.
//!
//! Merge: as peft, the weight is scaled along the right axis (`merged_weight`) and, for an
//! output scaling, the bias too (`merged_bias`: `bias · l`); an input scaling leaves the bias
//! alone.
use ferrotune_plugin_api::prelude::*;

pub mod config;
pub mod layer;

use config::Ia3Config;
use layer::Ia3Layer;

/// Capability: `merged_weight` / `unmerged_weight` are available (see the module docs).
pub const MERGE: &str = "merge";

/// The `ia3` adapter method.
pub struct Ia3 {
    cfg: Ia3Config,
}

impl Plugin for Ia3 {
    const NAME: &'static str = "ia3";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "IA³ rescaling vectors (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        Ok(Self { cfg: Ia3Config::from_json(config_json)? })
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<Ia3Config>())
    }
}

impl AdapterMethod for Ia3 {
    fn targets(&self, module: &str) -> PluginResult<bool> {
        Ok(self.cfg.targets(module))
    }
    fn adapt_linear(
        &self,
        module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>> {
        let layer =
            Ia3Layer::new(module, base, self.cfg.is_feedforward(module), self.cfg.init_ia3_weights)
                .map_err(|e| e.context(format!("layer `{module}`")))?;
        Ok(Box::new(layer))
    }
    fn peft_config(&self) -> PluginResult<String> {
        serde_json::to_string_pretty(&self.cfg.peft_config())
            .map_err(|e| PluginError::runtime(e.to_string()))
    }
    fn capabilities(&self) -> Vec<String> {
        vec![MERGE.to_string()]
    }
}

export_plugin!(adapter: Ia3);

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<Ia3>(json!({}));
        let p = &s["properties"];
        assert_eq!(p["target_modules"]["default"], json!(["k_proj", "v_proj", "down_proj"]));
        assert_eq!(p["feedforward_modules"]["default"], json!(["down_proj"]));
        assert_eq!(p["init_ia3_weights"]["default"], json!(true));
        let e = Ia3::from_config(r#"{"fan_in_fan_out": true}"#).err().unwrap().to_string();
        assert!(e.contains("fan_in_fan_out"), "{e}");
    }
}
