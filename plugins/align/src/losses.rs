//! The loss math of every objective, as plain functions over tensors: per-sequence (or
//! per-token) log-probabilities in, loss and what is logged out. Each function follows one
//! piece of TRL 1.16 line by line (named in its doc), so that for the same log-probabilities
//! it gives TRL's loss; the plugins only gather the inputs.
use ferrotune_plugin_api::prelude::*;

fn ls(t: &Tensor) -> PluginResult<Tensor> {
    Ok(t.f_log_sigmoid()?)
}

// ---------------------------------------------------------------- DPO

/// DPO's loss types (TRL 1.16 `DPOTrainer._compute_loss`, `f_divergence_type="reverse_kl"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLossType {
    Sigmoid,
    Hinge,
    Ipo,
    ExoPair,
    NcaPair,
    Robust,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    SigmoidNorm,
}

impl DpoLossType {
    pub const ALL: [(&'static str, Self); 14] = [
        ("sigmoid", Self::Sigmoid),
        ("hinge", Self::Hinge),
        ("ipo", Self::Ipo),
        ("exo_pair", Self::ExoPair),
        ("nca_pair", Self::NcaPair),
        ("robust", Self::Robust),
        ("bco_pair", Self::BcoPair),
        ("sppo_hard", Self::SppoHard),
        ("aot", Self::Aot),
        ("aot_unpaired", Self::AotUnpaired),
        ("apo_zero", Self::ApoZero),
        ("apo_down", Self::ApoDown),
        ("discopop", Self::Discopop),
        ("sigmoid_norm", Self::SigmoidNorm),
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }
}

/// The parameters of [`dpo_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct DpoParams {
    pub beta: f64,
    /// Loss types and their weights, summed as TRL's `loss_type` list with `loss_weights`.
    pub loss_types: Vec<(DpoLossType, f64)>,
    pub label_smoothing: f64,
    pub discopop_tau: f64,
}

