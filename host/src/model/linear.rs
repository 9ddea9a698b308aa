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
//!
//! Under ZeRO stage 3 a layer's frozen weight may be sharded ([`FrozenLinear::shard_weight`]):
//! the rank keeps 1/world of the flattened (padded) weight and each forward all-gathers the
//! whole weight through the run's process group, uses it and drops it. `x Wᵀ` would save the
//! gathered `W` for the input gradient until the layer's backward, so when the input requires
//! grad the product runs as an autograd function that gathers `W` again in backward
//! ([`ShardedBase`]): a rank holds one gathered weight at a time, forward or backward.
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrotune_plugin_api::{
    AdapterLayer, BaseLinear, Collectives, PluginResult, QuantizedWeight, Quantizer,
};
use tch::{Device, TchError, Tensor};

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
                let y = q.linear(x).map_err(|e| {
                    TchError::Torch(format!("quantized weight of `{}`: {e}", self.name))
                })?;
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
            Some(q) => Ok(q
                .dequantize(self.weight.kind())
                .with_context(|| format!("dequantizing `{}`", self.name))?),
            None => Ok(self.weight.shallow_clone()),
        }
    }

    /// Stores the weight through `quantizer` and drops the dense tensor. Returns the packed
    /// bytes.
    pub fn quantize_with(&mut self, quantizer: &dyn Quantizer) -> Result<u64> {
        let dense = self.dense_weight()?;
        let q = quantizer
            .quantize(&self.name, &dense)
            .with_context(|| format!("quantizing `{}`", self.name))?;
        let bytes =
            q.storage_bytes().with_context(|| format!("size of quantized `{}`", self.name))?;
        let placeholder =
            Tensor::f_zeros([], (dense.kind(), dense.device()))?.f_expand(dense.size(), false)?;
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
        self.dense_weight()
            .map_err(|e| ferrotune_plugin_api::PluginError::runtime(format!("{e:#}")))
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

/// This rank's share of a sharded frozen weight (ZeRO stage 3; see the module docs).
struct WeightShard {
    /// Elements `rank·len .. (rank+1)·len` of the flattened weight, zero-padded at the end.
    shard: Tensor,
    /// The weight's device (the shard may be offloaded to the CPU).
    device: Device,
    /// Whether the shard was put in CPU memory (`offload_param`).
    offload: bool,
    numel: i64,
    group: Arc<dyn Collectives + Send + Sync>,
}

impl WeightShard {
    /// The whole weight `[out, in]` on its device, gathered from every rank (all ranks must
    /// call this in the same order: every rank runs the same layers).
    fn gather(&self, shape: &[i64]) -> Result<Tensor> {
        let parts = self.group.all_gather(&self.shard)?;
        Ok(Tensor::f_cat(&parts, 0)?
            .f_narrow(0, 0, self.numel)?
            .f_view(shape)?
            .f_to_device(self.device)?)
    }

    /// The same shard (shared storage), for a closure that outlives the borrow.
    fn share(&self) -> WeightShard {
        WeightShard {
            shard: self.shard.shallow_clone(),
            device: self.device,
            offload: self.offload,
            numel: self.numel,
            group: self.group.clone(),
        }
    }
}

/// A sharded base as adapters see it during a forward pass (ZeRO stage 3). Its `forward`
/// gathers the weight for the product and lets it go: in a forward that records gradients,
/// autograd would keep the gathered weight until this layer's backward (`x Wᵀ` saves `W` for
/// the input gradient), so the product then runs as a C++ autograd function
/// ([`crate::model::checkpoint::regather_linear`]) that saves nothing and gathers `W` again in
/// backward for `grad_y W`, as DeepSpeed's stage 3 re-fetches parameters for backward. A rank thus holds at most one
/// gathered layer weight at a time, and every rank makes the same gathers in the same order.
/// `weight()` (DoRA's norm) gathers too, and what an adapter builds from it is the adapter's.
struct ShardedBase<'a> {
    base: &'a LinearBase,
    shard: &'a WeightShard,
}

