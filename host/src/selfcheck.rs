//! The boundary self-check: autograd through a plugin, on a chosen device.
//!
//! The test-kit adapter (`testkit-lowrank`) owns trainable tensors A and B. The host runs
//! the adapted layer, a loss and `backward()`, and compares the plugin's gradients with the
//! same computation done wholly in the host from copies of A and B. Then the host takes an
//! SGD step on the tensors the plugin handed out and checks the plugin sees it (its state
//! dict and its forward change exactly as the host's copies do).
use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::tensor::device_name;
use ferrotune_plugin_api::{AdapterLayer, AdapterMethod};
use tch::{Device, Kind, Tensor};

use crate::model::linear::FrozenLinear;
use crate::plugins::Registry;

pub const ADAPTER: &str = "testkit-lowrank";

/// What the self-check measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub device: Device,
    /// max |plugin − host| over the layer output.
    pub output_diff: f64,
    /// max |plugin − host| over the gradients of A and B.
    pub grad_a_diff: f64,
    pub grad_b_diff: f64,
    /// max |plugin − host| of A after a host SGD step, read back through the plugin.
    pub step_diff: f64,
    /// max |plugin − host| of the layer output after the step.
    pub output_after_step_diff: f64,
    /// How much the step changed A (must be non-zero for the check to mean anything).
    pub step_size: f64,
}

impl Report {
    /// Differences allowed: none on CPU (same kernels, same order); CUDA may pick kernels
    /// per call, so a float32 rounding-level tolerance there.
    pub fn tolerance(&self) -> f64 {
        if self.device == Device::Cpu {
            0.0
        } else {
            1e-5
        }
    }
    pub fn passed(&self) -> bool {
        let t = self.tolerance();
        [
            self.output_diff,
            self.grad_a_diff,
            self.grad_b_diff,
            self.step_diff,
            self.output_after_step_diff,
        ]
        .iter()
        .all(|d| d.is_finite() && *d <= t)
            && self.step_size > 0.0
    }
    pub fn lines(&self) -> Vec<String> {
        let dev = device_name(self.device);
        vec![
            format!("device                          {dev}"),
            format!("output   max |plugin - host|    {:e}", self.output_diff),
            format!("grad A   max |plugin - host|    {:e}", self.grad_a_diff),
            format!("grad B   max |plugin - host|    {:e}", self.grad_b_diff),
            format!(
                "host SGD step seen by plugin    max |diff| {:e} (step size {:e})",
                self.step_diff, self.step_size
            ),
            format!("output after step               max |diff| {:e}", self.output_after_step_diff),
            format!("tolerance                       {:e}", self.tolerance()),
            format!(
                "result                          {}",
                if self.passed() { "PASS" } else { "FAIL" }
            ),
        ]
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(a.f_sub(b)?.f_abs()?.f_max()?.f_to_kind(Kind::Double)?.double_value(&[]))
}

fn param(layer: &dyn AdapterLayer, name: &str) -> Result<Tensor> {
    layer
        .parameters()?
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| p.tensor)
        .with_context(|| format!("adapter has no parameter `{name}`"))
}

/// Runs the self-check with the test-kit adapter from `registry` on `device`.
pub fn run(registry: &Registry, device: Device) -> Result<Report> {
    let (rank, alpha) = (4_i64, 8.0_f64);
    let scale = alpha / rank as f64;
    let method = registry.adapter(ADAPTER, &format!(r#"{{"rank": {rank}, "alpha": {alpha}}}"#))?;
    tch::manual_seed(1234);
    let opts = (Kind::Float, device);
    let base = FrozenLinear::new(
        "model.layers.0.mlp.down_proj",
        Tensor::f_randn([8, 16], opts)?,
        Some(Tensor::f_randn([8], opts)?),
    );
    let layer = method.adapt_linear(&base.name, &base)?;
    let x = Tensor::f_randn([3, 5, 16], opts)?;

    // Plugin path: forward through the plugin, loss and backward in the host.
    let y = layer.forward(&x, &base, true)?;
    y.f_pow_tensor_scalar(2)?.f_mean(Kind::Float)?.backward();
    let a = param(layer.as_ref(), "lowrank_A.weight")?;
    let b = param(layer.as_ref(), "lowrank_B.weight")?;

    // Host-only path from copies of the same parameters.
    let a2 = a.detach().copy().set_requires_grad(true);
    let b2 = b.detach().copy().set_requires_grad(true);
    let host_forward = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        Ok(x.f_linear(&base.weight, base.bias.as_ref())?
            .f_add(&(x.f_matmul(&a.tr())?.f_matmul(&b.tr())? * scale))?)
    };
    let y2 = host_forward(&a2, &b2)?;
    y2.f_pow_tensor_scalar(2)?.f_mean(Kind::Float)?.backward();
    if !a.grad().defined() || !b.grad().defined() {
        bail!("the plugin's parameters received no gradient from the host's backward()");
    }
    let output_diff = max_abs_diff(&y, &y2)?;
    let grad_a_diff = max_abs_diff(&a.grad(), &a2.grad())?;
    let grad_b_diff = max_abs_diff(&b.grad(), &b2.grad())?;

    // Host SGD step on the tensors the plugin handed out, and on the host copies.
    let lr = 0.1;
    let before = a.detach().copy();
    tch::no_grad(|| -> Result<()> {
        for (p, q) in [(&a, &a2), (&b, &b2)] {
            let _ = p.shallow_clone().f_sub_(&(p.grad() * lr))?;
            let _ = q.shallow_clone().f_sub_(&(q.grad() * lr))?;
        }
        Ok(())
    })?;
    let seen = layer
        .state_dict()?
        .into_iter()
        .find(|(n, _)| n == "lowrank_A.weight")
        .map(|(_, t)| t)
        .context("adapter state dict lacks lowrank_A.weight")?;
    let step_diff = max_abs_diff(&seen, &a2)?;
    let step_size = max_abs_diff(&seen, &before)?;
    let y_after = tch::no_grad(|| layer.forward(&x, &base, false))?;
    let y2_after = tch::no_grad(|| host_forward(&a2, &b2))?;
    let output_after_step_diff = max_abs_diff(&y_after, &y2_after)?;
    Ok(Report {
        device,
        output_diff,
        grad_a_diff,
        grad_b_diff,
        step_diff,
        output_after_step_diff,
        step_size,
    })
}
