//! `sft`: supervised fine-tuning, masked next-token cross-entropy.
//!
//! The same loss as transformers' `ForCausalLMLoss` (`transformers/loss/loss_utils.py`):
//! logits upcast to fp32, labels shifted by one (position `t` predicts label `t + 1`), label
//! `ignore_index` (−100) skipped, and `torch.nn.functional.cross_entropy` (libtorch's own
//! `cross_entropy_loss`, label smoothing included) on the flattened tokens.
//!
//! Reduction across gradient accumulation follows transformers' Trainer: when the host puts
//! `num_items_in_batch` (label tokens over every micro-batch of the optimizer step) in the
//! batch metadata, a micro-batch's loss is its *sum* over label tokens divided by that
//! number, so the accumulated gradient is the mean over the whole step's tokens. Without it
//! the loss is the mean over this micro-batch's label tokens.
//!
//! Batch: `labels` (`[B, T]`, int) plus the model inputs (`input_ids`, `attention_mask`,
//! `pixel_values`, …), all of which except `labels` are passed to the model's forward.
//! Metrics: `loss`, `num_label_tokens`, `mean_token_accuracy` (TRL's name: the fraction of
//! label tokens whose argmax prediction is right).
use ferrotune_plugin_api::prelude::*;
use ferrotune_plugin_api::{next_token_targets, target_logps};
use schemars::JsonSchema;
use serde::Deserialize;

/// Configuration (`objective: {plugin: sft, ...}`).
#[derive(Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Label smoothing ε as in `torch.nn.functional.cross_entropy`: the target distribution
    /// is `(1 − ε)·onehot + ε/V`. Default 0.0; typical 0.0–0.1; must lie in [0, 1].
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub label_smoothing: f64,
    /// Label value that marks a position without a target (prompt, padding). Default −100,
    /// the value transformers' collators write.
    #[serde(default = "default_ignore_index")]
    pub ignore_index: i64,
    /// Compute the loss from the model's full `[B, T, V]` logits, as transformers'
    /// `ForCausalLMLoss` does (bit-for-bit its result), instead of asking the host for the
    /// label tokens' log-probabilities, which it computes in chunks of label positions
    /// without the full logits (equal within fp32 rounding, far less memory). Default false;
    /// label smoothing always takes the full logits.
    #[serde(default)]
    pub full_logits: bool,
}

fn default_ignore_index() -> i64 {
    -100
}

/// The batch-metadata key holding the label-token count of the whole optimizer step.
pub const NUM_ITEMS_KEY: &str = "num_items_in_batch";

pub struct Sft {
    cfg: SftConfig,
}

impl Plugin for Sft {
    const NAME: &'static str = "sft";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "supervised fine-tuning: masked next-token cross-entropy (transformers' ForCausalLMLoss)";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: SftConfig = parse_config(config_json)?;
        if !(0.0..=1.0).contains(&cfg.label_smoothing) {
            return Err(PluginError::config(
                "label_smoothing",
                format!("must lie in [0, 1], got {}", cfg.label_smoothing),
            ));
        }
        Ok(Self { cfg })
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<SftConfig>())
    }
}

/// `num_items_in_batch` from the batch metadata (JSON object text; empty means none).
/// `null` counts as absent, as transformers' `None`.
pub fn num_items_in_batch(meta_json: &str) -> PluginResult<Option<i64>> {
    if meta_json.trim().is_empty() {
        return Ok(None);
    }
    let meta: serde_json::Value = serde_json::from_str(meta_json)
        .map_err(|e| PluginError::invalid(format!("batch metadata is not valid JSON: {e}")))?;
    let value = match meta.get(NUM_ITEMS_KEY) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let n = value
        .as_u64()
        .or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
        .ok_or_else(|| {
            PluginError::invalid(format!(
                "batch metadata `{NUM_ITEMS_KEY}` must be a non-negative integer, got {value}"
            ))
        })?;
    i64::try_from(n).map(Some).map_err(|_| {
        PluginError::invalid(format!("batch metadata `{NUM_ITEMS_KEY}` too large: {n}"))
    })
}

/// The loss of one micro-batch and what is logged about it.
pub struct TokenLoss {
    pub loss: Tensor,
    pub num_label_tokens: i64,
    pub correct_tokens: i64,
}

