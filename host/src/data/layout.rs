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
//!   batch metadata; a prompt's images expanded into vision tokens as in SFT rows, their
//!   `pixel_values` / `image_grid_thw` in the batch and `images_per_prompt` in the metadata.
//!
//! The conventions are the alignment plugins' (see `plugins/align/src/lib.rs`). Rows that
//! cannot serve the objective (a pair without `rejected`, a KTO row without a label, a prompt
//! with images for generation) are bad samples (`data.on_bad_sample`); rows with nothing to
//! learn (identical chosen and rejected, no label tokens, a prompt that leaves no room for a
//! completion within `cutoff_len`) are always skipped and counted.
use anyhow::{bail, Result};
use ferrotune_plugin_api::Sample;
use serde_json::Value;

use crate::data::images::{SampleImage, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER};
use crate::data::pack::Packed;
use crate::data::{
    self, encode_multimodal, EncodeError, EncodeOptions, Encoded, ImagePrep, IGNORE_INDEX,
};
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
        let chosen: Vec<Layout> = [
            ("preference_pairs", Layout::Pairs),
            ("kto_labels", Layout::Kto),
            ("generation", Layout::Prompts),
        ]
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
    /// Several sequences in one row (`data.packing`).
    Packed(Packed),
    Pair {
        chosen: Encoded,
        rejected: Encoded,
        /// TRL's `margin` column (the sample's `extra.margin`): how far the chosen reward should
        /// exceed the rejected one (reward modelling).
        margin: Option<f64>,
    },
    Kto {
        seq: Encoded,
        desirable: bool,
    },
    Prompt {
        ids: Vec<i64>,
        text: String,
        sample: Value,
        /// The prompt's images then videos, whose vision-token blocks `ids` hold.
        images: Vec<SampleImage>,
    },
}

impl Item {
    /// Tokens the forward pass sees (prompt tokens for a prompt).
    pub fn tokens(&self) -> usize {
        match self {
            Item::Seq(e) | Item::Kto { seq: e, .. } | Item::Packed(Packed { seq: e, .. }) => {
                e.input_ids.len()
            }
            Item::Pair { chosen, rejected, .. } => {
                chosen.input_ids.len() + rejected.input_ids.len()
            }
            Item::Prompt { ids, .. } => ids.len(),
        }
    }

    /// Tokens that carry the loss (SFT's `num_items_in_batch`).
    pub fn label_tokens(&self) -> i64 {
        let n =
            |e: &Encoded| e.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count() as i64;
        match self {
            Item::Seq(e) | Item::Kto { seq: e, .. } | Item::Packed(Packed { seq: e, .. }) => n(e),
            Item::Pair { chosen, rejected, .. } => n(chosen) + n(rejected),
            Item::Prompt { .. } => 1,
        }
    }

    pub fn truncated(&self) -> bool {
        match self {
            Item::Seq(e) | Item::Kto { seq: e, .. } | Item::Packed(Packed { seq: e, .. }) => {
                e.truncated_from.is_some()
            }
            Item::Pair { chosen, rejected, .. } => {
                chosen.truncated_from.is_some() || rejected.truncated_from.is_some()
            }
            Item::Prompt { .. } => false,
        }
    }
}

/// The rows of a data set in a layout, with what could not be used.
#[derive(Debug, Default)]
pub struct Prepared {
    pub rows: usize,
    pub items: Vec<(usize, Item)>,
    /// Rows with nothing to learn, always skipped (and counted).
    pub skipped: Vec<(usize, String)>,
    /// Rows that cannot be used (`data.on_bad_sample` decides).
    pub bad: Vec<(usize, String)>,
}

