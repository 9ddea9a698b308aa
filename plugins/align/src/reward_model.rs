//! `reward_model`: reward-model training on preference pairs, as TRL 1.16's `RewardTrainer`:
//! the run's score head (`score`, hidden → 1, as transformers' `…ForSequenceClassification`)
//! read at each sequence's last real token, and −log σ(r_chosen − r_rejected [− margin]) with
//! `center_rewards_coefficient` ([`crate::rlhf::reward_model_loss`]).
use ferrotune_plugin_api::prelude::*;
use ferrotune_plugin_api::{last_token_values, take_output, NEED_SCORE_HEAD, SCORES};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::common::{check_loss, ensure_finite, get_1d_opt, get_2d, model_inputs, Meta};
use crate::pair::halves;
use crate::rlhf::reward_model_loss;

/// Tensor names of the reward-model batch that are not model inputs.
pub const REWARD_NON_MODEL_KEYS: [&str; 2] = ["margin", "completion_mask"];

/// Configuration (`objective: {plugin: reward_model, ...}`), TRL's `RewardConfig` names.
#[derive(Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardModelConfig {
    /// Adds `coef · mean((r_chosen + r_rejected)²)` to the loss, pulling the scores towards 0
    /// (Eisenstein et al. 2023 use 0.01). Default null (off).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub center_rewards_coefficient: Option<f64>,
}

pub struct RewardModel {
    pub cfg: RewardModelConfig,
}

impl Plugin for RewardModel {
    const NAME: &'static str = "reward_model";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Reward modelling on preference pairs with a score head (TRL's RewardTrainer)";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<RewardModelConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: RewardModelConfig = parse_config(config_json)?;
        if let Some(c) = cfg.center_rewards_coefficient {
            if !c.is_finite() || c < 0.0 {
                return Err(PluginError::config(
                    "center_rewards_coefficient",
                    format!("must be a non-negative number or null, got {c}"),
                ));
            }
        }
        Ok(Self { cfg })
    }
}

