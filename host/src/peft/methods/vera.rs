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
