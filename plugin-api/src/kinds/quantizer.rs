//! Quantizer plugins: how a frozen base weight is stored and applied (NF4, int8).
//!
//! The host asks the quantizer to quantize each targeted base weight once; the packed
//! weight then lives in the plugin and the host's base layer calls `linear` (or
//! `dequantize`, for merging and for adapters that need the dense weight).
use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RBox, RResult, RStr, RVec};
use tch::{Kind, Tensor};

use super::{strings_from_ffi, strings_to_ffi};
use crate::error::{guard, PluginError, PluginResult};
use crate::tensor::{named_from_ffi, named_to_ffi, DType, NamedTensor, OwnedTensor, TensorRef};
use crate::Plugin;

/// A quantization scheme configured for a run.
pub trait Quantizer: Send + 'static {
    /// Quantizes the `[out, in]` weight of the layer at `module`.
    fn quantize(&self, module: &str, weight: &Tensor) -> PluginResult<Box<dyn QuantizedWeight>>;
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One stored weight.
pub trait QuantizedWeight: Send {
    /// The dense shape `[out, in]`.
    fn shape(&self) -> PluginResult<Vec<i64>>;
    /// The dense weight in `dtype`.
    fn dequantize(&self, dtype: Kind) -> PluginResult<Tensor>;
    /// `x Wᵀ` (no bias) in `x`'s dtype.
    fn linear(&self, x: &Tensor) -> PluginResult<Tensor>;
    /// The packed tensors, for checkpoints and for measuring.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>>;
    /// Bytes the packed weight occupies.
    fn storage_bytes(&self) -> PluginResult<u64>;
}

#[sabi_trait]
pub trait FfiQuantizer: Send {
    fn quantize(
        &self,
        module: RStr<'_>,
        weight: TensorRef<'_>,
    ) -> RResult<QuantizedWeightBox, PluginError>;
    #[sabi(last_prefix_field)]
    fn capabilities(&self) -> RVec<abi_stable::std_types::RString>;
}

pub type QuantizerBox = FfiQuantizer_TO<'static, RBox<()>>;

#[sabi_trait]
pub trait FfiQuantizedWeight: Send {
    fn shape(&self) -> RResult<RVec<i64>, PluginError>;
    fn dequantize(&self, dtype: DType) -> RResult<OwnedTensor, PluginError>;
    fn linear(&self, x: TensorRef<'_>) -> RResult<OwnedTensor, PluginError>;
    fn state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError>;
    #[sabi(last_prefix_field)]
    fn storage_bytes(&self) -> RResult<u64, PluginError>;
}

pub type QuantizedWeightBox = FfiQuantizedWeight_TO<'static, RBox<()>>;

struct QuantizerBridge<T>(T);

impl<T: Quantizer> FfiQuantizer for QuantizerBridge<T> {
    fn quantize(
        &self,
        module: RStr<'_>,
        weight: TensorRef<'_>,
    ) -> RResult<QuantizedWeightBox, PluginError> {
        guard(|| {
            let q = self.0.quantize(module.as_str(), &weight.borrow())?;
            Ok(FfiQuantizedWeight_TO::from_value(QuantizedWeightBridge(q), TD_Opaque))
        })
    }
    fn capabilities(&self) -> RVec<abi_stable::std_types::RString> {
        guard(|| Ok(strings_to_ffi(self.0.capabilities()))).unwrap_or_default()
    }
}

struct QuantizedWeightBridge(Box<dyn QuantizedWeight>);

impl FfiQuantizedWeight for QuantizedWeightBridge {
    fn shape(&self) -> RResult<RVec<i64>, PluginError> {
        guard(|| self.0.shape().map(RVec::from))
    }
    fn dequantize(&self, dtype: DType) -> RResult<OwnedTensor, PluginError> {
        guard(|| self.0.dequantize(dtype.to_kind()?).map(OwnedTensor::new))
    }
    fn linear(&self, x: TensorRef<'_>) -> RResult<OwnedTensor, PluginError> {
        guard(|| self.0.linear(&x.borrow()).map(OwnedTensor::new))
    }
    fn state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError> {
        guard(|| self.0.state_dict().map(named_to_ffi))
    }
    fn storage_bytes(&self) -> RResult<u64, PluginError> {
        guard(|| self.0.storage_bytes())
    }
}

/// Plugin side of `export_plugin!`.
pub fn create<T: Plugin + Quantizer>(config_json: RStr<'_>) -> RResult<QuantizerBox, PluginError> {
    guard(|| {
        let q = T::from_config(config_json.as_str())
            .map_err(|e| e.context(format!("plugin `{}`", T::NAME)))?;
        Ok(FfiQuantizer_TO::from_value(QuantizerBridge(q), TD_Opaque))
    })
}

/// Host side: a quantizer living in a plugin.
pub struct QuantizerHandle(pub QuantizerBox);

impl Quantizer for QuantizerHandle {
    fn quantize(&self, module: &str, weight: &Tensor) -> PluginResult<Box<dyn QuantizedWeight>> {
        let q = self.0.quantize(module.into(), TensorRef::new(weight)).into_result()?;
        Ok(Box::new(QuantizedWeightHandle(q)))
    }
    fn capabilities(&self) -> Vec<String> {
        strings_from_ffi(self.0.capabilities())
    }
}

/// Host side: a weight stored by a quantizer plugin.
pub struct QuantizedWeightHandle(pub QuantizedWeightBox);

impl QuantizedWeight for QuantizedWeightHandle {
    fn shape(&self) -> PluginResult<Vec<i64>> {
        self.0.shape().into_result().map(RVec::into_vec)
    }
    fn dequantize(&self, dtype: Kind) -> PluginResult<Tensor> {
        self.0.dequantize(DType::from_kind(dtype)).into_result().map(OwnedTensor::into_tensor)
    }
    fn linear(&self, x: &Tensor) -> PluginResult<Tensor> {
        self.0.linear(TensorRef::new(x)).into_result().map(OwnedTensor::into_tensor)
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.0.state_dict().into_result().map(named_from_ffi)
    }
    fn storage_bytes(&self) -> PluginResult<u64> {
        self.0.storage_bytes().into_result()
    }
}
