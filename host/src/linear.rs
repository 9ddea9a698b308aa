//! The host's frozen linear layer: the one type every linear layer of a model goes through,
//! so that adapter and quantizer plugins can wrap it.
//!
//! A [`FrozenLinear`] is its frozen base ([`LinearBase`], `y = x Wᵀ + b`) plus adapter layers
//! from plugins, keyed by adapter name. Each forward pass says which adapter runs
//! ([`LinearMode`]): one name for the whole model (a layer that has no adapter of that name
//! runs its base), or none (the base model alone: DPO's reference model). Adapters are handed
//! the [`LinearBase`], never the `FrozenLinear`, so an adapter cannot recurse into itself.
//!
//! An adapter may instead keep a trainable full copy of the layer (peft's `modules_to_save`):
//! while that adapter runs, the layer is `x W'ᵀ + b'` with the copy's weight and bias; the
//! frozen base stays for every other pass.
use anyhow::{Context, Result};
use ferrotune_plugin_api::{AdapterLayer, BaseLinear, PluginResult, QuantizedWeight, Quantizer};
use tch::{TchError, Tensor};

/// The frozen base of a linear layer: `y = x Wᵀ + b` with a weight `[out, in]`.
///
/// The weight is dense, or stored packed by a quantizer plugin (`quantized`, QLoRA): then
/// `weight` is only a placeholder with W's shape, dtype and device and no storage (an
/// expanded zero), `forward` runs the quantizer's `linear`, and [`LinearBase::dense_weight`]
/// (what adapters get as `BaseLinear::weight`) dequantizes.
pub struct LinearBase {
    /// The checkpoint path (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// The dense weight; a placeholder when `quantized` holds it (see the type's docs).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The weight as a quantizer plugin stores it.
    pub quantized: Option<Box<dyn QuantizedWeight>>,
}

impl LinearBase {
    /// `x Wᵀ + b` over the last dimension of `x`; a shape mismatch is an error, not a panic.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.quantized {
            Some(q) => {
                let y = q.linear(x).map_err(|e| TchError::Torch(format!("quantized weight of `{}`: {e}", self.name)))?;
                match &self.bias {
                    Some(b) => y.f_add(b),
                    None => Ok(y),
                }
            }
            None => x.f_linear(&self.weight, self.bias.as_ref()),
        }
    }

    /// The dense weight `[out, in]` in the layer's dtype (dequantized when stored quantized).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.quantized {
            Some(q) => Ok(q.dequantize(self.weight.kind()).with_context(|| format!("dequantizing `{}`", self.name))?),
            None => Ok(self.weight.shallow_clone()),
        }
    }

    /// Stores the weight through `quantizer` and drops the dense tensor. Returns the packed
    /// bytes.
    pub fn quantize_with(&mut self, quantizer: &dyn Quantizer) -> Result<u64> {
        let dense = self.dense_weight()?;
        let q = quantizer.quantize(&self.name, &dense).with_context(|| format!("quantizing `{}`", self.name))?;
        let bytes = q.storage_bytes().with_context(|| format!("size of quantized `{}`", self.name))?;
        let placeholder = Tensor::f_zeros([], (dense.kind(), dense.device()))?.f_expand(dense.size(), false)?;
        self.weight = placeholder;
        self.quantized = Some(q);
        Ok(bytes)
    }

    /// Makes a quantized weight dense again (its dequantized values); a dense one is left.
    pub fn dequantize_in_place(&mut self) -> Result<()> {
        if self.quantized.is_some() {
            self.weight = self.dense_weight()?.set_requires_grad(false);
            self.quantized = None;
        }
        Ok(())
    }

    /// Input width (`in_features`).
    pub fn in_features(&self) -> i64 {
        self.weight.size().get(1).copied().unwrap_or(0)
    }

    /// Output width (`out_features`).
    pub fn out_features(&self) -> i64 {
        self.weight.size().first().copied().unwrap_or(0)
    }
}

impl BaseLinear for LinearBase {
    fn name(&self) -> PluginResult<String> {
        Ok(self.name.clone())
    }
    fn shape(&self) -> PluginResult<(i64, i64)> {
        Ok(self.weight.size2()?)
    }
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        Ok(LinearBase::forward(self, x)?)
    }
    fn weight(&self) -> PluginResult<Tensor> {
        self.dense_weight().map_err(|e| ferrotune_plugin_api::PluginError::runtime(format!("{e:#}")))
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        Ok(self.bias.as_ref().map(Tensor::shallow_clone))
    }
}