impl Objective for RewardModel {
    fn needs(&self) -> Vec<String> {
        vec!["preference_pairs".to_string(), NEED_SCORE_HEAD.to_string()]
    }

    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let meta = Meta::parse(&batch.meta_json)?;
        let ids = get_2d(batch, "input_ids", None, None)?;
        let (rows, t) = (ids.size()[0], ids.size()[1]);
        if rows == 0 || rows % 2 != 0 {
            return Err(PluginError::invalid(format!(
                "a preference batch holds the chosen rows then the rejected rows (2·pairs rows); `input_ids` has {rows}"
            )));
        }
        let attention_mask = get_2d(batch, "attention_mask", Some(rows), Some(t))?;
        let mut out =
            ctx.forward(&model_inputs(batch, &REWARD_NON_MODEL_KEYS), ForwardFlags::SCORES)?;
        let per_position = take_output(&mut out, SCORES)?;
        if per_position.size() != [rows, t] {
            return Err(PluginError::invalid(format!(
                "the host's `{SCORES}` {:?} do not match `input_ids` [{rows}, {t}]",
                per_position.size()
            )));
        }
        let scores = last_token_values(&per_position, attention_mask)?;
        ensure_finite(
            &format!("the score head's rewards of {}", meta.describe(rows)),
            &scores.f_detach()?,
        )?;
        let (chosen, rejected) = halves(&scores)?;
        let pairs = rows / 2;
        let margin = get_1d_opt(batch, "margin", pairs, chosen.kind(), chosen.device())?;
        let out = reward_model_loss(
            &chosen,
            &rejected,
            margin.as_ref(),
            self.cfg.center_rewards_coefficient,
        )?;
        let loss = out.loss.f_div_scalar(meta.gradient_accumulation_steps as f64)?;
        let value = check_loss(Self::NAME, &loss, &meta, rows)?;
        let mut metrics = out.metrics()?;
        metrics.retain(|(n, _)| n != "loss");
        metrics.insert(0, ("loss".to_string(), value));
        Ok(LossOutput { loss, num_items: pairs, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TinyModel;

    fn pair_batch(margin: bool) -> Batch {
        // Two pairs: chosen rows 0, 1, rejected rows 2, 3; right padding.
        let ids = Tensor::from_slice(&[
            3i64, 5, 7, 1, 0, //
            2, 4, 6, 8, 9, //
            3, 5, 2, 0, 0, //
            2, 4, 1, 1, 0,
        ])
        .view([4, 5]);
        let mut tensors = vec![
            ("input_ids".to_string(), ids.shallow_clone()),
            ("attention_mask".to_string(), ids.ne(0).to_kind(Kind::Int64)),
        ];
        if margin {
            tensors.push(("margin".into(), Tensor::from_slice(&[0.5f32, -1.0])));
        }
        Batch {
            tensors,
            meta_json: r#"{"gradient_accumulation_steps": 2, "sample_ids": [7, 8]}"#.into(),
        }
    }

    #[test]
    fn loss_is_trls_on_the_scores_at_each_last_token() {
        for (margin, center) in [(false, None), (true, Some(0.01))] {
            let model = TinyModel::new(11, 4, 1);
            let batch = pair_batch(margin);
            let mut rm =
                RewardModel { cfg: RewardModelConfig { center_rewards_coefficient: center } };
            let out = rm.loss(&batch, &model).unwrap();
            assert_eq!(out.num_items, 2);
            // The scores the model gives at the last real tokens (positions 3, 4, 2, 3).
            let ids = batch.get("input_ids").unwrap();
            let all = tch::no_grad(|| model.scores(ids));
            let pick = |r: i64, p: i64| all.double_value(&[r, p]);
            let chosen = Tensor::from_slice(&[pick(0, 3), pick(1, 4)]);
            let rejected = Tensor::from_slice(&[pick(2, 2), pick(3, 3)]);
            let m = margin.then(|| Tensor::from_slice(&[0.5f64, -1.0]));
            let want = reward_model_loss(&chosen, &rejected, m.as_ref(), center).unwrap();
            let want_m = want.metrics().unwrap();
            for (name, w) in want_m {
                let got = out.metrics.iter().find(|(n, _)| *n == name).unwrap().1;
                let w = if name == "loss" { w / 2.0 } else { w };
                assert!((got - w).abs() < 1e-6, "{name}: {got} vs {w}");
            }
            assert!((out.loss.double_value(&[]) - want.loss.double_value(&[]) / 2.0).abs() < 1e-6);
            // The gradient reaches the score head and the embeddings of the read tokens.
            out.loss.backward();
            assert!(model.score.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0);
            assert!(model.embed.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0);
            // The forward asked for scores alone.
            assert_eq!(model.calls.borrow()[0], ForwardFlags::SCORES);
        }
    }

    #[test]
    fn refuses_bad_batches_and_hosts_without_scores() {
        let model = TinyModel::new(11, 4, 1);
        let mut rm = RewardModel::from_config("{}").unwrap();
        let mut batch = pair_batch(false);
        batch.tensors.retain(|(n, _)| n != "attention_mask");
        let e = rm.loss(&batch, &model).unwrap_err().to_string();
        assert!(e.contains("attention_mask"), "{e}");
        let mut batch = pair_batch(false);
        batch.tensors[0].1 = batch.tensors[0].1.narrow(0, 0, 3);
        let e = rm.loss(&batch, &model).unwrap_err().to_string();
        assert!(e.contains("2·pairs"), "{e}");
        let mut batch = pair_batch(true);
        batch.tensors[2].1 = Tensor::from_slice(&[0.5f32, 1.0, 2.0]);
        let e = rm.loss(&batch, &model).unwrap_err().to_string();
        assert!(e.contains("margin"), "{e}");
        let old_host = TinyModel { no_scores: true, ..TinyModel::new(11, 4, 1) };
        let e = rm.loss(&pair_batch(false), &old_host).unwrap_err().to_string();
        assert!(e.contains("`scores`"), "{e}");
        let nan_host = TinyModel { nan_scores: true, ..TinyModel::new(11, 4, 1) };
        let e = rm.loss(&pair_batch(false), &nan_host).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("[7,8]"), "{e}");
        let e = RewardModel::from_config(r#"{"center_rewards_coefficient": -1}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("center_rewards_coefficient"), "{e}");
        let e = RewardModel::from_config(r#"{"beta": 1}"#).err().unwrap().to_string();
        assert!(e.contains("beta"), "{e}");
        assert_eq!(rm.needs(), vec!["preference_pairs", "score_head"]);
    }
}
