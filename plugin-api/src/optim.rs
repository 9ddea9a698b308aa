//! AdamW as `torch.optim.AdamW` (`foreach=False, fused=False`), shared by the memory plugins
//! (`single`, `ddp`, `zero`): the config of the run's `optimizer:` section, the checks of the
//! parameters at setup, the per-parameter update, `clip_grad_norm_`'s global norm and the
//! step that clips the gradients and updates every parameter. See the `single` plugin for
//! the formulas.
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::kinds::memory::StepReport;
use crate::kinds::TrainParam;
use crate::{parse_config, PluginError, PluginResult};

/// The run's `optimizer:` section.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// (β1, β2), the decay rates of the first and second moment. Default [0.9, 0.999];
    /// each in [0, 1); β2 0.95–0.999 is typical for LLMs.
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    /// Added to the denominator for stability. Default 1e-8; must be ≥ 0.
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
        if !(cfg.eps >= 0.0 && cfg.eps.is_finite()) {
            return Err(PluginError::config(
                "eps",
                format!("must be finite and ≥ 0, got {}", cfg.eps),
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

/// Zeroes the gradient of every tensor that has one (a memory plugin's `zero_grad`).
pub fn zero_grads<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> PluginResult<()> {
    for t in tensors {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.f_zero_()?;
        }
    }
    Ok(())
}

/// Global L2 norm of the gradients, as `clip_grad_norm_`: the norm of the per-tensor norms.
/// `None` when no parameter has a gradient.
pub fn global_norm(grads: &[Option<Tensor>]) -> PluginResult<Option<Tensor>> {
    let norms = grads
        .iter()
        .flatten()
        .map(|g| {
            if g.kind() == state_kind(g.kind()) {
                g.f_norm()
            } else {
                g.f_to_kind(Kind::Float)?.f_norm()
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if norms.is_empty() {
        return Ok(None);
    }
    let kind =
        if norms.iter().any(|n| n.kind() == Kind::Double) { Kind::Double } else { Kind::Float };
    let norms = norms.iter().map(|n| n.f_to_kind(kind)).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Tensor::f_stack(&norms, 0)?.f_norm()?))
}

/// `clip_grad_norm_`'s coefficient: max_norm / (total_norm + 1e-6), clamped to 1, as fp32
/// tensor arithmetic (Python's `float / tensor` is `tensor.reciprocal() * float`).
pub fn clip_coef(total_norm: &Tensor, max_norm: f64) -> PluginResult<Tensor> {
    Ok(total_norm.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)?)
}

/// The step's clipping coefficient when `max_grad_norm` is set (logged as `clip_coef` in
/// `metrics`), none otherwise.
pub fn clip_coef_for(
    total_norm: &Tensor,
    max_grad_norm: Option<f64>,
    metrics: &mut Vec<(String, f64)>,
) -> PluginResult<Option<Tensor>> {
    let Some(max_norm) = max_grad_norm else { return Ok(None) };
    let coef = clip_coef(total_norm, max_norm)?;
    metrics.push(("clip_coef".into(), coef.f_double_value(&[])?));
    Ok(Some(coef))
}

/// One parameter's AdamW moments.
pub struct AdamWMoments<'a> {
    pub exp_avg: &'a mut Tensor,
    pub exp_avg_sq: &'a mut Tensor,
    pub max_exp_avg_sq: Option<&'a mut Tensor>,
}

/// The AdamW update of `param` with gradient `grad` (already clipped, in the state's dtype
/// and on the state's device) at optimizer step `step` (1-based). The arithmetic runs where
/// the state lives: a parameter of another dtype or device (CPU offload) is copied there,
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
    let in_place = param.kind() == m.exp_avg.kind() && param.device() == m.exp_avg.device();
    let mut work = if in_place {
        param.shallow_clone()
    } else {
        param.f_to_device(m.exp_avg.device())?.f_to_kind(m.exp_avg.kind())?
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

/// One parameter's part in an [`adamw_step`]: the parameter, its AdamW moments and its
/// gradient (reduced over the ranks as the plugin does it; any dtype and device).
pub struct AdamWParam<'a> {
    pub param: &'a TrainParam,
    pub moments: AdamWMoments<'a>,
    pub grad: &'a Tensor,
}

/// A memory plugin's optimizer step once its gradients are reduced, `total_norm` being their
/// global L2 norm ([`global_norm`]). A non-finite norm skips the step: the report says
/// `skipped`, the step counter `step` stays and nothing is updated. Otherwise, without
/// autograd: the clipping coefficient ([`clip_coef_for`], logged in the report's metrics),
/// `step` advanced by one, then for each of `params` its gradient copied to its state's
/// device and dtype, multiplied by the coefficient, and the [`adamw_update`]. Zeroing the
/// gradients, after either outcome, is the caller's.
pub fn adamw_step<'a>(
    cfg: &AdamWConfig,
    total_norm: &Tensor,
    lr: f64,
    step: &mut i64,
    params: impl IntoIterator<Item = AdamWParam<'a>>,
) -> PluginResult<StepReport> {
    let grad_norm = total_norm.f_double_value(&[])?;
    if !grad_norm.is_finite() {
        return Ok(StepReport { grad_norm, skipped: true, metrics: vec![] });
    }
    let mut metrics = Vec::new();
    tch::no_grad(|| -> PluginResult<()> {
        // clip_grad_norm_'s coefficient, as torch computes it (see `clip_coef`).
        let coef = clip_coef_for(total_norm, cfg.max_grad_norm, &mut metrics)?;
        *step += 1;
        for AdamWParam { param, moments, grad } in params {
            let mut g =
                grad.f_to_device(moments.exp_avg.device())?.f_to_kind(moments.exp_avg.kind())?;
            if let Some(coef) = &coef {
                g = g.f_mul(&coef.f_to_device(g.device())?.f_to_kind(g.kind())?)?;
            }
            adamw_update(
                cfg,
                &param.tensor,
                param.lr_scale,
                param.weight_decay_scale,
                moments,
                &g,
                lr,
                *step,
            )?;
        }
        Ok(())
    })?;
    Ok(StepReport { grad_norm, skipped: false, metrics })
}
