//! Sample packing (`data.packing`, LLaMA-Factory's `neat_packing`): several training sequences
//! share one row of at most `cutoff_len` tokens and never attend to one another.
//!
//! The rows come from a first-fit-decreasing bin packer (samples longest first, ties by their
//! order; each goes into the first row with room, else opens a new one), then take a seeded
//! order. A packed row is the concatenation of its samples' ids, labels and images, and
//! remembers each sample's length ([`Packed::segments`]); the first token of every sample is
//! unlabelled, so that no label crosses a sample boundary (position t predicts label t + 1:
//! the last token of one sample is never trained to predict the first of the next). The
//! collated batch restarts `position_ids` at 0 at every sample and carries no attention mask;
//! the model keeps the samples apart by those restarts (see `model::attention`).
use anyhow::{bail, Result};

use super::encode::{Encoded, IGNORE_INDEX};
use super::layout::Item;
use crate::util::rng::SplitMix64;

/// A row of packed samples.
#[derive(Clone, Debug)]
pub struct Packed {
    /// The samples' ids, labels and images, concatenated (each sample's first label −100).
    pub seq: Encoded,
    /// Each sample's length, in order (they sum to the row's length).
    pub segments: Vec<usize>,
    /// Each sample's row in the data set, in order.
    pub rows: Vec<usize>,
}

/// What packing did: samples into rows of at most `capacity` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PackStats {
    pub samples: usize,
    pub rows: usize,
    pub tokens: usize,
    pub capacity: usize,
}

impl PackStats {
    /// Tokens over the rows' room (`rows × capacity`).
    pub fn fill_ratio(&self) -> f64 {
        self.tokens as f64 / (self.rows * self.capacity).max(1) as f64
    }

    /// `N samples → M rows of at most C tokens (T tokens, fill F%)`.
    pub fn describe(&self) -> String {
        format!(
            "{} samples → {} rows of at most {} tokens ({} tokens, fill {:.1}%)",
            self.samples,
            self.rows,
            self.capacity,
            self.tokens,
            100.0 * self.fill_ratio()
        )
    }
}

/// Per slot, the room left; finds the first slot with room for a length in O(log n).
struct FirstFit {
    leaves: usize,
    max: Vec<usize>,
}

impl FirstFit {
    fn new(slots: usize, capacity: usize) -> Self {
        let leaves = slots.next_power_of_two();
        let mut max = vec![0; 2 * leaves];
        max[leaves..leaves + slots].fill(capacity);
        for i in (1..leaves).rev() {
            max[i] = max[2 * i].max(max[2 * i + 1]);
        }
        Self { leaves, max }
    }

    /// The first slot with at least `len` room left, which then has `len` less.
    fn place(&mut self, len: usize) -> Option<usize> {
        if self.max[1] < len {
            return None;
        }
        let mut i = 1;
        while i < self.leaves {
            i = if self.max[2 * i] >= len { 2 * i } else { 2 * i + 1 };
        }
        self.max[i] -= len;
        let slot = i - self.leaves;
        while i > 1 {
            i /= 2;
            self.max[i] = self.max[2 * i].max(self.max[2 * i + 1]);
        }
        Some(slot)
    }
}

