//! The process group handed to memory plugins: [`SingleProcess`] for a one-rank run, and
//! [`ProcessGroup`], libtorch's c10d (a `TCPStore` rendezvous, a `ProcessGroupGloo` and, on
//! CUDA, a `ProcessGroupNCCL`) reached through the host's C++ layer (`host/csrc/c10d.cpp`),
//! for runs over several ranks.
//!
//! Ranks meet through torchrun's environment variables ([`RankEnv`]): any launcher that sets
//! `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` (`ferrotune launch`,
//! torchrun, SLURM `srun` with a wrapper, mpirun) can start them. The c10d layer is built
//! only when the gloo headers are installed (`apt-get install libgloo-dev`); without them a
//! multi-rank run reports how to get it.
//!
//! Backends ([`Backend`]), chosen as torch does: a run whose device is CUDA gets NCCL for its
//! CUDA tensors and Gloo for its CPU tensors (torch's default `cpu:gloo,cuda:nccl`); a CPU
//! run gets Gloo. `FERROTUNE_DIST_BACKEND=gloo|nccl` overrides the choice.
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{Collectives, PluginError, PluginResult, ReduceOp};
use tch::{Device, Tensor};

/// A world of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, _tensor: &Tensor, _op: ReduceOp) -> PluginResult<()> {
        Ok(())
    }
    fn broadcast(&self, _tensor: &Tensor, root: usize) -> PluginResult<()> {
        if root != 0 {
            return Err(PluginError::invalid(format!("broadcast root {root} in a world of 1")));
        }
        Ok(())
    }
    fn all_gather(&self, tensor: &Tensor) -> PluginResult<Vec<Tensor>> {
        Ok(vec![tensor.shallow_clone()])
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, _op: ReduceOp) -> PluginResult<()> {
        tch::no_grad(|| output.shallow_clone().f_copy_(input))?;
        Ok(())
    }
    fn barrier(&self) -> PluginResult<()> {
        Ok(())
    }
}

/// Where this process sits in a multi-process run: torchrun's environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// Default timeout of the rendezvous and of each collective (`FERROTUNE_DIST_TIMEOUT`
/// seconds overrides it).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl RankEnv {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`. `None` when
    /// `WORLD_SIZE` is unset or 1 (a one-process run); an error names a missing or bad variable.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`RankEnv::from_env`] over any variable lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        Self::from_lookup_keeping(get, false)
    }

    /// Like [`RankEnv::from_lookup`]; with `keep_single`, a launched world of one rank
    /// (`WORLD_SIZE=1`) is kept as a group of one instead of `None`.
    pub fn from_lookup_keeping(
        get: impl Fn(&str) -> Option<String>,
        keep_single: bool,
    ) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim().parse::<usize>().with_context(|| {
                        format!("environment variable {k}={v:?} is not a non-negative integer")
                    })
                })
                .transpose()
        };
        let world_size = match num("WORLD_SIZE")? {
            None => return Ok(None),
            Some(1) if !keep_single => return Ok(None),
            Some(0) => bail!("environment variable WORLD_SIZE=0: a run needs at least one rank"),
            Some(n) => n,
        };
        let rank = num("RANK")?
            .context("WORLD_SIZE is set but RANK is not (set both, as torchrun does)")?;
        if rank >= world_size {
            bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse::<u16>().with_context(|| {
                format!("environment variable MASTER_PORT={p:?} is not a port number")
            })?,
            None => 29500,
        };
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port }))
    }
}

/// The timeout of rendezvous and collectives: `FERROTUNE_DIST_TIMEOUT` (seconds) or
/// [`DEFAULT_TIMEOUT`].
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("FERROTUNE_DIST_TIMEOUT") {
        Ok(v) => {
            let s: f64 = v.trim().parse().with_context(|| {
                format!("FERROTUNE_DIST_TIMEOUT={v:?} is not a number of seconds")
            })?;
            if !(s > 0.0 && s.is_finite()) {
                bail!("FERROTUNE_DIST_TIMEOUT={v:?} must be a positive number of seconds");
            }
            Ok(Duration::from_secs_f64(s))
        }
        Err(_) => Ok(DEFAULT_TIMEOUT),
    }
}

