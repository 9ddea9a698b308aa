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
    /// `options_json` holds sampling options (`max_new_tokens`, `temperature`, …).
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>>;
    /// Token ids to text.
    fn decode(&self, ids: &[i64]) -> PluginResult<String>;
    /// Scores completions with every reward plugin the run configured.
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>>;
}

/// A training objective configured for a run.
pub trait Objective: Send + 'static {
    /// What the objective needs from the host: `reference`, `generation`, `rewards`,
    /// `preference_pairs`, `kto_labels`.
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
