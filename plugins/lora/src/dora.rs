//! DoRA, the weight-decomposed variant of LoRA (https://arxiv.org/abs/2402.09353), as peft's
//! `DoraLinearLayer`: a trainable magnitude `m` per output row and the direction
//! `W + ΔW` normalised row-wise (the norm over the input dim, detached from the graph as the
//! paper's section 4.3 and peft do). Layer = `m / ‖W + ΔW‖ · (W + ΔW)`.
use std::sync::Mutex;

use ferrotune_plugin_api::{PluginError, PluginResult};
use tch::Tensor;

/// peft's state-dict name of the magnitude vector (`[out]`), relative to the layer.
pub const LORA_MAGNITUDE: &str = "lora_magnitude_vector";

/// The DoRA part of a LoRA layer: the magnitude vector, and the weight norm the last merge
/// used (unmerging needs the norm of the unmerged weight, which the merged weight no longer
/// carries; peft caches it the same way).
pub struct DoraMagnitude {
    pub magnitude: Tensor,
    merge_norm: Mutex<Option<Tensor>>,
}

/// `‖W + ΔW‖` per output row, detached. `delta` is the scaled update `scale·B·A`.
pub fn weight_norm(weight: &Tensor, delta: &Tensor) -> PluginResult<Tensor> {
    let norm = tch::no_grad(|| {
        weight.f_add(delta)?.f_linalg_norm(2.0, [1i64].as_slice(), false, None::<tch::Kind>)
    })?;
    Ok(norm.f_to_kind(weight.kind())?.f_detach()?)
}

impl DoraMagnitude {
    /// Starts the magnitude at `‖W + ΔW‖` (so that the layer starts equal to the LoRA one).
    pub fn new(base_weight: &Tensor, delta: &Tensor) -> PluginResult<Self> {
        let magnitude = weight_norm(base_weight, delta)?.f_detach_copy()?.set_requires_grad(true);
        Ok(Self { magnitude, merge_norm: Mutex::new(None) })
    }

    /// Records `norm` as the unmerged weight norm (what a merge records), so that
    /// `unmerge` can invert a weight that is merged by construction (PiSSA's original W).
    pub fn remember_merge_norm(&self, norm: Tensor) {
        *self.merge_norm.lock().unwrap_or_else(|p| p.into_inner()) = Some(norm);
    }

    /// What DoRA adds to the base layer's output `result`:
    /// `(m/‖W+ΔW‖ − 1) · x Wᵀ + m/‖W+ΔW‖ · scale · lora_result`.
    ///
    /// `base_result` is `x Wᵀ + b` when the LoRA input is the layer input (no dropout), `None`
    /// when dropout changed it (then `x Wᵀ` is recomputed from the dropped input, as peft does).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        lora_result: &Tensor,
        weight: &Tensor,
        bias: Option<Tensor>,
        base_result: Option<Tensor>,
        lora_weight: &Tensor,
        scaling: f64,
    ) -> PluginResult<Tensor> {
        let weight = weight.f_to_kind(x.kind())?;
        let delta = lora_weight.f_to_kind(x.kind())?.f_detach()? * scaling;
        let norm = weight_norm(&weight, &delta)?;
        let mag_norm_scale = self.magnitude.f_div(&norm)?.f_view([1, -1])?;
        let base_result = match base_result {
            Some(r) => match bias {
                Some(b) => r.f_sub(&b)?,
                None => r,
            },
            None => x.f_linear::<Tensor>(&weight, None)?,
        };
        let dora = (&mag_norm_scale - 1.0).f_mul(&base_result)?
            + mag_norm_scale.f_mul(lora_result)? * scaling;
        Ok(dora)
    }

    /// `m / ‖W + ΔW‖ · (W + ΔW)`; remembers the norm for `unmerge`.
    pub fn merge(&self, weight: &Tensor, delta: &Tensor) -> PluginResult<Tensor> {
        let norm = weight_norm(weight, delta)?;
        let factor = tch::no_grad(|| self.magnitude.f_div(&norm)?.f_view([-1, 1]))?;
        self.remember_merge_norm(norm);
        Ok(tch::no_grad(|| factor.f_mul(&weight.f_add(delta)?))?)
    }

    /// Inverse of `merge`: `merged / (m / ‖W + ΔW‖) − ΔW`, with the norm the merge recorded.
    pub fn unmerge(&self, merged: &Tensor, delta: &Tensor) -> PluginResult<Tensor> {
        let norm = self
            .merge_norm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Tensor::shallow_clone);
        let norm = norm.ok_or_else(|| {
            PluginError::invalid(
                "DoRA: unmerged_weight needs the weight norm of the unmerged weight, which only merged_weight records; \
                 call merged_weight first (the merged weight alone does not determine it)",
            )
        })?;
        let factor = tch::no_grad(|| self.magnitude.f_div(&norm)?.f_view([-1, 1]))?;
        Ok(tch::no_grad(|| merged.f_div(&factor)?.f_sub(delta))?)
    }
}