/// What a pairwise loss returns: the scalar loss (mean over pairs) and the implicit rewards
/// TRL logs (`rewards/chosen`, `rewards/rejected`; accuracies and margins derive from them).
pub struct PairLoss {
    pub loss: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// DPO for per-sequence log-probabilities (`[B]` each, summed over completion tokens) of the
/// policy and the reference, and the completion lengths (`[B]`, used by `ipo` and
/// `sigmoid_norm`, TRL's `completion_mask.sum(dim=1)`).
pub fn dpo_loss(
    p: &DpoParams,
    chosen_logps: &Tensor,
    rejected_logps: &Tensor,
    ref_chosen_logps: &Tensor,
    ref_rejected_logps: &Tensor,
    chosen_lengths: &Tensor,
    rejected_lengths: &Tensor,
) -> PluginResult<PairLoss> {
    let b = p.beta;
    let cl = chosen_logps.f_sub(ref_chosen_logps)?;
    let rl = rejected_logps.f_sub(ref_rejected_logps)?;
    let delta = cl.f_sub(&rl)?;
    let bd = delta.f_mul_scalar(b)?;
    let eps = p.label_smoothing;
    let avg_delta = || -> PluginResult<Tensor> {
        let c = cl.f_div(&chosen_lengths.f_to_kind(cl.kind())?.f_clamp_min(1.0)?)?;
        let r = rl.f_div(&rejected_lengths.f_to_kind(rl.kind())?.f_clamp_min(1.0)?)?;
        Ok(c.f_sub(&r)?)
    };
    let smoothed = |d: &Tensor| -> PluginResult<Tensor> {
        let bd = d.f_mul_scalar(b)?;
        Ok(ls(&bd)?
            .f_neg()?
            .f_mul_scalar(1.0 - eps)?
            .f_sub(&ls(&bd.f_neg()?)?.f_mul_scalar(eps)?)?)
    };
    let mut loss: Option<Tensor> = None;
    for &(kind, weight) in &p.loss_types {
        let per_seq = match kind {
            DpoLossType::Sigmoid => ls(&bd)?.f_neg()?,
            DpoLossType::Hinge => bd.f_neg()?.f_add_scalar(1.0)?.f_relu()?,
            DpoLossType::Ipo => {
                avg_delta()?.f_sub_scalar(1.0 / (2.0 * b))?.f_pow_tensor_scalar(2)?
            }
            DpoLossType::ExoPair => {
                let (qw, log_qw) = (bd.f_sigmoid()?, ls(&bd)?);
                let (ql, log_ql) = (bd.f_neg()?.f_sigmoid()?, ls(&bd.f_neg()?)?);
                let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
                qw.f_mul(&log_qw.f_sub_scalar(log_pw)?)?
                    .f_add(&ql.f_mul(&log_ql.f_sub_scalar(log_pl)?)?)?
            }
            DpoLossType::NcaPair => {
                let (cr, rr) = (cl.f_mul_scalar(b)?, rl.f_mul_scalar(b)?);
                ls(&cr)?
                    .f_neg()?
                    .f_sub(&ls(&cr.f_neg()?)?.f_mul_scalar(0.5)?)?
                    .f_sub(&ls(&rr.f_neg()?)?.f_mul_scalar(0.5)?)?
            }
            DpoLossType::Robust => {
                let clean = ls(&bd)?.f_mul_scalar(-(1.0 - eps))?;
                let flipped = ls(&bd.f_neg()?)?.f_mul_scalar(-eps)?;
                clean.f_sub(&flipped)?.f_div_scalar(1.0 - 2.0 * eps)?
            }
            DpoLossType::BcoPair => {
                let (cr, rr) = (cl.f_mul_scalar(b)?, rl.f_mul_scalar(b)?);
                ls(&cr)?.f_neg()?.f_sub(&ls(&rr.f_neg()?)?)?
            }
            DpoLossType::SppoHard => cl
                .f_sub_scalar(0.5 / b)?
                .f_pow_tensor_scalar(2)?
                .f_add(&rl.f_add_scalar(0.5 / b)?.f_pow_tensor_scalar(2)?)?,
            DpoLossType::Aot => {
                let (lr, _) = chosen_logps.f_sub(rejected_logps)?.f_sort(0, false)?;
                let (rlr, _) = ref_chosen_logps.f_sub(ref_rejected_logps)?.f_sort(0, false)?;
                smoothed(&lr.f_sub(&rlr)?)?
            }
            DpoLossType::AotUnpaired => {
                let (c, _) = cl.f_sort(0, false)?;
                let (r, _) = rl.f_sort(0, false)?;
                smoothed(&c.f_sub(&r)?)?
            }
            DpoLossType::ApoZero => {
                let chosen = cl.f_mul_scalar(b)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?;
                chosen.f_add(&rl.f_mul_scalar(b)?.f_sigmoid()?)?
            }
            DpoLossType::ApoDown => {
                let chosen = cl.f_mul_scalar(b)?.f_sigmoid()?;
                chosen.f_add(
                    &cl.f_sub(&rl)?.f_mul_scalar(b)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?,
                )?
            }
            DpoLossType::Discopop => {
                let logits = delta.f_mul_scalar(b)?;
                let modulation = logits.f_div_scalar(p.discopop_tau)?.f_sigmoid()?;
                let logistic = ls(&logits)?.f_neg()?;
                let exp = logits.f_neg()?.f_exp()?;
                logistic
                    .f_mul(&modulation.f_neg()?.f_add_scalar(1.0)?)?
                    .f_add(&exp.f_mul(&modulation)?)?
            }
            DpoLossType::SigmoidNorm => ls(&avg_delta()?.f_mul_scalar(b)?)?.f_neg()?,
        };
        let term = per_seq.f_mean(None::<Kind>)?.f_mul_scalar(weight)?;
        loss = Some(match loss {
            None => term,
            Some(l) => l.f_add(&term)?,
        });
    }
    let loss = loss.ok_or_else(|| PluginError::invalid("DPO needs at least one loss type"))?;
    Ok(PairLoss {
        loss,
        chosen_rewards: cl.f_mul_scalar(b)?.f_detach()?,
        rejected_rewards: rl.f_mul_scalar(b)?.f_detach()?,
    })
}

// ---------------------------------------------------------------- ORPO

/// `log(1 − exp(x))` for x < 0, stable on both sides of −ln 2 (TRL's `log1mexp`).
pub fn log1mexp(x: &Tensor) -> PluginResult<Tensor> {
    let small = x.f_exp()?.f_neg()?.f_log1p()?;
    let large = x.f_expm1()?.f_neg()?.f_log()?;
    Ok(small.f_where_self(&x.f_lt(-std::f64::consts::LN_2)?, &large)?)
}

/// ORPO's odds-ratio term (TRL 1.16 `ORPOTrainer.odds_ratio_loss`) for the length-averaged
/// log-probabilities of chosen and rejected completions (`[B]`).
pub struct OddsRatio {
    /// `β · log σ(log odds)`, per pair; the ORPO loss is `nll − mean(losses)`.
    pub losses: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
    /// `mean(log σ(log odds))`.
    pub log_odds_ratio: Tensor,
    /// `mean(log odds)`.
    pub log_odds_chosen: Tensor,
}

pub fn odds_ratio_loss(
    beta: f64,
    chosen_logps: &Tensor,
    rejected_logps: &Tensor,
) -> PluginResult<OddsRatio> {
    let c = chosen_logps.f_to_kind(Kind::Float)?;
    let r = rejected_logps.f_to_kind(Kind::Float)?;
    let log_odds = c.f_sub(&r)?.f_sub(&log1mexp(&c)?.f_sub(&log1mexp(&r)?)?)?;
    let ratio = ls(&log_odds)?;
    Ok(OddsRatio {
        losses: ratio.f_mul_scalar(beta)?,
        chosen_rewards: c.f_mul_scalar(beta)?.f_detach()?,
        rejected_rewards: r.f_mul_scalar(beta)?.f_detach()?,
        log_odds_ratio: ratio.f_mean(None::<Kind>)?,
        log_odds_chosen: log_odds.f_mean(None::<Kind>)?,
    })
}

// ---------------------------------------------------------------- CPO / SimPO

/// CPO's loss types (TRL 1.16 `CPOTrainer.cpo_loss`); `simpo` is SimPO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpoLossType {
    Simpo,
    Sigmoid,
    Hinge,
    Ipo,
}

