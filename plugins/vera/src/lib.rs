//! `vera`: VeRA adapters (https://arxiv.org/abs/2310.11454), a pair of frozen random
//! projections shared by every adapted layer and, per layer, two trained scaling vectors,
//! matching peft 0.21 number for number and file for file. `config.rs` (keys, validation,
//! targeting, `adapter_config.json`), `projection.rs` (torch's generator and peft's
//! kaiming-uniform projections, reproduced exactly), `layer.rs` (forward, merge), wiring here.
//!
//! State-dict names per layer: `vera_lambda_b` (`[out]`) and `vera_lambda_d` (`[r]`), saved by
//! peft as `base_model.model.<module path>.vera_lambda_b`; with `save_projection` (the
//! default) the projections too, once, as `base_model.vera_A` (`[r, largest in]`) and
//! `base_model.vera_B` (`[largest out, r]`): the method's own tensors (`root_state_dict`),
//! generated in `begin` from the targeted layers' sizes, as peft's `_find_dim` sizes them.
//!
//! Merge: `W + (λ_b ⊙ B) (λ_d ⊙ A)`, the bias untouched (peft's `get_delta_weight`). The
//! forward is the base output plus a part computed from the input alone, so rows of one batch
//! may use different VeRA adapters (`mixed_batch`).
use std::sync::Arc;

use ferrotune_plugin_api::prelude::*;

pub mod config;
pub mod layer;
pub mod projection;

use config::VeraConfig;
use layer::{Projections, VeraLayer};

/// Capability: `merged_weight` / `unmerged_weight` are exact.
pub const MERGE: &str = "merge";
/// Capability: rows of one batch may run different adapters.
pub const MIXED_BATCH: &str = "mixed_batch";

/// The `vera` adapter method: its configuration and the adapter's shared projections.
pub struct Vera {
    cfg: VeraConfig,
    shared: Arc<Projections>,
}

impl Plugin for Vera {
    const NAME: &'static str = "vera";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "VeRA shared random projections (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg = VeraConfig::from_json(config_json)?;
        let shared = Arc::new(Projections::new(&cfg));
        Ok(Self { cfg, shared })
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<VeraConfig>())
    }
}

impl AdapterMethod for Vera {
    fn begin(&self, model: &ModelInfo) -> PluginResult<()> {
        let layers: Vec<(i64, i64)> = model.linears.iter().map(|(_, o, i)| (*o, *i)).collect();
        self.shared.begin(&layers)
    }
    fn targets(&self, module: &str) -> PluginResult<bool> {
        Ok(self.cfg.targets(module))
    }
    fn adapt_linear(
        &self,
        module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>> {
        let layer = VeraLayer::new(module, base, &self.cfg, self.shared.clone())
            .map_err(|e| e.context(format!("layer `{module}`")))?;
        Ok(Box::new(layer))
    }
    fn peft_config(&self) -> PluginResult<String> {
        serde_json::to_string_pretty(&self.cfg.peft_config())
            .map_err(|e| PluginError::runtime(e.to_string()))
    }
    fn capabilities(&self) -> Vec<String> {
        vec![MERGE.to_string(), MIXED_BATCH.to_string()]
    }
    /// The projections, saved with `save_projection` (peft's default); otherwise loading
    /// regenerates them from `projection_prng_key`, as peft does.
    fn root_state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        if self.cfg.save_projection {
            self.shared.state()
        } else {
            Ok(Vec::new())
        }
    }
    fn load_root_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        if !self.cfg.save_projection {
            if let Some((k, _)) = tensors.first() {
                return Err(PluginError::invalid(format!(
                    "`{k}`: save_projection is false, the projections come from projection_prng_key"
                )));
            }
            return Ok(());
        }
        self.shared.load(tensors)
    }
}

export_plugin!(adapter: Vera);

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<Vera>(json!({}));
        let p = &s["properties"];
        assert_eq!((&p["r"]["default"], &p["r"]["minimum"]), (&json!(256), &json!(1)));
        assert_eq!(p["d_initial"]["default"], json!(0.1));
        let e = Vera::from_config(r#"{"r": 0}"#).err().unwrap().to_string();
        assert!(e.contains("`r`"), "{e}");
    }
}
