//! The attention pattern of a forward call and scaled dot-product attention over it.
//!
//! * No padding, no cache: SDPA's causal kernel with native grouped-query attention.
//! * Right-padded training batches take the same kernel: under a causal mask no real token
//!   attends a pad that follows it, so the pads need no mask (their own outputs are never
//!   used: they carry no label). Left padding (generation) keeps an explicit mask.
//! * Packed rows (several samples per row, position ids restarting at 0 at each sample, no
//!   attention mask): causal attention inside each sample, never across, without a dense
//!   `[T, T]` mask: one causal SDPA call per sample ([`Mask::Segments`]).
//! * Anything else (padding with a cache, sliding windows over padding): an explicit boolean
//!   mask, keys and values repeated for the grouped heads.
use std::sync::Arc;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Per batch row, the samples of a packed row as `(start, len)`, in order, covering the row.
pub type Segments = Arc<Vec<Vec<(i64, i64)>>>;

/// The attention pattern of one forward call, shared by the layers of one kind.
pub enum Mask {
    /// Every cached key is visible (a single new token, no padding, no window).
    All,
    /// Plain causal from position 0 (no cache, no padding, no window): SDPA's `is_causal`.
    Causal,
    /// `[B or 1, 1, T, S]` booleans, true = attend.
    Explicit(Tensor),
    /// Packed rows: causal within each segment only.
    Segments(Segments),
}

impl Mask {
    pub fn shallow_clone(&self) -> Self {
        match self {
            Mask::All => Mask::All,
            Mask::Causal => Mask::Causal,
            Mask::Explicit(t) => Mask::Explicit(t.shallow_clone()),
            Mask::Segments(s) => Mask::Segments(s.clone()),
        }
    }
}

/// What decides the attention pattern of a forward call.
#[derive(Clone, Copy)]
pub struct Pattern<'a> {
    /// `[B, S]`, false = padding that must be masked.
    pub key_valid: Option<&'a Tensor>,
    /// Packed rows (no padding, no cache).
    pub segments: Option<&'a Segments>,
    /// Cached positions before the `t` queries.
    pub past: i64,
}

/// Builds the mask for `t` queries at positions `past..past+t` over `past + t` keys.
/// Padding queries attend to themselves only, so that no row is empty (an empty row would
/// give NaN and poison later layers).
pub fn build_mask(p: Pattern<'_>, t: i64, window: Option<i64>, device: Device) -> Result<Mask> {
    let Pattern { key_valid, segments, past } = p;
    if let Some(segs) = segments {
        let longest = segs.iter().flatten().map(|&(_, len)| len).max().unwrap_or(0);
        return match window {
            // A window no shorter than every sample changes nothing.
            Some(w) if w < longest => bail!(
                "packed rows with a sliding window ({w}) shorter than a packed sample ({longest} tokens) are not supported: \
                 set data.cutoff_len to at most {w} or turn data.packing off"
            ),
            _ => Ok(Mask::Segments(segs.clone())),
        };
    }
    if key_valid.is_none() && window.is_none() {
        return Ok(if t == 1 {
            Mask::All
        } else if past == 0 {
            Mask::Causal
        } else {
            explicit_causal(None, past, t, None, device)?
        });
    }
    explicit_causal(key_valid, past, t, window, device)
}

fn explicit_causal(
    key_valid: Option<&Tensor>,
    past: i64,
    t: i64,
    window: Option<i64>,
    device: Device,
) -> Result<Mask> {
    let s = past + t;
    let q_idx = Tensor::f_arange_start(past, s, (Kind::Int64, device))?.f_unsqueeze(1)?; // [T, 1]
    let kv_idx = Tensor::f_arange(s, (Kind::Int64, device))?.f_unsqueeze(0)?; // [1, S]
    let mut allowed = kv_idx.f_le_tensor(&q_idx)?; // [T, S]
    if let Some(w) = window {
        allowed = allowed.f_logical_and(&kv_idx.f_gt_tensor(&q_idx.f_sub_scalar(w)?)?)?;
    }
    let mut allowed = allowed.f_unsqueeze(0)?; // [1, T, S]
    if let Some(valid) = key_valid {
        allowed = allowed.f_logical_and(&valid.f_unsqueeze(1)?)?; // [B, T, S]
    }
    let diagonal = kv_idx.f_eq_tensor(&q_idx)?.f_unsqueeze(0)?;
    Ok(Mask::Explicit(allowed.f_logical_or(&diagonal)?.f_unsqueeze(1)?))
}

