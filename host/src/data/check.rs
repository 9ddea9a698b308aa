//! `ferrotune data check`: every row of a run's data through the trainer's own pipeline
//! (dataset plugin, images, chat template, truncation), reported per row before any training.
use std::path::PathBuf;

use super::encode::end_of_turn_ids;
use super::pack::{pack_stats, PackStats};
use super::{Prepared, IGNORE_INDEX};
use crate::text::Tokenizer;

/// What is wrong with a row, or worth knowing about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowNote {
    pub row: usize,
    /// `error`: the row cannot be used (`data.on_bad_sample` decides); `skipped`: it has
    /// nothing to learn (no label tokens left, an identical preference pair, a prompt that
    /// leaves no room for a completion) and is always skipped; `warning`: it trains, perhaps
    /// not as meant.
    pub level: &'static str,
    pub message: String,
}

/// The whole data set's check.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    pub rows: usize,
    pub usable: usize,
    pub errors: usize,
    pub skipped: usize,
    pub warnings: usize,
    pub images: usize,
    pub image_tokens: usize,
    pub videos: usize,
    pub video_tokens: usize,
    /// Frames kept of all videos, and the frames they had.
    pub video_frames: usize,
    pub video_frames_total: usize,
    pub label_tokens: usize,
    pub max_tokens: usize,
    /// With `data.packing`: the usable samples packed into rows of `cutoff_len` tokens
    /// (before the eval split takes its share).
    pub packing: Option<PackStats>,
    pub notes: Vec<RowNote>,
    /// With `data.datasets`: the counts of each data set (see `super::registry`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<super::registry::DatasetCheck>,
}

/// Reviews prepared rows: errors for rows that cannot be used (refused by the plugin, bad or
/// missing images, placeholder counts, cut image blocks, no label left), warnings for
/// truncation, labels that do not end with an end-of-turn token (the model would not learn to
/// stop) and images shrunk to fit `max_pixels`.
pub fn review(prepared: &Prepared, tok: &Tokenizer, path: PathBuf) -> CheckReport {
    // A preference pair is two sequences of one row: count rows.
    let sequences = prepared.sequences();
    let usable =
        sequences.iter().map(|(row, _)| *row).collect::<std::collections::BTreeSet<_>>().len();
    let mut r = CheckReport { path, rows: prepared.rows, usable, ..Default::default() };
    let eot = end_of_turn_ids(tok);
    let eot_names: Vec<String> = eot.iter().filter_map(|&i| tok.id_to_token(i)).collect();
    let mut notes = Vec::new();
    for (row, msg) in &prepared.bad {
        notes.push(RowNote { row: *row, level: "error", message: msg.clone() });
    }
    for (row, msg) in &prepared.skipped {
        notes.push(RowNote { row: *row, level: "skipped", message: msg.clone() });
    }
    for (row, e) in &sequences {
        let row = *row;
        let warn = |message: String| RowNote { row, level: "warning", message };
        for im in &e.images {
            match &im.video {
                None => {
                    r.images += 1;
                    r.image_tokens += im.tokens;
                }
                Some(v) => {
                    r.videos += 1;
                    r.video_tokens += im.tokens;
                    r.video_frames += v.indices.len();
                    r.video_frames_total += v.total_frames;
                }
            }
        }
        r.label_tokens += e.num_label_tokens();
        r.max_tokens = r.max_tokens.max(e.input_ids.len());
        if let Some(from) = e.truncated_from {
            notes.push(warn(format!("truncated from {from} to {} tokens", e.input_ids.len())));
        }
        let last_label = e.labels.iter().rposition(|&l| l != IGNORE_INDEX);
        if let Some(j) = last_label {
            if !eot.is_empty() && !eot.contains(&e.input_ids[j]) {
                notes.push(warn(format!(
                    "the labels end without an end-of-turn token ({}): the model will not learn to stop{}",
                    eot_names.join(", "),
                    if e.truncated_from.is_some() { " (truncation cut the answer)" } else { "" }
                )));
            }
        }
        for (k, im) in e.images.iter().filter(|im| im.video.is_none()).enumerate() {
            let (w, h) = im.original_size;
            if u64::from(w) * u64::from(h) > im.max_pixels {
                notes.push(warn(format!(
                    "image {k}: {w}×{h} is above max_pixels {}; resized to {}×{}",
                    im.max_pixels, im.resized_size.0, im.resized_size.1
                )));
            }
        }
        for (k, im) in e.images.iter().filter(|im| im.video.is_some()).enumerate() {
            let (w, h) = im.original_size;
            if u64::from(w) * u64::from(h) > im.max_pixels {
                notes.push(warn(format!(
                    "video {k}: frames {w}×{h} are above the per-frame max_pixels {}; resized to {}×{}",
                    im.max_pixels, im.resized_size.0, im.resized_size.1
                )));
            }
        }
    }
    notes.sort_by_key(|n| (n.row, n.level != "error"));
    r.errors = notes.iter().filter(|n| n.level == "error").count();
    r.skipped = notes.iter().filter(|n| n.level == "skipped").count();
    r.warnings = notes.len() - r.errors - r.skipped;
    r.notes = notes;
    r
}

/// How `data.packing` would pack the rows of `prepared` that train (those with a label token)
/// into rows of `cutoff_len` tokens.
pub fn packing(prepared: &Prepared, cutoff_len: usize) -> anyhow::Result<PackStats> {
    let lengths: Vec<usize> = prepared
        .items
        .iter()
        .filter(|(_, i)| i.label_tokens() > 0)
        .map(|(_, i)| i.tokens())
        .collect();
    Ok(pack_stats(&lengths, cutoff_len)?.0)
}