impl ShardedBase<'_> {
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let shape = self.base.weight.size();
        let context = || format!("linear layer `{}`", self.base.name);
        if !crate::model::checkpoint::grad_enabled() {
            let w = self
                .shard
                .gather(&shape)
                .with_context(|| format!("gathering the sharded weight of `{}`", self.base.name))?;
            return x.f_linear(&w, self.base.bias.as_ref()).with_context(context);
        }
        // Every rank must gather in backward for every layer, whatever its data: an input that
        // does not require grad (frozen embeddings on a rank whose batch has no image, while
        // another's carries the trainable merger's output) becomes a leaf that does, so that
        // no rank skips a backward gather the others make.
        let x = if x.requires_grad() {
            x.shallow_clone()
        } else {
            x.f_detach()?.set_requires_grad(true)
        };
        let (shard, name) = (self.shard.share(), self.base.name.clone());
        let gather = move || {
            shard
                .gather(&shape)
                .with_context(|| format!("gathering the sharded weight of `{name}`"))
        };
        crate::model::checkpoint::regather_linear(&x, self.base.bias.as_ref(), gather)
            .with_context(context)
    }
}

impl BaseLinear for ShardedBase<'_> {
    fn name(&self) -> PluginResult<String> {
        BaseLinear::name(self.base)
    }
    fn shape(&self) -> PluginResult<(i64, i64)> {
        BaseLinear::shape(self.base)
    }
    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        self.linear(x).map_err(|e| ferrotune_plugin_api::PluginError::runtime(format!("{e:#}")))
    }
    fn weight(&self) -> PluginResult<Tensor> {
        self.shard
            .gather(&self.base.weight.size())
            .map_err(|e| ferrotune_plugin_api::PluginError::runtime(format!("{e:#}")))
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        BaseLinear::bias(self.base)
    }
}

