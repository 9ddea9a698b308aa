//! Qwen2-VL's and Qwen2.5-VL's 3-D (M-RoPE) position ids: transformers'
//! `Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index`.
//!
//! Text tokens count up by one on all three axes (temporal, height, width). An image block of
//! `t × (h/m) × (w/m)` `<|image_pad|>` tokens (grid `[t, h, w]` in patches, merge size `m`)
//! starting at position `p` gets temporal `p + ti`, height `p + hi`, width `p + wi`; the text after
//! it starts at `p + max(h, w) / m`. Padding (mask 0) is skipped and gets position 0. Each row's
//! `delta = max position + 1 - tokens` is what later decode steps add to their 1-D positions
//! (transformers' `rope_deltas`). A video block is the same with `t` temporal patches; Qwen2.5-VL
//! spaces its temporal positions by `tokens_per_second × second_per_grid_ts` (truncated), and the
//! text after it still starts at `p + max(h, w) / m`.
use anyhow::{bail, Result};

/// 3-D positions of a batch, and the per-row rope deltas.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeIndex {
    /// `[3, batch, seq]`, row-major (axis, then row, then position).
    pub positions: Vec<i64>,
    /// `[batch]`.
    pub deltas: Vec<i64>,
}

/// The vision side of [`rope_index_vision`]: what fills the image and video blocks.
#[derive(Debug, Clone, Copy)]
pub struct RopeInputs<'a> {
    /// `[t, h, w]` of each image, in order of appearance (row 0's first).
    pub image_grid_thw: &'a [[i64; 3]],
    /// `[t, h, w]` of each video, in order of appearance.
    pub video_grid_thw: &'a [[i64; 3]],
    /// Seconds per temporal patch of each video (empty: 1 each).
    pub second_per_grid_ts: &'a [f64],
    /// Qwen2.5-VL's `vision_config.tokens_per_second`: a video's temporal position of patch
    /// `ti` is `p + trunc(ti × tokens_per_second × second_per_grid_ts)`, in f32 as transformers
    /// computes it. `None` (Qwen2-VL): `p + ti`.
    pub tokens_per_second: Option<f64>,
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub spatial_merge_size: i64,
}

/// Computes the M-RoPE positions of `input_ids` (`batch × seq`, row-major). `attention_mask`
/// (same shape, 0 = padding) may be absent. Images are `image_grid_thw` in order of appearance,
/// row 0's first; every image block must be exactly its `t·h·w / m²` image tokens. Videos are
/// not looked for (Qwen2-VL without videos); [`rope_index_vision`] handles both.
pub fn rope_index(
    input_ids: &[i64],
    batch: usize,
    seq: usize,
    attention_mask: Option<&[i64]>,
    image_grid_thw: &[[i64; 3]],
    image_token_id: i64,
    spatial_merge_size: i64,
) -> Result<RopeIndex> {
    let inputs = RopeInputs {
        image_grid_thw,
        video_grid_thw: &[],
        second_per_grid_ts: &[],
        tokens_per_second: None,
        image_token_id,
        // No token id is negative: video tokens are then text.
        video_token_id: -1,
        spatial_merge_size,
    };
    rope_index_vision(input_ids, batch, seq, attention_mask, &inputs)
}

