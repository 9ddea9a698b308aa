//! What a training batch looks like for the run's objective, chosen from what the objective
//! says it needs ([`Objective::needs`](ferrotune_plugin_api::Objective::needs)):
//!
//! * **sequences** (SFT, the default): `input_ids`, `attention_mask`, `labels`;
//! * **pairs** (`preference_pairs`: DPO, ORPO, SimPO): each sample's prompt followed by its
//!   `chosen` and by its `rejected` turn, chosen rows first, then the rejected rows in the same
//!   order, with `completion_mask` on the final turn's tokens (TRL's
//!   `DataCollatorForPreference`);
//! * **kto** (`kto_labels`): one row per sample with `kto_desirable` from the sample's label,
//!   plus the KL batch, each prompt with the previous row's completion;
//! * **prompts** (`generation`: GRPO): left-padded `prompt_ids` / `prompt_mask`, with the
//!   rendered prompts, the canonical samples (for reward plugins) and the pad id in the
//!   batch metadata.
//!
//! The conventions are the alignment plugins' (see `plugins/align/src/lib.rs`). Rows that
//! cannot serve the objective (a pair without `rejected`, a KTO row without a label, a prompt
//! with images for generation) are bad samples (`data.on_bad_sample`); rows with nothing to
//! learn (identical chosen and rejected, no label tokens, a prompt that leaves no room for a
//! completion within `cutoff_len`) are always skipped and counted.
use anyhow::{bail, Result};
use ferrotune_plugin_api::Sample;
use serde_json::{json, Map, Value};
use tch::Tensor;

use crate::data::images::IMAGE_PLACEHOLDER;
use crate::data::{self, encode_multimodal, EncodeError, EncodeOptions, Encoded, ImagePrep, IGNORE_INDEX};
use crate::text::Tokenizer;

/// The batch layout of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Sequences,
    Pairs,
    Kto,
    Prompts,
}

impl Layout {
    /// The layout an objective's `needs()` asks for (several data needs at once are an error).
    pub fn from_needs(objective: &str, needs: &[String]) -> Result<Self> {
        let has = |n: &str| needs.iter().any(|x| x == n);
        let chosen: Vec<Layout> = [("preference_pairs", Layout::Pairs), ("kto_labels", Layout::Kto), ("generation", Layout::Prompts)]
            .into_iter()
            .filter(|(n, _)| has(n))
            .map(|(_, l)| l)
            .collect();
        match chosen.as_slice() {
            [] => Ok(Layout::Sequences),
            [one] => Ok(*one),
            _ => bail!("objective `{objective}` asks for more than one kind of data ({}); the host builds one batch layout per run", needs.join(", ")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::Sequences => "sequences",
            Layout::Pairs => "preference pairs",
            Layout::Kto => "KTO rows",
            Layout::Prompts => "prompts",
        }
    }
}

/// One usable row of the training data, in the run's layout.
#[derive(Clone, Debug)]
pub enum Item {
    Seq(Encoded),
    Pair { chosen: Encoded, rejected: Encoded },
    Kto { seq: Encoded, desirable: bool },
    Prompt { ids: Vec<i64>, text: String, sample: Value },
}

impl Item {
    /// Tokens the forward pass sees (prompt tokens for a prompt).
    pub fn tokens(&self) -> usize {
        match self {
            Item::Seq(e) | Item::Kto { seq: e, .. } => e.input_ids.len(),
            Item::Pair { chosen, rejected } => chosen.input_ids.len() + rejected.input_ids.len(),
            Item::Prompt { ids, .. } => ids.len(),
        }
    }

    /// Tokens that carry the loss (SFT's `num_items_in_batch`).
    pub fn label_tokens(&self) -> i64 {
        let n = |e: &Encoded| e.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count() as i64;
        match self {
            Item::Seq(e) | Item::Kto { seq: e, .. } => n(e),
            Item::Pair { chosen, rejected } => n(chosen) + n(rejected),
            Item::Prompt { .. } => 1,
        }
    }