impl CpoLossType {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "simpo" => Self::Simpo,
            "sigmoid" => Self::Sigmoid,
            "hinge" => Self::Hinge,
            "ipo" => Self::Ipo,
            _ => return None,
        })
    }
    /// Whether the per-sequence log-probabilities are averaged over completion tokens
    /// (TRL's `average_log_prob=self.loss_type in ["ipo", "simpo"]`).
    pub fn length_normalized(self) -> bool {
        matches!(self, Self::Simpo | Self::Ipo)
    }
}

/// Per-pair CPO/SimPO losses and rewards (TRL 1.16 `CPOTrainer.cpo_loss`, `alpha = 0`).
/// `loss` here is the per-pair vector; the objective is `mean(loss) + cpo_alpha · nll`.
pub fn cpo_losses(
    kind: CpoLossType,
    beta: f64,
    simpo_gamma: f64,
    label_smoothing: f64,
    chosen_logps: &Tensor,
    rejected_logps: &Tensor,
) -> PluginResult<PairLoss> {
    let logits = chosen_logps.f_sub(rejected_logps)?;
    let smoothed = |l: &Tensor| -> PluginResult<Tensor> {
        let bl = l.f_mul_scalar(beta)?;
        Ok(ls(&bl)?
            .f_neg()?
            .f_mul_scalar(1.0 - label_smoothing)?
            .f_sub(&ls(&bl.f_neg()?)?.f_mul_scalar(label_smoothing)?)?)
    };
    let losses = match kind {
        CpoLossType::Simpo => smoothed(&logits.f_sub_scalar(simpo_gamma / beta)?)?,
        CpoLossType::Sigmoid => smoothed(&logits)?,
        CpoLossType::Hinge => logits.f_mul_scalar(beta)?.f_neg()?.f_add_scalar(1.0)?.f_relu()?,
        CpoLossType::Ipo => logits.f_sub_scalar(1.0 / (2.0 * beta))?.f_pow_tensor_scalar(2)?,
    };
    Ok(PairLoss {
        loss: losses,
        chosen_rewards: chosen_logps.f_mul_scalar(beta)?.f_detach()?,
        rejected_rewards: rejected_logps.f_mul_scalar(beta)?.f_detach()?,
    })
}

// ---------------------------------------------------------------- KTO

/// KTO's loss types (TRL 1.16 `KTOTrainer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtoLossType {
    Kto,
    ApoZeroUnpaired,
}

/// The parameters of [`kto_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct KtoParams {
    pub beta: f64,
    pub loss_type: KtoLossType,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// What [`kto_loss`] returns.
