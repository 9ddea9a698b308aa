//! `ferrotune launch --nproc N [--nnodes M --node-rank K --master-addr A --master-port P]
//! train config.yaml`: starts this node's ranks of a multi-process run.
//!
//! Each rank is this executable run with the given arguments and torchrun's environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), so
//! any other launcher that sets those variables (torchrun, SLURM, mpirun wrappers) starts the
//! same run. Every output line of a rank is printed with a `[rank i]` prefix (stdout to
//! stdout, stderr to stderr), and the launcher prints `[launch] rank i pid P` for each rank.
//! When a rank exits unsuccessfully the launcher kills the others and fails with that rank's
//! status and last error lines, so a crashed rank never leaves the others waiting in a
//! collective.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How to start this node's ranks.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Ranks on this node.
    pub nproc: usize,
    /// Nodes in the run.
    pub nnodes: usize,
    /// This node's index, 0..nnodes.
    pub node_rank: usize,
    pub master_addr: String,
    /// `None`: a free local port (single node only).
    pub master_port: Option<u16>,
    /// The ferrotune command line each rank runs (`train config.yaml`).
    pub args: Vec<String>,
    /// Rendezvous and collective timeout passed to the ranks (`FERROTUNE_DIST_TIMEOUT`).
    pub timeout: Option<Duration>,
}

/// Lines of a rank's stderr kept for the error report.
const KEEP_LINES: usize = 20;

/// A free TCP port on the loopback interface.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free local port for MASTER_PORT")?;
    Ok(l.local_addr()?.port())
}

/// Starts the ranks and waits for them; `Ok` when every rank exits successfully.
pub fn launch(opts: &LaunchOptions) -> Result<()> {
    if opts.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if opts.nnodes == 0 || opts.node_rank >= opts.nnodes {
        bail!("--node-rank {} must be below --nnodes {}", opts.node_rank, opts.nnodes);
    }
    if opts.args.is_empty() {
        bail!("launch needs the command the ranks run, e.g. `ferrotune launch --nproc 2 train config.yaml`");
    }
    let master_port = match opts.master_port {
        Some(p) => p,
        None if opts.nnodes == 1 => free_port()?,
        None => {
            bail!("--master-port is required with --nnodes > 1 (every node must use the same one)")
        }
    };
    let world = opts.nproc * opts.nnodes;
    let exe = std::env::current_exe().context("cannot locate the ferrotune executable")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let tails: Vec<Arc<Mutex<VecDeque<String>>>> =
        (0..opts.nproc).map(|_| Arc::new(Mutex::new(VecDeque::new()))).collect();
    let mut readers = Vec::new();
    for (local, tail) in tails.iter().enumerate() {
        let rank = opts.node_rank * opts.nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&opts.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc.to_string())
            .env("GROUP_RANK", opts.node_rank.to_string())
            .env("MASTER_ADDR", &opts.master_addr)
            .env("MASTER_PORT", master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = opts.timeout {
            cmd.env("FERROTUNE_DIST_TIMEOUT", t.as_secs_f64().to_string());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children);
                return Err(e)
                    .with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            }
        };
        eprintln!("[launch] rank {rank} pid {}", child.id());
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        readers.push(std::thread::spawn(move || forward_lines(out, rank, false, None)));
        let tail = tail.clone();
        readers.push(std::thread::spawn(move || forward_lines(err, rank, true, Some(tail))));
        children.push((rank, child));
    }
    // Wait until all succeed or one fails.
    let mut done = vec![false; children.len()];
    let failure = loop {
        let mut failed = None;
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(status) = child.try_wait().context("waiting for a rank")? {
                done[i] = true;
                if !status.success() {
                    failed = Some((i, *rank, status));
                    break;
                }
            }
        }
        if let Some(f) = failed {
            break Some(f);
        }
        if done.iter().all(|d| *d) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some((i, rank, status)) = failure {
        let started = Instant::now();
        stop_all(&mut children);
        // The failed rank's pipes are closed: its last lines are in.
        let _ = std::io::stderr().flush();
        let tail: Vec<String> =
            tails[i].lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
        let how = match status.code() {
            Some(c) => format!("exit status {c}"),
            None => {
                use std::os::unix::process::ExitStatusExt;
                format!("signal {}", status.signal().unwrap_or(0))
            }
        };
        tracing::debug!("stopped the other ranks in {:?}", started.elapsed());
        bail!(
            "rank {rank} of {world} failed ({how}); the other ranks of this node were stopped{}",
            if tail.is_empty() {
                String::new()
            } else {
                format!(". Its last error lines:\n{}", tail.join("\n"))
            }
        );
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(())
}

/// Kills the ranks still running and reaps them all.
fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

/// Copies a rank's output line by line with a `[rank i]` prefix, keeping the last lines of
/// stderr in `tail`.
fn forward_lines(
    from: impl std::io::Read,
    rank: usize,
    is_err: bool,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    let reader = BufReader::new(from);
    for line in reader.split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\r');
        // Progress bars redraw with '\r': keep the last frame only.
        let text = text.rsplit('\r').next().unwrap_or(text);
        if is_err {
            eprintln!("[rank {rank}] {text}");
        } else {
            println!("[rank {rank}] {text}");
        }
        if let Some(t) = &tail {
            if let Ok(mut t) = t.lock() {
                t.push_back(text.to_string());
                while t.len() > KEEP_LINES {
                    t.pop_front();
                }
            }
        }
    }
}
