//! peft's LoRA (and rsLoRA, DoRA, PiSSA, OLoRA, LoftQ) on the `lora` plugin.
use serde_json::{Map, Value};

use super::PeftMethod;

/// `peft_type` LORA.
pub const METHOD: PeftMethod = PeftMethod {
    peft_type: "LORA",
    plugin: "lora",
    keys: &[
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "use_dora",
        "init_lora_weights",
        "bias",
        "fan_in_fan_out",
        "modules_to_save",
        "loftq_config",
    ],
    // peft 0.21.2's LoraConfig defaults that are not null. (Its null-default keys:
    // exclude_modules, layers_to_transform, layers_pattern, megatron_config,
    // trainable_token_indices, eva_config, corda_config, lora_ga_config, velora_config,
    // alora_invocation_tokens, monteclora_config, layer_replication, target_parameters,
    // use_bdlora, arrow_config, kasa_config.)
    defaults: &[
        ("rank_pattern", "{}"),
        ("alpha_pattern", "{}"),
        ("megatron_core", "\"megatron.core\""),
        // implemented (LoftQ), and ignored at its default
        ("loftq_config", "{}"),
        ("use_qalora", "false"),
        ("qalora_group_size", "16"),
        ("lora_bias", "false"),
        ("ensure_weight_tying", "false"),
        ("runtime_config", "{\"ephemeral_gpu_offload\": false}"),
    ],
    for_loading: lora_for_loading,
    layer_tensors: lora_layer_tensors,
    shape_keys: &["r", "use_dora"],
};

/// A LoRA layer's saved tensors (the `lora` plugin's names, peft's keys): `lora_A.weight`
/// `[r, in]`, `lora_B.weight` `[out, r]`, and DoRA's `lora_magnitude_vector` `[out]`. `r` must
/// be between 1 and min(out, in): a larger rank adds nothing a rank of min(out, in) cannot
/// express, and an absurd one would be allocated before the weights could disagree.
pub(crate) fn lora_layer_tensors(
    config: &Value,
    module: &str,
    out: i64,
    inp: i64,
) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    let r = config
        .get("r")
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("key `r` must be an integer, got {:?}", config.get("r")))?;
    if r < 1 || r > out.min(inp) {
        return Err(format!(
            "key `r` = {r} does not fit `{module}` ([{out}, {inp}]): the rank must be between 1 and min(out, in) = {}",
            out.min(inp)
        ));
    }
    let mut tensors =
        vec![("lora_A.weight".to_string(), vec![r, inp]), ("lora_B.weight".into(), vec![out, r])];
    if config.get("use_dora") == Some(&Value::Bool(true)) {
        tensors.push(("lora_magnitude_vector".into(), vec![out]));
    }
    Ok(tensors)
}

/// Saved LoRA weights replace the initial ones, so a random initialisation is replaced by the
/// default (B = 0). PiSSA, OLoRA and LoftQ are kept: they are deterministic functions of W and decide
/// the residual base weight the saved A and B were trained against (peft re-runs them on load
/// too).
fn lora_for_loading(config: &mut Map<String, Value>) {
    let keep = matches!(config.get("init_lora_weights"), Some(Value::String(s)) if ["pissa", "olora", "loftq"].contains(&s.to_ascii_lowercase().as_str()));
    if !keep {
        config.insert("init_lora_weights".into(), Value::Bool(true));
    }
}
