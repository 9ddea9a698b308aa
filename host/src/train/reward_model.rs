//! A trained reward model as a reward of the run (`rewards: [{model: DIR, adapter: DIR,
//! weight}]`), beside the reward plugins: a `…ForSequenceClassification` directory (its
//! `score.weight`), or a causal-LM directory with a sequence-classification adapter (peft's
//! `SEQ_CLS` task, what `objective: reward_model` saves), scoring each completion with its
//! score head at the last token, as TRL's PPO asks its reward model.
//!
//! Each completion is encoded as the reward model was trained on it: the sample's prompt
//! turns (the canonical sample each reward input carries) followed by the completion as the
//! final assistant turn, through the reward model's own tokenizer and chat template, exactly
//! as the preference-pairs layout encodes a chosen row. An input without its sample is scored
//! on `prompt + completion` as text. Prompts with images are refused by name: the reward
//! model reads text.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{RewardInput, Sample};
use tch::{Device, Kind, Tensor};

use crate::data::{self, EncodeOptions};
use crate::model::{CausalLM, ForwardArgs};
use crate::peft::PeftModel;
use crate::plugins::Registry;
use crate::text::Tokenizer;

/// A reward model loaded for scoring (frozen, evaluation mode).
pub struct RewardModel {
    model: PeftModel,
    tokenizer: Tokenizer,
    dir: PathBuf,
    cutoff_len: usize,
}

/// Rows scored per forward.
const SCORE_BATCH: usize = 8;

impl RewardModel {
    /// Loads `dir` (and the SEQ_CLS `adapter`, if given) on `device` in `dtype`; sequences are
    /// cut to `cutoff_len` tokens as the run's own.
    pub fn load(
        dir: &Path,
        adapter: Option<&Path>,
        device: Device,
        dtype: Kind,
        registry: &Registry,
        cutoff_len: usize,
    ) -> Result<Self> {
        let base = CausalLM::load(dir, device, dtype)
            .with_context(|| format!("loading the reward model {}", dir.display()))?;
        let mut model = PeftModel::new(base);
        if let Some(a) = adapter {
            model
                .load_reward_adapter(a, registry)
                .with_context(|| format!("loading the reward model's adapter {}", a.display()))?;
        }
        if model.score_head().is_none() {
            bail!(
                "{}{}: not a reward model: it has no score head (`score.weight` of a …ForSequenceClassification checkpoint) \
                 and no sequence-classification adapter (task_type SEQ_CLS, as `objective: reward_model` saves)",
                dir.display(),
                adapter.map(|a| format!(" + {}", a.display())).unwrap_or_default()
            );
        }
        let tokenizer = Tokenizer::from_dir(dir)
            .with_context(|| format!("the reward model's tokenizer ({})", dir.display()))?;
        Ok(Self { model, tokenizer, dir: dir.to_path_buf(), cutoff_len })
    }

    /// The token ids the reward model reads for one input (see the module docs).
    fn encode(&self, input: &RewardInput) -> Result<Vec<i64>> {
        let sample: Option<Sample> = if input.sample_json.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&input.sample_json).context("its sample is not valid JSON")?)
        };
        let Some(mut sample) = sample else {
            let text = format!("{}{}", input.prompt, input.completion);
            return self.tokenizer.encode(&text, false);
        };
        if !sample.images.is_empty() || !sample.videos.is_empty() {
            bail!("its prompt holds images or videos, and a reward model scores text only");
        }
        // The prompt turns: a trailing assistant turn (the reference answer) is not part of it.
        if sample.messages.last().is_some_and(|m| m.role == "assistant") {
            sample.messages.pop();
        }
        sample.chosen = None;
        sample.rejected = None;
        sample.label = None;
        sample
            .messages
            .push(ferrotune_plugin_api::Message::new("assistant", input.completion.as_str()));
        let opts = EncodeOptions {
            cutoff_len: self.cutoff_len,
            train_on_prompt: false,
            mask_history: true,
        };
        Ok(data::encode_multimodal(&self.tokenizer, None, sample, &opts)?.input_ids)
    }

    /// One score per input, in order (finite, or an error naming the input).
    pub fn score(&self, inputs: &[RewardInput]) -> Result<Vec<f64>> {
        let rows = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let ids = self.encode(input).with_context(|| {
                    format!("reward model {}: completion {i}", self.dir.display())
                })?;
                if ids.is_empty() {
                    bail!(
                        "reward model {}: completion {i} encodes to no token",
                        self.dir.display()
                    );
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let pad = self.tokenizer.pad_token_id().or(self.tokenizer.eos_token_id()).unwrap_or(0);
        let device = self.model.device();
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(SCORE_BATCH) {
            let width = chunk.iter().map(Vec::len).max().unwrap_or(1);
            let mut ids = Vec::with_capacity(chunk.len() * width);
            let mut mask = Vec::with_capacity(chunk.len() * width);
            let mut last = Vec::with_capacity(chunk.len());
            for r in chunk {
                ids.extend(r.iter().copied().chain(std::iter::repeat_n(pad, width - r.len())));
                mask.extend((0..width).map(|j| i64::from(j < r.len())));
                last.push(r.len() as i64 - 1);
            }
            let b = chunk.len() as i64;
            let ids = Tensor::from_slice(&ids).view([b, width as i64]).to_device(device);
            let mask = Tensor::from_slice(&mask).view([b, width as i64]).to_device(device);
            // Right padding, positions from 0: each row's score at its last token.
            let scores = tch::no_grad(|| -> Result<Tensor> {
                let mode = self.model.eval_mode();
                let hidden = self
                    .model
                    .forward(ForwardArgs::ids(&ids).mask(Some(&mask)).mode(mode).hidden())?;
                let per_position = self.model.scores(&hidden, mode)?;
                let idx = Tensor::from_slice(&last).to_device(device).unsqueeze(1);
                Ok(per_position.f_gather(1, &idx, false)?.f_squeeze_dim(1)?)
            })?;
            let v = Vec::<f64>::try_from(&scores.to_kind(Kind::Double).to_device(Device::Cpu))?;
            if let Some(i) = v.iter().position(|s| !s.is_finite()) {
                bail!(
                    "reward model {}: a non-finite score ({}) for completion {}",
                    self.dir.display(),
                    v[i],
                    out.len() + i
                );
            }
            out.extend(v);
        }
        Ok(out)
    }
}
