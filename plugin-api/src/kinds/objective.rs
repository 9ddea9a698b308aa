//! Objective plugins: the loss of one training step, given a batch and a handle to the
//! policy model (which can also run as the reference, adapters disabled, and generate).
use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RBox, RResult, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;
use tch::Tensor;

use super::reward::{inputs_from_ffi, inputs_to_ffi, FfiRewardInput, RewardInput};
use super::{strings_from_ffi, strings_to_ffi};
use crate::error::{guard, PluginError, PluginResult};
use crate::tensor::{named_from_ffi, named_refs_to_ffi, NamedTensor, OwnedTensor};
use crate::Plugin;

/// A collated batch: named tensors (`input_ids`, `attention_mask`, `labels`,
/// `pixel_values`, …) and JSON metadata (sample ids, prompts for generation).
#[derive(Debug, Default)]
pub struct Batch {
    pub tensors: Vec<(String, Tensor)>,
    pub meta_json: String,
}

impl Batch {
    /// The tensor named `name`, or an error naming it and what the batch has.
    pub fn get(&self, name: &str) -> PluginResult<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
            let have: Vec<&str> = self.tensors.iter().map(|(n, _)| n.as_str()).collect();
            PluginError::invalid(format!(
                "batch has no tensor `{name}` (it has: {})",
                have.join(", ")
            ))
        })
    }
}

/// What an objective returns for one micro-batch.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar loss with a graph to the trainable parameters.
    pub loss: Tensor,
    /// How many items the loss averages over (label tokens for SFT, pairs for DPO); the
    /// trainer uses it to average correctly across gradient-accumulation micro-batches.
    pub num_items: i64,
    /// Metrics to log (`rewards/chosen`, `accuracy`, …).
    pub metrics: Vec<(String, f64)>,
}

/// Flags for [`ObjectiveContext::forward`]: bit set of `DISABLE_ADAPTER`, `NO_GRAD`.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardFlags(pub u32);