impl Sft {
    /// The loss of `logits` (`[B, T, V]`, any float dtype) against `labels` (`[B, T]`).
    pub fn token_loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        num_items_in_batch: Option<i64>,
    ) -> PluginResult<TokenLoss> {
        let ignore = self.cfg.ignore_index;
        let (b, t, v) = logits.size3().map_err(|_| {
            PluginError::invalid(format!(
                "model `logits` must be [batch, seq, vocab], got {:?}",
                logits.size()
            ))
        })?;
        if labels.size() != [b, t] {
            return Err(PluginError::invalid(format!(
                "batch `labels` has shape {:?}, the model's `logits` {:?}: expected labels [{b}, {t}]",
                labels.size(),
                logits.size()
            )));
        }
        let labels = check_labels(labels)?.f_to_device(logits.device())?.f_to_kind(Kind::Int64)?;
        // Position t predicts label t + 1. As ForCausalLMLoss: pad the labels on the right
        // with ignore_index and shift them, keeping all T logit positions (the last one has
        // no target), so no copy of the logits is needed and the sums run in torch's order.
        let pad = Tensor::f_full([b, 1], ignore, (Kind::Int64, labels.device()))?;
        let targets =
            Tensor::f_cat(&[labels.f_narrow(1, 1, t - 1)?, pad], 1)?.f_reshape([b * t])?;
        let logits = logits.f_reshape([b * t, v])?;
        let mask = targets.f_ne(ignore)?;
        let num_label_tokens = mask.f_sum(Kind::Int64)?.int64_value(&[]);
        let out_of_range =
            targets.f_ge(v)?.f_logical_or(&targets.f_lt(0)?)?.f_logical_and(&mask)?;
        if out_of_range.f_any()?.int64_value(&[]) != 0 {
            return Err(PluginError::invalid(format!(
                "batch `labels` holds ids outside the vocabulary [0, {v}) (other than ignore_index {ignore})"
            )));
        }
        let logits32 = logits.f_to_kind(Kind::Float)?;
        let ce = |reduction| {
            logits32.f_cross_entropy_loss::<Tensor>(
                &targets,
                None,
                reduction,
                ignore,
                self.cfg.label_smoothing,
            )
        };
        let loss = match num_items_in_batch {
            Some(n) => ce(tch::Reduction::Sum)?
                .f_div_scalar(check_num_items(n, num_label_tokens)? as f64)?,
            // torch's mean over zero tokens is 0/0 = NaN; an all-prompt micro-batch gives 0.
            None if num_label_tokens == 0 => ce(tch::Reduction::Sum)?,
            None => ce(tch::Reduction::Mean)?,
        };
        let correct_tokens = tch::no_grad(|| -> PluginResult<i64> {
            // The argmax, as the index of `max` over the vocabulary (the first maximal value,
            // as `argmax`; libtorch's max kernel is about a third faster on CPU).
            let (_, argmax) = logits.f_max_dim(-1, false)?;
            let hits = argmax.f_eq_tensor(&targets)?.f_logical_and(&mask)?;
            Ok(hits.f_sum(Kind::Int64)?.int64_value(&[]))
        })?;
        Ok(TokenLoss { loss, num_label_tokens, correct_tokens })
    }
}

impl Sft {
    /// The loss from the label tokens' log-probabilities, which the host computes in chunks
    /// without the full logits ([`target_logps`]); the same reduction as [`Sft::token_loss`].
    pub fn chunked_loss(
        &self,
        ctx: &dyn ObjectiveContext,
        inputs: &[(String, Tensor)],
        labels: &Tensor,
        num_items_in_batch: Option<i64>,
    ) -> PluginResult<TokenLoss> {
        let ignore = self.cfg.ignore_index;
        let labels = check_labels(labels)?.f_to_kind(Kind::Int64)?;
        let bad = labels.f_lt(0)?.f_logical_and(&labels.f_ne(ignore)?)?;
        if bad.f_any()?.int64_value(&[]) != 0 {
            return Err(PluginError::invalid(format!(
                "batch `labels` holds negative ids other than ignore_index {ignore}"
            )));
        }
        let targets = next_token_targets(&labels, ignore)?;
        let out = target_logps(ctx, inputs, &targets, 1.0, ForwardFlags::NONE)?;
        let num_label_tokens = targets.f_ge(0)?.f_sum(Kind::Int64)?.int64_value(&[]);
        let divisor = match num_items_in_batch {
            Some(n) => check_num_items(n, num_label_tokens)?,
            None => num_label_tokens.max(1),
        };
        let loss = out.logps.f_sum(Kind::Float)?.f_neg()?.f_div_scalar(divisor as f64)?;
        let correct_tokens = out.correct.f_sum(Kind::Int64)?.int64_value(&[]);
        Ok(TokenLoss { loss, num_label_tokens, correct_tokens })
    }
}