/// Whether this build has the c10d Gloo process group.
pub const HAS_C10D: bool = cfg!(ferrotune_c10d);

/// Whether this build has c10d's NCCL backend (a CUDA libtorch and the CUDA/NCCL headers
/// were found at build time; see host/build.rs).
pub const HAS_NCCL: bool = cfg!(ferrotune_nccl);

/// The error of a multi-rank run on a build without c10d.
pub const NO_C10D: &str =
    "this ferrotune was built without c10d Gloo (the gloo headers were missing): \
     apt-get install libgloo-dev (or `make setup`) and rebuild";

/// The error of an NCCL request on a build without it.
pub const NO_NCCL: &str =
    "this ferrotune was built without c10d NCCL (at build time the libtorch was not a CUDA \
     build, or the CUDA/NCCL headers were missing: `make setup` installs them; the build prints \
     `building c10d without NCCL: <why>`); use FERROTUNE_DIST_BACKEND=gloo, or rebuild";

/// The environment variable that overrides the backend choice ([`Backend::for_device`]).
pub const BACKEND_VAR: &str = "FERROTUNE_DIST_BACKEND";

/// The c10d backend of a process group: which library carries its CUDA tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `ProcessGroupGloo` for every tensor (CPU, and CUDA through host copies).
    Gloo,
    /// `ProcessGroupNCCL` for CUDA tensors on the rank's GPU, `ProcessGroupGloo` for CPU
    /// tensors (torch's `cpu:gloo,cuda:nccl`).
    Nccl,
}

impl Backend {
    /// `gloo` or `nccl` (any case).
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            _ => bail!("unknown distributed backend `{text}`: use gloo or nccl"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// The backend of a run on `device`: `requested` (the `FERROTUNE_DIST_BACKEND` value or a
    /// command-line choice) when given, else NCCL for a CUDA device and Gloo otherwise.
    pub fn for_device(device: Device, requested: Option<&str>) -> Result<Self> {
        match requested.map(str::trim).filter(|r| !r.is_empty()) {
            Some(r) => Self::parse(r).with_context(|| format!("{BACKEND_VAR}={r:?}")),
            None => Ok(if device.is_cuda() { Backend::Nccl } else { Backend::Gloo }),
        }
    }
}

/// libtorch's c10d process group of this rank (see [`Backend`]).
pub struct ProcessGroup {
    #[cfg(ferrotune_c10d)]
    raw: *mut ffi::RawGroup,
    rank: usize,
    world_size: usize,
    backend: Backend,
}

// The c10d group is used from one thread at a time (`&self` calls are serialised by the
// training loop); ProcessGroupGloo and ProcessGroupNCCL themselves are thread-safe.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessGroup({}, rank {} of {})",
            self.backend.name(),
            self.rank,
            self.world_size
        )
    }
}

impl ProcessGroup {
    /// Joins the Gloo group described by `env` ([`ProcessGroup::with_backend`]).
    pub fn new(env: &RankEnv, timeout: Duration) -> Result<Self> {
        Self::with_backend(env, timeout, Backend::Gloo, None)
    }

    /// Joins the group described by `env`: rank 0 hosts the TCPStore at
    /// `MASTER_ADDR:MASTER_PORT`, every rank waits there for the others (up to `timeout`),
    /// then Gloo connects them (`GLOO_SOCKET_IFNAME` picks the network interface) and, for
    /// [`Backend::Nccl`], NCCL on CUDA device `cuda_device` (default: `LOCAL_RANK`), which
    /// becomes this thread's current CUDA device. NCCL's communicator is connected here, so
    /// that two ranks on one GPU or a missing GPU fail now, not in the first collective.
    pub fn with_backend(
        env: &RankEnv,
        timeout: Duration,
        backend: Backend,
        cuda_device: Option<usize>,
    ) -> Result<Self> {
        let who = format!("rank {} of {}", env.rank, env.world_size);
        if !HAS_C10D {
            bail!("{who}: {NO_C10D}");
        }
        if backend == Backend::Nccl {
            if !HAS_NCCL {
                bail!("{who}: NCCL backend requested: {NO_NCCL}");
            }
            if !tch::Cuda::is_available() {
                bail!(
                    "{who}: NCCL backend requested but CUDA is not available here ({}): NCCL needs a GPU per rank; \
                     use {BACKEND_VAR}=gloo (or --backend gloo) and a cpu device",
                    crate::device::runtime_summary()
                );
            }
        }
        Self::join(env, timeout, backend, cuda_device.unwrap_or(env.local_rank))
    }

