//! A micro-batch of training items as the tensors (and metadata) its objective reads, for
//! every batch layout (see [`super::layout`]).
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use tch::Tensor;

use super::encode::{Encoded, IGNORE_INDEX};
use super::images::{ImagePrep, SampleImage};
use super::layout::{Item, Layout};
use super::pack::Packed;
use crate::model::qwen2vl::{rope_index_vision, RopeInputs};
use ferrotune_plugin_api::kinds::objective::{IMAGES_PER_PROMPT, VIDEOS_PER_PROMPT};

/// Rows right-padded to one width: ids, attention mask and completion mask (the labelled
/// tokens), each int64 `[rows, T]`.
fn right_padded(rows: &[(Vec<i64>, Vec<bool>)], pad_id: i64) -> (Tensor, Tensor, Tensor) {
    let width = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0).max(1);
    let n = rows.len();
    let (mut ids, mut mask, mut comp) =
        (vec![pad_id; n * width], vec![0i64; n * width], vec![0i64; n * width]);
    for (r, (row_ids, scored)) in rows.iter().enumerate() {
        let at = r * width;
        ids[at..at + row_ids.len()].copy_from_slice(row_ids);
        mask[at..at + row_ids.len()].fill(1);
        for (j, &s) in scored.iter().enumerate() {
            comp[at + j] = s as i64;
        }
    }
    let shape = [n as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
        Tensor::from_slice(&comp).view(shape),
    )
}

fn scored(e: &Encoded) -> (Vec<i64>, Vec<bool>) {
    (e.input_ids.clone(), e.labels.iter().map(|&l| l != IGNORE_INDEX).collect())
}

/// KTO rows (`input_ids`, masks, `kto_desirable`) and the KL rows: prompt i with the
/// completion of row i − 1 (row 0 with the last row's).
fn kto_tensors(items: &[&Item], encs: &[&Encoded], pad_id: i64) -> NamedTensors {
    let desirable: Vec<i64> =
        items.iter().map(|i| matches!(i, Item::Kto { desirable: true, .. }) as i64).collect();
    let rows: Vec<_> = encs.iter().map(|e| scored(e)).collect();
    let (ids, mask, comp) = right_padded(&rows, pad_id);
    // KL rows: prompt i with the completion of row i − 1 (row 0 with the last row's).
    let n = encs.len();
    let kl_rows: Vec<(Vec<i64>, Vec<bool>)> = (0..n)
        .map(|i| {
            let (p, c) = (encs[i], encs[(i + n - 1) % n]);
            let (ps, cs) = (completion_start(p), completion_start(c));
            let mut row_ids = p.input_ids[..ps].to_vec();
            row_ids.extend_from_slice(&c.input_ids[cs..]);
            let mut s = vec![false; ps];
            s.extend(c.labels[cs..].iter().map(|&l| l != IGNORE_INDEX));
            (row_ids, s)
        })
        .collect();
    let (kl_ids, kl_mask, kl_comp) = right_padded(&kl_rows, pad_id);
    vec![
        ("input_ids".into(), ids),
        ("attention_mask".into(), mask),
        ("completion_mask".into(), comp),
        ("kto_desirable".into(), Tensor::from_slice(&desirable)),
        ("KL_input_ids".into(), kl_ids),
        ("KL_attention_mask".into(), kl_mask),
        ("KL_completion_mask".into(), kl_comp),
    ]
}

