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
//!
//! In full fine-tuning the base weight itself trains (`requires_grad`). Under ZeRO stage 3
//! such a weight is partitioned ([`FrozenLinear::partition_weight`]): the rank's shard is the
//! trainable leaf, and the same forward also reduce-scatters the weight's gradient into it in
//! backward (see [`crate::model::partition`]).
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{
    AdapterLayer, BaseLinear, Collectives, PluginResult, QuantizedWeight, Quantizer,
};
use tch::{TchError, Tensor};

use super::partition::{stand_in, WeightShard};

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

/// A sharded base as adapters see it during a forward pass (ZeRO stage 3). Its `forward`
/// gathers the weight for the product and lets it go ([`WeightShard::linear`]): in a forward
/// that records gradients, autograd would keep the gathered weight until this layer's backward
/// (`x Wᵀ` saves `W` for the input gradient), so the product then runs as a C++ autograd
/// function that saves no weight and gathers `W` again in backward for `grad_y W`, as
/// DeepSpeed's stage 3 re-fetches parameters for backward; for a partitioned (trainable)
/// weight that backward also reduce-scatters the weight's gradient into its shard. A rank thus
/// holds at most one gathered layer weight at a time, and every rank makes the same gathers in
/// the same order. `weight()` (DoRA's norm) gathers too, and what an adapter builds from it is
/// the adapter's.
struct ShardedBase<'a> {
    base: &'a LinearBase,
    shard: &'a WeightShard,
}

impl ShardedBase<'_> {
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        self.shard
            .linear(x, self.base.bias.as_ref())
            .with_context(|| format!("linear layer `{}`", self.base.name))
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
            .gather()
            .map_err(|e| ferrotune_plugin_api::PluginError::runtime(format!("{e:#}")))
    }
    fn bias(&self) -> PluginResult<Option<Tensor>> {
        BaseLinear::bias(self.base)
    }
}

/// A frozen linear layer and the adapters that wrap it (see the module docs).
pub struct FrozenLinear {
    base: LinearBase,
    /// Set by [`FrozenLinear::shard_weight`] (a frozen shard) or
    /// [`FrozenLinear::partition_weight`] (a trainable one): `base.weight` is then a
    /// zero-strided stand-in with the right shape and no storage of its own.
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
    /// A trainable weight is partitioned instead ([`FrozenLinear::partition_weight`]).
    pub fn shard_weight(
        &mut self,
        group: Arc<dyn Collectives + Send + Sync>,
        offload: bool,
    ) -> Result<()> {
        // A quantized base is already packed (and small): it stays whole on every rank.
        if group.world_size() <= 1 || self.shard.is_some() || self.base.quantized.is_some() {
            return Ok(());
        }
        let name = format!("{}.weight", self.base.name);
        let shard = WeightShard::new(name, &self.base.weight, group, offload, false)?;
        self.base.weight = stand_in(&self.base.weight)?;
        self.shard = Some(shard);
        Ok(())
    }

    /// Partitions the TRAINABLE base weight over the ranks of `group` (ZeRO stage 3 for full
    /// fine-tuning; see [`crate::model::partition`]): this rank keeps elements
    /// `rank·len .. (rank+1)·len` of the flattened weight zero-padded to `len·world`
    /// (`len = ⌈numel / world⌉`), in CPU memory when `offload`, as a 1-D leaf that requires
    /// grad ([`FrozenLinear::weight_shard`]): the tensor the optimizer steps, in place of the
    /// weight. `weight` becomes a zero-strided stand-in (its shape, no storage, no grad).
    /// Forward gathers the whole weight and keeps only its input; backward gathers it again
    /// and reduce-scatters (average over ranks) the weight's gradient into the shard's. The
    /// bias stays whole and trains as before. Every rank must partition the same layers.
    ///
    /// The weight must require grad, and not be quantized. A frozen weight already sharded
    /// ([`FrozenLinear::shard_weight`]) whose stand-in has since been made to require grad
    /// becomes partitioned without a gather. With one rank, or when already partitioned,
    /// nothing changes.
    pub fn partition_weight(
        &mut self,
        group: Arc<dyn Collectives + Send + Sync>,
        offload: bool,
    ) -> Result<()> {
        let name = format!("{}.weight", self.base.name);
        if group.world_size() <= 1 || self.is_partitioned() {
            return Ok(());
        }
        if !self.base.weight.requires_grad() {
            bail!("`{name}` does not require grad: only trainable weights are partitioned (a frozen one is sharded)");
        }
        if self.base.quantized.is_some() {
            bail!("`{name}` is quantized: a quantized weight cannot train, so it cannot be partitioned");
        }
        let stand_in = stand_in(&self.base.weight)?;
        match &mut self.shard {
            Some(frozen) => frozen.make_trainable(offload)?,
            None => {
                self.shard = Some(WeightShard::new(name, &self.base.weight, group, offload, true)?)
            }
        }
        self.base.weight = stand_in;
        Ok(())
    }

