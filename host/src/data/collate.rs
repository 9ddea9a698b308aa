//! Encoded samples as one padded batch of tensors.
use tch::Tensor;

use super::encode::{Encoded, IGNORE_INDEX};

/// `input_ids`, `attention_mask` and `labels`, each int64 `[B, T]` with `T` the longest
/// sequence; shorter rows are padded on the right with `pad_id` (mask 0, label −100). Ready
/// for `ferrotune_plugin_api::Batch::tensors`. An empty batch gives `[0, 0]` tensors.
pub fn collate(batch: &[Encoded], pad_id: i64) -> Vec<(String, Tensor)> {
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

    #[test]
    fn right_pads_masks_and_ignores_padding() {
        let a = Encoded { input_ids: vec![5, 6, 7], labels: vec![-100, 6, 7], truncated_from: None, images: Vec::new() };
        let b = Encoded { input_ids: vec![8], labels: vec![8], truncated_from: Some(9), images: Vec::new() };
        let out = collate(&[a, b], 0);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask", "labels"]);
        assert!(out.iter().all(|(_, t)| t.size() == [2, 3] && t.kind() == tch::Kind::Int64));
        assert_eq!(rows(&out[0].1), [[5, 6, 7], [8, 0, 0]]);
        assert_eq!(rows(&out[1].1), [[1, 1, 1], [1, 0, 0]]);
        assert_eq!(rows(&out[2].1), [[-100, 6, 7], [8, -100, -100]]);
        assert_eq!(collate(&[], 0)[0].1.size(), [0, 0]);
    }
}