/// `labels` must be `[B, T]` integer ids.
fn check_labels(labels: &Tensor) -> PluginResult<&Tensor> {
    if labels.dim() != 2 {
        return Err(PluginError::invalid(format!(
            "batch `labels` must be [batch, seq], got {:?}",
            labels.size()
        )));
    }
    if !matches!(labels.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        return Err(PluginError::invalid(format!(
            "batch `labels` must be integer token ids, got {:?}",
            labels.kind()
        )));
    }
    Ok(labels)
}

/// `num_items_in_batch` must count at least this micro-batch's label tokens.
fn check_num_items(n: i64, num_label_tokens: i64) -> PluginResult<i64> {
    if n < num_label_tokens {
        return Err(PluginError::invalid(format!(
            "batch metadata `{NUM_ITEMS_KEY}` = {n} is smaller than this micro-batch's {num_label_tokens} label tokens \
             (it must count the label tokens of every micro-batch of the step)"
        )));
    }
    Ok(n.max(1))
}

impl Objective for Sft {
    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let labels = batch.get("labels")?;
        batch.get("input_ids")?;
        let num_items = num_items_in_batch(&batch.meta_json)?;
        let inputs: Vec<(String, Tensor)> = batch
            .tensors
            .iter()
            .filter(|(n, _)| n != "labels")
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let out = if self.cfg.full_logits || self.cfg.label_smoothing > 0.0 {
            let outputs = ctx.forward(&inputs, ForwardFlags::NONE)?;
            let logits =
                outputs.into_iter().find(|(n, _)| n == "logits").map(|(_, t)| t).ok_or_else(
                    || PluginError::invalid("the model's forward returned no `logits`"),
                )?;
            self.token_loss(&logits, labels, num_items)?
        } else {
            self.chunked_loss(ctx, &inputs, labels, num_items)?
        };
        let value = out.loss.f_double_value(&[])?;
        let accuracy = if out.num_label_tokens > 0 {
            out.correct_tokens as f64 / out.num_label_tokens as f64
        } else {
            0.0
        };
        Ok(LossOutput {
            loss: out.loss,
            num_items: out.num_label_tokens,
            metrics: vec![
                ("loss".into(), value),
                ("num_label_tokens".into(), out.num_label_tokens as f64),
                ("mean_token_accuracy".into(), accuracy),
            ],
        })
    }
}

export_plugin!(objective: Sft);

#[cfg(test)]
mod tests {
    use super::*;

    fn sft(cfg: &str) -> Sft {
        Sft::from_config(cfg).unwrap()
    }

