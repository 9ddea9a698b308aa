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
