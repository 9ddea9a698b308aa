//! `ferrotune dist-check`: joins a c10d process group (Gloo, or NCCL + Gloo) and runs every
//! collective on tensors whose results have a closed form, checking each one exactly and
//! timing it; each rank prints one JSON line.
//!
//! Run it under a launcher (`ferrotune launch --nproc 2 dist-check`) or alone (a world of
//! one). Unlike a training run, a world of one still goes through the real process group
//! (not the single-process shortcut), so that NCCL can be checked on a machine with one GPU:
//! NCCL refuses two ranks on the same GPU.
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::tensor::{device_name, parse_device};
use ferrotune_plugin_api::{Collectives, ReduceOp};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::dist::collectives::{timeout_from_env, Backend, ProcessGroup, RankEnv, BACKEND_VAR};

/// What `dist-check` runs.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// `gloo` or `nccl`; `None`: `FERROTUNE_DIST_BACKEND`, else NCCL for a CUDA device.
    pub backend: Option<String>,
    /// `cpu`, `cuda` (cuda:LOCAL_RANK) or `cuda:N`; `None`: `cuda` for NCCL, else `cpu`.
    pub device: Option<String>,
    /// Elements (f32) of the timed all-reduce.
    pub numel: usize,
    /// Timed all-reduce repetitions (after one warm-up).
    pub iters: usize,
}

/// Elements of the tensors the checks use.
const CHECK_NUMEL: i64 = 1024;

/// One rank's result: the JSON line and whether every check passed.
pub struct CheckReport {
    pub json: Value,
    pub passed: bool,
}

/// Joins the group of this process (or a world of one) and runs the checks.
pub fn run(opts: &CheckOptions) -> Result<CheckReport> {
    let env = match RankEnv::from_lookup_keeping(|k| std::env::var(k).ok(), true)? {
        Some(env) => env,
        None => RankEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: crate::dist::launch::free_port()?,
        },
    };
    let requested = opts
        .backend
        .clone()
        .or_else(|| std::env::var(BACKEND_VAR).ok())
        .filter(|b| !b.trim().is_empty());
    let requested_backend = requested
        .as_deref()
        .map(Backend::parse)
        .transpose()
        .with_context(|| format!("--backend / {BACKEND_VAR}"))?;
    let device_text = opts.device.clone().unwrap_or_else(|| {
        if requested_backend == Some(Backend::Nccl) {
            "cuda".into()
        } else {
            "cpu".into()
        }
    });
    // The device is parsed now and checked after the group is made, so that an NCCL request
    // on a machine without a GPU reports the NCCL error rather than only the device's.
    let parsed = match parse_device(&device_text).map_err(|e| anyhow::anyhow!("{}", e.message()))? {
        Device::Cuda(_) if crate::device::is_plain_cuda(&device_text) => {
            Device::Cuda(env.local_rank)
        }
        d => d,
    };
    let backend = Backend::for_device(parsed, requested.as_deref())?;
    let timeout = timeout_from_env()?;
    let started = Instant::now();
    let cuda_device = match parsed {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let pg = ProcessGroup::with_backend(&env, timeout, backend, cuda_device)?;
    let setup_ms = ms(started.elapsed());
    let device = crate::device::resolve(&device_name(parsed))?;

    let (checks, mut passed) = run_checks(&pg, &env, device);
    let bench = match bench_all_reduce(&pg, opts, device, env.world_size as f64) {
        Ok(v) => v,
        Err(e) => {
            passed = false;
            json!({"error": format!("{e:#}")})
        }
    };
    let json = json!({
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "backend": backend.name(),
        "device": device_name(device),
        "tensor_backend": pg.backend_for(device),
        "setup_ms": setup_ms,
        "checks": checks,
        "all_reduce_bench": bench,
        "ok": passed,
    });
    Ok(CheckReport { json, passed })
}