/// How the linear layers run in one forward pass (the same for every layer of the model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearMode<'a> {
    /// The adapter to run: a layer holding an adapter of this name runs it, the others run
    /// their base. `None`: every layer runs its base (adapters disabled).
    pub adapter: Option<&'a str>,
    /// Training: adapter dropout is on.
    pub train: bool,
    /// One adapter per batch row (dim 0 of the input), for mixed batches (`serve`): the base
    /// output is computed once for the whole batch, then each adapter adds its part to its
    /// own rows. Overrides `adapter` in the linear layers (the embedding runs its base); only
    /// for adapters whose plugin declares `mixed_batch` and that keep no full copies.
    pub rows: Option<&'a [Option<&'a str>]>,
}

impl LinearMode<'_> {
    /// Base weights only, evaluation.
    pub const BASE: LinearMode<'static> = LinearMode { adapter: None, train: false, rows: None };
}

/// The base layer as an adapter of some rows of a batch sees it: its `forward` returns those
/// rows of the base output computed once for the whole batch (the adapter calls it with
/// exactly those rows); weight, bias and shape are the real base's.
struct RowsOfBase<'a> {
    base: &'a LinearBase,
    rows: Tensor,
}

impl BaseLinear for RowsOfBase<'_> {
    fn name(&self) -> PluginResult<String> {
        BaseLinear::name(self.base)
    }
    fn shape(&self) -> PluginResult<(i64, i64)> {
        BaseLinear::shape(self.base)
    }
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        let (want, have) = (x.size(), self.rows.size());
        if want.first() != have.first() || want[..want.len() - 1] != have[..have.len() - 1] {
            return Err(ferrotune_plugin_api::PluginError::invalid(format!(
                "mixed batch: the adapter asked the base of `{}` for input {want:?}, but the precomputed rows are {have:?}",
                self.base.name
            )));
        }
        Ok(self.rows.shallow_clone())
    }
    fn weight(&self) -> PluginResult<Tensor> {
        BaseLinear::weight(self.base)
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        BaseLinear::bias(self.base)
    }
}

/// A frozen linear layer and the adapters that wrap it (see the module docs).
pub struct FrozenLinear {
    base: LinearBase,
    adapters: Vec<(String, Box<dyn AdapterLayer>)>,
    /// Trainable full copies of the layer (`modules_to_save`), by adapter name.
    copies: Vec<(String, LinearBase)>,
}

impl std::ops::Deref for FrozenLinear {
    type Target = LinearBase;
    fn deref(&self) -> &LinearBase {
        &self.base
    }
}