    #[test]
    fn config_defaults_and_errors_name_the_key() {
        assert_eq!(
            sft("").cfg,
            SftConfig { label_smoothing: 0.0, ignore_index: -100, full_logits: false }
        );
        let e = Sft::from_config(r#"{"label_smoothing": 1.5}"#).err().unwrap();
        assert!(e.message().contains("`label_smoothing`") && e.message().contains("[0, 1]"), "{e}");
        let e = Sft::from_config(r#"{"label_smothing": 0.1}"#).err().unwrap();
        assert!(e.message().contains("unknown field `label_smothing`"), "{e}");
        let e = Sft::from_config(r#"{"ignore_index": "x"}"#).err().unwrap();
        assert!(e.message().contains("`ignore_index`"), "{e}");
    }

    #[test]
    fn metadata_num_items() {
        assert_eq!(num_items_in_batch("").unwrap(), None);
        assert_eq!(num_items_in_batch("{}").unwrap(), None);
        assert_eq!(num_items_in_batch(r#"{"num_items_in_batch": null}"#).unwrap(), None);
        assert_eq!(
            num_items_in_batch(r#"{"num_items_in_batch": 12, "ids": [1]}"#).unwrap(),
            Some(12)
        );
        assert_eq!(num_items_in_batch(r#"{"num_items_in_batch": 12.0}"#).unwrap(), Some(12));
        let e = num_items_in_batch(r#"{"num_items_in_batch": -3}"#).unwrap_err();
        assert!(e.message().contains("`num_items_in_batch`"), "{e}");
        assert!(num_items_in_batch("{oops").unwrap_err().message().contains("not valid JSON"));
    }

    /// Closed form: uniform logits give loss ln V at every label token, whatever the
    /// smoothing; one confident logit gives a known value.
    #[test]
    fn closed_form_values() {
        let v = 5i64;
        let logits = Tensor::zeros([1, 4, v], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[7i64, -100, 2, 3]).view([1, 4]);
        let out = sft("{}").token_loss(&logits, &labels, None).unwrap();
        assert_eq!(out.num_label_tokens, 2);
        assert!((out.loss.double_value(&[]) - (v as f64).ln()).abs() < 1e-6);
        // Sum over 2 tokens divided by a step total of 8.
        let out = sft("{}").token_loss(&logits, &labels, Some(8)).unwrap();
        assert!((out.loss.double_value(&[]) - 2.0 * (v as f64).ln() / 8.0).abs() < 1e-6);
        // One label token whose logit is a, others 0: −log softmax = log(e^a + V − 1) − a; with
        // smoothing ε add ε/V · Σ_c(−log p_c) and scale the nll by (1 − ε).
        let a = 2.0f64;
        let logits = Tensor::zeros([1, 2, v], (Kind::Float, Device::Cpu));
        let _ = logits.narrow(1, 0, 1).narrow(2, 1, 1).fill_(a);
        let labels = Tensor::from_slice(&[-100i64, 1]).view([1, 2]);
        let lse = (a.exp() + (v - 1) as f64).ln();
        let eps = 0.1;
        let smooth = (lse - a + (v - 1) as f64 * lse) / v as f64;
        let expected = (1.0 - eps) * (lse - a) + eps * smooth;
        let out = sft(r#"{"label_smoothing": 0.1}"#).token_loss(&logits, &labels, None).unwrap();
        assert!(
            (out.loss.double_value(&[]) - expected).abs() < 1e-6,
            "{} vs {expected}",
            out.loss.double_value(&[])
        );
        assert_eq!(out.correct_tokens, 1);
    }

    /// Ties count as `argmax` breaks them: the first maximal logit is the prediction.
    #[test]
    fn accuracy_breaks_ties_as_argmax() {
        // Rows [0, 1, 1] and [3, 0, 3]: predictions 1 and 0; targets (labels shifted) 1 and 2.
        let logits =
            Tensor::from_slice(&[0f32, 1.0, 1.0, 3.0, 0.0, 3.0, 0.0, 0.0, 0.0]).view([1, 3, 3]);
        let labels = Tensor::from_slice(&[-100i64, 1, 2]).view([1, 3]);
        let out = sft("{}").token_loss(&logits, &labels, None).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&logits.argmax(-1, false).reshape([-1])).unwrap(),
            vec![1, 0, 0]
        );
        assert_eq!((out.num_label_tokens, out.correct_tokens), (2, 1));
    }

    #[test]
    fn shape_and_count_errors() {
        let logits = Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu));
        let e = sft("{}")
            .token_loss(&logits, &Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu)), None)
            .err()
            .unwrap();
        assert!(e.message().contains("`labels`") && e.message().contains("[2, 3]"), "{e}");
        let labels = Tensor::from_slice(&[0i64, 1, 9, 0, 1, 2]).view([2, 3]);
        let e = sft("{}").token_loss(&logits, &labels, None).err().unwrap();
        assert!(e.message().contains("outside the vocabulary"), "{e}");
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]).view([2, 3]);
        let e = sft("{}").token_loss(&logits, &labels, Some(3)).err().unwrap();
        assert!(
            e.message().contains("`num_items_in_batch` = 3")
                && e.message().contains("4 label tokens"),
            "{e}"
        );
    }

    #[test]
    fn all_ignored_gives_zero_not_nan() {
        let logits = Tensor::randn([1, 3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let labels = Tensor::from_slice(&[-100i64, -100, -100]).view([1, 3]);
        let out = sft("{}").token_loss(&logits, &labels, None).unwrap();
        assert_eq!(out.loss.double_value(&[]), 0.0);
        out.loss.backward();
        assert_eq!(logits.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<Sft>(json!({}));
        let p = &s["properties"];
        assert_eq!(
            (&p["ignore_index"]["default"], &p["label_smoothing"]["maximum"]),
            (&json!(-100), &json!(1))
        );
    }
}
