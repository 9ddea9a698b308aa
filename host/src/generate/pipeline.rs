//! Text in, text out: a model directory's decoder, tokenizer, chat template and generation
//! defaults together, as `ferrotune generate` (and later `serve`) use them.
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::Message;
use tch::{Device, Kind};

use crate::data::ImagePrep;
use crate::generate::{
    generate_mm_with_stats, generate_with_logprobs, SamplingParams, TokenLogprob,
};
use crate::model::{CausalLM, VisionInputs};
use crate::peft::adapters::AttachReport;
use crate::peft::PeftModel;
use crate::plugins::Registry;
use crate::text::{GenerationConfig, Tokenizer};

/// Sampling choices from the command line or a request; `None` = the model directory's
/// `generation_config.json` default.
#[derive(Debug, Clone, Default)]
pub struct SamplingChoice {
    pub greedy: bool,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub max_new_tokens: Option<usize>,
    pub seed: u64,
}

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<i64>,
    /// One per token of `token_ids` when log-probabilities were asked for, else empty.
    pub logprobs: Vec<TokenLogprob>,
}

/// A loaded model directory ready to generate text.
pub struct TextGenerator {
    pub model: PeftModel,
    pub tokenizer: Tokenizer,
    pub generation_config: GenerationConfig,
    /// Image settings of a vision-language model (none for a text model).
    pub images: Option<ImagePrep>,
}

/// A prompt ready to generate from: token ids and the pixel values of its images and videos.
pub struct Prompt {
    pub ids: Vec<i64>,
    pub images: Option<VisionInputs>,
}

impl TextGenerator {
    pub fn load(dir: &Path, device: Device, dtype: Kind) -> Result<Self> {
        let model = PeftModel::new(CausalLM::load(dir, device, dtype)?);
        let tokenizer = Tokenizer::from_dir(dir)?;
        let generation_config =
            GenerationConfig::from_dir(dir)?.with_tokenizer_defaults(&tokenizer);
        let images = ImagePrep::for_model_dir(dir, &tokenizer)?;
        Ok(Self { model, tokenizer, generation_config, images })
    }

    /// Applies the PEFT adapter directory `adapter_dir` (unmerged: it runs beside the base
    /// weights) with the adapter plugins of `registry`; generation then goes through it.
    /// Full weights trained beside the adapter (`non_lora_state_dict.safetensors`: a VLM's
    /// merger, say) replace the base model's.
    pub fn apply_adapter(
        &mut self,
        adapter_dir: &Path,
        registry: &Registry,
    ) -> Result<AttachReport> {
        let report = self.model.load_peft_adapter(adapter_dir, registry)?;
        crate::peft::quant::apply_record(&mut self.model, adapter_dir, registry)?;
        let restored = crate::peft::non_lora::load_into(&self.model, adapter_dir)?;
        if !restored.is_empty() {
            tracing::info!("restored {} full weight(s) trained beside the adapter", restored.len());
        }
        Ok(report)
    }

    /// A prompt with images (files, in order): with `chat`, the user turn holds the images
    /// first, then the text, as Qwen2-VL's own examples do; without, each `<image>` in the
    /// text is replaced by the next image's block, and images left over go before the text.
    pub fn prompt_with_images(
        &self,
        prompt: &str,
        image_files: &[std::path::PathBuf],
        chat: bool,
        system: Option<&str>,
    ) -> Result<Prompt> {
        self.prompt_with_media(prompt, image_files, &[], chat, system)
    }

    /// [`Self::prompt_with_images`] with videos too (video files or folders of frames, in
    /// order): the user turn holds the images, then the videos, then the text; without `chat`
    /// each `<video>` in the text is replaced by the next video's block, and videos left over
    /// go before the text (after the images left over).
    pub fn prompt_with_media(
        &self,
        prompt: &str,
        image_files: &[std::path::PathBuf],
        videos: &[std::path::PathBuf],
        chat: bool,
        system: Option<&str>,
    ) -> Result<Prompt> {
        if image_files.is_empty() && videos.is_empty() {
            return Ok(Prompt { ids: self.prompt_ids(prompt, chat, system)?, images: None });
        }
        let Some(prep) = &self.images else {
            let flag = if image_files.is_empty() { "--video" } else { "--image" };
            bail!(
                "{flag} needs a vision-language model (Qwen2-VL); this model has no vision tower"
            );
        };
        if !videos.is_empty() && prep.video_pad_id().is_none() {
            bail!("--video needs a model that takes videos; this model's config.json has no video_token_id");
        }
        let mut text = prompt.to_string();
        for (placeholder, count, flag) in [
            (crate::data::images::VIDEO_PLACEHOLDER, videos.len(), "--video"),
            (crate::data::images::IMAGE_PLACEHOLDER, image_files.len(), "--image"),
        ] {
            let given = if chat { 0 } else { prompt.matches(placeholder).count() };
            if given > count {
                bail!("the prompt has {given} `{placeholder}` placeholders but only {count} {flag} value(s) were given");
            }
            text = format!("{}{text}", placeholder.repeat(count - given));
        }
        let source = |f: &std::path::PathBuf| {
            ferrotune_plugin_api::ImageSource::Path(f.display().to_string())
        };
        let mut sample = ferrotune_plugin_api::Sample {
            messages: vec![Message::new("user", text)],
            images: image_files.iter().map(source).collect(),
            videos: videos.iter().map(source).collect(),
            ..Default::default()
        };
        let (_, images) = prep.expand_with_pixels(&mut sample)?;
        let content = sample.messages.remove(0).content;
        let ids = self.prompt_ids(&content, chat, system)?;
        Ok(Prompt { ids, images })
    }

