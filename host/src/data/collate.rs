//! A micro-batch of training items as the tensors (and metadata) its objective reads, for
//! every batch layout (see [`super::layout`]).
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use tch::Tensor;

use super::encode::{Encoded, IGNORE_INDEX};
use super::images::ImagePrep;
use super::layout::{Item, Layout};

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
/// pad id in the metadata.
fn prompt_tensors(
    items: &[&Item],
    pad_id: i64,
    meta: &mut Map<String, Value>,
) -> Result<NamedTensors> {
    let mut prompts = Vec::new();
    let (mut texts, mut samples) = (Vec::new(), Vec::new());
    for item in items {
        let Item::Prompt { ids, text, sample } = item else {
            bail!("internal: a row of another layout in a prompts batch")
        };
        prompts.push(ids);
        texts.push(Value::String(text.clone()));
        samples.push(sample.clone());
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
    Ok(vec![
        ("prompt_ids".into(), Tensor::from_slice(&ids).view(shape)),
        ("prompt_mask".into(), Tensor::from_slice(&mask).view(shape)),
    ])
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
            Some(p) => {
                let owned: Vec<Encoded> = encs
                    .iter()
                    .map(|e| Encoded {
                        input_ids: Vec::new(),
                        labels: Vec::new(),
                        truncated_from: None,
                        images: e.images.clone(),
                    })
                    .collect();
                p.batch_tensors(&owned)
            }
            None => Ok(Vec::new()),
        }
    };
    let mut tensors = Vec::new();
    match layout {
        Layout::Sequences => {
            let encs: Vec<Encoded> = seqs(&|i| if let Item::Seq(e) = i { Some(e) } else { None })?
                .into_iter()
                .cloned()
                .collect();
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
        }
        Layout::Kto => {
            let encs = seqs(&|i| if let Item::Kto { seq, .. } = i { Some(seq) } else { None })?;
            tensors = kto_tensors(items, &encs, pad_id);
            tensors.extend(images(&encs)?);
        }
        Layout::Prompts => tensors = prompt_tensors(items, pad_id, &mut meta)?,
    }
    Ok((tensors, meta))
}

/// `input_ids`, `attention_mask` and `labels`, each int64 `[B, T]` with `T` the longest
/// sequence; shorter rows are padded on the right with `pad_id` (mask 0, label −100). Ready
/// for `ferrotune_plugin_api::Batch::tensors`. An empty batch gives `[0, 0]` tensors.
fn pad_sequences(batch: &[Encoded], pad_id: i64) -> Vec<(String, Tensor)> {
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
        let out = pad_sequences(&[a, b], 0);
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
        let a = Item::Pair { chosen: enc(&[5, 6, 7], 2), rejected: enc(&[5, 6, 8, 9], 2) };
        let b = Item::Pair { chosen: enc(&[3, 4], 1), rejected: enc(&[3, 9], 1) };
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
        };
        let (a, b) = (p(&[4, 5, 6], "a"), p(&[7], "b"));
        let (t, meta) = collate(Layout::Prompts, &[&a, &b], 9, None).unwrap();
        assert_eq!(rows(get(&t, "prompt_ids")), vec![vec![4, 5, 6], vec![9, 9, 7]]);
        assert_eq!(rows(get(&t, "prompt_mask")), vec![vec![1, 1, 1], vec![0, 0, 1]]);
        assert_eq!(meta["prompts"], json!(["a", "b"]));
        assert_eq!(meta["samples"][1]["id"], json!("b"));
        assert_eq!(meta["pad_token_id"], json!(9));
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