    /// The trainable leaf of a partitioned weight ([`FrozenLinear::partition_weight`]): the
    /// 1-D shard whose gradient is this rank's part of the averaged weight gradient. `None`
    /// when the weight is whole or a frozen shard.
    pub fn weight_shard(&self) -> Option<&Tensor> {
        self.shard.as_ref().filter(|s| s.is_trainable()).map(WeightShard::tensor)
    }

    /// Whether the base weight is a trainable weight partitioned over ranks.
    pub fn is_partitioned(&self) -> bool {
        self.shard.as_ref().is_some_and(WeightShard::is_trainable)
    }

    /// The shard of a sharded or partitioned weight.
    pub(crate) fn shard(&self) -> Option<&WeightShard> {
        self.shard.as_ref()
    }

    /// Makes this layer use `shard` (shared with another user: a tied `lm_head` and the
    /// embedding), with `stand_in` as its weight.
    pub(crate) fn set_shard(&mut self, shard: WeightShard, stand_in: Tensor) {
        self.base.weight = stand_in;
        self.shard = Some(shard);
    }

    /// Whether the base weight is sharded over ranks (ZeRO stage 3).
    pub fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// Puts the whole weight back on this rank (gathered from every rank: all ranks must call
    /// it for the same layers in the same order). A no-op for a weight that is not sharded.
    /// A partitioned weight comes back trainable (a new leaf: its shard's gradient is not
    /// carried over).
    pub fn unshard(&mut self) -> Result<()> {
        let trainable = self.is_partitioned();
        if let Some(gathered) = self.gathered()? {
            self.shard = None;
            self.base.weight = gathered.weight.set_requires_grad(trainable);
        }
        Ok(())
    }

    /// The dense weight `[out, in]` (gathered when sharded or partitioned, outside autograd;
    /// dequantized when quantized).
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

