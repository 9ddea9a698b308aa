//! Adapter plugins: how a frozen base layer is adapted (LoRA and its variants, IA3, …).
//!
//! The host owns the model and its base layers. For every linear layer the adapter method
//! [`AdapterMethod::targets`], the host calls [`AdapterMethod::adapt_linear`] and from then
//! on runs the returned [`AdapterLayer`]'s `forward` in place of the base layer, handing it
//! the base layer as a [`BaseLinear`] callback (dequantized when a quantizer stores it).
use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString, RVec};
use tch::Tensor;

use super::{
    params_from_ffi, params_to_ffi, strings_from_ffi, strings_to_ffi, FfiTrainParam, TrainParam,
};
use crate::error::{guard, PluginError, PluginResult};
use crate::tensor::{named_from_ffi, named_to_ffi, NamedTensor, OwnedTensor, TensorRef};
use crate::Plugin;

/// peft's rule for a module name in `target_modules` or `modules_to_save`: the layer's full
/// checkpoint path equals it or ends with `.` + it (`q_proj` matches
/// `model.layers.0.self_attn.q_proj`, not `model.layers.0.self_attn.qq_proj`).
pub fn module_name_matches(module: &str, name: &str) -> bool {
    module == name || module.strip_suffix(name).is_some_and(|head| head.ends_with('.'))
}

// ---------------------------------------------------------------- Rust traits

/// The frozen base linear layer, implemented by the host (`y = x Wᵀ + b`).
pub trait BaseLinear {
    /// The layer's checkpoint path, e.g. `model.layers.0.self_attn.q_proj`.
    fn name(&self) -> PluginResult<String>;
    /// `(out_features, in_features)`.
    fn shape(&self) -> PluginResult<(i64, i64)>;
    /// The base layer's own forward (quantized or not), bias included.
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor>;
    /// The dense weight `[out, in]` in the compute dtype (dequantized if stored quantized).
    fn weight(&self) -> PluginResult<Tensor>;
    fn bias(&self) -> PluginResult<Option<Tensor>>;
}

