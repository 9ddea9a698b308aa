//! `ddp` and `zero`: memory strategies for runs over several ranks, through the host's
//! process group (libtorch c10d; the plugin never links it, it calls [`Collectives`]).
//!
//! Both run AdamW exactly as the `single` plugin (`ferrotune_plugin_api::optim`), so with
//! the same global batch a run on N ranks follows a one-process run up to the summation
//! order of the gradient reduction.
//!
//! * `ddp`: every rank keeps every parameter and its whole optimizer state. After the
//!   backward, gradients are averaged over the ranks with all-reduces on flat buckets of at
//!   most `bucket_mb` MiB, then every rank takes the same step. (torch's DDP overlaps the
//!   bucket all-reduces with the backward through autograd hooks; here they run after it.)
//! * `zero`, `stage: 1`: each trainable parameter has one owner rank (greedy balance by
//!   element count, the same on every rank); only the owner keeps its AdamW state and
//!   updates it. Gradients are all-reduced as in ddp; updated parameters are all-gathered
//!   from their owners. Optimizer-state bytes per rank ≈ 1/N.
//! * `stage: 2`: as stage 1, but gradients are reduce-scattered: each rank receives only
//!   the averaged gradients of the parameters it owns, and the global norm for clipping is
//!   the all-reduced sum of the owners' squared norms.
//! * `stage: 3`: the stage-2 step, plus the frozen base weights sharded: the plugin reports
//!   the capability `shard_frozen_params` and the host then keeps 1/N of each frozen decoder
//!   linear weight per rank (flattened, padded), all-gathering a layer's weight just before
//!   its forward and dropping it after (see the host's `linear` module for how long the
//!   gathered weight lives in backward). `offload_param: cpu` (stage 3 only) asks the host to
//!   keep those shards in CPU memory (a no-op when training on the CPU). The trainable
//!   adapter parameters stay whole on every rank (their optimizer state and gradients are
//!   sharded as in stage 2), so the adapter rank 0 saves is always complete.
//!
//!   Stage 3 also reports `shard_trainable_params` (full fine-tuning): the host may then
//!   partition trainable weights itself and name them in `optimizer_json`'s `partitioned`
//!   list (see `SHARD_TRAINABLE_PARAMS` in plugin-api for the contract). Each such parameter
//!   is this rank's flat 1-D shard, its gradient already averaged by the host: every rank
//!   keeps the AdamW state of its own shard and updates it, the shards' gradients take no
//!   part in the reduce-scatter (only in the global norm, their squared norms summed over
//!   the ranks with the owned gradients'), and nothing is all-gathered after the step.
//! * `offload_optimizer: cpu` (both plugins): the optimizer state lives in CPU memory and
//!   the update runs there; the gradient is copied to the CPU and the updated parameter
//!   copied back.
//! * bf16/f16 parameters (both plugins): whoever keeps a parameter's moments also keeps its
//!   fp32 master weights beside them (same device; under zero only the owner, or every rank
//!   for its shard of a partitioned weight), made at setup from the parameter rank 0
//!   broadcast. The update runs on the master and the parameter receives it rounded; the
//!   other ranks receive the rounded parameter in the all-gather.
//!
//! Gradient averaging assumes each rank's loss is its share of the global loss scaled by the
//! world size (the host does this, see `train`), as torch DDP with HF's
//! `average_tokens_across_devices`.
//!
//! State dict: `step` and, for each parameter this rank keeps state for,
//! `<param>.exp_avg`, `<param>.exp_avg_sq` (`<param>.max_exp_avg_sq` with amsgrad,
//! `<param>.master` for bf16/f16 parameters; a partitioned parameter's are those of this
//! rank's shard): a sharded checkpoint is one such file per rank, loadable with the same
//! world size.
use ferrotune_plugin_api::kinds::memory::{
    OFFLOAD_OPTIMIZER_CPU, OFFLOAD_PARAMS_CPU, SHARD_FROZEN_PARAMS, SHARD_TRAINABLE_PARAMS,
};
use ferrotune_plugin_api::optim::{
    adamw_step, check_params, global_norm, load_state, split_partitioned, AdamWConfig, AdamWParam,
    AdamWState, StateSlot,
};
use ferrotune_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the optimizer state lives.
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// On the parameters' device (default).
    #[default]
    None,
    /// In CPU memory; the update runs on the CPU.
    Cpu,
}

/// `memory: {plugin: ddp, ...}`.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct DdpConfig {
    /// Largest gradient bucket of one all-reduce, in MiB. Default 25 (torch DDP's); > 0.
    #[serde(default = "default_bucket_mb")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    bucket_mb: f64,
    /// `cpu`: keep the optimizer state in CPU memory. Default none.
    #[serde(default)]
    offload_optimizer: Offload,
}

/// `memory: {plugin: zero, stage: 2, ...}`.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct ZeroConfig {
    /// 1: shard optimizer state; 2: also gradients; 3: also the frozen base weights and,
    /// when the host partitions them, trainable ones (the host shards them, see the crate
    /// docs). Default 1.
    #[serde(default = "default_stage")]
    #[schemars(range(min = 1, max = 3))]
    stage: u8,
    /// Largest gradient bucket of one all-reduce (stage 1), in MiB. Default 25; > 0.
    #[serde(default = "default_bucket_mb")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    bucket_mb: f64,
    /// `cpu`: keep the optimizer state in CPU memory. Default none.
    #[serde(default)]
    offload_optimizer: Offload,
    /// Stage 3 only: `cpu` keeps the shards of the frozen weights in CPU memory. Default none.
    #[serde(default)]
    offload_param: Offload,
}

fn default_bucket_mb() -> f64 {
    25.0
}
fn default_stage() -> u8 {
    1
}

fn check_bucket(mb: f64) -> PluginResult<()> {
    if mb > 0.0 && mb.is_finite() {
        Ok(())
    } else {
        Err(PluginError::config("bucket_mb", format!("must be a positive number of MiB, got {mb}")))
    }
}

/// How gradients and state are spread over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ddp,
    Zero(u8),
}

/// One trainable parameter, its owner and (where this rank keeps it) its AdamW state.
struct Slot {
    param: TrainParam,
    /// The rank that keeps its state and updates it (ddp: every rank does); `None`: this
    /// rank's shard of a weight the host partitions, which every rank updates.
    owner: Option<usize>,
    state: Option<AdamWState>,
}

