//! One optimizer step, the trainer's inner loop shared by `train` and `bench train`: each
//! micro-batch's loss and backward, then the memory plugin's step; the step's metrics
//! combined over micro-batches and ranks.
use std::time::Instant;

use anyhow::{bail, Result};
use ferrotune_plugin_api::{Batch, Collectives, MemoryStrategy, Objective, StepReport};
use tch::Tensor;

use super::config::OnNonFinite;
use super::context::{BatchContext, PolicyContext};
use crate::data::layout::Layout;
use crate::dist::collectives::SingleProcess;
use crate::peft::PeftModel;
use crate::text::Tokenizer;

/// What one optimizer step did ([`optimizer_step`]).
pub struct StepOutcome {
    /// The sum of the micro-batch losses (with `num_items_in_batch` in the batch metadata:
    /// the mean token loss of the whole step).
    pub loss: f64,
    /// The objective's metrics over the step's micro-batches (see [`MetricOp`]).
    pub metrics: Vec<(String, f64)>,
    /// The memory plugin's report (gradient norm, skipped).
    pub report: StepReport,
    /// Where the wall time went.
    pub timing: StepTiming,
}

/// Seconds spent in one optimizer step: the objective's `loss` calls (batch building, forward
/// and loss), `backward`, and the memory plugin's `step` (clipping, optimizer update, zeroing
/// the gradients). On CUDA, asynchronous kernels are counted where something waits for them.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StepTiming {
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

/// The batch metadata of a micro-batch: `num_items_in_batch`, the label tokens of every
/// micro-batch of the optimizer step (the `sft` objective divides its token sum by it).
pub fn batch_meta(num_items_in_batch: i64) -> String {
    serde_json::json!({ "num_items_in_batch": num_items_in_batch }).to_string()
}

/// Where a micro-batch sits in the run, for its metadata.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MicroPosition {
    /// Label tokens of the whole optimizer step (sequences only).
    pub num_items: i64,
    pub gradient_accumulation_steps: usize,
    /// Index of the micro-batch within its optimizer step.
    pub micro_index: usize,
    /// Generation objectives: which reuse of the generation batch this step is.
    pub iteration: usize,
    pub num_iterations: usize,
    /// The tokenizer's end-of-sequence id (prompts batches: where a completion stops).
    pub eos_token_id: Option<i64>,
}

/// The metadata of a micro-batch in `layout`: SFT's `num_items_in_batch` (sequences only:
/// other objectives count their own items), `gradient_accumulation_steps`, the position of
/// the micro-batch for objectives that reuse a generation batch, the sample ids, and what
/// the layout adds.
pub(crate) fn micro_meta(
    layout: Layout,
    at: MicroPosition,
    sample_ids: Vec<serde_json::Value>,
    extra: serde_json::Map<String, serde_json::Value>,
) -> String {
    let mut meta = extra;
    if layout == Layout::Sequences {
        meta.insert("num_items_in_batch".into(), serde_json::json!(at.num_items));
    }
    meta.insert(
        "gradient_accumulation_steps".into(),
        serde_json::json!(at.gradient_accumulation_steps),
    );
    meta.insert("micro_index".into(), serde_json::json!(at.micro_index));
    meta.insert("iteration".into(), serde_json::json!(at.iteration));
    meta.insert("num_iterations".into(), serde_json::json!(at.num_iterations));
    if let (Layout::Prompts, Some(eos)) = (layout, at.eos_token_id) {
        meta.insert("eos_token_id".into(), serde_json::json!(eos));
    }
    meta.insert("sample_ids".into(), serde_json::Value::Array(sample_ids));
    serde_json::Value::Object(meta).to_string()
}

/// One optimizer step, the trainer's inner loop: for each micro-batch `batches` yields (built
/// lazily, one at a time), the objective's loss through `model` in training mode (adapter
/// dropout on) and its backward; then the memory plugin's step at learning rate `lr` (which
/// also zeroes the gradients).
pub fn optimizer_step(
    model: &PeftModel,
    tokenizer: &Tokenizer,
    objective: &mut dyn Objective,
    memory: &mut dyn MemoryStrategy,
    batches: impl IntoIterator<Item = Result<Batch>>,
    lr: f64,
) -> Result<StepOutcome> {
    let ctx = PolicyContext {
        model,
        tokenizer,
        train: true,
        rewards: &[],
        max_len: usize::MAX,
        reference: None,
    };
    optimizer_step_with(&ctx, objective, memory, batches, lr, &SingleProcess, 1.0)
}

