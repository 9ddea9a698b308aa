//! Roofline of `bench train`: the FLOPs one LoRA training step does and the matmul FLOP/s this
//! machine reaches, so a result reports `mfu` = achieved / measured (on CUDA: / measured too,
//! `scripts/gpu-bench.sh` also divides by the card's datasheet peak).
//!
//! The step's FLOPs for LoRA on a frozen base (`bench/train_transformers.py` uses the same
//! formula), with N the non-embedding weights of the decoder's linear layers, A the adapter's
//! weights, H the hidden size, V the vocabulary, L the layers, d = heads · head_dim the
//! attention width, n the tokens of the step (padding not counted) and h the tokens that reach
//! the head:
//!
//! ```text
//! base    forward 2·N·n  +  input gradients 2·N·n   (frozen: no weight gradients)
//! head    forward 2·H·V·h + input gradients 2·H·V·h
//! adapter forward + backward 6·A·n
//! attention  per sequence of length T: forward 4·L·T·d per token (QKᵀ and AV) = 4·L·d·T²,
//!         causal halves it (2·L·d·T²), backward twice the forward (4·L·d·T²): 6·L·d·T²
//! ```
//!
//! i.e. `4·N·n + 4·H·V·h + 6·A·n + 6·L·d·Σ T²`. ferrotune's `sft` computes the head only at
//! label positions (h = label tokens); transformers' forward computes it at every token.
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::model::LlamaConfig;

/// The sizes the FLOP formula reads from a model's config.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    /// Weights of the decoder layers' linear layers (q, k, v, o, gate, up, down).
    pub non_embedding: f64,
    pub hidden: f64,
    pub vocab: f64,
    pub layers: f64,
    /// heads · head_dim.
    pub attention_width: f64,
}

impl ModelShape {
    pub fn of(cfg: &LlamaConfig) -> Self {
        let (h, hd) = (cfg.hidden_size as f64, cfg.head_dim() as f64);
        let q = cfg.num_attention_heads as f64 * hd;
        let kv = cfg.num_kv_heads() as f64 * hd;
        let attention = h * q + 2.0 * h * kv + q * h;
        let mlp = 3.0 * h * cfg.intermediate_size as f64;
        Self {
            non_embedding: cfg.num_hidden_layers as f64 * (attention + mlp),
            hidden: h,
            vocab: cfg.vocab_size as f64,
            layers: cfg.num_hidden_layers as f64,
            attention_width: q,
        }
    }

    /// FLOPs of one training step (see the module docs): `tokens` the step's tokens (padding
    /// not counted), `squares` Σ T² over its sequences, `head_tokens` the positions that
    /// reach the head, `adapter` the adapter's weights.
    pub fn step_flops(&self, tokens: f64, squares: f64, head_tokens: f64, adapter: f64) -> f64 {
        let n = tokens;
        4.0 * self.non_embedding * n
            + 4.0 * self.hidden * self.vocab * head_tokens
            + 6.0 * adapter * n
            + 6.0 * self.layers * self.attention_width * squares
    }
}

/// The best FLOP/s of a few `size × size` matmuls in `kind` on `device`, at the current
/// intra-op thread count (one untimed warm-up first).
pub fn measured_matmul_flops(device: Device, kind: Kind, size: i64) -> Result<f64> {
    let opts = (kind, device);
    let a = Tensor::f_randn([size, size], opts)?;
    let b = Tensor::f_randn([size, size], opts)?;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut best = f64::INFINITY;
    for round in 0..4 {
        sync();
        let started = Instant::now();
        let c = a.f_matmul(&b)?;
        sync();
        drop(c);
        if round > 0 {
            best = best.min(started.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (size as f64).powi(3) / best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_follow_the_written_formula() {
        let shape = ModelShape {
            non_embedding: 10.0,
            hidden: 2.0,
            vocab: 5.0,
            layers: 3.0,
            attention_width: 4.0,
        };
        // 4·10·(3+1) + 4·2·5·2 + 6·7·4 + 6·3·4·(9+1)
        assert_eq!(shape.step_flops(4.0, 10.0, 2.0, 7.0), 160.0 + 80.0 + 168.0 + 720.0);
    }

    #[test]
    fn shape_counts_the_decoder_linear_weights() {
        let cfg = LlamaConfig::from_json(
            r#"{"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 64}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let s = ModelShape::of(&cfg);
        // head_dim 2: q 8·8, k and v 8·4 each, o 8·8; mlp 3·8·16.
        assert_eq!(s.non_embedding, 2.0 * (64.0 + 32.0 + 32.0 + 64.0 + 384.0));
        assert_eq!(s.attention_width, 8.0);
    }

    #[test]
    fn matmul_rate_is_positive_and_finite() {
        let f = measured_matmul_flops(Device::Cpu, Kind::Float, 64).unwrap();
        assert!(f.is_finite() && f > 0.0, "{f}");
    }
}