/// The engine of both plugins.
pub struct Sharded {
    name: &'static str,
    mode: Mode,
    bucket_numel_bytes: usize,
    offload: Offload,
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    rank: usize,
    world: usize,
    step: i64,
    ready: bool,
}

impl Sharded {
    fn new(name: &'static str, mode: Mode, bucket_mb: f64, offload: Offload) -> PluginResult<Self> {
        check_bucket(bucket_mb)?;
        Ok(Self {
            name,
            mode,
            bucket_numel_bytes: (bucket_mb * 1024.0 * 1024.0) as usize,
            offload,
            cfg: AdamWConfig::parse("{}")?,
            slots: Vec::new(),
            rank: 0,
            world: 1,
            step: 0,
            ready: false,
        })
    }

    fn ensure_ready(&self, comm: Option<&dyn Collectives>) -> PluginResult<()> {
        if !self.ready {
            return Err(PluginError::invalid(format!(
                "the `{}` memory plugin was not set up: call setup first",
                self.name
            )));
        }
        if let Some(c) = comm {
            if (c.rank(), c.world_size()) != (self.rank, self.world) {
                return Err(PluginError::invalid(format!(
                    "`{}` was set up as rank {} of {}, stepped as rank {} of {}",
                    self.name,
                    self.rank,
                    self.world,
                    c.rank(),
                    c.world_size()
                )));
            }
        }
        Ok(())
    }

    fn owns(&self, s: &Slot) -> bool {
        self.mode == Mode::Ddp || s.owner.is_none_or(|o| o == self.rank)
    }

