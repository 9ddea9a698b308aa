//! `kto`: Kahneman-Tversky Optimization on unpaired desirable / undesirable completions, as
//! TRL 1.16's `KTOTrainer`, with the KL reference point estimated from mismatched
//! (prompt, completion) pairs.
use ferrotune_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::common::{
    bool_mask, check_loss, ensure_finite, get_1d_opt, get_2d, masked_sum, mean_f64, model_inputs,
    next_token_logps, next_token_targets_where, set_input, Meta,
};
use crate::losses::{kto_loss, KtoLossType, KtoParams};

/// Tensor names of the KTO batch that are not model inputs.
pub const KTO_NON_MODEL_KEYS: [&str; 8] = [
    "completion_mask",
    "KL_input_ids",
    "KL_attention_mask",
    "KL_completion_mask",
    "kto_desirable",
    "ref_logps",
    "ref_KL_logps",
    "labels",
];

/// Configuration (`objective: {plugin: kto, ...}`), TRL's `KTOConfig` names.
#[derive(Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KtoConfig {
    /// β: how far the policy may move from the reference. Default 0.1.
    #[serde(default = "default_beta")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub beta: f64,
    /// `kto` (default) or `apo_zero_unpaired` (no KL batch needed).
    #[serde(default = "default_loss_type")]
    #[schemars(extend("enum" = ["kto", "apo_zero_unpaired"]))]
    pub loss_type: String,
    /// Weight of the desirable rows' losses. Default 1.0; with unbalanced data TRL suggests
    /// `desirable_weight · n_desirable / (undesirable_weight · n_undesirable)` in [1, 4/3].
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub desirable_weight: f64,
    /// Weight of the undesirable rows' losses. Default 1.0.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub undesirable_weight: f64,
}

fn default_beta() -> f64 {
    0.1
}
fn default_loss_type() -> String {
    "kto".into()
}
fn one() -> f64 {
    1.0
}

pub struct Kto {
    pub cfg: KtoConfig,
    params: KtoParams,
}

impl Plugin for Kto {
    const NAME: &'static str = "kto";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "KTO: unpaired desirable/undesirable completions with a KL reference point (TRL's KTOTrainer)";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<KtoConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: KtoConfig = parse_config(config_json)?;
        if !cfg.beta.is_finite() || cfg.beta <= 0.0 {
            return Err(PluginError::config(
                "beta",
                format!("must be a positive number, got {}", cfg.beta),
            ));
        }
        for (key, w) in [
            ("desirable_weight", cfg.desirable_weight),
            ("undesirable_weight", cfg.undesirable_weight),
        ] {
            if !w.is_finite() || w < 0.0 {
                return Err(PluginError::config(
                    key,
                    format!("must be a non-negative number, got {w}"),
                ));
            }
        }
        let loss_type = match cfg.loss_type.as_str() {
            "kto" => KtoLossType::Kto,
            "apo_zero_unpaired" => KtoLossType::ApoZeroUnpaired,
            other => {
                return Err(PluginError::config(
                    "loss_type",
                    format!("unknown loss type `{other}`; one of kto, apo_zero_unpaired"),
                ))
            }
        };
        let params = KtoParams {
            beta: cfg.beta,
            loss_type,
            desirable_weight: cfg.desirable_weight,
            undesirable_weight: cfg.undesirable_weight,
        };
        Ok(Self { cfg, params })
    }
}

/// Summed completion log-probabilities of `ids` rows under the model run on `inputs` (only the
/// completion positions reach the model's head).
fn completion_logps(
    ctx: &dyn ObjectiveContext,
    inputs: &[(String, Tensor)],
    ids: &Tensor,
    completion_mask: &Tensor,
    flags: ForwardFlags,
) -> PluginResult<Tensor> {
    let targets = next_token_targets_where(ids, completion_mask)?;
    let per_token = next_token_logps(ctx, inputs, &targets, 1.0, flags)?;
    let t = ids.size()[1];
    masked_sum(&per_token, &bool_mask(&completion_mask.f_narrow(1, 1, t - 1)?, per_token.device())?)
}

