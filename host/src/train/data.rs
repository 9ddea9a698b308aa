//! The run's data: read through the dataset plugin, encoded in the objective's batch layout,
//! split into train and eval sets, and drawn in a seeded order shared by every rank.
use anyhow::{bail, Result};
use ferrotune_plugin_api::{Objective, Sample};

use super::config::{self, TrainConfig};
use crate::data::layout::{self, Item, Layout, Prepared};
use crate::data::pack::{pack_sequences, PackStats};
use crate::data::{self, EncodeOptions, ImagePrep};
use crate::plugins::Registry;
use crate::text::Tokenizer;

/// A permutation of `0..n` determined by `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    crate::util::rng::SplitMix64(seed).permutation(n)
}

/// Samples in an order of length groups (transformers' `get_length_grouped_indices`): the
/// permutation drawn from `seed` cut into megabatches of `megabatch` samples, each sorted
/// longest first (ties in drawn order), and the megabatch holding the longest sample swapped
/// to the front, so that the first step shows the run's peak memory.
pub fn length_grouped(lengths: &[usize], megabatch: usize, seed: u64) -> Vec<usize> {
    let mut megabatches: Vec<Vec<usize>> = permutation(lengths.len(), seed)
        .chunks(megabatch.max(1))
        .map(|m| {
            let mut m = m.to_vec();
            m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            m
        })
        .collect();
    let longest =
        (0..megabatches.len()).max_by_key(|&k| (lengths[megabatches[k][0]], std::cmp::Reverse(k)));
    if let Some(k) = longest {
        megabatches.swap(0, k);
    }
    megabatches.concat()
}

/// The megabatch of [`length_grouped`] for `n` samples drawn `batch` per optimizer step
/// (micro-batch × accumulation × ranks): 50 steps' samples, fewer when that leaves under four
/// megabatches (transformers' `mega_batch_mult`), at least one step's.
pub fn megabatch_size(n: usize, batch: usize) -> usize {
    batch * (n / (batch * 4).max(1)).clamp(1, 50)
}

/// The order in which micro-batches are drawn: epoch after epoch over the training set.
pub(crate) struct DataOrder {
    pub n: usize,
    pub micro: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// `data.group_by_length`: each sample's length and the megabatch size (see
    /// [`length_grouped`]; it draws its own seeded order whatever `shuffle` says).
    pub by_length: Option<(Vec<usize>, usize)>,
}

impl DataOrder {
    pub fn micro_per_epoch(&self) -> usize {
        self.n.div_ceil(self.micro)
    }

    /// Every sample of epoch `epoch`, in the order they are drawn.
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let seed = self.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407);
        match &self.by_length {
            Some((lengths, megabatch)) => length_grouped(lengths, *megabatch, seed),
            None if self.shuffle => permutation(self.n, seed),
            None => (0..self.n).collect(),
        }
    }

    /// Sample indices of global micro-batch `k`, and its epoch.
    pub fn micro_batch(&self, k: usize) -> (usize, Vec<usize>) {
        let per = self.micro_per_epoch();
        let (epoch, within) = (k / per, k % per);
        let order = self.epoch_order(epoch);
        let start = within * self.micro;
        (epoch, order[start..(start + self.micro).min(self.n)].to_vec())
    }
}

/// The image settings of a run on a vision model (none for a text model).
pub fn image_prep(cfg: &TrainConfig, tok: &Tokenizer) -> Result<Option<ImagePrep>> {
    let mut prep = ImagePrep::for_model_dir(&cfg.model, tok)?;
    if let Some(p) = prep.as_mut() {
        p.min_pixels = cfg.data.image_min_pixels;
        p.max_pixels = cfg.data.image_max_pixels;
        p.max_image_pixels = cfg.data.max_image_pixels;
        p.video = cfg.data.video_options(p.video.clone())?;
    }
    Ok(prep)
}

/// The run's encoding options.
pub fn encode_options(cfg: &TrainConfig) -> EncodeOptions {
    EncodeOptions {
        cutoff_len: cfg.data.cutoff_len,
        train_on_prompt: cfg.data.train_on_prompt,
        mask_history: cfg.data.mask_history,
    }
}

/// Every row of the run's data: `data.path` read by its dataset plugin, or the data sets of
/// LLaMA-Factory's registry mixed (see [`data::registry::read`]).
pub fn config_rows(cfg: &TrainConfig, registry: &Registry) -> Result<Vec<Result<Sample, String>>> {
    Ok(data::registry::read(&cfg.data, cfg.seed, registry)?.rows)
}

