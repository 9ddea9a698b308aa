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
//! * `offload_optimizer: cpu` (both plugins): the optimizer state lives in CPU memory and
//!   the update runs there; the gradient is copied to the CPU and the updated parameter
//!   copied back.
//!
//! Gradient averaging assumes each rank's loss is its share of the global loss scaled by the
//! world size (the host does this, see `train`), as torch DDP with HF's
//! `average_tokens_across_devices`.
//!
//! State dict: `step` and, for each parameter this rank keeps state for,
//! `<param>.exp_avg`, `<param>.exp_avg_sq` (`<param>.max_exp_avg_sq` with amsgrad): a sharded
//! checkpoint is one such file per rank, loadable with the same world size.
use ferrotune_plugin_api::optim::{
    adamw_step, check_params, global_norm, state_kind, AdamWConfig, AdamWMoments, AdamWParam,
};
use ferrotune_plugin_api::prelude::*;
use serde::Deserialize;

/// Where the optimizer state lives.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// On the parameters' device (default).
    #[default]
    None,
    /// In CPU memory; the update runs on the CPU.
    Cpu,
}

/// `memory: {plugin: ddp, ...}`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct DdpConfig {
    /// Largest gradient bucket of one all-reduce, in MiB. Default 25 (torch DDP's); > 0.
    #[serde(default = "default_bucket_mb")]
    bucket_mb: f64,
    /// `cpu`: keep the optimizer state in CPU memory. Default none.
    #[serde(default)]
    offload_optimizer: Offload,
}

/// `memory: {plugin: zero, stage: 2, ...}`.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct ZeroConfig {
    /// 1: shard optimizer state; 2: also gradients; 3: also the frozen base weights (the
    /// host shards them, see the crate docs). Default 1.
    #[serde(default = "default_stage")]
    stage: u8,
    /// Largest gradient bucket of one all-reduce (stage 1), in MiB. Default 25; > 0.
    #[serde(default = "default_bucket_mb")]
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

/// One trainable parameter, its owner and (on the owner) its AdamW state.
struct Slot {
    param: TrainParam,
    owner: usize,
    state: Option<[Option<Tensor>; 3]>,
}