    /// The slots of whole parameters (not partitioned shards): those the flat segments of
    /// the reduce-scatter and the all-gather carry.
    fn whole(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.owner.is_some())
    }

    /// Bytes of optimizer state this rank holds, fp32 masters included.
    pub fn state_bytes(&self) -> usize {
        self.slots.iter().filter_map(|s| s.state.as_ref()).map(AdamWState::bytes).sum()
    }

    /// Owner of each parameter: largest first onto the least-loaded rank (ties: the lower
    /// rank, then the earlier parameter), the same on every rank.
    fn owners(numels: &[usize], world: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..numels.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(numels[i]), i));
        let mut load = vec![0usize; world];
        let mut owner = vec![0; numels.len()];
        for i in order {
            let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += numels[i];
            owner[i] = r;
        }
        owner
    }

    /// The gradient of each parameter (zeros where a rank computed none: it still joins the
    /// reduction), as a contiguous tensor.
    fn local_grads(&self) -> PluginResult<Vec<Tensor>> {
        self.slots
            .iter()
            .map(|s| {
                let g = s.param.tensor.grad();
                Ok(if g.defined() {
                    g.f_detach()?.f_contiguous()?
                } else {
                    s.param.tensor.f_zeros_like()?
                })
            })
            .collect()
    }

    /// Averages `grads` over the ranks in place, in flat buckets of at most `bucket` bytes
    /// (one dtype per bucket).
    fn all_reduce_buckets(&self, grads: &[Tensor], comm: &dyn Collectives) -> PluginResult<()> {
        let mut start = 0;
        while start < grads.len() {
            let kind = grads[start].kind();
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len()
                && grads[end].kind() == kind
                && (end == start
                    || bytes + grads[end].numel() * kind.elt_size_in_bytes()
                        <= self.bucket_numel_bytes)
            {
                bytes += grads[end].numel() * kind.elt_size_in_bytes();
                end += 1;
            }
            let flats = grads[start..end]
                .iter()
                .map(|g| g.f_reshape([-1]))
                .collect::<Result<Vec<_>, _>>()?;
            let bucket = Tensor::f_cat(&flats, 0)?;
            comm.all_reduce(&bucket, ReduceOp::AVG)?;
            let mut at = 0i64;
            for g in &grads[start..end] {
                let n = g.numel() as i64;
                g.shallow_clone().f_copy_(&bucket.f_narrow(0, at, n)?.f_view_as(g)?)?;
                at += n;
            }
            start = end;
        }
        Ok(())
    }

    /// Where rank `rank`'s owned whole parameters lie in its flat segment: (slot, start in
    /// the segment, elements), in slot order (the segment is their concatenation, zero-padded
    /// to [`Sharded::segment_len`]).
    fn layout(&self, rank: usize) -> Vec<(usize, i64, i64)> {
        let mut at = 0i64;
        let mut out = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.owner == Some(rank) {
                let n = s.param.tensor.numel() as i64;
                out.push((i, at, n));
                at += n;
            }
        }
        out
    }

    /// The parts of a segment laid out as `layout` that fall in the window `[a, b)`: (slot,
    /// start in the parameter's flat view, start in the window, elements).
    fn window_pieces(layout: &[(usize, i64, i64)], a: i64, b: i64) -> Vec<(usize, i64, i64, i64)> {
        layout
            .iter()
            .filter_map(|&(slot, start, n)| {
                let (lo, hi) = (start.max(a), (start + n).min(b));
                (lo < hi).then_some((slot, lo - start, lo - a, hi - lo))
            })
            .collect()
    }

    /// Rank `rank`'s segment of `tensors` (one per slot) restricted to the window `[a, b)`,
    /// as one flat tensor of `b − a` elements of `kind` (zeros past its parameters).
    fn window(
        tensors: &[Tensor],
        pieces: &[(usize, i64, i64, i64)],
        width: i64,
        kind: Kind,
        device: Device,
    ) -> PluginResult<Tensor> {
        let mut parts = Vec::with_capacity(pieces.len() + 1);
        let mut n = 0i64;
        for &(slot, from, _, len) in pieces {
            parts.push(tensors[slot].f_reshape([-1])?.f_narrow(0, from, len)?.f_to_kind(kind)?);
            n += len;
        }
        if n < width {
            parts.push(Tensor::f_zeros([width - n], (kind, device))?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Elements of one reduce-scatter / all-gather window per rank: `bucket_mb` of `kind`.
    fn window_width(&self, kind: Kind, len: i64) -> i64 {
        ((self.bucket_numel_bytes / kind.elt_size_in_bytes()) as i64).clamp(1, len.max(1))
    }

    /// The longest per-rank segment, in elements.
    fn segment_len(&self) -> i64 {
        let mut per = vec![0i64; self.world];
        for s in self.whole() {
            per[s.owner.unwrap_or(0)] += s.param.tensor.numel() as i64;
        }
        per.into_iter().max().unwrap_or(0).max(1)
    }

    /// One kind for the flat buffers, that every whole parameter's values survive: their
    /// common dtype, else fp64 if any is, else fp32 (bf16 beside fp32 or f16).
    fn flat_kind(&self) -> Kind {
        let mut kinds = self.whole().map(|s| s.param.tensor.kind());
        let Some(first) = kinds.next() else { return Kind::Float };
        let mut common = Some(first);
        let mut double = first == Kind::Double;
        for k in kinds {
            double |= k == Kind::Double;
            common = common.filter(|c| *c == k);
        }
        match (common, double) {
            (Some(k), _) => k,
            (None, true) => Kind::Double,
            (None, false) => Kind::Float,
        }
    }

    /// The dtype of the global norm: fp64 if any parameter is fp64, else fp32 (as
    /// [`global_norm`]).
    fn norm_kind(&self) -> Kind {
        if self.slots.iter().any(|s| s.param.tensor.kind() == Kind::Double) {
            Kind::Double
        } else {
            Kind::Float
        }
    }

    /// Stage 2/3: reduce-scatters the gradients of the whole parameters; the averaged
    /// gradient of each parameter this rank owns, a partitioned shard's own gradient (the
    /// host averaged it), `None` for the others.
    fn reduce_scatter_grads(
        &self,
        grads: &[Tensor],
        comm: &dyn Collectives,
    ) -> PluginResult<Vec<Option<Tensor>>> {
        let mut mine: Vec<Option<Tensor>> = self
            .slots
            .iter()
            .zip(grads)
            .map(|(s, g)| s.owner.is_none().then(|| g.shallow_clone()))
            .collect();
        // Every rank has the same partitioned names, so every rank skips alike.
        if self.whole().next().is_none() {
            return Ok(mine);
        }
        let (len, kind) = (self.segment_len(), self.flat_kind());
        let device = self.slots[0].param.tensor.device();
        let layouts: Vec<_> = (0..self.world).map(|r| self.layout(r)).collect();
        // This rank's averaged gradients, flat, filled window by window.
        let mut flat: Vec<Option<Tensor>> = self.slots.iter().map(|_| None).collect();
        for &(slot, _, n) in &layouts[self.rank] {
            flat[slot] = Some(Tensor::f_zeros([n], (kind, device))?);
        }
        // Windows of `bucket_mb` per rank: the transient buffers are world × window, not a
        // second copy of every gradient.
        let width = self.window_width(kind, len);
        let mut a = 0i64;
        while a < len {
            let b = (a + width).min(len);
            let pieces: Vec<_> = layouts.iter().map(|l| Self::window_pieces(l, a, b)).collect();
            let parts = pieces
                .iter()
                .map(|p| Self::window(grads, p, b - a, kind, device))
                .collect::<PluginResult<Vec<_>>>()?;
            let input = Tensor::f_cat(&parts, 0)?;
            drop(parts);
            let out = Tensor::f_zeros([b - a], (kind, device))?;
            comm.reduce_scatter(&out, &input, ReduceOp::AVG)?;
            for &(slot, from, at, n) in &pieces[self.rank] {
                if let Some(f) = &flat[slot] {
                    f.f_narrow(0, from, n)?.f_copy_(&out.f_narrow(0, at, n)?)?;
                }
            }
            a = b;
        }
        for (i, f) in flat.into_iter().enumerate() {
            if let Some(f) = f {
                mine[i] = Some(f.f_view_as(&grads[i])?.f_to_kind(grads[i].kind())?);
            }
        }
        Ok(mine)
    }

    /// ZeRO: every rank receives the updated whole parameters of every owner (all-gathers of
    /// the padded per-rank segments, a window of `bucket_mb` per rank at a time). Partitioned
    /// shards stay: the host gathers those weights when it needs them.
    fn gather_params(&self, comm: &dyn Collectives) -> PluginResult<()> {
        if self.whole().next().is_none() {
            return Ok(());
        }
        let (len, kind) = (self.segment_len(), self.flat_kind());
        let params: Vec<Tensor> =
            self.slots.iter().map(|s| s.param.tensor.shallow_clone()).collect();
        let device = params[0].device();
        let layouts: Vec<_> = (0..self.world).map(|r| self.layout(r)).collect();
        let width = self.window_width(kind, len);
        tch::no_grad(|| -> PluginResult<()> {
            let mut a = 0i64;
            while a < len {
                let b = (a + width).min(len);
                let pieces: Vec<_> = layouts.iter().map(|l| Self::window_pieces(l, a, b)).collect();
                let local = Self::window(&params, &pieces[self.rank], b - a, kind, device)?;
                let gathered = comm.all_gather(&local)?;
                if gathered.len() != self.world {
                    return Err(PluginError::runtime(format!(
                        "all_gather returned {} tensors for {} ranks",
                        gathered.len(),
                        self.world
                    )));
                }
                for (owner, part) in gathered.iter().enumerate() {
                    if owner == self.rank {
                        continue;
                    }
                    let part = part.f_to_device(device)?;
                    for &(slot, from, at, n) in &pieces[owner] {
                        let p = &params[slot];
                        let src = part.f_narrow(0, at, n)?.f_to_kind(p.kind())?;
                        p.f_view([-1])?.f_narrow(0, from, n)?.f_copy_(&src)?;
                    }
                }
                a = b;
            }
            Ok(())
        })
    }

    /// Checks that every rank set up the same parameter list: count and elements, of all
    /// and of the partitioned ones (a partitioned shard has the same length on every rank).
    fn check_same_params(&self, comm: &dyn Collectives) -> PluginResult<()> {
        let count = |part: bool| {
            let of = self.slots.iter().filter(|s| !part || s.owner.is_none());
            let numel: usize = of.clone().map(|s| s.param.tensor.numel()).sum();
            (of.count() as i64, numel as i64)
        };
        let ((n, numel), (pn, pnumel)) = (count(false), count(true));
        let ours = [n, numel, pn, pnumel];
        // fp64 holds these counts exactly.
        let all = comm.all_gather(&Tensor::from_slice(&ours.map(|x| x as f64)))?;
        for (r, t) in all.iter().enumerate() {
            let v = Vec::<f64>::try_from(t).map_err(|e| PluginError::runtime(e.to_string()))?;
            let v: Vec<i64> = v.into_iter().map(|x| x as i64).collect();
            if v != ours {
                return Err(PluginError::invalid(format!(
                    "rank {r} has {} trainable parameters ({} elements; {} of them partitioned, {} elements), rank {} has {n} ({numel}; {pn}, {pnumel}): every rank must train the same parameters",
                    v[0], v[1], v[2], v[3], self.rank
                )));
            }
        }
        Ok(())
    }

    /// Whether each of `params` is named in the host's `partitioned` list `names`, each name
    /// checked to be a distinct 1-D parameter.
    fn partitioned_flags(params: &[TrainParam], names: &[String]) -> PluginResult<Vec<bool>> {
        let mut flags = vec![false; params.len()];
        for name in names {
            let Some(i) = params.iter().position(|p| p.name == *name) else {
                return Err(PluginError::invalid(format!(
                    "optimizer `partitioned` names `{name}`, which is not one of the {} trainable parameters",
                    params.len()
                )));
            };
            let dims = params[i].tensor.size();
            if dims.len() != 1 {
                return Err(PluginError::invalid(format!(
                    "optimizer `partitioned` names `{name}` of shape {dims:?}: a partitioned parameter is this rank's flat 1-D shard"
                )));
            }
            if std::mem::replace(&mut flags[i], true) {
                return Err(PluginError::invalid(format!(
                    "optimizer `partitioned` names `{name}` twice"
                )));
            }
        }
        Ok(flags)
    }
}

impl MemoryStrategy for Sharded {
    fn setup(
        &mut self,
        params: Vec<TrainParam>,
        optimizer_json: &str,
        device: Device,
        comm: &dyn Collectives,
    ) -> PluginResult<()> {
        // Only stage 3 reports `shard_trainable_params`, so only it may be sent the list.
        let (cfg, partitioned) = if self.mode == Mode::Zero(3) {
            split_partitioned(optimizer_json)?
        } else {
            (AdamWConfig::parse(optimizer_json)?, Vec::new())
        };
        check_params(&params, device, "")?;
        if params.is_empty() {
            return Err(PluginError::invalid(format!(
                "the `{}` memory plugin got no trainable parameters",
                self.name
            )));
        }
        let partitioned = Self::partitioned_flags(&params, &partitioned)?;
        let (rank, world) = (comm.rank(), comm.world_size());
        // Owners balance the whole parameters only: every rank updates its own shards.
        let whole: Vec<usize> = (0..params.len()).filter(|&i| !partitioned[i]).collect();
        let numels: Vec<usize> = whole.iter().map(|&i| params[i].tensor.numel()).collect();
        let mut owners = vec![None; params.len()];
        for (&i, o) in whole.iter().zip(Self::owners(&numels, world)) {
            owners[i] = Some(o);
        }
        self.slots = params
            .into_iter()
            .zip(owners)
            .map(|(param, owner)| Slot { param, owner, state: None })
            .collect();
        self.cfg = cfg;
        self.rank = rank;
        self.world = world;
        self.step = 0;
        if world > 1 {
            self.check_same_params(comm)?;
            // Every rank starts from rank 0's parameters, as torch DDP (a shard is this
            // rank's own).
            tch::no_grad(|| -> PluginResult<()> {
                for s in self.whole() {
                    comm.broadcast(&s.param.tensor, 0)?;
                }
                Ok(())
            })?;
        }
        // After the broadcast: a master copies the parameter every rank now has.
        let state_device = if self.offload == Offload::Cpu { Device::Cpu } else { device };
        for i in 0..self.slots.len() {
            if self.owns(&self.slots[i]) {
                let s = &mut self.slots[i];
                s.state = Some(AdamWState::new(&s.param.tensor, self.cfg.amsgrad, state_device)?);
            }
        }
        self.ready = true;
        Ok(())
    }

    fn step(&mut self, lr: f64, comm: &dyn Collectives) -> PluginResult<StepReport> {
        self.ensure_ready(Some(comm))?;
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(PluginError::invalid(format!(
                "learning rate must be finite and ≥ 0, got {lr}"
            )));
        }
        let grads = tch::no_grad(|| self.local_grads())?;
        // Partitioned shards exist only under stage 3, which reduce-scatters with > 1 rank:
        // the all-reduce below never sees one.
        let reduce_scatter = matches!(self.mode, Mode::Zero(2 | 3)) && self.world > 1;
        // The gradients this rank updates with, and the global norm.
        let (mine, total_norm): (Vec<Option<Tensor>>, Tensor) =
            tch::no_grad(|| -> PluginResult<_> {
                if reduce_scatter {
                    let mine = self.reduce_scatter_grads(&grads, comm)?;
                    let sq = match global_norm(&mine)? {
                        Some(n) => n.f_square()?.f_to_kind(Kind::Double)?,
                        None => Tensor::f_zeros([], (Kind::Double, Device::Cpu))?,
                    };
                    let sq = sq.f_to_device(Device::Cpu)?.f_reshape([1])?;
                    comm.all_reduce(&sq, ReduceOp::SUM)?;
                    Ok((mine, sq.f_sqrt()?.f_reshape([])?.f_to_kind(self.norm_kind())?))
                } else {
                    if self.world > 1 {
                        self.all_reduce_buckets(&grads, comm)?;
                    }
                    let all: Vec<Option<Tensor>> =
                        grads.iter().map(|g| Some(g.shallow_clone())).collect();
                    let norm =
                        global_norm(&all)?.ok_or_else(|| PluginError::runtime("no gradients"))?;
                    let mine = self
                        .slots
                        .iter()
                        .zip(all)
                        .map(|(s, g)| if self.owns(s) { g } else { None })
                        .collect();
                    Ok((mine, norm))
                }
            })?;
        // Bytes of the reduced gradients this rank holds for its update: every gradient under
        // ddp and stage 1 (all-reduced whole), its own under stages 2 and 3 (reduce-scattered;
        // a partitioned shard's own). The local gradients the backward produced before the
        // reduction are not counted (whole under stage 2, shard-sized under stage 3).
        let gradient_bytes: usize = if reduce_scatter {
            mine.iter().flatten().map(|g| g.numel() * g.kind().elt_size_in_bytes()).sum()
        } else {
            grads.iter().map(|g| g.numel() * g.kind().elt_size_in_bytes()).sum()
        };
        // This rank updates the parameters it has a gradient and state for.
        let params = self.slots.iter_mut().zip(&mine).filter_map(|(slot, grad)| {
            let (Some(grad), Some(state)) = (grad, slot.state.as_mut()) else { return None };
            Some(AdamWParam { param: &slot.param, moments: state.moments(), grad })
        });
        let mut report = adamw_step(&self.cfg, &total_norm, lr, &mut self.step, params)?;
        if report.skipped {
            self.zero_grad()?;
            return Ok(report);
        }
        if matches!(self.mode, Mode::Zero(_)) && self.world > 1 {
            self.gather_params(comm)?;
        }
        self.zero_grad()?;
        report.metrics.push(("optimizer_state_bytes".into(), self.state_bytes() as f64));
        report.metrics.push(("gradient_bytes".into(), gradient_bytes as f64));
        Ok(report)
    }

    fn zero_grad(&mut self) -> PluginResult<()> {
        ferrotune_plugin_api::optim::zero_grads(self.slots.iter().map(|s| &s.param.tensor))
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.ensure_ready(None)?;
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for s in &self.slots {
            if let Some(state) = &s.state {
                out.extend(state.named(&s.param.name)?);
            }
        }
        Ok(out)
    }

    fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.ensure_ready(None)?;
        let (rank, world) = (self.rank, self.world);
        let unknown = |name: &str| {
            PluginError::invalid(format!(
                "optimizer state `{name}` does not belong to rank {rank} of {world} in this run (a sharded checkpoint resumes with the same world size and trainable parameters)"
            ))
        };
        let mut slots: Vec<StateSlot<'_>> = self
            .slots
            .iter_mut()
            .map(|s| StateSlot {
                name: &s.param.name,
                shape: s.param.tensor.size(),
                state: s.state.as_mut(),
            })
            .collect();
        self.step = load_state(state, &mut slots, &unknown, &format!(" (rank {rank} of {world})"))?;
        Ok(())
    }
}