    /// Bytes of the base weight (its shard when sharded or partitioned, its packed form when
    /// quantized) and bias this rank holds. A tied `lm_head` counts the embedding it shares.
    pub fn resident_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let weight = match (&self.shard, &self.base.quantized) {
            (Some(s), _) => s.resident_bytes(),
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
        let weight = s.gather()?;
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

    /// The trained weight and bias that `forward` in `mode` multiplies by, when that is all it
    /// does with a weight that takes a gradient (full fine-tuning): no adapter or copy runs in
    /// `mode`, the weight is not quantized, and it requires grad or is a trainable partition
    /// (ZeRO-3: gathered whole, its backward reduce-scattering the gradient into the shard).
    /// `None` otherwise.
    pub fn trained_weight(&self, mode: LinearMode<'_>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let adapted = mode.rows.is_some()
            || mode.adapter.is_some_and(|n| self.adapter(n).is_some() || self.copy(n).is_some());
        if adapted || self.base.quantized.is_some() {
            return Ok(None);
        }
        let bias = self.base.bias.as_ref().map(Tensor::shallow_clone);
        let weight = match &self.shard {
            Some(s) if s.is_trainable() => s.gather_for_use()?,
            Some(_) => return Ok(None),
            None if self.base.weight.requires_grad() => self.base.weight.shallow_clone(),
            None => return Ok(None),
        };
        Ok(Some((weight, bias)))
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
            Some(s) => self.shard_weight(s.group().clone(), s.offload()),
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
    use tch::{Device, Kind};

    /// Rank `rank` of a 2-rank group whose other rank holds `other` (its shard): all-gather
    /// returns the shards in rank order. Reduce-scatter (average) combines this rank's input
    /// with the other rank's contribution `other_grad` (the same as this rank's when `None`:
    /// both ranks saw the same data) and keeps this rank's chunk.
    struct TwoRanks {
        rank: usize,
        other: std::sync::Mutex<Tensor>,
        other_grad: std::sync::Mutex<Option<Tensor>>,
        gathers: std::sync::atomic::AtomicUsize,
        scatters: std::sync::atomic::AtomicUsize,
    }

    impl TwoRanks {
        fn new(rank: usize, other: Tensor) -> Self {
            Self {
                rank,
                other: other.into(),
                other_grad: None.into(),
                gathers: 0.into(),
                scatters: 0.into(),
            }
        }

        /// (all-gathers, reduce-scatters) so far.
        fn counts(&self) -> (usize, usize) {
            use std::sync::atomic::Ordering::SeqCst;
            (self.gathers.load(SeqCst), self.scatters.load(SeqCst))
        }
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
        fn reduce_scatter(
            &self,
            output: &Tensor,
            input: &Tensor,
            op: ReduceOp,
        ) -> PluginResult<()> {
            assert_eq!(op, ReduceOp::AVG, "gradients are averaged over ranks");
            self.scatters.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let other = self.other_grad.lock().unwrap().as_ref().map(Tensor::shallow_clone);
            let other = other.unwrap_or_else(|| input.shallow_clone());
            assert_eq!(other.size(), input.size(), "both ranks reduce the same padded length");
            let len = input.size()[0] / 2;
            let mine = ((input + other) / 2.0).narrow(0, self.rank as i64 * len, len);
            tch::no_grad(|| output.shallow_clone().copy_(&mine));
            Ok(())
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
        lin.shard_weight(Arc::new(TwoRanks::new(0, shard1)), false).unwrap();
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
        let group = Arc::new(TwoRanks::new(0, shard1));
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

    /// Rank `rank`'s half of `t` flattened and zero-padded to an even length.
    fn half(t: &Tensor, rank: i64) -> Tensor {
        let flat = t.flatten(0, -1);
        let n = flat.size()[0];
        let len = (n + 1) / 2;
        let padded = Tensor::cat(&[flat, Tensor::zeros([2 * len - n], (t.kind(), t.device()))], 0);
        padded.narrow(0, rank * len, len)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    /// A trainable layer `w`, `b` as rank `rank` of two partitions it, the other rank's shard
    /// behind the mock.
    fn partitioned(w: &Tensor, b: &Tensor, rank: i64) -> (FrozenLinear, Arc<TwoRanks>) {
        let group = Arc::new(TwoRanks::new(rank as usize, half(w, 1 - rank)));
        let mut lin = FrozenLinear::new("l", w.copy(), Some(b.copy()));
        let _ = lin.weight.shallow_clone().set_requires_grad(true);
        let _ = lin.bias.as_ref().unwrap().shallow_clone().set_requires_grad(true);
        lin.partition_weight(group.clone(), false).unwrap();
        (lin, group)
    }

    /// On each rank, a partitioned trainable layer gives the whole layer's output, input
    /// gradient and bias gradient; its shard receives its half of the average of both ranks'
    /// weight gradients; it gathers once in forward and once in backward, and reduce-scatters
    /// once.
    #[test]
    fn a_partitioned_weight_trains_like_the_whole_one() {
        let o = (Kind::Double, Device::Cpu);
        let (w, b) = (Tensor::randn([5, 3], o), Tensor::randn([5], o));
        let x = Tensor::randn([2, 4, 3], o).set_requires_grad(true);
        let dy = Tensor::randn([2, 4, 5], o);
        // The whole layer on this rank's data, and the other rank's weight gradient.
        let (wr, br) = (w.copy().set_requires_grad(true), b.copy().set_requires_grad(true));
        let want_y = x.linear(&wr, Some(&br));
        (&want_y * &dy).sum(Kind::Double).backward();
        let (want_gx, want_gb) = (x.grad().copy(), br.grad().copy());
        let _ = x.grad().zero_();
        let other_gw = Tensor::randn([5, 3], o);
        let mean_gw = (wr.grad() + &other_gw) / 2.0;
        for rank in [0, 1] {
            let (lin, group) = partitioned(&w, &b, rank);
            // The mock's other contribution is the padded flat gradient of the other rank.
            let flat = other_gw.flatten(0, -1);
            *group.other_grad.lock().unwrap() =
                Some(Tensor::cat(&[flat, Tensor::zeros([1], o)], 0));
            assert!(lin.is_partitioned() && lin.is_sharded());
            let shard = lin.weight_shard().unwrap().shallow_clone();
            assert_eq!(max_diff(&shard, &half(&w, rank)), 0.0, "rank {rank} keeps its half");
            assert!(shard.requires_grad() && shard.is_leaf());
            assert_eq!((lin.weight.size(), lin.weight.stride()), (vec![5, 3], vec![0, 0]));
            assert!(!lin.weight.requires_grad(), "the stand-in takes no gradient");
            assert_eq!(lin.resident_bytes(), (8 + 5) * 8, "half the weight and the bias");

            let y = lin.forward(&x, LinearMode::BASE).unwrap();
            assert_eq!(group.counts(), (1, 0), "forward gathers once");
            assert!(max_diff(&y, &want_y) < 1e-12);
            (&y * &dy).sum(Kind::Double).backward();
            assert_eq!(group.counts(), (2, 1), "backward gathers again and reduce-scatters");
            assert!(max_diff(&x.grad(), &want_gx) < 1e-12, "rank {rank}: input gradient");
            assert!(max_diff(&lin.bias.as_ref().unwrap().grad(), &want_gb) < 1e-12);
            assert!(
                max_diff(&shard.grad(), &half(&mean_gw, rank)) < 1e-12,
                "rank {rank}: its half of the averaged weight gradient"
            );
            let _ = x.grad().zero_();
        }
    }

    /// Without grad (evaluation) a partitioned layer is one gather and a product; an input
    /// that needs no gradient still gets the weight's gradient; the readers of the weight see
    /// the whole.
    #[test]
    fn a_partitioned_weight_without_grad_or_input_gradient() {
        let o = (Kind::Float, Device::Cpu);
        let (w, b) = (Tensor::randn([5, 3], o), Tensor::randn([5], o));
        let x = Tensor::randn([4, 3], o);
        let (lin, group) = partitioned(&w, &b, 0);
        let y = tch::no_grad(|| lin.forward(&x, LinearMode::BASE)).unwrap();
        assert!(!y.requires_grad());
        assert_eq!(group.counts(), (1, 0));
        assert!(max_diff(&y, &x.linear(&w, Some(&b))) < 1e-6);
        assert_eq!(max_diff(&lin.dense_weight().unwrap(), &w), 0.0);

        let y = lin.forward(&x, LinearMode::BASE).unwrap();
        y.sum(Kind::Float).backward();
        assert_eq!(group.counts(), (4, 1), "gathers: dense_weight, forward, backward");
        // d sum(x Wᵀ) / dW = 1ᵀ x: every row of the gradient is x's column sums.
        let gw = x
            .sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)
            .unsqueeze(0)
            .expand([5, 3], false);
        let shard = lin.weight_shard().unwrap();
        assert!(max_diff(&shard.grad(), &half(&gw, 0)) < 1e-5);
    }

    /// A frozen shard whose stand-in was made to require grad becomes partitioned with the
    /// same values; a weight that needs no gradient is refused; one rank changes nothing.
    #[test]
    fn partitioning_refuses_frozen_weights_and_converts_frozen_shards() {
        let o = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([5, 3], o);
        let (mut lin, group) = sharded_rank0(&w);
        assert!(lin.weight_shard().is_none() && !lin.is_partitioned());
        let e = lin.partition_weight(group.clone(), false).unwrap_err().to_string();
        assert!(e.contains("does not require grad"), "{e}");
        let _ = lin.weight.shallow_clone().set_requires_grad(true);
        lin.partition_weight(group.clone(), false).unwrap();
        assert_eq!(group.counts(), (0, 0), "no gather");
        assert_eq!(max_diff(lin.weight_shard().unwrap(), &half(&w, 0)), 0.0);
        assert!(lin.weight_shard().unwrap().requires_grad() && !lin.weight.requires_grad());

        let group1 = crate::model::partition::tests::ThreadGroup::ranks(1).remove(0);
        let mut whole = FrozenLinear::new("l", w.copy(), None);
        let _ = whole.weight.shallow_clone().set_requires_grad(true);
        whole.partition_weight(group1, false).unwrap();
        assert!(!whole.is_sharded() && whole.weight.requires_grad(), "one rank: unchanged");
    }

    /// Under gradient checkpointing the layer's forward runs without grad and its
    /// recomputation in backward records the graph: the gradients are those of the plain
    /// pass, with one more gather (forward, recomputation, backward) and one reduce-scatter.
    #[test]
    fn a_checkpointed_partitioned_layer_gets_the_same_gradients() {
        let o = (Kind::Double, Device::Cpu);
        let (w, b) = (Tensor::randn([5, 3], o), Tensor::randn([5], o));
        let x = Tensor::randn([2, 4, 3], o).set_requires_grad(true);
        let f = |y: Tensor| y.tanh().sum(Kind::Double);
        let run = |checkpointed: bool| {
            let (lin, group) = partitioned(&w, &b, 1);
            let lin = std::rc::Rc::new(lin);
            let y = if checkpointed {
                let l = lin.clone();
                crate::model::checkpoint::checkpoint(&[&x], move |xs| {
                    l.forward(&xs[0], LinearMode::BASE)
                })
                .unwrap()
            } else {
                lin.forward(&x, LinearMode::BASE).unwrap()
            };
            f(y).backward();
            let grads = (
                x.grad().copy(),
                lin.weight_shard().unwrap().grad().copy(),
                lin.bias.as_ref().unwrap().grad().copy(),
            );
            let _ = x.grad().zero_();
            (grads, group.counts())
        };
        let (plain, plain_counts) = run(false);
        let (ckpt, ckpt_counts) = run(true);
        assert_eq!(plain_counts, (2, 1));
        assert_eq!(ckpt_counts, (3, 1), "forward, recomputation, backward");
        assert!(max_diff(&plain.0, &ckpt.0) < 1e-12, "input gradient");
        assert!(max_diff(&plain.1, &ckpt.1) < 1e-12, "shard gradient");
        assert!(max_diff(&plain.2, &ckpt.2) < 1e-12, "bias gradient");
        assert!(plain.1.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }
}
