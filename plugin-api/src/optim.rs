//! AdamW as `torch.optim.AdamW(fused=True)`, shared by the memory plugins (`single`, `ddp`,
//! `zero`): the config of the run's `optimizer:` section, the checks of the parameters at
//! setup, `clip_grad_norm_(foreach=True)`'s global norm, and the step that clips the
//! gradients and updates every parameter with libtorch's fused multi-tensor kernel
//! (`_fused_adamw_`, bound through `csrc/optim.cpp` since tch has no binding for it), the
//! per-tensor update ([`adamw_update`], `fused=False`'s kernels) only where the fused one
//! cannot run. See the `single` plugin for the formulas.
//!
//! A bf16/f16 parameter keeps a persistent fp32 master copy next to its moments
//! ([`AdamWState`]): the update runs on the master, and the parameter receives it rounded.
//! fp32 and fp64 parameters are updated in place, bit-identical to torch.
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::kinds::memory::StepReport;
use crate::kinds::TrainParam;
use crate::{parse_config, PluginError, PluginResult};

mod multi_tensor;
mod state;

pub use state::{load_state, needs_master, parse_step, AdamWState, StateEntry, StateSlot};

/// The key of `optimizer_json` through which the host names the parameters it partitions
/// over the ranks, passed only to a memory plugin reporting
/// [`SHARD_TRAINABLE_PARAMS`](crate::kinds::memory::SHARD_TRAINABLE_PARAMS): a list of
/// parameter names ([`split_partitioned`]).
pub const PARTITIONED_KEY: &str = "partitioned";

/// The run's `optimizer:` section.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// (β1, β2), the decay rates of the first and second moment. Default [0.9, 0.999];
    /// each in [0, 1); β2 0.95–0.999 is typical for LLMs.
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    /// Added to the denominator for stability. Default 1e-8; must be > 0 (0 turns a zero
    /// gradient entry into 0/0 = NaN).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, scaled per parameter by `weight_decay_scale`. Default 0.01
    /// (torch's); typical 0.0–0.1; must be ≥ 0.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Use the maximum of past second moments (AMSGrad). Default false.
    #[serde(default)]
    pub amsgrad: bool,
    /// Clip gradients to this global L2 norm before the step; null/absent: no clipping.
    /// Typical 1.0 (transformers' default); must be > 0.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
}

fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.01
}

impl AdamWConfig {
    pub fn parse(optimizer_json: &str) -> PluginResult<Self> {
        let cfg: Self = parse_config(optimizer_json)?;
        let (b1, b2) = cfg.betas;
        for (i, b) in [b1, b2].into_iter().enumerate() {
            if !(0.0..1.0).contains(&b) {
                return Err(PluginError::config(
                    &format!("betas[{i}]"),
                    format!("must lie in [0, 1), got {b}"),
                ));
            }
        }
        // eps = 0 divides 0 by 0 wherever a gradient entry is 0 (a frozen row, an unused token):
        // NaN in the parameters from the first step on.
        if !(cfg.eps > 0.0 && cfg.eps.is_finite()) {
            return Err(PluginError::config(
                "optimizer.eps",
                format!("must be positive and finite (typical 1e-8), got {}", cfg.eps),
            ));
        }
        if !(cfg.weight_decay >= 0.0 && cfg.weight_decay.is_finite()) {
            return Err(PluginError::config(
                "weight_decay",
                format!("must be finite and ≥ 0, got {}", cfg.weight_decay),
            ));
        }
        if let Some(m) = cfg.max_grad_norm {
            if !(m > 0.0 && m.is_finite()) {
                return Err(PluginError::config(
                    "max_grad_norm",
                    format!("must be finite and > 0 (omit it to disable clipping), got {m}"),
                ));
            }
        }
        Ok(cfg)
    }
}