    pub fn truncated(&self) -> bool {
        match self {
            Item::Seq(e) | Item::Kto { seq: e, .. } => e.truncated_from.is_some(),
            Item::Pair { chosen, rejected } => chosen.truncated_from.is_some() || rejected.truncated_from.is_some(),
            Item::Prompt { .. } => false,
        }
    }
}

/// The rows of a data set in a layout, with what could not be used.
#[derive(Debug, Default)]
pub struct PreparedItems {
    pub rows: usize,
    pub items: Vec<(usize, Item)>,
    /// Rows with nothing to learn, always skipped (and counted).
    pub skipped: Vec<(usize, String)>,
    /// Rows that cannot be used (`data.on_bad_sample` decides).
    pub bad: Vec<(usize, String)>,
}

impl PreparedItems {
    /// As the SFT pipeline's [`data::Prepared`], for `data check` and `data preview`: a pair
    /// gives its chosen then its rejected sequence, a prompt its ids (no labels), skipped rows
    /// are listed with the rows left without labels.
    pub fn into_prepared(self) -> data::Prepared {
        let mut encoded = Vec::new();
        for (row, item) in self.items {
            match item {
                Item::Seq(e) | Item::Kto { seq: e, .. } => encoded.push((row, e)),
                Item::Pair { chosen, rejected } => encoded.extend([(row, chosen), (row, rejected)]),
                Item::Prompt { ids, .. } => {
                    let labels = vec![IGNORE_INDEX; ids.len()];
                    encoded.push((row, Encoded { input_ids: ids, labels, truncated_from: None, images: Vec::new() }))
                }
            }
        }
        data::Prepared { rows: self.rows, encoded, no_labels: self.skipped, bad: self.bad }
    }

    pub fn truncated(&self) -> usize {
        self.items.iter().filter(|(_, i)| i.truncated()).count()
    }

    /// The bad rows, one per line (at most `limit`, then a count).
    pub fn bad_report(&self, limit: usize) -> String {
        data::rows_report(&self.bad, limit)
    }
}

fn sample_id(s: &Sample) -> String {
    s.id.clone().unwrap_or_else(|| "(no id)".into())
}

fn bad(s: &Sample, reason: impl Into<String>) -> anyhow::Error {
    EncodeError::BadSample { id: sample_id(s), reason: reason.into() }.into()
}

/// Alignment objectives score the final turn only: earlier assistant turns and the prompt
/// carry no label whatever the SFT options say.
fn final_turn_only(opts: &EncodeOptions) -> EncodeOptions {
    EncodeOptions { cutoff_len: opts.cutoff_len, train_on_prompt: false, mask_history: true }
}

/// Why a row of this layout has nothing to learn, if so (checked after encoding).
enum Outcome {
    Use(Item),
    Skip(String),
}

fn encode_row(layout: Layout, tok: &Tokenizer, prep: Option<&ImagePrep>, sample: Sample, opts: &EncodeOptions) -> Result<Outcome> {
    match layout {
        Layout::Sequences => Ok(Outcome::Use(Item::Seq(encode_multimodal(tok, prep, sample, opts)?))),
        Layout::Pairs => {
            let (chosen, rejected) = match (&sample.chosen, &sample.rejected) {
                (Some(c), Some(r)) => (c.clone(), r.clone()),
                (None, _) => return Err(bad(&sample, "a preference objective needs `chosen` and `rejected`; this row has no `chosen`")),
                (_, None) => return Err(bad(&sample, "a preference objective needs `chosen` and `rejected`; this row has no `rejected`")),
            };
            if chosen.content == rejected.content {
                return Ok(Outcome::Skip(format!("sample {}: `chosen` and `rejected` are identical, nothing to learn", sample_id(&sample))));
            }
            let opts = final_turn_only(opts);
            let with = |last| {
                let mut s = sample.clone();
                s.chosen = None;
                s.rejected = None;
                s.messages.push(last);
                encode_multimodal(tok, prep, s, &opts)
            };
            Ok(Outcome::Use(Item::Pair { chosen: with(chosen)?, rejected: with(rejected)? }))
        }
        Layout::Kto => {
            let Some(desirable) = sample.label else {
                return Err(bad(&sample, "KTO needs each row's desirability (`kto_tag`: true or false); this row has none"));
            };
            if sample.messages.last().map(|m| m.role.as_str()) != Some("assistant") {
                return Err(bad(&sample, "a KTO row ends with the assistant turn it labels; this one does not"));
            }
            Ok(Outcome::Use(Item::Kto { seq: encode_multimodal(tok, prep, sample, &final_turn_only(opts))?, desirable }))
        }
        Layout::Prompts => {
            if !sample.images.is_empty() || sample.messages.iter().any(|m| m.content.contains(IMAGE_PLACEHOLDER)) {
                return Err(bad(&sample, "generation objectives (GRPO) take text prompts only in this version; this row has images"));
            }
            let mut messages = sample.messages.clone();
            if messages.last().is_some_and(|m| m.role == "assistant") {
                messages.pop(); // the reference answer, not part of the prompt
            }
            if messages.is_empty() {
                return Err(bad(&sample, "no prompt: the row has no turn before its answer"));
            }
            let text = tok.apply_chat_template(&messages, true)?;
            let ids = tok.encode(&text, false)?;
            if ids.len() >= opts.cutoff_len {
                return Ok(Outcome::Skip(format!(
                    "sample {}: its prompt has {} tokens, which leaves no room for a completion within cutoff_len {}",
                    sample_id(&sample),
                    ids.len(),
                    opts.cutoff_len
                )));
            }
            let mut record = serde_json::to_value(&sample)?;
            if let Value::Object(m) = &mut record {
                m.remove("images");
            }
            Ok(Outcome::Use(Item::Prompt { ids, text, sample: record }))
        }
    }
}

/// Encodes every row in `layout`; errors that are not about one row stop.
pub fn prepare(layout: Layout, rows: Vec<Result<Sample, String>>, tok: &Tokenizer, prep: Option<&ImagePrep>, opts: &EncodeOptions) -> Result<PreparedItems> {
    let mut out = PreparedItems { rows: rows.len(), ..Default::default() };
    for (i, row) in rows.into_iter().enumerate() {
        let sample = match row {
            Ok(s) => s,
            Err(e) => {
                out.bad.push((i, e));
                continue;
            }
        };
        match encode_row(layout, tok, prep, sample, opts) {
            Ok(Outcome::Use(item)) => out.items.push((i, item)),
            Ok(Outcome::Skip(why)) => out.skipped.push((i, why)),
            Err(e) => match e.downcast_ref::<EncodeError>() {
                Some(EncodeError::NoLabelTokens { .. }) => out.skipped.push((i, format!("{e:#}"))),
                Some(_) => out.bad.push((i, format!("{e:#}"))),
                None => return Err(e.context(format!("row {i}"))),
            },
        }
    }
    Ok(out)
}

/// Rows right-padded to one width: ids, attention mask and completion mask (the labelled
/// tokens), each int64 `[rows, T]`.
fn right_padded(rows: &[(Vec<i64>, Vec<bool>)], pad_id: i64) -> (Tensor, Tensor, Tensor) {
    let width = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0).max(1);
    let n = rows.len();
    let (mut ids, mut mask, mut comp) = (vec![pad_id; n * width], vec![0i64; n * width], vec![0i64; n * width]);
    for (r, (row_ids, scored)) in rows.iter().enumerate() {
        let at = r * width;
        ids[at..at + row_ids.len()].copy_from_slice(row_ids);
        mask[at..at + row_ids.len()].fill(1);
        for (j, &s) in scored.iter().enumerate() {
            comp[at + j] = s as i64;
        }
    }
    let shape = [n as i64, width as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape), Tensor::from_slice(&comp).view(shape))
}

