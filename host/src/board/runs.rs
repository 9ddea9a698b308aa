//! Runs: the output directories under `--runs`, their state, live metrics and logs (server-sent
//! events that follow the files as they grow), and the runs the board starts, stops and
//! resumes as child processes.
//!
//! A run's state: for a run this board started, its child process (running; finished on exit
//! status 0; stopped when the board stopped it; failed otherwise), kept in `board.json` beside
//! the run so a later board knows it too. For other runs, the files: `train_summary.json`
//! (written at the end) means finished, a `metrics.jsonl` written in the last
//! [`ACTIVE_SECS`] seconds running, anything else stopped (checkpoints can resume it).
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{valid_name, Board};
use crate::serve::error::ApiError;

/// The board's record of a run it started.
pub const RECORD: &str = "board.json";
/// The config a board run trains with (output_dir set to the run's folder).
pub const CONFIG: &str = "board_config.yaml";
/// A board run's stdout and stderr.
pub const LOG: &str = "train.log";
const METRICS: &str = "metrics.jsonl";
const SUMMARY: &str = "train_summary.json";
/// A run not started by this board whose metrics changed this recently is shown as running.
const ACTIVE_SECS: u64 = 60;
/// How often the streams look at their file.
const POLL: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Finished,
    Failed,
    Stopped,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// `board.json`: what the board started, and how it ended.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    command: Vec<String>,
    nproc: usize,
    pid: u32,
    state: RunState,
    exit_code: Option<i32>,
    started: u64,
    #[serde(default)]
    ended: Option<u64>,
}

struct Running {
    child: Child,
    /// The board sent it SIGTERM.
    stopping: bool,
}

/// The children this board started, by run name.
pub struct Supervisor {
    root: PathBuf,
    children: Mutex<HashMap<String, Running>>,
    /// `--plugin-dir` arguments the children get.
    pub plugin_args: Vec<String>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read_record(dir: &FsPath) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()
}

fn write_record(dir: &FsPath, r: &Record) -> anyhow::Result<()> {
    crate::util::atomic::write(&dir.join(RECORD), serde_json::to_vec_pretty(r)?)
}

/// Whether process `pid` is alive (and not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Whether `pid` is alive and still the `ferrotune` that trains run folder `dir` (its command
/// line names the run's config: a pid the system gave to another process since is not it).
fn is_run_process(pid: u32, dir: &FsPath) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    alive(pid)
        && String::from_utf8_lossy(&cmdline).contains(&dir.join(CONFIG).display().to_string())
}

/// Whether folder `dir` holds a run's files.
fn is_run(dir: &FsPath) -> bool {
    [METRICS, RECORD, SUMMARY, "adapter_config.json", LOG].iter().any(|f| dir.join(f).is_file())
        || checkpoints(dir).next().is_some()
}

/// `checkpoint-N` folders, unsorted.
fn checkpoints(dir: &FsPath) -> impl Iterator<Item = (String, usize)> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
        e.path().is_dir().then_some((name, step))
    })
}

fn sorted_checkpoints(dir: &FsPath) -> Vec<(String, usize)> {
    let mut c: Vec<_> = checkpoints(dir).collect();
    c.sort_by_key(|(_, s)| *s);
    c
}

fn modified(p: &FsPath) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The last line of `metrics.jsonl` that parses, and how many lines parse.
fn metrics_summary(dir: &FsPath) -> (usize, Option<Value>) {
    let Ok(text) = std::fs::read_to_string(dir.join(METRICS)) else { return (0, None) };
    let mut n = 0;
    let mut last = None;
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            n += 1;
            last = Some(v);
        }
    }
    (n, last)
}

impl Supervisor {
    pub fn new(root: &FsPath, plugin_args: Vec<String>) -> Self {
        Self { root: root.to_path_buf(), children: Mutex::new(HashMap::new()), plugin_args }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The folder of run `name`: 404 when there is none.
    pub fn dir_of(&self, name: &str) -> Result<PathBuf, ApiError> {
        valid_name(name)?;
        let dir = self.root.join(name);
        if dir.is_dir() && (is_run(&dir) || self.lock().contains_key(name)) {
            Ok(dir)
        } else {
            Err(ApiError::new(404, "not_found_error", format!("no run `{name}` under --runs")))
        }
    }

    /// The names of the runs under the root, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| valid_name(n).is_ok() && is_run(&self.root.join(n)))
            .collect();
        names.sort();
        names
    }

