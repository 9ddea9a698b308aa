//! Quantizer plugins: how a frozen base weight is stored and applied.
//!
//! - `nf4`: QLoRA's 4-bit NormalFloat (https://arxiv.org/abs/2305.14314) in bitsandbytes'
//!   layout: block-wise absmax (block 64) over the flattened weight, two codes per byte, and
//!   double quantization of the absmax constants (8-bit dynamic map, block 256, offset = their
//!   mean). The math is `ferrotune_plugin_api::blockwise` (shared with LoftQ in `lora`).
//! - `int8`: per-row absmax int8 (bitsandbytes' `int8_vectorwise_quant`: `round(127·w/absmax)`,
//!   dequantized as `q · absmax · (1/127)`).
//!
//! Both keep only the packed weight in memory. `linear` dequantizes to the compute dtype, and
//! under autograd goes through a small libtorch autograd function (`csrc/dequant_linear.cpp`)
//! that saves the packed weight, not the dense one, for the backward pass.
//!
//! Configuration (`quantization:` in a run config; the host takes `skip_modules` itself):
//! ```text
//! {plugin: nf4, double_quant: true,   # 8-bit absmax constants: ~0.37 bit/value less
//!  blocksize: 64,                     # 32…4096, a power of two
//!  compute_dtype: null}               # float32 | bfloat16 | float16; null: the input's dtype
//! ```
use std::sync::Arc;

use ferrotune_plugin_api::blockwise::{Absmax, Nf4Tensor, NF4_BLOCKSIZE};
use ferrotune_plugin_api::prelude::*;
use serde::Deserialize;

mod dequant_linear;

use dequant_linear::Dequantize;

/// `compute_dtype`: the dtype the weight is dequantized to and the matmul runs in.
#[derive(Deserialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[serde(alias = "f32", alias = "fp32")]
    Float32,
    #[serde(alias = "bf16")]
    Bfloat16,
    #[serde(alias = "f16", alias = "fp16")]
    Float16,
}

impl ComputeDtype {
    fn kind(self) -> Kind {
        match self {
            Self::Float32 => Kind::Float,
            Self::Bfloat16 => Kind::BFloat16,
            Self::Float16 => Kind::Half,
        }
    }
}

/// `x Wᵀ` in the compute dtype (x cast to it and the result cast back, as bitsandbytes'
/// `Linear4bit` does).
fn linear_in<T: Dequantize>(
    x: &Tensor,
    stored: &Arc<T>,
    compute: Option<ComputeDtype>,
) -> PluginResult<Tensor> {
    match compute.map(ComputeDtype::kind) {
        Some(kind) if kind != x.kind() => {
            Ok(dequant_linear::linear(&x.f_to_kind(kind)?, stored)?.f_to_kind(x.kind())?)
        }
        _ => dequant_linear::linear(x, stored),
    }
}

fn shape2(weight: &Tensor, plugin: &str) -> PluginResult<(i64, i64)> {
    match weight.size().as_slice() {
        [o, i] => Ok((*o, *i)),
        other => Err(PluginError::invalid(format!(
            "{plugin}: expected a [out, in] weight, got shape {other:?}"
        ))),
    }
}

fn bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

// ---------------------------------------------------------------- nf4

/// Configuration of `nf4`.
#[derive(Deserialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct Nf4 {
    /// Quantize the absmax constants too (QLoRA's double quantization). Default true.
    #[serde(default = "default_true")]
    double_quant: bool,
    /// Values per absmax constant. Default 64 (QLoRA); a power of two in 32…4096.
    #[serde(default = "default_blocksize")]
    #[schemars(range(min = 32, max = 4096), extend("enum" = [32, 64, 128, 256, 512, 1024, 2048, 4096]))]
    blocksize: i64,
    /// Dtype of the dequantized weight and the matmul; default: the input's.
    #[serde(default)]
    compute_dtype: Option<ComputeDtype>,
}

fn default_true() -> bool {
    true
}

fn default_blocksize() -> i64 {
    NF4_BLOCKSIZE
}

impl Plugin for Nf4 {
    const NAME: &'static str = "nf4";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "QLoRA NormalFloat4, block 64, double quantization (bitsandbytes layout)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: Self = parse_config(config_json)?;
        if !(32..=4096).contains(&cfg.blocksize) || cfg.blocksize.count_ones() != 1 {
            return Err(PluginError::config(
                "blocksize",
                format!("must be a power of two in 32…4096, got {}", cfg.blocksize),
            ));
        }
        Ok(cfg)
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<Self>())
    }
}

struct Nf4Stored(Nf4Tensor);

