//! Memory plugins: where parameters, gradients and optimizer state live, and the optimizer
//! step (single device, DDP, ZeRO, offload). Collectives are the host's: a plugin never
//! links c10d, it calls the [`Collectives`] handle the host passes in.
//!
//! A strategy that needs the host to do more than the trait's calls (ZeRO stage 3: shard the
//! frozen weights, which plugins never see) says so in [`MemoryStrategy::capabilities`]. The
//! host reads them through the root module's `memory_capabilities` field, appended after the
//! prefix. (An older host loads a library that has it; abi_stable refuses a library built
//! without it in a host that has it: see [`PluginModule`](crate::PluginModule).)
use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RBox, RResult, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;
use tch::{Device, Tensor};

use super::{params_from_ffi, params_to_ffi, FfiTrainParam, TrainParam};
use crate::error::{guard, PluginError, PluginResult};
use crate::tensor::{
    named_from_ffi, named_to_ffi, DeviceCode, NamedTensor, OwnedTensor, TensorRef,
};
use crate::Plugin;

/// A reduction for collectives.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub struct ReduceOp(pub u32);

impl ReduceOp {
    pub const SUM: Self = Self(0);
    pub const AVG: Self = Self(1);
    pub const MAX: Self = Self(2);
    pub const MIN: Self = Self(3);
}

/// The host's process group. All tensor arguments are modified in place.
pub trait Collectives {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> PluginResult<()>;
    fn broadcast(&self, tensor: &Tensor, root: usize) -> PluginResult<()>;
    /// One tensor per rank, in rank order.
    fn all_gather(&self, tensor: &Tensor) -> PluginResult<Vec<Tensor>>;
    /// `output` receives this rank's reduced chunk of `input` (split along dim 0).
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> PluginResult<()>;
    fn barrier(&self) -> PluginResult<()>;
}

/// What an optimizer step reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the step was skipped (non-finite gradients).
    pub skipped: bool,
    pub metrics: Vec<(String, f64)>,
}

/// A memory strategy configured for a run.
pub trait MemoryStrategy: Send + 'static {
    /// Takes ownership of the trainable parameters' optimisation; `optimizer_json` is the
    /// run's `optimizer:` section (AdamW betas, weight decay, clipping).
    fn setup(
        &mut self,
        params: Vec<TrainParam>,
        optimizer_json: &str,
        device: Device,
        comm: &dyn Collectives,
    ) -> PluginResult<()>;
    /// Reduces gradients, clips, steps the optimizer at learning rate `lr`, zeroes grads.
    fn step(&mut self, lr: f64, comm: &dyn Collectives) -> PluginResult<StepReport>;
    fn zero_grad(&mut self) -> PluginResult<()>;
    /// Optimizer state for checkpoints. The tensors may share storage with the live state
    /// (the shipped plugins do: no copy of 8–12 bytes per parameter): read or write them
    /// before the next step.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>>;
    fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()>;
    /// What this configured strategy asks of the host beyond the trait (see
    /// [`SHARD_FROZEN_PARAMS`], [`OFFLOAD_PARAMS_CPU`]). Read by the host through the root
    /// module's `memory_capabilities` field.
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Capability: the host keeps 1/world of each frozen decoder linear weight per rank and
/// all-gathers a layer's weight just before its forward (ZeRO stage 3).
pub const SHARD_FROZEN_PARAMS: &str = "shard_frozen_params";
/// Capability: the host keeps those shards in CPU memory (a no-op when training on CPU).
pub const OFFLOAD_PARAMS_CPU: &str = "offload_params_cpu";
/// Capability (informational): the optimizer state lives in host memory
/// (`offload_optimizer: cpu`). The host then treats host memory as the scarce resource: its
/// allocator gives freed pages back within a second instead of keeping them for reuse.
pub const OFFLOAD_OPTIMIZER_CPU: &str = "offload_optimizer_cpu";
/// Capability: the host may partition trainable weights over the ranks itself (full
/// fine-tuning under ZeRO stage 3). The contract, only with a plugin reporting it:
///
/// * The host adds `"partitioned": ["name", ...]` to the `optimizer_json` of
///   [`MemoryStrategy::setup`] ([`PARTITIONED_KEY`](crate::optim::PARTITIONED_KEY); never
///   to other plugins, whose AdamW config refuses unknown keys). The plugin strips it before
///   parsing the AdamW config ([`split_partitioned`](crate::optim::split_partitioned)).
/// * Each named [`TrainParam`] is this rank's flat 1-D shard of a weight the host
///   partitions: every rank's shard of that weight has the same length, the last rank's
///   padded with zeros at its end. A name that is no parameter, or a parameter that is not
///   1-D, is refused by name.
/// * Its `.grad` arrives already averaged over the ranks (the host reduce-scatters in
///   backward); an undefined gradient counts as zeros. The plugin does not reduce it.
/// * Every rank keeps the optimizer state of its own shard (fp32 master included for
///   bf16/f16) and updates it; zero padding stays zero (zero gradient and weight).
/// * The global norm for clipping is the square root of the sum over the ranks of the
///   squared norms of the shards' gradients and of the other parameters' reduced gradients.
/// * Nothing is gathered after the step: the host gathers a weight when it needs it.
/// * Parameters not listed are handled as without the capability. State-dict names stay
///   `<name>.exp_avg` etc. (this rank's shard: a checkpoint per rank, resumable with the
///   same world size).
pub const SHARD_TRAINABLE_PARAMS: &str = "shard_trainable_params";