    /// The state of run `name` (folder `dir`), with its exit code; records a child's exit.
    pub fn state(&self, name: &str, dir: &FsPath) -> (RunState, Option<i32>) {
        let mut children = self.lock();
        if let Some(r) = children.get_mut(name) {
            match r.child.try_wait() {
                Ok(None) => return (RunState::Running, None),
                Ok(Some(status)) => {
                    let code = status.code();
                    let state = if r.stopping {
                        RunState::Stopped
                    } else if status.success() {
                        RunState::Finished
                    } else {
                        RunState::Failed
                    };
                    if let Some(mut rec) = read_record(dir) {
                        rec.state = state;
                        rec.exit_code = code;
                        rec.ended = Some(now());
                        if let Err(e) = write_record(dir, &rec) {
                            eprintln!("board: cannot update {}: {e:#}", dir.join(RECORD).display());
                        }
                    }
                    children.remove(name);
                    return (state, code);
                }
                Err(_) => return (RunState::Failed, None),
            }
        }
        drop(children);
        let record = read_record(dir);
        if let Some(rec) = &record {
            if rec.state != RunState::Running {
                return (rec.state, rec.exit_code);
            }
            if is_run_process(rec.pid, dir) {
                // Started by an earlier board that is gone; still going.
                return (RunState::Running, None);
            }
        }
        if dir.join(SUMMARY).is_file() {
            return (RunState::Finished, None);
        }
        if record.is_some() {
            // A board run whose process is gone without an end recorded.
            return (RunState::Failed, None);
        }
        let recent = modified(&dir.join(METRICS))
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age.as_secs() < ACTIVE_SECS);
        (if recent { RunState::Running } else { RunState::Stopped }, None)
    }

    /// Starts `train CONFIG` (`launch --nproc N train CONFIG` for N > 1; `--resume` to go on
    /// from the newest checkpoint) in run folder `dir`, its output appended to `train.log`.
    pub fn spawn(
        &self,
        name: &str,
        dir: &FsPath,
        nproc: usize,
        resume: bool,
    ) -> Result<(), ApiError> {
        let mut children = self.lock();
        if children.contains_key(name) {
            return Err(ApiError::new(
                409,
                "invalid_request_error",
                format!("run `{name}` is running"),
            ));
        }
        let exe = std::env::current_exe().map_err(|e| {
            ApiError::new(500, "server_error", format!("cannot find the ferrotune executable: {e}"))
        })?;
        let mut args: Vec<String> = self.plugin_args.clone();
        if nproc > 1 {
            args.extend(["launch".into(), "--nproc".into(), nproc.to_string()]);
        }
        args.extend(["train".into(), dir.join(CONFIG).display().to_string()]);
        if resume {
            args.push("--resume".into());
        }
        let log_path = dir.join(LOG);
        let open = || std::fs::OpenOptions::new().create(true).append(true).open(&log_path);
        let (out, err) = match (open(), open()) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => {
                return Err(ApiError::new(
                    500,
                    "server_error",
                    format!("cannot write {}: {e}", log_path.display()),
                ))
            }
        };
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&args).current_dir(dir).stdin(Stdio::null()).stdout(out).stderr(err);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a stop reaches every rank `launch` started.
            cmd.process_group(0);
        }
        let child = cmd.spawn().map_err(|e| {
            ApiError::new(500, "server_error", format!("cannot start {}: {e}", exe.display()))
        })?;
        let mut command = vec!["ferrotune".to_string()];
        command.extend(args);
        let rec = Record {
            command,
            nproc,
            pid: child.id(),
            state: RunState::Running,
            exit_code: None,
            started: now(),
            ended: None,
        };
        if let Err(e) = write_record(dir, &rec) {
            eprintln!("board: cannot write {}: {e:#}", dir.join(RECORD).display());
        }
        children.insert(name.to_string(), Running { child, stopping: false });
        Ok(())
    }

    /// Sends SIGTERM to a running child's process group.
    pub fn stop(&self, name: &str) -> Result<(), ApiError> {
        let mut children = self.lock();
        let Some(r) = children.get_mut(name) else {
            drop(children);
            return self.stop_orphan(name);
        };
        if matches!(r.child.try_wait(), Ok(Some(_))) {
            return Err(ApiError::new(
                409,
                "invalid_request_error",
                format!("run `{name}` has ended"),
            ));
        }
        r.stopping = true;
        terminate(r.child.id());
        Ok(())
    }

    /// Stops a run an earlier board started and left running (that board was killed): its
    /// recorded process, if it is still that run's `ferrotune`.
    fn stop_orphan(&self, name: &str) -> Result<(), ApiError> {
        let dir = self.root.join(name);
        let not_running = || {
            ApiError::new(
                409,
                "invalid_request_error",
                format!("run `{name}` is not running under a board (runs started elsewhere are stopped where they run)"),
            )
        };
        let Some(mut rec) = read_record(&dir).filter(|r| r.state == RunState::Running) else {
            return Err(not_running());
        };
        if !is_run_process(rec.pid, &dir) {
            return Err(not_running());
        }
        terminate(rec.pid);
        rec.state = RunState::Stopped;
        rec.ended = Some(now());
        write_record(&dir, &rec).map_err(|e| {
            ApiError::new(
                500,
                "server_error",
                format!("cannot update {}: {e:#}", dir.join(RECORD).display()),
            )
        })?;
        Ok(())
    }

    /// Stops every child (the board is exiting) and waits a little for them.
    pub fn stop_all(&self) {
        let mut children = self.lock();
        for r in children.values_mut() {
            r.stopping = true;
            terminate(r.child.id());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for (name, r) in children.iter_mut() {
            while matches!(r.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(r.child.try_wait(), Ok(None)) {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
            let dir = self.root.join(name);
            if let Some(mut rec) = read_record(&dir) {
                rec.state = RunState::Stopped;
                rec.exit_code = r.child.try_wait().ok().flatten().and_then(|s| s.code());
                rec.ended = Some(now());
                let _ = write_record(&dir, &rec);
            }
        }
        children.clear();
    }
}

/// SIGTERM to process group `pid` (the child leads its own group).
fn terminate(pid: u32) {
    #[cfg(unix)]
    unsafe {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
        libc::kill(-(pid as libc::pid_t), libc::SIGTERM);
    }
}

/// One run as the list shows it.
fn summary(b: &Board, name: &str) -> Value {
    let dir = b.roots.runs.join(name);
    let (state, _) = b.runs.state(name, &dir);
    let (steps, last) = metrics_summary(&dir);
    let modified = [METRICS, LOG, RECORD]
        .iter()
        .filter_map(|f| modified(&dir.join(f)))
        .max()
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    json!({
        "name": name,
        "path": dir,
        "state": state.name(),
        "started_by_board": dir.join(RECORD).is_file(),
        "steps": steps,
        "last": last,
        "checkpoints": sorted_checkpoints(&dir).into_iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "has_adapter": dir.join("adapter_config.json").is_file(),
        "modified": modified,
    })
}

pub async fn list(State(b): State<Arc<Board>>) -> Json<Value> {
    let runs: Vec<Value> = b.runs.names().iter().map(|n| summary(&b, n)).collect();
    Json(json!({ "runs": runs }))
}

pub async fn detail(
    State(b): State<Arc<Board>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let dir = b.runs.dir_of(&name)?;
    let (state, exit_code) = b.runs.state(&name, &dir);
    let record = read_record(&dir);
    let error = if state == RunState::Failed { last_error(&dir.join(LOG)) } else { None };
    Ok(Json(json!({
        "name": name,
        "path": dir,
        "state": state.name(),
        "config_yaml": std::fs::read_to_string(dir.join(CONFIG)).ok(),
        "checkpoints": sorted_checkpoints(&dir)
            .into_iter()
            .map(|(n, s)| json!({"name": n, "step": s, "path": dir.join(&n)}))
            .collect::<Vec<_>>(),
        "has_adapter": dir.join("adapter_config.json").is_file(),
        "exit_code": exit_code,
        "error": error,
        "command": record.map(|r| r.command),
    })))
}

/// The last `Error:` line of a log (what `ferrotune` prints before exiting 1).
fn last_error(log: &FsPath) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    let at = tail.iter().position(|l| l.starts_with("Error"))?;
    Some(tail[..=at].iter().rev().copied().collect::<Vec<_>>().join("\n"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    name: String,
    yaml: String,
    #[serde(default = "one")]
    nproc: usize,
}

fn one() -> usize {
    1
}

/// `POST /api/runs {name, yaml, nproc}`: writes the config (output_dir = the run's folder),
/// checks it, and starts the run.
pub async fn start(
    State(b): State<Arc<Board>>,
    body: Result<Json<StartRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    valid_name(&req.name)?;
    if !(1..=64).contains(&req.nproc) {
        return Err(ApiError::bad_request(format!("nproc {}: give 1 to 64", req.nproc)));
    }
    let dir = b.roots.runs.join(&req.name);
    if dir.exists() {
        return Err(ApiError::new(
            409,
            "invalid_request_error",
            format!("run `{}` exists under --runs: choose another name", req.name),
        ));
    }
    let text = super::forms::pin_output_dir(&req.yaml, &dir)?;
    let board = b.clone();
    let name = req.name.clone();
    tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        std::fs::create_dir(&dir).map_err(|e| {
            ApiError::new(500, "server_error", format!("cannot create {}: {e}", dir.display()))
        })?;
        let started = (|| {
            let cfg_path = dir.join(CONFIG);
            crate::util::atomic::write(&cfg_path, text.as_bytes()).map_err(|e| {
                ApiError::new(
                    500,
                    "server_error",
                    format!("cannot write {}: {e:#}", cfg_path.display()),
                )
            })?;
            super::forms::load_checked(&board, &cfg_path)?;
            board.runs.spawn(&name, &dir, req.nproc, false)
        })();
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    })
    .await
    .map_err(|e| ApiError::new(500, "server_error", format!("the start task failed: {e}")))??;
    Ok(Json(json!({"name": req.name, "state": "running"})))
}

pub async fn stop(
    State(b): State<Arc<Board>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let dir = b.runs.dir_of(&name)?;
    b.runs.stop(&name)?;
    // Wait a little for it to end, so the answer shows the new state.
    for _ in 0..50 {
        if b.runs.state(&name, &dir).0 != RunState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Json(json!({"state": b.runs.state(&name, &dir).0.name()})))
}

/// `POST /api/runs/{name}/resume`: a board run that is not running goes on from its newest
/// checkpoint, with the process count it had.
pub async fn resume(
    State(b): State<Arc<Board>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let dir = b.runs.dir_of(&name)?;
    let (state, _) = b.runs.state(&name, &dir);
    if matches!(state, RunState::Running | RunState::Finished) {
        return Err(ApiError::new(
            409,
            "invalid_request_error",
            format!("run `{name}` is {}: only a stopped or failed run resumes", state.name()),
        ));
    }
    let Some(rec) = read_record(&dir).filter(|_| dir.join(CONFIG).is_file()) else {
        return Err(ApiError::bad_request(format!(
            "run `{name}` was not started by a board (no {CONFIG}): resume it with `ferrotune train CONFIG --resume`"
        )));
    };
    if checkpoints(&dir).next().is_none() {
        return Err(ApiError::bad_request(format!(
            "run `{name}` has no checkpoint-N to resume from (training.save_steps writes them)"
        )));
    }
    b.runs.spawn(&name, &dir, rec.nproc, true)?;
    Ok(Json(json!({"state": "running"})))
}

/// Which file a stream follows.
#[derive(Clone, Copy, PartialEq)]
enum Follow {
    /// `metrics.jsonl`: one `metric` event per complete line.
    Metrics,
    /// `train.log`: `log` events with the text as it arrives.
    Log,
}

struct Tail {
    board: Arc<Board>,
    name: String,
    dir: PathBuf,
    path: PathBuf,
    follow: Follow,
    offset: u64,
    /// Bytes read after the last complete line (metrics) or UTF-8 character (log).
    pending: Vec<u8>,
    state: Option<RunState>,
    queue: VecDeque<Event>,
    first: bool,
}

impl Tail {
    /// Reads what was appended since the last poll; a file that shrank (a resumed run cuts
    /// `metrics.jsonl` back to its checkpoint) starts over with a `reset` event.
    fn poll(&mut self) {
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0;
            self.pending.clear();
            self.queue.push_back(Event::default().event("reset").data("{}"));
        }
        if len > self.offset {
            if let Ok(mut f) = std::fs::File::open(&self.path) {
                let mut buf = Vec::new();
                let want = (len - self.offset).min(4 << 20);
                if f.seek(SeekFrom::Start(self.offset)).is_ok()
                    && f.take(want).read_to_end(&mut buf).is_ok()
                {
                    self.offset += buf.len() as u64;
                    self.pending.extend_from_slice(&buf);
                }
            }
        }
        match self.follow {
            Follow::Metrics => {
                while let Some(at) = self.pending.iter().position(|&c| c == b'\n') {
                    let line: Vec<u8> = self.pending.drain(..=at).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim();
                    // A line as written (a torn or foreign one is left out).
                    if serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()) {
                        self.queue.push_back(Event::default().event("metric").data(line));
                    }
                }
            }
            Follow::Log => {
                let valid = match std::str::from_utf8(&self.pending) {
                    Ok(_) => self.pending.len(),
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    // Not UTF-8: shown with replacement characters.
                    Err(_) => self.pending.len(),
                };
                if valid > 0 {
                    let chunk: Vec<u8> = self.pending.drain(..valid).collect();
                    let text = String::from_utf8_lossy(&chunk);
                    self.queue.push_back(
                        Event::default().event("log").data(json!({"text": text}).to_string()),
                    );
                }
            }
        }
        let (state, _) = self.board.runs.state(&self.name, &self.dir);
        if self.state != Some(state) {
            self.state = Some(state);
            self.queue.push_back(
                Event::default().event("state").data(json!({"state": state.name()}).to_string()),
            );
        }
    }
}

