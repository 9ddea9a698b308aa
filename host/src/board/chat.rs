//! Chat: the `serve` engine in this process, over one base model from `--models` (or a merged
//! model under `--runs`), with the runs' adapters loaded from `--runs` only and hot-swapped
//! per request. `/api/serve/…` is `serve`'s own OpenAI router (the same handlers, limits and
//! errors), reached through the board's token instead of an API key.
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::forms::blocking;
use super::Board;
use crate::serve::error::ApiError;
use crate::serve::{RunningEngine, ServeOptions};

/// Request bodies at most (chat messages with images as data URLs).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// The engine, once a model was chosen.
#[derive(Default)]
pub struct Chat {
    engine: Mutex<Option<(std::path::PathBuf, Arc<RunningEngine>)>>,
}

impl Chat {
    fn current(&self) -> Option<(std::path::PathBuf, Arc<RunningEngine>)> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the engine (the board is exiting).
    pub fn shutdown(&self) {
        let taken = self.engine.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(taken);
    }
}

fn options(b: &Board, model: std::path::PathBuf) -> ServeOptions {
    ServeOptions {
        model,
        adapters: Vec::new(),
        adapter_dir: Some(b.roots.runs.clone()),
        host: String::new(),
        port: 0,
        api_key: None,
        max_batch: 8,
        max_adapters: 8,
        adapter_grace: std::time::Duration::from_secs(10),
        max_tokens_limit: 1024,
        max_body_bytes: MAX_BODY_BYTES,
        max_images: 8,
        max_videos: 0,
        video_dir: None,
        image_max_pixels: None,
        max_image_pixels: None,
        image_workers: 2,
        image_timeout: std::time::Duration::from_secs(30),
        connections: crate::serve::listener::ConnLimits {
            max_connections: 64,
            header_timeout: std::time::Duration::from_secs(10),
        },
        served_model_name: None,
        device: b.device,
        dtype: b.dtype,
        search: b.search.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    model: String,
}

/// `POST /api/chat/start {model}`: loads the base model (a folder under --models or --runs),
/// replacing the one loaded before; answers `{base, vision, adapters}`.
pub async fn start(
    State(b): State<Arc<Board>>,
    body: Result<Json<StartRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let roots: Vec<&std::path::Path> =
        b.roots.models.iter().map(|p| p.as_path()).chain([b.roots.runs.as_path()]).collect();
    let model = b.roots.inside_of("model", &req.model, &roots)?;
    if !model.join("config.json").is_file() {
        return Err(ApiError::bad_request(format!("model {}: no config.json there", req.model)));
    }
    let engine = match b.chat.current() {
        Some((path, e)) if path == model => e,
        _ => {
            let board = b.clone();
            let path = model.clone();
            let e = blocking(move || {
                // The engine loaded before goes first: two models need not fit at once.
                board.chat.shutdown();
                crate::serve::start_engine(&options(&board, path.clone()))
                    .map_err(|e| ApiError::bad_request(format!("{e:#}")))
            })
            .await?;
            let e = Arc::new(e);
            *b.chat.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some((model, e.clone()));
            e
        }
    };
    let st = &engine.state;
    let adapters = st.listing.read().map(|l| l.clone()).unwrap_or_default();
    Ok(Json(json!({"base": st.base_name, "vision": st.images.is_some(), "adapters": adapters})))
}

/// `/api/serve/{rest}`: `serve`'s router for the loaded engine, at `/{rest}`.
pub async fn forward(State(b): State<Arc<Board>>, req: Request) -> Response {
    let Some((_, engine)) = b.chat.current() else {
        return ApiError::new(
            409,
            "invalid_request_error",
            "no model is loaded: POST /api/chat/start {model} first",
        )
        .into_response();
    };
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().strip_prefix("/api/serve").unwrap_or("/").to_string();
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    parts.uri = match path_and_query.parse() {
        Ok(u) => u,
        Err(e) => return ApiError::bad_request(format!("bad path: {e}")).into_response(),
    };
    // The board checked its token; the engine has no API key of its own.
    parts.headers.remove(axum::http::header::AUTHORIZATION);
    // The board's own route match (its `{*rest}` parameter) would add to serve's path
    // parameters (`DELETE /v1/adapters/{name}` would see two).
    parts.extensions = Default::default();
    let router = crate::serve::api::router(engine.state.clone(), MAX_BODY_BYTES);
    match router.oneshot(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}
