//! peft's IA³ on the `ia3` plugin.
use serde_json::{Map, Value};

use super::PeftMethod;

/// `peft_type` IA3.
pub const METHOD: PeftMethod = PeftMethod {
    peft_type: "IA3",
    plugin: "ia3",
    keys: &[
        "target_modules",
        "feedforward_modules",
        "init_ia3_weights",
        "fan_in_fan_out",
        "modules_to_save",
    ],
    // peft 0.21.2's IA3Config has no non-null default beyond the implemented keys (its
    // null-default keys: exclude_modules, layers_to_transform, layers_pattern).
    defaults: &[],
    for_loading: ia3_for_loading,
    layer_tensors: ia3_layer_tensors,
    shape_keys: &["feedforward_modules"],
};

/// Saved vectors replace the initial ones: start from ones whatever the run used.
fn ia3_for_loading(config: &mut Map<String, Value>) {
    config.insert("init_ia3_weights".into(), Value::Bool(true));
}

/// An IA³ layer's saved tensor (the `ia3` plugin's name, peft's key): `ia3_l`, `[1, in]` for
/// a layer `feedforward_modules` selects (peft's rule: a list entry ends the module path, a
/// string is a regex matching all of it), `[out, 1]` otherwise.
pub(crate) fn ia3_layer_tensors(
    config: &Value,
    module: &str,
    out: i64,
    inp: i64,
) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    let feedforward = match config.get("feedforward_modules") {
        None | Some(Value::Null) => false,
        Some(Value::Array(names)) => {
            names.iter().any(|n| n.as_str().is_some_and(|n| module.ends_with(n)))
        }
        Some(Value::String(pattern)) => regex::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| {
                format!("key `feedforward_modules` = \"{pattern}\" is not a valid regex: {e}")
            })?
            .is_match(module),
        Some(other) => {
            return Err(format!(
                "key `feedforward_modules` must be a list of module names or a regex, got {other}"
            ))
        }
    };
    let shape = if feedforward { vec![1, inp] } else { vec![out, 1] };
    Ok(vec![("ia3_l".to_string(), shape)])
}
