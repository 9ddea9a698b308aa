//! Writing a model as a Hugging Face directory transformers loads (`save_pretrained`): after
//! [`PeftModel::merge_adapter`](crate::peft::PeftModel::merge_adapter) this is the merged model.
//!
//! `config.json` is the source's (with `tie_word_embeddings` set to false when a merge gave a
//! tied `lm_head` a weight of its own, and `dtype` updated when the dtype changes);
//! `model.safetensors` holds every weight under its checkpoint key, each in its dtype in the
//! source checkpoint unless one is chosen; the tokenizer files and `generation_config.json`
//! are copied (and, for Qwen2-VL, the image / video processor configs). A Qwen2-VL model is
//! written with its vision weights in the key layout transformers 5.24's `save_pretrained`
//! writes (the original one: `visual.*`, `model.layers.*`), whichever layout the source used.
//! The folder is built beside the
//! destination and renamed into place at the end; a weight holding NaN or Inf is refused by
//! name before anything is written.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::weights::checkpoint_dtypes;
use super::CausalLM;
use crate::util::safetensors;

/// Files copied from the source directory when present (tokenizer, generation defaults and
/// Qwen2-VL's processor configs).
pub const COPIED_FILES: [&str; 13] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
];

/// transformers' name of a dtype in `config.json`.
fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

