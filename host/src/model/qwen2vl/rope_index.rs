//! Qwen2-VL's 3-D (M-RoPE) position ids: transformers' `Qwen2VLModel.get_rope_index`.
//!
//! Text tokens count up by one on all three axes (temporal, height, width). An image block of
//! `t × (h/m) × (w/m)` `<|image_pad|>` tokens (grid `[t, h, w]` in patches, merge size `m`)
//! starting at position `p` gets temporal `p + ti`, height `p + hi`, width `p + wi`; the text after
//! it starts at `p + max(h, w) / m`. Padding (mask 0) is skipped and gets position 0. Each row's
//! `delta = max position + 1 - tokens` is what later decode steps add to their 1-D positions
//! (transformers' `rope_deltas`).
use anyhow::{bail, Result};

/// 3-D positions of a batch, and the per-row rope deltas.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeIndex {
    /// `[3, batch, seq]`, row-major (axis, then row, then position).
    pub positions: Vec<i64>,
    /// `[batch]`.
    pub deltas: Vec<i64>,
}

/// Computes the M-RoPE positions of `input_ids` (`batch × seq`, row-major). `attention_mask`
/// (same shape, 0 = padding) may be absent. Images are `image_grid_thw` in order of appearance,
/// row 0's first; every image block must be exactly its `t·h·w / m²` image tokens.
pub fn rope_index(
    input_ids: &[i64],
    batch: usize,
    seq: usize,
    attention_mask: Option<&[i64]>,
    image_grid_thw: &[[i64; 3]],
    image_token_id: i64,
    spatial_merge_size: i64,
) -> Result<RopeIndex> {
    if input_ids.len() != batch * seq || attention_mask.is_some_and(|m| m.len() != batch * seq) {
        bail!(
            "rope_index: input_ids / attention_mask must have batch × seq = {} entries",
            batch * seq
        );
    }
    let m = spatial_merge_size;
    let mut positions = vec![0i64; 3 * batch * seq];
    let mut deltas = Vec::with_capacity(batch);
    let mut images = image_grid_thw.iter().enumerate();
    for row in 0..batch {
        let valid: Vec<usize> = (0..seq)
            .filter(|&j| attention_mask.is_none_or(|mask| mask[row * seq + j] != 0))
            .collect();
        let mut put = |k: usize, t: i64, h: i64, w: i64| {
            let j = row * seq + valid[k];
            positions[j] = t;
            positions[batch * seq + j] = h;
            positions[2 * batch * seq + j] = w;
        };
        let (mut current, mut max_pos, mut k) = (0i64, -1i64, 0usize);
        while k < valid.len() {
            if input_ids[row * seq + valid[k]] != image_token_id {
                put(k, current, current, current);
                max_pos = max_pos.max(current);
                current += 1;
                k += 1;
                continue;
            }
            let Some((i, &[t, h, w])) = images.next() else {
                bail!(
                    "row {row} has more image blocks than the {} image(s) given in image_grid_thw",
                    image_grid_thw.len()
                );
            };
            if t <= 0 || h <= 0 || w <= 0 || h % m != 0 || w % m != 0 {
                bail!("image {i}: grid [t, h, w] = [{t}, {h}, {w}] must be positive with h and w multiples of spatial_merge_size {m}");
            }
            let (gh, gw) = (h / m, w / m);
            let n = (t * gh * gw) as usize;
            let run = valid[k..]
                .iter()
                .take_while(|&&j| input_ids[row * seq + j] == image_token_id)
                .count();
            if run < n {
                bail!("image {i} (grid [{t}, {h}, {w}]) needs {n} consecutive image tokens but row {row} has a block of {run}");
            }
            let mut idx = k;
            for ti in 0..t {
                for hi in 0..gh {
                    for wi in 0..gw {
                        put(idx, current + ti, current + hi, current + wi);
                        idx += 1;
                    }
                }
            }
            max_pos = max_pos.max(current + (t - 1).max(gh - 1).max(gw - 1));
            current += h.max(w) / m;
            k += n;
        }
        deltas.push(if valid.is_empty() { 0 } else { max_pos + 1 - valid.len() as i64 });
    }
    let used = images.next().map(|(i, _)| i).unwrap_or(image_grid_thw.len());
    if used < image_grid_thw.len() {
        bail!(
            "{} image(s) given in image_grid_thw but input_ids hold only {used} image block(s)",
            image_grid_thw.len()
        );
    }
    Ok(RopeIndex { positions, deltas })
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: i64 = 9; // the image token

    #[test]
    fn hand_computed_example_with_padding() {
        // Row 0: two pads, `a b <vs> [6 image tokens: grid 1×4×6, merge 2 -> 1×2×3] <ve> c`.
        // Row 1: `a [1 image token: grid 1×2×2] b b b b b b b b b b` (no padding).
        #[rustfmt::skip]
        let ids = [
            0, 0, 1, 2, 3, I, I, I, I, I, I, 4, 5,
            1, I, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
        ];
        let mask = [
            0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /**/ 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        ];
        let r = rope_index(&ids, 2, 13, Some(&mask), &[[1, 4, 6], [1, 2, 2]], I, 2).unwrap();
        let axis =
            |a: usize, row: usize| r.positions[a * 26 + row * 13..a * 26 + row * 13 + 13].to_vec();
        // Text 0, 1, 2; the image starts at 3: t 3; h 3 3 3 4 4 4; w 3 4 5 3 4 5; then 3 + 6/2 = 6.
        assert_eq!(axis(0, 0), vec![0, 0, 0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]);
        assert_eq!(axis(1, 0), vec![0, 0, 0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7]);
        assert_eq!(axis(2, 0), vec![0, 0, 0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]);
        // Row 1: text 0, image at 1 (one token), text from 1 + 2/2 = 2 to 12.
        let want: Vec<i64> = [0, 1].into_iter().chain(2..13).collect();
        for a in 0..3 {
            assert_eq!(axis(a, 1), want);
        }
        // max + 1 - tokens: 8 - 11 = -3 and 13 - 13 = 0.
        assert_eq!(r.deltas, vec![-3, 0]);
    }

    #[test]
    fn text_only_is_one_dimensional() {
        let r = rope_index(&[0, 5, 6, 7], 1, 4, Some(&[0, 1, 1, 1]), &[], I, 2).unwrap();
        assert_eq!(r.positions, vec![0, 0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2]);
        assert_eq!(r.deltas, vec![0]);
    }

    #[test]
    fn mismatches_are_errors() {
        let e = rope_index(&[1, I, I, 2], 1, 4, None, &[[1, 4, 4]], I, 2).unwrap_err().to_string();
        assert!(e.contains("needs 4") && e.contains("block of 2"), "{e}");
        let e = rope_index(&[1, I, 2, 2], 1, 4, None, &[[1, 2, 2], [1, 2, 2]], I, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 image(s)") && e.contains("only 1"), "{e}");
        let e = rope_index(&[1, I, 2, I], 1, 4, None, &[[1, 2, 2]], I, 2).unwrap_err().to_string();
        assert!(e.contains("more image blocks"), "{e}");
    }
}
