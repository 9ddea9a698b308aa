//! `loha` and `lokr`: the LyCORIS adapters of peft 0.21, matching it number for number and
//! file for file. LoHa (https://arxiv.org/abs/2108.06098) adds `ΔW = (W1a·W1b) ⊙ (W2a·W2b) ·
//! alpha / r`, a Hadamard product of two rank-r products (rank up to r²); LoKr
//! (https://arxiv.org/abs/2309.14859) adds `ΔW = W1 ⊗ W2 · alpha / r`, a Kronecker product
//! whose factors split the layer's widths (`decompose_factor`) and are stored whole or as
//! rank-r products (`decompose_both`, and `r` below half a factor's larger side).
//! `config.rs` (keys, validation, targeting, `adapter_config.json`), `shapes.rs` (peft's
//! factor names and shapes, `factorization`), `layer.rs` (forward, dropouts, merge).
//!
//! State-dict names per layer: `hada_w1_a` `[out, r]`, `hada_w1_b` `[r, in]`, `hada_w2_a`,
//! `hada_w2_b`; `lokr_w1` or `lokr_w1_a` / `lokr_w1_b`, `lokr_w2` or `lokr_w2_a` / `lokr_w2_b`.
//! In `adapter_model.safetensors` peft prefixes them with `base_model.model.<module path>.`.
//!
//! Merge: exact, `W + ΔW` (peft's `get_delta_weight`); the forward is the base output plus a
//! part computed from `x` alone, so rows of one batch may run different adapters.
use ferrotune_plugin_api::prelude::*;

pub mod config;
pub mod layer;
pub mod shapes;

use config::{LycorisConfig, Method};
use layer::LycorisLayer;

/// Capability: `merged_weight` / `unmerged_weight` are exact.
pub const MERGE: &str = "merge";
/// Capability: the forward is `base(x)` plus a part computed from `x` alone.
pub const MIXED_BATCH: &str = "mixed_batch";

fn adapt(
    cfg: &LycorisConfig,
    module: &str,
    base: &dyn BaseLinear,
) -> PluginResult<Box<dyn AdapterLayer>> {
    let layer =
        LycorisLayer::new(cfg, module, base).map_err(|e| e.context(format!("layer `{module}`")))?;
    Ok(Box::new(layer))
}

fn peft_config(cfg: &LycorisConfig) -> PluginResult<String> {
    serde_json::to_string_pretty(&cfg.peft_config())
        .map_err(|e| PluginError::runtime(e.to_string()))
}

fn capabilities() -> Vec<String> {
    vec![MERGE.to_string(), MIXED_BATCH.to_string()]
}

/// The keys only `lokr` takes.
const LOKR_ONLY: [&str; 3] = ["decompose_both", "decompose_factor", "rank_dropout_scale"];

/// The `loha` adapter method (peft's `LOHA`).
pub struct LoHa {
    cfg: LycorisConfig,
}

impl Plugin for LoHa {
    const NAME: &'static str = "loha";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "LoHa: low-rank Hadamard product updates (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        Ok(Self { cfg: LycorisConfig::from_json(config_json, Method::LoHa)? })
    }
    /// LoKr's keys and `init_weights: "lycoris"` are LoKr's only.
    fn config_schema() -> Option<serde_json::Value> {
        let mut s = schema_of::<LycorisConfig>();
        if let Some(props) = s["properties"].as_object_mut() {
            for key in LOKR_ONLY {
                props.remove(key);
            }
            props["init_weights"]["anyOf"] = serde_json::json!([{"type": "boolean"}]);
        }
        Some(s)
    }
}

impl AdapterMethod for LoHa {
    fn targets(&self, module: &str) -> PluginResult<bool> {
        Ok(self.cfg.targets(module))
    }
    fn adapt_linear(
        &self,
        module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>> {
        adapt(&self.cfg, module, base)
    }
    fn peft_config(&self) -> PluginResult<String> {
        peft_config(&self.cfg)
    }
    fn capabilities(&self) -> Vec<String> {
        capabilities()
    }
}

/// The `lokr` adapter method (peft's `LOKR`).
pub struct LoKr {
    cfg: LycorisConfig,
}

impl Plugin for LoKr {
    const NAME: &'static str = "lokr";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "LoKr: low-rank Kronecker product updates (peft-compatible)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        Ok(Self { cfg: LycorisConfig::from_json(config_json, Method::LoKr)? })
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<LycorisConfig>())
    }
}

impl AdapterMethod for LoKr {
    fn targets(&self, module: &str) -> PluginResult<bool> {
        Ok(self.cfg.targets(module))
    }
    fn adapt_linear(
        &self,
        module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>> {
        adapt(&self.cfg, module, base)
    }
    fn peft_config(&self) -> PluginResult<String> {
        peft_config(&self.cfg)
    }
    fn capabilities(&self) -> Vec<String> {
        capabilities()
    }
}

export_plugin!(adapter: LoHa, adapter: LoKr);

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schemas_match_the_parsers() {
        let loha = assert_schema_matches::<LoHa>(json!({}));
        let lokr = assert_schema_matches::<LoKr>(json!({}));
        for key in LOKR_ONLY {
            assert!(loha["properties"].get(key).is_none() && lokr["properties"].get(key).is_some());
            let e = LoHa::from_config(&json!({key: 2}).to_string()).err().unwrap().to_string();
            assert!(e.contains(key), "{e}");
        }
        assert!(LoHa::from_config(r#"{"init_weights": "lycoris"}"#).is_err());
        assert!(LoKr::from_config(r#"{"init_weights": "lycoris"}"#).is_ok());
        let p = &lokr["properties"];
        assert_eq!((&p["r"]["default"], &p["r"]["minimum"]), (&json!(8), &json!(1)));
        assert_eq!(
            (&p["init_weights"]["default"], &p["rank_pattern"]["default"]),
            (&json!(true), &json!({}))
        );
        let e =
            LoKr::from_config(r#"{"rank_pattern": {"down_proj": 0}}"#).err().unwrap().to_string();
        assert!(e.contains("rank_pattern"), "{e}");
    }
}