pub struct KtoLoss {
    pub loss: Tensor,
    /// `β · (logπ − logπ_ref)` of the desirable rows, then of the undesirable rows.
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
    pub chosen_logps: Tensor,
    pub rejected_logps: Tensor,
    /// The KL estimate `max(0, mean(KL_logps − ref_KL_logps))` (0 without a KL batch).
    pub kl: f64,
}

/// KTO (TRL 1.16 `KTOTrainer._compute_loss`) for per-row completion log-probabilities
/// (`[N]`), the desirability of each row (bool `[N]`) and, for `kto`, the log-probabilities
/// of the mismatched KL batch under policy and reference (`[N]` each).
pub fn kto_loss(
    p: &KtoParams,
    logps: &Tensor,
    ref_logps: &Tensor,
    desirable: &Tensor,
    kl_logps: Option<(&Tensor, &Tensor)>,
) -> PluginResult<KtoLoss> {
    let chosen_idx = desirable.f_nonzero()?.f_view([-1])?;
    let rejected_idx = desirable.f_logical_not()?.f_nonzero()?.f_view([-1])?;
    let chosen_logps = logps.f_index_select(0, &chosen_idx)?;
    let rejected_logps = logps.f_index_select(0, &rejected_idx)?;
    let ref_chosen = ref_logps.f_index_select(0, &chosen_idx)?;
    let ref_rejected = ref_logps.f_index_select(0, &rejected_idx)?;
    let kl = match kl_logps {
        Some((policy, reference)) => {
            policy.f_sub(reference)?.f_mean(None::<Kind>)?.f_detach()?.f_clamp_min(0.0)?
        }
        None => Tensor::f_zeros([1], (logps.kind(), logps.device()))?,
    };
    let b = p.beta;
    let chosen_ratio = chosen_logps.f_sub(&ref_chosen)?;
    let rejected_ratio = rejected_logps.f_sub(&ref_rejected)?;
    let (chosen_losses, rejected_losses) = match p.loss_type {
        KtoLossType::Kto => (
            chosen_ratio.f_sub(&kl)?.f_mul_scalar(b)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?,
            kl.f_sub(&rejected_ratio)?.f_mul_scalar(b)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?,
        ),
        KtoLossType::ApoZeroUnpaired => (
            chosen_ratio.f_mul_scalar(b)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?,
            rejected_ratio.f_mul_scalar(b)?.f_sigmoid()?,
        ),
    };
    let losses = Tensor::f_cat(
        &[
            chosen_losses.f_mul_scalar(p.desirable_weight)?,
            rejected_losses.f_mul_scalar(p.undesirable_weight)?,
        ],
        0,
    )?;
    let kl_value = kl.f_sum(Kind::Double)?.f_double_value(&[])?;
    Ok(KtoLoss {
        loss: losses.f_nanmean(None::<&[i64]>, false, None::<Kind>)?,
        chosen_rewards: chosen_ratio.f_mul_scalar(b)?.f_detach()?,
        rejected_rewards: rejected_ratio.f_mul_scalar(b)?.f_detach()?,
        chosen_logps: chosen_logps.f_detach()?,
        rejected_logps: rejected_logps.f_detach()?,
        kl: kl_value,
    })
}

// ---------------------------------------------------------------- GRPO

/// GRPO's loss aggregations (TRL 1.16 `GRPOTrainer._compute_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoLossType {
    /// Per-sequence token mean, then the mean over sequences.
    Grpo,
    /// Token sum over the micro-batch divided by its active tokens.
    Bnpo,
    /// Token sum divided by `rows · max_completion_length`.
    DrGrpo,
    /// Token sum divided by the active tokens of the whole accumulated batch.
    Dapo,
}

impl GrpoLossType {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "grpo" => Self::Grpo,
            "bnpo" => Self::Bnpo,
            "dr_grpo" => Self::DrGrpo,
            "dapo" => Self::Dapo,
            _ => return None,
        })
    }
}

/// The parameters of [`grpo_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoParams {
    pub loss_type: GrpoLossType,
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Two-sided clipping of the ratio from above (TRL `delta`), off when `None`.
    pub delta: Option<f64>,
    pub max_completion_length: i64,
}

/// What [`grpo_loss`] returns: the loss and TRL's metrics (`kl`, `clip_ratio/*`).
pub struct GrpoLoss {
    pub loss: Tensor,
    pub metrics: Vec<(String, f64)>,
}

