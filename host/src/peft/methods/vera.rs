//! peft's VeRA on the `vera` plugin.
use serde_json::{Map, Value};

use super::PeftMethod;

/// `peft_type` VERA.
pub const METHOD: PeftMethod = PeftMethod {
    peft_type: "VERA",
    plugin: "vera",
    keys: &[
        "r",
        "target_modules",
        "projection_prng_key",
        "save_projection",
        "vera_dropout",
        "d_initial",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
        "init_weights",
    ],
    // peft 0.21.2's VeraConfig has no non-null default beyond the implemented keys (its
    // null-default keys: layers_to_transform, layers_pattern).
    defaults: &[],
    for_loading: vera_for_loading,
    layer_tensors: vera_layer_tensors,
    shape_keys: &["r", "save_projection"],
};

/// Saved vectors replace the initial ones: start from peft's default whatever the run used.
fn vera_for_loading(config: &mut Map<String, Value>) {
    config.insert("init_weights".into(), Value::Bool(true));
}

/// A VeRA layer's saved tensors (the `vera` plugin's names, peft's keys): `vera_lambda_b`
/// `[out]`, `vera_lambda_d` `[r]` and, with `save_projection` (default true), the part of the
/// shared projections the layer reads, `base_model.vera_A` `[r, in]` and `base_model.vera_B`
/// `[out, r]` (shared state: the saved tensors cover the largest layer).
pub(crate) fn vera_layer_tensors(
    config: &Value,
    _module: &str,
    out: i64,
    inp: i64,
) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    let r = match config.get("r") {
        None => 256,
        Some(v) => v
            .as_i64()
            .filter(|r| *r >= 1)
            .ok_or_else(|| format!("key `r` must be a positive integer, got {v}"))?,
    };
    let mut tensors =
        vec![("vera_lambda_b".to_string(), vec![out]), ("vera_lambda_d".to_string(), vec![r])];
    if config.get("save_projection") != Some(&Value::Bool(false)) {
        tensors.push(("base_model.vera_A".into(), vec![r, inp]));
        tensors.push(("base_model.vera_B".into(), vec![out, r]));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::peft::plugin_config;

    /// What peft 0.21.2's `VeraConfig(r=8, target_modules=["q_proj", "v_proj"],
    /// init_weights=False).to_dict()` holds.
    fn peft_written() -> Value {
        json!({
            "task_type": "CAUSAL_LM", "peft_type": "VERA", "auto_mapping": null, "peft_version": "0.21.2",
            "base_model_name_or_path": "/m", "revision": null, "inference_mode": true, "r": 8,
            "target_modules": ["v_proj", "q_proj"], "projection_prng_key": 0, "save_projection": true,
            "vera_dropout": 0.0, "d_initial": 0.1, "fan_in_fan_out": false, "bias": "none",
            "modules_to_save": null, "init_weights": false, "layers_to_transform": null, "layers_pattern": null
        })
    }

    #[test]
    fn vera_configs_map_onto_the_vera_plugin() {
        let path = Path::new("a/adapter_config.json");
        let m = plugin_config(&peft_written(), path).unwrap();
        assert_eq!((m.plugin.as_str(), m.peft_type), ("vera", Some("VERA")));
        let c: Value = serde_json::from_str(&m.config_json).unwrap();
        assert_eq!(c["init_weights"], json!(true), "saved vectors replace the initial ones");
        assert_eq!(c["save_projection"], json!(true));
        let mut bad = peft_written();
        bad["layers_to_transform"] = json!([0]);
        let e = plugin_config(&bad, path).unwrap_err().to_string();
        assert!(e.contains("`layers_to_transform` = [0]") && e.contains("`vera`"), "{e}");

        let names = |c: &Value| -> Vec<(String, Vec<i64>)> {
            vera_layer_tensors(c, "model.layers.0.self_attn.v_proj", 32, 64).unwrap()
        };
        assert_eq!(
            names(&c),
            vec![
                ("vera_lambda_b".to_string(), vec![32]),
                ("vera_lambda_d".into(), vec![8]),
                ("base_model.vera_A".into(), vec![8, 64]),
                ("base_model.vera_B".into(), vec![32, 8]),
            ]
        );
        assert_eq!(names(&json!({"r": 8, "save_projection": false})).len(), 2);
        assert_eq!(names(&json!({}))[1].1, vec![256], "peft's default r");
        let e = vera_layer_tensors(&json!({"r": 0}), "m", 32, 64).unwrap_err();
        assert!(e.contains("`r`"), "{e}");
    }
}