impl ForwardFlags {
    pub const NONE: Self = Self(0);
    /// Run the base model alone: the reference model, without a second copy of weights.
    pub const DISABLE_ADAPTER: Self = Self(1);
    /// Do not record a graph.
    pub const NO_GRAD: Self = Self(2);
    /// Return the log-probabilities of given target tokens instead of the logits (see
    /// [`target_logps`]): the host computes them from the last hidden state and the head in
    /// chunks of target positions, so the `[B, T, V]` logits are never built.
    pub const TARGET_LOGPS: Self = Self(4);
    /// With `TARGET_LOGPS`: also return `target_entropy`, the entropy of each target
    /// position's distribution (no graph).
    pub const TARGET_ENTROPY: Self = Self(8);
    /// Also return [`SCORES`]: the run's score head (`score`, hidden → 1, as transformers'
    /// `…ForSequenceClassification`) at every position, `[B, T]` fp32, through the active
    /// adapter's trainable copy of the head (the base's head with `DISABLE_ADAPTER`). The
    /// objective must list `score_head` in its `needs()`. Without `TARGET_LOGPS` no `logits`
    /// are computed. A host that predates the flag returns no `scores`:
    /// [`take_output`] names it.
    pub const SCORES: Self = Self(16);
    /// Also return [`VALUES`]: the run's value head (`v_head`, hidden → 1, trained in full)
    /// on the policy's last hidden state at every position, `[B, T]` fp32 (PPO's critic).
    /// The objective must list `value_head` in its `needs()`. Without `TARGET_LOGPS` no
    /// `logits` are computed.
    pub const VALUES: Self = Self(32);
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for ForwardFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Output name of [`ForwardFlags::SCORES`]: `[B, T]` fp32.
pub const SCORES: &str = "scores";
/// Output name of [`ForwardFlags::VALUES`]: `[B, T]` fp32.
pub const VALUES: &str = "values";

/// What an objective lists in `needs()` for a score head (`score`, hidden → 1) on the model:
/// the host adds one (read from a sequence-classification checkpoint's `score.weight`, else
/// initialised as transformers does, normal(0, `initializer_range`)), trains it in full
/// beside the adapter (peft's `modules_to_save`) and saves it as peft's `SEQ_CLS` task does.
pub const NEED_SCORE_HEAD: &str = "score_head";
/// What an objective lists in `needs()` for a value head (`v_head`, hidden → 1) on the
/// policy's hidden states, trained in full beside the adapter and kept in the run's
/// checkpoints (not in the adapter: the policy's adapter stays a causal-LM adapter).
pub const NEED_VALUE_HEAD: &str = "value_head";
/// Prefix of a `needs()` entry asking the host to send each generation batch for this many
/// consecutive optimizer steps (`num_iterations=8`; PPO's `num_ppo_epochs ×
/// num_mini_batches`): the default of `training.num_iterations`. A config that sets another
/// value is refused by name.
pub const NEED_NUM_ITERATIONS: &str = "num_iterations=";

/// Removes output `name` from a forward's outputs, or an error saying the host did not
/// compute it (a host that predates the flag that asks for it).
pub fn take_output(out: &mut Vec<(String, Tensor)>, name: &str) -> PluginResult<Tensor> {
    match out.iter().position(|(n, _)| n == name) {
        Some(i) => Ok(out.swap_remove(i).1),
        None => Err(PluginError::unsupported(format!(
            "the host's forward returned no `{name}` (it has: {}); this objective needs a host that computes it",
            out.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Each row's value at its last position with `attention_mask` 1 (`[B, T]` → `[B]`), where a
/// sequence-classification model reads its score (right padding: the last real token). A row
/// without any such position is an error naming it.
pub fn last_token_values(per_position: &Tensor, attention_mask: &Tensor) -> PluginResult<Tensor> {
    let (b, t) = per_position.size2().map_err(|_| {
        PluginError::invalid(format!(
            "per-position scores must be [batch, seq], got {:?}",
            per_position.size()
        ))
    })?;
    if attention_mask.size() != [b, t] {
        return Err(PluginError::invalid(format!(
            "`attention_mask` {:?} does not match the scores [{b}, {t}]",
            attention_mask.size()
        )));
    }
    let mask = attention_mask.f_to_device(per_position.device())?.f_ne(0)?;
    let pos = Tensor::f_arange(t, (tch::Kind::Int64, per_position.device()))?
        .f_unsqueeze(0)?
        .f_expand([b, t], false)?;
    let last = pos.f_where_scalarother(&mask, -1)?.f_amax([1i64].as_slice(), false)?;
    let empty = Vec::<i64>::try_from(&last.f_lt(0)?.f_nonzero()?.f_reshape([-1])?)?;
    if let Some(r) = empty.first() {
        return Err(PluginError::invalid(format!(
            "row {r} has no token (its attention_mask is all 0)"
        )));
    }
    Ok(per_position.f_gather(1, &last.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?)
}

/// Input name of the target tokens for [`ForwardFlags::TARGET_LOGPS`]: `[B, T]` integers,
/// `target_ids[b, t]` the token position `t` is scored on (the *next* token for a causal
/// model's usual loss); negative = no target there.
pub const TARGET_IDS: &str = "target_ids";
/// Optional input with `TARGET_LOGPS`: a scalar tensor `τ`; log-probabilities are of
/// `logits / τ` (TRL's sampling temperature). Default 1.
pub const TARGET_TEMPERATURE: &str = "target_temperature";

/// What [`target_logps`] returns; every tensor is `[B, T]`.
#[derive(Debug)]
pub struct TargetLogps {
    /// `log softmax(logits[b, t] / τ)[target_ids[b, t]]` in fp32 (fp64 logits stay fp64), 0
    /// where there is no target; with a graph to the trainable parameters unless `NO_GRAD`.
    pub logps: Tensor,
    /// Whether the target is the argmax (the first maximal logit), false where no target.
    pub correct: Tensor,
    /// The entropy of `softmax(logits / τ)` (with `TARGET_ENTROPY`), 0 where no target.
    pub entropy: Option<Tensor>,
}

/// Runs the policy and returns the log-probabilities of `target_ids` ([`TARGET_IDS`]) under
/// `logits / temperature`. The host computes them in chunks of target positions without the
/// full logits (`TARGET_LOGPS`); a host that predates the flag answers with `logits`, and
/// they are computed here from those, so the result is the same either way.
pub fn target_logps(
    ctx: &dyn ObjectiveContext,
    inputs: &[(String, Tensor)],
    target_ids: &Tensor,
    temperature: f64,
    flags: ForwardFlags,
) -> PluginResult<TargetLogps> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(PluginError::invalid(format!(
            "target log-probabilities need a positive temperature, got {temperature}"
        )));
    }
    let mut all: Vec<(String, Tensor)> = inputs
        .iter()
        .filter(|(n, _)| n != TARGET_IDS && n != TARGET_TEMPERATURE)
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    all.push((TARGET_IDS.to_string(), target_ids.shallow_clone()));
    if temperature != 1.0 {
        all.push((TARGET_TEMPERATURE.to_string(), Tensor::from(temperature)));
    }
    let mut out = ctx.forward(&all, flags | ForwardFlags::TARGET_LOGPS)?;
    let mut take = |name: &str| -> Option<Tensor> {
        out.iter().position(|(n, _)| n == name).map(|i| out.swap_remove(i).1)
    };
    if let (Some(logps), Some(correct)) = (take("target_logps"), take("target_correct")) {
        let entropy = take("target_entropy");
        if flags.contains(ForwardFlags::TARGET_ENTROPY) && entropy.is_none() {
            return Err(PluginError::invalid("the host returned no `target_entropy`"));
        }
        return Ok(TargetLogps { logps, correct, entropy });
    }
    let logits = take("logits").ok_or_else(|| {
        PluginError::invalid("the model's forward returned neither `target_logps` nor `logits`")
    })?;
    logps_from_logits(&logits, target_ids, temperature, flags)
}

/// [`TargetLogps`] from full `[B, T, V]` logits (what a host computes in chunks).
pub fn logps_from_logits(
    logits: &Tensor,
    target_ids: &Tensor,
    temperature: f64,
    flags: ForwardFlags,
) -> PluginResult<TargetLogps> {
    let (b, t, v) = logits.size3().map_err(|_| {
        PluginError::invalid(format!(
            "model `logits` must be [batch, seq, vocab], got {:?}",
            logits.size()
        ))
    })?;
    if target_ids.size() != [b, t] {
        return Err(PluginError::invalid(format!(
            "`{TARGET_IDS}` has shape {:?}, the model's logits {:?}: expected [{b}, {t}]",
            target_ids.size(),
            logits.size()
        )));
    }
    let targets = target_ids.f_to_device(logits.device())?.f_to_kind(tch::Kind::Int64)?;
    let valid = targets.f_ge(0)?;
    if targets.f_ge(v)?.f_any()?.int64_value(&[]) != 0 {
        return Err(PluginError::invalid(format!(
            "`{TARGET_IDS}` holds ids outside the vocabulary [0, {v})"
        )));
    }
    let safe = targets.f_clamp_min(0)?.f_unsqueeze(-1)?;
    let logits = match logits.kind() {
        tch::Kind::Double => logits.shallow_clone(),
        _ => logits.f_to_kind(tch::Kind::Float)?,
    };
    let logits = if temperature != 1.0 { logits.f_div_scalar(temperature)? } else { logits };
    let lp = logits.f_log_softmax(-1, None::<tch::Kind>)?;
    let logps =
        lp.f_gather(-1, &safe, false)?.f_squeeze_dim(-1)?.f_where_scalarother(&valid, 0.0)?;
    let (correct, entropy) = tch::no_grad(|| -> PluginResult<(Tensor, Option<Tensor>)> {
        let (_, argmax) = logits.f_max_dim(-1, false)?;
        let correct = argmax.f_eq_tensor(&targets)?.f_logical_and(&valid)?;
        let entropy = if flags.contains(ForwardFlags::TARGET_ENTROPY) {
            let h = lp.f_exp()?.f_mul(&lp)?.f_sum_dim_intlist(
                [-1i64].as_slice(),
                false,
                None::<tch::Kind>,
            )?;
            Some(h.f_neg()?.f_where_scalarother(&valid, 0.0)?)
        } else {
            None
        };
        Ok((correct, entropy))
    })?;
    Ok(TargetLogps { logps, correct, entropy })
}

/// `target_ids` for next-token scoring: `labels` shifted left by one (position `t` is scored
/// on `labels[t + 1]`), the last position without a target; labels equal to `ignore_index`
/// become −1 (no target).
pub fn next_token_targets(labels: &Tensor, ignore_index: i64) -> PluginResult<Tensor> {
    let (b, t) = labels.size2().map_err(|_| {
        PluginError::invalid(format!("`labels` must be [batch, seq], got {:?}", labels.size()))
    })?;
    let labels = labels.f_to_kind(tch::Kind::Int64)?;
    let labels = labels.f_masked_fill(&labels.f_eq(ignore_index)?, -1)?;
    let pad = Tensor::f_full([b, 1], -1, (tch::Kind::Int64, labels.device()))?;
    Ok(Tensor::f_cat(&[labels.f_narrow(1, 1, t - 1)?, pad], 1)?)
}

/// Batch-metadata key of a prompts batch whose prompts hold images: how many of the batch's
/// images each prompt row holds, in row order (`pixel_values` are the patches of every image
/// of the batch, concatenated; `image_grid_thw` one row per image).
pub const IMAGES_PER_PROMPT: &str = "images_per_prompt";
/// As [`IMAGES_PER_PROMPT`] for videos (`pixel_values_videos`, `video_grid_thw`,
/// `second_per_grid_ts` one entry per video).
pub const VIDEOS_PER_PROMPT: &str = "videos_per_prompt";
/// Generation-option key (`ObjectiveContext::generate`'s `options_json`): for each prompt
/// given, the row of the current batch it comes from; the host then generates with that
/// row's images and videos (the batch's vision inputs, [`select_prompt_rows`]). Prompts of a
/// batch with images need it: token ids alone cannot carry the pixels.
pub const PROMPT_ROWS: &str = "prompt_rows";

/// The per-prompt counts under `key` ([`IMAGES_PER_PROMPT`], [`VIDEOS_PER_PROMPT`]) of a
/// batch's metadata: `None` when absent, an error naming the key when malformed.
pub fn vision_counts(meta: &serde_json::Value, key: &str) -> PluginResult<Option<Vec<usize>>> {
    match meta.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(v)) => v
            .iter()
            .map(|n| n.as_u64().map(|n| n as usize))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| {
                PluginError::invalid(format!(
                    "batch metadata `{key}` must be a list of counts, got {}",
                    serde_json::Value::Array(v.clone())
                ))
            }),
        Some(other) => Err(PluginError::invalid(format!(
            "batch metadata `{key}` must be a list of counts, got {other}"
        ))),
    }
}

/// Where each of consecutive blocks of these sizes starts (exclusive prefix sums).
fn starts<T: Copy + Default + std::ops::Add<Output = T>>(sizes: &[T]) -> Vec<T> {
    sizes
        .iter()
        .scan(T::default(), |at, &n| {
            let start = *at;
            *at = start + n;
            Some(start)
        })
        .collect()
}

/// The model inputs of a prompts batch (one row per prompt, plus the vision tensors whose rows
/// are images' patches) for the prompt rows `rows`, in that order (rows may repeat: GRPO's
/// `num_generations` copies of each prompt). `pixel_values` / `image_grid_thw` follow each
/// row's block of images ([`IMAGES_PER_PROMPT`]: `images_per_prompt[r]` images of
/// `grid_t·grid_h·grid_w` patches each), `pixel_values_videos` / `video_grid_thw` /
/// `second_per_grid_ts` its block of videos; every other tensor has one row per prompt. Vision
/// tensors the chosen rows have nothing of are left out.
pub fn select_prompt_rows(
    inputs: &[(String, Tensor)],
    prompts: usize,
    images_per_prompt: Option<&[usize]>,
    videos_per_prompt: Option<&[usize]>,
    rows: &[usize],
) -> PluginResult<Vec<(String, Tensor)>> {
    let get = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    if let Some(&r) = rows.iter().find(|&&r| r >= prompts) {
        return Err(PluginError::invalid(format!(
            "prompt row {r} is outside the batch's {prompts} prompts"
        )));
    }
    // (grid name, patch tensor, per-item tensors, per-prompt counts) of images then videos.
    let kinds = [
        ("image_grid_thw", "pixel_values", None, IMAGES_PER_PROMPT, images_per_prompt),
        (
            "video_grid_thw",
            "pixel_values_videos",
            Some("second_per_grid_ts"),
            VIDEOS_PER_PROMPT,
            videos_per_prompt,
        ),
    ];
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut vision_names: Vec<&str> = Vec::new();
    for (grid_name, pixels_name, per_item, key, counts) in kinds {
        vision_names.extend([grid_name, pixels_name]);
        vision_names.extend(per_item);
        let Some(grid) = get(grid_name) else {
            continue;
        };
        let counts = counts.ok_or_else(|| {
            PluginError::invalid(format!(
                "the batch has `{grid_name}` but its metadata no `{key}`: which prompt holds which of them is unknown"
            ))
        })?;
        if counts.len() != prompts {
            return Err(PluginError::invalid(format!(
                "batch metadata `{key}` has {} entries for {prompts} prompts",
                counts.len()
            )));
        }
        let grid_cpu = grid.f_to_device(tch::Device::Cpu)?.f_to_kind(tch::Kind::Int64)?;
        if grid_cpu.dim() != 2 || grid_cpu.size()[1] != 3 {
            return Err(PluginError::invalid(format!(
                "batch `{grid_name}` must be [items, 3], got {:?}",
                grid_cpu.size()
            )));
        }
        let flat = Vec::<i64>::try_from(&grid_cpu.f_reshape([-1])?)?;
        let patches: Vec<i64> = flat.chunks(3).map(|g| g[0] * g[1] * g[2]).collect();
        if counts.iter().sum::<usize>() != patches.len() {
            return Err(PluginError::invalid(format!(
                "batch metadata `{key}` counts {} items but `{grid_name}` has {}",
                counts.iter().sum::<usize>(),
                patches.len()
            )));
        }
        let pixels = get(pixels_name).ok_or_else(|| {
            PluginError::invalid(format!("the batch has `{grid_name}` but no `{pixels_name}`"))
        })?;
        let total: i64 = patches.iter().sum();
        if pixels.dim() != 2 || pixels.size()[0] != total {
            return Err(PluginError::invalid(format!(
                "batch `{pixels_name}` {:?} does not hold the {total} patches `{grid_name}` describes",
                pixels.size()
            )));
        }
        let (first_item, first_patch) = (starts(counts), starts(&patches));
        let (mut items, mut patch_rows) = (Vec::new(), Vec::new());
        for &r in rows {
            for i in first_item[r]..first_item[r] + counts[r] {
                items.push(i as i64);
                patch_rows.extend(first_patch[i]..first_patch[i] + patches[i]);
            }
        }
        if items.is_empty() {
            continue;
        }
        let pick = |t: &Tensor, idx: &[i64]| -> PluginResult<Tensor> {
            Ok(t.f_index_select(0, &Tensor::from_slice(idx).f_to_device(t.device())?)?)
        };
        out.push((pixels_name.to_string(), pick(pixels, &patch_rows)?));
        out.push((grid_name.to_string(), pick(grid, &items)?));
        if let Some(name) = per_item {
            if let Some(t) = get(name) {
                if t.dim() != 1 || t.size()[0] != patches.len() as i64 {
                    return Err(PluginError::invalid(format!(
                        "batch `{name}` {:?} must hold one value per item of `{grid_name}` ({})",
                        t.size(),
                        patches.len()
                    )));
                }
                out.push((name.to_string(), pick(t, &items)?));
            }
        }
    }
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    for (name, t) in inputs {
        if vision_names.contains(&name.as_str()) {
            if get(match name.as_str() {
                "pixel_values" => "image_grid_thw",
                "pixel_values_videos" | "second_per_grid_ts" => "video_grid_thw",
                other => other,
            })
            .is_none()
            {
                return Err(PluginError::invalid(format!(
                    "batch `{name}` comes without its grid (`image_grid_thw` / `video_grid_thw`)"
                )));
            }
            continue;
        }
        if t.dim() < 1 || t.size()[0] != prompts as i64 {
            return Err(PluginError::unsupported(format!(
                "batch tensor `{name}` ({:?}) is not one row per prompt ({prompts}) nor a vision input",
                t.size()
            )));
        }
        out.push((
            name.clone(),
            t.f_index_select(0, &Tensor::from_slice(&idx).f_to_device(t.device())?)?,
        ));
    }
    Ok(out)
}

/// The scores of one reward plugin for a list of completions.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardScores {
    pub name: String,
    pub weight: f64,
    pub scores: Vec<f64>,
}

/// The host's side of a training step, offered to objectives.
pub trait ObjectiveContext {
    /// Runs the policy on named inputs; returns named outputs (`logits`, …).
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>>;
    /// Generates completions (token ids, prompt excluded) for prompts given as token ids;
    /// `options_json` holds sampling options (`max_new_tokens`, `temperature`, …) and, for
    /// prompts of the current batch that hold images or videos, [`PROMPT_ROWS`]: each
    /// prompt's batch row, whose vision inputs the host generates it with.
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>>;
    /// Token ids to text.
    fn decode(&self, ids: &[i64]) -> PluginResult<String>;
    /// Scores completions with every reward plugin the run configured.
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>>;
}

/// A training objective configured for a run.
pub trait Objective: Send + 'static {
    /// What the objective needs from the host: `reference`, `generation`, `rewards`,
    /// `preference_pairs`, `kto_labels`, [`NEED_SCORE_HEAD`], [`NEED_VALUE_HEAD`],
    /// [`NEED_NUM_ITERATIONS`]`N`. A host ignores needs it does not know.
    fn needs(&self) -> Vec<String> {
        Vec::new()
    }
    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput>;
}

