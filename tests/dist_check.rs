//! `ferrotune dist-check`, the process-group check (README: distributed backends).
//!
//! * `gloo_two_ranks_pass_every_check`: `launch --nproc 2 dist-check --backend gloo` on CPU:
//!   each rank prints one JSON line whose every collective (all_reduce sum/avg/max/min, a
//!   non-contiguous and a CPU tensor, broadcast, all_gather, reduce_scatter sum/avg, barrier)
//!   matched its closed form, with timings.
//! * `world_of_one_still_joins_the_group`: `dist-check` alone runs the same checks through a
//!   real Gloo group of one (not the single-process shortcut that training takes).
//! * `nccl_without_a_gpu_fails_clearly` (machines without CUDA): an NCCL request, by flag or by
//!   `FERROTUNE_DIST_BACKEND`, fails fast with the reason, on every rank, and no rank hangs.
//!
//! Needs `cargo build -p ferrotune` and a build with c10d (libgloo-dev installed); no Python.
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferrotune::dist::collectives::{HAS_C10D, HAS_NCCL};
use ferrotune_tests::*;
use serde_json::Value;

const CHECKS: [&str; 11] = [
    "all_reduce_sum",
    "all_reduce_avg",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_noncontiguous",
    "all_reduce_cpu_tensor",
    "broadcast",
    "all_gather",
    "reduce_scatter_sum",
    "reduce_scatter_avg",
    "barrier",
];

/// Runs the CLI with `envs`, killed after `limit` (the test then fails instead of hanging).
fn run_bounded(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut cmd = Command::new(ferrotune_bin());
    cmd.args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_DIST_BACKEND")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run ferrotune");
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let o = child.wait_with_output().unwrap();
            panic!("ferrotune {args:?} still running after {limit:?}; stderr:\n{}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    (o, start.elapsed())
}

/// The JSON line of each rank, by rank (`[rank i] {...}` under launch, bare otherwise).
fn rank_lines(out: &str) -> Vec<Value> {
    let mut lines: Vec<Value> = out
        .lines()
        .filter_map(|l| {
            let body = match l.strip_prefix("[rank ") {
                Some(rest) => rest.split_once("] ")?.1,
                None => l,
            };
            serde_json::from_str::<Value>(body).ok().filter(|v| v.get("checks").is_some())
        })
        .collect();
    lines.sort_by_key(|v| v["rank"].as_u64());
    lines
}

fn assert_all_passed(line: &Value, world: u64) {
    assert_eq!(line["ok"], true, "{line}");
    assert_eq!(line["world_size"], world, "{line}");
    assert_eq!(line["backend"], "gloo", "{line}");
    assert_eq!(line["device"], "cpu", "{line}");
    for name in CHECKS {
        let c = &line["checks"][name];
        assert_eq!(c["ok"], true, "{name}: {line}");
        assert!(c["ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{name} has no time: {line}");
    }
    assert_eq!(line["checks"].as_object().unwrap().len(), CHECKS.len(), "{line}");
    let bench = &line["all_reduce_bench"];
    assert_eq!(bench["numel"], 65536, "{line}");
    assert!(bench["ms_per_iter"].as_f64().is_some_and(|ms| ms > 0.0), "{line}");
}

#[test]
fn gloo_two_ranks_pass_every_check() {
    if !HAS_C10D {
        eprintln!("skipped: this build has no c10d (install libgloo-dev and rebuild)");
        return;
    }
    let args = [
        "launch",
        "--nproc",
        "2",
        "--timeout",
        "60",
        "dist-check",
        "--backend",
        "gloo",
        "--numel",
        "65536",
        "--iters",
        "3",
    ];
    let (o, took) = run_bounded(&args, &[], Duration::from_secs(120));
    assert!(o.status.success(), "dist-check failed:\n{}\n{}", stdout(&o), stderr(&o));
    let lines = rank_lines(&stdout(&o));
    assert_eq!(lines.len(), 2, "one JSON line per rank:\n{}", stdout(&o));
    for (r, line) in lines.iter().enumerate() {
        assert_eq!(line["rank"], r as u64, "{line}");
        assert_eq!(line["local_rank"], r as u64, "{line}");
        assert_all_passed(line, 2);
    }
    println!(
        "2 gloo ranks checked in {:.2} s: {}",
        took.as_secs_f64(),
        lines[0]["all_reduce_bench"]
    );
}

#[test]
fn world_of_one_still_joins_the_group() {
    if !HAS_C10D {
        eprintln!("skipped: this build has no c10d");
        return;
    }
    let (o, _) = run_bounded(
        &["dist-check", "--numel", "65536", "--iters", "2"],
        &[],
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "dist-check failed:\n{}\n{}", stdout(&o), stderr(&o));
    let lines = rank_lines(&stdout(&o));
    assert_eq!(lines.len(), 1, "{}", stdout(&o));
    assert_eq!(lines[0]["rank"], 0);
    assert_all_passed(&lines[0], 1);
}

#[test]
fn nccl_without_a_gpu_fails_clearly() {
    if !HAS_C10D || tch::Cuda::is_available() {
        eprintln!("skipped: needs a c10d build on a machine without CUDA");
        return;
    }
    let why = if HAS_NCCL {
        "NCCL backend requested but CUDA is not available here (CUDA not available): NCCL needs a GPU per rank; use FERROTUNE_DIST_BACKEND=gloo"
    } else {
        "NCCL backend requested: this ferrotune was built without c10d NCCL"
    };
    // By flag, two ranks: the failing rank says why, launch names it, nobody waits.
    let (o, took) = run_bounded(
        &["launch", "--nproc", "2", "--timeout", "60", "dist-check", "--backend", "nccl"],
        &[],
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "an NCCL request without a GPU must fail:\n{err}");
    // The first rank to fail stops the other, which may not have printed yet: either names why.
    assert!((0..2).any(|r| err.contains(&format!("rank {r} of 2: {why}"))), "{err}");
    assert!(err.contains("failed (exit status 1)"), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(rank_lines(&stdout(&o)).is_empty(), "{}", stdout(&o));
    // By environment, one launched rank (a real group of one is asked for).
    let (o, _) = run_bounded(
        &["launch", "--nproc", "1", "dist-check", "--device", "cpu"],
        &[("FERROTUNE_DIST_BACKEND", "nccl")],
        Duration::from_secs(60),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("rank 0 of 1: {why}")), "{}", stderr(&o));
    // An unknown backend names the variable and the choices.
    let (o, _) =
        run_bounded(&["dist-check"], &[("FERROTUNE_DIST_BACKEND", "mpi")], Duration::from_secs(60));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown distributed backend `mpi`: use gloo or nccl"),
        "{}",
        stderr(&o)
    );
}