/// [`read_data`], and which data set each row came from (for `data check`).
pub fn read_data_sets(
    cfg: &TrainConfig,
    registry: &Registry,
    tok: &Tokenizer,
    prep: Option<&ImagePrep>,
) -> Result<(Prepared, data::registry::Origins)> {
    let objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
    let layout = Layout::from_needs(&cfg.objective.plugin, &objective.needs())?;
    let rows = data::registry::read(&cfg.data, cfg.seed, registry)?;
    Ok((layout::prepare(layout, rows.rows, tok, prep, &encode_options(cfg))?, rows.origins))
}

/// Reads and encodes the run's data as the trainer does, in the batch layout of the run's
/// objective, every row kept or reported.
pub fn read_data(
    cfg: &TrainConfig,
    registry: &Registry,
    tok: &Tokenizer,
    prep: Option<&ImagePrep>,
) -> Result<Prepared> {
    let objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
    let layout = Layout::from_needs(&cfg.objective.plugin, &objective.needs())?;
    let rows = config_rows(cfg, registry)?;
    layout::prepare(layout, rows, tok, prep, &encode_options(cfg))
}

/// Reads the run's data and encodes it in the objective's batch layout; with
/// `on_bad_sample: stop`, any unusable row stops the run before training, listing them all.
pub(crate) fn prepare_data(
    cfg: &TrainConfig,
    registry: &Registry,
    tok: &Tokenizer,
    prep: Option<&ImagePrep>,
    layout: Layout,
) -> Result<Prepared> {
    let rows = config_rows(cfg, registry)?;
    let prepared = layout::prepare(layout, rows, tok, prep, &encode_options(cfg))?;
    if !prepared.bad.is_empty() {
        if cfg.data.on_bad_sample == config::OnBadSample::Stop {
            bail!(
                "{} of the {} rows of {} cannot be used as {} (data.on_bad_sample: stop; set it to skip to train without them; \
                 `ferrotune data check` reports every row):\n{}",
                prepared.bad.len(),
                prepared.rows,
                data::registry::describe(&cfg.data),
                layout.name(),
                prepared.bad_report(20)
            );
        }
        eprintln!(
            "note: skipping {} unusable rows of {}:\n{}",
            prepared.bad.len(),
            data::registry::describe(&cfg.data),
            prepared.bad_report(20)
        );
    }
    for (i, why) in &prepared.skipped {
        tracing::warn!("row {i}: {why}; skipped");
    }
    Ok(prepared)
}

/// Rank `rank`'s share of a global micro-batch: its `per_rank` samples in order (fewer, or
/// none, at the short end of an epoch).
///
/// The global batch of an optimizer step is `micro_batch_size × gradient_accumulation_steps ×
/// world_size` samples: global micro-batch k of the data order holds `micro_batch_size ×
/// world_size` samples and rank r takes samples `r·mbs .. (r+1)·mbs` of it. A run on N ranks
/// therefore trains on the same samples per step as one process with `micro_batch_size × N`
/// (and, when the data size divides, as one with `gradient_accumulation_steps × N`). A
/// sequence loss is divided by the label tokens of the whole global step and scaled by the
/// world size before its backward, so the averaged gradient is the one-process gradient.
pub fn rank_share(global: &[usize], rank: usize, per_rank: usize) -> &[usize] {
    let start = (rank * per_rank).min(global.len());
    &global[start..(start + per_rank).min(global.len())]
}

/// A run's samples: the training set and the held-out eval set (row index and item each),
/// and what was left out of both.
pub struct RunData {
    pub train: Vec<(usize, Item)>,
    pub eval: Vec<(usize, Item)>,
    pub truncated: usize,
    pub skipped: usize,
    /// How the training samples were packed into `train`'s rows (`data.packing`).
    pub packing: Option<PackStats>,
}

impl RunData {
    /// Rows already encoded, all of them for training.
    pub fn given(train: Vec<(usize, Item)>) -> Self {
        Self { train, eval: Vec::new(), truncated: 0, skipped: 0, packing: None }
    }

    /// Training samples (packed or not).
    pub fn train_samples(&self) -> usize {
        self.packing.map_or(self.train.len(), |p| p.samples)
    }

    /// With `data.packing`, packs the training samples into rows of at most
    /// `data.cutoff_len` tokens in an order drawn from the run's seed (see
    /// [`crate::data::pack`]); the eval set stays unpacked. Returns what packing did.
    pub fn pack(&mut self, cfg: &TrainConfig) -> Result<Option<PackStats>> {
        if !cfg.data.packing {
            return Ok(None);
        }
        let (rows, stats) =
            pack_sequences(std::mem::take(&mut self.train), cfg.data.cutoff_len, cfg.seed)?;
        self.train = rows;
        self.packing = Some(stats);
        Ok(Some(stats))
    }