fn scored(e: &Encoded) -> (Vec<i64>, Vec<bool>) {
    (e.input_ids.clone(), e.labels.iter().map(|&l| l != IGNORE_INDEX).collect())
}

/// Where a sequence's completion (its first labelled token) starts.
fn completion_start(e: &Encoded) -> usize {
    e.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap_or(e.labels.len())
}

/// A micro-batch of `items` (all of `layout`): its tensors (on the CPU) and the metadata
/// entries the layout adds.
pub fn collate(layout: Layout, items: &[&Item], pad_id: i64, prep: Option<&ImagePrep>) -> Result<(Vec<(String, Tensor)>, Map<String, Value>)> {
    let mut meta = Map::new();
    let seqs = |f: &dyn Fn(&Item) -> Option<&Encoded>| -> Result<Vec<&Encoded>> {
        items.iter().map(|i| f(i).ok_or_else(|| anyhow::anyhow!("internal: a row of another layout in a {} batch", layout.name()))).collect()
    };
    let images = |encs: &[&Encoded]| -> Result<Vec<(String, Tensor)>> {
        match prep {
            Some(p) => {
                let owned: Vec<Encoded> = encs.iter().map(|e| Encoded { input_ids: Vec::new(), labels: Vec::new(), truncated_from: None, images: e.images.clone() }).collect();
                p.batch_tensors(&owned)
            }
            None => Ok(Vec::new()),
        }
    };
    let mut tensors = Vec::new();
    match layout {
        Layout::Sequences => {
            let encs: Vec<Encoded> = seqs(&|i| if let Item::Seq(e) = i { Some(e) } else { None })?.into_iter().cloned().collect();
            tensors = data::collate(&encs, pad_id);
            if let Some(p) = prep {
                tensors.extend(p.batch_tensors(&encs)?);
            }
        }
        Layout::Pairs => {
            let chosen = seqs(&|i| if let Item::Pair { chosen, .. } = i { Some(chosen) } else { None })?;
            let rejected = seqs(&|i| if let Item::Pair { rejected, .. } = i { Some(rejected) } else { None })?;
            let all: Vec<&Encoded> = chosen.iter().chain(rejected.iter()).copied().collect();
            let rows: Vec<_> = all.iter().map(|e| scored(e)).collect();
            let (ids, mask, comp) = right_padded(&rows, pad_id);
            tensors.extend([("input_ids".into(), ids), ("attention_mask".into(), mask), ("completion_mask".into(), comp)]);
            tensors.extend(images(&all)?);
        }
        Layout::Kto => {
            let encs = seqs(&|i| if let Item::Kto { seq, .. } = i { Some(seq) } else { None })?;
            let desirable: Vec<i64> = items.iter().map(|i| matches!(i, Item::Kto { desirable: true, .. }) as i64).collect();
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
            tensors.extend([
                ("input_ids".into(), ids),
                ("attention_mask".into(), mask),
                ("completion_mask".into(), comp),
                ("kto_desirable".into(), Tensor::from_slice(&desirable)),
                ("KL_input_ids".into(), kl_ids),
                ("KL_attention_mask".into(), kl_mask),
                ("KL_completion_mask".into(), kl_comp),
            ]);
            tensors.extend(images(&encs)?);
        }
        Layout::Prompts => {
            let mut prompts = Vec::new();
            let (mut texts, mut samples) = (Vec::new(), Vec::new());
            for item in items {
                let Item::Prompt { ids, text, sample } = item else { bail!("internal: a row of another layout in a prompts batch") };
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
            tensors.push(("prompt_ids".into(), Tensor::from_slice(&ids).view(shape)));
            tensors.push(("prompt_mask".into(), Tensor::from_slice(&mask).view(shape)));
            meta.insert("prompts".into(), Value::Array(texts));
            meta.insert("samples".into(), Value::Array(samples));
            meta.insert("pad_token_id".into(), json!(pad_id));
        }
    }
    Ok((tensors, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ids: &[i64], labelled_from: usize) -> Encoded {
        let labels = ids.iter().enumerate().map(|(i, &t)| if i >= labelled_from { t } else { IGNORE_INDEX }).collect();
        Encoded { input_ids: ids.to_vec(), labels, truncated_from: None, images: Vec::new() }
    }

    fn rows(t: &Tensor) -> Vec<Vec<i64>> {
        Vec::<Vec<i64>>::try_from(t).unwrap()
    }

    fn get<'a>(t: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
        &t.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn layout_follows_needs() {
        let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Layout::from_needs("sft", &n(&[])).unwrap(), Layout::Sequences);
        assert_eq!(Layout::from_needs("dpo", &n(&["preference_pairs", "reference"])).unwrap(), Layout::Pairs);
        assert_eq!(Layout::from_needs("kto", &n(&["kto_labels", "reference"])).unwrap(), Layout::Kto);
        assert_eq!(Layout::from_needs("grpo", &n(&["generation", "rewards"])).unwrap(), Layout::Prompts);
        assert!(Layout::from_needs("x", &n(&["generation", "preference_pairs"])).is_err());
    }

    #[test]
    fn pairs_put_chosen_rows_first_and_mask_completions() {
        let a = Item::Pair { chosen: enc(&[5, 6, 7], 2), rejected: enc(&[5, 6, 8, 9], 2) };
        let b = Item::Pair { chosen: enc(&[3, 4], 1), rejected: enc(&[3, 9], 1) };
        let (t, _) = collate(Layout::Pairs, &[&a, &b], 0, None).unwrap();
        assert_eq!(rows(get(&t, "input_ids")), vec![vec![5, 6, 7, 0], vec![3, 4, 0, 0], vec![5, 6, 8, 9], vec![3, 9, 0, 0]]);
        assert_eq!(rows(get(&t, "attention_mask")), vec![vec![1, 1, 1, 0], vec![1, 1, 0, 0], vec![1, 1, 1, 1], vec![1, 1, 0, 0]]);
        assert_eq!(rows(get(&t, "completion_mask")), vec![vec![0, 0, 1, 0], vec![0, 1, 0, 0], vec![0, 0, 1, 1], vec![0, 1, 0, 0]]);
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
        let p = |ids: &[i64], t: &str| Item::Prompt { ids: ids.to_vec(), text: t.into(), sample: json!({"id": t}) };
        let (a, b) = (p(&[4, 5, 6], "a"), p(&[7], "b"));
        let (t, meta) = collate(Layout::Prompts, &[&a, &b], 9, None).unwrap();
        assert_eq!(rows(get(&t, "prompt_ids")), vec![vec![4, 5, 6], vec![9, 9, 7]]);
        assert_eq!(rows(get(&t, "prompt_mask")), vec![vec![1, 1, 1], vec![0, 0, 1]]);
        assert_eq!(meta["prompts"], json!(["a", "b"]));
        assert_eq!(meta["samples"][1]["id"], json!("b"));
        assert_eq!(meta["pad_token_id"], json!(9));
    }
}
