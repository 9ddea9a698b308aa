//! `dpo`: Direct Preference Optimization and its loss variants, as TRL 1.16's `DPOTrainer`.
use ferrotune_plugin_api::prelude::*;
use serde::Deserialize;

use crate::common::{
    check_loss, check_range, ensure_finite, forward_logits, get_1d_opt, mean_f64, next_token_logps,
    Meta, OneOrMany,
};
use crate::losses::{dpo_loss, DpoLossType, DpoParams};
use crate::pair::{halves, pair_forward, reward_metrics};

/// Configuration (`objective: {plugin: dpo, ...}`), TRL's `DPOConfig` names.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// β: how far the policy may move from the reference. Default 0.1; typical 0.01–0.5.
    /// For `ipo` it is the regularisation τ.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `sigmoid` (default), `hinge`, `ipo`, `robust`, `exo_pair`, `nca_pair`, `bco_pair`,
    /// `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`, `discopop`,
    /// `sigmoid_norm`; or a list of them, summed with `loss_weights`.
    #[serde(default = "default_loss_type")]
    pub loss_type: OneOrMany,
    /// One weight per loss type (default all 1.0).
    #[serde(default)]
    pub loss_weights: Option<Vec<f64>>,
    /// Probability that a pair's labels are flipped, for `robust` (in [0, 0.5)), `exo_pair`
    /// (in (0, 1)), `aot`/`aot_unpaired`. Default 0.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Ignore the reference model: its log-probabilities are taken as 0 (TRL ≤ 0.x's
    /// `reference_free`). Default false.
    #[serde(default)]
    pub reference_free: bool,
    /// τ of `discopop`'s mixing. Default 0.05.
    #[serde(default = "default_discopop_tau")]
    pub discopop_tau: f64,
}

fn default_beta() -> f64 {
    0.1
}
fn default_loss_type() -> OneOrMany {
    OneOrMany::One("sigmoid".into())
}
fn default_discopop_tau() -> f64 {
    0.05
}

pub struct Dpo {
    pub cfg: DpoConfig,
    params: DpoParams,
}

impl Plugin for Dpo {
    const NAME: &'static str = "dpo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Direct Preference Optimization (sigmoid, ipo, hinge, robust, … loss types), as TRL's DPOTrainer";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: DpoConfig = parse_config(config_json)?;
        if !cfg.beta.is_finite() || cfg.beta <= 0.0 {
            return Err(PluginError::config(
                "beta",
                format!("must be a positive number, got {}", cfg.beta),
            ));
        }
        check_range("label_smoothing", cfg.label_smoothing, 0.0, 1.0)?;
        if !cfg.discopop_tau.is_finite() || cfg.discopop_tau <= 0.0 {
            return Err(PluginError::config(
                "discopop_tau",
                format!("must be positive, got {}", cfg.discopop_tau),
            ));
        }
        let names = cfg.loss_type.to_vec();
        if names.is_empty() {
            return Err(PluginError::config("loss_type", "needs at least one loss type"));
        }
        let weights = cfg.loss_weights.clone().unwrap_or_else(|| vec![1.0; names.len()]);
        if weights.len() != names.len() {
            return Err(PluginError::config(
                "loss_weights",
                format!(
                    "{} weights for {} loss types; give one weight per loss type",
                    weights.len(),
                    names.len()
                ),
            ));
        }
        let mut loss_types = Vec::new();
        for (name, w) in names.iter().zip(weights) {
            let kind = DpoLossType::parse(name).ok_or_else(|| {
                let all: Vec<&str> = DpoLossType::ALL.iter().map(|(n, _)| *n).collect();
                PluginError::config(
                    "loss_type",
                    format!("unknown loss type `{name}`; one of {}", all.join(", ")),
                )
            })?;
            if !w.is_finite() {
                return Err(PluginError::config(
                    "loss_weights",
                    format!("must be finite, got {w}"),
                ));
            }
            if kind == DpoLossType::Robust && cfg.label_smoothing >= 0.5 {
                return Err(PluginError::config(
                    "label_smoothing",
                    format!("`robust` needs it in [0, 0.5), got {}", cfg.label_smoothing),
                ));
            }
            if kind == DpoLossType::ExoPair
                && (cfg.label_smoothing <= 0.0 || cfg.label_smoothing >= 1.0)
            {
                return Err(PluginError::config(
                    "label_smoothing",
                    format!(
                        "`exo_pair` needs it in (0, 1) (TRL suggests 1e-3), got {}",
                        cfg.label_smoothing
                    ),
                ));
            }
            loss_types.push((kind, w));
        }
        let params = DpoParams {
            beta: cfg.beta,
            loss_types,
            label_smoothing: cfg.label_smoothing,
            discopop_tau: cfg.discopop_tau,
        };
        Ok(Self { cfg, params })
    }
}

impl Objective for Dpo {
    fn needs(&self) -> Vec<String> {
        let mut v = vec!["preference_pairs".to_string()];
        if !self.cfg.reference_free {
            v.push("reference".into());
        }
        v
    }

    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let meta = Meta::parse(&batch.meta_json)?;
        let pf = pair_forward(batch, ctx, 1.0)?;
        let logps = pf.sum_logps(&pf.per_token)?;
        ensure_finite("the policy's completion log-probabilities", &logps.f_detach()?)?;
        let (chosen, rejected) = halves(&logps)?;
        let (ref_chosen, ref_rejected) = if self.cfg.reference_free {
            (chosen.f_zeros_like()?, rejected.f_zeros_like()?)
        } else {
            let (kind, device) = (chosen.kind(), chosen.device());
            let pre_c = get_1d_opt(batch, "ref_chosen_logps", pf.pairs, kind, device)?;
            let pre_r = get_1d_opt(batch, "ref_rejected_logps", pf.pairs, kind, device)?;
            match (pre_c, pre_r) {
                (Some(c), Some(r)) => (c, r),
                (None, None) => {
                    let logits = forward_logits(ctx, &pf.inputs, ForwardFlags::DISABLE_ADAPTER | ForwardFlags::NO_GRAD)?;
                    let ids = batch.get("input_ids")?;
                    let ref_logps = tch::no_grad(|| -> PluginResult<Tensor> { pf.sum_logps(&next_token_logps(&logits, ids, 1.0)?) })?;
                    ensure_finite("the reference's completion log-probabilities", &ref_logps)?;
                    halves(&ref_logps)?
                }
                _ => {
                    return Err(PluginError::invalid(
                        "the batch has only one of `ref_chosen_logps` / `ref_rejected_logps`: give both (precomputed reference) or neither",
                    ))
                }
            }
        };
        let chosen_len = pf.lengths.f_narrow(0, 0, pf.pairs)?;
        let rejected_len = pf.lengths.f_narrow(0, pf.pairs, pf.pairs)?;
        let out = dpo_loss(
            &self.params,
            &chosen,
            &rejected,
            &ref_chosen,
            &ref_rejected,
            &chosen_len,
            &rejected_len,
        )?;
        let loss = out.loss.f_div_scalar(meta.gradient_accumulation_steps as f64)?;
        let value = check_loss(Self::NAME, &loss, &meta, 2 * pf.pairs)?;
        let mut metrics = vec![("loss".to_string(), value)];
        metrics.extend(reward_metrics(&out)?);
        metrics.push(("logps/chosen".into(), mean_f64(&chosen.f_detach()?)?));
        metrics.push(("logps/rejected".into(), mean_f64(&rejected.f_detach()?)?));
        metrics.push(("pairs/identical".into(), pf.identical_pairs as f64));
        Ok(LossOutput { loss, num_items: pf.pairs, metrics })
    }
}