    /// The C++ side of [`ProcessGroup::with_backend`], without its availability checks.
    #[cfg(ferrotune_c10d)]
    fn join(
        env: &RankEnv,
        timeout: Duration,
        backend: Backend,
        cuda_device: usize,
    ) -> Result<Self> {
        let addr = std::ffi::CString::new(env.master_addr.clone())
            .context("MASTER_ADDR contains a NUL byte")?;
        let ifname =
            std::ffi::CString::new(std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default())
                .context("GLOO_SOCKET_IFNAME contains a NUL byte")?;
        let (rank, world) = (i32::try_from(env.rank)?, i32::try_from(env.world_size)?);
        let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        let mut err = std::ptr::null_mut();
        let raw = match backend {
            Backend::Gloo => unsafe {
                ffi::ft_pg_new(
                    addr.as_ptr(),
                    env.master_port,
                    rank,
                    world,
                    timeout_ms,
                    ifname.as_ptr(),
                    &mut err,
                )
            },
            Backend::Nccl => {
                let device = i32::try_from(cuda_device).context("CUDA device index")?;
                unsafe {
                    ffi::ft_pg_new_nccl(
                        addr.as_ptr(),
                        env.master_port,
                        rank,
                        world,
                        timeout_ms,
                        ifname.as_ptr(),
                        device,
                        &mut err,
                    )
                }
            }
        };
        if raw.is_null() {
            bail!(
                "rank {} of {}: cannot join the {} process group at {}:{} within {:?}: {}",
                env.rank,
                env.world_size,
                backend.name(),
                env.master_addr,
                env.master_port,
                timeout,
                ffi::take_error(err)
            );
        }
        Ok(Self { raw, rank: env.rank, world_size: env.world_size, backend })
    }

    #[cfg(not(ferrotune_c10d))]
    fn join(
        env: &RankEnv,
        _timeout: Duration,
        _backend: Backend,
        _cuda_device: usize,
    ) -> Result<Self> {
        bail!("rank {} of {}: {NO_C10D}", env.rank, env.world_size)
    }

    /// The Gloo group of this process from the environment, if the run has several ranks.
    pub fn from_env() -> Result<Option<Self>> {
        match RankEnv::from_env()? {
            None => Ok(None),
            Some(env) => Ok(Some(Self::new(&env, timeout_from_env()?)?)),
        }
    }

    /// The backend this group was made with.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The library that carries tensors on `device` in this group: `nccl` for CUDA tensors
    /// of an NCCL group, `gloo` otherwise.
    pub fn backend_for(&self, device: Device) -> &'static str {
        if self.backend == Backend::Nccl && device.is_cuda() {
            "nccl"
        } else {
            "gloo"
        }
    }

    #[cfg(ferrotune_c10d)]
    fn check(&self, what: &str, rc: i32, err: *mut std::ffi::c_char) -> PluginResult<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(PluginError::runtime(format!(
                "rank {} of {}: {what}: {}",
                self.rank,
                self.world_size,
                ffi::take_error(err)
            )))
        }
    }

    #[cfg(not(ferrotune_c10d))]
    fn unavailable<T>(&self) -> PluginResult<T> {
        Err(PluginError::unsupported(NO_C10D))
    }
}

#[cfg(ferrotune_c10d)]
impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ffi::ft_pg_free(self.raw) }
    }
}

fn check_op(op: ReduceOp) -> PluginResult<i32> {
    if op.0 <= 3 {
        Ok(op.0 as i32)
    } else {
        Err(PluginError::invalid(format!("unknown reduce op {}", op.0)))
    }
}

