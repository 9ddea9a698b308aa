//! Benchmarks (commands that print numbers; never timed tests).
//!
//! `bench generate` measures prefill and decode tokens/s exactly as
//! `bench/generate_transformers.py` does for transformers, so both can be printed side by
//! side: B prompts of P ids each (id = (7919·(b·P + i) + 13) mod vocab), greedy decoding of N
//! new tokens with the KV cache and no end-of-sequence stop, best of R repeats after one
//! warm-up prefill.
use anyhow::Result;
use serde::Serialize;

use crate::generate::{generate_with_stats, SamplingParams};
use crate::model::CausalLM;

/// What to run.
#[derive(Debug, Clone)]
pub struct GenerateBench {
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub repeats: usize,
}

/// One implementation's result (the JSON line the Python side prints has the same keys).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchResult {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub threads: i32,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub dtype: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// The benchmark's prompts (shared formula with the Python side).
pub fn bench_prompts(batch: usize, prompt_len: usize, vocab: i64) -> Vec<Vec<i64>> {
    (0..batch)
        .map(|b| (0..prompt_len).map(|i| (7919 * (b * prompt_len + i) as i64 + 13) % vocab).collect())
        .collect()
}

pub fn bench_generate(model: &CausalLM, opts: &GenerateBench) -> Result<GenerateBenchResult> {
    let prompts = bench_prompts(opts.batch, opts.prompt_len, model.config().vocab_size);
    let params = SamplingParams::greedy(opts.new_tokens);
    // Warm-up: one prefill (lazy libtorch initialisation, allocator pools).
    generate_with_stats(model, &prompts, &SamplingParams::greedy(1))?;
    let (mut prefill, mut decode) = (0f64, 0f64);
    for _ in 0..opts.repeats.max(1) {
        let g = generate_with_stats(model, &prompts, &params)?;
        prefill = prefill.max(g.stats.prefill_tokens_per_second());
        decode = decode.max(g.stats.decode_tokens_per_second());
    }
    Ok(GenerateBenchResult {
        implementation: format!("ferrotune {}", env!("CARGO_PKG_VERSION")),
        threads: tch::get_num_threads(),
        batch: opts.batch,
        prompt_len: opts.prompt_len,
        new_tokens: opts.new_tokens,
        dtype: match model.dtype() {
            tch::Kind::BFloat16 => "bfloat16".into(),
            tch::Kind::Half => "float16".into(),
            _ => "float32".into(),
        },
        prefill_tok_s: prefill,
        decode_tok_s: decode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_shared_formula() {
        let p = bench_prompts(2, 3, 100);
        assert_eq!(p, vec![vec![13, 32, 51], vec![70, 89, 8]]);
    }
}
