//! What every alignment objective shares: reading the batch and its metadata, running the
//! policy (or the reference) for the per-token log-probabilities of the scored tokens, and the
//! checks that keep a NaN from reaching the optimizer.
use ferrotune_plugin_api::prelude::*;
use ferrotune_plugin_api::{next_token_targets, target_logps};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Batch-metadata key: how many micro-batches make up the optimizer step. Per-micro-batch
/// means (every objective but GRPO's `dapo`) are divided by it, as transformers' Trainer
/// divides by `gradient_accumulation_steps`, so the accumulated gradient is the mean over
/// the step. Absent: 1.
pub const GRAD_ACCUM_KEY: &str = "gradient_accumulation_steps";
/// Batch-metadata key: for GRPO's `dapo`, the completion tokens of every micro-batch of the
/// optimizer step (TRL's `num_items_in_batch · gradient_accumulation_steps /
/// steps_per_generation / num_processes`). Absent: this micro-batch's completion tokens.
pub const NUM_ITEMS_KEY: &str = "num_items_in_batch";

/// The batch metadata the alignment objectives read (the JSON object may hold more keys).
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub gradient_accumulation_steps: i64,
    pub num_items_in_batch: Option<i64>,
    /// Sample ids (`sample_ids`, any JSON), only to name the batch in errors.
    pub sample_ids: Option<String>,
    pub value: serde_json::Value,
}

impl Meta {
    pub fn parse(meta_json: &str) -> PluginResult<Self> {
        let value: serde_json::Value = if meta_json.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(meta_json).map_err(|e| {
                PluginError::invalid(format!("batch metadata is not valid JSON: {e}"))
            })?
        };
        let int = |key: &str| -> PluginResult<Option<i64>> {
            match value.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                    .filter(|n| *n >= 0)
                    .map(Some)
                    .ok_or_else(|| {
                        PluginError::invalid(format!(
                            "batch metadata `{key}` must be a non-negative integer, got {v}"
                        ))
                    }),
            }
        };
        let ga = int(GRAD_ACCUM_KEY)?.unwrap_or(1);
        if ga < 1 {
            return Err(PluginError::invalid(format!(
                "batch metadata `{GRAD_ACCUM_KEY}` must be at least 1, got {ga}"
            )));
        }
        let num_items_in_batch = int(NUM_ITEMS_KEY)?;
        let sample_ids = value.get("sample_ids").map(|v| v.to_string());
        Ok(Self { gradient_accumulation_steps: ga, num_items_in_batch, sample_ids, value })
    }

    /// How to name this batch in an error message.
    pub fn describe(&self, rows: i64) -> String {
        match &self.sample_ids {
            Some(ids) => format!("the micro-batch of {rows} rows with sample ids {ids}"),
            None => format!("the micro-batch of {rows} rows (no `sample_ids` in its metadata)"),
        }
    }
}