#[cfg(ferrotune_c10d)]
impl Collectives for ProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> PluginResult<()> {
        let op = check_op(op)?;
        let mut err = std::ptr::null_mut();
        let rc = tch::no_grad(|| unsafe {
            ffi::ft_pg_all_reduce(self.raw, ffi::ptr(tensor), op, &mut err)
        });
        self.check("all_reduce", rc, err)
    }
    fn broadcast(&self, tensor: &Tensor, root: usize) -> PluginResult<()> {
        if root >= self.world_size {
            return Err(PluginError::invalid(format!(
                "broadcast root {root} in a world of {}",
                self.world_size
            )));
        }
        let mut err = std::ptr::null_mut();
        let rc = tch::no_grad(|| unsafe {
            ffi::ft_pg_broadcast(self.raw, ffi::ptr(tensor), root as i32, &mut err)
        });
        self.check("broadcast", rc, err)
    }
    fn all_gather(&self, tensor: &Tensor) -> PluginResult<Vec<Tensor>> {
        let mut outs = vec![std::ptr::null_mut(); self.world_size];
        let mut err = std::ptr::null_mut();
        let rc = tch::no_grad(|| unsafe {
            ffi::ft_pg_all_gather(self.raw, ffi::ptr(tensor), outs.as_mut_ptr(), &mut err)
        });
        self.check("all_gather", rc, err)?;
        Ok(outs.into_iter().map(|p| unsafe { Tensor::from_ptr(p as *mut _) }).collect())
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> PluginResult<()> {
        let op = check_op(op)?;
        let mut err = std::ptr::null_mut();
        let rc = tch::no_grad(|| unsafe {
            ffi::ft_pg_reduce_scatter(self.raw, ffi::ptr(output), ffi::ptr(input), op, &mut err)
        });
        self.check("reduce_scatter", rc, err)
    }
    fn barrier(&self) -> PluginResult<()> {
        let mut err = std::ptr::null_mut();
        let rc = unsafe { ffi::ft_pg_barrier(self.raw, &mut err) };
        self.check("barrier", rc, err)
    }
}

#[cfg(not(ferrotune_c10d))]
impl Collectives for ProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce(&self, _: &Tensor, op: ReduceOp) -> PluginResult<()> {
        check_op(op)?;
        self.unavailable()
    }
    fn broadcast(&self, _: &Tensor, _: usize) -> PluginResult<()> {
        self.unavailable()
    }
    fn all_gather(&self, _: &Tensor) -> PluginResult<Vec<Tensor>> {
        self.unavailable()
    }
    fn reduce_scatter(&self, _: &Tensor, _: &Tensor, _: ReduceOp) -> PluginResult<()> {
        self.unavailable()
    }
    fn barrier(&self) -> PluginResult<()> {
        self.unavailable()
    }
}

/// The group of a run: one process, or c10d over several.
pub enum Group {
    Single(SingleProcess),
    C10d(ProcessGroup),
}

impl Group {
    /// A Gloo group when the environment describes several ranks, else one process.
    pub fn from_env() -> Result<Self> {
        Ok(match ProcessGroup::from_env()? {
            Some(pg) => Group::C10d(pg),
            None => Group::Single(SingleProcess),
        })
    }

    /// The group of a run on `device`: one process unless the environment describes several
    /// ranks; then c10d with [`Backend::for_device`] (NCCL for a CUDA device, Gloo for CPU;
    /// `FERROTUNE_DIST_BACKEND` overrides), NCCL on the run's CUDA device. A launched world
    /// of one (`WORLD_SIZE=1`) with `FERROTUNE_DIST_BACKEND` set also gets a real group of one
    /// (to check a backend on one GPU); without it, one process needs no group.
    pub fn from_env_for(device: Device) -> Result<Self> {
        Self::from_lookup_for(device, |k| std::env::var(k).ok())
    }

    /// [`Group::from_env_for`] over any variable lookup (tests).
    pub fn from_lookup_for(device: Device, get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let requested = get(BACKEND_VAR).filter(|v| !v.trim().is_empty());
        let env = RankEnv::from_lookup_keeping(&get, requested.is_some())?;
        let Some(env) = env else { return Ok(Group::Single(SingleProcess)) };
        let backend = Backend::for_device(device, requested.as_deref())?;
        let cuda_device = match device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        Ok(Group::C10d(ProcessGroup::with_backend(
            &env,
            timeout_from_env()?,
            backend,
            cuda_device,
        )?))
    }
    pub fn as_dyn(&self) -> &dyn Collectives {
        match self {
            Group::Single(s) => s,
            Group::C10d(p) => p,
        }
    }
}