/// `ddp`: gradients averaged with bucketed all-reduces; every rank keeps every state.
pub struct Ddp(Sharded, Vec<String>);

/// `zero`: optimizer state (stage 1), gradients (stage 2) sharded by parameter ownership;
/// stage 3 also has the host shard the frozen base weights, and may have it partition
/// trainable ones (the capabilities it reports).
pub struct Zero(Sharded, Vec<String>);

impl Plugin for Ddp {
    const NAME: &'static str = "ddp";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "data parallel: bucketed gradient all-reduce (mean), AdamW on every rank; offload_optimizer: cpu";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let c: DdpConfig = parse_config(config_json)?;
        let caps = if c.offload_optimizer == Offload::Cpu {
            vec![OFFLOAD_OPTIMIZER_CPU.to_string()]
        } else {
            Vec::new()
        };
        Ok(Self(Sharded::new(Self::NAME, Mode::Ddp, c.bucket_mb, c.offload_optimizer)?, caps))
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<DdpConfig>())
    }
}

impl Plugin for Zero {
    const NAME: &'static str = "zero";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also the weights (frozen, and trainable ones the host partitions); offload_optimizer / offload_param: cpu";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let c: ZeroConfig = parse_config(config_json)?;
        if !(1..=3).contains(&c.stage) {
            return Err(PluginError::config(
                "stage",
                format!("must be 1, 2 or 3, got {}", c.stage),
            ));
        }
        if c.offload_param != Offload::None && c.stage != 3 {
            return Err(PluginError::config(
                "offload_param",
                format!("only stage 3 shards parameters; got stage {}", c.stage),
            ));
        }
        let mut caps = Vec::new();
        if c.stage == 3 {
            caps.push(SHARD_FROZEN_PARAMS.to_string());
            caps.push(SHARD_TRAINABLE_PARAMS.to_string());
            if c.offload_param == Offload::Cpu {
                caps.push(OFFLOAD_PARAMS_CPU.to_string());
            }
        }
        if c.offload_optimizer == Offload::Cpu {
            caps.push(OFFLOAD_OPTIMIZER_CPU.to_string());
        }
        Ok(Self(
            Sharded::new(Self::NAME, Mode::Zero(c.stage), c.bucket_mb, c.offload_optimizer)?,
            caps,
        ))
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<ZeroConfig>())
    }
}

