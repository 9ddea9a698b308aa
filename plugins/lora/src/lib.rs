//! `lora`: LoRA adapters (https://arxiv.org/abs/2106.09685) and their variants, matching
//! peft 0.21 number for number and file for file.
//!
//! One method, options for the variants: rsLoRA (`use_rslora`, scale α/√r), DoRA
//! (`use_dora`, `dora.rs`), PiSSA / OLoRA / gaussian initialisations (`init_lora_weights`,
//! `init.rs`), LoRA+ (`loraplus_lr_ratio`, B's learning-rate multiplier). Layout as in peft:
//! `config.rs` (keys, validation, targeting, `adapter_config.json`), `layer.rs` (parameter
//! names, forward, merge/unmerge, delta weight), wiring here.
//!
//! State-dict names are peft's, relative to the layer: `lora_A.weight`, `lora_B.weight`,
//! `lora_magnitude_vector`; in `adapter_model.safetensors` peft prefixes them with
//! `base_model.model.<module path>.` (the host adds that prefix).
//!
//! # Inits that rewrite the base weight (PiSSA, OLoRA)
//! These start the adapter from the principal part of W and leave the base layer holding
//! the residual `W − scale·B·A`. The plugin API has no way for `adapt_linear` to hand back a
//! new base weight, so the method advertises the capability [`INIT_REWRITES_BASE`] and the
//! contract is: right after `adapt_linear`, the host replaces the base weight W by
//! `layer.unmerged_weight(W)`. That is exact, not a trick: at initialisation, W *is* the
//! merged weight of (residual base, adapter), so unmerging it gives the residual. A host that
//! ignores the capability trains from `W + scale·B·A` instead of `W`.
use ferrotune_plugin_api::prelude::*;

pub mod config;
pub mod dora;
pub mod init;
pub mod layer;

use config::LoraConfig;
use layer::LoraLayer;

/// Capability: `merged_weight` / `unmerged_weight` are exact.
pub const MERGE: &str = "merge";
/// Capability: rows of one batch may use different adapters (plain LoRA; not DoRA, whose
/// output depends on the whole weight's norm).
pub const MIXED_BATCH: &str = "mixed_batch";
/// Capability: the initialisation rewrites the base weight; after `adapt_linear` the host
/// must set the base weight to `layer.unmerged_weight(original weight)`.
pub const INIT_REWRITES_BASE: &str = "init_rewrites_base";

/// The `lora` adapter method.
pub struct Lora {
    cfg: LoraConfig,
}

impl Plugin for Lora {
    const NAME: &'static str = "lora";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "LoRA with rsLoRA, DoRA, PiSSA/OLoRA/gaussian inits and LoRA+ (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        Ok(Self { cfg: LoraConfig::from_json(config_json)? })
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<LoraConfig>())
    }
}

impl AdapterMethod for Lora {
    fn targets(&self, module: &str) -> PluginResult<bool> {
        Ok(self.cfg.targets(module))
    }
    fn adapt_linear(
        &self,
        module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>> {
        Ok(Box::new(LoraLayer::new(&self.cfg, module, base)?))
    }
    fn peft_config(&self) -> PluginResult<String> {
        serde_json::to_string_pretty(&self.cfg.peft_config())
            .map_err(|e| PluginError::runtime(e.to_string()))
    }
    fn capabilities(&self) -> Vec<String> {
        let mut caps = vec![MERGE.to_string()];
        if !self.cfg.use_dora {
            caps.push(MIXED_BATCH.into());
        }
        if self.cfg.init_lora_weights.rewrites_base() {
            caps.push(INIT_REWRITES_BASE.into());
        }
        caps
    }
}

export_plugin!(adapter: Lora);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = ferrotune_plugin_api::schema::assert_schema_matches::<Lora>(json!({}));
        let p = &s["properties"];
        assert_eq!((&p["r"]["default"], &p["r"]["minimum"]), (&json!(8), &json!(1)));
        assert_eq!(p["target_modules"]["default"], json!(["q_proj", "v_proj"]));
        assert_eq!(p["init_lora_weights"]["default"], json!(true));
        assert_eq!(p["loftq_config"]["default"], json!({"loftq_bits": 4, "loftq_iter": 1}));
        assert!(p["r"]["description"].as_str().unwrap().starts_with("Rank of the update"));
        let e = Lora::from_config(r#"{"r": 0}"#).err().unwrap().to_string();
        assert!(e.contains("`r`") && e.contains("at least 1"), "{e}");
    }

    #[test]
    fn capabilities_follow_the_variant() {
        let caps = |json: &str| Lora::from_config(json).unwrap().capabilities();
        assert_eq!(caps("{}"), vec![MERGE, MIXED_BATCH]);
        assert_eq!(caps(r#"{"use_dora": true}"#), vec![MERGE]);
        assert_eq!(
            caps(r#"{"init_lora_weights": "pissa"}"#),
            vec![MERGE, MIXED_BATCH, INIT_REWRITES_BASE]
        );
        assert_eq!(
            caps(r#"{"init_lora_weights": "olora", "use_dora": true}"#),
            vec![MERGE, INIT_REWRITES_BASE]
        );
    }

    #[test]
    fn config_errors_carry_the_key_through_the_plugin() {
        let e = Lora::from_config(r#"{"r": 0}"#).err().unwrap();
        assert_eq!(e.code, ferrotune_plugin_api::ErrorCode::CONFIG);
        assert!(e.message().contains("`r`"), "{e}");
    }
}