impl Objective for Kto {
    fn needs(&self) -> Vec<String> {
        vec!["kto_labels".into(), "reference".into()]
    }

    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let meta = Meta::parse(&batch.meta_json)?;
        let ids = get_2d(batch, "input_ids", None, None)?;
        let (n, t) = (ids.size()[0], ids.size()[1]);
        let completion_mask = get_2d(batch, "completion_mask", Some(n), Some(t))?;
        get_2d(batch, "attention_mask", Some(n), Some(t))?;
        let desirable = batch.get("kto_desirable")?;
        if desirable.size() != [n] {
            return Err(PluginError::invalid(format!(
                "batch `kto_desirable` has shape {:?}, expected [{n}]",
                desirable.size()
            )));
        }
        let empty = completion_mask
            .f_narrow(1, 1, t - 1)?
            .f_ne(0)?
            .f_any_dim(-1, false)?
            .f_logical_not()?
            .f_nonzero()?;
        if empty.size()[0] > 0 {
            return Err(PluginError::invalid(format!(
                "row {}: the completion has no tokens after the first position (`completion_mask`)",
                empty.int64_value(&[0, 0])
            )));
        }
        let calculate_kl = self.params.loss_type == KtoLossType::Kto;
        let inputs = model_inputs(batch, &KTO_NON_MODEL_KEYS);
        let kl_inputs = if calculate_kl {
            let kl_ids = get_2d(batch, "KL_input_ids", Some(n), None).map_err(|e| {
                e.context("`loss_type: kto` needs the KL batch (`KL_input_ids`, `KL_attention_mask`, `KL_completion_mask`: each prompt with another row's completion)")
            })?;
            let kl_t = kl_ids.size()[1];
            let kl_mask = get_2d(batch, "KL_attention_mask", Some(n), Some(kl_t))?;
            let kl_completion = get_2d(batch, "KL_completion_mask", Some(n), Some(kl_t))?;
            let mut v =
                inputs.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect::<Vec<_>>();
            set_input(&mut v, "input_ids", kl_ids.shallow_clone());
            set_input(&mut v, "attention_mask", kl_mask.shallow_clone());
            Some((v, kl_ids.shallow_clone(), kl_completion.shallow_clone()))
        } else {
            None
        };
        let kl_policy = match &kl_inputs {
            Some((v, kl_ids, kl_c)) => Some(tch::no_grad(|| {
                completion_logps(ctx, v, kl_ids, kl_c, ForwardFlags::NO_GRAD)
            })?),
            None => None,
        };
        let logps = completion_logps(ctx, &inputs, ids, completion_mask, ForwardFlags::NONE)?;
        ensure_finite("the policy's completion log-probabilities", &logps.f_detach()?)?;
        let (kind, device) = (logps.kind(), logps.device());
        let desirable = desirable.f_to_device(device)?.f_ne(0)?;
        let pre = get_1d_opt(batch, "ref_logps", n, kind, device)?;
        let pre_kl = get_1d_opt(batch, "ref_KL_logps", n, kind, device)?;
        let reference = ForwardFlags::DISABLE_ADAPTER | ForwardFlags::NO_GRAD;
        let ref_logps = match pre {
            Some(r) => r,
            None => {
                tch::no_grad(|| completion_logps(ctx, &inputs, ids, completion_mask, reference))?
            }
        };
        let ref_kl = match (&kl_inputs, pre_kl) {
            (None, _) => None,
            (Some(_), Some(r)) => Some(r),
            (Some((v, kl_ids, kl_c)), None) => {
                Some(tch::no_grad(|| completion_logps(ctx, v, kl_ids, kl_c, reference))?)
            }
        };
        ensure_finite("the reference's completion log-probabilities", &ref_logps)?;
        if let (Some(p), Some(r)) = (&kl_policy, &ref_kl) {
            ensure_finite("the policy's KL-batch log-probabilities", p)?;
            ensure_finite("the reference's KL-batch log-probabilities", r)?;
        }
        let kl_pair = kl_policy.as_ref().zip(ref_kl.as_ref());
        let out = kto_loss(&self.params, &logps, &ref_logps, &desirable, kl_pair)?;
        let loss = out.loss.f_div_scalar(meta.gradient_accumulation_steps as f64)?;
        let value = check_loss(Self::NAME, &loss, &meta, n)?;
        let (nc, nr) = (out.chosen_rewards.numel(), out.rejected_rewards.numel());
        let mut metrics = vec![("loss".to_string(), value), ("kl".to_string(), out.kl)];
        if nc > 0 {
            metrics.push(("rewards/chosen".into(), mean_f64(&out.chosen_rewards)?));
            metrics.push(("logps/chosen".into(), mean_f64(&out.chosen_logps)?));
        }
        if nr > 0 {
            metrics.push(("rewards/rejected".into(), mean_f64(&out.rejected_rewards)?));
            metrics.push(("logps/rejected".into(), mean_f64(&out.rejected_logps)?));
        }
        if nc > 0 && nr > 0 {
            metrics.push((
                "rewards/margins".into(),
                mean_f64(&out.chosen_rewards)? - mean_f64(&out.rejected_rewards)?,
            ));
        }
        metrics.push(("count/desirable".into(), nc as f64));
        metrics.push(("count/undesirable".into(), nr as f64));
        Ok(LossOutput { loss, num_items: n, metrics })
    }
}
