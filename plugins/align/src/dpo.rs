//! `dpo`: Direct Preference Optimization and its loss variants, as TRL 1.16's `DPOTrainer`.
use ferrotune_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::common::{
    check_loss, check_range, ensure_finite, get_1d_opt, mean_f64, next_token_logps, Meta, OneOrMany,
};
use crate::losses::{dpo_loss, DpoLossType, DpoParams};
use crate::pair::{halves, pair_forward, reward_metrics};

/// Configuration (`objective: {plugin: dpo, ...}`), TRL's `DPOConfig` names.
#[derive(Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// β: how far the policy may move from the reference. Default 0.1; typical 0.01–0.5.
    /// For `ipo` it is the regularisation τ.
    #[serde(default = "default_beta")]
    #[schemars(extend("exclusiveMinimum" = 0))]
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
    #[schemars(range(min = 0, max = 1))]
    pub label_smoothing: f64,
    /// Ignore the reference model: its log-probabilities are taken as 0 (TRL ≤ 0.x's
    /// `reference_free`). Default false.
    #[serde(default)]
    pub reference_free: bool,
    /// τ of `discopop`'s mixing. Default 0.05.
    #[serde(default = "default_discopop_tau")]
    #[schemars(extend("exclusiveMinimum" = 0))]
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
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<DpoConfig>())
    }
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
        let pf = pair_forward(batch, ctx, 1.0, false)?;
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
                    let flags = ForwardFlags::DISABLE_ADAPTER | ForwardFlags::NO_GRAD;
                    let ref_logps = tch::no_grad(|| -> PluginResult<Tensor> {
                        let per_token =
                            next_token_logps(ctx, &pf.inputs, &pf.completion_targets, 1.0, flags)?;
                        pf.sum_logps(&per_token)
                    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_api::{logps_from_logits, RewardScores, TARGET_IDS, TARGET_TEMPERATURE};
    use std::cell::RefCell;

    /// A model with fixed policy and reference logits. `targets`: it answers `TARGET_LOGPS`
    /// requests with target log-probabilities (as the host does, here from the logits) and
    /// records the `target_ids` it was asked for; otherwise it answers with `logits` only (a
    /// host that predates the flag).
    struct Fixed {
        policy: Tensor,
        reference: Tensor,
        targets: bool,
        asked: RefCell<Vec<(ForwardFlags, Tensor)>>,
    }

    impl ObjectiveContext for Fixed {
        fn forward(
            &self,
            inputs: &[(String, Tensor)],
            flags: ForwardFlags,
        ) -> PluginResult<Vec<(String, Tensor)>> {
            let logits = if flags.contains(ForwardFlags::DISABLE_ADAPTER) {
                &self.reference
            } else {
                &self.policy
            };
            if !self.targets {
                return Ok(vec![("logits".into(), logits.shallow_clone())]);
            }
            assert!(flags.contains(ForwardFlags::TARGET_LOGPS), "every pass asks for target logps");
            let get = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
            let ids = get(TARGET_IDS).expect("target_ids");
            let temperature = get(TARGET_TEMPERATURE).map_or(1.0, |t| t.double_value(&[]));
            self.asked.borrow_mut().push((flags, ids.shallow_clone()));
            let out = logps_from_logits(logits, ids, temperature, flags)?;
            let mut v = vec![
                ("target_logps".to_string(), out.logps),
                ("target_correct".to_string(), out.correct),
            ];
            if let Some(e) = out.entropy {
                v.push(("target_entropy".into(), e));
            }
            Ok(v)
        }
        fn generate(&self, _: &[Vec<i64>], _: &str) -> PluginResult<Vec<Vec<i64>>> {
            Err(PluginError::unsupported("no generation"))
        }
        fn decode(&self, _: &[i64]) -> PluginResult<String> {
            Err(PluginError::unsupported("no decoding"))
        }
        fn rewards(&self, _: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
            Err(PluginError::unsupported("no rewards"))
        }
    }

    /// The old full-logits path: next-token log-probabilities at every position, summed over
    /// the completion tokens.
    fn full_logits_sums(logits: &Tensor, ids: &Tensor, completion_mask: &Tensor) -> Tensor {
        let t = ids.size()[1];
        logits
            .narrow(1, 0, t - 1)
            .to_kind(Kind::Float)
            .log_softmax(-1, None::<Kind>)
            .gather(-1, &ids.narrow(1, 1, t - 1).unsqueeze(-1), false)
            .squeeze_dim(-1)
            .where_scalarother(&completion_mask.narrow(1, 1, t - 1).ne(0), 0.0)
            .sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)
    }

    #[test]
    fn dpo_loss_from_target_logps_matches_full_logits() {
        // Two pairs (chosen rows 0, 1; rejected rows 2, 3), T = 7, V = 11; prompts of 2 and 3
        // tokens, right padding (id 0, mask 0).
        let (rows, t, v) = (4i64, 7i64, 11i64);
        let ids = Tensor::from_slice(&[
            3i64, 5, 7, 1, 9, 0, 0, //
            2, 4, 6, 8, 10, 3, 0, //
            3, 5, 2, 2, 0, 0, 0, //
            2, 4, 6, 1, 5, 7, 9,
        ])
        .view([rows, t]);
        let attention = ids.ne(0).to_kind(Kind::Int64);
        let completion = attention.copy();
        for (row, prompt) in [(0, 2), (1, 3), (2, 2), (3, 3)] {
            let _ = completion.get(row).narrow(0, 0, prompt).fill_(0);
        }
        let logits = |shift: f64| {
            Tensor::arange(rows * t * v, (Kind::Float, Device::Cpu))
                .f_mul_scalar(0.37)
                .unwrap()
                .f_add_scalar(shift)
                .unwrap()
                .sin()
                .f_mul_scalar(3.0)
                .unwrap()
                .view([rows, t, v])
        };
        let (policy, reference) = (logits(0.0), logits(0.5));
        let batch = Batch {
            tensors: vec![
                ("input_ids".into(), ids.shallow_clone()),
                ("attention_mask".into(), attention.shallow_clone()),
                ("completion_mask".into(), completion.shallow_clone()),
            ],
            meta_json: String::new(),
        };
        let run = |targets: bool| {
            let ctx = Fixed {
                policy: policy.shallow_clone(),
                reference: reference.shallow_clone(),
                targets,
                asked: RefCell::new(Vec::new()),
            };
            let mut dpo = Dpo::from_config(r#"{"beta": 0.1}"#).unwrap();
            let out = dpo.loss(&batch, &ctx).unwrap();
            (out.loss.double_value(&[]), out.metrics, ctx.asked.into_inner())
        };
        let (with_targets, metrics_t, asked) = run(true);
        let (with_logits, metrics_l, _) = run(false);
        assert_eq!(with_targets, with_logits, "the host's target logps and the logits agree");
        assert_eq!(metrics_t, metrics_l);

        // Both passes (policy, then the reference) asked for the completion tokens alone.
        let want =
            ids.narrow(1, 1, t - 1).where_scalarother(&completion.narrow(1, 1, t - 1).ne(0), -1);
        let want = Tensor::cat(&[want, Tensor::full([rows, 1], -1, (Kind::Int64, Device::Cpu))], 1);
        assert_eq!(asked.len(), 2);
        assert!(!asked[0].0.contains(ForwardFlags::DISABLE_ADAPTER));
        assert!(asked[1].0.contains(ForwardFlags::DISABLE_ADAPTER | ForwardFlags::NO_GRAD));
        for (_, got) in &asked {
            assert!(got.equal(&want), "target_ids {got} != {want}");
        }

        // The old full-logits path: TRL's sigmoid loss over summed completion logps.
        let p = full_logits_sums(&policy, &ids, &completion).to_kind(Kind::Double);
        let r = full_logits_sums(&reference, &ids, &completion).to_kind(Kind::Double);
        let (pc, pr) = (p.narrow(0, 0, 2), p.narrow(0, 2, 2));
        let (rc, rr) = (r.narrow(0, 0, 2), r.narrow(0, 2, 2));
        let margin = (pc - rc) - (pr - rr);
        let old = (margin * 0.1).log_sigmoid().neg().mean(Kind::Double).double_value(&[]);
        assert!((with_targets - old).abs() < 1e-6, "{with_targets} vs the old path's {old}");
    }
}