    /// The usable rows of `prepared` (those with a label), split into train and eval by
    /// `data.eval_ratio`: a seeded random subset is held out, training keeps the file order
    /// (shuffled per epoch by [`DataOrder`]). Notes on stderr count what was truncated or
    /// skipped; a run with no training sample left is an error that says why.
    pub fn split(cfg: &TrainConfig, prepared: Prepared, layout: Layout) -> Result<Self> {
        let (rows, truncated) = (prepared.rows, prepared.truncated());
        let mut skipped = prepared.skipped.len() + prepared.bad.len();
        let mut encoded = Vec::with_capacity(prepared.items.len());
        for (row, e) in prepared.items {
            if e.label_tokens() > 0 {
                encoded.push((row, e))
            } else {
                skipped += 1
            }
        }
        if truncated > 0 {
            eprintln!(
                "note: {truncated} of {} samples were longer than cutoff_len {} and were truncated",
                encoded.len(),
                cfg.data.cutoff_len
            );
        }
        if skipped > 0 {
            eprintln!(
                "note: {skipped} samples were skipped ({} with nothing to learn, {} unusable)",
                skipped - prepared.bad.len(),
                prepared.bad.len()
            );
        }
        let eval_n = (encoded.len() as f64 * cfg.data.eval_ratio).round() as usize;
        let mut is_eval = vec![false; encoded.len()];
        for &i in permutation(encoded.len(), cfg.seed).iter().take(eval_n) {
            is_eval[i] = true;
        }
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for (e, held_out) in encoded.into_iter().zip(is_eval) {
            if held_out {
                eval.push(e)
            } else {
                train.push(e)
            }
        }
        if train.is_empty() {
            if eval.is_empty() {
                bail!(
                    "no training samples left in {}: none of its {} samples {} (each skip is logged above): \
                     check that the samples have non-empty assistant turns, or raise `data.cutoff_len` ({}) if they \
                     were truncated",
                    data::registry::describe(&cfg.data),
                    rows,
                    if layout == Layout::Sequences { "has a label token".to_string() } else { format!("can be used as {}", layout.name()) },
                    cfg.data.cutoff_len
                );
            }
            bail!(
                "no training samples left in {}: `data.eval_ratio` {} puts all {} usable samples in the eval split; lower it",
                data::registry::describe(&cfg.data),
                cfg.data.eval_ratio,
                eval.len()
            );
        }
        Ok(Self { train, eval, truncated, skipped, packing: None })
    }
}

/// The data's fingerprint that a checkpoint records and `--resume` compares: a 64-bit FNV-1a
/// hash of the bytes of the data file (of every file under a data folder, with its relative
/// name, in name order) and of each encoded sample's row, token count and label-token count,
/// and the train and eval sample counts (`data.fingerprint`, `data.train_samples`,
/// `data.eval_samples`). Another file or an edited row changes it, and so does a tokenizer or
/// chat template that changes a sample's token count.
pub fn data_fingerprint(
    paths: &[std::path::PathBuf],
    data: &RunData,
) -> Result<Vec<(String, serde_json::Value)>> {
    let mut h = Fnv64::default();
    // Each path's files in turn (one path hashes as it did before registries existed).
    let mut files = Vec::new();
    for path in paths {
        let mut of_path = Vec::new();
        list_files(path, &mut of_path)?;
        of_path.sort();
        files.extend(of_path.into_iter().map(|f| (path, f)));
    }
    for (path, f) in &files {
        h.bytes(f.strip_prefix(path).unwrap_or(f).to_string_lossy().as_bytes());
        let mut file = std::fs::File::open(f)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
            if n == 0 {
                break;
            }
            h.bytes(&buf[..n]);
        }
    }
    for (row, item) in data.train.iter().chain(&data.eval) {
        for n in [*row, item.tokens(), item.label_tokens() as usize] {
            h.bytes(&(n as u64).to_le_bytes());
        }
    }
    Ok(vec![
        ("data.fingerprint".into(), serde_json::json!(format!("fnv1a64:{:016x}", h.0))),
        ("data.train_samples".into(), serde_json::json!(data.train.len())),
        ("data.eval_samples".into(), serde_json::json!(data.eval.len())),
    ])
}

