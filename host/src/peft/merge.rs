//! `ferrotune merge`: a PEFT adapter directory merged into its base model, written as a
//! Hugging Face model directory that transformers loads. Quantized runs (QLoRA) merge into
//! the original or the dequantized base and report the merge's error on a probe batch.
use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::{Device, Kind};

use super::adapters::AttachReport;
use super::quant::{self, MergeBase, MergeError, QuantizationRecord};
use super::{non_lora, PeftModel};
use crate::model::CausalLM;
use crate::plugins::Registry;

/// What to merge and where to write it.
pub struct MergeOptions {
    /// The base model directory.
    pub model: PathBuf,
    /// The PEFT adapter directory (a run's output or a checkpoint).
    pub adapter: PathBuf,
    /// The new model directory (absent or empty).
    pub out: PathBuf,
    /// Where the merge is computed.
    pub device: Device,
    /// dtype of the written weights (`None`: each weight's dtype in the base model).
    pub dtype: Option<Kind>,
    /// Quantized runs: merge into the original or the dequantized base (default dequantized).
    pub merge_base: Option<MergeBase>,
}

/// What [`merge`] did.
pub struct MergeReport {
    /// The adapter as it was attached.
    pub attach: AttachReport,
    /// The full weights trained beside the adapter that were put back first.
    pub restored: Vec<String>,
    /// The modules whose weights the merge changed.
    pub merged: Vec<String>,
    /// Whether the merge gave a tied `lm_head` a weight of its own.
    pub untied_lm_head: bool,
    /// For a quantized run: its record and the merge's error against the quantized model.
    pub quantized: Option<(QuantizationRecord, MergeError)>,
}

/// Merges `opts.adapter` into `opts.model` and writes the result to `opts.out`.
pub fn merge(opts: &MergeOptions, registry: &Registry) -> Result<MergeReport> {
    let out = &opts.out;
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!(
            "{} already exists and is not empty; choose a new folder for the merged model",
            out.display()
        );
    }
    let mut model = PeftModel::new(CausalLM::load(&opts.model, opts.device, Kind::Float)?);
    let attach = model.load_reward_adapter(&opts.adapter, registry)?;
    let restored = non_lora::load_into(&model, &opts.adapter)?;
    let (merged, quantized) = match quant::read_record(&opts.adapter)? {
        None => {
            if opts.merge_base.is_some() {
                bail!(
                    "--merge-base: {} has no {}: its run did not quantize the base",
                    opts.adapter.display(),
                    quant::QUANTIZATION_FILE
                );
            }
            (model.merge_adapter()?, None)
        }
        Some(record) => {
            let originals = quant::dense_weights_of(&model, &record);
            quant::apply_record(&mut model, &opts.adapter, registry)?;
            let modules = model
                .adapted_modules()
                .into_iter()
                .chain(model.saved_modules())
                .map(str::to_string)
                .collect();
            let error = quant::merge_quantized(
                &mut model,
                originals,
                opts.merge_base.unwrap_or(MergeBase::Dequantized),
            )?;
            (modules, Some((record, error)))
        }
    };
    model.save_pretrained(out, &opts.model, opts.dtype)?;
    let untied_lm_head = !model.lm_head_is_tied() && model.config().tie_word_embeddings;
    Ok(MergeReport { attach, restored, merged, untied_lm_head, quantized })
}