// SAFETY: the tensors are written once (at quantization) and only read afterwards; libtorch
// tensors may be read from several threads at once.
unsafe impl Sync for Nf4Stored {}

impl Dequantize for Nf4Stored {
    fn dequantize(&self, kind: Kind) -> PluginResult<Tensor> {
        self.0.dequantize(kind)
    }
}

struct Nf4Weight {
    stored: Arc<Nf4Stored>,
    compute: Option<ComputeDtype>,
}

impl Quantizer for Nf4 {
    fn quantize(&self, _module: &str, weight: &Tensor) -> PluginResult<Box<dyn QuantizedWeight>> {
        shape2(weight, Self::NAME)?;
        let q = tch::no_grad(|| Nf4Tensor::quantize(weight, self.blocksize, self.double_quant))?;
        Ok(Box::new(Nf4Weight { stored: Arc::new(Nf4Stored(q)), compute: self.compute_dtype }))
    }
}

impl QuantizedWeight for Nf4Weight {
    fn shape(&self) -> PluginResult<Vec<i64>> {
        Ok(self.stored.0.shape.clone())
    }
    fn dequantize(&self, dtype: Kind) -> PluginResult<Tensor> {
        tch::no_grad(|| self.stored.0.dequantize(dtype))
    }
    fn linear(&self, x: &Tensor) -> PluginResult<Tensor> {
        linear_in(x, &self.stored, self.compute)
    }
    /// bitsandbytes' / transformers' names: `weight` (packed u8 `[n/2, 1]`), `weight.absmax`,
    /// `weight.quant_map`, and with double quantization `weight.nested_absmax`,
    /// `weight.nested_quant_map`, `weight.nested_offset`.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        let q = &self.stored.0;
        let device = q.packed.device();
        let mut out = vec![
            ("weight".to_string(), q.packed.f_unsqueeze(1)?),
            ("weight.quant_map".into(), ferrotune_plugin_api::blockwise::nf4_code(device)?),
        ];
        match &q.absmax {
            Absmax::Plain(a) => out.push(("weight.absmax".into(), a.shallow_clone())),
            Absmax::Double { codes, absmax2, offset } => {
                out.push(("weight.absmax".into(), codes.shallow_clone()));
                out.push(("weight.nested_absmax".into(), absmax2.shallow_clone()));
                out.push((
                    "weight.nested_quant_map".into(),
                    ferrotune_plugin_api::blockwise::dynamic_map(device)?,
                ));
                out.push(("weight.nested_offset".into(), offset.shallow_clone()));
            }
        }
        Ok(out)
    }
    fn storage_bytes(&self) -> PluginResult<u64> {
        Ok(self.stored.0.storage_bytes())
    }
}

// ---------------------------------------------------------------- int8

/// Configuration of `int8`.
#[derive(Deserialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct Int8 {
    /// Dtype of the dequantized weight and the matmul; default: the input's.
    #[serde(default)]
    compute_dtype: Option<ComputeDtype>,
}

impl Plugin for Int8 {
    const NAME: &'static str = "int8";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "int8 weights with one absmax per row (bitsandbytes' vector-wise quantization)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        parse_config(config_json)
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<Self>())
    }
}

struct Int8Stored {
    /// int8 `[out, in]`.
    q: Tensor,
    /// f32 `[out]`: each row's absmax (bitsandbytes' `SCB`).
    scb: Tensor,
}

// SAFETY: as for `Nf4Stored`: written once, then only read.
unsafe impl Sync for Int8Stored {}

/// bitsandbytes' `1/127` constant of `int8_vectorwise_dequant`.
const INV_127: f64 = 7.874015718698502e-3;

impl Int8Stored {
    fn quantize(weight: &Tensor) -> PluginResult<Self> {
        let w = weight.f_detach()?.f_to_kind(Kind::Float)?;
        let scb = w.f_abs()?.f_amax([1i64].as_slice(), false)?;
        // an all-zero row stays zero (bitsandbytes would divide by zero)
        let scale = scb
            .f_clamp_min(f32::MIN_POSITIVE as f64)?
            .f_reciprocal()?
            .f_mul_scalar(127.0)?
            .f_unsqueeze(1)?;
        let q = w.f_mul(&scale)?.f_round()?.f_to_kind(Kind::Int8)?;
        Ok(Self { q, scb })
    }
}

impl Dequantize for Int8Stored {
    fn dequantize(&self, kind: Kind) -> PluginResult<Tensor> {
        let w = self
            .q
            .f_to_kind(Kind::Float)?
            .f_mul(&self.scb.f_unsqueeze(1)?)?
            .f_mul_scalar(INV_127)?;
        Ok(w.f_to_kind(kind)?)
    }
}