/// Whether every row of `valid` (`[B, S]` bool) is its tokens then its padding.
pub fn right_padded(valid: &Tensor) -> Result<bool> {
    let s = valid.size()[1];
    if s < 2 {
        return Ok(true);
    }
    let rises = valid
        .f_narrow(1, 1, s - 1)?
        .f_logical_and(&valid.f_narrow(1, 0, s - 1)?.f_logical_not()?)?;
    Ok(rises.f_any()?.f_int64_value(&[])? == 0)
}

/// The samples of packed rows, from position ids `[B, T]` (or Qwen2-VL's M-RoPE `[3, B, T]`)
/// that restart at 0 inside a row (`None` when no row restarts: one sample per row). 1-D
/// positions must count up by one within each sample; M-RoPE positions stand still inside an
/// image, and a sample starts where all three are 0.
pub fn packed_segments(position_ids: &Tensor) -> Result<Option<Segments>> {
    let size = position_ids.size();
    let (b, t) = (size[size.len() - 2], size[size.len() - 1]);
    if t < 2 {
        return Ok(None);
    }
    let starts = match position_ids.dim() {
        3 => position_ids.f_eq(0)?.f_all_dim(0, false)?,
        _ => position_ids.f_eq(0)?,
    };
    if starts.f_narrow(1, 1, t - 1)?.f_any()?.f_int64_value(&[])? == 0 {
        return Ok(None);
    }
    let starts: Vec<bool> = Vec::try_from(&starts.f_to_device(Device::Cpu)?.f_reshape([-1])?)?;
    let text: Option<Vec<i64>> = match position_ids.dim() {
        3 => None,
        _ => Some(Vec::try_from(&position_ids.f_to_device(Device::Cpu)?.f_reshape([-1])?)?),
    };
    let t = t as usize;
    let mut rows = Vec::with_capacity(b as usize);
    for r in 0..b as usize {
        let row_starts = &starts[r * t..(r + 1) * t];
        if let Some(pos) = &text {
            check_counts_up(r, &pos[r * t..(r + 1) * t])?;
        }
        let mut segs = Vec::new();
        let mut start = 0usize;
        for (i, &restart) in row_starts.iter().enumerate().skip(1) {
            if restart {
                segs.push((start as i64, (i - start) as i64));
                start = i;
            }
        }
        segs.push((start as i64, (t - start) as i64));
        rows.push(segs);
    }
    Ok(Some(Arc::new(rows)))
}

/// 1-D positions of packed row `r`: each either restarts at 0 or follows its predecessor.
fn check_counts_up(r: usize, row: &[i64]) -> Result<()> {
    for i in 1..row.len() {
        if row[i] != 0 && row[i] != row[i - 1] + 1 {
            bail!(
                "packed row {r}: position ids must count up by one within a sample and restart at 0 at the next, \
                 got {} then {} at column {i}",
                row[i - 1],
                row[i]
            );
        }
    }
    Ok(())
}

/// `[B, kv_heads, S, D]` -> `[B, heads, S, D]`, each kv head repeated `n_rep` times.
fn repeat_kv(x: Tensor, n_rep: i64) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.size4()?;
    Ok(x.f_unsqueeze(2)?.f_expand([b, kv, n_rep, s, d], false)?.f_reshape([b, kv * n_rep, s, d])?)
}

fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<Tensor> {
    let gqa = q.size()[1] != k.size()[1];
    Ok(Tensor::f_scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, causal, scale, gqa)?)
}