/// Left-padded `prompt_ids` / `prompt_mask`, with the rendered prompts, the samples and the
/// pad id in the metadata; prompts with images add the batch's `pixel_values` /
/// `image_grid_thw` and `images_per_prompt` (each row's count, in row order) to the metadata,
/// prompts with videos `pixel_values_videos` / `video_grid_thw` / `second_per_grid_ts` and
/// `videos_per_prompt`.
fn prompt_tensors(
    items: &[&Item],
    pad_id: i64,
    prep: Option<&ImagePrep>,
    meta: &mut Map<String, Value>,
) -> Result<NamedTensors> {
    let mut prompts = Vec::new();
    let (mut texts, mut samples, mut images) = (Vec::new(), Vec::new(), Vec::new());
    for item in items {
        let Item::Prompt { ids, text, sample, images: own } = item else {
            bail!("internal: a row of another layout in a prompts batch")
        };
        prompts.push(ids);
        texts.push(Value::String(text.clone()));
        samples.push(sample.clone());
        images.push(own);
    }
    let mut vision = Vec::new();
    if images.iter().any(|i| !i.is_empty()) {
        let Some(prep) = prep else {
            bail!("internal: prompts with images in a run without an image processor")
        };
        // A prompt's items are its images, then its videos.
        let count = |video: bool| -> Vec<usize> {
            images
                .iter()
                .map(|i| i.iter().filter(|im| im.video.is_some() == video).count())
                .collect()
        };
        let (image_counts, video_counts) = (count(false), count(true));
        if image_counts.iter().any(|&n| n > 0) {
            meta.insert(IMAGES_PER_PROMPT.into(), json!(image_counts));
        }
        if video_counts.iter().any(|&n| n > 0) {
            meta.insert(VIDEOS_PER_PROMPT.into(), json!(video_counts));
        }
        vision = prep.item_tensors(images.iter().flat_map(|i| i.iter()))?;
    }
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0).max(1);
    let n = prompts.len();
    let (mut ids, mut mask) = (vec![pad_id; n * width], vec![0i64; n * width]);
    for (r, p) in prompts.iter().enumerate() {
        let at = r * width + width - p.len();
        ids[at..at + p.len()].copy_from_slice(p);
        mask[at..at + p.len()].fill(1);
    }
    let shape = [n as i64, width as i64];
    meta.insert("prompts".into(), Value::Array(texts));
    meta.insert("samples".into(), Value::Array(samples));
    meta.insert("pad_token_id".into(), json!(pad_id));
    let mut tensors: NamedTensors = vec![
        ("prompt_ids".into(), Tensor::from_slice(&ids).view(shape)),
        ("prompt_mask".into(), Tensor::from_slice(&mask).view(shape)),
    ];
    tensors.extend(vision);
    Ok(tensors)
}

/// Where a sequence's completion (its first labelled token) starts.
fn completion_start(e: &Encoded) -> usize {
    e.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap_or(e.labels.len())
}

/// Tensors by name, as a batch carries them.
pub type NamedTensors = Vec<(String, Tensor)>;

/// A micro-batch of `items` (all of `layout`): its tensors (on the CPU) and the metadata
/// entries the layout adds.
pub fn collate(
    layout: Layout,
    items: &[&Item],
    pad_id: i64,
    prep: Option<&ImagePrep>,
) -> Result<(NamedTensors, Map<String, Value>)> {
    let mut meta = Map::new();
    let seqs = |f: &dyn Fn(&Item) -> Option<&Encoded>| -> Result<Vec<&Encoded>> {
        items
            .iter()
            .map(|i| {
                f(i).ok_or_else(|| {
                    anyhow::anyhow!(
                        "internal: a row of another layout in a {} batch",
                        layout.name()
                    )
                })
            })
            .collect()
    };
    let images = |encs: &[&Encoded]| -> Result<Vec<(String, Tensor)>> {
        match prep {
            Some(p) => p.batch_tensors(encs),
            None => Ok(Vec::new()),
        }
    };
    let mut tensors = Vec::new();
    match layout {
        Layout::Sequences if items.iter().any(|i| matches!(i, Item::Packed(_))) => {
            tensors = packed_tensors(items, pad_id, prep)?
        }
        Layout::Sequences => {
            let encs = seqs(&|i| if let Item::Seq(e) = i { Some(e) } else { None })?;
            tensors = pad_sequences(&encs, pad_id);
            if let Some(p) = prep {
                tensors.extend(p.batch_tensors(&encs)?);
            }
        }
        Layout::Pairs => {
            let chosen =
                seqs(&|i| if let Item::Pair { chosen, .. } = i { Some(chosen) } else { None })?;
            let rejected =
                seqs(&|i| if let Item::Pair { rejected, .. } = i { Some(rejected) } else { None })?;
            let all: Vec<&Encoded> = chosen.iter().chain(rejected.iter()).copied().collect();
            let rows: Vec<_> = all.iter().map(|e| scored(e)).collect();
            let (ids, mask, comp) = right_padded(&rows, pad_id);
            tensors.extend([
                ("input_ids".into(), ids),
                ("attention_mask".into(), mask),
                ("completion_mask".into(), comp),
            ]);
            tensors.extend(images(&all)?);
            let margins: Vec<Option<f64>> = items
                .iter()
                .map(|i| if let Item::Pair { margin, .. } = i { *margin } else { None })
                .collect();
            if margins.iter().any(Option::is_some) {
                let Some(m) = margins.iter().copied().collect::<Option<Vec<f64>>>() else {
                    bail!("a batch of preference pairs mixes rows with a `margin` and rows without one; give every row of the data set a margin, or none");
                };
                tensors.push(("margin".into(), Tensor::from_slice(&m).to_kind(tch::Kind::Float)));
            }
        }
        Layout::Kto => {
            let encs = seqs(&|i| if let Item::Kto { seq, .. } = i { Some(seq) } else { None })?;
            tensors = kto_tensors(items, &encs, pad_id);
            tensors.extend(images(&encs)?);
        }
        Layout::Prompts => tensors = prompt_tensors(items, pad_id, prep, &mut meta)?,
    }
    Ok((tensors, meta))
}

