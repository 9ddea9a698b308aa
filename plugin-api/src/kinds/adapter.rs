//! Adapter plugins: how a frozen base layer is adapted (LoRA and its variants, IA3, …).
//!
//! The host owns the model and its base layers. For every linear layer the adapter method
//! [`AdapterMethod::targets`], the host calls [`AdapterMethod::adapt_linear`] and from then
//! on runs the returned [`AdapterLayer`]'s `forward` in place of the base layer, handing it
//! the base layer as a [`BaseLinear`] callback (dequantized when a quantizer stores it).
use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString, RVec, Tuple3};
use abi_stable::StableAbi;
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

/// The model an adapter method is attached to, handed to [`AdapterMethod::begin`] before any
/// layer is adapted. Sizes are the decoder's (the language model of a vision-language model).
#[derive(Debug)]
pub struct ModelInfo {
    /// The decoder's `config.json` (a vision-language model's `text_config`), as JSON text.
    pub config_json: String,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    /// Every linear layer the method targets (`targets()` true, not in `modules_to_save`):
    /// checkpoint path, `out_features`, `in_features`, in model order.
    pub linears: Vec<(String, i64, i64)>,
    /// The frozen input embedding `[vocab, hidden]` (a detached shallow clone): prompt tuning's
    /// TEXT and SAMPLE_VOCAB initialisations read it.
    pub word_embeddings: Tensor,
}

/// What a prompt-learning method adds to the model's input ([`AdapterMethod::prompt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// `num_virtual_tokens` embeddings placed before the input embeddings (prompt tuning,
    /// P-tuning): [`AdapterMethod::prompt_forward`] gives `[n, hidden_size]`.
    VirtualTokens,
    /// Keys and values of `num_virtual_tokens` positions placed before every layer's own
    /// (prefix tuning): [`AdapterMethod::prompt_forward`] gives `[n, num_layers · 2 ·
    /// num_key_value_heads · head_dim]`, peft's layout (viewed as `[n, num_layers · 2, kv_heads,
    /// head_dim]`, layer `l`'s keys at `2l` and values at `2l + 1`).
    KvPrefix,
}

/// A prompt-learning method's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptSpec {
    pub kind: PromptKind,
    pub num_virtual_tokens: i64,
}

/// A plain dense linear layer `y = x Wᵀ + b` as a [`BaseLinear`] (named `layer`): what an
/// adapter plugin's own unit tests hand its layers, since a plugin never uses the host.
pub struct DenseLinear {
    /// `[out, in]`.
    pub w: Tensor,
    /// `[out]`.
    pub b: Option<Tensor>,
}

impl BaseLinear for DenseLinear {
    fn name(&self) -> PluginResult<String> {
        Ok("layer".into())
    }
    fn shape(&self) -> PluginResult<(i64, i64)> {
        Ok(self.w.size2()?)
    }
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        Ok(x.f_linear(&self.w, self.b.as_ref())?)
    }
    fn weight(&self) -> PluginResult<Tensor> {
        Ok(self.w.shallow_clone())
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        Ok(self.b.as_ref().map(Tensor::shallow_clone))
    }
}