/// Scaled dot-product attention of `q` `[B, heads, T, D]` over `k`, `v`
/// `[B, kv_heads, S, D]` under `mask`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Result<Tensor> {
    let (b, heads, t, d) = q.size4()?;
    let kv_heads = k.size()[1];
    let n_rep = heads / kv_heads;
    Ok(match mask {
        // One query per row: fold the heads sharing a kv head into the query length
        // instead of repeating keys and values (transformers' `pack_gqa`).
        _ if t == 1 && n_rep > 1 => {
            let q = q.f_reshape([b, kv_heads, n_rep, d])?;
            let m = match mask {
                Mask::Explicit(m) => Some(m),
                _ => None,
            };
            Tensor::f_scaled_dot_product_attention(&q, k, v, m, 0.0, false, scale, false)?
                .f_reshape([b, heads, 1, d])?
        }
        Mask::All => sdpa(q, k, v, false, scale)?,
        Mask::Causal => sdpa(q, k, v, true, scale)?,
        Mask::Segments(rows) => segment_attention(q, k, v, rows, scale)?,
        Mask::Explicit(m) => {
            let (k, v) =
                (repeat_kv(k.shallow_clone(), n_rep)?, repeat_kv(v.shallow_clone(), n_rep)?);
            Tensor::f_scaled_dot_product_attention(q, &k, &v, Some(m), 0.0, false, scale, false)?
        }
    })
}

/// Causal attention inside each packed sample: on CUDA in half precision libtorch's
/// variable-length flash kernel over every sample at once, elsewhere one SDPA call per
/// sample.
fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &[Vec<(i64, i64)>],
    scale: f64,
) -> Result<Tensor> {
    let d = q.size()[3];
    let flash = q.device().is_cuda()
        && matches!(q.kind(), Kind::BFloat16 | Kind::Half)
        && d % 8 == 0
        && d <= 256;
    if flash {
        varlen_attention(q, k, v, rows, scale)
    } else {
        per_segment_attention(q, k, v, rows, scale)
    }
}

/// The flash path of [`segment_attention`]: rows flattened to `[B·T, heads, D]`, the
/// samples' cumulative lengths in int32.
fn varlen_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &[Vec<(i64, i64)>],
    scale: f64,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.size4()?;
    let mut cu = vec![0i32];
    let mut total = 0i64;
    for segs in rows {
        for &(_, len) in segs {
            total += len;
            cu.push(i32::try_from(total)?);
        }
    }
    let max_len = rows.iter().flatten().map(|&(_, len)| len).max().unwrap_or(1);
    let flat = |x: &Tensor| -> Result<Tensor> {
        let h = x.size()[1];
        Ok(x.f_transpose(1, 2)?.f_contiguous()?.f_reshape([b * t, h, d])?)
    };
    let cu = Tensor::f_from_slice(&cu)?.f_to_device(q.device())?;
    let y = super::checkpoint::varlen_flash_attention(
        &flat(q)?,
        &flat(k)?,
        &flat(v)?,
        &cu,
        max_len,
        scale,
    )?;
    Ok(y.f_reshape([b, t, heads, d])?.f_transpose(1, 2)?)
}