/// [`optimizer_step`] with the run's full context (reward plugins, length bound), its process
/// group, and the factor each micro-batch loss is multiplied by before its backward (the world
/// size for a sequence loss divided by the global token count: the memory plugin averages
/// gradients over the ranks). The reported loss is this rank's, unscaled.
pub(crate) fn optimizer_step_with(
    ctx: &PolicyContext<'_>,
    objective: &mut dyn Objective,
    memory: &mut dyn MemoryStrategy,
    batches: impl IntoIterator<Item = Result<Batch>>,
    lr: f64,
    comm: &dyn Collectives,
    loss_scale: f64,
) -> Result<StepOutcome> {
    let mut timing = StepTiming::default();
    let (mut loss, mut micro_metrics) = (0f64, Vec::new());
    let mut clock = Instant::now();
    let lap = |clock: &mut Instant| {
        let s = clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        s
    };
    for batch in batches {
        let batch = batch?;
        let out = objective.loss(&batch, &BatchContext::new(ctx, &batch))?;
        timing.forward_s += lap(&mut clock);
        if loss_scale == 1.0 {
            out.loss.f_backward()?
        } else {
            out.loss.f_mul_scalar(loss_scale)?.f_backward()?
        }
        loss += out.loss.f_double_value(&[])?;
        micro_metrics.push(out.metrics);
        timing.backward_s += lap(&mut clock);
    }
    let metrics = combine_metrics(&micro_metrics);
    let report = memory.step(lr, comm)?;
    timing.optimizer_s += lap(&mut clock);
    Ok(StepOutcome { loss, metrics, report, timing })
}

/// How a metric of several micro-batches or ranks becomes one value, by its name's last
/// part: `min…` / `…_min` the minimum, `max…` / `…_max` the maximum, anything else the mean
/// (as trl gathers its metrics over processes, then takes the mean, min or max).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricOp {
    Mean,
    Min,
    Max,
}

impl MetricOp {
    fn of(name: &str) -> Self {
        let last = name.rsplit('/').next().unwrap_or(name);
        if last.starts_with("min") || last.ends_with("_min") {
            MetricOp::Min
        } else if last.starts_with("max") || last.ends_with("_max") {
            MetricOp::Max
        } else {
            MetricOp::Mean
        }
    }
}

/// The step's metrics from those of its micro-batches (each micro-batch counts once; a
/// metric some micro-batches lack is combined over those that have it).
fn combine_metrics(micro: &[Vec<(String, f64)>]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64, usize)> = Vec::new();
    for (k, v) in micro.iter().flatten() {
        match out.iter_mut().find(|(n, _, _)| n == k) {
            Some(m) => {
                m.1 = match MetricOp::of(k) {
                    MetricOp::Mean => m.1 + v,
                    MetricOp::Min => m.1.min(*v),
                    MetricOp::Max => m.1.max(*v),
                };
                m.2 += 1;
            }
            None => out.push((k.clone(), *v, 1)),
        }
    }
    out.into_iter()
        .map(
            |(k, v, n)| if MetricOp::of(&k) == MetricOp::Mean { (k, v / n as f64) } else { (k, v) },
        )
        .collect()
}

/// The step's metrics over all ranks: each rank's value combined by [`MetricOp`]. Ranks run
/// the same objective, so they report the same metric names; if their lists differ anyway,
/// each rank keeps its own values (rank 0's are logged) and a warning says so.
pub(crate) fn reduce_metrics(
    comm: &dyn Collectives,
    metrics: Vec<(String, f64)>,
) -> Result<Vec<(String, f64)>> {
    use ferrotune_plugin_api::ReduceOp;
    if comm.world_size() == 1 {
        return Ok(metrics);
    }
    let n = metrics.len() as f64;
    let counts = Tensor::from_slice(&[n, -n]);
    comm.all_reduce(&counts, ReduceOp::MAX)?;
    if counts.f_double_value(&[0])? != -counts.f_double_value(&[1])? {
        tracing::warn!("ranks report different objective metrics this step; logging rank 0's");
        return Ok(metrics);
    }
    let mut out = metrics;
    for (op, reduce) in [
        (MetricOp::Mean, ReduceOp::AVG),
        (MetricOp::Min, ReduceOp::MIN),
        (MetricOp::Max, ReduceOp::MAX),
    ] {
        let idx: Vec<usize> = (0..out.len()).filter(|&i| MetricOp::of(&out[i].0) == op).collect();
        if idx.is_empty() {
            continue;
        }
        let values = Tensor::from_slice(&idx.iter().map(|&i| out[i].1).collect::<Vec<f64>>());
        comm.all_reduce(&values, reduce)?;
        for (j, &i) in idx.iter().enumerate() {
            out[i].1 = values.f_double_value(&[j as i64])?;
        }
    }
    Ok(out)
}

pub(crate) fn on_device(
    tensors: Vec<(String, Tensor)>,
    device: tch::Device,
) -> Result<Vec<(String, Tensor)>> {
    tensors.into_iter().map(|(n, t)| Ok((n, t.f_to_device(device)?))).collect()
}

/// The loss of a step over all ranks: the sum of the ranks' shares for a sequence loss
/// (each is divided by the global token count), else the mean of the ranks' losses.
pub(crate) fn global_loss(comm: &dyn Collectives, local: f64, layout: Layout) -> Result<f64> {
    if comm.world_size() == 1 {
        return Ok(local);
    }
    let t = Tensor::from_slice(&[local]);
    let op = if layout == Layout::Sequences {
        ferrotune_plugin_api::ReduceOp::SUM
    } else {
        ferrotune_plugin_api::ReduceOp::AVG
    };
    comm.all_reduce(&t, op)?;
    Ok(t.f_double_value(&[0])?)
}

