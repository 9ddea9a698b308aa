//! Text generation with a KV cache: batches of prompts of different lengths (left padding and an
//! attention mask), greedy or seeded sampling with transformers' logits warpers
//! (temperature → top-k → top-p), per-row stopping at any end-of-sequence id, and timings.
//! Qwen2-VL prompts may carry images ([`generate_mm`]): the prefill embeds them, and decode
//! steps continue the M-RoPE positions with the deltas the prefill stored in the KV cache.
//!
//! Log-probabilities ([`generate_with_logprobs`], [`token_logprobs`]) are those of the model's
//! raw distribution: `log_softmax` of the logits before temperature, top-k and top-p (vLLM's
//! default `raw_logprobs`; transformers' `generate(output_logits=True)` logits through
//! `log_softmax`), whatever the sampling settings. They cost nothing when not asked for.
pub mod pipeline;
use std::time::Instant;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::model::{ForwardArgs, VisionInputs};
use crate::peft::PeftModel;

/// How to pick each new token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// New tokens per prompt at most (the end-of-sequence token, when met, is not counted).
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling (typical 0.6–1.0).
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1.0 = off.
    pub top_p: f64,
    /// Seed of libtorch's generator (`tch::manual_seed`) when sampling.
    pub seed: u64,
    /// A row stops at the first of these ids (which is not returned). Empty = never stop early.
    pub eos_token_ids: Vec<i64>,
    /// Fills the left padding of shorter prompts and the rows that have stopped.
    pub pad_token_id: i64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("sampling: temperature must be 0 (greedy) or positive, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("sampling: top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Where the time of one [`generate_with_stats`] call went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens processed by the prefill (padding excluded).
    pub prefill_tokens: usize,
    /// Prefill forward and the choice of the first new token.
    pub prefill_seconds: f64,
    /// Tokens produced by the decode steps (after the first), over the rows still running.
    pub decode_tokens: usize,
    /// Decode forward passes (one per step, for the whole batch).
    pub decode_steps: usize,
    pub decode_seconds: f64,
}

impl GenerationStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_seconds.max(1e-12)
    }
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_seconds.max(1e-12)
    }
}

/// One generated token's log-probability under the model's raw distribution (`log_softmax`
/// of the logits, before temperature, top-k and top-p), with the most likely tokens of that
/// step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: i64,
    pub logprob: f32,
    /// The `k` most likely tokens of the step, most likely first: `(id, logprob)`.
    pub top: Vec<(i64, f32)>,
}

/// New tokens per prompt, and timings.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<Vec<i64>>,
    /// Per prompt, one entry per new token when log-probabilities were asked for
    /// ([`generate_with_logprobs`]); empty otherwise.
    pub logprobs: Vec<Vec<TokenLogprob>>,
    pub stats: GenerationStats,
}

/// Each prompt's new tokens (end-of-sequence excluded).
pub fn generate(
    model: &PeftModel,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
) -> Result<Vec<Vec<i64>>> {
    Ok(generate_with_stats(model, prompts, params)?.tokens)
}

/// [`generate`] with images (Qwen2-VL): `images` belong to the prompts in order (row 0's
/// images first, each filling the next block of `<|image_pad|>` tokens).
pub fn generate_mm(
    model: &PeftModel,
    prompts: &[Vec<i64>],
    images: Option<&VisionInputs>,
    params: &SamplingParams,
) -> Result<Vec<Vec<i64>>> {
    Ok(generate_mm_with_stats(model, prompts, images, params)?.tokens)
}