/// A micro-batch of packed rows (`data.packing`; a plain sequence is a row of one sample):
/// `input_ids` and `labels` right-padded to the longest row as [`pad_sequences`] pads them,
/// `position_ids` restarting at 0 at every sample (see [`packed_positions`]), no
/// `attention_mask`, and the rows' images in order.
fn packed_tensors(items: &[&Item], pad_id: i64, prep: Option<&ImagePrep>) -> Result<NamedTensors> {
    let mut rows = Vec::with_capacity(items.len());
    for item in items {
        rows.push(match item {
            Item::Packed(Packed { seq, segments, .. }) => (seq, segments.clone()),
            Item::Seq(e) => (e, vec![e.input_ids.len()]),
            _ => bail!("internal: a row of another layout in a packed batch"),
        });
    }
    let encs: Vec<&Encoded> = rows.iter().map(|(e, _)| *e).collect();
    let mut tensors = pad_sequences(&encs, pad_id);
    tensors.retain(|(n, _)| n != "attention_mask");
    let mrope = prep.filter(|_| encs.iter().any(|e| !e.images.is_empty())).map(|p| Mrope {
        image_id: p.image_pad_id(),
        video_id: p.video_pad_id(),
        merge: p.processor.merge_size as i64,
        temporal_patch_size: p.processor.temporal_patch_size,
        tokens_per_second: p.tokens_per_second(),
    });
    tensors.push(("position_ids".into(), packed_positions(&rows, mrope)?));
    if let Some(p) = prep {
        tensors.extend(p.batch_tensors(&encs)?);
    }
    Ok(tensors)
}

/// What M-RoPE positions need: the image and video pad ids, the merge size, and for videos
/// the temporal patch size and Qwen2.5-VL's `tokens_per_second` (`None`: Qwen2-VL).
#[derive(Clone, Copy, Debug)]
struct Mrope {
    image_id: i64,
    video_id: Option<i64>,
    merge: i64,
    temporal_patch_size: u32,
    tokens_per_second: Option<f64>,
}

/// `position_ids` of packed rows (each a sequence and its samples' lengths), right-padded to
/// the longest: each sample counts from 0, and so does the padding after the last one. With
/// `mrope` `[3, rows, T]`, each sample's own M-RoPE positions (transformers'
/// `get_rope_index` of that sample alone), else `[rows, T]`.
fn packed_positions(rows: &[(&Encoded, Vec<usize>)], mrope: Option<Mrope>) -> Result<Tensor> {
    let width = rows.iter().map(|(e, _)| e.input_ids.len()).max().unwrap_or(0);
    let (axes, plane) = (if mrope.is_some() { 3 } else { 1 }, rows.len() * width);
    let mut out = vec![0i64; axes * plane];
    for (r, (e, segments)) in rows.iter().enumerate() {
        let mut images = e.images.iter();
        let mut start = 0;
        let padding = width - e.input_ids.len();
        for (k, &len) in segments.iter().chain([&padding]).enumerate() {
            let at = r * width + start;
            if k == segments.len() {
                for a in 0..axes {
                    out[a * plane + at..][..len].iter_mut().zip(0..).for_each(|(p, i)| *p = i);
                }
                break;
            }
            let ids = e.input_ids.get(start..start + len).ok_or_else(|| {
                anyhow::anyhow!(
                    "internal: packed row {r}'s segments overrun its {} tokens",
                    e.input_ids.len()
                )
            })?;
            let pos = segment_positions(ids, &mut images, mrope)
                .map_err(|err| err.context(format!("packed row {r}, sample {k}")))?;
            for a in 0..axes {
                out[a * plane + at..][..len].copy_from_slice(&pos[a * len..(a + 1) * len]);
            }
            start += len;
        }
    }
    let shape: Vec<i64> = if mrope.is_some() {
        vec![3, rows.len() as i64, width as i64]
    } else {
        vec![rows.len() as i64, width as i64]
    };
    Ok(Tensor::from_slice(&out).view(shape.as_slice()))
}