/// The GRPO loss for per-token log-probabilities of the completions (`[B, C]`), those of the
/// policy that sampled them (`old`, `None`: the current ones detached, TRL's
/// `num_iterations = 1`), of the reference (needed when `beta ≠ 0`), the advantages (`[B]`
/// or `[B, C]`) and the completion mask (`[B, C]`). `grad_accum` divides the `grpo`, `bnpo`
/// and `dr_grpo` losses (TRL's `current_gradient_accumulation_steps`); `dapo_normalizer` is
/// the token count `dapo` divides by.
#[allow(clippy::too_many_arguments)] // TRL's `_compute_loss` inputs, one argument each
pub fn grpo_loss(
    p: &GrpoParams,
    per_token_logps: &Tensor,
    old_per_token_logps: Option<&Tensor>,
    ref_per_token_logps: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    grad_accum: f64,
    dapo_normalizer: f64,
) -> PluginResult<GrpoLoss> {
    let advantages =
        if advantages.dim() == 1 { advantages.f_unsqueeze(1)? } else { advantages.shallow_clone() };
    let mask = mask.f_to_kind(per_token_logps.kind())?;
    let old = match old_per_token_logps {
        Some(o) => o.shallow_clone(),
        None => per_token_logps.f_detach()?,
    };
    let log_ratio = per_token_logps.f_sub(&old)?;
    let coef_1 = log_ratio.f_exp()?;
    let per_token_kl = if p.beta != 0.0 {
        let r = ref_per_token_logps.ok_or_else(|| {
            PluginError::invalid("GRPO with beta ≠ 0 needs the reference log-probabilities")
        })?;
        let d = r.f_sub(per_token_logps)?;
        Some(d.f_exp()?.f_sub(&d)?.f_sub_scalar(1.0)?)
    } else {
        None
    };
    let coef_2 = coef_1.f_clamp(1.0 - p.epsilon_low, 1.0 + p.epsilon_high)?;
    let coef_1c = match p.delta {
        Some(d) => coef_1.f_clamp_max(d)?,
        None => coef_1.shallow_clone(),
    };
    let l1 = coef_1c.f_mul(&advantages)?;
    let l2 = coef_2.f_mul(&advantages)?;
    let mut per_token_loss = l1.f_minimum(&l2)?.f_neg()?;
    if let Some(kl) = &per_token_kl {
        per_token_loss = per_token_loss.f_add(&kl.f_mul_scalar(p.beta)?)?;
    }
    let masked = per_token_loss.f_mul(&mask)?;
    let rows = per_token_loss.size()[0];
    let loss = match p.loss_type {
        GrpoLossType::Grpo => masked
            .f_sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)?
            .f_div(
                &mask
                    .f_sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)?
                    .f_clamp_min(1.0)?,
            )?
            .f_mean(None::<Kind>)?
            .f_div_scalar(grad_accum)?,
        GrpoLossType::Bnpo => masked
            .f_sum(None::<Kind>)?
            .f_div(&mask.f_sum(None::<Kind>)?.f_clamp_min(1.0)?)?
            .f_div_scalar(grad_accum)?,
        GrpoLossType::DrGrpo => masked
            .f_sum(None::<Kind>)?
            .f_div_scalar((rows * p.max_completion_length) as f64)?
            .f_div_scalar(grad_accum)?,
        GrpoLossType::Dapo => masked.f_sum(None::<Kind>)?.f_div_scalar(dapo_normalizer.max(1.0))?,
    };
    // Metrics, as TRL's `global_masked_mean` on one process.
    let tokens = mask.f_sum(Kind::Double)?.f_double_value(&[])?.max(1.0);
    let masked_mean = |x: &Tensor| -> PluginResult<f64> {
        Ok(x.f_to_kind(Kind::Double)?
            .f_mul(&mask.f_to_kind(Kind::Double)?)?
            .f_sum(Kind::Double)?
            .f_double_value(&[])?
            / tokens)
    };
    let mut metrics = Vec::new();
    if let Some(kl) = &per_token_kl {
        metrics.push(("kl".to_string(), masked_mean(&kl.f_detach()?)?));
    }
    let low = coef_1.f_lt(1.0 - p.epsilon_low)?.f_logical_and(&advantages.f_lt(0.0)?)?;
    let high = coef_1.f_gt(1.0 + p.epsilon_high)?.f_logical_and(&advantages.f_gt(0.0)?)?;
    let region = low.f_logical_or(&high)?;
    metrics.push(("clip_ratio/low_mean".to_string(), masked_mean(&low)?));
    metrics.push(("clip_ratio/high_mean".to_string(), masked_mean(&high)?));
    metrics.push(("clip_ratio/region_mean".to_string(), masked_mean(&region)?));
    Ok(GrpoLoss { loss, metrics })
}

