//! peft's LoHa on the `loha` plugin (plugins/lycoris).
use serde_json::{Map, Value};

use super::PeftMethod;

/// `peft_type` LOHA.
pub const METHOD: PeftMethod = PeftMethod {
    peft_type: "LOHA",
    plugin: "loha",
    keys: &[
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        // no effect on linear layers (peft's too): accepted at either value
        "use_effective_conv2d",
        "target_modules",
        "init_weights",
        "modules_to_save",
    ],
    // peft 0.21.2's LoHaConfig defaults that are not null. (Its null-default keys:
    // exclude_modules, layers_to_transform, layers_pattern.)
    defaults: &[("rank_pattern", "{}"), ("alpha_pattern", "{}")],
    for_loading: lycoris_for_loading,
    layer_tensors: loha_layer_tensors,
    shape_keys: &["r"],
};

/// Saved factors replace the initial ones: start from peft's default initialisation whatever
/// the run used (`init_weights` decides no shape).
pub(crate) fn lycoris_for_loading(config: &mut Map<String, Value>) {
    config.insert("init_weights".into(), Value::Bool(true));
}

/// `r` of a LyCORIS configuration, at least 1.
pub(crate) fn rank(config: &Value) -> std::result::Result<i64, String> {
    match config.get("r").and_then(Value::as_i64) {
        Some(r) if r >= 1 => Ok(r),
        _ => Err(format!("key `r` must be a positive integer, got {:?}", config.get("r"))),
    }
}

/// A LoHa layer's saved tensors (peft's keys): `hada_w1_a` and `hada_w2_a` `[out, r]`,
/// `hada_w1_b` and `hada_w2_b` `[r, in]`.
fn loha_layer_tensors(
    config: &Value,
    _module: &str,
    out: i64,
    inp: i64,
) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    let r = rank(config)?;
    Ok(vec![
        ("hada_w1_a".to_string(), vec![out, r]),
        ("hada_w1_b".into(), vec![r, inp]),
        ("hada_w2_a".into(), vec![out, r]),
        ("hada_w2_b".into(), vec![r, inp]),
    ])
}