macro_rules! delegate_memory {
    ($t:ty) => {
        impl MemoryStrategy for $t {
            fn setup(
                &mut self,
                params: Vec<TrainParam>,
                optimizer_json: &str,
                device: Device,
                comm: &dyn Collectives,
            ) -> PluginResult<()> {
                self.0.setup(params, optimizer_json, device, comm)
            }
            fn step(&mut self, lr: f64, comm: &dyn Collectives) -> PluginResult<StepReport> {
                self.0.step(lr, comm)
            }
            fn zero_grad(&mut self) -> PluginResult<()> {
                self.0.zero_grad()
            }
            fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
                self.0.state_dict()
            }
            fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()> {
                self.0.load_state_dict(state)
            }
            fn capabilities(&self) -> Vec<String> {
                self.1.clone()
            }
        }
    };
}
delegate_memory!(Ddp);
delegate_memory!(Zero);

export_plugin!(memory: Ddp, memory: Zero);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// Ranks as threads of this process: each collective deposits this rank's tensor in a
    /// shared table and reads everyone's between two rendezvous (which give up after a
    /// minute, so a failing rank fails the test instead of hanging it).
    struct ThreadRank {
        rank: usize,
        world: usize,
        shared: Arc<Shared>,
    }

    struct Shared {
        /// (ranks arrived, generation) of the rendezvous.
        arrived: Mutex<(usize, u64)>,
        cv: Condvar,
        table: Mutex<Vec<Option<Tensor>>>,
    }

    /// Runs `f` as every rank of a `world`-rank group, one thread each; the results in rank
    /// order.
    fn ranks<R: Send>(world: usize, f: impl Fn(&ThreadRank) -> R + Sync) -> Vec<R> {
        let shared = Arc::new(Shared {
            arrived: Mutex::new((0, 0)),
            cv: Condvar::new(),
            table: Mutex::new((0..world).map(|_| None).collect()),
        });
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (f, shared) = (&f, shared.clone());
                    scope.spawn(move || f(&ThreadRank { rank, world, shared }))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
        })
    }

    impl ThreadRank {
        /// A group of one, on the calling thread.
        fn alone() -> Self {
            let shared = Shared {
                arrived: Mutex::new((0, 0)),
                cv: Condvar::new(),
                table: Mutex::new(vec![None]),
            };
            Self { rank: 0, world: 1, shared: Arc::new(shared) }
        }

        fn rendezvous(&self) {
            let mut g = self.shared.arrived.lock().unwrap();
            let generation = g.1;
            g.0 += 1;
            if g.0 == self.world {
                *g = (0, generation + 1);
                self.shared.cv.notify_all();
                return;
            }
            let (_g, wait) = self
                .shared
                .cv
                .wait_timeout_while(g, Duration::from_secs(60), |g| g.1 == generation)
                .unwrap();
            assert!(!wait.timed_out(), "rank {} waited a minute for the others", self.rank);
        }

        /// Every rank's `t`, in rank order.
        fn exchange(&self, t: &Tensor) -> Vec<Tensor> {
            self.shared.table.lock().unwrap()[self.rank] = Some(t.detach().copy());
            self.rendezvous();
            let all = self
                .shared
                .table
                .lock()
                .unwrap()
                .iter()
                .map(|t| t.as_ref().unwrap().copy())
                .collect();
            self.rendezvous();
            all
        }
    }

    /// The ranks' tensors reduced in rank order (AVG: the sum divided by the world size).
    fn reduce(all: &[Tensor], op: ReduceOp) -> Tensor {
        let mut acc = all[0].copy();
        for t in &all[1..] {
            acc = match op {
                ReduceOp::MAX => acc.maximum(t),
                ReduceOp::MIN => acc.minimum(t),
                _ => acc + t,
            };
        }
        if op == ReduceOp::AVG {
            acc / all.len() as f64
        } else {
            acc
        }
    }

    impl Collectives for ThreadRank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> PluginResult<()> {
            let r = reduce(&self.exchange(t), op);
            tch::no_grad(|| t.shallow_clone().copy_(&r));
            Ok(())
        }
        fn broadcast(&self, t: &Tensor, root: usize) -> PluginResult<()> {
            let all = self.exchange(t);
            tch::no_grad(|| t.shallow_clone().copy_(&all[root]));
            Ok(())
        }
        fn all_gather(&self, t: &Tensor) -> PluginResult<Vec<Tensor>> {
            Ok(self.exchange(t))
        }
        fn reduce_scatter(&self, out: &Tensor, input: &Tensor, op: ReduceOp) -> PluginResult<()> {
            let chunks: Vec<Tensor> = self
                .exchange(input)
                .iter()
                .map(|t| t.chunk(self.world as i64, 0)[self.rank].copy())
                .collect();
            tch::no_grad(|| out.shallow_clone().copy_(&reduce(&chunks, op)));
            Ok(())
        }
        fn barrier(&self) -> PluginResult<()> {
            self.rendezvous();
            Ok(())
        }
    }

    fn zero3() -> Zero {
        Zero::from_config(r#"{"stage": 3}"#).unwrap()
    }

    fn leaf(values: &[f32], kind: Kind) -> Tensor {
        Tensor::from_slice(values).to_kind(kind).set_requires_grad(true)
    }

    /// Gives `p` the gradient `g` (in `p`'s dtype).
    fn set_grad(p: &Tensor, g: &Tensor) {
        (p * g.to_kind(p.kind())).sum(Kind::Float).backward();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap()
    }

    fn names(state: &[(String, Tensor)]) -> Vec<&str> {
        state.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// A weight `w` of 7 elements that the host partitions over 2 ranks (shards of 4, the
    /// last padded with one zero), and two whole parameters: `b` (bf16) and `c` (fp32).
    const W: [f32; 7] = [1.0, -1.0, 0.5, 2.0, -0.25, 1.5, 0.75];
    const B: [f32; 3] = [0.1, -0.2, 0.3];
    const C: [f32; 5] = [1.0, 0.5, -0.5, -1.0, 2.0];
    const STEPS: usize = 4;

    /// Rank `r`'s local gradient at `step` of `len` elements (`salt` tells parameters apart).
    fn grad(step: usize, r: usize, len: usize, salt: usize) -> Tensor {
        let v: Vec<f32> = (0..len)
            .map(|i| ((i * 5 + step * 3 + r * 7 + salt) % 13) as f32 * 0.11 - 0.65)
            .collect();
        Tensor::from_slice(&v)
    }

    /// The averaged gradient of `w` at `step` (none at step 1: no rank computed one), as the
    /// host gives it, in `kind`.
    fn w_grad(step: usize, kind: Kind) -> Option<Tensor> {
        (step != 1).then(|| ((grad(step, 0, 7, 1) + grad(step, 1, 7, 1)) / 2.0).to_kind(kind))
    }

    /// This rank's shard `r` of 4 elements of a 7-element tensor (zero padded).
    fn shard(t: &Tensor, r: usize) -> Tensor {
        t.constant_pad_nd([0, 1]).narrow(0, 4 * r as i64, 4).contiguous()
    }

    /// What one step leaves: `w` (whole, or this rank's shard), its master, `b`, `c`, the norm.
    struct Snapshot {
        w: Tensor,
        w_master: Option<Tensor>,
        b: Tensor,
        c: Tensor,
        norm: f64,
    }

    fn snapshot(z: &Zero, norm: f64) -> Snapshot {
        let s = &z.0.slots;
        Snapshot {
            w: s[0].param.tensor.detach().copy(),
            w_master: s[0].state.as_ref().and_then(|st| st.master.as_ref()).map(Tensor::copy),
            b: s[1].param.tensor.detach().copy(),
            c: s[2].param.tensor.detach().copy(),
            norm,
        }
    }

    /// One process training the whole `w`, `b`, `c` on the gradients the 2-rank run averages.
    fn one_process(cfg: &str, kind: Kind) -> Vec<Snapshot> {
        let mut out = ranks(1, |comm| {
            let (w, b, c) = (leaf(&W, kind), leaf(&B, Kind::BFloat16), leaf(&C, Kind::Float));
            let params = vec![
                TrainParam::new("w", w.shallow_clone()),
                TrainParam::new("b", b.shallow_clone()),
                TrainParam::new("c", c.shallow_clone()),
            ];
            let mut z = zero3();
            z.setup(params, cfg, Device::Cpu, comm).unwrap();
            (0..STEPS)
                .map(|step| {
                    if let Some(g) = w_grad(step, kind) {
                        set_grad(&w, &g);
                    }
                    // As the reduce-scatter computes it: bf16 gradients averaged in fp32.
                    let b_grad =
                        |r| grad(step, r, 3, 2).to_kind(Kind::BFloat16).to_kind(Kind::Float);
                    set_grad(&b, &((b_grad(0) + b_grad(1)) / 2.0));
                    set_grad(&c, &((grad(step, 0, 5, 3) + grad(step, 1, 5, 3)) / 2.0));
                    let norm = z.step(1e-2, comm).unwrap().grad_norm;
                    snapshot(&z, norm)
                })
                .collect::<Vec<_>>()
        });
        out.remove(0)
    }

    /// Two ranks, `w` partitioned: each rank its shard (gradient averaged by the "host"),
    /// reductions in windows of 2 elements,
    /// `b` and `c` whole with local gradients. Rank 1 starts with other `b` values and
    /// receives rank 0's at setup (its owner, rank 1, makes the master from those). Also
    /// returns each rank's state-dict names and last `optimizer_state_bytes`.
    fn two_ranks(cfg: &str, kind: Kind) -> Vec<(Vec<Snapshot>, Vec<String>, f64)> {
        let cfg = format!(r#"{{"partitioned": ["w"], {}"#, &cfg[1..]);
        ranks(2, |comm| {
            let r = comm.rank;
            let w = shard(&Tensor::from_slice(&W).to_kind(kind), r).set_requires_grad(true);
            let b = leaf(&B.map(|x| x + r as f32), Kind::BFloat16);
            let c = leaf(&C, Kind::Float);
            let params = vec![
                TrainParam::new("w", w.shallow_clone()),
                TrainParam::new("b", b.shallow_clone()),
                TrainParam::new("c", c.shallow_clone()),
            ];
            // Windows of 2 elements (8 bytes of fp32): the reduce-scatter and the all-gather of
            // the 5-element segments run in 3 windows, and still equal one process.
            let mut z = Zero::from_config(r#"{"stage": 3, "bucket_mb": 0.0000077}"#).unwrap();
            z.setup(params, &cfg, Device::Cpu, comm).unwrap();
            let mut bytes = 0.0;
            let snaps = (0..STEPS)
                .map(|step| {
                    if let Some(g) = w_grad(step, kind) {
                        set_grad(&w, &shard(&g, r));
                    }
                    set_grad(&b, &grad(step, r, 3, 2));
                    set_grad(&c, &grad(step, r, 5, 3));
                    let report = z.step(1e-2, comm).unwrap();
                    bytes = report
                        .metrics
                        .iter()
                        .find(|(k, _)| k == "optimizer_state_bytes")
                        .unwrap()
                        .1;
                    snapshot(&z, report.grad_norm)
                })
                .collect();
            let state = z.state_dict().unwrap();
            z.load_state_dict(state.iter().map(|(n, t)| (n.clone(), t.copy())).collect()).unwrap();
            (snaps, names(&state).iter().map(|n| n.to_string()).collect(), bytes)
        })
    }

    /// ZeRO-3 with `w` partitioned over 2 ranks follows one process training `w` whole: each
    /// rank's shard (and its fp32 master for bf16) is that run's `w` cut the same way, the
    /// padding stays exactly zero under weight decay, the whole parameters agree on both
    /// ranks, and the norm counts the shards' gradients once. Bit for bit without clipping;
    /// with clipping the norm is summed in another order (1e-6).
    #[test]
    fn zero3_partitioned_shards_follow_one_process() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (cfg, exact) in [
                (r#"{"weight_decay": 0.1, "amsgrad": true}"#, true),
                (r#"{"weight_decay": 0.1, "max_grad_norm": 0.5}"#, false),
            ] {
                let reference = one_process(cfg, kind);
                let run = two_ranks(cfg, kind);
                let same = |a: &Tensor, b: &Tensor, what: &str| {
                    let ok = if exact {
                        a.equal(b)
                    } else {
                        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
                            .abs()
                            .max()
                            .double_value(&[])
                            < 1e-6
                    };
                    assert!(ok, "{kind:?} {cfg}: {what}: {:?} vs {:?}", values(a), values(b));
                };
                for (r, (snaps, _, _)) in run.iter().enumerate() {
                    for (step, (got, want)) in snaps.iter().zip(&reference).enumerate() {
                        let at = format!("rank {r} step {step}");
                        assert!(
                            (got.norm - want.norm).abs() <= 1e-6 * want.norm,
                            "{at}: norm {} vs {}",
                            got.norm,
                            want.norm
                        );
                        same(&got.w, &shard(&want.w, r), &format!("{at}: w shard"));
                        if r == 1 {
                            assert_eq!(values(&got.w)[3], 0.0, "{at}: padding");
                        }
                        match (&got.w_master, &want.w_master) {
                            (Some(g), Some(m)) => {
                                same(g, &shard(m, r), &format!("{at}: w master"));
                                assert!(
                                    got.w.equal(&g.to_kind(kind)),
                                    "{at}: shard != master rounded"
                                );
                                if r == 1 {
                                    assert_eq!(values(g)[3], 0.0, "{at}: master padding");
                                }
                            }
                            (None, None) => assert_eq!(kind, Kind::Float),
                            _ => panic!("{at}: a master on one side only"),
                        }
                        same(&got.b, &want.b, &format!("{at}: b"));
                        same(&got.c, &want.c, &format!("{at}: c"));
                    }
                }
                // `c` (5 elements) is rank 0's, `b` rank 1's; both keep their shard's state.
                let w_state: &[&str] = if kind == Kind::Float {
                    &["w.exp_avg", "w.exp_avg_sq"]
                } else {
                    &["w.exp_avg", "w.exp_avg_sq", "w.master"]
                };
                let amsgrad = cfg.contains("amsgrad");
                let expect = |other: &str, master: bool| {
                    let mut v = vec!["step".to_string()];
                    for n in w_state {
                        v.push(n.to_string());
                        if amsgrad && *n == "w.exp_avg_sq" {
                            v.push("w.max_exp_avg_sq".into());
                        }
                    }
                    v.push(format!("{other}.exp_avg"));
                    v.push(format!("{other}.exp_avg_sq"));
                    if amsgrad {
                        v.push(format!("{other}.max_exp_avg_sq"));
                    }
                    if master {
                        v.push(format!("{other}.master"));
                    }
                    v
                };
                assert_eq!(run[0].1, expect("c", false), "{kind:?} {cfg}");
                assert_eq!(run[1].1, expect("b", true), "{kind:?} {cfg}");
                // fp32 state: moments (3 with amsgrad) of the 4-element shard and the whole
                // owned parameter, plus the masters of the bf16 ones.
                let moments = if amsgrad { 3.0 } else { 2.0 };
                let w_master = if kind == Kind::Float { 0.0 } else { 4.0 };
                assert_eq!(run[0].2, 4.0 * (moments * (4.0 + 5.0) + w_master));
                assert_eq!(run[1].2, 4.0 * (moments * (4.0 + 3.0) + w_master + 3.0));
            }
        }
    }

    /// One rank with `w` (1-D) listed as partitioned steps exactly as without the list.
    #[test]
    fn one_rank_partitioned_equals_whole() {
        let run = |cfg: &str| {
            ranks(1, |comm| {
                let (w, b) = (leaf(&W, Kind::BFloat16), leaf(&B, Kind::Float));
                let params = vec![
                    TrainParam::new("w", w.shallow_clone()),
                    TrainParam::new("b", b.shallow_clone()),
                ];
                let mut z = zero3();
                z.setup(params, cfg, Device::Cpu, comm).unwrap();
                for step in 0..STEPS {
                    set_grad(&w, &grad(step, 0, 7, 1));
                    set_grad(&b, &grad(step, 0, 3, 2));
                    z.step(1e-3, comm).unwrap();
                }
                (values(&w), values(&b), z.state_dict().unwrap())
            })
            .remove(0)
        };
        let (w1, b1, s1) = run(r#"{"max_grad_norm": 1.0}"#);
        let (w2, b2, s2) = run(r#"{"max_grad_norm": 1.0, "partitioned": ["w"]}"#);
        assert_eq!((w1, b1), (w2, b2));
        assert_eq!(names(&s1), names(&s2));
        for ((_, a), (_, b)) in s1.iter().zip(&s2) {
            assert!(a.equal(b));
        }
    }

    #[test]
    fn partitioned_list_is_checked_by_name() {
        let setup = |z: &mut Zero, cfg: &str| {
            let params = vec![
                TrainParam::new("w", leaf(&W, Kind::Float)),
                TrainParam::new(
                    "m",
                    Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                ),
            ];
            z.setup(params, cfg, Device::Cpu, &ThreadRank::alone())
        };
        let err = |z: &mut Zero, cfg: &str| setup(z, cfg).unwrap_err().message().to_string();
        let e = err(&mut zero3(), r#"{"partitioned": ["v"]}"#);
        assert!(e.contains("`v`") && e.contains("not one of the 2 trainable parameters"), "{e}");
        let e = err(&mut zero3(), r#"{"partitioned": ["m"]}"#);
        assert!(e.contains("`m` of shape [2, 2]") && e.contains("1-D"), "{e}");
        let e = err(&mut zero3(), r#"{"partitioned": ["w", "w"]}"#);
        assert!(e.contains("`w` twice"), "{e}");
        let e = err(&mut zero3(), r#"{"partitioned": "w"}"#);
        assert!(e.contains("`partitioned`") && e.contains("list of parameter names"), "{e}");
        let e = err(&mut zero3(), r#"{"partitioned": [], "betas": [0.9, 1.5]}"#);
        assert!(e.contains("`betas[1]`"), "{e}");
        // Only stage 3 reports the capability: the others refuse the key as the AdamW config.
        let mut z2 = Zero::from_config(r#"{"stage": 2}"#).unwrap();
        let e = err(&mut z2, r#"{"partitioned": ["w"]}"#);
        assert!(e.contains("unknown field `partitioned`"), "{e}");
        setup(&mut zero3(), r#"{"partitioned": ["w"]}"#).unwrap();
    }

    /// Ranks that partition different parameters are refused on every rank (none hangs).
    #[test]
    fn ranks_must_partition_alike() {
        let errors = ranks(2, |comm| {
            let cfg = if comm.rank == 0 { r#"{"partitioned": ["w"]}"# } else { "{}" };
            let params = vec![TrainParam::new("w", leaf(&[1.0, 2.0], Kind::Float))];
            zero3().setup(params, cfg, Device::Cpu, comm).unwrap_err().message().to_string()
        });
        for e in errors {
            assert!(e.contains("of them partitioned") && e.contains("same parameters"), "{e}");
        }
    }

    #[test]
    fn owners_balance_and_agree() {
        let o = Sharded::owners(&[8, 8, 4, 4, 2, 2], 2);
        let load = |r| {
            o.iter()
                .zip([8, 8, 4, 4, 2, 2])
                .filter(|(a, _)| **a == r)
                .map(|(_, n)| n)
                .sum::<usize>()
        };
        assert_eq!((load(0), load(1)), (14, 14));
        assert_eq!(o, Sharded::owners(&[8, 8, 4, 4, 2, 2], 2));
        assert!(Sharded::owners(&[3, 1], 1).iter().all(|&r| r == 0));
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = Zero::from_config(r#"{"stage": 4}"#).err().unwrap();
        assert!(e.message().contains("`stage`"), "{e}");
        let e = Ddp::from_config(r#"{"bucket_mb": 0}"#).err().unwrap();
        assert!(e.message().contains("`bucket_mb`"), "{e}");
        let e = Zero::from_config(r#"{"offload_optimizer": "nvme"}"#).err().unwrap();
        assert!(e.message().contains("offload_optimizer"), "{e}");
        assert!(Zero::from_config(r#"{"stage": 2, "offload_optimizer": "cpu"}"#).is_ok());
        let e = Zero::from_config(r#"{"stage": 2, "offload_param": "cpu"}"#).err().unwrap();
        assert!(e.message().contains("offload_param"), "{e}");
        assert!(Zero::from_config(r#"{"stage": 2}"#).unwrap().capabilities().is_empty());
        let z = Zero::from_config(r#"{"stage": 3, "offload_param": "cpu"}"#).unwrap();
        assert_eq!(
            z.capabilities(),
            ["shard_frozen_params", "shard_trainable_params", "offload_params_cpu"]
        );
        let z = Zero::from_config(r#"{"stage": 3}"#).unwrap();
        assert_eq!(z.capabilities(), ["shard_frozen_params", "shard_trainable_params"]);
        let z = Zero::from_config(r#"{"stage": 1, "offload_optimizer": "cpu"}"#).unwrap();
        assert_eq!(z.capabilities(), ["offload_optimizer_cpu"]);
        let d = Ddp::from_config(r#"{"offload_optimizer": "cpu"}"#).unwrap();
        assert_eq!(d.capabilities(), ["offload_optimizer_cpu"]);
        assert!(Ddp::from_config("{}").unwrap().capabilities().is_empty());
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schemas_match_the_parsers() {
        let s = assert_schema_matches::<Ddp>(json!({}));
        assert_eq!(s["properties"]["bucket_mb"]["default"], 25.0);
        let s = assert_schema_matches::<Zero>(json!({}));
        assert_eq!(s["properties"]["stage"]["default"], 1);
        assert_eq!(s["properties"]["offload_param"]["default"], "none");
        assert_schema_matches::<Zero>(json!({"stage": 3, "offload_param": "cpu"}));
    }
}