/// `optimizer_json` as a plugin reporting
/// [`SHARD_TRAINABLE_PARAMS`](crate::kinds::memory::SHARD_TRAINABLE_PARAMS) receives it: the
/// run's `optimizer:` section ([`AdamWConfig::parse`]) and the names listed under
/// [`PARTITIONED_KEY`] (none when the key is absent), the key removed before the config is
/// parsed (the config denies unknown keys).
pub fn split_partitioned(optimizer_json: &str) -> PluginResult<(AdamWConfig, Vec<String>)> {
    let text = if optimizer_json.trim().is_empty() { "{}" } else { optimizer_json };
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str(text) else {
        // Not a JSON object: the config parser says what is wrong with it.
        return Ok((AdamWConfig::parse(optimizer_json)?, Vec::new()));
    };
    let names = match map.remove(PARTITIONED_KEY) {
        None => Vec::new(),
        Some(v) => serde_json::from_value::<Vec<String>>(v).map_err(|e| {
            PluginError::config(PARTITIONED_KEY, format!("must be a list of parameter names: {e}"))
        })?,
    };
    Ok((AdamWConfig::parse(&serde_json::Value::Object(map).to_string())?, names))
}

/// What a memory plugin's `setup` checks of its parameters, each in turn: its name not
/// listed before, a floating-point tensor on the run's `device` (`device_hint` ends that
/// error), `lr_scale` and `weight_decay_scale` finite and ≥ 0.
pub fn check_params(params: &[TrainParam], device: Device, device_hint: &str) -> PluginResult<()> {
    let mut seen = std::collections::HashSet::new();
    for p in params {
        let t = &p.tensor;
        if !seen.insert(p.name.clone()) {
            return Err(PluginError::invalid(format!("parameter `{}` is listed twice", p.name)));
        }
        if !t.is_floating_point() {
            return Err(PluginError::invalid(format!(
                "parameter `{}` is {:?}, not floating point",
                p.name,
                t.kind()
            )));
        }
        if t.device() != device {
            return Err(PluginError::invalid(format!(
                "parameter `{}` is on {:?}, the run's device is {device:?}{device_hint}",
                p.name,
                t.device()
            )));
        }
        for (key, v) in [("lr_scale", p.lr_scale), ("weight_decay_scale", p.weight_decay_scale)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(PluginError::invalid(format!(
                    "parameter `{}`: {key} must be finite and ≥ 0, got {v}",
                    p.name
                )));
            }
        }
    }
    Ok(())
}

/// The dtype optimizer state is kept in for a parameter of kind `k`: fp32, fp64 for fp64.
pub fn state_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Drops the gradient of every tensor (a memory plugin's `zero_grad`), as torch's
/// `zero_grad(set_to_none=True)`: no memory is written, and the next backward allocates
/// fresh gradients instead of accumulating into zeroed ones.
pub fn zero_grads<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> PluginResult<()> {
    for t in tensors {
        if t.grad().defined() {
            multi_tensor::set_grad_none(t)?;
        }
    }
    Ok(())
}

/// Global L2 norm of the gradients, as `clip_grad_norm_(foreach=True)`: one
/// `_foreach_norm` per norm dtype (fp64 gradients in fp64, others in fp32), then the norm
/// of the stacked per-tensor norms. `None` when no parameter has a gradient.
pub fn global_norm(grads: &[Option<Tensor>]) -> PluginResult<Option<Tensor>> {
    let (doubles, others): (Vec<&Tensor>, Vec<&Tensor>) =
        grads.iter().flatten().partition(|g| g.kind() == Kind::Double);
    let kind = if doubles.is_empty() { Kind::Float } else { Kind::Double };
    let mut norms = Vec::with_capacity(doubles.len() + others.len());
    for (group, norm_kind) in [(others, Kind::Float), (doubles, Kind::Double)] {
        if !group.is_empty() {
            for n in multi_tensor::foreach_norm(&group, norm_kind)? {
                norms.push(n.f_to_kind(kind)?);
            }
        }
    }
    if norms.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::f_stack(&norms, 0)?.f_norm()?))
}