// ---------------------------------------------------------------- FFI

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiBatch {
    pub tensors: RVec<NamedTensor>,
    pub meta_json: RString,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiLossOutput {
    pub loss: OwnedTensor,
    pub num_items: i64,
    pub metrics: RVec<Tuple2<RString, f64>>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiRewardScores {
    pub name: RString,
    pub weight: f64,
    pub scores: RVec<f64>,
}

#[sabi_trait]
pub trait FfiObjectiveContext {
    fn forward(
        &self,
        inputs: RVec<NamedTensor>,
        flags: ForwardFlags,
    ) -> RResult<RVec<NamedTensor>, PluginError>;
    fn generate(
        &self,
        prompts: RVec<RVec<i64>>,
        options_json: RStr<'_>,
    ) -> RResult<RVec<RVec<i64>>, PluginError>;
    fn decode(&self, ids: RVec<i64>) -> RResult<RString, PluginError>;
    #[sabi(last_prefix_field)]
    fn rewards(&self, inputs: RVec<FfiRewardInput>) -> RResult<RVec<FfiRewardScores>, PluginError>;
}

pub type ObjectiveContextRef<'a> = FfiObjectiveContext_TO<'a, RRef<'a, ()>>;

#[sabi_trait]
pub trait FfiObjective: Send {
    fn needs(&self) -> RVec<RString>;
    #[sabi(last_prefix_field)]
    fn loss(
        &mut self,
        batch: &FfiBatch,
        ctx: ObjectiveContextRef<'_>,
    ) -> RResult<FfiLossOutput, PluginError>;
}

pub type ObjectiveBox = FfiObjective_TO<'static, RBox<()>>;

// ---------------------------------------------------------------- bridges

struct ObjectiveContextBridge<'a>(&'a dyn ObjectiveContext);

impl FfiObjectiveContext for ObjectiveContextBridge<'_> {
    fn forward(
        &self,
        inputs: RVec<NamedTensor>,
        flags: ForwardFlags,
    ) -> RResult<RVec<NamedTensor>, PluginError> {
        guard(|| {
            let out = self.0.forward(&named_from_ffi(inputs), flags)?;
            Ok(crate::tensor::named_to_ffi(out))
        })
    }
    fn generate(
        &self,
        prompts: RVec<RVec<i64>>,
        options_json: RStr<'_>,
    ) -> RResult<RVec<RVec<i64>>, PluginError> {
        guard(|| {
            let prompts: Vec<Vec<i64>> = prompts.into_iter().map(RVec::into_vec).collect();
            let out = self.0.generate(&prompts, options_json.as_str())?;
            Ok(out.into_iter().map(RVec::from).collect())
        })
    }
    fn decode(&self, ids: RVec<i64>) -> RResult<RString, PluginError> {
        guard(|| self.0.decode(&ids).map(RString::from))
    }
    fn rewards(&self, inputs: RVec<FfiRewardInput>) -> RResult<RVec<FfiRewardScores>, PluginError> {
        guard(|| {
            let out = self.0.rewards(&inputs_from_ffi(inputs))?;
            Ok(out
                .into_iter()
                .map(|r| FfiRewardScores {
                    name: r.name.into(),
                    weight: r.weight,
                    scores: r.scores.into(),
                })
                .collect())
        })
    }
}