/// One sample's positions, axis-major (`0..len`, or its three M-RoPE axes), taking the images
/// and then the videos its pad tokens hold from `images` (a sample's items are its images,
/// then its videos), as the model computes them for the sample alone.
fn segment_positions<'a>(
    ids: &[i64],
    images: &mut impl Iterator<Item = &'a SampleImage>,
    mrope: Option<Mrope>,
) -> Result<Vec<i64>> {
    let Some(m) = mrope else {
        return Ok((0..ids.len() as i64).collect());
    };
    let count = |id: Option<i64>| ids.iter().filter(|&&t| Some(t) == id).count();
    let (mut missing_images, mut missing_videos) = (count(Some(m.image_id)), count(m.video_id));
    let (mut image_grids, mut video_grids, mut seconds) = (Vec::new(), Vec::new(), Vec::new());
    while missing_images + missing_videos > 0 {
        let Some(im) = images.next() else {
            bail!("its image and video tokens do not match its images' and videos' token counts");
        };
        let missing = if im.video.is_some() { &mut missing_videos } else { &mut missing_images };
        if im.tokens > *missing {
            bail!("its image and video tokens do not match its images' and videos' token counts");
        }
        *missing -= im.tokens;
        match &im.video {
            Some(v) => {
                video_grids.push(im.grid_thw);
                seconds.push(v.second_per_grid_t(m.temporal_patch_size));
            }
            None => image_grids.push(im.grid_thw),
        }
    }
    let inputs = RopeInputs {
        image_grid_thw: &image_grids,
        video_grid_thw: &video_grids,
        second_per_grid_ts: &seconds,
        tokens_per_second: m.tokens_per_second,
        image_token_id: m.image_id,
        // No token id is negative: without a video token, video pads are text.
        video_token_id: m.video_id.unwrap_or(-1),
        spatial_merge_size: m.merge,
    };
    Ok(rope_index_vision(ids, 1, ids.len(), None, &inputs)?.positions)
}