impl CausalLM {
    /// Writes this model (no adapter may be attached: merge it first) as a Hugging Face
    /// directory `out_dir`, taking `config.json`, the dtypes and the tokenizer files from
    /// `source_dir` (the directory it was loaded from). `dtype` = None keeps each tensor's
    /// source dtype. `out_dir` must not exist or be empty.
    pub fn save_pretrained(
        &self,
        out_dir: &Path,
        source_dir: &Path,
        dtype: Option<Kind>,
    ) -> Result<()> {
        let attached = self
            .linears()
            .into_iter()
            .find_map(|(_, l)| l.adapter_names().chain(l.copy_names()).next().map(str::to_string));
        if let Some(name) = attached {
            bail!("save_pretrained: adapter `{name}` is still attached; merge it (merge_adapter) or save it as a PEFT directory (save_peft_adapter)");
        }
        if let Some((name, _)) = self.linears().into_iter().find(|(_, l)| l.quantized.is_some()) {
            bail!("save_pretrained: `{name}` is stored quantized; make the weights dense first (dequantize them)");
        }
        if let Some(kind) = dtype {
            super::weights::check_compute_dtype(kind)?;
        }
        if out_dir.exists()
            && std::fs::read_dir(out_dir).map(|mut d| d.next().is_some()).unwrap_or(true)
        {
            bail!(
                "{} already exists and is not empty; choose a new folder for the model",
                out_dir.display()
            );
        }
        let source_config = source_dir.join("config.json");
        let mut config: Value = serde_json::from_str(
            &std::fs::read_to_string(&source_config)
                .with_context(|| format!("cannot read {}", source_config.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", source_config.display()))?;
        let mut source_dtypes: HashMap<String, Kind> = checkpoint_dtypes(source_dir)?;
        if self.vision_config().is_some() {
            // An older Qwen2-VL source names its tensors `visual.*`, `model.layers.*`.
            source_dtypes = source_dtypes
                .into_iter()
                .map(|(k, v)| (super::qwen2vl::rename_legacy_key(&k).unwrap_or(k), v))
                .collect();
        }
        let embed_kind = source_dtypes
            .get(&format!("{}.weight", self.embed_tokens_path()))
            .copied()
            .unwrap_or(Kind::Float);

        let mut tensors = Vec::new();
        let is_vl = self.vision_config().is_some();
        for (key, t) in self.named_weights() {
            // lm_head.weight of a head untied by a merge takes the embeddings' dtype.
            let kind = dtype.or_else(|| source_dtypes.get(&key).copied()).unwrap_or(embed_kind);
            let key = if is_vl { super::qwen2vl::saved_key(&key) } else { key };
            tensors.push((
                key,
                t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(kind)?.f_contiguous()?,
            ));
        }
        // A NaN or Inf weight (a diverged adapter merged in, or an overflow of the chosen
        // dtype) is refused by name before anything is written.
        crate::peft::refuse_non_finite(&tensors, &out_dir.join(super::weights::SINGLE_FILE))?;
        let obj = config
            .as_object_mut()
            .with_context(|| format!("{}: expected a JSON object", source_config.display()))?;
        if self.config().tie_word_embeddings && !self.lm_head_is_tied() {
            obj.insert("tie_word_embeddings".into(), Value::Bool(false));
            // Pre-v5 Qwen2-VL saves may also say so inside text_config, which transformers reads.
            if let Some(text) = obj.get_mut("text_config").and_then(Value::as_object_mut) {
                text.insert("tie_word_embeddings".into(), Value::Bool(false));
            }
        }
        if let Some(kind) = dtype {
            for key in ["dtype", "torch_dtype"] {
                if obj.contains_key(key) {
                    obj.insert(key.into(), Value::String(dtype_name(kind).into()));
                }
            }
        }

        let parent =
            out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let staging = crate::util::atomic::temp_path(out_dir);
        let _ = std::fs::remove_dir_all(&staging);
        let result = (|| -> Result<()> {
            std::fs::create_dir_all(&staging)
                .with_context(|| format!("cannot create {}", staging.display()))?;
            safetensors::write(&staging.join("model.safetensors"), &tensors)?;
            std::fs::write(
                staging.join("config.json"),
                serde_json::to_string_pretty(&config)? + "\n",
            )?;
            for name in COPIED_FILES {
                let src = source_dir.join(name);
                if src.is_file() {
                    std::fs::copy(&src, staging.join(name))
                        .with_context(|| format!("cannot copy {}", src.display()))?;
                }
            }
            if out_dir.exists() {
                std::fs::remove_dir(out_dir).with_context(|| {
                    format!("cannot replace the empty folder {}", out_dir.display())
                })?;
            }
            std::fs::rename(&staging, out_dir).with_context(|| {
                format!("cannot move {} to {}", staging.display(), out_dir.display())
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result?;
        tracing::info!("wrote {} tensors to {}", tensors.len(), out_dir.display());
        Ok(())
    }
}

/// The tensors of a saved model directory by key (what tests and tools compare).
pub fn read_model_tensors(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    safetensors::read(&dir.join(super::weights::SINGLE_FILE))
}

#[cfg(test)]
mod tests {
    use crate::peft::adapters::tests::{additive, tiny_model};
    use tch::Kind;

    #[test]
    fn merged_model_round_trips_through_a_directory() {
        let root = std::env::temp_dir().join(format!("ferrotune-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let src = root.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let mut m = tiny_model(true);
        // The source directory: this model in bf16, and a tokenizer file to copy.
        let cfg = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "vocab_size": 16,
               "tie_word_embeddings": true, "rms_norm_eps": 1e-6, "dtype": "bfloat16"}"#;
        std::fs::write(src.join("config.json"), cfg).unwrap();
        std::fs::write(src.join("tokenizer.json"), "{}").unwrap();
        let bf16: Vec<_> =
            m.named_weights().into_iter().map(|(k, t)| (k, t.to_kind(Kind::BFloat16))).collect();
        crate::util::safetensors::write(&src.join("model.safetensors"), &bf16).unwrap();

        m.attach_adapter("default", additive(&["q_proj", "lm_head"])).unwrap();
        assert!(m
            .save_pretrained(&root.join("x"), &src, None)
            .unwrap_err()
            .to_string()
            .contains("merge it"));
        let sd: Vec<_> =
            m.adapter_state_dict().unwrap().into_iter().map(|(k, t)| (k, t.randn_like())).collect();
        m.load_adapter_state_dict(sd).unwrap();
        m.merge_adapter().unwrap();

        let out = root.join("merged");
        m.save_pretrained(&out, &src, None).unwrap();
        let saved = super::read_model_tensors(&out).unwrap();
        assert!(saved.iter().all(|(_, t)| t.kind() == Kind::BFloat16), "source dtype kept");
        assert!(saved.iter().any(|(k, _)| k == "lm_head.weight"), "the untied head is saved");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["tie_word_embeddings"], false);
        assert!(out.join("tokenizer.json").is_file());
        assert!(m.save_pretrained(&out, &src, None).unwrap_err().to_string().contains("not empty"));

        let out32 = root.join("merged32");
        m.save_pretrained(&out32, &src, Some(Kind::Float)).unwrap();
        let saved = super::read_model_tensors(&out32).unwrap();
        assert!(saved.iter().all(|(_, t)| t.kind() == Kind::Float));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out32.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["dtype"], "float32");
        let q = saved
            .iter()
            .find(|(k, _)| k == "model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .1
            .shallow_clone();
        assert_eq!(
            (q - &m.linears()[0].1.weight).abs().max().double_value(&[]),
            0.0,
            "the merged weight is what is saved"
        );
        std::fs::remove_dir_all(root).ok();
    }
}
