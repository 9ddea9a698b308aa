//! Reward plugins: score completions for online objectives (GRPO).
use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RBox, RResult, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::error::{guard, PluginError, PluginResult};
use crate::Plugin;

/// One completion to score.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardInput {
    /// The prompt as rendered text.
    pub prompt: String,
    /// The generated completion.
    pub completion: String,
    /// The whole canonical sample as JSON (reference answers live in its `extra`).
    pub sample_json: String,
}

/// A reward function configured for a run.
pub trait Reward: Send + 'static {
    /// One finite score per input, in order.
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>>;
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiRewardInput {
    pub prompt: RString,
    pub completion: RString,
    pub sample_json: RString,
}

pub(crate) fn inputs_to_ffi(v: &[RewardInput]) -> RVec<FfiRewardInput> {
    v.iter()
        .map(|i| FfiRewardInput {
            prompt: i.prompt.as_str().into(),
            completion: i.completion.as_str().into(),
            sample_json: i.sample_json.as_str().into(),
        })
        .collect()
}

pub(crate) fn inputs_from_ffi(v: RVec<FfiRewardInput>) -> Vec<RewardInput> {
    v.into_iter()
        .map(|i| RewardInput {
            prompt: i.prompt.into_string(),
            completion: i.completion.into_string(),
            sample_json: i.sample_json.into_string(),
        })
        .collect()
}

#[sabi_trait]
pub trait FfiReward: Send {
    #[sabi(last_prefix_field)]
    fn score(&self, inputs: RVec<FfiRewardInput>) -> RResult<RVec<f64>, PluginError>;
}

pub type RewardBox = FfiReward_TO<'static, RBox<()>>;

struct RewardBridge<T>(T);

impl<T: Reward> FfiReward for RewardBridge<T> {
    fn score(&self, inputs: RVec<FfiRewardInput>) -> RResult<RVec<f64>, PluginError> {
        guard(|| self.0.score(&inputs_from_ffi(inputs)).map(RVec::from))
    }
}

/// Plugin side of `export_plugin!`.
pub fn create<T: Plugin + Reward>(config_json: RStr<'_>) -> RResult<RewardBox, PluginError> {
    guard(|| {
        let r = T::from_config(config_json.as_str())
            .map_err(|e| e.context(format!("plugin `{}`", T::NAME)))?;
        Ok(FfiReward_TO::from_value(RewardBridge(r), TD_Opaque))
    })
}

/// Host side: a reward living in a plugin. Checks the plugin's answer: one finite score per
/// input, or an error saying what came back.
pub struct RewardHandle(pub RewardBox);

impl Reward for RewardHandle {
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        let scores = self.0.score(inputs_to_ffi(inputs)).into_result()?.into_vec();
        if scores.len() != inputs.len() {
            return Err(PluginError::invalid(format!(
                "reward returned {} scores for {} completions",
                scores.len(),
                inputs.len()
            )));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(PluginError::invalid(format!(
                "reward returned a non-finite score ({}) for completion {i}",
                scores[i]
            )));
        }
        Ok(scores)
    }
}