fn list_files(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    if p.is_dir() {
        let entries = std::fs::read_dir(p)
            .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", p.display()))?;
        for e in entries.flatten() {
            list_files(&e.path(), out)?;
        }
    } else if p.is_file() {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// 64-bit FNV-1a.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The `data check` report of run config `config` (`data check`, and `board`'s inline check).
pub fn review_data(
    registry: &Registry,
    config: &std::path::Path,
) -> Result<(TrainConfig, crate::data::check::CheckReport)> {
    let cfg = TrainConfig::from_file(config)?;
    let tok = crate::text::Tokenizer::from_dir(&cfg.model)?;
    let prep = image_prep(&cfg, &tok)?;
    let (prepared, origins) = read_data_sets(&cfg, registry, &tok, prep.as_ref())?;
    let what = crate::data::registry::describe(&cfg.data);
    let mut report = crate::data::check::review(&prepared, &tok, what.into());
    crate::data::registry::check_by_dataset(&mut report, &prepared, &origins);
    if cfg.data.datasets.is_none() {
        report.datasets.clear();
    }
    if cfg.data.packing {
        report.packing = Some(crate::data::check::packing(&prepared, cfg.data.cutoff_len)?);
    }
    Ok((cfg, report))
}

/// Whether training would stop on `report`'s bad rows (`data.on_bad_sample: stop`).
pub fn would_stop(cfg: &TrainConfig, report: &crate::data::check::CheckReport) -> bool {
    report.errors > 0 && cfg.data.on_bad_sample == config::OnBadSample::Stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let p = permutation(100, 7);
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(p, permutation(100, 7));
        assert_ne!(p, permutation(100, 8));
    }

    /// Two ranks' shares of each global micro-batch are disjoint and cover it in order: the
    /// samples a one-process run with micro_batch_size × 2 sees.
    #[test]
    fn rank_shares_partition_the_global_micro_batch() {
        let global = [7, 3, 9, 1, 4];
        assert_eq!(rank_share(&global, 0, 3), [7, 3, 9]);
        assert_eq!(rank_share(&global, 1, 3), [1, 4]);
        assert!(rank_share(&global, 2, 3).is_empty());
        let o = DataOrder { n: 11, micro: 4, seed: 3, shuffle: true, by_length: None };
        for k in 0..6 {
            let (_, idx) = o.micro_batch(k);
            assert_eq!([rank_share(&idx, 0, 2), rank_share(&idx, 1, 2)].concat(), idx);
        }
    }

    #[test]
    fn data_order_covers_each_epoch_once() {
        let o = DataOrder { n: 7, micro: 3, seed: 1, shuffle: true, by_length: None };
        assert_eq!(o.micro_per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|k| o.micro_batch(k).1).collect();
        seen.sort();
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        assert_eq!(o.micro_batch(3).0, 1, "micro-batch 3 starts epoch 1");
        assert_eq!(o.micro_batch(2).1.len(), 1, "the last micro-batch of an epoch is short");
    }

    /// Each epoch is a permutation of the samples, cut into megabatches each sorted longest
    /// first, the longest sample first of all; the order is seeded and differs per epoch.
    #[test]
    fn length_grouped_order_sorts_each_megabatch() {
        let lengths: Vec<usize> = (0..37).map(|i| (i * 17) % 23 + 1).collect();
        assert_eq!(megabatch_size(37, 2), 8);
        assert_eq!(megabatch_size(10_000, 4), 200);
        assert_eq!(megabatch_size(3, 4), 4);
        let o = DataOrder {
            n: 37,
            micro: 2,
            seed: 9,
            shuffle: false,
            by_length: Some((lengths.clone(), 8)),
        };
        let epoch = |e: usize| -> Vec<usize> {
            (e * 19..(e + 1) * 19).flat_map(|k| o.micro_batch(k).1).collect()
        };
        let first = epoch(0);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..37).collect::<Vec<_>>());
        for m in first.chunks(8) {
            assert!(m.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]), "{m:?}");
        }
        assert_eq!(lengths[first[0]], *lengths.iter().max().unwrap());
        assert_eq!(first, epoch(0), "deterministic");
        assert_ne!(first, epoch(1), "another order each epoch");
        assert_eq!(length_grouped(&lengths, 8, 9), first);
    }

    #[test]
    fn the_data_fingerprint_follows_every_byte_of_the_data() {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-fingerprint-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let (a, b) = (dir.join("a.jsonl"), dir.join("sub/b.jsonl"));
        std::fs::write(&a, "{\"x\": 1}\n").unwrap();
        std::fs::write(&b, "{\"x\": 2}\n").unwrap();
        let data = RunData::given(Vec::new());
        let print =
            |p: &std::path::Path| data_fingerprint(&[p.to_path_buf()], &data).unwrap()[0].1.clone();
        let (file, folder) = (print(&a), print(&dir));
        assert_ne!(file, folder);
        assert_eq!(print(&dir), folder, "the same bytes: the same fingerprint");
        std::fs::write(&b, "{\"x\": 3}\n").unwrap();
        assert_ne!(print(&dir), folder, "a byte of a file in the folder changed");
        assert_eq!(print(&a), file);
        std::fs::remove_dir_all(dir).ok();
    }
}
