//! `ferrotune board`: a local web app over the other commands. It lists the runs under
//! `--runs` with live curves from their `metrics.jsonl` (server-sent events), starts new runs
//! from a form built from the plugins' JSON Schemas (`train` or `launch --nproc N train` as a
//! child process), previews data as the trainer sees it, and chats with a base model and the
//! runs' adapters through the `serve` engine, in this process.
//!
//! One axum server on the same stack as `serve`, on 127.0.0.1 by default. Every route needs
//! the access token printed at start (as Jupyter's): `Authorization: Bearer T`, `?token=T`, or
//! the cookie `GET /?token=T` sets. It reads and writes only under the folders it was given:
//! a path elsewhere is refused with 403. The page is static assets compiled into the binary.
mod assets;
mod chat;
mod forms;
mod preview;
mod runs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use tch::{Device, Kind};

use crate::plugins::SearchPath;
use crate::serve::error::ApiError;

/// The cookie `GET /?token=T` sets.
const COOKIE: &str = "ferrotune_board";

/// The command line of `ferrotune board`.
#[derive(Debug, Clone)]
pub struct BoardOptions {
    /// Output directories of runs: listed, written by new runs (created when missing).
    pub runs: PathBuf,
    /// Model folders offered in the pickers (read only).
    pub models: Option<PathBuf>,
    /// Data files and LLaMA-Factory registries offered in the pickers (read only).
    pub data: Option<PathBuf>,
    pub host: String,
    /// 0 = any free port.
    pub port: u16,
    /// The access token (default: 24 random bytes, hex).
    pub token: Option<String>,
    /// Where chat runs the model.
    pub device: Device,
    pub dtype: Kind,
    /// `--plugin-dir` arguments for the runs it starts.
    pub plugin_args: Vec<String>,
    pub search: SearchPath,
}

/// The folders the board may touch, canonical.
#[derive(Debug, Clone)]
pub struct Roots {
    pub runs: PathBuf,
    pub models: Option<PathBuf>,
    pub data: Option<PathBuf>,
}

impl Roots {
    fn new(opts: &BoardOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.runs)
            .with_context(|| format!("--runs {}: cannot create it", opts.runs.display()))?;
        let dir = |flag: &str, p: &Path| -> Result<PathBuf> {
            let c = p
                .canonicalize()
                .with_context(|| format!("{flag} {} does not exist", p.display()))?;
            if !c.is_dir() {
                bail!("{flag} {} is not a directory", p.display());
            }
            Ok(c)
        };
        Ok(Self {
            runs: dir("--runs", &opts.runs)?,
            models: opts.models.as_deref().map(|p| dir("--models", p)).transpose()?,
            data: opts.data.as_deref().map(|p| dir("--data", p)).transpose()?,
        })
    }

    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.runs).chain(&self.models).chain(&self.data)
    }

    /// `path` resolved (links included), if it lies under one of the folders; 403 otherwise
    /// (404 when it does not exist).
    pub fn inside(&self, what: &str, path: &str) -> Result<PathBuf, ApiError> {
        let p = Path::new(path);
        let c = p.canonicalize().map_err(|_| {
            ApiError::new(404, "not_found_error", format!("{what} {path} does not exist"))
        })?;
        if self.all().any(|r| c.starts_with(r)) {
            Ok(c)
        } else {
            Err(outside(what, path))
        }
    }

    /// Like [`Roots::inside`], for paths the board runs things from: --models, --data or --runs.
    pub fn inside_of(&self, what: &str, path: &str, roots: &[&Path]) -> Result<PathBuf, ApiError> {
        let c = self.inside(what, path)?;
        if roots.iter().any(|r| c.starts_with(r)) {
            Ok(c)
        } else {
            Err(outside(what, path))
        }
    }
}

fn outside(what: &str, path: &str) -> ApiError {
    ApiError::new(
        403,
        "permission_error",
        format!(
            "{what} {path} is outside the folders this board was given (--runs, --models, --data)"
        ),
    )
}

/// A run name: a folder name of `[A-Za-z0-9_.-]`, not hidden.
pub fn valid_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "run name `{name}`: use 1 to 100 of A-Z a-z 0-9 _ - . (not starting with a dot)"
        )))
    }
}

/// What every handler shares.
pub struct Board {
    pub roots: Roots,
    token: String,
    pub search: SearchPath,
    pub device: Device,
    pub dtype: Kind,
    pub runs: runs::Supervisor,
    pub chat: chat::Chat,
}

/// A random token: 24 bytes from the system's generator, hex.
fn new_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for the access token (give one with --token)")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without an early exit.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries: header, query or cookie.
fn given_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.to_string());
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(t) = pair.strip_prefix("token=") {
                return Some(t.to_string());
            }
        }
    }
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
        c.split(';').find_map(|kv| kv.trim().strip_prefix(&format!("{COOKIE}=")).map(String::from))
    })
}