const MOMENTS: [&str; 3] = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"];

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
        self.mode == Mode::Ddp || s.owner == self.rank
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.state.as_ref())
            .flatten()
            .flatten()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
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

    /// Flat concatenation of `tensors[i]` for the parameters of `rank`, zero-padded to `len`.
    fn segment(
        &self,
        tensors: &[Tensor],
        rank: usize,
        len: i64,
        kind: Kind,
        device: Device,
    ) -> PluginResult<Tensor> {
        let mut parts = Vec::new();
        let mut n = 0i64;
        for (s, t) in self.slots.iter().zip(tensors) {
            if s.owner == rank {
                parts.push(t.f_to_kind(kind)?.f_reshape([-1])?);
                n += t.numel() as i64;
            }
        }
        if n < len {
            parts.push(Tensor::f_zeros([len - n], (kind, device))?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// The longest per-rank segment, in elements.
    fn segment_len(&self) -> i64 {
        let mut per = vec![0i64; self.world];
        for s in &self.slots {
            per[s.owner] += s.param.tensor.numel() as i64;
        }
        per.into_iter().max().unwrap_or(0).max(1)
    }

    /// One kind for the flat buffers: fp64 if any parameter is, else the first parameter's.
    fn flat_kind(&self) -> Kind {
        if self.slots.iter().any(|s| s.param.tensor.kind() == Kind::Double) {
            Kind::Double
        } else {
            self.slots.first().map(|s| s.param.tensor.kind()).unwrap_or(Kind::Float)
        }
    }

    /// Stage 2/3: reduce-scatters the gradients; the averaged gradient of each owned
    /// parameter (others: `None`).
    fn reduce_scatter_grads(
        &self,
        grads: &[Tensor],
        comm: &dyn Collectives,
    ) -> PluginResult<Vec<Option<Tensor>>> {
        let (len, kind) = (self.segment_len(), self.flat_kind());
        let device = self.slots[0].param.tensor.device();
        let segments = (0..self.world)
            .map(|r| self.segment(grads, r, len, kind, device))
            .collect::<PluginResult<Vec<_>>>()?;
        let input = Tensor::f_cat(&segments, 0)?;
        let out = Tensor::f_zeros([len], (kind, device))?;
        comm.reduce_scatter(&out, &input, ReduceOp::AVG)?;
        let mut at = 0i64;
        let mut mine = Vec::with_capacity(grads.len());
        for (s, g) in self.slots.iter().zip(grads) {
            if s.owner == self.rank {
                let n = g.numel() as i64;
                mine.push(Some(out.f_narrow(0, at, n)?.f_view_as(g)?.f_to_kind(g.kind())?));
                at += n;
            } else {
                mine.push(None);
            }
        }
        Ok(mine)
    }

    /// ZeRO: every rank receives the updated parameters of every owner (one all-gather of
    /// padded per-rank segments).
    fn gather_params(&self, comm: &dyn Collectives) -> PluginResult<()> {
        let (len, kind) = (self.segment_len(), self.flat_kind());
        let params: Vec<Tensor> =
            self.slots.iter().map(|s| s.param.tensor.shallow_clone()).collect();
        let device = params[0].device();
        let local = tch::no_grad(|| self.segment(&params, self.rank, len, kind, device))?;
        let gathered = comm.all_gather(&local)?;
        if gathered.len() != self.world {
            return Err(PluginError::runtime(format!(
                "all_gather returned {} tensors for {} ranks",
                gathered.len(),
                self.world
            )));
        }
        let mut at = vec![0i64; self.world];
        tch::no_grad(|| -> PluginResult<()> {
            for (s, p) in self.slots.iter().zip(&params) {
                let n = p.numel() as i64;
                if s.owner != self.rank {
                    let src = gathered[s.owner]
                        .f_to_device(device)?
                        .f_narrow(0, at[s.owner], n)?
                        .f_view_as(p)?;
                    p.shallow_clone().f_copy_(&src)?;
                }
                at[s.owner] += n;
            }
            Ok(())
        })
    }

    /// Checks that every rank set up the same parameter list (count and sizes).
    fn check_same_params(&self, comm: &dyn Collectives) -> PluginResult<()> {
        let count = self.slots.len() as f64;
        let numel: f64 = self.slots.iter().map(|s| s.param.tensor.numel() as f64).sum();
        let sig = Tensor::from_slice(&[count, numel]);
        let all = comm.all_gather(&sig)?;
        for (r, t) in all.iter().enumerate() {
            let v = Vec::<f64>::try_from(t).map_err(|e| PluginError::runtime(e.to_string()))?;
            if v != [count, numel] {
                return Err(PluginError::invalid(format!(
                    "rank {r} has {} trainable parameters ({} elements), rank {} has {count} ({numel}): every rank must train the same adapter",
                    v[0], v[1], self.rank
                )));
            }
        }
        Ok(())
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
        let cfg = AdamWConfig::parse(optimizer_json)?;
        check_params(&params, device, "")?;
        if params.is_empty() {
            return Err(PluginError::invalid(format!(
                "the `{}` memory plugin got no trainable parameters",
                self.name
            )));
        }
        let (rank, world) = (comm.rank(), comm.world_size());
        let numels: Vec<usize> = params.iter().map(|p| p.tensor.numel()).collect();
        let owners = Self::owners(&numels, world);
        let state_device = if self.offload == Offload::Cpu { Device::Cpu } else { device };
        let mut slots = Vec::with_capacity(params.len());
        for (p, owner) in params.into_iter().zip(owners) {
            let keep = self.mode == Mode::Ddp || owner == rank;
            let state = if keep {
                let zeros = || {
                    Tensor::f_zeros(p.tensor.size(), (state_kind(p.tensor.kind()), state_device))
                };
                Some([
                    Some(zeros()?),
                    Some(zeros()?),
                    if cfg.amsgrad { Some(zeros()?) } else { None },
                ])
            } else {
                None
            };
            slots.push(Slot { param: p, owner, state });
        }
        self.cfg = cfg;
        self.slots = slots;
        self.rank = rank;
        self.world = world;
        self.step = 0;
        if world > 1 {
            self.check_same_params(comm)?;
            // Every rank starts from rank 0's parameters, as torch DDP.
            tch::no_grad(|| -> PluginResult<()> {
                for s in &self.slots {
                    comm.broadcast(&s.param.tensor, 0)?;
                }
                Ok(())
            })?;
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
                    let kind =
                        if self.flat_kind() == Kind::Double { Kind::Double } else { Kind::Float };
                    Ok((mine, sq.f_sqrt()?.f_reshape([])?.f_to_kind(kind)?))
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
        // This rank updates the parameters it has a gradient and state for.
        let params = self.slots.iter_mut().zip(&mine).filter_map(|(slot, grad)| {
            let (Some(grad), Some([a, b, c])) = (grad, slot.state.as_mut()) else { return None };
            let (Some(exp_avg), Some(exp_avg_sq)) = (a.as_mut(), b.as_mut()) else { return None };
            let moments = AdamWMoments { exp_avg, exp_avg_sq, max_exp_avg_sq: c.as_mut() };
            Some(AdamWParam { param: &slot.param, moments, grad })
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
        Ok(report)
    }

    fn zero_grad(&mut self) -> PluginResult<()> {
        ferrotune_plugin_api::optim::zero_grads(self.slots.iter().map(|s| &s.param.tensor))
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.ensure_ready(None)?;
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for s in &self.slots {
            let Some(state) = &s.state else { continue };
            for (m, t) in MOMENTS.iter().zip(state) {
                if let Some(t) = t {
                    out.push((format!("{}.{m}", s.param.name), t.f_detach_copy()?));
                }
            }
        }
        Ok(out)
    }

    fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.ensure_ready(None)?;
        let mut step = None;
        let mut found: Vec<[Option<Tensor>; 3]> =
            self.slots.iter().map(|_| [None, None, None]).collect();
        for (name, t) in state {
            if name == "step" {
                let v = t.f_to_kind(Kind::Double)?.f_double_value(&[])?;
                if !(t.numel() == 1 && v >= 0.0 && v.fract() == 0.0 && v < 9.0e15) {
                    return Err(PluginError::invalid(format!(
                        "optimizer state `step` must be a non-negative integer scalar, got {v}"
                    )));
                }
                step = Some(v as i64);
                continue;
            }
            let target = self.slots.iter().enumerate().find_map(|(i, s)| {
                let rest = name.strip_prefix(s.param.name.as_str())?.strip_prefix('.')?;
                let m = MOMENTS.iter().position(|m| *m == rest)?;
                s.state.as_ref()?[m].as_ref().map(|_| (i, m))
            });
            let Some((i, m)) = target else {
                return Err(PluginError::invalid(format!(
                    "optimizer state `{name}` does not belong to rank {} of {} in this run (a sharded checkpoint resumes with the same world size and adapter)",
                    self.rank, self.world
                )));
            };
            if t.size() != self.slots[i].param.tensor.size() {
                return Err(PluginError::invalid(format!(
                    "optimizer state `{name}` has shape {:?}, the parameter {:?}",
                    t.size(),
                    self.slots[i].param.tensor.size()
                )));
            }
            if found[i][m].replace(t).is_some() {
                return Err(PluginError::invalid(format!(
                    "optimizer state `{name}` appears twice"
                )));
            }
        }
        let step = step.ok_or_else(|| PluginError::invalid("optimizer state has no `step`"))?;
        for (s, f) in self.slots.iter().zip(&found) {
            if let Some(state) = &s.state {
                for m in 0..3 {
                    if state[m].is_some() && f[m].is_none() {
                        return Err(PluginError::invalid(format!(
                            "optimizer state has no `{}.{}` (rank {} of {})",
                            s.param.name, MOMENTS[m], self.rank, self.world
                        )));
                    }
                }
            }
        }
        tch::no_grad(|| -> PluginResult<()> {
            for (s, f) in self.slots.iter_mut().zip(found) {
                let Some(state) = &mut s.state else { continue };
                for (dst, src) in state.iter_mut().zip(f) {
                    if let (Some(dst), Some(src)) = (dst, src) {
                        dst.f_copy_(&src)?;
                    }
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// `ddp`: gradients averaged with bucketed all-reduces; every rank keeps every state.
pub struct Ddp(Sharded, Vec<String>);

/// `zero`: optimizer state (stage 1), gradients (stage 2) sharded by parameter ownership;
/// stage 3 also has the host shard the frozen base weights (the capabilities it reports).
pub struct Zero(Sharded, Vec<String>);

impl Plugin for Ddp {
    const NAME: &'static str = "ddp";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "data parallel: bucketed gradient all-reduce (mean), AdamW on every rank; offload_optimizer: cpu";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let c: DdpConfig = parse_config(config_json)?;
        Ok(Self(Sharded::new(Self::NAME, Mode::Ddp, c.bucket_mb, c.offload_optimizer)?, Vec::new()))
    }
}

impl Plugin for Zero {
    const NAME: &'static str = "zero";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also the frozen base weights; offload_optimizer / offload_param: cpu";
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
            caps.push(ferrotune_plugin_api::kinds::memory::SHARD_FROZEN_PARAMS.to_string());
            if c.offload_param == Offload::Cpu {
                caps.push(ferrotune_plugin_api::kinds::memory::OFFLOAD_PARAMS_CPU.to_string());
            }
        }
        Ok(Self(
            Sharded::new(Self::NAME, Mode::Zero(c.stage), c.bucket_mb, c.offload_optimizer)?,
            caps,
        ))
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
        assert_eq!(z.capabilities(), ["shard_frozen_params", "offload_params_cpu"]);
    }
}