/// How rewards are scaled into advantages (TRL `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// Divide by the standard deviation within each group (TRL's default, `True`).
    Group,
    /// Divide by the standard deviation over the whole batch.
    Batch,
    /// No scaling (Dr. GRPO, `False`).
    None,
}

/// Group-relative advantages and the reward metrics TRL logs.
pub struct Advantages {
    /// One per completion, in order.
    pub advantages: Vec<f64>,
    /// The weighted reward sum of each completion.
    pub rewards: Vec<f64>,
    pub metrics: Vec<(String, f64)>,
}

/// Bessel-corrected standard deviation (TRL's `nanstd` without NaNs): NaN for one value.
fn std_unbiased(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    if x.len() > 1 {
        (var * n / (n - 1.0)).sqrt()
    } else {
        f64::NAN
    }
}

/// TRL 1.16's `sum_then_normalize` advantages (`GRPOTrainer._generate_and_score_completions`):
/// `rewards_per_func[f][i]` is reward function `f`'s score of completion `i`; completions come
/// in groups of `num_generations` consecutive rows (one prompt each). The weighted sum of the
/// rewards minus its group mean, divided by (group or batch std + 1e-4) unless `scale` is
/// `None`. `names` label the per-function metrics `rewards/<name>/mean` and `/std`.
pub fn group_advantages(
    rewards_per_func: &[Vec<f64>],
    names: &[String],
    weights: &[f64],
    num_generations: usize,
    scale: ScaleRewards,
) -> PluginResult<Advantages> {
    if rewards_per_func.is_empty() {
        return Err(PluginError::invalid("GRPO needs at least one reward function"));
    }
    if weights.len() != rewards_per_func.len() || names.len() != rewards_per_func.len() {
        return Err(PluginError::invalid(format!(
            "{} reward functions but {} weights and {} names",
            rewards_per_func.len(),
            weights.len(),
            names.len()
        )));
    }
    let n = rewards_per_func[0].len();
    if n == 0 || num_generations == 0 || !n.is_multiple_of(num_generations) {
        return Err(PluginError::invalid(format!(
            "{n} completions do not form groups of num_generations = {num_generations}"
        )));
    }
    for (f, r) in rewards_per_func.iter().enumerate() {
        if r.len() != n {
            return Err(PluginError::invalid(format!(
                "reward `{}` gave {} scores for {n} completions",
                names[f],
                r.len()
            )));
        }
        if let Some(i) = r.iter().position(|v| !v.is_finite()) {
            return Err(PluginError::invalid(format!(
                "reward `{}` gave a non-finite score ({}) for completion {i}",
                names[f], r[i]
            )));
        }
    }
    let rewards: Vec<f64> =
        (0..n).map(|i| rewards_per_func.iter().zip(weights).map(|(r, w)| r[i] * w).sum()).collect();
    let g = num_generations;
    let mut advantages = vec![0.0; n];
    let batch_std = if n > 1 { std_unbiased(&rewards) } else { 0.0 };
    let mut zero_std = 0usize;
    for (k, group) in rewards.chunks(g).enumerate() {
        let mean = group.iter().sum::<f64>() / g as f64;
        let std = match scale {
            ScaleRewards::Group | ScaleRewards::None => {
                if g > 1 {
                    std_unbiased(group)
                } else {
                    0.0
                }
            }
            ScaleRewards::Batch => batch_std,
        };
        // torch.isclose(std, 0): |std| <= 1e-8.
        if std.abs() <= 1e-8 {
            zero_std += g;
        }
        for (j, r) in group.iter().enumerate() {
            let a = r - mean;
            advantages[k * g + j] = if scale == ScaleRewards::None { a } else { a / (std + 1e-4) };
        }
    }
    let mut metrics = Vec::new();
    for (f, r) in rewards_per_func.iter().enumerate() {
        metrics.push((format!("rewards/{}/mean", names[f]), r.iter().sum::<f64>() / n as f64));
        metrics
            .push((format!("rewards/{}/std", names[f]), if n > 1 { std_unbiased(r) } else { 0.0 }));
    }
    metrics.push(("reward".to_string(), rewards.iter().sum::<f64>() / n as f64));
    metrics.push(("reward_std".to_string(), batch_std));
    metrics.push(("frac_reward_zero_std".to_string(), zero_std as f64 / n as f64));
    Ok(Advantages { advantages, rewards, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Closed form: rewards [1, 3] and [2, 2] with weights (1, 0.5) over two functions.
    #[test]
    fn group_advantages_scaled_unscaled_and_batch() {
        let per_func = vec![vec![1.0, 3.0, 2.0, 2.0], vec![2.0, 2.0, 0.0, 0.0]];
        let names = vec!["a".to_string(), "b".to_string()];
        // Weighted sums: [2, 4, 2, 2]; group means 3 and 2; group stds √2 and 0.
        let g = group_advantages(&per_func, &names, &[1.0, 0.5], 2, ScaleRewards::Group).unwrap();
        let s2 = 2f64.sqrt();
        assert!(
            close(g.advantages[0], -1.0 / (s2 + 1e-4)) && close(g.advantages[1], 1.0 / (s2 + 1e-4))
        );
        assert_eq!(&g.advantages[2..], &[0.0, 0.0]);
        let m = |k: &str| g.metrics.iter().find(|(n, _)| n == k).unwrap().1;
        assert!(
            close(m("reward"), 2.5)
                && close(m("frac_reward_zero_std"), 0.5)
                && close(m("rewards/a/mean"), 2.0)
        );
        let n = group_advantages(&per_func, &names, &[1.0, 0.5], 2, ScaleRewards::None).unwrap();
        assert_eq!(n.advantages, vec![-1.0, 1.0, 0.0, 0.0]);
        // Batch std of [2, 4, 2, 2]: mean 2.5, Σ(x − m)² = 3, unbiased var 1.
        let b = group_advantages(&per_func, &names, &[1.0, 0.5], 2, ScaleRewards::Batch).unwrap();
        assert!(close(b.advantages[1], 1.0 / (1.0 + 1e-4)));
        assert!(group_advantages(&per_func, &names, &[1.0, 0.5], 3, ScaleRewards::Group).is_err());
        assert!(group_advantages(
            &[vec![1.0, f64::NAN]],
            &names[..1],
            &[1.0],
            2,
            ScaleRewards::Group
        )
        .is_err());
    }

    #[test]
    fn log1mexp_is_log_of_one_minus_exp() {
        let x = Tensor::from_slice(&[-1e-6f64, -0.5, -0.7, -3.0, -40.0]);
        let got = Vec::<f64>::try_from(&log1mexp(&x).unwrap()).unwrap();
        for (g, x) in got.iter().zip([-1e-6f64, -0.5, -0.7, -3.0, -40.0]) {
            let want = (-x.exp_m1()).ln();
            assert!((g - want).abs() < 1e-12 * want.abs().max(1.0), "{x}: {g} vs {want}");
        }
    }

    /// Sigmoid DPO at a zero margin is ln 2; its rewards are β times the log-ratios.
    #[test]
    fn dpo_closed_form() {
        let p = DpoParams {
            beta: 0.5,
            loss_types: vec![(DpoLossType::Sigmoid, 1.0)],
            label_smoothing: 0.0,
            discopop_tau: 0.05,
        };
        let c = Tensor::from_slice(&[-3.0f64, -1.0]);
        let r = Tensor::from_slice(&[-4.0f64, -2.0]);
        let zero = Tensor::from_slice(&[0.0f64, 0.0]);
        let len = Tensor::from_slice(&[1i64, 1]);
        let out = dpo_loss(&p, &c, &r, &(&c - 1.0), &(&r - 1.0), &len, &len).unwrap();
        assert!(close(out.loss.double_value(&[]), std::f64::consts::LN_2));
        assert!(close(out.chosen_rewards.double_value(&[0]), 0.5));
        let out = dpo_loss(&p, &c, &r, &zero, &zero, &len, &len).unwrap();
        // margin 1 each: −log σ(0.5)
        assert!(close(out.loss.double_value(&[]), (1.0 + (-0.5f64).exp()).ln()));
    }
}