/// First-fit decreasing: the indices of `lengths` in bins of at most `capacity`, each bin in
/// the order its samples went in (longest first). A length over `capacity` is an error.
pub fn first_fit_decreasing(lengths: &[usize], capacity: usize) -> Result<Vec<Vec<usize>>> {
    if let Some(i) = lengths.iter().position(|&l| l > capacity) {
        bail!(
            "sample {i} has {} tokens, more than data.cutoff_len {capacity}: it cannot be packed",
            lengths[i]
        );
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut fit = FirstFit::new(lengths.len().max(1), capacity);
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for i in order {
        // Bins open in slot order, so a fresh slot is always the next bin.
        let Some(slot) = fit.place(lengths[i]) else {
            bail!("internal: no packing slot left for sample {i}")
        };
        if slot == bins.len() {
            bins.push(Vec::new());
        }
        bins[slot].push(i);
    }
    Ok(bins)
}

/// What packing sequences of `lengths` into rows of `capacity` tokens gives, and the rows
/// (see [`first_fit_decreasing`]).
pub fn pack_stats(lengths: &[usize], capacity: usize) -> Result<(PackStats, Vec<Vec<usize>>)> {
    let bins = first_fit_decreasing(lengths, capacity)?;
    let stats = PackStats {
        samples: lengths.len(),
        rows: bins.len(),
        tokens: lengths.iter().sum(),
        capacity,
    };
    Ok((stats, bins))
}

/// One packed row of `samples` (row index and sequence each), in order.
fn packed_row(samples: Vec<(usize, Encoded)>) -> Packed {
    let mut seq = Encoded {
        input_ids: Vec::new(),
        labels: Vec::new(),
        truncated_from: None,
        images: Vec::new(),
    };
    let (mut segments, mut rows) = (Vec::new(), Vec::new());
    for (row, e) in samples {
        let start = seq.labels.len();
        segments.push(e.input_ids.len());
        rows.push(row);
        seq.input_ids.extend(e.input_ids);
        seq.labels.extend(e.labels);
        if start < seq.labels.len() {
            seq.labels[start] = IGNORE_INDEX;
        }
        seq.images.extend(e.images);
    }
    Packed { seq, segments, rows }
}

/// Packs training sequences into rows of at most `capacity` tokens (first-fit decreasing),
/// the rows in an order drawn from `seed`. Each row is listed under its first sample's row.
pub fn pack_sequences(
    items: Vec<(usize, Item)>,
    capacity: usize,
    seed: u64,
) -> Result<(Vec<(usize, Item)>, PackStats)> {
    let mut seqs = Vec::with_capacity(items.len());
    for (row, item) in items {
        let Item::Seq(e) = item else {
            bail!("data.packing packs sequences (SFT); row {row} is not one")
        };
        seqs.push(Some((row, e)));
    }
    let lengths: Vec<usize> = seqs.iter().flatten().map(|(_, e)| e.input_ids.len()).collect();
    let (stats, bins) = pack_stats(&lengths, capacity)?;
    let mut packed: Vec<Packed> = bins
        .iter()
        .map(|bin| packed_row(bin.iter().filter_map(|&i| seqs[i].take()).collect()))
        .collect();
    let order = SplitMix64(seed).permutation(packed.len());
    let mut out = Vec::with_capacity(packed.len());
    for i in order {
        let p = std::mem::replace(&mut packed[i], packed_row(Vec::new()));
        out.push((p.rows[0], Item::Packed(p)));
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(len: usize, first: i64) -> Item {
        let ids: Vec<i64> = (0..len as i64).map(|k| first + k).collect();
        Item::Seq(Encoded {
            input_ids: ids.clone(),
            labels: ids,
            truncated_from: None,
            images: Vec::new(),
        })
    }

    /// A hand case: sorted 7, 5, 4, 3, 2, 2, 1 into bins of 8 by first fit.
    #[test]
    fn first_fit_decreasing_by_hand() {
        let lengths = [2, 5, 3, 7, 1, 4, 2];
        let bins = first_fit_decreasing(&lengths, 8).unwrap();
        // 7 → A; 5 → B; 4 → C; 3 → B (8); 2 (idx 0) → C; 2 (idx 6) → C (8); 1 → A (8).
        assert_eq!(bins, vec![vec![3, 4], vec![1, 2], vec![5, 0, 6]]);
        let e = first_fit_decreasing(&[3, 9], 8).unwrap_err().to_string();
        assert!(e.contains("data.cutoff_len") && e.contains("sample 1"), "{e}");
        assert!(first_fit_decreasing(&[], 8).unwrap().is_empty());
    }

    /// Every sample lands in exactly one row, no row is over the cutoff, each sample's first
    /// label is −100 and the rest are its own, and the same seed gives the same rows.
    #[test]
    fn packing_keeps_every_sample_once_within_the_cutoff() {
        let lengths = [5usize, 9, 1, 16, 7, 3, 3, 12, 2, 8, 4, 6];
        let items: Vec<(usize, Item)> =
            lengths.iter().enumerate().map(|(r, &l)| (r, seq(l, 1000 * r as i64))).collect();
        let (rows, stats) = pack_sequences(items.clone(), 16, 5).unwrap();
        assert_eq!(stats.samples, 12);
        assert_eq!(stats.tokens, lengths.iter().sum::<usize>());
        assert_eq!(stats.rows, rows.len());
        assert!((stats.fill_ratio() - 76.0 / (16.0 * rows.len() as f64)).abs() < 1e-12);
        let mut seen = Vec::new();
        for (first, item) in &rows {
            let Item::Packed(p) = item else { panic!("a packed row") };
            assert!(p.seq.input_ids.len() <= 16);
            assert_eq!(p.segments.iter().sum::<usize>(), p.seq.input_ids.len());
            assert_eq!(*first, p.rows[0]);
            let mut at = 0;
            for (&row, &len) in p.rows.iter().zip(&p.segments) {
                assert_eq!(len, lengths[row]);
                let ids = &p.seq.input_ids[at..at + len];
                assert_eq!(ids[0], 1000 * row as i64, "sample {row}'s own ids");
                assert_eq!(p.seq.labels[at], IGNORE_INDEX);
                assert_eq!(&p.seq.labels[at + 1..at + len], &ids[1..]);
                at += len;
            }
            seen.extend(p.rows.iter().copied());
        }
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        let again = pack_sequences(items.clone(), 16, 5).unwrap().0;
        let order = |r: &[(usize, Item)]| r.iter().map(|(i, _)| *i).collect::<Vec<_>>();
        assert_eq!(order(&rows), order(&again));
        let e = pack_sequences(vec![(0, seq(17, 0))], 16, 5).unwrap_err().to_string();
        assert!(e.contains("data.cutoff_len"), "{e}");
    }
}
