//! `ferrotune bench serve`: decode throughput of one batch of N requests all on one adapter
//! against the same N requests spread over N different adapters (the S-LoRA comparison), and
//! the base model alone, with the engine's own prefill, batch joining and decode step.
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::engine::{decode_step, join_rows};
use crate::model::linear::LinearMode;
use crate::model::{CausalLM, ForwardArgs};
use crate::peft::PeftModel;
use crate::plugins::Registry;

/// What `bench serve` runs.
#[derive(Debug, Clone)]
pub struct ServeBench {
    /// Requests in the batch (and adapters in the mixed case).
    pub requests: usize,
    pub prompt_len: usize,
    /// Decode steps timed.
    pub new_tokens: usize,
    /// LoRA rank of the adapters (all linear layers).
    pub rank: i64,
    /// The best of this many runs is reported.
    pub repeats: usize,
}

/// One JSON line of results.
#[derive(Debug, Clone, Serialize)]
pub struct ServeBenchResult {
    pub device: String,
    pub requests: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub lora_r: i64,
    /// Decode tokens/s of the batch with no adapter.
    pub base_tokens_per_s: f64,
    /// All rows on one adapter.
    pub one_adapter_tokens_per_s: f64,
    /// Each row on its own adapter (mixed batch).
    pub n_adapters_tokens_per_s: f64,
    /// `n_adapters / one_adapter`.
    pub mixed_over_one: f64,
    /// The same N requests on N adapters without mixed batches: each decoded alone (batch 1),
    /// what a server that groups rows by adapter does when every request has its own.
    pub n_adapters_one_by_one_tokens_per_s: f64,
    /// `n_adapters / n_adapters_one_by_one`: what mixing buys.
    pub mixed_over_one_by_one: f64,
}

/// Prefills each row alone (as the engine admits requests), joins them, then times
/// `new_tokens` greedy decode steps with the rows' adapters. Returns decode tokens/s.
fn time_decode(
    model: &PeftModel,
    prompts: &[Vec<i64>],
    names: &[Option<&str>],
    new_tokens: usize,
) -> Result<f64> {
    tch::no_grad(|| {
        let device = model.device();
        let mut cache = model.new_cache(0);
        let mut mask = None;
        let mut tokens = Vec::new();
        for (p, name) in prompts.iter().zip(names) {
            let l = p.len() as i64;
            let input = Tensor::f_from_slice(p)?.f_view([1, l])?.f_to_device(device)?;
            let m = Tensor::f_ones([1, l], (Kind::Int64, device))?;
            let mut c = model.new_cache(1);
            let mode = LinearMode { adapter: *name, train: false, rows: None };
            let logits = model.forward(
                ForwardArgs::ids(&input).mask(Some(&m)).cache(Some(&mut c)).mode(mode).last(),
            )?;
            tokens.push(logits.f_argmax(-1, false)?.f_int64_value(&[0])?);
            let m = model.mask_after_prefill(*name, m)?;
            join_rows(&mut cache, &mut mask, c, m)?;
        }
        let mut mask = mask.expect("at least one request");
        let start = Instant::now();
        for _ in 0..new_tokens {
            let logits = decode_step(model, &mut cache, &mut mask, &tokens, names)?;
            tokens = Vec::try_from(&logits.f_argmax(-1, false)?.f_to_device(Device::Cpu)?)?;
        }
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok((prompts.len() * new_tokens) as f64 / start.elapsed().as_secs_f64().max(1e-9))
    })
}

/// Runs `bench serve` on the model directory `dir`: attaches `requests` LoRA adapters with
/// random non-zero factors, then measures the three batches.
pub fn bench_serve(
    dir: &Path,
    registry: &Registry,
    device: Device,
    dtype: Kind,
    opts: &ServeBench,
) -> Result<ServeBenchResult> {
    anyhow::ensure!(
        opts.requests >= 1 && opts.prompt_len >= 1 && opts.new_tokens >= 1,
        "bench serve needs requests, prompt_len and new_tokens ≥ 1"
    );
    tch::manual_seed(0);
    let mut model = PeftModel::new(CausalLM::load(dir, device, dtype)?);
    let names: Vec<String> = (0..opts.requests).map(|i| format!("a{i}")).collect();
    let lora = serde_json::json!({"r": opts.rank, "lora_alpha": 2 * opts.rank, "target_modules": "all-linear"}).to_string();
    for name in &names {
        model.attach_adapter(name, Box::new(registry.adapter("lora", &lora)?))?;
        model.set_active_adapter(Some(name))?;
        let state = model
            .adapter_state_dict()?
            .into_iter()
            .map(|(k, t)| (k, t.randn_like() * 0.05))
            .collect();
        model.load_adapter_state_dict(state)?;
    }
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<i64>> = (0..opts.requests)
        .map(|r| {
            (0..opts.prompt_len).map(|i| ((r * 7919 + i * 104_729) as i64 + 3) % vocab).collect()
        })
        .collect();
    let base: Vec<Option<&str>> = vec![None; opts.requests];
    let one: Vec<Option<&str>> = vec![Some(names[0].as_str()); opts.requests];
    let many: Vec<Option<&str>> = names.iter().map(|n| Some(n.as_str())).collect();
    let best = |rows: &[Option<&str>]| -> Result<f64> {
        let mut best = 0f64;
        for _ in 0..opts.repeats.max(1) {
            best = best.max(time_decode(&model, &prompts, rows, opts.new_tokens)?);
        }
        Ok(best)
    };
    let base_tps = best(&base)?;
    let one_tps = best(&one)?;
    let many_tps = best(&many)?;
    let mut one_by_one = 0f64;
    for _ in 0..opts.repeats.max(1) {
        let mut secs = 0.0;
        for (p, name) in prompts.iter().zip(&many) {
            secs += opts.new_tokens as f64
                / time_decode(
                    &model,
                    std::slice::from_ref(p),
                    std::slice::from_ref(name),
                    opts.new_tokens,
                )?;
        }
        one_by_one = one_by_one.max((opts.requests * opts.new_tokens) as f64 / secs);
    }
    Ok(ServeBenchResult {
        device: format!("{device:?}").to_lowercase(),
        requests: opts.requests,
        prompt_len: opts.prompt_len,
        new_tokens: opts.new_tokens,
        lora_r: opts.rank,
        base_tokens_per_s: base_tps,
        one_adapter_tokens_per_s: one_tps,
        n_adapters_tokens_per_s: many_tps,
        mixed_over_one: many_tps / one_tps,
        n_adapters_one_by_one_tokens_per_s: one_by_one,
        mixed_over_one_by_one: many_tps / one_by_one,
    })
}