/// An adapter method configured for a run: decides which layers it adapts and builds the
/// per-layer adapters.
pub trait AdapterMethod: Send + 'static {
    /// Whether the layer at this checkpoint path is adapted (`target_modules`).
    fn targets(&self, module: &str) -> PluginResult<bool>;
    /// Builds the adapter for one targeted linear layer. Trainable tensors are created on
    /// the base weight's device.
    fn adapt_linear(
        &self,
        module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>>;
    /// The `adapter_config.json` a PEFT directory carries for this method.
    fn peft_config(&self) -> PluginResult<String>;
    /// Capability tags, e.g. `mixed_batch` (rows of one batch may use different adapters).
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The adapter of one layer.
pub trait AdapterLayer: Send {
    /// The adapted forward; the adapter calls `base.forward` itself where it needs it.
    fn forward(&self, x: &Tensor, base: &dyn BaseLinear, train: bool) -> PluginResult<Tensor>;
    /// Trainable tensors (shallow clones), names relative to the layer (`lora_A.weight`).
    fn parameters(&self) -> PluginResult<Vec<TrainParam>>;
    /// The state saved in a PEFT directory, names relative to the layer, peft's key names.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>>;
    /// Loads a state saved by `state_dict` (or by peft), copying into the live tensors.
    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()>;
    /// The weight that makes a plain linear layer equal this adapted layer.
    fn merged_weight(&self, base_weight: &Tensor) -> PluginResult<Tensor>;
    /// Inverse of `merged_weight`.
    fn unmerged_weight(&self, merged_weight: &Tensor) -> PluginResult<Tensor>;
}

// ---------------------------------------------------------------- FFI traits

/// Forward flags for adapter layers: bit 0 = training (dropout on).
pub const FORWARD_TRAIN: u32 = 1;

#[sabi_trait]
pub trait FfiBaseLinear {
    fn name(&self) -> RResult<RString, PluginError>;
    fn shape(&self) -> RResult<abi_stable::std_types::Tuple2<i64, i64>, PluginError>;
    fn forward(&self, x: TensorRef<'_>) -> RResult<OwnedTensor, PluginError>;
    fn weight(&self) -> RResult<OwnedTensor, PluginError>;
    #[sabi(last_prefix_field)]
    fn bias(&self) -> RResult<ROption<OwnedTensor>, PluginError>;
}

pub type BaseLinearRef<'a> = FfiBaseLinear_TO<'a, RRef<'a, ()>>;

#[sabi_trait]
pub trait FfiAdapterMethod: Send {
    fn targets(&self, module: RStr<'_>) -> RResult<bool, PluginError>;
    fn adapt_linear(
        &self,
        module: RStr<'_>,
        base: BaseLinearRef<'_>,
    ) -> RResult<AdapterLayerBox, PluginError>;
    fn peft_config(&self) -> RResult<RString, PluginError>;
    #[sabi(last_prefix_field)]
    fn capabilities(&self) -> RVec<RString>;
}

pub type AdapterMethodBox = FfiAdapterMethod_TO<'static, RBox<()>>;

#[sabi_trait]
pub trait FfiAdapterLayer: Send {
    fn forward(
        &self,
        x: TensorRef<'_>,
        base: BaseLinearRef<'_>,
        flags: u32,
    ) -> RResult<OwnedTensor, PluginError>;
    fn parameters(&self) -> RResult<RVec<FfiTrainParam>, PluginError>;
    fn state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError>;
    fn load_state_dict(&self, tensors: RVec<NamedTensor>) -> RResult<(), PluginError>;
    fn merged_weight(&self, base_weight: TensorRef<'_>) -> RResult<OwnedTensor, PluginError>;
    #[sabi(last_prefix_field)]
    fn unmerged_weight(&self, merged_weight: TensorRef<'_>) -> RResult<OwnedTensor, PluginError>;
}

pub type AdapterLayerBox = FfiAdapterLayer_TO<'static, RBox<()>>;

// ---------------------------------------------------------------- bridges (impl -> FFI)

/// Host side: exposes a host base layer to a plugin for the duration of a call.
pub struct BaseLinearBridge<'a>(pub &'a dyn BaseLinear);

impl FfiBaseLinear for BaseLinearBridge<'_> {
    fn name(&self) -> RResult<RString, PluginError> {
        guard(|| self.0.name().map(RString::from))
    }
    fn shape(&self) -> RResult<abi_stable::std_types::Tuple2<i64, i64>, PluginError> {
        guard(|| self.0.shape().map(|(o, i)| abi_stable::std_types::Tuple2(o, i)))
    }
    fn forward(&self, x: TensorRef<'_>) -> RResult<OwnedTensor, PluginError> {
        guard(|| self.0.forward(&x.borrow()).map(OwnedTensor::new))
    }
    fn weight(&self) -> RResult<OwnedTensor, PluginError> {
        guard(|| self.0.weight().map(OwnedTensor::new))
    }
    fn bias(&self) -> RResult<ROption<OwnedTensor>, PluginError> {
        guard(|| self.0.bias().map(|b| b.map(OwnedTensor::new).into()))
    }
}

/// Runs `f` with `base` exposed as an FFI object.
pub fn with_base_linear<R>(base: &dyn BaseLinear, f: impl FnOnce(BaseLinearRef<'_>) -> R) -> R {
    let bridge = BaseLinearBridge(base);
    f(FfiBaseLinear_TO::from_ptr(&bridge, TD_Opaque))
}

struct AdapterMethodBridge<T>(T);

impl<T: AdapterMethod> FfiAdapterMethod for AdapterMethodBridge<T> {
    fn targets(&self, module: RStr<'_>) -> RResult<bool, PluginError> {
        guard(|| self.0.targets(module.as_str()))
    }
    fn adapt_linear(
        &self,
        module: RStr<'_>,
        base: BaseLinearRef<'_>,
    ) -> RResult<AdapterLayerBox, PluginError> {
        guard(|| {
            let base = BaseLinearHandle(base);
            let layer = self.0.adapt_linear(module.as_str(), &base)?;
            Ok(FfiAdapterLayer_TO::from_value(AdapterLayerBridge(layer), TD_Opaque))
        })
    }
    fn peft_config(&self) -> RResult<RString, PluginError> {
        guard(|| self.0.peft_config().map(RString::from))
    }
    fn capabilities(&self) -> RVec<RString> {
        guard(|| Ok(strings_to_ffi(self.0.capabilities()))).unwrap_or_default()
    }
}

struct AdapterLayerBridge(Box<dyn AdapterLayer>);

impl FfiAdapterLayer for AdapterLayerBridge {
    fn forward(
        &self,
        x: TensorRef<'_>,
        base: BaseLinearRef<'_>,
        flags: u32,
    ) -> RResult<OwnedTensor, PluginError> {
        guard(|| {
            let base = BaseLinearHandle(base);
            self.0.forward(&x.borrow(), &base, flags & FORWARD_TRAIN != 0).map(OwnedTensor::new)
        })
    }
    fn parameters(&self) -> RResult<RVec<FfiTrainParam>, PluginError> {
        guard(|| self.0.parameters().map(params_to_ffi))
    }
    fn state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError> {
        guard(|| self.0.state_dict().map(named_to_ffi))
    }
    fn load_state_dict(&self, tensors: RVec<NamedTensor>) -> RResult<(), PluginError> {
        guard(|| self.0.load_state_dict(named_from_ffi(tensors)))
    }
    fn merged_weight(&self, base_weight: TensorRef<'_>) -> RResult<OwnedTensor, PluginError> {
        guard(|| self.0.merged_weight(&base_weight.borrow()).map(OwnedTensor::new))
    }
    fn unmerged_weight(&self, merged_weight: TensorRef<'_>) -> RResult<OwnedTensor, PluginError> {
        guard(|| self.0.unmerged_weight(&merged_weight.borrow()).map(OwnedTensor::new))
    }
}

/// Plugin side of `export_plugin!`: builds the FFI object for adapter method `T`.
pub fn create<T: Plugin + AdapterMethod>(
    config_json: RStr<'_>,
) -> RResult<AdapterMethodBox, PluginError> {
    guard(|| {
        let method = T::from_config(config_json.as_str())
            .map_err(|e| e.context(format!("plugin `{}`", T::NAME)))?;
        Ok(FfiAdapterMethod_TO::from_value(AdapterMethodBridge(method), TD_Opaque))
    })
}

// ---------------------------------------------------------------- handles (FFI -> impl)

/// Plugin side: the host's base layer.
pub struct BaseLinearHandle<'a>(pub BaseLinearRef<'a>);

impl BaseLinear for BaseLinearHandle<'_> {
    fn name(&self) -> PluginResult<String> {
        self.0.name().into_result().map(RString::into_string)
    }
    fn shape(&self) -> PluginResult<(i64, i64)> {
        self.0.shape().into_result().map(|t| (t.0, t.1))
    }
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        self.0.forward(TensorRef::new(x)).into_result().map(OwnedTensor::into_tensor)
    }
    fn weight(&self) -> PluginResult<Tensor> {
        self.0.weight().into_result().map(OwnedTensor::into_tensor)
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        self.0.bias().into_result().map(|b| b.into_option().map(OwnedTensor::into_tensor))
    }
}

/// Host side: an adapter method living in a plugin.
pub struct AdapterMethodHandle(pub AdapterMethodBox);

impl AdapterMethod for AdapterMethodHandle {
    fn targets(&self, module: &str) -> PluginResult<bool> {
        self.0.targets(module.into()).into_result()
    }
    fn adapt_linear(
        &self,
        module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>> {
        let layer =
            with_base_linear(base, |b| self.0.adapt_linear(module.into(), b)).into_result()?;
        Ok(Box::new(AdapterLayerHandle(layer)))
    }
    fn peft_config(&self) -> PluginResult<String> {
        self.0.peft_config().into_result().map(RString::into_string)
    }
    fn capabilities(&self) -> Vec<String> {
        strings_from_ffi(self.0.capabilities())
    }
}

/// Host side: one layer's adapter living in a plugin.
pub struct AdapterLayerHandle(pub AdapterLayerBox);

impl AdapterLayer for AdapterLayerHandle {
    fn forward(&self, x: &Tensor, base: &dyn BaseLinear, train: bool) -> PluginResult<Tensor> {
        let flags = if train { FORWARD_TRAIN } else { 0 };
        with_base_linear(base, |b| self.0.forward(TensorRef::new(x), b, flags))
            .into_result()
            .map(OwnedTensor::into_tensor)
    }
    fn parameters(&self) -> PluginResult<Vec<TrainParam>> {
        self.0.parameters().into_result().map(params_from_ffi)
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.0.state_dict().into_result().map(named_from_ffi)
    }
    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.0.load_state_dict(named_to_ffi(tensors)).into_result()
    }
    fn merged_weight(&self, base_weight: &Tensor) -> PluginResult<Tensor> {
        self.0
            .merged_weight(TensorRef::new(base_weight))
            .into_result()
            .map(OwnedTensor::into_tensor)
    }
    fn unmerged_weight(&self, merged_weight: &Tensor) -> PluginResult<Tensor> {
        self.0
            .unmerged_weight(TensorRef::new(merged_weight))
            .into_result()
            .map(OwnedTensor::into_tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::module_name_matches;

    #[test]
    fn module_names_match_whole_dotted_suffixes() {
        assert!(module_name_matches("lm_head", "lm_head"));
        assert!(module_name_matches("model.embed_tokens", "embed_tokens"));
        assert!(module_name_matches("model.layers.0.self_attn.q_proj", "self_attn.q_proj"));
        assert!(
            !module_name_matches("lm_head", "head"),
            "a suffix starts at a dot (peft's plain endswith would match)"
        );
        assert!(!module_name_matches("model.layers.0.self_attn.qq_proj", "q_proj"));
        assert!(!module_name_matches("q_proj", "self_attn.q_proj"));
    }
}
