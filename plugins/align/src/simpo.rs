//! `simpo`: SimPO (length-normalised, reference-free, with a target margin γ), as TRL 1.16's
//! `CPOTrainer` with `loss_type: simpo`; the other CPO loss types and CPO's NLL term
//! (`cpo_alpha`) are available too.
use ferrotune_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::common::{check_loss, check_range, ensure_finite, mean_f64, Meta};
use crate::losses::{cpo_losses, CpoLossType};
use crate::pair::{halves, pair_forward, reward_metrics};

/// Configuration (`objective: {plugin: simpo, ...}`), TRL's `CPOConfig` names.
#[derive(Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimpoConfig {
    /// β: scale of the length-normalised reward. Default 2.0 (the SimPO paper's 2.0–2.5;
    /// TRL's CPOConfig default is 0.1).
    #[serde(default = "default_beta")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub beta: f64,
    /// γ: target reward margin (TRL `simpo_gamma`; `gamma` is accepted as an alias). Default 0.5;
    /// typical 0.3–1.6.
    #[serde(default = "default_gamma", alias = "gamma")]
    pub simpo_gamma: f64,
    /// Label-flip probability of the conservative loss. Default 0; in [0, 0.5].
    #[serde(default)]
    #[schemars(range(min = 0, max = 0.5))]
    pub label_smoothing: f64,
    /// Weight of the NLL of the chosen completions (CPO's BC regulariser). Default 0 (pure
    /// SimPO, as TRL sets it for SimPO); CPO uses 1.0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub cpo_alpha: f64,
    /// `simpo` (default), or CPO's `sigmoid`, `hinge`, `ipo`.
    #[serde(default = "default_loss_type")]
    #[schemars(extend("enum" = ["simpo", "sigmoid", "hinge", "ipo"]))]
    pub loss_type: String,
}

fn default_beta() -> f64 {
    2.0
}
fn default_gamma() -> f64 {
    0.5
}
fn default_loss_type() -> String {
    "simpo".into()
}

pub struct Simpo {
    pub cfg: SimpoConfig,
    kind: CpoLossType,
}

impl Plugin for Simpo {
    const NAME: &'static str = "simpo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "SimPO / CPO: reference-free, length-normalised preference loss with margin gamma (TRL's CPOTrainer)";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<SimpoConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: SimpoConfig = parse_config(config_json)?;
        if !cfg.beta.is_finite() || cfg.beta <= 0.0 {
            return Err(PluginError::config(
                "beta",
                format!("must be a positive number, got {}", cfg.beta),
            ));
        }
        if !cfg.simpo_gamma.is_finite() {
            return Err(PluginError::config(
                "simpo_gamma",
                format!("must be finite, got {}", cfg.simpo_gamma),
            ));
        }
        check_range("label_smoothing", cfg.label_smoothing, 0.0, 0.5)?;
        if !cfg.cpo_alpha.is_finite() || cfg.cpo_alpha < 0.0 {
            return Err(PluginError::config(
                "cpo_alpha",
                format!("must be a non-negative number, got {}", cfg.cpo_alpha),
            ));
        }
        let kind = CpoLossType::parse(&cfg.loss_type).ok_or_else(|| {
            PluginError::config(
                "loss_type",
                format!("unknown loss type `{}`; one of simpo, sigmoid, hinge, ipo", cfg.loss_type),
            )
        })?;
        Ok(Self { cfg, kind })
    }
}

impl Objective for Simpo {
    fn needs(&self) -> Vec<String> {
        vec!["preference_pairs".into()]
    }

    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let meta = Meta::parse(&batch.meta_json)?;
        let pf = pair_forward(batch, ctx, 1.0, false)?;
        let logps = if self.kind.length_normalized() {
            pf.mean_logps(&pf.per_token)?
        } else {
            pf.sum_logps(&pf.per_token)?
        };
        ensure_finite("the policy's completion log-probabilities", &logps.f_detach()?)?;
        let (chosen, rejected) = halves(&logps)?;
        let c = &self.cfg;
        let out =
            cpo_losses(self.kind, c.beta, c.simpo_gamma, c.label_smoothing, &chosen, &rejected)?;
        let mut loss = out.loss.f_mean(None::<Kind>)?;
        let nll = if c.cpo_alpha != 0.0 { Some(pf.chosen_nll(&pf.completion)?) } else { None };
        if let Some(nll) = &nll {
            loss = loss.f_add(&nll.f_mul_scalar(c.cpo_alpha)?)?;
        }
        let loss = loss.f_div_scalar(meta.gradient_accumulation_steps as f64)?;
        let value = check_loss(Self::NAME, &loss, &meta, 2 * pf.pairs)?;
        let mut metrics = vec![("loss".to_string(), value)];
        metrics.extend(reward_metrics(&out)?);
        metrics.push(("logps/chosen".into(), mean_f64(&chosen.f_detach()?)?));
        metrics.push(("logps/rejected".into(), mean_f64(&rejected.f_detach()?)?));
        metrics.push(("nll_loss".into(), nll.map_or(Ok(0.0), |n| n.f_double_value(&[]))?));
        metrics.push(("pairs/identical".into(), pf.identical_pairs as f64));
        Ok(LossOutput { loss, num_items: pf.pairs, metrics })
    }
}