/// `clip_grad_norm_`'s coefficient: max_norm / (total_norm + 1e-6), clamped to 1, as fp32
/// tensor arithmetic (Python's `float / tensor` is `tensor.reciprocal() * float`).
pub fn clip_coef(total_norm: &Tensor, max_norm: f64) -> PluginResult<Tensor> {
    Ok(total_norm.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)?)
}

/// The step's one read-back to the host: the global norm and, when clipping, the clipping
/// coefficient, copied together.
fn read_norm_and_coef(
    total_norm: &Tensor,
    coef: Option<&Tensor>,
) -> PluginResult<(f64, Option<f64>)> {
    let mut parts = vec![total_norm.f_to_kind(Kind::Double)?.f_reshape([1])?];
    if let Some(c) = coef {
        parts.push(c.f_to_kind(Kind::Double)?.f_reshape([1])?);
    }
    let host = Tensor::f_cat(&parts, 0)?.f_to_device(Device::Cpu)?;
    let values = Vec::<f64>::try_from(&host).map_err(|e| PluginError::runtime(e.to_string()))?;
    Ok((values[0], values.get(1).copied()))
}

/// One parameter's AdamW state, borrowed for a step (owned: [`AdamWState`]).
pub struct AdamWMoments<'a> {
    pub exp_avg: &'a mut Tensor,
    pub exp_avg_sq: &'a mut Tensor,
    pub max_exp_avg_sq: Option<&'a mut Tensor>,
    /// The fp32 master copy of a bf16/f16 parameter, in the moments' dtype and on their
    /// device: when present the update runs on it and the parameter then receives
    /// `master.to(param.dtype)`.
    pub master: Option<&'a mut Tensor>,
}

/// The AdamW update of `param` with gradient `grad` (already clipped, in the state's dtype
/// and on the state's device) at optimizer step `step` (1-based). The arithmetic runs where
/// the state lives: on the master copy when there is one (the parameter receives it
/// rounded), else a parameter of another dtype or device (CPU offload) is copied there,
/// updated, and copied back.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    cfg: &AdamWConfig,
    param: &Tensor,
    lr_scale: f64,
    weight_decay_scale: f64,
    m: AdamWMoments<'_>,
    grad: &Tensor,
    lr: f64,
    step: i64,
) -> PluginResult<()> {
    let (beta1, beta2) = cfg.betas;
    let lr = lr * lr_scale;
    let weight_decay = cfg.weight_decay * weight_decay_scale;
    let in_place = m.master.is_none()
        && param.kind() == m.exp_avg.kind()
        && param.device() == m.exp_avg.device();
    let mut work = match m.master.as_deref() {
        Some(master) => {
            check_master(master, m.exp_avg)?;
            master.shallow_clone()
        }
        None if in_place => param.shallow_clone(),
        None => param.f_to_device(m.exp_avg.device())?.f_to_kind(m.exp_avg.kind())?,
    };
    if weight_decay != 0.0 {
        let _ = work.f_mul_scalar_(1.0 - lr * weight_decay)?;
    }
    let _ = m.exp_avg.f_lerp_(grad, 1.0 - beta1)?;
    // torch: exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 − β2); its kernel computes
    // (value·g)·g, the product below, so the result is the same to the bit.
    let _ =
        m.exp_avg_sq.f_mul_scalar_(beta2)?.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, grad)?;
    let step = step as f64;
    let bias_correction1 = 1.0 - beta1.powf(step);
    let bias_correction2 = 1.0 - beta2.powf(step);
    let step_size = lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    let second = match m.max_exp_avg_sq {
        Some(max) => {
            // torch.maximum(max, v, out=max)
            let _ = max.f_maximum_out(max, m.exp_avg_sq)?;
            max.shallow_clone()
        }
        None => m.exp_avg_sq.shallow_clone(),
    };
    let denom = second.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?.f_add_scalar(cfg.eps)?;
    // torch: p.addcdiv_(m, denom, value=−step_size), computed as p + (value·m)/denom.
    let _ = work.f_addcdiv_(&m.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
    if !in_place {
        param.shallow_clone().f_copy_(&work)?;
    }
    Ok(())
}