/// A frozen linear layer and the adapters that wrap it (see the module docs).
pub struct FrozenLinear {
    base: LinearBase,
    /// Set by [`FrozenLinear::shard_weight`]: `base.weight` is then a zero-strided stand-in
    /// with the right shape and no storage of its own.
    shard: Option<WeightShard>,
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
        let base = LinearBase {
            name: name.into(),
            weight: weight.set_requires_grad(false),
            bias: bias.map(|b| b.set_requires_grad(false)),
            quantized: None,
        };
        Self { base, shard: None, adapters: Vec::new(), copies: Vec::new() }
    }

    /// Keeps only this rank's 1/world of the base weight (flattened, zero-padded to a multiple
    /// of world), in CPU memory when `offload` (a no-op for a model on the CPU); every later
    /// forward gathers the whole weight through `group`, and so do the readers of its values
    /// ([`FrozenLinear::dense_weight`], [`FrozenLinear::with_full_base`]: adapter
    /// initialisations, `modules_to_save` copies, merges); a new base weight
    /// ([`FrozenLinear::set_base_weight`]) is sharded again. With one rank nothing changes.
    pub fn shard_weight(
        &mut self,
        group: Arc<dyn Collectives + Send + Sync>,
        offload: bool,
    ) -> Result<()> {
        let world = group.world_size() as i64;
        // A quantized base is already packed (and small): it stays whole on every rank.
        if world <= 1 || self.shard.is_some() || self.base.quantized.is_some() {
            return Ok(());
        }
        let w = &self.base.weight;
        let (numel, device) = (w.numel() as i64, w.device());
        let len = (numel + world - 1) / world;
        let flat = w.f_flatten(0, -1)?.f_constant_pad_nd([0, len * world - numel])?;
        let shard_device = if offload { Device::Cpu } else { device };
        let shard = flat
            .f_narrow(0, group.rank() as i64 * len, len)?
            .f_to_device(shard_device)?
            .f_contiguous()?
            .f_detach_copy()?;
        let stand_in = Tensor::f_zeros([1, 1], (w.kind(), device))?.f_expand(w.size(), false)?;
        self.base.weight = stand_in;
        self.shard = Some(WeightShard { shard, device, offload, numel, group });
        Ok(())
    }

    /// Whether the base weight is sharded over ranks (ZeRO stage 3).
    pub fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// Puts the whole weight back on this rank (gathered from every rank: all ranks must call
    /// it for the same layers in the same order). A no-op for a weight that is not sharded.
    pub fn unshard(&mut self) -> Result<()> {
        if let Some(gathered) = self.gathered()? {
            self.shard = None;
            self.base.weight = gathered.weight.set_requires_grad(false);
        }
        Ok(())
    }

    /// The dense weight `[out, in]` (gathered when sharded, dequantized when quantized).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match self.gathered()? {
            Some(base) => Ok(base.weight),
            None => self.base.dense_weight(),
        }
    }

    /// Runs `f` on the base with its whole weight: the base itself, or, when sharded, a base
    /// holding the gathered weight for the duration of `f` (what adapters read at attach).
    pub fn with_full_base<R>(&self, f: impl FnOnce(&LinearBase) -> R) -> Result<R> {
        Ok(match self.gathered()? {
            Some(base) => f(&base),
            None => f(&self.base),
        })
    }

    /// Bytes of the base weight (its shard, or its packed form) and bias this rank holds.
    pub fn resident_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let weight = match (&self.shard, &self.base.quantized) {
            (Some(s), _) => bytes(&s.shard),
            // The placeholder has no storage: the packed bytes are what the layer holds.
            (None, Some(q)) => {
                q.storage_bytes().map(|b| b as usize).unwrap_or_else(|_| bytes(&self.base.weight))
            }
            (None, None) => bytes(&self.base.weight),
        };
        weight + self.base.bias.as_ref().map(bytes).unwrap_or(0)
    }

    /// The base for one forward: itself, or, when sharded, a base holding the gathered weight
    /// (dropped when the caller drops it and autograd no longer needs it).
    fn gathered(&self) -> Result<Option<LinearBase>> {
        let Some(s) = &self.shard else { return Ok(None) };
        let weight = s
            .gather(&self.base.weight.size())
            .with_context(|| format!("gathering the sharded weight of `{}`", self.base.name))?;
        Ok(Some(LinearBase {
            name: self.base.name.clone(),
            weight,
            bias: self.base.bias.as_ref().map(Tensor::shallow_clone),
            quantized: None,
        }))
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
        if let Some((name, copy)) = mode.adapter.and_then(|name| self.copy(name).map(|c| (name, c)))
        {
            return copy.forward(x).with_context(|| {
                format!("adapter `{name}`'s copy of `{}` (modules_to_save)", self.base.name)
            });
        }
        let adapter = mode.adapter.and_then(|name| self.adapter(name).map(|a| (name, a)));
        match (&self.shard, adapter) {
            (Some(shard), Some((name, adapter))) => adapter
                .forward(x, &ShardedBase { base: &self.base, shard }, mode.train)
                .with_context(|| format!("adapter `{name}` of `{}`", self.base.name)),
            (Some(shard), None) => ShardedBase { base: &self.base, shard }.linear(x),
            (None, Some((name, adapter))) => adapter
                .forward(x, &self.base, mode.train)
                .with_context(|| format!("adapter `{name}` of `{}`", self.base.name)),
            (None, None) => Ok(self
                .base
                .forward(x)
                .with_context(|| format!("linear layer `{}`", self.base.name))?),
        }
    }

    /// The dense frozen weight and bias that `forward` in `mode` multiplies by, when that is
    /// all it does: no adapter or trainable copy runs in `mode`, the weight is neither
    /// quantized nor sharded, and it takes no gradient. `None` otherwise.
    pub fn plain_weight(&self, mode: LinearMode<'_>) -> Option<(&Tensor, Option<&Tensor>)> {
        let adapted = mode.rows.is_some()
            || mode.adapter.is_some_and(|n| self.adapter(n).is_some() || self.copy(n).is_some());
        let plain = !adapted
            && self.shard.is_none()
            && self.base.quantized.is_none()
            && !self.base.weight.requires_grad();
        plain.then_some((&self.base.weight, self.base.bias.as_ref()))
    }

    /// A mixed batch: the base once for all rows, then each adapter this layer holds runs on
    /// its rows (gathered, the base output handed over as [`RowsOfBase`]) and its result
    /// replaces those rows. Rows whose adapter this layer lacks keep the base output.
    fn forward_rows(&self, x: &Tensor, rows: &[Option<&str>], train: bool) -> Result<Tensor> {
        let batch = x.size().first().copied().unwrap_or(0);
        if batch != rows.len() as i64 {
            anyhow::bail!(
                "linear layer `{}`: {} per-row adapters for an input of {batch} rows",
                self.base.name,
                rows.len()
            );
        }
        let gathered = self.gathered()?;
        let whole = gathered.as_ref().unwrap_or(&self.base);
        let mut out =
            whole.forward(x).with_context(|| format!("linear layer `{}`", self.base.name))?;
        let mut names: Vec<&str> = rows.iter().flatten().copied().collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            if self.copy(name).is_some() {
                anyhow::bail!("adapter `{name}` keeps a full copy of `{}` (modules_to_save): it cannot share a mixed batch", self.base.name);
            }
            let Some(adapter) = self.adapter(name) else { continue };
            let idx: Vec<i64> = rows
                .iter()
                .enumerate()
                .filter(|(_, r)| **r == Some(name))
                .map(|(i, _)| i as i64)
                .collect();
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(x.device())?;
            let base = RowsOfBase { base: whole, rows: out.f_index_select(0, &idx)? };
            let y =
                adapter.forward(&x.f_index_select(0, &idx)?, &base, train).with_context(|| {
                    format!("adapter `{name}` of `{}` (mixed batch)", self.base.name)
                })?;
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
    /// for its other user, which is how a tied `lm_head` gets untied). A sharded layer keeps
    /// only its shard of the new weight.
    pub(crate) fn set_base_weight(&mut self, weight: Tensor) -> Result<()> {
        let shard = self.shard.take();
        self.base.weight = weight.set_requires_grad(false);
        self.base.quantized = None;
        match shard {
            Some(s) => self.shard_weight(s.group, s.offload),
            None => Ok(()),
        }
    }

    /// The frozen base, mutable (quantizing it).
    pub(crate) fn base_mut(&mut self) -> &mut LinearBase {
        &mut self.base
    }

    /// The adapters that keep a trainable copy of this layer (`modules_to_save`).
    pub fn copy_names(&self) -> impl Iterator<Item = &str> {
        self.copies.iter().map(|(n, _)| n.as_str())
    }

    /// Adapter `name`'s trainable copy of this layer (`modules_to_save`), if it keeps one.
    pub fn copy(&self, name: &str) -> Option<&LinearBase> {
        self.copies.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Gives adapter `name` a trainable copy of this layer: the base weight and bias copied,
    /// in their dtype and on their device (as peft's `ModulesToSaveWrapper` deep-copies the
    /// module). A tied weight is copied too, so the copy never shares storage.
    pub(crate) fn insert_copy(&mut self, name: &str) -> Result<&LinearBase> {
        let trainable =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach_copy()?.set_requires_grad(true)) };
        let copy = LinearBase {
            name: self.base.name.clone(),
            weight: trainable(&self.dense_weight()?)?,
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
        self.shard = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_api::ReduceOp;
    use tch::Kind;

    /// Rank `rank` of a 2-rank group whose other rank holds `other` (its shard): all-gather
    /// returns the shards in rank order.
    struct TwoRanks {
        rank: usize,
        other: std::sync::Mutex<Tensor>,
        gathers: std::sync::atomic::AtomicUsize,
    }

    impl Collectives for TwoRanks {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce(&self, _: &Tensor, _: ReduceOp) -> PluginResult<()> {
            unreachable!()
        }
        fn broadcast(&self, _: &Tensor, _: usize) -> PluginResult<()> {
            unreachable!()
        }
        fn all_gather(&self, t: &Tensor) -> PluginResult<Vec<Tensor>> {
            self.gathers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (mine, other) = (t.shallow_clone(), self.other.lock().unwrap().shallow_clone());
            Ok(if self.rank == 0 { vec![mine, other] } else { vec![other, mine] })
        }
        fn reduce_scatter(&self, _: &Tensor, _: &Tensor, _: ReduceOp) -> PluginResult<()> {
            unreachable!()
        }
        fn barrier(&self) -> PluginResult<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sharded_weight_keeps_half_and_gathers_the_whole_for_forward() {
        // 5 × 3 = 15 elements: rank 0 keeps 0..8, rank 1 keeps 8..15 and one padding zero.
        let w = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([5], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 4, 3], (Kind::Float, Device::Cpu));
        let whole = FrozenLinear::new("l", w.copy(), Some(b.copy()));
        let expected = whole.forward(&x, LinearMode::BASE).unwrap();
        let flat = w.flatten(0, -1);
        let shard1 =
            Tensor::cat(&[flat.narrow(0, 8, 7), Tensor::zeros([1], (Kind::Float, Device::Cpu))], 0);
        let mut lin = FrozenLinear::new("l", w.copy(), Some(b.copy()));
        lin.shard_weight(
            Arc::new(TwoRanks { rank: 0, other: shard1.into(), gathers: 0.into() }),
            false,
        )
        .unwrap();
        assert_eq!(
            lin.resident_bytes(),
            (8 + 5) * 4,
            "half the weight (8 of 16 padded elements) and the bias"
        );
        assert_eq!((lin.in_features(), lin.out_features()), (3, 5));
        let got = lin.forward(&x, LinearMode::BASE).unwrap();
        assert_eq!(f64::try_from((got - expected).abs().max()).unwrap(), 0.0);
        // A stand-in of the right shape, with one element of storage.
        assert_eq!(lin.weight.size(), [5, 3]);
        assert_eq!(lin.weight.stride(), [0, 0]);
    }

    /// A 2-rank shard pair of `w` for rank 0: its layer, and rank 1's shard behind the mock.
    fn sharded_rank0(w: &Tensor) -> (FrozenLinear, Arc<TwoRanks>) {
        let flat = w.flatten(0, -1);
        let n = flat.size()[0];
        let len = (n + 1) / 2;
        let shard1 = Tensor::cat(
            &[
                flat.narrow(0, len, n - len),
                Tensor::zeros([2 * len - n], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let group = Arc::new(TwoRanks { rank: 0, other: shard1.into(), gathers: 0.into() });
        let mut lin = FrozenLinear::new("l", w.copy(), None);
        lin.shard_weight(group.clone(), false).unwrap();
        (lin, group)
    }

    #[test]
    fn readers_of_a_sharded_weight_see_the_whole_and_a_new_weight_is_sharded_again() {
        let w = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let (mut lin, group) = sharded_rank0(&w);
        let max_diff = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
        assert_eq!(max_diff(&lin.dense_weight().unwrap(), &w), 0.0, "dense_weight gathers");
        assert_eq!(
            max_diff(&lin.with_full_base(|b| b.weight.copy()).unwrap(), &w),
            0.0,
            "the base adapters see at attach"
        );
        let copy = lin.insert_copy("a").unwrap();
        assert_eq!(max_diff(&copy.weight, &w), 0.0, "modules_to_save copies the gathered weight");
        // A rewritten base (PiSSA's residual) keeps only rank 0's half: rank 1 holds its half.
        let w2 = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let flat2 = w2.flatten(0, -1);
        *group.other.lock().unwrap() = Tensor::cat(
            &[flat2.narrow(0, 8, 7), Tensor::zeros([1], (Kind::Float, Device::Cpu))],
            0,
        );
        lin.set_base_weight(w2.copy()).unwrap();
        assert!(lin.is_sharded());
        assert_eq!(lin.resident_bytes(), 8 * 4);
        assert_eq!(max_diff(&lin.dense_weight().unwrap(), &w2), 0.0);
        lin.unshard().unwrap();
        assert!(!lin.is_sharded());
        assert_eq!(lin.resident_bytes(), 15 * 4);
        assert_eq!(max_diff(&lin.weight, &w2), 0.0, "unshard puts the whole weight back");
    }

    /// With an input that requires grad, the sharded product keeps only the input: backward
    /// gathers the weight again (two gathers in all), and the input gradient is the plain one.
    #[test]
    fn a_sharded_product_gathers_again_in_backward_instead_of_keeping_the_weight() {
        let w = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let whole = FrozenLinear::new("l", w.copy(), None);
        whole.forward(&x, LinearMode::BASE).unwrap().sum(Kind::Float).backward();
        let expected = x.grad().copy();
        let _ = x.grad().zero_();
        let (lin, group) = sharded_rank0(&w);
        let y = lin.forward(&x, LinearMode::BASE).unwrap();
        assert_eq!(group.gathers.load(std::sync::atomic::Ordering::SeqCst), 1);
        y.sum(Kind::Float).backward();
        assert_eq!(
            group.gathers.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "backward gathers the weight again"
        );
        assert_eq!(f64::try_from((x.grad() - expected).abs().max()).unwrap(), 0.0);
    }
}