impl FrozenLinear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        let base = LinearBase { name: name.into(), weight: weight.set_requires_grad(false), bias: bias.map(|b| b.set_requires_grad(false)), quantized: None };
        Self { base, adapters: Vec::new(), copies: Vec::new() }
    }

    /// The frozen base (what adapters receive as their [`BaseLinear`]).
    pub fn base(&self) -> &LinearBase {
        &self.base
    }

    /// `x Wᵀ + b`, through the adapter `mode` selects when this layer has one (or with that
    /// adapter's copy of the layer when it keeps one).
    pub fn forward(&self, x: &Tensor, mode: LinearMode<'_>) -> Result<Tensor> {
        if let Some(rows) = mode.rows {
            return self.forward_rows(x, rows, mode.train);
        }
        if let Some((name, copy)) = mode.adapter.and_then(|name| self.copy(name).map(|c| (name, c))) {
            return copy.forward(x).with_context(|| format!("adapter `{name}`'s copy of `{}` (modules_to_save)", self.base.name));
        }
        match mode.adapter.and_then(|name| self.adapter(name).map(|a| (name, a))) {
            Some((name, adapter)) => adapter
                .forward(x, &self.base, mode.train)
                .with_context(|| format!("adapter `{name}` of `{}`", self.base.name)),
            None => Ok(self.base.forward(x).with_context(|| format!("linear layer `{}`", self.base.name))?),
        }
    }

    /// A mixed batch: the base once for all rows, then each adapter this layer holds runs on
    /// its rows (gathered, the base output handed over as [`RowsOfBase`]) and its result
    /// replaces those rows. Rows whose adapter this layer lacks keep the base output.
    fn forward_rows(&self, x: &Tensor, rows: &[Option<&str>], train: bool) -> Result<Tensor> {
        let batch = x.size().first().copied().unwrap_or(0);
        if batch != rows.len() as i64 {
            anyhow::bail!("linear layer `{}`: {} per-row adapters for an input of {batch} rows", self.base.name, rows.len());
        }
        let mut out = self.base.forward(x).with_context(|| format!("linear layer `{}`", self.base.name))?;
        let mut names: Vec<&str> = rows.iter().flatten().copied().collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            if self.copy(name).is_some() {
                anyhow::bail!("adapter `{name}` keeps a full copy of `{}` (modules_to_save): it cannot share a mixed batch", self.base.name);
            }
            let Some(adapter) = self.adapter(name) else { continue };
            let idx: Vec<i64> = rows.iter().enumerate().filter(|(_, r)| **r == Some(name)).map(|(i, _)| i as i64).collect();
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(x.device())?;
            let base = RowsOfBase { base: &self.base, rows: out.f_index_select(0, &idx)? };
            let y = adapter
                .forward(&x.f_index_select(0, &idx)?, &base, train)
                .with_context(|| format!("adapter `{name}` of `{}` (mixed batch)", self.base.name))?;
            out = out.f_index_copy(0, &idx, &y.f_to_kind(out.kind())?)?;
        }
        Ok(out)
    }

    /// This layer's adapter named `name`, if it has one.
    pub fn adapter(&self, name: &str) -> Option<&dyn AdapterLayer> {
        self.adapters.iter().find(|(n, _)| n == name).map(|(_, a)| a.as_ref())
    }

    /// The names of this layer's adapters, in the order they were added.
    pub fn adapter_names(&self) -> impl Iterator<Item = &str> {
        self.adapters.iter().map(|(n, _)| n.as_str())
    }

    /// Adds (or replaces) the adapter `name`.
    pub(crate) fn insert_adapter(&mut self, name: &str, layer: Box<dyn AdapterLayer>) {
        self.remove_adapter(name);
        self.adapters.push((name.to_string(), layer));
    }

    /// Takes the adapter `name` off this layer.
    pub(crate) fn remove_adapter(&mut self, name: &str) -> Option<Box<dyn AdapterLayer>> {
        let i = self.adapters.iter().position(|(n, _)| n == name)?;
        Some(self.adapters.remove(i).1)
    }

    /// Replaces the base weight by a new tensor (never in place: a tied weight stays intact
    /// for its other user, which is how a tied `lm_head` gets untied).
    pub(crate) fn set_base_weight(&mut self, weight: Tensor) {
        self.base.weight = weight.set_requires_grad(false);
        self.base.quantized = None;
    }

    /// The frozen base, mutable (quantizing it).
    pub(crate) fn base_mut(&mut self) -> &mut LinearBase {
        &mut self.base
    }

    /// Adapter `name`'s trainable copy of this layer (`modules_to_save`), if it keeps one.
    pub fn copy(&self, name: &str) -> Option<&LinearBase> {
        self.copies.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Gives adapter `name` a trainable copy of this layer: the base weight and bias copied,
    /// in their dtype and on their device (as peft's `ModulesToSaveWrapper` deep-copies the
    /// module). A tied weight is copied too, so the copy never shares storage.
    pub(crate) fn insert_copy(&mut self, name: &str) -> Result<&LinearBase> {
        let trainable = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach_copy()?.set_requires_grad(true)) };
        let copy = LinearBase {
            name: self.base.name.clone(),
            weight: trainable(&self.base.dense_weight()?)?,
            bias: self.base.bias.as_ref().map(trainable).transpose()?,
            quantized: None,
        };
        self.remove_copy(name);
        self.copies.push((name.to_string(), copy));
        Ok(&self.copies.last().expect("just pushed").1)
    }

    /// Takes adapter `name`'s copy off this layer.
    pub(crate) fn remove_copy(&mut self, name: &str) -> Option<LinearBase> {
        let i = self.copies.iter().position(|(n, _)| n == name)?;
        Some(self.copies.remove(i).1)
    }

    /// Makes adapter `name`'s copy the base (weight and bias) and drops it: the merge of a
    /// `modules_to_save` module. False when the adapter keeps no copy of this layer.
    pub(crate) fn merge_copy(&mut self, name: &str) -> bool {
        let Some(copy) = self.remove_copy(name) else { return false };
        self.base.weight = copy.weight.detach().set_requires_grad(false);
        self.base.quantized = None;
        self.base.bias = copy.bias.map(|b| b.detach().set_requires_grad(false));
        true
    }
}

/// As a [`BaseLinear`], a `FrozenLinear` is its frozen base: its adapters never take part.
impl BaseLinear for FrozenLinear {
    fn name(&self) -> PluginResult<String> {
        self.base.name()
    }
    fn shape(&self) -> PluginResult<(i64, i64)> {
        BaseLinear::shape(&self.base)
    }
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        BaseLinear::forward(&self.base, x)
    }
    fn weight(&self) -> PluginResult<Tensor> {
        BaseLinear::weight(&self.base)
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        BaseLinear::bias(&self.base)
    }
}