struct ObjectiveBridge<T>(T);

impl<T: Objective> FfiObjective for ObjectiveBridge<T> {
    fn needs(&self) -> RVec<RString> {
        guard(|| Ok(strings_to_ffi(self.0.needs()))).unwrap_or_default()
    }
    fn loss(
        &mut self,
        batch: &FfiBatch,
        ctx: ObjectiveContextRef<'_>,
    ) -> RResult<FfiLossOutput, PluginError> {
        guard(|| {
            let batch = Batch {
                tensors: batch
                    .tensors
                    .iter()
                    .map(|n| {
                        (
                            n.name.to_string(),
                            crate::tensor::TensorRef::from_owned(&n.tensor).to_tensor(),
                        )
                    })
                    .collect(),
                meta_json: batch.meta_json.to_string(),
            };
            let ctx = ObjectiveContextHandle(ctx);
            let out = self.0.loss(&batch, &ctx)?;
            Ok(FfiLossOutput {
                loss: OwnedTensor::new(out.loss),
                num_items: out.num_items,
                metrics: out
                    .metrics
                    .into_iter()
                    .map(|(k, v)| Tuple2(RString::from(k), v))
                    .collect(),
            })
        })
    }
}

/// Plugin side of `export_plugin!`.
pub fn create<T: Plugin + Objective>(config_json: RStr<'_>) -> RResult<ObjectiveBox, PluginError> {
    guard(|| {
        let o = T::from_config(config_json.as_str())
            .map_err(|e| e.context(format!("plugin `{}`", T::NAME)))?;
        Ok(FfiObjective_TO::from_value(ObjectiveBridge(o), TD_Opaque))
    })
}