/// A group is its process group (so that an `Arc<Group>` can be handed to the sharded
/// linear layers of ZeRO stage 3).
impl Collectives for Group {
    fn rank(&self) -> usize {
        self.as_dyn().rank()
    }
    fn world_size(&self) -> usize {
        self.as_dyn().world_size()
    }
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> PluginResult<()> {
        self.as_dyn().all_reduce(tensor, op)
    }
    fn broadcast(&self, tensor: &Tensor, root: usize) -> PluginResult<()> {
        self.as_dyn().broadcast(tensor, root)
    }
    fn all_gather(&self, tensor: &Tensor) -> PluginResult<Vec<Tensor>> {
        self.as_dyn().all_gather(tensor)
    }
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> PluginResult<()> {
        self.as_dyn().reduce_scatter(output, input, op)
    }
    fn barrier(&self) -> PluginResult<()> {
        self.as_dyn().barrier()
    }
}

#[cfg(ferrotune_c10d)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    /// `struct ft_pg` of c10d.cpp.
    #[repr(C)]
    pub struct RawGroup {
        _private: [u8; 0],
    }

    extern "C" {
        pub fn ft_free_error(err: *mut c_char);
        pub fn ft_pg_new(
            addr: *const c_char,
            port: u16,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            ifname: *const c_char,
            err: *mut *mut c_char,
        ) -> *mut RawGroup;
        pub fn ft_pg_new_nccl(
            addr: *const c_char,
            port: u16,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            ifname: *const c_char,
            device: c_int,
            err: *mut *mut c_char,
        ) -> *mut RawGroup;
        pub fn ft_pg_free(pg: *mut RawGroup);
        pub fn ft_pg_all_reduce(
            pg: *mut RawGroup,
            t: *mut c_void,
            op: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ft_pg_broadcast(
            pg: *mut RawGroup,
            t: *mut c_void,
            root: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ft_pg_all_gather(
            pg: *mut RawGroup,
            t: *mut c_void,
            outs: *mut *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ft_pg_reduce_scatter(
            pg: *mut RawGroup,
            out: *mut c_void,
            input: *mut c_void,
            op: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ft_pg_barrier(pg: *mut RawGroup, err: *mut *mut c_char) -> c_int;
    }

    /// The `at::Tensor*` behind a tch tensor (tch's `C_tensor` is a heap `at::Tensor`).
    pub fn ptr(t: &tch::Tensor) -> *mut c_void {
        t.as_ptr() as *mut c_void
    }

    /// Takes the C++ layer's malloc'ed message.
    pub fn take_error(err: *mut c_char) -> String {
        if err.is_null() {
            return "unknown error in the c10d layer".into();
        }
        let s = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
        unsafe { ft_free_error(err) };
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_env_reads_torchrun_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(RankEnv::from_lookup(env(&[])).unwrap(), None);
        assert_eq!(RankEnv::from_lookup(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let e = RankEnv::from_lookup(env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
            ("LOCAL_RANK", "0"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            RankEnv {
                rank: 1,
                world_size: 2,
                local_rank: 0,
                master_addr: "10.0.0.1".into(),
                master_port: 1234
            }
        );
        let err = RankEnv::from_lookup(env(&[("WORLD_SIZE", "2")])).unwrap_err().to_string();
        assert!(err.contains("RANK"), "{err}");
        let err = RankEnv::from_lookup(env(&[("WORLD_SIZE", "2"), ("RANK", "2")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=2"), "{err}");
        let err = RankEnv::from_lookup(env(&[("WORLD_SIZE", "two")])).unwrap_err().to_string();
        assert!(err.contains("WORLD_SIZE"), "{err}");
        let err = RankEnv::from_lookup(env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_PORT", "99999"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("MASTER_PORT"), "{err}");
    }

    #[test]
    fn a_launched_world_of_one_is_kept_on_request() {
        let one = |k: &str| match k {
            "WORLD_SIZE" => Some("1".to_string()),
            "RANK" => Some("0".to_string()),
            _ => None,
        };
        assert_eq!(RankEnv::from_lookup(one).unwrap(), None);
        let e = RankEnv::from_lookup_keeping(one, true).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (0, 1, 0));
        assert_eq!(RankEnv::from_lookup_keeping(|_| None, true).unwrap(), None);
    }

    #[test]
    fn backend_follows_the_device_unless_overridden() {
        assert_eq!(Backend::for_device(Device::Cpu, None).unwrap(), Backend::Gloo);
        assert_eq!(Backend::for_device(Device::Cuda(0), None).unwrap(), Backend::Nccl);
        assert_eq!(Backend::for_device(Device::Cuda(3), Some("")).unwrap(), Backend::Nccl);
        assert_eq!(Backend::for_device(Device::Cuda(0), Some("gloo")).unwrap(), Backend::Gloo);
        assert_eq!(Backend::for_device(Device::Cpu, Some(" NCCL ")).unwrap(), Backend::Nccl);
        let e = format!("{:#}", Backend::for_device(Device::Cpu, Some("mpi")).unwrap_err());
        assert!(
            e.contains("FERROTUNE_DIST_BACKEND=\"mpi\"") && e.contains("use gloo or nccl"),
            "{e}"
        );
    }

    /// The group of a run from its environment: one process, a forced world of one, or an
    /// NCCL request refused with its reason on a machine without a GPU.
    #[test]
    fn group_for_a_run_picks_single_or_c10d() {
        let port = crate::dist::launch::free_port().unwrap().to_string();
        let vars = move |pairs: Vec<(&'static str, String)>| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        };
        let single = Group::from_lookup_for(
            Device::Cpu,
            vars(vec![("WORLD_SIZE", "1".into()), ("RANK", "0".into())]),
        )
        .unwrap();
        assert!(matches!(single, Group::Single(_)));
        if !HAS_C10D {
            return;
        }
        let forced = vars(vec![
            ("WORLD_SIZE", "1".into()),
            ("RANK", "0".into()),
            ("MASTER_PORT", port),
            (BACKEND_VAR, "gloo".into()),
        ]);
        match Group::from_lookup_for(Device::Cpu, forced).unwrap() {
            Group::C10d(pg) => {
                assert_eq!((pg.backend(), pg.world_size()), (Backend::Gloo, 1));
                let t = Tensor::from_slice(&[1.0f32, 2.0]);
                pg.all_reduce(&t, ReduceOp::AVG).unwrap();
                assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0]);
            }
            Group::Single(_) => {
                panic!("FERROTUNE_DIST_BACKEND with WORLD_SIZE=1 must give a real group")
            }
        }
        if !tch::Cuda::is_available() {
            let nccl = vars(vec![
                ("WORLD_SIZE", "1".into()),
                ("RANK", "0".into()),
                (BACKEND_VAR, "nccl".into()),
            ]);
            let e = format!(
                "{:#}",
                Group::from_lookup_for(Device::Cpu, nccl)
                    .err()
                    .expect("NCCL without a GPU must fail")
            );
            let why = if HAS_NCCL {
                "NCCL backend requested but CUDA is not available here"
            } else {
                "built without c10d NCCL"
            };
            assert!(e.contains("rank 0 of 1") && e.contains(why), "{e}");
        }
    }

    /// The C++ NCCL constructor itself (past the Rust-side checks) refuses a machine without
    /// a GPU with an error, before any rendezvous: no hang, no crash.
    #[cfg(ferrotune_nccl)]
    #[test]
    fn nccl_constructor_without_a_gpu_is_an_error() {
        if tch::Cuda::is_available() {
            return;
        }
        let env = RankEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: crate::dist::launch::free_port().unwrap(),
        };
        let t0 = std::time::Instant::now();
        let e = format!(
            "{:#}",
            ProcessGroup::join(&env, Duration::from_secs(30), Backend::Nccl, 0)
                .expect_err("no GPU here")
        );
        assert!(
            e.contains("cannot join the nccl process group")
                && e.contains("ProcessGroupNCCL needs a CUDA GPU"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    }
}