/// Plugin side of the root module's `memory_capabilities`: the capabilities of plugin `T`
/// configured by `config_json`.
pub fn capabilities<T: Plugin + MemoryStrategy>(
    config_json: RStr<'_>,
) -> RResult<RVec<RString>, PluginError> {
    guard(|| {
        let m = T::from_config(config_json.as_str())
            .map_err(|e| e.context(format!("plugin `{}`", T::NAME)))?;
        Ok(m.capabilities().into_iter().map(RString::from).collect())
    })
}

// ---------------------------------------------------------------- FFI

#[sabi_trait]
pub trait FfiCollectives {
    fn rank(&self) -> u64;
    fn world_size(&self) -> u64;
    fn all_reduce(&self, tensor: TensorRef<'_>, op: ReduceOp) -> RResult<(), PluginError>;
    fn broadcast(&self, tensor: TensorRef<'_>, root: u64) -> RResult<(), PluginError>;
    fn all_gather(&self, tensor: TensorRef<'_>) -> RResult<RVec<OwnedTensor>, PluginError>;
    fn reduce_scatter(
        &self,
        output: TensorRef<'_>,
        input: TensorRef<'_>,
        op: ReduceOp,
    ) -> RResult<(), PluginError>;
    #[sabi(last_prefix_field)]
    fn barrier(&self) -> RResult<(), PluginError>;
}

pub type CollectivesRef<'a> = FfiCollectives_TO<'a, RRef<'a, ()>>;

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiStepReport {
    pub grad_norm: f64,
    pub skipped: bool,
    pub metrics: RVec<Tuple2<RString, f64>>,
}

#[sabi_trait]
pub trait FfiMemoryStrategy: Send {
    fn setup(
        &mut self,
        params: RVec<FfiTrainParam>,
        optimizer_json: RStr<'_>,
        device: DeviceCode,
        comm: CollectivesRef<'_>,
    ) -> RResult<(), PluginError>;
    fn step(&mut self, lr: f64, comm: CollectivesRef<'_>) -> RResult<FfiStepReport, PluginError>;
    fn zero_grad(&mut self) -> RResult<(), PluginError>;
    fn state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError>;
    #[sabi(last_prefix_field)]
    fn load_state_dict(&mut self, state: RVec<NamedTensor>) -> RResult<(), PluginError>;
}

pub type MemoryStrategyBox = FfiMemoryStrategy_TO<'static, RBox<()>>;

// ---------------------------------------------------------------- bridges

/// Host side: exposes the host's process group for the duration of a call. Rank and world
/// size are read once, so those two calls never enter host code.
struct CollectivesBridge<'a> {
    inner: &'a dyn Collectives,
    rank: u64,
    world_size: u64,
}

impl FfiCollectives for CollectivesBridge<'_> {
    fn rank(&self) -> u64 {
        self.rank
    }
    fn world_size(&self) -> u64 {
        self.world_size
    }
    fn all_reduce(&self, tensor: TensorRef<'_>, op: ReduceOp) -> RResult<(), PluginError> {
        guard(|| self.inner.all_reduce(&tensor.borrow(), op))
    }
    fn broadcast(&self, tensor: TensorRef<'_>, root: u64) -> RResult<(), PluginError> {
        guard(|| self.inner.broadcast(&tensor.borrow(), root as usize))
    }
    fn all_gather(&self, tensor: TensorRef<'_>) -> RResult<RVec<OwnedTensor>, PluginError> {
        guard(|| {
            Ok(self.inner.all_gather(&tensor.borrow())?.into_iter().map(OwnedTensor::new).collect())
        })
    }
    fn reduce_scatter(
        &self,
        output: TensorRef<'_>,
        input: TensorRef<'_>,
        op: ReduceOp,
    ) -> RResult<(), PluginError> {
        guard(|| self.inner.reduce_scatter(&output.borrow(), &input.borrow(), op))
    }
    fn barrier(&self) -> RResult<(), PluginError> {
        guard(|| self.inner.barrier())
    }
}

fn with_collectives<R>(comm: &dyn Collectives, f: impl FnOnce(CollectivesRef<'_>) -> R) -> R {
    let bridge = CollectivesBridge {
        inner: comm,
        rank: comm.rank() as u64,
        world_size: comm.world_size() as u64,
    };
    f(FfiCollectives_TO::from_ptr(&bridge, TD_Opaque))
}

struct MemoryBridge<T>(T);

fn report_to_ffi(r: StepReport) -> FfiStepReport {
    FfiStepReport {
        grad_norm: r.grad_norm,
        skipped: r.skipped,
        metrics: r.metrics.into_iter().map(|(k, v)| Tuple2(RString::from(k), v)).collect(),
    }
}

impl<T: MemoryStrategy> FfiMemoryStrategy for MemoryBridge<T> {
    fn setup(
        &mut self,
        params: RVec<FfiTrainParam>,
        optimizer_json: RStr<'_>,
        device: DeviceCode,
        comm: CollectivesRef<'_>,
    ) -> RResult<(), PluginError> {
        guard(|| {
            let comm = CollectivesHandle(comm);
            self.0.setup(
                params_from_ffi(params),
                optimizer_json.as_str(),
                device.to_device()?,
                &comm,
            )
        })
    }
    fn step(&mut self, lr: f64, comm: CollectivesRef<'_>) -> RResult<FfiStepReport, PluginError> {
        guard(|| {
            let comm = CollectivesHandle(comm);
            self.0.step(lr, &comm).map(report_to_ffi)
        })
    }
    fn zero_grad(&mut self) -> RResult<(), PluginError> {
        guard(|| self.0.zero_grad())
    }
    fn state_dict(&self) -> RResult<RVec<NamedTensor>, PluginError> {
        guard(|| self.0.state_dict().map(named_to_ffi))
    }
    fn load_state_dict(&mut self, state: RVec<NamedTensor>) -> RResult<(), PluginError> {
        guard(|| self.0.load_state_dict(named_from_ffi(state)))
    }
}

/// Plugin side of `export_plugin!`.
pub fn create<T: Plugin + MemoryStrategy>(
    config_json: RStr<'_>,
) -> RResult<MemoryStrategyBox, PluginError> {
    guard(|| {
        let m = T::from_config(config_json.as_str())
            .map_err(|e| e.context(format!("plugin `{}`", T::NAME)))?;
        Ok(FfiMemoryStrategy_TO::from_value(MemoryBridge(m), TD_Opaque))
    })
}

// ---------------------------------------------------------------- handles

/// Plugin side: the host's process group.
pub struct CollectivesHandle<'a>(pub CollectivesRef<'a>);

impl Collectives for CollectivesHandle<'_> {
    fn rank(&self) -> usize {
        self.0.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.0.world_size() as usize
    }
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> PluginResult<()> {
        self.0.all_reduce(TensorRef::new(tensor), op).into_result()
    }
    fn broadcast(&self, tensor: &Tensor, root: usize) -> PluginResult<()> {
        self.0.broadcast(TensorRef::new(tensor), root as u64).into_result()
    }
    fn all_gather(&self, tensor: &Tensor) -> PluginResult<Vec<Tensor>> {
        Ok(self
            .0
            .all_gather(TensorRef::new(tensor))
            .into_result()?
            .into_iter()
            .map(OwnedTensor::into_tensor)
            .collect())
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> PluginResult<()> {
        self.0.reduce_scatter(TensorRef::new(output), TensorRef::new(input), op).into_result()
    }
    fn barrier(&self) -> PluginResult<()> {
        self.0.barrier().into_result()
    }
}

/// Host side: a memory strategy living in a plugin.
pub struct MemoryStrategyHandle(pub MemoryStrategyBox);

impl MemoryStrategy for MemoryStrategyHandle {
    fn setup(
        &mut self,
        params: Vec<TrainParam>,
        optimizer_json: &str,
        device: Device,
        comm: &dyn Collectives,
    ) -> PluginResult<()> {
        let code = DeviceCode::from_device(device);
        with_collectives(comm, |c| {
            self.0.setup(params_to_ffi(params), optimizer_json.into(), code, c)
        })
        .into_result()
    }
    fn step(&mut self, lr: f64, comm: &dyn Collectives) -> PluginResult<StepReport> {
        let r = with_collectives(comm, |c| self.0.step(lr, c)).into_result()?;
        Ok(StepReport {
            grad_norm: r.grad_norm,
            skipped: r.skipped,
            metrics: r.metrics.into_iter().map(|t| (t.0.into_string(), t.1)).collect(),
        })
    }
    fn zero_grad(&mut self) -> PluginResult<()> {
        self.0.zero_grad().into_result()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.0.state_dict().into_result().map(named_from_ffi)
    }
    fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.0.load_state_dict(named_to_ffi(state)).into_result()
    }
}
