//! `orpo`: Odds Ratio Preference Optimization, as TRL 1.16's `ORPOTrainer`: the chosen
//! rows' NLL (over prompt and completion) minus β · mean log σ(log odds ratio). No reference.
use ferrotune_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::common::{check_loss, ensure_finite, mean_f64, Meta};
use crate::losses::{odds_ratio_loss, PairLoss};
use crate::pair::{halves, pair_forward, reward_metrics};

/// Configuration (`objective: {plugin: orpo, ...}`), TRL's `ORPOConfig` names.
#[derive(Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrpoConfig {
    /// λ of the paper: the weight of the odds-ratio term. Default 0.1; typical 0.05–0.5.
    #[serde(default = "default_beta")]
    #[schemars(range(min = 0))]
    pub beta: f64,
}

fn default_beta() -> f64 {
    0.1
}

pub struct Orpo {
    pub cfg: OrpoConfig,
}

impl Plugin for Orpo {
    const NAME: &'static str = "orpo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "ORPO: SFT loss plus an odds-ratio preference term, no reference model (TRL's ORPOTrainer)";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<OrpoConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: OrpoConfig = parse_config(config_json)?;
        if !cfg.beta.is_finite() || cfg.beta < 0.0 {
            return Err(PluginError::config(
                "beta",
                format!("must be a non-negative number, got {}", cfg.beta),
            ));
        }
        Ok(Self { cfg })
    }
}

impl Objective for Orpo {
    fn needs(&self) -> Vec<String> {
        vec!["preference_pairs".into()]
    }

    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let meta = Meta::parse(&batch.meta_json)?;
        // The chosen rows' prompt tokens are scored too, for the NLL term.
        let pf = pair_forward(batch, ctx, 1.0, true)?;
        let logps = pf.mean_logps(&pf.per_token)?;
        ensure_finite("the policy's mean completion log-probabilities", &logps.f_detach()?)?;
        let (chosen, rejected) = halves(&logps)?;
        // ORPO's NLL covers the prompt too: every real (attention-mask) token of the chosen rows.
        let nll = pf.chosen_nll(&pf.attention)?;
        let or = odds_ratio_loss(self.cfg.beta, &chosen, &rejected)?;
        let loss = nll
            .f_sub(&or.losses.f_mean(None::<Kind>)?)?
            .f_div_scalar(meta.gradient_accumulation_steps as f64)?;
        let value = check_loss(Self::NAME, &loss, &meta, 2 * pf.pairs)?;
        let pair = PairLoss {
            loss: loss.shallow_clone(),
            chosen_rewards: or.chosen_rewards,
            rejected_rewards: or.rejected_rewards,
        };
        let mut metrics = vec![("loss".to_string(), value)];
        metrics.extend(reward_metrics(&pair)?);
        metrics.push(("logps/chosen".into(), mean_f64(&chosen.f_detach()?)?));
        metrics.push(("logps/rejected".into(), mean_f64(&rejected.f_detach()?)?));
        metrics.push(("nll_loss".into(), nll.f_double_value(&[])?));
        metrics.push(("log_odds_ratio".into(), or.log_odds_ratio.f_double_value(&[])?));
        metrics.push(("log_odds_chosen".into(), or.log_odds_chosen.f_double_value(&[])?));
        metrics.push(("pairs/identical".into(), pf.identical_pairs as f64));
        Ok(LossOutput { loss, num_items: pf.pairs, metrics })
    }
}