/// An adapter method configured for a run: decides which layers it adapts and builds the
/// per-layer adapters; it may also hold tensors of its own (shared by its layers, or a
/// prompt-learning method's virtual tokens).
pub trait AdapterMethod: Send + 'static {
    /// Called once when the method is attached, before any `adapt_linear`.
    fn begin(&self, model: &ModelInfo) -> PluginResult<()> {
        let _ = model;
        Ok(())
    }
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
    /// Trainable tensors of the method itself, not of one layer, named by their full key in
    /// `adapter_model.safetensors` (`prompt_embeddings`, `base_model.vera_A`).
    fn root_parameters(&self) -> PluginResult<Vec<TrainParam>> {
        Ok(Vec::new())
    }
    /// The method's own saved tensors (full keys, detached copies), beside its layers'.
    fn root_state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Loads tensors saved by `root_state_dict` (or by peft; the host has checked the keys and
    /// shapes against `root_state_dict`), copying into the live tensors.
    fn load_root_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        match tensors.first() {
            None => Ok(()),
            Some((k, _)) => Err(PluginError::invalid(format!(
                "this adapter method holds no tensor of its own, got `{k}`"
            ))),
        }
    }
    /// A prompt-learning method's shape (`None`: the method adapts linear layers only).
    fn prompt(&self) -> PluginResult<Option<PromptSpec>> {
        Ok(None)
    }
    /// A prompt-learning method's virtual tokens or key/value prefix (see [`PromptKind`]),
    /// one copy for the whole batch; `train` turns dropout on.
    fn prompt_forward(&self, train: bool) -> PluginResult<Tensor> {
        let _ = train;
        Err(PluginError::runtime("this adapter method has no prompt (prompt() is None)"))
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
    /// The bias that, with `merged_weight`, makes a plain linear layer equal this adapted
    /// layer (IA³ scales an output's bias too). Default: the base bias unchanged.
    fn merged_bias(&self, base_bias: Option<&Tensor>) -> PluginResult<Option<Tensor>> {
        Ok(base_bias.map(Tensor::shallow_clone))
    }
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

/// [`ModelInfo`] across the boundary.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiModelInfo {
    pub config_json: RString,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub linears: RVec<Tuple3<RString, i64, i64>>,
    pub word_embeddings: OwnedTensor,
}

/// [`PromptKind::VirtualTokens`] across the boundary.
pub const PROMPT_VIRTUAL_TOKENS: u32 = 0;
/// [`PromptKind::KvPrefix`] across the boundary.
pub const PROMPT_KV_PREFIX: u32 = 1;

/// [`PromptSpec`] across the boundary.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiPromptSpec {
    pub kind: u32,
    pub num_virtual_tokens: i64,
}

impl FfiModelInfo {
    fn new(m: &ModelInfo) -> Self {
        Self {
            config_json: m.config_json.as_str().into(),
            hidden_size: m.hidden_size,
            num_layers: m.num_layers,
            num_attention_heads: m.num_attention_heads,
            num_key_value_heads: m.num_key_value_heads,
            head_dim: m.head_dim,
            vocab_size: m.vocab_size,
            linears: m.linears.iter().map(|(n, o, i)| Tuple3(n.as_str().into(), *o, *i)).collect(),
            word_embeddings: OwnedTensor::new(m.word_embeddings.shallow_clone()),
        }
    }

    fn into_info(self) -> ModelInfo {
        ModelInfo {
            config_json: self.config_json.into_string(),
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            linears: self.linears.into_iter().map(|t| (t.0.into_string(), t.1, t.2)).collect(),
            word_embeddings: self.word_embeddings.into_tensor(),
        }
    }
}

impl FfiPromptSpec {
    fn new(p: PromptSpec) -> Self {
        let kind = match p.kind {
            PromptKind::VirtualTokens => PROMPT_VIRTUAL_TOKENS,
            PromptKind::KvPrefix => PROMPT_KV_PREFIX,
        };
        Self { kind, num_virtual_tokens: p.num_virtual_tokens }
    }

    fn into_spec(self) -> PluginResult<PromptSpec> {
        let kind = match self.kind {
            PROMPT_VIRTUAL_TOKENS => PromptKind::VirtualTokens,
            PROMPT_KV_PREFIX => PromptKind::KvPrefix,
            k => return Err(PluginError::runtime(format!("unknown prompt kind {k}"))),
        };
        Ok(PromptSpec { kind, num_virtual_tokens: self.num_virtual_tokens })
    }
}

