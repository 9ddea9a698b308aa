//! `ferrotune serve`: an OpenAI-compatible HTTP server over one base model and any number of
//! PEFT adapters, loaded and unloaded while it runs and chosen per request by the `model`
//! field, with continuous batching and mixed-adapter batches (S-LoRA style).
//!
//! The model lives on one engine thread ([`engine`]); the HTTP side ([`api`], tokio + axum)
//! talks to it through channels, and decodes and resizes images itself, in a bounded pool, so
//! that the engine only tokenizes and runs the model. [`listener`] caps open connections and
//! times out requests whose headers do not arrive. [`bench`] measures decode throughput of one adapter against
//! many in one batch.
pub mod api;
pub mod bench;
pub mod engine;
pub mod error;
pub mod listener;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

use crate::plugins::{Registry, SearchPath};
use engine::{Command, EngineConfig};

/// The command line of `ferrotune serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// Adapters loaded at start (`--adapter NAME=DIR`), from anywhere.
    pub adapters: Vec<(String, PathBuf)>,
    /// The only folder the API may load adapters from.
    pub adapter_dir: Option<PathBuf>,
    pub host: String,
    /// 0 = any free port (the bound address is printed).
    pub port: u16,
    pub api_key: Option<String>,
    pub max_batch: usize,
    pub max_adapters: usize,
    /// An adapter loaded or used this recently is never evicted to make room.
    pub adapter_grace: Duration,
    pub max_tokens_limit: usize,
    pub max_body_bytes: usize,
    /// Image content parts a chat request may hold at most.
    pub max_images: usize,
    /// Video content parts a chat request may hold at most.
    pub max_videos: usize,
    /// The only folder `video_url` parts may name by path.
    pub video_dir: Option<PathBuf>,
    /// Pixels an image is resized to at most (default: the model's preprocessor_config.json).
    pub image_max_pixels: Option<u64>,
    /// Images whose header announces more pixels are refused before decoding (default: 4 ×
    /// the pixels images are resized to, at least 1 MP).
    pub max_image_pixels: Option<u64>,
    /// Images decoded and resized at once, off the engine thread.
    pub image_workers: usize,
    /// The time one image may take to be decoded and resized, waiting for a worker included.
    pub image_timeout: Duration,
    /// Open connections at most, and the time one has to send its request headers.
    pub connections: listener::ConnLimits,
    /// The base model's name in requests; default: the model folder's name.
    pub served_model_name: Option<String>,
    pub device: Device,
    pub dtype: Kind,
    pub search: SearchPath,
}

/// Waits for ctrl-c or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("ferrotune: shutting down after the requests in flight");
}

/// A loaded engine and the HTTP state that talks to it (what `serve` runs, and what `board`'s
/// chat starts in-process).
pub struct RunningEngine {
    pub state: Arc<api::AppState>,
    tx: std::sync::mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningEngine {
    /// Stops the engine after the requests in flight and waits for its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The name requests use for the base model: `--served-model-name`, else the folder's name.
fn base_name(opts: &ServeOptions) -> Result<String> {
    match &opts.served_model_name {
        Some(n) => Ok(n.clone()),
        None => opts
            .model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .with_context(|| format!("model directory {} does not exist", opts.model.display())),
    }
}

/// Checks `opts`, loads the model on a new engine thread and returns once it is ready.
pub fn start_engine(opts: &ServeOptions) -> Result<RunningEngine> {
    let base_name = base_name(opts)?;
    let adapter_dir = match &opts.adapter_dir {
        Some(d) => {
            let c = d
                .canonicalize()
                .with_context(|| format!("--adapter-dir {} does not exist", d.display()))?;
            if !c.is_dir() {
                bail!("--adapter-dir {} is not a directory", d.display());
            }
            Some(c)
        }
        None => None,
    };
    let cfg = EngineConfig {
        base_name: base_name.clone(),
        adapter_dir,
        max_batch: opts.max_batch,
        max_adapters: opts.max_adapters,
        adapter_grace: opts.adapter_grace,
        max_tokens_limit: opts.max_tokens_limit,
        image_max_pixels: opts.image_max_pixels,
        max_image_pixels: opts.max_image_pixels,
    };
    let video_dir = match &opts.video_dir {
        Some(d) => {
            let c = d
                .canonicalize()
                .with_context(|| format!("--video-dir {} does not exist", d.display()))?;
            if !c.is_dir() {
                bail!("--video-dir {} is not a directory", d.display());
            }
            Some(c)
        }
        None => None,
    };
    if opts.image_workers == 0 || opts.image_timeout.is_zero() {
        bail!("--image-workers and --image-timeout-secs must be at least 1");
    }
    if opts.connections.max_connections == 0 || opts.connections.header_timeout.is_zero() {
        bail!("--max-connections and --header-timeout-secs must be at least 1");
    }
    let listing = Arc::new(RwLock::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel::<Command>();
    type Ready = (Arc<engine::EngineStats>, Option<Arc<crate::data::images::ImagePrep>>);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready>>();
    let engine_thread = {
        let (listing, opts) = (listing.clone(), opts.clone());
        std::thread::Builder::new().name("ferrotune-engine".into()).spawn(move || {
            let registry = Registry::discover(&opts.search);
            match engine::load_engine(
                &opts.model,
                opts.device,
                opts.dtype,
                registry,
                cfg,
                &opts.adapters,
                listing,
            ) {
                Ok(e) => {
                    let _ = ready_tx.send(Ok((e.stats.clone(), e.images.clone())));
                    e.run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?
    };
    let (stats, images) =
        ready_rx.recv().context("the engine thread died while loading the model")??;
    let state = Arc::new(api::AppState {
        engine: Mutex::new(tx.clone()),
        listing,
        base_name: base_name.clone(),
        api_key: opts.api_key.clone(),
        max_tokens_limit: opts.max_tokens_limit,
        max_images: opts.max_images,
        max_videos: opts.max_videos,
        video_dir,
        images,
        image_pool: Arc::new(tokio::sync::Semaphore::new(opts.image_workers)),
        image_workers: opts.image_workers,
        image_timeout: opts.image_timeout,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        counter: Default::default(),
        stats,
    });
    Ok(RunningEngine { state, tx, thread: Some(engine_thread) })
}

/// Binds `host:port`, prints `announce(address)` on stdout (what scripts wait for), and
/// returns the listener with its connection cap and header timeout (`serve` and `board`).
pub(crate) async fn listen(
    host: &str,
    port: u16,
    limits: listener::ConnLimits,
    announce: impl FnOnce(std::net::SocketAddr) -> String,
) -> Result<listener::GuardedListener> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    println!("{}", announce(listener.local_addr()?));
    use std::io::Write;
    std::io::stdout().flush().ok();
    Ok(listener::GuardedListener::new(listener, limits))
}

/// Runs the server until ctrl-c or SIGTERM, then lets the requests in flight finish.
/// Prints `ferrotune serve: listening on http://ADDR` on stdout once the model is loaded.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let engine = start_engine(&opts)?;
    let state = engine.state.clone();
    let base_name = state.base_name.clone();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let served = runtime.block_on(async {
        let listener = listen(&opts.host, opts.port, opts.connections, |addr| {
            format!("ferrotune serve: listening on http://{addr} (base model `{base_name}`)")
        })
        .await?;
        axum::serve(listener, api::router(state, opts.max_body_bytes))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        anyhow::Ok(())
    });
    engine.shutdown();
    served
}