/// A master copy must live where the moments do, in their dtype: the update runs there.
fn check_master(master: &Tensor, exp_avg: &Tensor) -> PluginResult<()> {
    if (master.kind(), master.device()) != (exp_avg.kind(), exp_avg.device()) {
        return Err(PluginError::invalid(format!(
            "AdamW master copy is {:?} on {:?}, its moments {:?} on {:?}",
            master.kind(),
            master.device(),
            exp_avg.kind(),
            exp_avg.device()
        )));
    }
    Ok(())
}

/// One parameter's part in an [`adamw_step`]: the parameter, its AdamW state and its
/// gradient (reduced over the ranks as the plugin does it; any dtype and device).
pub struct AdamWParam<'a> {
    pub param: &'a TrainParam,
    pub moments: AdamWMoments<'a>,
    pub grad: &'a Tensor,
}

/// A memory plugin's optimizer step once its gradients are reduced, `total_norm` being their
/// global L2 norm ([`global_norm`]). One read-back to the host, of the norm and the clipping
/// coefficient ([`clip_coef`], logged as `clip_coef` in the report's metrics). A non-finite
/// norm skips the step: the report says `skipped`, the step counter `step` stays and
/// nothing is updated. Otherwise, without autograd: `step` advanced by one, the gradients
/// copied to their state's device and dtype and multiplied by the coefficient
/// (`_foreach_mul_`), then the update of [`update_params`]. Dropping the gradients, after
/// either outcome, is the caller's ([`zero_grads`]).
pub fn adamw_step<'a>(
    cfg: &AdamWConfig,
    total_norm: &Tensor,
    lr: f64,
    step: &mut i64,
    params: impl IntoIterator<Item = AdamWParam<'a>>,
) -> PluginResult<StepReport> {
    let coef = cfg.max_grad_norm.map(|m| clip_coef(total_norm, m)).transpose()?;
    let (grad_norm, coef_value) = read_norm_and_coef(total_norm, coef.as_ref())?;
    if !grad_norm.is_finite() {
        return Ok(StepReport { grad_norm, skipped: true, metrics: vec![] });
    }
    let metrics = coef_value.map(|c| vec![("clip_coef".to_string(), c)]).unwrap_or_default();
    *step += 1;
    let mut work = params.into_iter().map(Work::new).collect::<PluginResult<Vec<_>>>()?;
    tch::no_grad(|| update_params(cfg, &mut work, coef.as_ref(), lr, *step))?;
    Ok(StepReport { grad_norm, skipped: false, metrics })
}

/// One parameter during a step: what the update writes (the parameter itself, its master
/// copy, or a temporary copy in the state's dtype and device) and its gradient there.
struct Work<'a> {
    param: &'a TrainParam,
    target: Tensor,
    /// Whether `target` is not the parameter (a master or a copy): the parameter receives it
    /// after the update.
    copied: bool,
    grad: Tensor,
    moments: AdamWMoments<'a>,
}

impl<'a> Work<'a> {
    fn new(p: AdamWParam<'a>) -> PluginResult<Self> {
        let (kind, device) = (p.moments.exp_avg.kind(), p.moments.exp_avg.device());
        let t = &p.param.tensor;
        let (target, copied) = match p.moments.master.as_deref() {
            Some(master) => {
                check_master(master, p.moments.exp_avg)?;
                (master.shallow_clone(), true)
            }
            None if t.kind() != kind || t.device() != device => {
                (t.f_detach()?.f_to_device(device)?.f_to_kind(kind)?, true)
            }
            None => (t.shallow_clone(), false),
        };
        let grad = p.grad.f_detach()?.f_to_device(device)?.f_to_kind(kind)?.f_contiguous()?;
        Ok(Self { param: p.param, target, copied, grad, moments: p.moments })
    }

    /// The parameters one fused call can take together: same hyper-parameters, dtype and
    /// device (`_fused_adamw_` takes one of each per call, as torch's param groups).
    fn group_key(&self) -> GroupKey {
        let p = self.param;
        (
            p.lr_scale.to_bits(),
            p.weight_decay_scale.to_bits(),
            self.target.kind(),
            self.target.device(),
        )
    }

