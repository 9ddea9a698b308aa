//! peft's prompt-learning methods (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) on the `prompt`
//! plugin crate (`prompt_tuning`, `p_tuning`, `prefix_tuning`). They adapt no layer: a saved
//! directory holds one tensor, `prompt_embeddings`, which the plugin checks by name and shape
//! when it is loaded, and which runs as a table (peft's inference mode, set for loading).
use serde_json::{Map, Value};

use super::PeftMethod;

/// The keys peft writes for every prompt-learning method (`PromptLearningConfig`), which the
/// plugins accept when they agree with the model.
macro_rules! prompt_keys {
    ($($key:literal),*) => {
        &[
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "modules_to_save",
            $($key),*
        ]
    };
}

/// `peft_type` PROMPT_TUNING.
pub const PROMPT_TUNING: PeftMethod = PeftMethod {
    peft_type: "PROMPT_TUNING",
    plugin: "prompt_tuning",
    keys: prompt_keys!(
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs"
    ),
    // peft 0.21.2's PromptTuningConfig has no non-null default beyond the implemented keys.
    defaults: &[],
    for_loading: as_saved_table,
    layer_tensors: no_layer_tensors,
    shape_keys: &["num_virtual_tokens", "token_dim"],
};

/// `peft_type` P_TUNING.
pub const P_TUNING: PeftMethod = PeftMethod {
    peft_type: "P_TUNING",
    plugin: "p_tuning",
    keys: prompt_keys!(
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout"
    ),
    defaults: &[],
    for_loading: as_saved_table,
    layer_tensors: no_layer_tensors,
    shape_keys: &["num_virtual_tokens", "token_dim"],
};

/// `peft_type` PREFIX_TUNING.
pub const PREFIX_TUNING: PeftMethod = PeftMethod {
    peft_type: "PREFIX_TUNING",
    plugin: "prefix_tuning",
    keys: prompt_keys!("prefix_projection", "encoder_hidden_size", "init_weights"),
    defaults: &[],
    for_loading: as_saved_table,
    layer_tensors: no_layer_tensors,
    shape_keys: &["num_virtual_tokens", "token_dim", "num_layers"],
};

/// A saved directory is its `prompt_embeddings` table, as peft's `PeftModel.from_pretrained`
/// runs it (`inference_mode`): P-tuning's encoder and a prefix projection are not rebuilt
/// (peft saves their output only).
fn as_saved_table(config: &mut Map<String, Value>) {
    config.insert("inference_mode".into(), Value::Bool(true));
}

/// Never called: a prompt-learning directory is checked by the plugin (it adapts no layer).
fn no_layer_tensors(
    _config: &Value,
    module: &str,
    _out: i64,
    _inp: i64,
) -> std::result::Result<Vec<(String, Vec<i64>)>, String> {
    Err(format!(
        "a prompt-learning method adapts no layer (asked for the tensors of `{module}`); its `prompt_embeddings` is checked when it is loaded"
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use std::path::Path;

    use crate::peft::plugin_config;

    /// What peft 0.21.2 writes for `PromptEncoderConfig(num_virtual_tokens=3,
    /// encoder_reparameterization_type="LSTM")` on a 2-layer Qwen2 maps onto `p_tuning` as a
    /// saved table; a key outside the row is refused by name.
    #[test]
    fn peft_s_prompt_configs_map_onto_the_prompt_plugins() {
        let written = json!({
            "auto_mapping": null, "base_model_name_or_path": null, "encoder_dropout": 0.0,
            "encoder_hidden_size": 64, "encoder_num_layers": 2, "encoder_reparameterization_type": "LSTM",
            "inference_mode": true, "modules_to_save": null, "num_attention_heads": 4, "num_layers": 2,
            "num_transformer_submodules": 1, "num_virtual_tokens": 3, "peft_type": "P_TUNING",
            "peft_version": "0.21.2", "revision": null, "task_type": "CAUSAL_LM", "token_dim": 64
        });
        let m = plugin_config(&written, Path::new("a/adapter_config.json")).unwrap();
        assert_eq!(m.plugin, "p_tuning");
        let c: Value = serde_json::from_str(&m.config_json).unwrap();
        assert_eq!(c["inference_mode"], json!(true), "a saved directory runs as its table");
        assert_eq!(c["encoder_reparameterization_type"], json!("LSTM"));
        assert_eq!(c["token_dim"], json!(64));
        for (peft_type, plugin) in
            [("PROMPT_TUNING", "prompt_tuning"), ("PREFIX_TUNING", "prefix_tuning")]
        {
            let v = json!({"peft_type": peft_type, "num_virtual_tokens": 4, "token_dim": 32});
            assert_eq!(plugin_config(&v, Path::new("c")).unwrap().plugin, plugin);
        }
        let e = plugin_config(
            &json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "r": 8}),
            Path::new("b/adapter_config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`r` = 8") && e.contains("`prefix_tuning`"), "{e}");
        let e = super::no_layer_tensors(&json!({}), "model.layers.0.self_attn.q_proj", 4, 4)
            .unwrap_err();
        assert!(e.contains("adapts no layer"), "{e}");
    }
}