/// Every collective on tensors whose results have a closed form: each check's outcome and
/// time by name, and whether all passed.
fn run_checks(
    pg: &ProcessGroup,
    env: &RankEnv,
    device: Device,
) -> (serde_json::Map<String, Value>, bool) {
    let (r, w) = (env.rank as f64, env.world_size as f64);
    let mut checks = serde_json::Map::new();
    let mut passed = true;
    let mut check = |name: &str, f: &mut dyn FnMut() -> Result<()>| {
        let t0 = Instant::now();
        let outcome = f().and_then(|()| sync(device));
        let elapsed = ms(t0.elapsed());
        let entry = match outcome {
            Ok(()) => json!({"ok": true, "ms": elapsed}),
            Err(e) => {
                passed = false;
                json!({"ok": false, "ms": elapsed, "error": format!("{e:#}")})
            }
        };
        checks.insert(name.to_string(), entry);
    };
    let opt = (Kind::Float, device);
    // x_i = i + rank on every rank: the reductions over ranks have closed forms in i.
    let ramp = |n: i64| -> Result<Tensor> { Ok(Tensor::f_arange(n, opt)?.f_add_scalar(r)?) };
    let i = || Tensor::f_arange(CHECK_NUMEL, opt);
    let reduce = |op: ReduceOp, want: &dyn Fn(Tensor) -> Result<Tensor>| -> Result<()> {
        let t = ramp(CHECK_NUMEL)?;
        pg.all_reduce(&t, op)?;
        same(&t, &want(i()?)?)
    };
    check("all_reduce_sum", &mut || {
        reduce(ReduceOp::SUM, &|i| Ok(i.f_mul_scalar(w)?.f_add_scalar(w * (w - 1.0) / 2.0)?))
    });
    check("all_reduce_avg", &mut || {
        reduce(ReduceOp::AVG, &|i| Ok(i.f_add_scalar((w - 1.0) / 2.0)?))
    });
    check("all_reduce_max", &mut || reduce(ReduceOp::MAX, &|i| Ok(i.f_add_scalar(w - 1.0)?)));
    check("all_reduce_min", &mut || reduce(ReduceOp::MIN, &|i| Ok(i)));
    check("all_reduce_noncontiguous", &mut || {
        // A transposed view: reduced through a contiguous copy and written back.
        let t = ramp(2 * CHECK_NUMEL)?.f_view([2, CHECK_NUMEL])?.f_transpose(0, 1)?;
        pg.all_reduce(&t, ReduceOp::SUM)?;
        let want = Tensor::f_arange(2 * CHECK_NUMEL, opt)?
            .f_view([2, CHECK_NUMEL])?
            .f_transpose(0, 1)?
            .f_mul_scalar(w)?
            .f_add_scalar(w * (w - 1.0) / 2.0)?;
        same(&t, &want)
    });
    check("all_reduce_cpu_tensor", &mut || {
        // A CPU scalar (a loss, a norm partial): Gloo carries it in an NCCL group too.
        let t = Tensor::from_slice(&[r + 1.0]);
        pg.all_reduce(&t, ReduceOp::SUM)?;
        same(&t, &Tensor::from_slice(&[w * (w + 1.0) / 2.0]))
    });
    check("broadcast", &mut || {
        let root = env.world_size - 1;
        let t = ramp(CHECK_NUMEL)?;
        pg.broadcast(&t, root)?;
        same(&t, &i()?.f_add_scalar(root as f64)?)
    });
    check("all_gather", &mut || {
        let parts = pg.all_gather(&ramp(CHECK_NUMEL)?)?;
        if parts.len() != env.world_size {
            bail!("{} tensors gathered in a world of {}", parts.len(), env.world_size);
        }
        for (k, p) in parts.iter().enumerate() {
            if p.device() != device {
                bail!(
                    "part {k} is on {}, the input on {}",
                    device_name(p.device()),
                    device_name(device)
                );
            }
            same(p, &i()?.f_add_scalar(k as f64)?).with_context(|| format!("part {k}"))?;
        }
        Ok(())
    });
    let scatter = |op: ReduceOp, avg: bool| -> Result<()> {
        let m = CHECK_NUMEL;
        let input = ramp(m * env.world_size as i64)?;
        let out = Tensor::f_zeros([m], opt)?;
        pg.reduce_scatter(&out, &input, op)?;
        // This rank's chunk holds j = rank*m + k; the sum over ranks is w*j + w(w-1)/2.
        let j = i()?.f_add_scalar(r * m as f64)?;
        let want = if avg {
            j.f_add_scalar((w - 1.0) / 2.0)?
        } else {
            j.f_mul_scalar(w)?.f_add_scalar(w * (w - 1.0) / 2.0)?
        };
        same(&out, &want)
    };
    check("reduce_scatter_sum", &mut || scatter(ReduceOp::SUM, false));
    check("reduce_scatter_avg", &mut || scatter(ReduceOp::AVG, true));
    check("barrier", &mut || Ok(pg.barrier()?));
    (checks, passed)
}

/// Throughput: all-reduce (sum) of `numel` f32, after one warm-up.
fn bench_all_reduce(
    pg: &ProcessGroup,
    opts: &CheckOptions,
    device: Device,
    w: f64,
) -> Result<Value> {
    let opt = (Kind::Float, device);
    let numel = i64::try_from(opts.numel.max(1))?;
    let t = Tensor::f_ones([numel], opt)?;
    pg.all_reduce(&t, ReduceOp::SUM)?;
    sync(device)?;
    let t0 = Instant::now();
    for _ in 0..opts.iters.max(1) {
        pg.all_reduce(&t, ReduceOp::SUM)?;
    }
    sync(device)?;
    let per = t0.elapsed().as_secs_f64() / opts.iters.max(1) as f64;
    let bytes = numel as f64 * 4.0;
    let algbw = bytes / per / 1e9;
    Ok(json!({
        "numel": numel,
        "iters": opts.iters.max(1),
        "ms_per_iter": per * 1e3,
        "algbw_gb_s": algbw,
        // NCCL's bus bandwidth convention for all-reduce: algbw * 2(w-1)/w.
        "busbw_gb_s": algbw * 2.0 * (w - 1.0) / w,
    }))
}

/// Exact equality (the checks use small integers and halves, exact in f32).
fn same(got: &Tensor, want: &Tensor) -> Result<()> {
    if got.size() != want.size() {
        bail!("shape {:?}, expected {:?}", got.size(), want.size());
    }
    let got = got.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
    let want = want.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
    let diff = got.f_sub(&want)?.f_abs()?.f_max()?.f_double_value(&[])?;
    if diff != 0.0 {
        let first = |t: &Tensor| {
            Vec::<f64>::try_from(t.flatten(0, -1).narrow(0, 0, t.numel().min(4) as i64))
                .unwrap_or_default()
        };
        bail!(
            "max |got - expected| = {diff} (first values {:?}, expected {:?})",
            first(&got),
            first(&want)
        );
    }
    Ok(())
}

/// Waits for the device's queued work, so that timings include it.
fn sync(device: Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