/// The portable path of [`segment_attention`]: one causal SDPA call per sample.
fn per_segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &[Vec<(i64, i64)>],
    scale: f64,
) -> Result<Tensor> {
    let mut out = Vec::with_capacity(rows.len());
    for (r, segs) in rows.iter().enumerate() {
        let r = r as i64;
        let (qr, kr, vr) = (q.f_narrow(0, r, 1)?, k.f_narrow(0, r, 1)?, v.f_narrow(0, r, 1)?);
        let parts = segs
            .iter()
            .map(|&(s, len)| {
                sdpa(
                    &qr.f_narrow(2, s, len)?,
                    &kr.f_narrow(2, s, len)?,
                    &vr.f_narrow(2, s, len)?,
                    true,
                    scale,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(Tensor::f_cat(&parts, 2)?);
    }
    Ok(Tensor::f_cat(&out, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_padding_rows_never_empty() {
        let valid = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1]).reshape([2, 4]).ne(0);
        let Mask::Explicit(m) = build_mask(
            Pattern { key_valid: Some(&valid), segments: None, past: 0 },
            4,
            Some(2),
            Device::Cpu,
        )
        .unwrap() else {
            panic!("explicit")
        };
        let m: Vec<i64> = Vec::try_from(&m.to_kind(Kind::Int64).reshape([-1])).unwrap();
        #[rustfmt::skip]
        let want = vec![
            1, 0, 0, 0,  0, 1, 0, 0,  0, 0, 1, 0,  0, 0, 1, 1, // row 0: two pads, then window 2
            1, 0, 0, 0,  1, 1, 0, 0,  0, 1, 1, 0,  0, 0, 1, 1, // row 1: no padding, window 2
        ];
        assert_eq!(m, want);
    }

    #[test]
    fn right_padding_is_detected() {
        let v = |x: &[i64]| Tensor::from_slice(x).reshape([2, 3]).ne(0);
        assert!(right_padded(&v(&[1, 1, 0, 1, 1, 1])).unwrap());
        assert!(!right_padded(&v(&[0, 1, 1, 1, 1, 1])).unwrap());
        assert!(!right_padded(&v(&[1, 0, 1, 1, 1, 1])).unwrap());
    }

    #[test]
    fn segments_from_restarting_positions() {
        let p = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 0, 0, 1, 2, 3, 4, 5]).reshape([2, 6]);
        let segs = packed_segments(&p).unwrap().unwrap();
        assert_eq!(*segs, vec![vec![(0, 3), (3, 2), (5, 1)], vec![(0, 6)]]);
        let plain = Tensor::arange(6, (Kind::Int64, Device::Cpu)).reshape([1, 6]);
        assert!(packed_segments(&plain).unwrap().is_none());
        // M-RoPE: positions stand still inside an image; a sample starts where all three are 0.
        let mrope = Tensor::from_slice(&[
            0i64, 1, 1, 1, 0, 1, // temporal
            0, 1, 1, 2, 0, 1, // height
            0, 1, 2, 1, 0, 1, // width
        ])
        .reshape([3, 1, 6]);
        let segs = packed_segments(&mrope).unwrap().unwrap();
        assert_eq!(*segs, vec![vec![(0, 4), (4, 2)]]);
        let bad = Tensor::from_slice(&[0i64, 1, 3, 0]).reshape([1, 4]);
        let e = packed_segments(&bad).unwrap_err().to_string();
        assert!(e.contains("count up by one"), "{e}");
    }

    /// Per-sample attention over a packed row equals each sample's own causal attention,
    /// and equals a block-diagonal explicit mask.
    #[test]
    fn segment_attention_keeps_samples_apart() {
        tch::manual_seed(1);
        let (h, kv, t, d) = (4i64, 2i64, 7i64, 8i64);
        let q = Tensor::randn([1, h, t, d], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, kv, t, d], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([1, kv, t, d], (Kind::Float, Device::Cpu));
        let segs: Segments = Arc::new(vec![vec![(0, 3), (3, 4)]]);
        let got = attend(&q, &k, &v, &Mask::Segments(segs), 0.3).unwrap();
        let block = Tensor::zeros([t, t], (Kind::Bool, Device::Cpu));
        let tril = |n: i64| Tensor::ones([n, n], (Kind::Bool, Device::Cpu)).tril(0);
        block.narrow(0, 0, 3).narrow(1, 0, 3).copy_(&tril(3));
        block.narrow(0, 3, 4).narrow(1, 3, 4).copy_(&tril(4));
        let want = attend(&q, &k, &v, &Mask::Explicit(block.view([1, 1, t, t])), 0.3).unwrap();
        let diff = (got - want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    }
}