#[sabi_trait]
pub trait FfiAdapterMethod: Send {
    fn targets(&self, module: RStr<'_>) -> RResult<bool, PluginError>;
    fn adapt_linear(
        &self,
        module: RStr<'_>,
        base: BaseLinearRef<'_>,
    ) -> RResult<AdapterLayerBox, PluginError>;
    fn peft_config(&self) -> RResult<RString, PluginError>;
    fn capabilities(&self) -> RVec<RString>;
    fn begin(&self, model: FfiModelInfo) -> RResult<(), PluginError>;
    fn root_parameters(&self) -> RResult<RVec<FfiTrainParam>, PluginError>;
    fn root_state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError>;
    fn load_root_state_dict(&self, tensors: RVec<NamedTensor>) -> RResult<(), PluginError>;
    fn prompt(&self) -> RResult<ROption<FfiPromptSpec>, PluginError>;
    #[sabi(last_prefix_field)]
    fn prompt_forward(&self, flags: u32) -> RResult<OwnedTensor, PluginError>;
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
    fn unmerged_weight(&self, merged_weight: TensorRef<'_>) -> RResult<OwnedTensor, PluginError>;
    #[sabi(last_prefix_field)]
    fn merged_bias(
        &self,
        base_bias: ROption<TensorRef<'_>>,
    ) -> RResult<ROption<OwnedTensor>, PluginError>;
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
    fn begin(&self, model: FfiModelInfo) -> RResult<(), PluginError> {
        guard(|| self.0.begin(&model.into_info()))
    }
    fn root_parameters(&self) -> RResult<RVec<FfiTrainParam>, PluginError> {
        guard(|| self.0.root_parameters().map(params_to_ffi))
    }
    fn root_state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError> {
        guard(|| self.0.root_state_dict().map(named_to_ffi))
    }
    fn load_root_state_dict(&self, tensors: RVec<NamedTensor>) -> RResult<(), PluginError> {
        guard(|| self.0.load_root_state_dict(named_from_ffi(tensors)))
    }
    fn prompt(&self) -> RResult<ROption<FfiPromptSpec>, PluginError> {
        guard(|| self.0.prompt().map(|p| p.map(FfiPromptSpec::new).into()))
    }
    fn prompt_forward(&self, flags: u32) -> RResult<OwnedTensor, PluginError> {
        guard(|| self.0.prompt_forward(flags & FORWARD_TRAIN != 0).map(OwnedTensor::new))
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
    fn merged_bias(
        &self,
        base_bias: ROption<TensorRef<'_>>,
    ) -> RResult<ROption<OwnedTensor>, PluginError> {
        guard(|| {
            let bias = base_bias.into_option().map(|b| b.borrow());
            self.0.merged_bias(bias.as_deref()).map(|b| b.map(OwnedTensor::new).into())
        })
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
    fn begin(&self, model: &ModelInfo) -> PluginResult<()> {
        self.0.begin(FfiModelInfo::new(model)).into_result()
    }
    fn root_parameters(&self) -> PluginResult<Vec<TrainParam>> {
        self.0.root_parameters().into_result().map(params_from_ffi)
    }
    fn root_state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.0.root_state_dict().into_result().map(named_from_ffi)
    }
    fn load_root_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.0.load_root_state_dict(named_to_ffi(tensors)).into_result()
    }
    fn prompt(&self) -> PluginResult<Option<PromptSpec>> {
        self.0.prompt().into_result()?.into_option().map(FfiPromptSpec::into_spec).transpose()
    }
    fn prompt_forward(&self, train: bool) -> PluginResult<Tensor> {
        let flags = if train { FORWARD_TRAIN } else { 0 };
        self.0.prompt_forward(flags).into_result().map(OwnedTensor::into_tensor)
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
    fn merged_bias(&self, base_bias: Option<&Tensor>) -> PluginResult<Option<Tensor>> {
        let bias = base_bias.map(TensorRef::new);
        self.0
            .merged_bias(bias.into())
            .into_result()
            .map(|b| b.into_option().map(OwnedTensor::into_tensor))
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
