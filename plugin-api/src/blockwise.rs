//! Block-wise absmax quantization math in bitsandbytes' layouts, shared by the plugins that
//! need it (the `nf4` quantizer stores weights with it; the `lora` plugin's LoftQ
//! initialisation quantizes residuals with it). Pure libtorch ops, no ABI surface.
//!
//! What is reproduced, from bitsandbytes 0.50 (`functional.quantize_4bit` /
//! `dequantize_4bit` and its pure-torch `default` backend kernels):
//! - the NF4 code book ([`NF4_CODE`], the QLoRA paper's 16 NormalFloat values);
//! - 4-bit quantization: per block of `blocksize` values (the flattened weight, a last
//!   partial block allowed) `absmax = max |x|`, `x · (1/absmax)` clamped to [−1, 1], the
//!   nearest code (`bucketize` over the midpoints, a tie going to the lower code), two codes
//!   per byte with the first value in the high nibble;
//! - double quantization (`compress_statistics=True`): the absmax constants minus their mean
//!   (`offset`) quantized to 8 bits with the signed dynamic map
//!   ([`dynamic_map`], `create_dynamic_map()`) in blocks of 256, keeping one f32 absmax per
//!   256 constants.
//!
//! bitsandbytes' CPU C kernel for the 8-bit step finds codes with an approximate binary search
//! (`BinSearch` Direct2); its `default` torch backend and ours take the nearest code. Both
//! layouts and dequantized formulas are the same.
use tch::{Device, Kind, Tensor};

use crate::PluginResult;

/// The NF4 code book (bitsandbytes `get_4bit_type("nf4")`), sorted. The literals are
/// bitsandbytes' own, digit for digit; each rounds to the f32 it uses.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Block size of the 4-bit weights (QLoRA's 64).
pub const NF4_BLOCKSIZE: i64 = 64;
/// Block size of the double-quantized absmax constants (bitsandbytes' 256).
pub const DOUBLE_QUANT_BLOCKSIZE: i64 = 256;