/// Applies transformers' logits warpers to `[B, V]` logits in generate's order:
/// `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` (min_tokens_to_keep 1).
/// Filtered entries become -inf.
pub fn warp_logits(logits: &Tensor, temperature: f64, top_k: usize, top_p: f64) -> Result<Tensor> {
    let mut scores = logits.f_to_kind(Kind::Float)?;
    if temperature != 1.0 && temperature > 0.0 {
        scores = scores.f_div_scalar(temperature)?;
    }
    let vocab = scores.size().last().copied().unwrap_or(0);
    if top_k > 0 && (top_k as i64) < vocab {
        let (values, _) = scores.f_topk(top_k as i64, -1, true, true)?;
        let kth = values.f_narrow(-1, top_k as i64 - 1, 1)?;
        scores = scores.f_masked_fill(&scores.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?;
    }
    if top_p < 1.0 {
        let (sorted, indices) = scores.f_sort(-1, false)?;
        let cumulative = sorted.f_softmax(-1, Kind::Float)?.f_cumsum(-1, Kind::Float)?;
        let remove_sorted = cumulative.f_le(1.0 - top_p)?;
        // Always keep the most likely token (the last one in ascending order).
        let remove_sorted = remove_sorted.f_index_fill(
            -1,
            &Tensor::from_slice(&[vocab - 1]).f_to_device(scores.device())?,
            0,
        )?;
        let remove = remove_sorted.f_scatter(-1, &indices, &remove_sorted)?;
        scores = scores.f_masked_fill(&remove, f64::NEG_INFINITY)?;
    }
    Ok(scores)
}

/// The log-probability of `chosen[i]` and the `top[i]` most likely tokens of each row `i` of
/// `[B, V]` logits whose `top[i]` is `Some` (`log_softmax` in f32 of the raw logits); `None`
/// for the other rows, which cost nothing. One transfer to the CPU for the whole batch.
pub fn token_logprobs(
    logits: &Tensor,
    chosen: &[i64],
    top: &[Option<usize>],
) -> Result<Vec<Option<TokenLogprob>>> {
    let mut out = vec![None; top.len()];
    let rows: Vec<i64> = (0..top.len()).filter(|&i| top[i].is_some()).map(|i| i as i64).collect();
    if rows.is_empty() {
        return Ok(out);
    }
    let (b, vocab) = logits.size2()?;
    if b != top.len() as i64 || chosen.len() != top.len() {
        bail!(
            "token_logprobs: {b} rows of logits, {} chosen tokens, {} rows asked",
            chosen.len(),
            top.len()
        );
    }
    let device = logits.device();
    let idx = Tensor::f_from_slice(&rows)?.f_to_device(device)?;
    let logp = logits.f_index_select(0, &idx)?.f_log_softmax(-1, Kind::Float)?;
    let picked: Vec<i64> = rows.iter().map(|&r| chosen[r as usize]).collect();
    let picked_t = Tensor::f_from_slice(&picked)?.f_to_device(device)?.f_view([-1, 1])?;
    let chosen_lp: Vec<f32> = Vec::try_from(
        &logp.f_gather(1, &picked_t, false)?.f_view([-1])?.f_to_device(Device::Cpu)?,
    )?;
    let k = rows.iter().filter_map(|&r| top[r as usize]).max().unwrap_or(0).min(vocab as usize);
    let (values, ids): (Vec<f32>, Vec<i64>) = if k > 0 {
        let (v, i) = logp.f_topk(k as i64, -1, true, true)?;
        (
            Vec::try_from(&v.f_reshape([-1])?.f_to_device(Device::Cpu)?)?,
            Vec::try_from(&i.f_reshape([-1])?.f_to_device(Device::Cpu)?)?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    for (n, &r) in rows.iter().enumerate() {
        let want = top[r as usize].unwrap_or(0).min(k);
        let top = (0..want).map(|j| (ids[n * k + j], values[n * k + j])).collect();
        out[r as usize] = Some(TokenLogprob { token_id: picked[n], logprob: chosen_lp[n], top });
    }
    Ok(out)
}

fn next_tokens(logits: &Tensor, params: &SamplingParams) -> Result<Tensor> {
    if params.is_greedy() {
        return Ok(logits.f_argmax(-1, false)?);
    }
    let scores = warp_logits(logits, params.temperature, params.top_k, params.top_p)?;
    let probs = scores.f_softmax(-1, Kind::Float)?;
    Ok(probs.f_multinomial(1, false)?.f_squeeze_dim(1)?)
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Like [`generate`], with the prefill / decode timings.
pub fn generate_with_stats(
    model: &PeftModel,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
) -> Result<Generation> {
    generate_mm_with_stats(model, prompts, None, params)
}

/// Like [`generate_mm`], with the prefill / decode timings.
pub fn generate_mm_with_stats(
    model: &PeftModel,
    prompts: &[Vec<i64>],
    images: Option<&VisionInputs>,
    params: &SamplingParams,
) -> Result<Generation> {
    run(model, prompts, images, params, None)
}

/// Like [`generate_mm_with_stats`], with each new token's log-probability and the `top` most
/// likely tokens of its step ([`TokenLogprob`]: the raw distribution, before any warper).
pub fn generate_with_logprobs(
    model: &PeftModel,
    prompts: &[Vec<i64>],
    images: Option<&VisionInputs>,
    params: &SamplingParams,
    top: usize,
) -> Result<Generation> {
    let vocab = model.config().vocab_size as usize;
    if top > vocab {
        bail!("logprobs: {top} top tokens asked but the vocabulary has {vocab}");
    }
    run(model, prompts, images, params, Some(top))
}

fn run(
    model: &PeftModel,
    prompts: &[Vec<i64>],
    images: Option<&VisionInputs>,
    params: &SamplingParams,
    top: Option<usize>,
) -> Result<Generation> {
    params.validate()?;
    let cfg = model.config();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            bail!("prompt {i} is empty: generation needs at least one prompt token");
        }
        if (p.len() + params.max_new_tokens) as i64 > cfg.max_position_embeddings {
            bail!(
                "prompt {i} has {} tokens; with max_new_tokens {} it needs {} positions but the model's context \
                 (max_position_embeddings) is {}: shorten the prompt to at most {} tokens or lower max_new_tokens",
                p.len(),
                params.max_new_tokens,
                p.len() + params.max_new_tokens,
                cfg.max_position_embeddings,
                (cfg.max_position_embeddings as usize).saturating_sub(params.max_new_tokens)
            );
        }
        if let Some(&t) = p.iter().find(|&&t| t < 0 || t >= cfg.vocab_size) {
            bail!(
                "prompt {i} holds token id {t}, outside the vocabulary (vocab_size {})",
                cfg.vocab_size
            );
        }
    }
    let batch = prompts.len();
    let mut stats = GenerationStats::default();
    if batch == 0 || params.max_new_tokens == 0 {
        return Ok(Generation {
            tokens: vec![Vec::new(); batch],
            logprobs: vec![Vec::new(); batch],
            stats,
        });
    }
    let device = model.device();
    let b = batch as i64;
    let width = max_len as i64;
    let mut ids = vec![params.pad_token_id; batch * max_len];
    let mut mask = vec![0i64; batch * max_len];
    for (i, p) in prompts.iter().enumerate() {
        let start = i * max_len + (max_len - p.len());
        ids[start..start + p.len()].copy_from_slice(p);
        mask[start..start + p.len()].iter_mut().for_each(|m| *m = 1);
    }
    stats.prefill_tokens = prompts.iter().map(Vec::len).sum();

    tch::no_grad(|| -> Result<Generation> {
        if !params.is_greedy() {
            tch::manual_seed(params.seed as i64);
        }
        let input = Tensor::f_from_slice(&ids)?.f_view([b, width])?.f_to_device(device)?;
        let mut attention = Tensor::f_from_slice(&mask)?.f_view([b, width])?.f_to_device(device)?;
        let mut cache = model.new_cache(b);
        let mut out: Vec<Vec<i64>> = vec![Vec::new(); batch];
        let mut out_logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); batch];
        let asked = vec![top; batch];
        let mut finished = vec![false; batch];

        let start = Instant::now();
        let mode = model.mode(ferrotune_plugin_api::ForwardFlags::NONE, false);
        let logits = model.forward(
            ForwardArgs::ids(&input)
                .mask(Some(&attention))
                .images(images)
                .cache(Some(&mut cache))
                .mode(mode)
                .last(),
        )?;
        attention = model.mask_after_prefill(mode.adapter, attention)?;
        let mut next = next_tokens(&logits, params)?;
        synchronize(device);
        let mut step_tokens: Vec<i64> = Vec::try_from(&next.f_to_device(Device::Cpu)?)?;
        let mut step_logprobs = match top {
            Some(_) => token_logprobs(&logits, &step_tokens, &asked)?,
            None => Vec::new(),
        };
        stats.prefill_seconds = start.elapsed().as_secs_f64();

        let decode_start = Instant::now();
        for step in 0..params.max_new_tokens {
            for (row, &tok) in step_tokens.iter().enumerate() {
                if finished[row] {
                    continue;
                }
                if step > 0 {
                    stats.decode_tokens += 1;
                }
                if params.eos_token_ids.contains(&tok) {
                    finished[row] = true;
                } else {
                    out[row].push(tok);
                    if let Some(lp) = step_logprobs.get_mut(row).and_then(Option::take) {
                        out_logprobs[row].push(lp);
                    }
                }
            }
            if step + 1 == params.max_new_tokens || finished.iter().all(|&f| f) {
                break;
            }
            // Rows that have stopped are fed padding, as transformers does.
            let fed: Vec<i64> = step_tokens
                .iter()
                .zip(&finished)
                .map(|(&t, &f)| if f { params.pad_token_id } else { t })
                .collect();
            next = Tensor::f_from_slice(&fed)?.f_view([b, 1])?.f_to_device(device)?;
            attention =
                Tensor::f_cat(&[&attention, &Tensor::f_ones([b, 1], (Kind::Int64, device))?], 1)?;
            let logits = model.forward(
                ForwardArgs::ids(&next)
                    .mask(Some(&attention))
                    .cache(Some(&mut cache))
                    .mode(model.eval_mode())
                    .last(),
            )?;
            stats.decode_steps += 1;
            step_tokens = Vec::try_from(&next_tokens(&logits, params)?.f_to_device(Device::Cpu)?)?;
            if top.is_some() {
                step_logprobs = token_logprobs(&logits, &step_tokens, &asked)?;
            }
        }
        synchronize(device);
        stats.decode_seconds = decode_start.elapsed().as_secs_f64();
        Ok(Generation { tokens: out, logprobs: out_logprobs, stats })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).reshape([1, -1])
    }

    fn kept(t: &Tensor) -> Vec<bool> {
        let v: Vec<f32> = Vec::try_from(&t.reshape([-1])).unwrap();
        v.iter().map(|x| x.is_finite()).collect()
    }

    #[test]
    fn top_k_keeps_the_k_largest() {
        let w = warp_logits(&row(&[1.0, 4.0, 3.0, 2.0]), 1.0, 2, 1.0).unwrap();
        assert_eq!(kept(&w), vec![false, true, true, false]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.25, 0.125, 0.125 (log-space logits)
        let l = row(&[0.5f32.ln(), 0.25f32.ln(), 0.125f32.ln(), 0.125f32.ln()]);
        assert_eq!(kept(&warp_logits(&l, 1.0, 0, 0.5).unwrap()), vec![true, false, false, false]);
        assert_eq!(kept(&warp_logits(&l, 1.0, 0, 0.7).unwrap()), vec![true, true, false, false]);
        // Never empty: a tiny top_p keeps the most likely token.
        assert_eq!(kept(&warp_logits(&l, 1.0, 0, 1e-6).unwrap()), vec![true, false, false, false]);
    }

    #[test]
    fn temperature_divides() {
        let w = warp_logits(&row(&[1.0, -2.0]), 0.5, 0, 1.0).unwrap();
        let v: Vec<f32> = Vec::try_from(&w.reshape([-1])).unwrap();
        assert_eq!(v, vec![2.0, -4.0]);
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax_for_the_rows_that_ask() {
        // probabilities 0.5, 0.25, 0.125, 0.125 in row 0, uniform in row 1
        let l = Tensor::from_slice(&[2.0f32, 1.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0]).view([2, 4]);
        let l = l.log_softmax(-1, Kind::Float) + 7.0; // a shift changes nothing
        let got = token_logprobs(&l, &[1, 3], &[Some(2), None]).unwrap();
        assert!(got[1].is_none());
        let r0 = got[0].as_ref().unwrap();
        let z = (2f32.exp() + 1f32.exp() + 2.0).ln();
        assert_eq!(r0.token_id, 1);
        assert!((r0.logprob - (1.0 - z)).abs() < 1e-6, "{r0:?}");
        assert_eq!(r0.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((r0.top[0].1 - (2.0 - z)).abs() < 1e-6);
        let got = token_logprobs(&l, &[0, 2], &[Some(0), Some(9)]).unwrap();
        assert!(got[0].as_ref().unwrap().top.is_empty());
        let r1 = got[1].as_ref().unwrap();
        assert_eq!(r1.top.len(), 4, "k is capped by the vocabulary");
        assert!((r1.logprob - 0.25f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn invalid_params_are_errors() {
        let p = SamplingParams { top_p: 0.0, ..SamplingParams::greedy(4) };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams { temperature: -1.0, ..SamplingParams::greedy(4) };
        assert!(p.validate().unwrap_err().to_string().contains("temperature"));
    }
}