/// transformers' `get_rope_index` (Qwen2-VL and Qwen2.5-VL, 5.24) over image and video blocks
/// in order of appearance: the blocks of `<|image_pad|>` tokens take the images in turn, those
/// of `<|video_pad|>` tokens the videos. Each block must be exactly its `t·h·w / m²` tokens.
pub fn rope_index_vision(
    input_ids: &[i64],
    batch: usize,
    seq: usize,
    attention_mask: Option<&[i64]>,
    inputs: &RopeInputs<'_>,
) -> Result<RopeIndex> {
    if input_ids.len() != batch * seq || attention_mask.is_some_and(|m| m.len() != batch * seq) {
        bail!(
            "rope_index: input_ids / attention_mask must have batch × seq = {} entries",
            batch * seq
        );
    }
    let m = inputs.spatial_merge_size;
    let spgt = inputs.second_per_grid_ts;
    if !spgt.is_empty() && spgt.len() != inputs.video_grid_thw.len() {
        bail!(
            "second_per_grid_ts has {} entries but video_grid_thw {} videos: give one per video",
            spgt.len(),
            inputs.video_grid_thw.len()
        );
    }
    if let Some((i, s)) = spgt.iter().enumerate().find(|(_, s)| !s.is_finite() || **s < 0.0) {
        bail!("second_per_grid_ts[{i}] = {s} must be a non-negative number of seconds");
    }
    let mut positions = vec![0i64; 3 * batch * seq];
    let mut deltas = Vec::with_capacity(batch);
    let mut images = inputs.image_grid_thw.iter().enumerate();
    let mut videos = inputs.video_grid_thw.iter().enumerate();
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
            let id = input_ids[row * seq + valid[k]];
            let is_video = id == inputs.video_token_id;
            if id != inputs.image_token_id && !is_video {
                put(k, current, current, current);
                max_pos = max_pos.max(current);
                current += 1;
                k += 1;
                continue;
            }
            let (what, given, next) = if is_video {
                ("video", inputs.video_grid_thw.len(), videos.next())
            } else {
                ("image", inputs.image_grid_thw.len(), images.next())
            };
            let Some((i, &[t, h, w])) = next else {
                bail!(
                    "row {row} has more {what} blocks than the {given} {what}(s) given in {what}_grid_thw"
                );
            };
            if t <= 0 || h <= 0 || w <= 0 || h % m != 0 || w % m != 0 {
                bail!("{what} {i}: grid [t, h, w] = [{t}, {h}, {w}] must be positive with h and w multiples of spatial_merge_size {m}");
            }
            let (gh, gw) = (h / m, w / m);
            let n = (t * gh * gw) as usize;
            let run = valid[k..].iter().take_while(|&&j| input_ids[row * seq + j] == id).count();
            if run < n {
                bail!("{what} {i} (grid [{t}, {h}, {w}]) needs {n} consecutive {what} tokens but row {row} has a block of {run}");
            }
            // `(arange(t) * time_interval).long()`: an f32 product truncated toward zero.
            let interval = match (is_video, inputs.tokens_per_second) {
                (true, Some(tps)) => Some(tps as f32 * spgt.get(i).map_or(1.0, |&s| s as f32)),
                _ => None,
            };
            let time = |ti: i64| interval.map_or(ti, |dt| (ti as f32 * dt) as i64);
            let mut idx = k;
            for ti in 0..t {
                for hi in 0..gh {
                    for wi in 0..gw {
                        put(idx, current + time(ti), current + hi, current + wi);
                        idx += 1;
                    }
                }
            }
            max_pos = max_pos.max(current + time(t - 1).max(gh - 1).max(gw - 1));
            current += h.max(w) / m;
            k += n;
        }
        deltas.push(if valid.is_empty() { 0 } else { max_pos + 1 - valid.len() as i64 });
    }
    for (what, mut rest, given) in [
        ("image", images, inputs.image_grid_thw.len()),
        ("video", videos, inputs.video_grid_thw.len()),
    ] {
        let used = rest.next().map(|(i, _)| i).unwrap_or(given);
        if used < given {
            bail!(
                "{given} {what}(s) given in {what}_grid_thw but input_ids hold only {used} {what} block(s)"
            );
        }
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

    const V: i64 = 8; // the video token

    fn inputs<'a>(
        images: &'a [[i64; 3]],
        videos: &'a [[i64; 3]],
        spgt: &'a [f64],
        tps: Option<f64>,
    ) -> RopeInputs<'a> {
        RopeInputs {
            image_grid_thw: images,
            video_grid_thw: videos,
            second_per_grid_ts: spgt,
            tokens_per_second: tps,
            image_token_id: I,
            video_token_id: V,
            spatial_merge_size: 2,
        }
    }

    #[test]
    fn videos_scale_time_by_seconds_per_grid() {
        // `a [video: grid 3×2×4 -> 3 × 1 × 2 tokens] b [image 1×2×2] c`.
        let ids = [1, V, V, V, V, V, V, 2, I, 3];
        // Qwen2.5-VL, tokens_per_second 4, 2/3 s per temporal patch: times 0, 2.67, 5.33 -> 0, 2, 5.
        let r = rope_index_vision(
            &ids,
            1,
            10,
            None,
            &inputs(&[[1, 2, 2]], &[[3, 2, 4]], &[2.0 / 3.0], Some(4.0)),
        )
        .unwrap();
        // The video starts at 1; text after it at 1 + max(2, 4) / 2 = 3 (not after its last time).
        assert_eq!(&r.positions[..10], &[0, 1, 1, 3, 3, 6, 6, 3, 4, 5]);
        assert_eq!(&r.positions[10..20], &[0, 1, 1, 1, 1, 1, 1, 3, 4, 5]);
        assert_eq!(&r.positions[20..], &[0, 1, 2, 1, 2, 1, 2, 3, 4, 5]);
        assert_eq!(r.deltas, vec![7 - 10]);
        // Qwen2-VL: time steps by one.
        let r =
            rope_index_vision(&ids, 1, 10, None, &inputs(&[[1, 2, 2]], &[[3, 2, 4]], &[], None))
                .unwrap();
        assert_eq!(&r.positions[..10], &[0, 1, 1, 2, 2, 3, 3, 3, 4, 5]);
        // Images alone never scale.
        let r =
            rope_index_vision(&[1, I, 2], 1, 3, None, &inputs(&[[1, 2, 2]], &[], &[], Some(4.0)))
                .unwrap();
        assert_eq!(r.positions, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn video_mismatches_are_errors() {
        let e = rope_index_vision(&[1, V, 2, 2], 1, 4, None, &inputs(&[], &[[2, 2, 2]], &[], None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("video 0") && e.contains("needs 2") && e.contains("block of 1"), "{e}");
        let e = rope_index_vision(&[1, V, 2, 2], 1, 4, None, &inputs(&[], &[], &[], None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more video blocks") && e.contains("video_grid_thw"), "{e}");
        let e = rope_index_vision(&[1, 2], 1, 2, None, &inputs(&[], &[[1, 2, 2]], &[], None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 video(s)") && e.contains("only 0"), "{e}");
        let e = rope_index_vision(
            &[1, V],
            1,
            2,
            None,
            &inputs(&[], &[[1, 2, 2]], &[0.5, 0.5], Some(2.0)),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("second_per_grid_ts has 2"), "{e}");
        let e = rope_index_vision(
            &[1, V],
            1,
            2,
            None,
            &inputs(&[], &[[1, 2, 2]], &[f64::NAN], Some(2.0)),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("second_per_grid_ts[0]"), "{e}");
    }
}
