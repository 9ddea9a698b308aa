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
        "rank_pattern",
        "alpha_pattern",
    ],
    // peft 0.21.2's LoHaConfig has no non-null default beyond the implemented keys (its
    // null-default keys: exclude_modules, layers_to_transform, layers_pattern).
    defaults: &[],
    for_loading: lycoris_for_loading,
    layer_tensors: loha_layer_tensors,
    shape_keys: &["r", "rank_pattern"],
};

/// Saved factors replace the initial ones: start from peft's default initialisation whatever
/// the run used (`init_weights` decides no shape).
pub(crate) fn lycoris_for_loading(config: &mut Map<String, Value>) {
    config.insert("init_weights".into(), Value::Bool(true));
}

/// The rank of layer `module` under a LyCORIS configuration: the value of the
/// `rank_pattern` entry whose pattern ends the module path after a dot (peft's
/// `get_pattern_key`, `(.*\.)?(pattern)$`), else `r`; at least 1. Two entries giving the layer
/// different ranks are refused (the `loha` / `lokr` plugins' rule: a JSON object does not keep
/// the order peft would pick the first by).
pub(crate) fn rank(config: &Value, module: &str) -> std::result::Result<i64, String> {
    let positive = |v: Option<&Value>, key: &str| match v.and_then(Value::as_i64) {
        Some(r) if r >= 1 => Ok(r),
        _ => Err(format!("key `{key}` must be a positive integer, got {v:?}")),
    };
    let mut hits = Vec::new();
    if let Some(patterns) = config.get("rank_pattern").and_then(Value::as_object) {
        for (pattern, value) in patterns {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| {
                format!("key `rank_pattern`: `{pattern}` is not a valid pattern: {e}")
            })?;
            if re.is_match(module) {
                hits.push((pattern, positive(Some(value), "rank_pattern")?));
            }
        }
    }
    match hits.as_slice() {
        [] => positive(config.get("r"), "r"),
        [(_, r), rest @ ..] if rest.iter().all(|h| h.1 == *r) => Ok(*r),
        _ => Err(format!(
            "key `rank_pattern`: patterns {} all match `{module}` with different ranks",
            hits.iter().map(|(p, r)| format!("`{p}` ({r})")).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// A LoHa layer's saved tensors (peft's keys): `hada_w1_a` and `hada_w2_a` `[out, r]`,
/// `hada_w1_b` and `hada_w2_b` `[r, in]`.
fn loha_layer_tensors(
    config: &Value,
    module: &str,
    out: i64,
    inp: i64,
) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    let r = rank(config, module)?;
    Ok(vec![
        ("hada_w1_a".to_string(), vec![out, r]),
        ("hada_w1_b".into(), vec![r, inp]),
        ("hada_w2_a".into(), vec![out, r]),
        ("hada_w2_b".into(), vec![r, inp]),
    ])
}