/// `input_ids`, `attention_mask` and `labels`, each int64 `[B, T]` with `T` the longest
/// sequence; shorter rows are padded on the right with `pad_id` (mask 0, label −100). Ready
/// for `ferrotune_plugin_api::Batch::tensors`. An empty batch gives `[0, 0]` tensors.
fn pad_sequences(batch: &[&Encoded], pad_id: i64) -> Vec<(String, Tensor)> {
    let rows = batch.len();
    let width = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; rows * width];
    let mut mask = vec![0i64; rows * width];
    let mut labels = vec![IGNORE_INDEX; rows * width];
    for (r, e) in batch.iter().enumerate() {
        let at = r * width;
        let n = e.input_ids.len();
        ids[at..at + n].copy_from_slice(&e.input_ids);
        mask[at..at + n].fill(1);
        labels[at..at + n].copy_from_slice(&e.labels);
    }
    let shape = [rows as i64, width as i64];
    vec![
        ("input_ids".to_string(), Tensor::from_slice(&ids).view(shape)),
        ("attention_mask".to_string(), Tensor::from_slice(&mask).view(shape)),
        ("labels".to_string(), Tensor::from_slice(&labels).view(shape)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::qwen2vl::rope_index;

    fn rows(t: &Tensor) -> Vec<Vec<i64>> {
        Vec::<Vec<i64>>::try_from(t).unwrap()
    }

    fn enc(ids: &[i64], labelled_from: usize) -> Encoded {
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i >= labelled_from { t } else { IGNORE_INDEX })
            .collect();
        Encoded { input_ids: ids.to_vec(), labels, truncated_from: None, images: Vec::new() }
    }

    fn get<'a>(t: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
        &t.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn right_pads_masks_and_ignores_padding() {
        let a = Encoded {
            input_ids: vec![5, 6, 7],
            labels: vec![-100, 6, 7],
            truncated_from: None,
            images: Vec::new(),
        };
        let b = Encoded {
            input_ids: vec![8],
            labels: vec![8],
            truncated_from: Some(9),
            images: Vec::new(),
        };
        let out = pad_sequences(&[&a, &b], 0);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask", "labels"]);
        assert!(out.iter().all(|(_, t)| t.size() == [2, 3] && t.kind() == tch::Kind::Int64));
        assert_eq!(rows(&out[0].1), [[5, 6, 7], [8, 0, 0]]);
        assert_eq!(rows(&out[1].1), [[1, 1, 1], [1, 0, 0]]);
        assert_eq!(rows(&out[2].1), [[-100, 6, 7], [8, -100, -100]]);
        assert_eq!(pad_sequences(&[], 0)[0].1.size(), [0, 0]);
    }

    #[test]
    fn pairs_put_chosen_rows_first_and_mask_completions() {
        let a = Item::Pair {
            chosen: enc(&[5, 6, 7], 2),
            rejected: enc(&[5, 6, 8, 9], 2),
            margin: None,
        };
        let b = Item::Pair { chosen: enc(&[3, 4], 1), rejected: enc(&[3, 9], 1), margin: None };
        let (t, _) = collate(Layout::Pairs, &[&a, &b], 0, None).unwrap();
        assert_eq!(
            rows(get(&t, "input_ids")),
            vec![vec![5, 6, 7, 0], vec![3, 4, 0, 0], vec![5, 6, 8, 9], vec![3, 9, 0, 0]]
        );
        assert_eq!(
            rows(get(&t, "attention_mask")),
            vec![vec![1, 1, 1, 0], vec![1, 1, 0, 0], vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
        );
        assert_eq!(
            rows(get(&t, "completion_mask")),
            vec![vec![0, 0, 1, 0], vec![0, 1, 0, 0], vec![0, 0, 1, 1], vec![0, 1, 0, 0]]
        );
    }

    #[test]
    fn kto_kl_rows_pair_each_prompt_with_the_previous_completion() {
        let a = Item::Kto { seq: enc(&[1, 2, 10, 11], 2), desirable: true };
        let b = Item::Kto { seq: enc(&[3, 20], 1), desirable: false };
        let (t, _) = collate(Layout::Kto, &[&a, &b], 0, None).unwrap();
        assert_eq!(Vec::<i64>::try_from(get(&t, "kto_desirable")).unwrap(), vec![1, 0]);
        assert_eq!(rows(get(&t, "KL_input_ids")), vec![vec![1, 2, 20], vec![3, 10, 11]]);
        assert_eq!(rows(get(&t, "KL_completion_mask")), vec![vec![0, 0, 1], vec![0, 1, 1]]);
        assert_eq!(rows(get(&t, "KL_attention_mask")), vec![vec![1, 1, 1], vec![1, 1, 1]]);
    }

    #[test]
    fn prompts_are_left_padded_with_texts_and_samples_in_meta() {
        let p = |ids: &[i64], t: &str| Item::Prompt {
            ids: ids.to_vec(),
            text: t.into(),
            sample: json!({"id": t}),
            images: Vec::new(),
        };
        let (a, b) = (p(&[4, 5, 6], "a"), p(&[7], "b"));
        let (t, meta) = collate(Layout::Prompts, &[&a, &b], 9, None).unwrap();
        assert_eq!(rows(get(&t, "prompt_ids")), vec![vec![4, 5, 6], vec![9, 9, 7]]);
        assert_eq!(rows(get(&t, "prompt_mask")), vec![vec![1, 1, 1], vec![0, 0, 1]]);
        assert_eq!(meta["prompts"], json!(["a", "b"]));
        assert_eq!(meta["samples"][1]["id"], json!("b"));
        assert_eq!(meta["pad_token_id"], json!(9));
    }

    fn packed(parts: &[Encoded]) -> Item {
        let items = parts.iter().enumerate().map(|(r, e)| (r, Item::Seq(e.clone()))).collect();
        // One bin holds them all: a capacity of their total length, longest first.
        let cap = parts.iter().map(|e| e.input_ids.len()).sum();
        let (mut rows, _) = super::super::pack::pack_sequences(items, cap, 0).unwrap();
        rows.remove(0).1
    }

    /// Positions restart at every sample and on the padding, each sample's first token and
    /// the padding are unlabelled, and a packed batch has no attention mask.
    #[test]
    fn packed_rows_restart_positions_and_unlabel_sample_starts() {
        let a = packed(&[enc(&[11, 12, 13], 1), enc(&[21, 22], 0)]);
        let b = packed(&[enc(&[31, 32], 0)]);
        let (t, meta) = collate(Layout::Sequences, &[&a, &b], 0, None).unwrap();
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["input_ids", "labels", "position_ids"]);
        assert_eq!(
            rows(get(&t, "input_ids")),
            vec![vec![11, 12, 13, 21, 22], vec![31, 32, 0, 0, 0]]
        );
        assert_eq!(
            rows(get(&t, "labels")),
            vec![vec![-100, 12, 13, -100, 22], vec![-100, 32, -100, -100, -100]]
        );
        assert_eq!(rows(get(&t, "position_ids")), vec![vec![0, 1, 2, 0, 1], vec![0, 1, 0, 1, 2]]);
        assert!(meta.is_empty());
    }

    fn image(grid_thw: [i64; 3]) -> SampleImage {
        SampleImage {
            data: super::super::encode::ImageData::Bytes(Default::default()),
            min_pixels: 0,
            max_pixels: 0,
            original_size: (0, 0),
            resized_size: (0, 0),
            grid_thw,
            tokens: (grid_thw.iter().product::<i64>() / 4) as usize,
            video: None,
        }
    }

    /// The M-RoPE positions of each sample of a packed row are those the model computes for
    /// the sample collated alone (`get_rope_index` over its unpacked batch), and the padding
    /// counts from 0 on all three axes.
    #[test]
    fn packed_mrope_positions_are_each_samples_own() {
        const I: i64 = 9;
        let with_images = |ids: &[i64], grids: &[[i64; 3]]| Encoded {
            images: grids.iter().map(|&g| image(g)).collect(),
            ..enc(ids, 0)
        };
        // 1×4×6 → 6 tokens, 1×2×2 → 1 token, 1×4×4 → 4 tokens (merge 2).
        let samples = [
            with_images(&[1, 2, 5, I, I, I, I, I, I, 6, 3], &[[1, 4, 6]]),
            with_images(&[4, 5, I, 6, 7, 5, I, I, I, I, 6], &[[1, 2, 2], [1, 4, 4]]),
            with_images(&[8, 8, 8], &[]),
        ];
        let row = packed(&samples);
        let short = packed(&samples[2..]);
        let Item::Packed(p) = &row else { panic!("a packed row") };
        let (e, segs) = (&p.seq, p.segments.clone());
        let other = match &short {
            Item::Packed(q) => (&q.seq, q.segments.clone()),
            _ => panic!("a packed row"),
        };
        let mrope = Mrope {
            image_id: I,
            video_id: None,
            merge: 2,
            temporal_patch_size: 2,
            tokens_per_second: None,
        };
        let pos = packed_positions(&[(e, segs.clone()), other], Some(mrope)).unwrap();
        let width = e.input_ids.len() as i64;
        assert_eq!(pos.size(), [3, 2, width]);
        let mut start = 0;
        for (&len, &row_index) in segs.iter().zip(&p.rows) {
            let alone = &samples[row_index];
            let batch = pad_sequences(&[alone], 0);
            let ids: Vec<i64> = Vec::try_from(&batch[0].1.view([-1])).unwrap();
            let mask: Vec<i64> = Vec::try_from(&batch[1].1.view([-1])).unwrap();
            let grids: Vec<[i64; 3]> = alone.images.iter().map(|im| im.grid_thw).collect();
            let want = rope_index(&ids, 1, ids.len(), Some(&mask), &grids, I, 2).unwrap();
            let got = pos.narrow(1, 0, 1).narrow(2, start, len as i64).reshape([-1]);
            assert_eq!(Vec::<i64>::try_from(&got).unwrap(), want.positions, "sample {row_index}");
            start += len as i64;
        }
        let padding = pos.select(1, 1).narrow(1, 3, width - 3);
        let expected: Vec<i64> = (0..width - 3).collect();
        for axis in 0..3 {
            assert_eq!(Vec::<i64>::try_from(&padding.select(0, axis)).unwrap(), expected);
        }
        let mut bad = e.clone();
        bad.images.pop();
        let err = packed_positions(
            &[(&bad, segs)],
            Some(Mrope {
                image_id: I,
                video_id: None,
                merge: 2,
                temporal_patch_size: 2,
                tokens_per_second: None,
            }),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("packed row 0"), "{err:#}");
    }

    /// A packed sample with an image and a video gets the positions `get_rope_index` gives it
    /// alone: its image grid, its video grid and seconds per temporal patch (Qwen2.5-VL's time
    /// scaling), taken from the sample's own items even when the row's first sample has none.
    #[test]
    fn packed_mrope_positions_take_each_samples_videos() {
        const I: i64 = 9;
        const V: i64 = 10;
        let video = |grid_thw: [i64; 3], fps: f64| SampleImage {
            video: Some(crate::vision::VideoPlan {
                kind: crate::vision::VideoKind::Frames,
                total_frames: 4,
                native_fps: None,
                indices: vec![0, 1, 2, 3],
                fps,
                original_size: (56, 56),
                resized_size: (56, 56),
                min_pixels: 0,
                max_pixels: 0,
                grid_thw,
            }),
            ..image(grid_thw)
        };
        let plain = enc(&[8, 8, 8, 8], 0);
        let mut mixed = enc(&[1, I, 2, V, V, V, V, 3, 4], 0);
        mixed.images = vec![image([1, 2, 2]), video([2, 2, 4], 0.5)];
        let row = packed(&[plain.clone(), mixed.clone()]);
        let Item::Packed(p) = &row else { panic!("a packed row") };
        let tps = Some(2.0);
        let m = Mrope {
            image_id: I,
            video_id: Some(V),
            merge: 2,
            temporal_patch_size: 2,
            tokens_per_second: tps,
        };
        let pos = packed_positions(&[(&p.seq, p.segments.clone())], Some(m)).unwrap();
        let mut start = 0;
        for (&len, &r) in p.segments.iter().zip(&p.rows) {
            let alone = [&plain, &mixed][r];
            let images: Vec<[i64; 3]> =
                alone.images.iter().filter(|im| im.video.is_none()).map(|im| im.grid_thw).collect();
            let videos: Vec<[i64; 3]> =
                alone.images.iter().filter(|im| im.video.is_some()).map(|im| im.grid_thw).collect();
            let seconds = vec![4.0; videos.len()]; // 2 frames a patch at 0.5 fps
            let inputs = RopeInputs {
                image_grid_thw: &images,
                video_grid_thw: &videos,
                second_per_grid_ts: &seconds,
                tokens_per_second: tps,
                image_token_id: I,
                video_token_id: V,
                spatial_merge_size: 2,
            };
            let ids = &alone.input_ids;
            let want = rope_index_vision(ids, 1, ids.len(), None, &inputs).unwrap().positions;
            let got = pos.select(1, 0).narrow(1, start, len as i64).reshape([-1]);
            assert_eq!(Vec::<i64>::try_from(&got).unwrap(), want, "sample {r}");
            start += len as i64;
        }
        // The video's second temporal patch sits 2 · 4 = 8 positions after its first.
        let t = Vec::<i64>::try_from(pos.select(0, 0).select(0, 0)).unwrap();
        let at: usize =
            p.rows.iter().zip(&p.segments).take_while(|(&r, _)| r != 1).map(|(_, &l)| l).sum();
        assert_eq!(t[at + 5] - t[at + 3], 8, "{t:?}");
    }

    #[test]
    fn sequences_are_right_padded_through_the_layout() {
        let (a, b) = (Item::Seq(enc(&[5, 6, 7], 1)), Item::Seq(enc(&[8], 0)));
        let (t, meta) = collate(Layout::Sequences, &[&a, &b], 0, None).unwrap();
        assert_eq!(rows(get(&t, "input_ids")), vec![vec![5, 6, 7], vec![8, 0, 0]]);
        assert_eq!(rows(get(&t, "labels")), vec![vec![-100, 6, 7], vec![8, -100, -100]]);
        assert!(meta.is_empty());
    }
}