/// Refuses (401) a request without the token; a page load with `?token=` sets the cookie.
async fn auth(State(b): State<Arc<Board>>, req: Request, next: Next) -> Response {
    let given = given_token(req.headers(), req.uri().query());
    let by_query = req.uri().query().is_some_and(|q| q.split('&').any(|p| p.starts_with("token=")));
    if !given.as_deref().is_some_and(|g| same(g, &b.token)) {
        let what = if given.is_some() {
            "the access token is wrong"
        } else {
            "an access token is required: open the URL `ferrotune board` printed (…/?token=…)"
        };
        return ApiError::new(401, "authentication_error", what).into_response();
    }
    let mut resp = next.run(req).await;
    if by_query {
        let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", b.token);
        if let Ok(v) = header::HeaderValue::from_str(&cookie) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(404, "not_found_error", format!("no route {} {}", req.method(), req.uri().path()))
}

/// The board's routes, all behind the token.
fn router(board: Arc<Board>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::file))
        .route("/api/info", get(forms::info))
        .route("/api/runs", get(runs::list).post(runs::start))
        .route("/api/runs/{name}", get(runs::detail))
        .route("/api/runs/{name}/metrics", get(runs::metrics_stream))
        .route("/api/runs/{name}/log", get(runs::log_stream))
        .route("/api/runs/{name}/stop", post(runs::stop))
        .route("/api/runs/{name}/resume", post(runs::resume))
        .route("/api/plugins", get(forms::plugins))
        .route("/api/host_schema", get(forms::host_schema))
        .route("/api/models", get(forms::models))
        .route("/api/datasets", get(forms::datasets))
        .route("/api/draft", post(forms::draft))
        .route("/api/check", post(forms::check))
        .route("/api/preview", post(preview::preview))
        .route("/api/file", get(forms::file))
        .route("/api/chat/start", post(chat::start))
        .route("/api/serve/{*rest}", any(chat::forward))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(board.clone(), auth))
        .layer(DefaultBodyLimit::max(chat::MAX_BODY_BYTES))
        .with_state(board)
}

/// Runs the board until ctrl-c or SIGTERM; prints `ferrotune board: open URL` on stdout once
/// it listens. Runs it started are stopped (SIGTERM) on the way out.
pub fn board(opts: BoardOptions) -> Result<()> {
    let roots = Roots::new(&opts)?;
    let token = match &opts.token {
        Some(t)
            if t.len() >= 8
                && t.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') =>
        {
            t.clone()
        }
        Some(_) => bail!("--token must be at least 8 characters of [A-Za-z0-9_-]"),
        None => new_token()?,
    };
    let board = Arc::new(Board {
        runs: runs::Supervisor::new(&roots.runs, opts.plugin_args.clone()),
        roots,
        token: token.clone(),
        search: opts.search.clone(),
        device: opts.device,
        dtype: opts.dtype,
        chat: chat::Chat::default(),
    });
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let served = runtime.block_on(async {
        // serve's listener: a cap on open connections (the page holds two streams per run it
        // shows) and a time limit on request headers.
        let limits = crate::serve::listener::ConnLimits {
            max_connections: 256,
            header_timeout: std::time::Duration::from_secs(10),
        };
        let listener = crate::serve::listen(&opts.host, opts.port, limits, |addr| {
            format!("ferrotune board: open http://{addr}/?token={token}")
        })
        .await?;
        axum::serve(listener, router(board.clone()))
            .with_graceful_shutdown(crate::serve::shutdown_signal())
            .await?;
        anyhow::Ok(())
    });
    board.runs.stop_all();
    board.chat.shutdown();
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_header_query_or_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(given_token(&h, None), None);
        assert_eq!(given_token(&h, Some("a=1&token=abc")).as_deref(), Some("abc"));
        h.insert(header::COOKIE, "x=1; ferrotune_board=fromcookie".parse().unwrap());
        assert_eq!(given_token(&h, None).as_deref(), Some("fromcookie"));
        h.insert(header::AUTHORIZATION, "Bearer fromheader".parse().unwrap());
        assert_eq!(given_token(&h, Some("token=q")).as_deref(), Some("fromheader"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    #[test]
    fn paths_outside_the_folders_are_refused() {
        let root =
            std::env::temp_dir().join(format!("ferrotune-board-roots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("runs/a")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        std::os::unix::fs::symlink(root.join("other"), root.join("runs/link")).unwrap();
        let roots =
            Roots { runs: root.join("runs").canonicalize().unwrap(), models: None, data: None };
        let s = |p: PathBuf| p.display().to_string();
        assert!(roots.inside("path", &s(root.join("runs/a"))).is_ok());
        assert_eq!(roots.inside("path", &s(root.join("other"))).unwrap_err().status, 403);
        assert_eq!(roots.inside("path", &s(root.join("runs/link"))).unwrap_err().status, 403);
        assert_eq!(roots.inside("path", &s(root.join("runs/../other"))).unwrap_err().status, 403);
        assert_eq!(roots.inside("path", &s(root.join("runs/missing"))).unwrap_err().status, 404);
        let _ = std::fs::remove_dir_all(&root);
    }
}