    /// Prompt token ids: the plain text with the tokenizer's special tokens, or a chat
    /// rendered by the model's template with the generation prompt appended.
    pub fn prompt_ids(&self, prompt: &str, chat: bool, system: Option<&str>) -> Result<Vec<i64>> {
        if !chat {
            if system.is_some() {
                bail!("--system needs --chat (a system prompt only exists in a chat template)");
            }
            return self.tokenizer.encode(prompt, true);
        }
        if !self.tokenizer.has_chat_template() {
            bail!("this model's tokenizer_config.json has no chat_template: drop --chat, or use a chat model");
        }
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", prompt));
        self.tokenizer.encode_chat(&messages, true).context("rendering the chat template")
    }

    /// Sampling parameters: the choice where given, else generation_config.json's defaults.
    pub fn sampling_params(&self, choice: &SamplingChoice) -> SamplingParams {
        let gc = &self.generation_config;
        let sample = !choice.greedy
            && (choice.temperature.is_some()
                || choice.top_k.is_some()
                || choice.top_p.is_some()
                || gc.do_sample);
        SamplingParams {
            max_new_tokens: choice.max_new_tokens.or(gc.max_new_tokens).unwrap_or(128),
            temperature: if sample { choice.temperature.unwrap_or(gc.temperature) } else { 0.0 },
            top_k: if sample { choice.top_k.unwrap_or(gc.top_k.max(0) as usize) } else { 0 },
            top_p: if sample { choice.top_p.unwrap_or(gc.top_p) } else { 1.0 },
            seed: choice.seed,
            eos_token_ids: gc.eos_token_ids(),
            pad_token_id: gc
                .pad_token_id
                .or_else(|| gc.eos_token_ids().first().copied())
                .unwrap_or(0),
        }
    }

    /// Generates one completion per prompt (ids), decoded without special tokens.
    pub fn complete(
        &self,
        prompts: &[Vec<i64>],
        params: &SamplingParams,
    ) -> Result<Vec<Completion>> {
        self.complete_mm(prompts, None, params)
    }

    /// [`TextGenerator::complete`] with the images of the prompts (row 0's first).
    pub fn complete_mm(
        &self,
        prompts: &[Vec<i64>],
        images: Option<&VisionInputs>,
        params: &SamplingParams,
    ) -> Result<Vec<Completion>> {
        self.finish(generate_mm_with_stats(&self.model, prompts, images, params)?)
    }

    /// [`TextGenerator::complete_mm`] with each new token's log-probability and the `top` most
    /// likely tokens of its step (the model's raw distribution, before any sampling warper).
    pub fn complete_with_logprobs(
        &self,
        prompts: &[Vec<i64>],
        images: Option<&VisionInputs>,
        params: &SamplingParams,
        top: usize,
    ) -> Result<Vec<Completion>> {
        self.finish(generate_with_logprobs(&self.model, prompts, images, params, top)?)
    }

    fn finish(&self, gen: crate::generate::Generation) -> Result<Vec<Completion>> {
        let mut logprobs = gen.logprobs.into_iter();
        gen.tokens
            .into_iter()
            .map(|ids| {
                Ok(Completion {
                    text: self.tokenizer.decode(&ids, true)?,
                    token_ids: ids,
                    logprobs: logprobs.next().unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The text of one token as OpenAI's and vLLM's logprobs show it: the token decoded alone,
    /// special tokens kept (a token that is part of a multi-byte character shows `\u{FFFD}`).
    pub fn token_text(&self, id: i64) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}