impl Prepared {
    /// The usable rows as the sequences the model sees, for `data check` and `data preview`:
    /// a pair gives its chosen then its rejected sequence, a prompt its ids (no labels).
    pub fn sequences(&self) -> Vec<(usize, Encoded)> {
        let mut out = Vec::new();
        for (row, item) in &self.items {
            match item {
                Item::Seq(e) | Item::Kto { seq: e, .. } | Item::Packed(Packed { seq: e, .. }) => {
                    out.push((*row, e.clone()))
                }
                Item::Pair { chosen, rejected, .. } => {
                    out.extend([(*row, chosen.clone()), (*row, rejected.clone())])
                }
                Item::Prompt { ids, images, .. } => {
                    let labels = vec![IGNORE_INDEX; ids.len()];
                    out.push((
                        *row,
                        Encoded {
                            input_ids: ids.clone(),
                            labels,
                            truncated_from: None,
                            images: images.clone(),
                        },
                    ))
                }
            }
        }
        out
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

fn encode_row(
    layout: Layout,
    tok: &Tokenizer,
    prep: Option<&ImagePrep>,
    sample: Sample,
    opts: &EncodeOptions,
) -> Result<Outcome> {
    match layout {
        Layout::Sequences => {
            Ok(Outcome::Use(Item::Seq(encode_multimodal(tok, prep, sample, opts)?)))
        }
        Layout::Pairs => {
            let (chosen, rejected) = match (&sample.chosen, &sample.rejected) {
                (Some(c), Some(r)) => (c.clone(), r.clone()),
                (None, _) => return Err(bad(&sample, "a preference objective needs `chosen` and `rejected`; this row has no `chosen`")),
                (_, None) => return Err(bad(&sample, "a preference objective needs `chosen` and `rejected`; this row has no `rejected`")),
            };
            if chosen.content == rejected.content {
                return Ok(Outcome::Skip(format!(
                    "sample {}: `chosen` and `rejected` are identical, nothing to learn",
                    sample_id(&sample)
                )));
            }
            let opts = final_turn_only(opts);
            let with = |last| {
                let mut s = sample.clone();
                s.chosen = None;
                s.rejected = None;
                s.messages.push(last);
                encode_multimodal(tok, prep, s, &opts)
            };
            let margin = match sample.extra.get("margin") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_f64().filter(|m| m.is_finite()) {
                    Some(m) => Some(m),
                    None => {
                        return Err(bad(
                            &sample,
                            format!("`margin` must be a finite number, got {v}"),
                        ))
                    }
                },
            };
            Ok(Outcome::Use(Item::Pair {
                chosen: with(chosen)?,
                rejected: with(rejected)?,
                margin,
            }))
        }
        Layout::Kto => {
            let Some(desirable) = sample.label else {
                return Err(bad(&sample, "KTO needs each row's desirability (`kto_tag`: true or false); this row has none"));
            };
            if !sample.messages.last().is_some_and(|m| m.is_assistant_turn()) {
                return Err(bad(
                    &sample,
                    "a KTO row ends with the assistant turn it labels; this one does not",
                ));
            }
            Ok(Outcome::Use(Item::Kto {
                seq: encode_multimodal(tok, prep, sample, &final_turn_only(opts))?,
                desirable,
            }))
        }
        Layout::Prompts => {
            let has_images = !sample.images.is_empty()
                || !sample.videos.is_empty()
                || sample.messages.iter().any(|m| {
                    m.content.contains(IMAGE_PLACEHOLDER) || m.content.contains(VIDEO_PLACEHOLDER)
                });
            // Each `<image>` / `<video>` becomes its vision-token block as in an SFT row; the
            // images and videos go with the prompt into the batch (`pixel_values`,
            // `images_per_prompt`, `pixel_values_videos`, `videos_per_prompt`).
            let mut expanded = sample.clone();
            let images = match prep {
                Some(prep) if has_images => prep.expand(&mut expanded)?,
                None if has_images => {
                    return Err(bad(&sample, format!("its prompt has {} image(s) and {} video(s) but the model has no vision tower (use a vision-language model such as Qwen2-VL)", sample.images.len(), sample.videos.len())));
                }
                _ => Vec::new(),
            };
            let mut messages = expanded.messages;
            if messages.last().is_some_and(|m| m.is_assistant_turn()) {
                messages.pop(); // the reference answer, not part of the prompt
            }
            if messages.is_empty() {
                return Err(bad(&sample, "no prompt: the row has no turn before its answer"));
            }
            // The prompt keeps the row's tools (function-calling rows), as in training.
            let variables = crate::data::encode::template_variables(&sample);
            let rendered = tok
                .apply_chat_template_with(&messages, true, &variables)
                .map_err(|e| anyhow::anyhow!("sample {}: {e:#}", sample_id(&sample)))?;
            let ids = tok.encode(&rendered, false)?;
            if ids.len() >= opts.cutoff_len {
                return Ok(Outcome::Skip(format!(
                    "sample {}: its prompt has {} tokens, which leaves no room for a completion within cutoff_len {}",
                    sample_id(&sample),
                    ids.len(),
                    opts.cutoff_len
                )));
            }
            // The rendered prompt reward plugins see keeps the `<image>` placeholders, not
            // hundreds of image-pad tokens.
            let text = if images.is_empty() {
                rendered
            } else {
                let mut shown = sample.messages.clone();
                if shown.last().is_some_and(|m| m.is_assistant_turn()) {
                    shown.pop();
                }
                tok.apply_chat_template_with(&shown, true, &variables)?
            };
            let mut record = serde_json::to_value(&sample)?;
            if let Value::Object(m) = &mut record {
                m.remove("images");
                m.remove("blobs");
            }
            Ok(Outcome::Use(Item::Prompt { ids, text, sample: record, images }))
        }
    }
}

/// Encodes every row in `layout`; errors that are not about one row stop.
pub fn prepare(
    layout: Layout,
    rows: Vec<Result<Sample, String>>,
    tok: &Tokenizer,
    prep: Option<&ImagePrep>,
    opts: &EncodeOptions,
) -> Result<Prepared> {
    let mut out = Prepared { rows: rows.len(), ..Default::default() };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_needs() {
        let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Layout::from_needs("sft", &n(&[])).unwrap(), Layout::Sequences);
        assert_eq!(
            Layout::from_needs("dpo", &n(&["preference_pairs", "reference"])).unwrap(),
            Layout::Pairs
        );
        assert_eq!(
            Layout::from_needs("kto", &n(&["kto_labels", "reference"])).unwrap(),
            Layout::Kto
        );
        assert_eq!(
            Layout::from_needs("grpo", &n(&["generation", "rewards"])).unwrap(),
            Layout::Prompts
        );
        assert!(Layout::from_needs("x", &n(&["generation", "preference_pairs"])).is_err());
    }
}