/// `training.on_nonfinite`: counts the steps whose loss or gradient norm is NaN or infinite
/// (the memory plugin skipped them: nothing was updated) and, with `stop`, ends the run after
/// `limit` of them in a row.
pub(crate) struct NonFiniteSteps {
    policy: OnNonFinite,
    limit: usize,
    streak: usize,
    /// Such steps of the whole run.
    pub total: usize,
}

impl NonFiniteSteps {
    pub fn new(policy: OnNonFinite, limit: usize) -> Self {
        Self { policy, limit: limit.max(1), streak: 0, total: 0 }
    }

    /// Step `step` had `loss` and reported `report`; an error (with `stop`) names the step,
    /// what was not finite, and the keys that decide.
    pub fn observe(&mut self, step: usize, loss: f64, report: &StepReport) -> Result<()> {
        let mut what = Vec::new();
        if !loss.is_finite() {
            what.push(format!("loss {loss}"));
        }
        if !report.grad_norm.is_finite() {
            what.push(format!("gradient norm {}", report.grad_norm));
        } else if report.skipped {
            what.push("gradients (the memory plugin skipped the step)".to_string());
        }
        if what.is_empty() {
            self.streak = 0;
            return Ok(());
        }
        self.streak += 1;
        self.total += 1;
        let what = what.join(" and ");
        if self.policy == OnNonFinite::Skip {
            tracing::warn!("step {step}: {what}; skipped (training.on_nonfinite: skip)");
            return Ok(());
        }
        if self.streak >= self.limit {
            bail!(
                "step {step}: {what}, {} step(s) in a row (training.max_nonfinite_steps: {}); every such step was skipped \
                 and nothing was saved from them. The model's weights or the data produce NaN/Inf (check the model, lower \
                 optimizer.lr, use dtype f32), or set training.on_nonfinite: skip to keep going",
                self.streak,
                self.limit
            );
        }
        eprintln!(
            "step {step}: {what}; step skipped ({} of training.max_nonfinite_steps: {} in a row)",
            self.streak, self.limit
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_combine_by_mean_min_or_max_over_micro_batches() {
        assert_eq!(MetricOp::of("completions/min_length"), MetricOp::Min);
        assert_eq!(MetricOp::of("clip_ratio/region_max"), MetricOp::Max);
        assert_eq!(MetricOp::of("rewards/margins"), MetricOp::Mean);
        assert_eq!(
            MetricOp::of("rewards/maximal_thing_mean"),
            MetricOp::Max,
            "a name starting with max is a maximum"
        );
        let m = |v: &[(&str, f64)]| v.iter().map(|(k, x)| (k.to_string(), *x)).collect::<Vec<_>>();
        let got = combine_metrics(&[
            m(&[("a", 1.0), ("completions/min_length", 4.0), ("completions/max_length", 9.0)]),
            m(&[
                ("a", 3.0),
                ("completions/min_length", 2.0),
                ("completions/max_length", 7.0),
                ("b", 5.0),
            ]),
        ]);
        assert_eq!(
            got,
            m(&[
                ("a", 2.0),
                ("completions/min_length", 2.0),
                ("completions/max_length", 9.0),
                ("b", 5.0)
            ])
        );
        assert_eq!(
            reduce_metrics(&crate::dist::collectives::SingleProcess, got.clone()).unwrap(),
            got
        );
    }

    #[test]
    fn nonfinite_steps_stop_after_the_limit_in_a_row_or_are_counted() {
        let ok = StepReport { grad_norm: 1.0, skipped: false, metrics: vec![] };
        let bad = StepReport { grad_norm: f64::NAN, skipped: true, metrics: vec![] };
        let mut g = NonFiniteSteps::new(OnNonFinite::Stop, 2);
        g.observe(1, f64::NAN, &bad).unwrap();
        g.observe(2, 1.0, &ok).unwrap();
        g.observe(3, 1.0, &bad).unwrap();
        let e = g.observe(4, f64::INFINITY, &bad).unwrap_err().to_string();
        assert!(e.starts_with("step 4: loss inf and gradient norm NaN, 2 step(s) in a row"), "{e}");
        assert!(e.contains("training.on_nonfinite"), "{e}");
        assert_eq!(g.total, 3);
        let mut g = NonFiniteSteps::new(OnNonFinite::Skip, 1);
        for step in 1..=5 {
            g.observe(step, f64::NAN, &bad).unwrap();
        }
        assert_eq!(g.total, 5);
        let mut g = NonFiniteSteps::new(OnNonFinite::Stop, 1);
        let e = g.observe(7, 2.0, &bad).unwrap_err().to_string();
        assert!(e.starts_with("step 7: gradient norm NaN"), "{e}");
    }
}
