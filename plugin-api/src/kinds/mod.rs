//! One module per plugin kind. Each holds, in this order:
//! the plain Rust trait(s) a plugin (or the host, for callbacks) implements; the
//! `#[sabi_trait]` FFI trait(s); the bridge that turns an implementation into an FFI object
//! (every call guarded against panics); and the handle that turns an FFI object back into an
//! implementation of the Rust trait.
use abi_stable::std_types::{RString, RVec};
use abi_stable::StableAbi;
use tch::Tensor;

use crate::tensor::OwnedTensor;

pub mod adapter;
pub mod dataset;
pub mod memory;
pub mod objective;
pub mod quantizer;
pub mod reward;

/// A trainable tensor and how the optimizer treats it.
#[derive(Debug)]
pub struct TrainParam {
    /// Unique within the run (the host prefixes the module path).
    pub name: String,
    /// The parameter itself (a shallow clone: updates are seen by its owner).
    pub tensor: Tensor,
    /// Multiplies the learning rate (LoRA+ gives B a larger one).
    pub lr_scale: f64,
    /// Multiplies the configured weight decay (0 for biases and norms).
    pub weight_decay_scale: f64,
}

impl TrainParam {
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        Self { name: name.into(), tensor, lr_scale: 1.0, weight_decay_scale: 1.0 }
    }
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiTrainParam {
    pub name: RString,
    pub tensor: OwnedTensor,
    pub lr_scale: f64,
    pub weight_decay_scale: f64,
}

pub(crate) fn params_to_ffi(v: Vec<TrainParam>) -> RVec<FfiTrainParam> {
    v.into_iter()
        .map(|p| FfiTrainParam {
            name: p.name.into(),
            tensor: OwnedTensor::new(p.tensor),
            lr_scale: p.lr_scale,
            weight_decay_scale: p.weight_decay_scale,
        })
        .collect()
}

pub(crate) fn params_from_ffi(v: RVec<FfiTrainParam>) -> Vec<TrainParam> {
    v.into_iter()
        .map(|p| TrainParam {
            name: p.name.into_string(),
            tensor: p.tensor.into_tensor(),
            lr_scale: p.lr_scale,
            weight_decay_scale: p.weight_decay_scale,
        })
        .collect()
}

pub(crate) fn strings_to_ffi(v: Vec<String>) -> RVec<RString> {
    v.into_iter().map(RString::from).collect()
}

pub(crate) fn strings_from_ffi(v: RVec<RString>) -> Vec<String> {
    v.into_iter().map(RString::into_string).collect()
}
