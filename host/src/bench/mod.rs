//! Benchmarks (commands that print numbers; never timed tests).
//!
//! `bench generate` measures prefill and decode tokens/s exactly as
//! `bench/generate_transformers.py` does for transformers, so both can be printed side by
//! side: B prompts of P ids each (id = (7919·(b·P + i) + 13) mod vocab), greedy decoding of N
//! new tokens with the KV cache and no end-of-sequence stop, best of R repeats after one
//! warm-up prefill.
//!
//! `bench train` ([`train`]) measures LoRA SFT training exactly as
//! `bench/train_transformers.py` does for transformers + peft, through the trainer's own
//! [`crate::train::Run::step`], with a roofline ([`roofline`]); `make bench-train` prints them
//! side by side. `bench memory` ([`memory`]) measures the memory plugins' per-rank memory.
pub mod memory;
pub mod roofline;
pub mod train;
use anyhow::Result;
use serde::Serialize;
use tch::Kind;

use crate::generate::{generate_with_stats, SamplingParams};
use crate::peft::PeftModel;
pub use train::{
    bench_train, bench_train_items, read_lengths, varlen_train_items, BenchSource, TrainBench,
    TrainBenchError, TrainBenchResult,
};

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
    bench_rows(0, batch, prompt_len, vocab)
}

/// Rows `first … first + rows − 1` of the shared formula: id = (7919·(row·len + i) + 13) mod vocab.
pub fn bench_rows(first: usize, rows: usize, len: usize, vocab: i64) -> Vec<Vec<i64>> {
    (first..first + rows)
        .map(|r| (0..len).map(|i| (7919 * (r * len + i) as i64 + 13) % vocab).collect())
        .collect()
}

pub fn bench_generate(model: &PeftModel, opts: &GenerateBench) -> Result<GenerateBenchResult> {
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
        dtype: dtype_name(model.dtype()),
        prefill_tok_s: prefill,
        decode_tok_s: decode,
    })
}

pub(crate) fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::BFloat16 => "bfloat16".into(),
        Kind::Half => "float16".into(),
        _ => "float32".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_shared_formula() {
        let p = bench_prompts(2, 3, 100);
        assert_eq!(p, vec![vec![13, 32, 51], vec![70, 89, 8]]);
        assert_eq!(bench_rows(1, 1, 3, 100), vec![vec![70, 89, 8]]);
    }
}