struct Int8Weight {
    stored: Arc<Int8Stored>,
    compute: Option<ComputeDtype>,
}

impl Quantizer for Int8 {
    fn quantize(&self, _module: &str, weight: &Tensor) -> PluginResult<Box<dyn QuantizedWeight>> {
        shape2(weight, Self::NAME)?;
        let stored = tch::no_grad(|| Int8Stored::quantize(weight))?;
        Ok(Box::new(Int8Weight { stored: Arc::new(stored), compute: self.compute_dtype }))
    }
}

impl QuantizedWeight for Int8Weight {
    fn shape(&self) -> PluginResult<Vec<i64>> {
        Ok(self.stored.q.size())
    }
    fn dequantize(&self, dtype: Kind) -> PluginResult<Tensor> {
        tch::no_grad(|| self.stored.dequantize(dtype))
    }
    fn linear(&self, x: &Tensor) -> PluginResult<Tensor> {
        linear_in(x, &self.stored, self.compute)
    }
    /// bitsandbytes' names: `weight` (int8) and `SCB` (the row absmax).
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(vec![
            ("weight".into(), self.stored.q.shallow_clone()),
            ("SCB".into(), self.stored.scb.shallow_clone()),
        ])
    }
    fn storage_bytes(&self) -> PluginResult<u64> {
        Ok(bytes(&self.stored.q) + bytes(&self.stored.scb))
    }
}

export_plugin!(quantizer: Nf4, quantizer: Int8);

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = Nf4::from_config(r#"{"blocksize": 48}"#).err().unwrap();
        assert!(e.message().contains("`blocksize`"), "{e}");
        let e = Nf4::from_config(r#"{"double_quantization": true}"#).err().unwrap();
        assert!(e.message().contains("double_quantization"), "{e}");
        let e = Int8::from_config(r#"{"compute_dtype": "int4"}"#).err().unwrap();
        assert!(e.message().contains("compute_dtype"), "{e}");
    }

    #[test]
    fn linear_and_its_input_gradient_equal_the_dense_dequantized_weight() {
        tch::manual_seed(0);
        let w = Tensor::randn([24, 64], (Kind::Float, Device::Cpu));
        for q in [
            Nf4::from_config("{}").unwrap().quantize("m", &w).unwrap(),
            Int8::from_config("{}").unwrap().quantize("m", &w).unwrap(),
        ] {
            let dense = q.dequantize(Kind::Float).unwrap();
            let x = Tensor::randn([3, 5, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let y = q.linear(&x).unwrap();
            let x2 = x.detach().copy().set_requires_grad(true);
            let y2 = x2.linear::<Tensor>(&dense, None);
            assert!(max_diff(&y, &y2) < 1e-5);
            let g = Tensor::randn([3, 5, 24], (Kind::Float, Device::Cpu));
            (&y * &g).sum(Kind::Float).backward();
            (&y2 * &g).sum(Kind::Float).backward();
            assert!(max_diff(&x.grad(), &x2.grad()) < 1e-5);
            // and without autograd
            let y3 = tch::no_grad(|| q.linear(&x.detach()).unwrap());
            assert!(max_diff(&y3, &y2) < 1e-5);
        }
    }

    #[test]
    fn int8_round_trip_error_is_at_most_half_a_step_per_row() {
        tch::manual_seed(1);
        let w = Tensor::randn([32, 100], (Kind::Float, Device::Cpu))
            * Tensor::rand([32, 1], (Kind::Float, Device::Cpu))
            * 3.0;
        let q = Int8::from_config("{}").unwrap().quantize("m", &w).unwrap();
        let err = (q.dequantize(Kind::Float).unwrap() - &w).abs();
        let step = w.abs().amax([1i64].as_slice(), true) / 127.0;
        let excess = (err - step * 0.5 - 1e-6).max().double_value(&[]);
        assert!(excess <= 0.0, "{excess}");
        assert_eq!(q.storage_bytes().unwrap(), 32 * 100 + 32 * 4);
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schemas_match_the_parsers() {
        let s = assert_schema_matches::<Nf4>(json!({}));
        assert_eq!(s["properties"]["blocksize"]["default"], 64);
        assert_eq!(s["properties"]["double_quant"]["default"], true);
        let e = Nf4::from_config(r#"{"blocksize": 48}"#).err().unwrap().to_string();
        assert!(e.contains("blocksize"), "{e}");
        assert_schema_matches::<Int8>(json!({}));
        assert!(Int8::from_config(r#"{"compute_dtype": "bf16"}"#).is_ok());
    }
}