    /// The fused kernel walks raw storage: every tensor it writes must be contiguous.
    fn fusable(&self) -> bool {
        let m = &self.moments;
        self.target.is_contiguous()
            && m.exp_avg.is_contiguous()
            && m.exp_avg_sq.is_contiguous()
            && m.max_exp_avg_sq.as_ref().is_none_or(|t| t.is_contiguous())
    }

    /// The reborrowed moments, for the per-tensor update of `target` (already the master
    /// where there is one, so none is passed on).
    fn moments(&mut self) -> AdamWMoments<'_> {
        let m = &mut self.moments;
        AdamWMoments {
            exp_avg: &mut *m.exp_avg,
            exp_avg_sq: &mut *m.exp_avg_sq,
            max_exp_avg_sq: m.max_exp_avg_sq.as_deref_mut(),
            master: None,
        }
    }

    /// Writes the updated master or copy into the parameter (rounded to its dtype, moved to
    /// its device: low-precision weights, CPU offload).
    fn copy_back(&self) -> PluginResult<()> {
        if self.copied {
            self.param.tensor.shallow_clone().f_copy_(&self.target)?;
        }
        Ok(())
    }
}

/// Clips (one `_foreach_mul_` per gradient dtype and device) and updates every parameter:
/// one `torch._fused_adamw_` per group of [`Work::group_key`], as
/// `torch.optim.AdamW(fused=True)` does per param group. A group the fused kernel cannot
/// take (a non-contiguous tensor, a device without the kernel: CPU, CUDA and MPS have it)
/// falls back to the per-tensor [`adamw_update`]. There is no `_foreach_` AdamW tier in
/// between: the work tensors are always in the state's fp32/fp64, which the fused kernel
/// takes on every device that has one, and a device without it has no `_foreach_` kernels
/// either (both come from the same backend registrations).
/// What parameters share one fused call: learning-rate and weight-decay scales (as bits),
/// dtype, device.
type GroupKey = (u64, u64, Kind, Device);

fn update_params(
    cfg: &AdamWConfig,
    work: &mut [Work<'_>],
    coef: Option<&Tensor>,
    lr: f64,
    step: i64,
) -> PluginResult<()> {
    let mut groups: Vec<(GroupKey, Vec<usize>)> = Vec::new();
    for (i, w) in work.iter().enumerate() {
        match groups.iter_mut().find(|(k, _)| *k == w.group_key()) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((w.group_key(), vec![i])),
        }
    }
    for (_, idx) in &groups {
        if let Some(coef) = coef {
            let grads: Vec<&Tensor> = idx.iter().map(|&i| &work[i].grad).collect();
            let c = coef.f_to_device(grads[0].device())?.f_to_kind(grads[0].kind())?;
            multi_tensor::foreach_mul_(&grads, &c)?;
        }
        update_group(cfg, work, idx, lr, step)?;
    }
    work.iter().try_for_each(Work::copy_back)
}