/// The NF4 code book as an f32 tensor on `device`.
pub fn nf4_code(device: Device) -> PluginResult<Tensor> {
    Ok(Tensor::f_from_slice(&NF4_CODE)?.f_to(device)?)
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`), 256 sorted f32 values in [−0.993, 1]. Computed with
/// the same f32 tensor ops as bitsandbytes, so the values are bit-identical.
pub fn dynamic_map(device: Device) -> PluginResult<Tensor> {
    let mut parts = Vec::new();
    for i in 0..7i32 {
        let items = (1i64 << i) + 1;
        let bounds = Tensor::f_linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu))?;
        let means = (bounds.f_narrow(0, 0, items - 1)? + bounds.f_narrow(0, 1, items - 1)?)
            .f_div_scalar(2.0)?;
        let scale = 10f64.powi(i - 6);
        parts.push(means.f_mul_scalar(scale)?);
        parts.push(means.f_mul_scalar(-scale)?);
    }
    parts.push(Tensor::f_from_slice(&[0f32, 1.0])?);
    let (sorted, _) = Tensor::f_cat(&parts, 0)?.f_sort(0, false)?;
    Ok(sorted.f_to(device)?)
}

/// Midpoints between neighbouring codes of a sorted code book (the `bucketize` bounds).
fn midpoints(code: &Tensor) -> PluginResult<Tensor> {
    let n = code.size1()?;
    Ok((code.f_narrow(0, 0, n - 1)? + code.f_narrow(0, 1, n - 1)?).f_div_scalar(2.0)?)
}

/// Block-wise absmax quantization of a flat tensor to the indices of the nearest values of
/// `code` (sorted): `(codes u8 [n], absmax f32 [ceil(n / blocksize)])`. bitsandbytes'
/// `quantize_blockwise` / `quantize_4bit` arithmetic: full blocks scale by `x · (1/absmax)`,
/// a last partial block by `x / absmax`; an all-zero block keeps absmax 0.
pub fn quantize_blockwise(
    values: &Tensor,
    code: &Tensor,
    blocksize: i64,
) -> PluginResult<(Tensor, Tensor)> {
    let flat = values.f_reshape([-1])?.f_to_kind(Kind::Float)?;
    let n = flat.size1()?;
    let full = n - n % blocksize;
    let mut absmaxes = Vec::new();
    let mut scaled = Vec::new();
    if full > 0 {
        let blocks = flat.f_narrow(0, 0, full)?.f_reshape([full / blocksize, blocksize])?;
        let absmax = blocks.f_abs()?.f_amax([1i64].as_slice(), false)?;
        let inv = absmax.f_clamp_min(1e-38)?.f_reciprocal()?.f_unsqueeze(1)?;
        scaled.push(blocks.f_mul(&inv)?.f_clamp(-1.0, 1.0)?.f_reshape([-1])?);
        absmaxes.push(absmax);
    }
    if full < n {
        let tail = flat.f_narrow(0, full, n - full)?;
        let am = tail.f_abs()?.f_max()?.f_clamp_min(1e-38)?;
        scaled.push(tail.f_div(&am)?.f_clamp(-1.0, 1.0)?);
        // bitsandbytes stores the clamped value for a partial block.
        absmaxes.push(am.f_unsqueeze(0)?);
    }
    let scaled = Tensor::f_cat(&scaled, 0)?;
    let codes = scaled.f_bucketize(&midpoints(code)?, true, false)?.f_to_kind(Kind::Uint8)?;
    Ok((codes, Tensor::f_cat(&absmaxes, 0)?))
}

/// The inverse of [`quantize_blockwise`]: `code[codes] · absmax` per block, f32 `[n]`.
pub fn dequantize_blockwise(
    codes: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    blocksize: i64,
) -> PluginResult<Tensor> {
    let n = codes.size1()?;
    let values = code.f_index_select(0, &codes.f_to_kind(Kind::Int64)?)?;
    let blocks = (n + blocksize - 1) / blocksize;
    let padded = values.f_constant_pad_nd([0, blocks * blocksize - n].as_slice())?;
    let out = padded.f_reshape([blocks, blocksize])?.f_mul(&absmax.f_unsqueeze(1)?)?;
    Ok(out.f_reshape([-1])?.f_narrow(0, 0, n)?)
}

/// Two 4-bit codes per byte, the first in the high nibble (an odd count is padded with
/// `pad`, the code of 0.0 in NF4).
pub fn pack_nibbles(codes: &Tensor, pad: u8) -> PluginResult<Tensor> {
    let n = codes.size1()?;
    let codes = if n % 2 == 1 {
        Tensor::f_cat(
            &[codes.shallow_clone(), Tensor::f_from_slice(&[pad])?.f_to(codes.device())?],
            0,
        )?
    } else {
        codes.shallow_clone()
    };
    let pairs = codes.f_reshape([-1, 2])?;
    let hi = pairs.f_select(1, 0)?.f_bitwise_left_shift_tensor_scalar(4)?;
    let lo = pairs.f_select(1, 1)?;
    Ok(hi.f_bitwise_or_tensor(&lo)?)
}

/// The inverse of [`pack_nibbles`]: `n` codes as u8.
pub fn unpack_nibbles(packed: &Tensor, n: i64) -> PluginResult<Tensor> {
    let hi = packed.f_bitwise_right_shift_tensor_scalar(4)?;
    let lo = packed.f_bitwise_and(0x0F)?;
    Ok(Tensor::f_stack(&[hi, lo], 1)?.f_reshape([-1])?.f_narrow(0, 0, n)?)
}

/// The absmax constants of an NF4 weight: plain f32, or double-quantized.
#[derive(Debug)]
pub enum Absmax {
    Plain(Tensor),
    /// bitsandbytes' nested state: 8-bit codes of `absmax − offset` (dynamic map, blocks of
    /// 256), their per-256 absmax and the offset (the mean of the constants).
    Double {
        codes: Tensor,
        absmax2: Tensor,
        offset: Tensor,
    },
}

/// An NF4-quantized tensor: packed codes and absmax constants (bitsandbytes' `Params4bit`
/// data and `QuantState`).
#[derive(Debug)]
pub struct Nf4Tensor {
    /// The dense shape.
    pub shape: Vec<i64>,
    /// Codes, two per byte, `[ceil(n / 2)]` u8.
    pub packed: Tensor,
    pub absmax: Absmax,
    pub blocksize: i64,
}

impl Nf4Tensor {
    /// NF4-quantizes `weight` (any shape, flattened in row-major order) in blocks of
    /// `blocksize`, double-quantizing the absmax constants when asked.
    pub fn quantize(weight: &Tensor, blocksize: i64, double_quant: bool) -> PluginResult<Self> {
        let code = nf4_code(weight.device())?;
        let (codes, absmax) = quantize_blockwise(&weight.f_detach()?, &code, blocksize)?;
        let packed = pack_nibbles(&codes, 7)?;
        let absmax = if double_quant {
            let offset = absmax.f_mean(Kind::Float)?;
            let (codes, absmax2) = quantize_blockwise(
                &absmax.f_sub(&offset)?,
                &dynamic_map(weight.device())?,
                DOUBLE_QUANT_BLOCKSIZE,
            )?;
            Absmax::Double { codes, absmax2, offset }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self { shape: weight.size(), packed, absmax, blocksize })
    }

    /// The absmax constants as f32 (dequantized when double-quantized).
    pub fn absmax_f32(&self) -> PluginResult<Tensor> {
        match &self.absmax {
            Absmax::Plain(a) => Ok(a.shallow_clone()),
            Absmax::Double { codes, absmax2, offset } => {
                let map = dynamic_map(codes.device())?;
                Ok(dequantize_blockwise(codes, absmax2, &map, DOUBLE_QUANT_BLOCKSIZE)?
                    .f_add(offset)?)
            }
        }
    }

    /// The 4-bit codes, one per value (u8 `[n]`).
    pub fn codes(&self) -> PluginResult<Tensor> {
        unpack_nibbles(&self.packed, self.numel())
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// The dense tensor in `kind` (computed in f32, then cast, as bitsandbytes does).
    pub fn dequantize(&self, kind: Kind) -> PluginResult<Tensor> {
        let code = nf4_code(self.packed.device())?;
        let flat =
            dequantize_blockwise(&self.codes()?, &self.absmax_f32()?, &code, self.blocksize)?;
        Ok(flat.f_reshape(self.shape.as_slice())?.f_to_kind(kind)?)
    }

    /// Bytes held: packed codes and the absmax state.
    pub fn storage_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        bytes(&self.packed)
            + match &self.absmax {
                Absmax::Plain(a) => bytes(a),
                Absmax::Double { codes, absmax2, offset } => {
                    bytes(codes) + bytes(absmax2) + bytes(offset)
                }
            }
    }
}

/// One NF4 quantize/dequantize round trip in `weight`'s dtype, without double quantization:
/// what LoftQ uses as its quantizer (peft's `loftq_init` with bitsandbytes'
/// `Params4bit(compress_statistics=False, quant_type="nf4")`).
pub fn nf4_round_trip(weight: &Tensor, blocksize: i64) -> PluginResult<Tensor> {
    Nf4Tensor::quantize(weight, blocksize, false)?.dequantize(weight.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn dynamic_map_has_256_sorted_distinct_values_from_minus_one_to_one() {
        let m = dynamic_map(Device::Cpu).unwrap();
        assert_eq!(m.size(), vec![256]);
        let v: Vec<f32> = Vec::try_from(&m).unwrap();
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(v[255], 1.0);
        assert!((v[0] + 0.99297).abs() < 1e-4, "{}", v[0]);
        assert!(v.contains(&0.0));
    }

    #[test]
    fn codes_of_the_code_book_are_themselves_and_pack_round_trips() {
        // each code value times a block absmax of 1 quantizes to its own index
        let mut vals: Vec<f32> = NF4_CODE.to_vec();
        vals.extend(NF4_CODE.iter().rev());
        let w = Tensor::from_slice(&vals).view([2, 16]);
        let q = Nf4Tensor::quantize(&w, 32, false).unwrap();
        let codes: Vec<u8> = Vec::try_from(&q.codes().unwrap()).unwrap();
        let want: Vec<u8> = (0..16).chain((0..16).rev()).collect();
        assert_eq!(codes, want);
        assert_eq!(max_diff(&q.dequantize(Kind::Float).unwrap(), &w), 0.0);
        let odd = Tensor::from_slice(&[1u8, 15, 0, 7, 9]);
        assert_eq!(
            max_diff(
                &unpack_nibbles(&pack_nibbles(&odd, 7).unwrap(), 5).unwrap().to_kind(Kind::Float),
                &odd.to_kind(Kind::Float)
            ),
            0.0
        );
        let packed: Vec<u8> = Vec::try_from(&pack_nibbles(&odd, 7).unwrap()).unwrap();
        assert_eq!(packed, vec![0x1F, 0x07, 0x97]);
    }

    #[test]
    fn round_trip_error_is_within_half_the_widest_code_gap() {
        tch::manual_seed(0);
        let w = Tensor::randn([48, 200], (Kind::Float, Device::Cpu));
        for dq in [false, true] {
            let q = Nf4Tensor::quantize(&w, 64, dq).unwrap();
            let absmax = q.absmax_f32().unwrap();
            assert_eq!(absmax.size(), vec![(48 * 200 + 63) / 64]);
            let err = (q.dequantize(Kind::Float).unwrap() - &w).abs().max().double_value(&[]);
            // widest gap 1 − 0.7230; absmax ≤ max |w|; double quant adds a little
            let bound = (1.0 - 0.7229568) / 2.0
                * w.abs().max().double_value(&[])
                * if dq { 1.02 } else { 1.0 }
                + 1e-6;
            assert!(err <= bound, "double_quant {dq}: {err} > {bound}");
        }
        let q = Nf4Tensor::quantize(&w, 64, true).unwrap();
        assert!(
            q.storage_bytes() < (48 * 200 / 2 + 48 * 200 / 64 * 2) as u64,
            "{}",
            q.storage_bytes()
        );
    }

    #[test]
    fn requantizing_a_dequantized_weight_is_lossless_without_double_quant() {
        tch::manual_seed(1);
        let w = Tensor::randn([16, 128], (Kind::Float, Device::Cpu));
        let q = nf4_round_trip(&w, 64).unwrap();
        assert_eq!(max_diff(&nf4_round_trip(&q, 64).unwrap(), &q), 0.0);
    }
}