fn follow(
    board: Arc<Board>,
    name: String,
    dir: PathBuf,
    follow: Follow,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let path = dir.join(if follow == Follow::Metrics { METRICS } else { LOG });
    let tail = Tail {
        board,
        name,
        dir,
        path,
        follow,
        offset: 0,
        pending: Vec::new(),
        state: None,
        queue: VecDeque::new(),
        first: true,
    };
    futures_util::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(ev) = t.queue.pop_front() {
                return Some((Ok(ev), t));
            }
            if !t.first {
                tokio::time::sleep(POLL).await;
            }
            t.first = false;
            t = tokio::task::spawn_blocking(move || {
                t.poll();
                t
            })
            .await
            .ok()?;
        }
    })
}

pub async fn metrics_stream(
    State(b): State<Arc<Board>>,
    Path(name): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let dir = b.runs.dir_of(&name)?;
    Ok(Sse::new(follow(b.clone(), name, dir, Follow::Metrics)).keep_alive(KeepAlive::default()))
}

pub async fn log_stream(
    State(b): State<Arc<Board>>,
    Path(name): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let dir = b.runs.dir_of(&name)?;
    Ok(Sse::new(follow(b.clone(), name, dir, Follow::Log)).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_stay_in_the_folder() {
        for ok in ["a", "run-1", "qwen2.5_lora", "A.b-c_d"] {
            assert!(valid_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "a\\b", &"x".repeat(101)] {
            assert_eq!(valid_name(bad).unwrap_err().status, 400, "{bad}");
        }
    }

    fn temp(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ferrotune-board-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn state_of_runs_it_did_not_start() {
        let root = temp("state");
        let sup = Supervisor::new(&root, Vec::new());
        let run = root.join("r");
        std::fs::create_dir_all(run.join("checkpoint-2")).unwrap();
        std::fs::write(run.join(METRICS), "{\"step\":1,\"loss\":1.0}\n").unwrap();
        // Written just now: running.
        assert_eq!(sup.state("r", &run).0, RunState::Running);
        // A board run whose process is gone and that never ended: failed.
        let rec = Record {
            command: vec![],
            nproc: 1,
            pid: u32::MAX - 1,
            state: RunState::Running,
            exit_code: None,
            started: 0,
            ended: None,
        };
        write_record(&run, &rec).unwrap();
        assert_eq!(sup.state("r", &run).0, RunState::Failed);
        // Its recorded end wins.
        write_record(&run, &Record { state: RunState::Stopped, ..rec }).unwrap();
        assert_eq!(sup.state("r", &run).0, RunState::Stopped);
        std::fs::remove_file(run.join(RECORD)).unwrap();
        std::fs::write(run.join(SUMMARY), "{}").unwrap();
        assert_eq!(sup.state("r", &run).0, RunState::Finished);
        assert_eq!(sup.names(), vec!["r".to_string()]);
        // Folders without a run's files are not runs.
        std::fs::create_dir_all(root.join("notes")).unwrap();
        assert_eq!(sup.names(), vec!["r".to_string()]);
        assert_eq!(sup.dir_of("notes").unwrap_err().status, 404);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn error_lines_of_a_failed_log() {
        let root = temp("log");
        let log = root.join(LOG);
        std::fs::write(
            &log,
            "step 1\nError: config key `adapter.r`: must be at least 1\n\nCaused by:\n  x\n",
        )
        .unwrap();
        let e = last_error(&log).unwrap();
        assert!(e.starts_with("Error: config key `adapter.r`") && e.ends_with("  x"), "{e}");
        std::fs::write(&log, "all good\n").unwrap();
        assert!(last_error(&log).is_none());
        let _ = std::fs::remove_dir_all(&root);
    }
}