/// The tensor lists of one fused call over the parameters `idx` of `work`.
fn fused_lists<'w>(work: &'w [Work<'_>], idx: &[usize]) -> multi_tensor::FusedAdamW<'w> {
    let mut t = multi_tensor::FusedAdamW {
        params: Vec::with_capacity(idx.len()),
        grads: Vec::with_capacity(idx.len()),
        exp_avgs: Vec::with_capacity(idx.len()),
        exp_avg_sqs: Vec::with_capacity(idx.len()),
        max_exp_avg_sqs: Vec::new(),
    };
    for w in idx.iter().map(|&i| &work[i]) {
        t.params.push(&w.target);
        t.grads.push(&w.grad);
        t.exp_avgs.push(&*w.moments.exp_avg);
        t.exp_avg_sqs.push(&*w.moments.exp_avg_sq);
        t.max_exp_avg_sqs.extend(w.moments.max_exp_avg_sq.as_deref());
    }
    t
}

/// The AdamW update of the parameters `idx` of `work`, one group of [`update_params`].
fn update_group(
    cfg: &AdamWConfig,
    work: &mut [Work<'_>],
    idx: &[usize],
    lr: f64,
    step: i64,
) -> PluginResult<()> {
    let first = &work[idx[0]];
    let (lr_scale, wd_scale) = (first.param.lr_scale, first.param.weight_decay_scale);
    if idx.iter().all(|&i| work[i].fusable()) {
        let step_t = Tensor::f_full([], step as f64, (Kind::Float, first.target.device()))?;
        let hyper = multi_tensor::AdamWHyper {
            lr: lr * lr_scale,
            betas: cfg.betas,
            weight_decay: cfg.weight_decay * wd_scale,
            eps: cfg.eps,
            step: &step_t,
        };
        let tensors = fused_lists(work, idx);
        // The kernel checks the dtype and device before touching any tensor: on an error,
        // nothing is updated and the per-tensor path below runs instead.
        if multi_tensor::fused_adamw(&tensors, &hyper).is_ok() {
            return Ok(());
        }
    }
    for &i in idx {
        let w = &mut work[i];
        let (target, grad) = (w.target.shallow_clone(), w.grad.shallow_clone());
        adamw_update(cfg, &target, lr_scale, wd_scale, w.moments(), &grad, lr, step)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-tensor update (the fallback of devices without the fused kernel) with a
    /// master: the master follows an fp32 parameter updated alone bit for bit, and the bf16
    /// parameter is the master rounded after each step.
    #[test]
    fn per_tensor_update_runs_on_the_master() {
        let cfg = AdamWConfig::parse(r#"{"weight_decay": 0.1, "amsgrad": true}"#).unwrap();
        let init = Tensor::from_slice(&[1.0f32, -1.0, 0.75]).to_kind(Kind::BFloat16);
        let low = init.copy();
        let fp32 = init.to_kind(Kind::Float);
        let mut low_state = AdamWState::new(&low, true, Device::Cpu).unwrap();
        let mut fp32_state = AdamWState::new(&fp32, true, Device::Cpu).unwrap();
        assert!(fp32_state.master.is_none());
        for step in 1..=4 {
            let g = Tensor::from_slice(&[0.3f32, -0.2, 0.05]) * step as f64;
            adamw_update(&cfg, &low, 1.0, 1.0, low_state.moments(), &g, 1e-5, step).unwrap();
            adamw_update(&cfg, &fp32, 1.0, 1.0, fp32_state.moments(), &g, 1e-5, step).unwrap();
            let master = low_state.master.as_ref().unwrap();
            assert!(master.equal(&fp32), "step {step}");
            assert!(low.equal(&master.to_kind(Kind::BFloat16)), "step {step}");
        }
        assert!(!fp32.equal(&init.to_kind(Kind::Float)), "the updates accumulated");
        assert!(low.equal(&init), "each update is below bf16's precision near 1");
    }

    #[test]
    fn split_partitioned_strips_the_host_key() {
        let (cfg, names) =
            split_partitioned(r#"{"weight_decay": 0.0, "partitioned": ["a.w", "b.w"]}"#).unwrap();
        assert_eq!((cfg.weight_decay, names), (0.0, vec!["a.w".to_string(), "b.w".to_string()]));
        let (cfg, names) = split_partitioned("").unwrap();
        assert_eq!((cfg, names), (AdamWConfig::parse("{}").unwrap(), vec![]));
        let e = split_partitioned(r#"{"partitioned": [1]}"#).unwrap_err();
        assert!(e.message().contains("`partitioned`"), "{e}");
        let e = split_partitioned(r#"{"partitioned": [], "eps": 0}"#).unwrap_err();
        assert!(e.message().contains("`optimizer.eps`"), "{e}");
        let e = split_partitioned("[1]").unwrap_err();
        assert!(e.message().contains("invalid type"), "{e}");
    }
}