// ---------------------------------------------------------------- handles

/// Plugin side: the host's training-step context.
pub struct ObjectiveContextHandle<'a>(pub ObjectiveContextRef<'a>);

impl ObjectiveContext for ObjectiveContextHandle<'_> {
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        self.0.forward(named_refs_to_ffi(inputs), flags).into_result().map(named_from_ffi)
    }
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>> {
        let prompts: RVec<RVec<i64>> = prompts.iter().map(|p| RVec::from(p.clone())).collect();
        let out = self.0.generate(prompts, options_json.into()).into_result()?;
        Ok(out.into_iter().map(RVec::into_vec).collect())
    }
    fn decode(&self, ids: &[i64]) -> PluginResult<String> {
        self.0.decode(RVec::from(ids.to_vec())).into_result().map(RString::into_string)
    }
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        let out = self.0.rewards(inputs_to_ffi(inputs)).into_result()?;
        Ok(out
            .into_iter()
            .map(|r| RewardScores {
                name: r.name.into_string(),
                weight: r.weight,
                scores: r.scores.into_vec(),
            })
            .collect())
    }
}

/// Host side: an objective living in a plugin.
pub struct ObjectiveHandle(pub ObjectiveBox);

impl Objective for ObjectiveHandle {
    fn needs(&self) -> Vec<String> {
        strings_from_ffi(self.0.needs())
    }
    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let ffi_batch = FfiBatch {
            tensors: named_refs_to_ffi(&batch.tensors),
            meta_json: batch.meta_json.as_str().into(),
        };
        let bridge = ObjectiveContextBridge(ctx);
        let ctx_ref = FfiObjectiveContext_TO::from_ptr(&bridge, TD_Opaque);
        let out = self.0.loss(&ffi_batch, ctx_ref).into_result()?;
        Ok(LossOutput {
            loss: out.loss.into_tensor(),
            num_items: out.num_items,
            metrics: out.metrics.into_iter().map(|t| (t.0.into_string(), t.1)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(&t.f_select(1, 0).unwrap()).unwrap()
    }

    #[test]
    fn last_token_values_read_each_rows_last_real_position() {
        let v = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
        let m = Tensor::from_slice(&[1i64, 1, 0, 1, 1, 1]).view([2, 3]);
        let got = last_token_values(&v, &m).unwrap();
        assert_eq!(Vec::<f32>::try_from(&got).unwrap(), vec![2.0, 6.0]);
        let m = Tensor::from_slice(&[1i64, 1, 0, 0, 0, 0]).view([2, 3]);
        let e = last_token_values(&v, &m).unwrap_err().to_string();
        assert!(e.contains("row 1"), "{e}");
        let mut out = vec![("logits".to_string(), v)];
        let e = take_output(&mut out, SCORES).unwrap_err().to_string();
        assert!(e.contains("`scores`") && e.contains("logits"), "{e}");
    }

    #[test]
    fn prompt_rows_take_each_rows_block_of_images() {
        // Prompt 0: one image of 4 patches; prompt 1: images of 4 and 8 patches; patch k's
        // features are [k, k].
        let grid = Tensor::from_slice(&[1i64, 2, 2, 1, 2, 2, 1, 2, 4]).view([3, 3]);
        let pixels =
            Tensor::arange(16, (tch::Kind::Int64, tch::Device::Cpu)).view([16, 1]).repeat([1, 2]);
        let ids = Tensor::from_slice(&[10i64, 11, 20, 21]).view([2, 2]);
        let inputs = vec![
            ("prompt_ids".to_string(), ids),
            ("pixel_values".to_string(), pixels),
            ("image_grid_thw".to_string(), grid),
        ];
        let out = select_prompt_rows(&inputs, 2, Some(&[1, 2]), None, &[1, 0, 0]).unwrap();
        let get = |n: &str| &out.iter().find(|(k, _)| k == n).unwrap().1;
        let expected: Vec<i64> = (4..16).chain(0..4).chain(0..4).collect();
        assert_eq!(rows_of(get("pixel_values")), expected);
        assert_eq!(rows_of(get("image_grid_thw")), vec![1, 1, 1, 1]);
        assert_eq!(
            Vec::<i64>::try_from(&get("image_grid_thw").f_select(1, 2).unwrap()).unwrap(),
            vec![2, 4, 2, 2]
        );
        assert_eq!(rows_of(get("prompt_ids")), vec![20, 10, 10]);
        // Rows without images: no vision tensors at all.
        let out = select_prompt_rows(&inputs, 2, Some(&[0, 3]), None, &[0, 0]).unwrap();
        assert!(out.iter().all(|(n, _)| n == "prompt_ids"), "{out:?}");
        // Counts that disagree with the grids, or none, are refused by name.
        let e = select_prompt_rows(&inputs, 2, Some(&[1, 1]), None, &[0]).unwrap_err();
        assert!(e.to_string().contains("images_per_prompt"), "{e}");
        let e = select_prompt_rows(&inputs, 2, None, None, &[0]).unwrap_err();
        assert!(e.to_string().contains("images_per_prompt"), "{e}");
        let e = select_prompt_rows(&inputs, 2, Some(&[1, 2]), None, &[2]).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }

    #[test]
    fn prompt_rows_take_each_rows_videos_with_their_timing() {
        let grid = Tensor::from_slice(&[2i64, 1, 2, 1, 1, 2]).view([2, 3]);
        let pixels = Tensor::arange(6, (tch::Kind::Int64, tch::Device::Cpu)).view([6, 1]);
        let seconds = Tensor::from_slice(&[0.5f64, 1.0]);
        let mask = Tensor::from_slice(&[1i64, 1]).view([2, 1]);
        let inputs = vec![
            ("prompt_mask".to_string(), mask),
            ("pixel_values_videos".to_string(), pixels),
            ("video_grid_thw".to_string(), grid),
            ("second_per_grid_ts".to_string(), seconds),
        ];
        let out = select_prompt_rows(&inputs, 2, None, Some(&[1, 1]), &[1, 1, 0]).unwrap();
        let get = |n: &str| &out.iter().find(|(k, _)| k == n).unwrap().1;
        assert_eq!(rows_of(get("pixel_values_videos")), vec![4, 5, 4, 5, 0, 1, 2, 3]);
        assert_eq!(Vec::<f64>::try_from(get("second_per_grid_ts")).unwrap(), vec![1.0, 1.0, 0.5]);
    }
}