/// The model inputs of `batch`: every tensor whose name is not in `exclude`.
pub fn model_inputs(batch: &Batch, exclude: &[&str]) -> Vec<(String, Tensor)> {
    batch
        .tensors
        .iter()
        .filter(|(n, _)| !exclude.contains(&n.as_str()))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

/// Replaces (or adds) the named input.
pub fn set_input(inputs: &mut Vec<(String, Tensor)>, name: &str, t: Tensor) {
    inputs.retain(|(n, _)| n != name);
    inputs.push((name.to_string(), t));
}

/// `target_ids` (`[B, T]`) scoring the next token where `scored` is set: position t is
/// scored on `ids[b, t + 1]` when `scored[b, t + 1]` is non-zero, and has no target (−1)
/// elsewhere and at the last position, so prompt and padding positions never reach the head.
pub fn next_token_targets_where(ids: &Tensor, scored: &Tensor) -> PluginResult<Tensor> {
    let t = ids.size().get(1).copied().unwrap_or(0);
    if t < 2 {
        return Err(PluginError::invalid(format!(
            "sequences of {t} token(s) have no next token to score"
        )));
    }
    let keep = scored.f_to_device(ids.device())?.f_ne(0)?;
    let labels = ids.f_to_kind(Kind::Int64)?.f_where_scalarother(&keep, -1)?;
    next_token_targets(&labels, -1)
}

/// Runs the model on `inputs` for the log-probabilities of `targets` (`[B, T]`, from
/// [`next_token_targets_where`]) under `logits / temperature`, and returns them without the
/// last position: `out[b, t] = log p(ids[b, t+1] | ids[b, ..=t])` where position t has a
/// target, 0 elsewhere, `[B, T − 1]` (TRL's fused LM head `log_probs`, masked). The host
/// computes them without the `[B, T, V]` logits; fp32 (fp64 logits stay fp64), as TRL's
/// `selective_log_softmax`.
pub fn next_token_logps(
    ctx: &dyn ObjectiveContext,
    inputs: &[(String, Tensor)],
    targets: &Tensor,
    temperature: f64,
    flags: ForwardFlags,
) -> PluginResult<Tensor> {
    let (b, t) = targets.size2()?;
    let logps = target_logps(ctx, inputs, targets, temperature, flags)?.logps;
    if logps.size() != [b, t] {
        return Err(PluginError::invalid(format!(
            "the model's target log-probabilities {:?} do not match `input_ids` [{b}, {t}]",
            logps.size()
        )));
    }
    Ok(logps.f_narrow(1, 0, t - 1)?)
}

/// `Σ_t x[b, t]` over positions where `mask` is set (masked positions contribute 0 even if
/// they hold ±inf), `[B, T]` → `[B]`.
pub fn masked_sum(x: &Tensor, mask: &Tensor) -> PluginResult<Tensor> {
    Ok(x.f_where_scalarother(mask, 0.0)?.f_sum_dim_intlist(
        [-1i64].as_slice(),
        false,
        None::<Kind>,
    )?)
}

/// A 0/1 mask tensor as bool, on `device`.
pub fn bool_mask(t: &Tensor, device: Device) -> PluginResult<Tensor> {
    Ok(t.f_to_device(device)?.f_ne(0)?)
}

/// The named tensor, checked to be `[rows, cols]` (`cols` `None`: any width).
pub fn get_2d<'a>(
    batch: &'a Batch,
    name: &str,
    rows: Option<i64>,
    cols: Option<i64>,
) -> PluginResult<&'a Tensor> {
    let t = batch.get(name)?;
    let fits = |want: Option<i64>, got: i64| want.is_none_or(|w| w == got);
    let ok = t.dim() == 2 && fits(rows, t.size()[0]) && fits(cols, t.size()[1]);
    if !ok {
        return Err(PluginError::invalid(format!(
            "batch `{name}` has shape {:?}, expected [{}, {}]",
            t.size(),
            rows.map_or("rows".to_string(), |r| r.to_string()),
            cols.map_or("cols".to_string(), |c| c.to_string())
        )));
    }
    Ok(t)
}

/// The optional named tensor, checked to be 1-D of `len` and converted to `kind` on `device`.
pub fn get_1d_opt(
    batch: &Batch,
    name: &str,
    len: i64,
    kind: Kind,
    device: Device,
) -> PluginResult<Option<Tensor>> {
    let Some((_, t)) = batch.tensors.iter().find(|(n, _)| n == name) else { return Ok(None) };
    if t.size() != [len] {
        return Err(PluginError::invalid(format!(
            "batch `{name}` has shape {:?}, expected [{len}]",
            t.size()
        )));
    }
    let t = t.f_to_device(device)?.f_to_kind(kind)?;
    ensure_finite(name, &t)?;
    Ok(Some(t))
}

/// An error when `t` holds a NaN or an infinity, naming what it is.
pub fn ensure_finite(what: &str, t: &Tensor) -> PluginResult<()> {
    let bad = t.f_isfinite()?.f_logical_not()?;
    let n = bad.f_sum(Kind::Int64)?.int64_value(&[]);
    if n > 0 {
        let first = bad.f_flatten(0, -1)?.f_nonzero()?.int64_value(&[0, 0]);
        return Err(PluginError::invalid(format!(
            "{what} holds {n} non-finite value(s) (first at flat index {first}); refusing to compute a loss from it"
        )));
    }
    Ok(())
}

/// Checks the final loss: a non-finite loss is an error naming the objective and the batch,
/// never a silent optimizer step.
pub fn check_loss(objective: &str, loss: &Tensor, meta: &Meta, rows: i64) -> PluginResult<f64> {
    let v = loss.f_double_value(&[])?;
    if !v.is_finite() {
        return Err(PluginError::runtime(format!(
            "objective `{objective}`: the loss of {} is {v}; the step is refused (check the inputs' log-probabilities and the config)",
            meta.describe(rows)
        )));
    }
    Ok(v)
}

/// The mean of a 1-D tensor as f64 (0 for an empty tensor).
pub fn mean_f64(t: &Tensor) -> PluginResult<f64> {
    if t.numel() == 0 {
        return Ok(0.0);
    }
    Ok(t.f_to_kind(Kind::Double)?.f_mean(None::<Kind>)?.f_double_value(&[])?)
}

/// A config value that may be one string or a list of strings (TRL's `loss_type: str | list[str]`).
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// Checks that a config number is finite and within `[lo, hi]`.
pub fn check_range(key: &str, v: f64, lo: f64, hi: f64) -> PluginResult<()> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(PluginError::config(key, format!("must lie in [{lo}, {hi}], got {v}")));
    }
    Ok(())
}
