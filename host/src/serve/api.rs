//! The HTTP side: OpenAI-compatible routes (axum) that turn requests into engine commands and
//! engine events into JSON responses or server-sent events.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true`),
//! `GET /v1/models`, `POST /v1/adapters` `{name, path}`, `DELETE /v1/adapters/{name}`, vLLM's
//! `POST /v1/load_lora_adapter` `{lora_name, lora_path}` and `POST /v1/unload_lora_adapter`
//! `{lora_name}`, and `GET /health` (no key needed).
//!
//! Chat messages may hold OpenAI's `image_url` content parts as base64 `data:` URLs (PNG, JPEG,
//! WebP) for a vision-language model; each becomes an `<image>` placeholder where it stands.
//! Images are checked here: width × height from the header against `--max-image-pixels` before
//! anything is decoded, then decoded, resized and cut into patches in a bounded pool of blocking
//! workers (`--image-workers`) within a time budget (`--image-timeout-secs`), so that the engine
//! thread, which every running request shares, only tokenizes and runs the model. Refusals name
//! the request field at fault (`messages[0].content[1].image_url`).
//!
//! `video_url` parts (vLLM's) carry a video as a base64 `data:video/...` URL (decoded with
//! FFmpeg: a build with the `ffmpeg` feature), or name a video file or a folder of frames by
//! path (`file://` or plain) inside `--video-dir`: anything outside it, through a link
//! included, is refused (403) as an adapter path outside `--adapter-dir` is. Frames are sampled
//! and patched by [`ImagePrep::video_prompt`] in the same worker pool and time budget as images;
//! each video's block of `<|video_pad|>` tokens goes where its part stands.
//!
//! Log-probabilities: the chat endpoint's `logprobs: true` with `top_logprobs` 0..=20 answers
//! `choices[0].logprobs.content[j] = {token, logprob, bytes, top_logprobs: [{token, logprob,
//! bytes}]}`; the completions endpoint's integer `logprobs` (0..=20) answers OpenAI's legacy
//! `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}` (the top tokens plus
//! the chosen one). Both streamed too, each chunk carrying the tokens that arrived since the
//! last. They are the model's raw distribution: `log_softmax` of the logits before
//! temperature, top-k and top-p (vLLM's default `raw_logprobs`); a token's text is the token
//! decoded alone, `bytes` its UTF-8 bytes, and `-inf` is shown as -9999.0 as OpenAI does.
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ferrotune_plugin_api::{ImageSource, Message, Sample};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{
    Command, Event, GenRequest, PromptInput, StepLogprobs, TokenInfo, MAX_STOP_SEQUENCES,
};
use super::error::ApiError;
use crate::data::images::{ImagePrep, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER};
use crate::data::EncodeError;
use crate::generate::pipeline::SamplingChoice;
use crate::model::{VideoInputs, VisionInputs};
use crate::vision::{image_dimensions, ImageTooLarge, DEFAULT_MAX_IMAGE_PIXELS};

/// What every handler shares.
pub struct AppState {
    /// To the engine thread.
    pub engine: Mutex<Sender<Command>>,
    /// The loaded adapters' names, kept by the engine.
    pub listing: Arc<RwLock<Vec<String>>>,
    pub base_name: String,
    pub api_key: Option<String>,
    pub max_tokens_limit: usize,
    /// Image content parts a chat request may hold at most.
    pub max_images: usize,
    /// Video content parts a chat request may hold at most.
    pub max_videos: usize,
    /// The only folder `video_url` parts may name by path (canonical); `None`: data URLs only.
    pub video_dir: Option<std::path::PathBuf>,
    /// A vision-language model's image settings (`None`: image parts are refused).
    pub images: Option<Arc<ImagePrep>>,
    /// One permit per image being decoded and resized (`--image-workers`).
    pub image_pool: Arc<tokio::sync::Semaphore>,
    pub image_workers: usize,
    /// The time one image may take, waiting for a permit included (`--image-timeout-secs`).
    pub image_timeout: Duration,
    pub created: u64,
    /// Request ids.
    pub counter: std::sync::atomic::AtomicU64,
    pub stats: Arc<super::engine::EngineStats>,
}

impl AppState {
    fn send(&self, c: Command) -> Result<(), ApiError> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner()).send(c).map_err(|_| {
            ApiError::new(
                503,
                "server_error",
                "the engine has stopped (the server is shutting down)",
            )
        })
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// The router with its limits: body size (`max_body_bytes`) and the API key.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/v1/load_lora_adapter", post(vllm_load))
        .route("/v1/unload_lora_adapter", post(vllm_unload))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// `{"status": "ok", "engine": {steps, mixed_steps, max_rows, finished}}`, no key needed.
async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "engine": st.stats.json()}))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(404, "not_found_error", format!("no route {} {}", req.method(), req.uri().path()))
}

/// Refuses requests without `Authorization: Bearer <--api-key>` when a key is set.
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| {
            g.len() == key.len()
                && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if !ok {
            let what = if given.is_some() {
                "the API key is wrong"
            } else {
                "an API key is required (Authorization: Bearer KEY)"
            };
            return ApiError::new(401, "authentication_error", what)
                .code("invalid_api_key")
                .into_response();
        }
    }
    next.run(req).await
}

/// Parses a JSON body, turning every failure (too large, not JSON, wrong fields) into a
/// JSON error.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status().as_u16();
        let msg = if status == 413 {
            format!("the request body is too large ({})", r.body_text())
        } else {
            r.body_text()
        };
        ApiError::new(status, "invalid_request_error", msg).code(if status == 413 {
            "request_too_large"
        } else {
            "bad_body"
        })
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        ApiError::bad_request(format!("invalid request body: {e}")).code("invalid_json")
    })
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let entry = |id: &str, parent: Option<&str>| json!({"id": id, "object": "model", "created": st.created, "owned_by": "ferrotune", "root": parent.unwrap_or(id), "parent": parent});
    let mut data = vec![entry(&st.base_name, None)];
    data.extend(
        st.listing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|n| entry(n, Some(&st.base_name))),
    );
    Json(json!({"object": "list", "data": data}))
}

#[derive(Deserialize)]
struct LoadBody {
    name: String,
    path: String,
}

#[derive(Deserialize)]
struct VllmLoad {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct VllmUnload {
    lora_name: String,
}

async fn engine_reply(
    st: &AppState,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<Value, ApiError>>) -> Command,
) -> Response {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Err(e) = st.send(make(tx)) {
        return e.into_response();
    }
    match rx.await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::new(503, "server_error", "the engine stopped before answering")
            .into_response(),
    }
}

async fn load_adapter(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse::<LoadBody>(body) {
        Ok(b) => {
            engine_reply(&st, |reply| Command::Load {
                name: b.name,
                path: b.path,
                trusted: false,
                reply,
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn unload_adapter(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    engine_reply(&st, |reply| Command::Unload { name, reply }).await
}

async fn vllm_load(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse::<VllmLoad>(body) {
        Ok(b) => {
            engine_reply(&st, |reply| Command::Load {
                name: b.lora_name,
                path: b.lora_path,
                trusted: false,
                reply,
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn vllm_unload(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse::<VllmUnload>(body) {
        Ok(b) => engine_reply(&st, |reply| Command::Unload { name: b.lora_name, reply }).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Deserialize)]
struct Sampling {
    max_tokens: Option<u64>,
    /// The chat endpoint's newer name for `max_tokens`.
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// vLLM's extension; -1 or 0 = off.
    top_k: Option<i64>,
    seed: Option<u64>,
    n: Option<u64>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// vLLM's extension: the generated token ids in each choice.
    #[serde(default)]
    return_token_ids: bool,
    /// Chat: `true` for each token's log-probability; completions: how many top tokens
    /// (0..=[`MAX_TOP_LOGPROBS`]) with each token's log-probability.
    logprobs: Option<Value>,
    /// Chat: how many most likely tokens with each token (0..=[`MAX_TOP_LOGPROBS`]).
    top_logprobs: Option<Value>,
}

/// `top_logprobs` (chat) and `logprobs` (completions) at most, as vLLM's default
/// `max_logprobs` and OpenAI's chat limit.
pub const MAX_TOP_LOGPROBS: u64 = 20;

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

impl Sampling {
    /// `stop`: null, a string, or a list of up to [`MAX_STOP_SEQUENCES`] non-empty strings.
    fn stop_sequences(&self) -> Result<Vec<String>, ApiError> {
        let bad = |m: String| ApiError::bad_request(m).code("invalid_stop");
        let list = match &self.stop {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("`stop` must hold strings, got {v}")))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(bad(format!("`stop` must be a string or a list of strings, got {v}")))
            }
        };
        if list.len() > MAX_STOP_SEQUENCES {
            return Err(bad(format!(
                "`stop` holds {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                list.len()
            )));
        }
        if list.iter().any(String::is_empty) {
            return Err(bad("`stop` sequences must not be empty".into()));
        }
        Ok(list)
    }

    /// How many top tokens to return with each token's log-probability (`None`: no
    /// log-probabilities): chat `logprobs: true` + `top_logprobs`, completions `logprobs: N`.
    fn logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let count = |v: &Value, field: &'static str| {
            v.as_u64().filter(|&k| k <= MAX_TOP_LOGPROBS).map(|k| k as usize).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`{field}` must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {v}"
                ))
                .code("invalid_logprobs")
                .param(field)
            })
        };
        let top = self.top_logprobs.as_ref().filter(|v| !v.is_null());
        if !chat {
            if top.is_some() {
                return Err(ApiError::bad_request(
                    "`top_logprobs` is a chat field; /v1/completions takes `logprobs: N` (0..=20)",
                )
                .code("invalid_logprobs")
                .param("top_logprobs"));
            }
            return match &self.logprobs {
                None | Some(Value::Null) => Ok(None),
                Some(v) => count(v, "logprobs").map(Some),
            };
        }
        let on = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "`logprobs` must be true or false on /v1/chat/completions, got {v} (the number of top tokens is `top_logprobs`)"
                ))
                .code("invalid_logprobs")
                .param("logprobs"))
            }
        };
        match (on, top) {
            (false, None) => Ok(None),
            (false, Some(_)) => Err(ApiError::bad_request("`top_logprobs` needs `logprobs: true`")
                .code("invalid_logprobs")
                .param("top_logprobs")),
            (true, None) => Ok(Some(0)),
            (true, Some(v)) => count(v, "top_logprobs").map(Some),
        }
    }

    fn choice(&self, limit: usize) -> Result<SamplingChoice, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(
                ApiError::bad_request("only n = 1 is supported").code("unsupported_parameter")
            );
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(m) = max_tokens {
            if m == 0 || m as usize > limit {
                return Err(ApiError::bad_request(format!(
                    "max_tokens must be between 1 and {limit} (--max-tokens-limit), got {m}"
                ))
                .code("max_tokens_out_of_range"));
            }
        }
        if let Some(t) = self.temperature {
            if !(t >= 0.0 && t.is_finite()) {
                return Err(ApiError::bad_request(format!(
                    "temperature must be 0 (greedy) or positive, got {t}"
                )));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::bad_request(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        Ok(SamplingChoice {
            greedy: self.temperature == Some(0.0),
            temperature: self.temperature.filter(|&t| t > 0.0),
            top_k: self.top_k.filter(|&k| k > 0).map(|k| k as usize),
            top_p: self.top_p,
            max_new_tokens: max_tokens.map(|m| m as usize),
            seed: self.seed.unwrap_or(0),
        })
    }
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: CompletionRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return ApiError::bad_request("`prompt` must be a string (or a list of one string)")
                .into_response()
        }
    };
    run(st, req.model, PromptInput::Text(prompt), None, req.sampling, false).await
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: ChatRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut messages = Vec::new();
    let mut images = Vec::new();
    let mut videos = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let text = match &m.content {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            Value::Array(parts) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => text.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default()),
                        Some("image_url") => {
                            let field = format!("messages[{i}].content[{j}].image_url");
                            if images.len() == st.max_images {
                                return ApiError::bad_request(format!("{field}: the request has more than {} images (--max-images)", st.max_images))
                                    .code("too_many_images")
                                    .into_response();
                            }
                            let url = p.get("image_url").and_then(|u| u.get("url").and_then(Value::as_str).or_else(|| u.as_str()));
                            match image_from_url(url) {
                                Ok(bytes) => images.push(RequestImage { field, bytes }),
                                Err(e) => return ApiError { message: format!("{field}: {}", e.message), ..e }.into_response(),
                            }
                            text.push_str(IMAGE_PLACEHOLDER);
                        }
                        Some("video_url") => {
                            let field = format!("messages[{i}].content[{j}].video_url");
                            if videos.len() == st.max_videos {
                                return ApiError::bad_request(format!("{field}: the request has more than {} videos (--max-videos)", st.max_videos))
                                    .code("too_many_videos")
                                    .into_response();
                            }
                            let url = p.get("video_url").and_then(|u| u.get("url").and_then(Value::as_str).or_else(|| u.as_str()));
                            match video_from_url(url, st.video_dir.as_deref()) {
                                Ok(video) => videos.push(RequestVideo { field, video }),
                                Err(e) => return ApiError { message: format!("{field}: {}", e.message), ..e }.into_response(),
                            }
                            text.push_str(VIDEO_PLACEHOLDER);
                        }
                        Some(other) => {
                            return ApiError::bad_request(format!(
                                "messages[{i}].content[{j}]: content parts of type `{other}` are not supported by this server (text, image_url and video_url parts only)"
                            ))
                            .code("unsupported_content")
                            .into_response()
                        }
                        None => return ApiError::bad_request(format!("messages[{i}].content[{j}]: a content part has no `type`")).into_response(),
                    }
                }
                text
            }
            _ => {
                return ApiError::bad_request(format!(
                    "messages[{i}].content: must be a string or a list of parts"
                ))
                .into_response()
            }
        };
        messages.push(Message::new(m.role.clone(), text));
    }
    if messages.is_empty() {
        return ApiError::bad_request("`messages` is empty").into_response();
    }
    let mut vision = if images.is_empty() {
        None
    } else {
        match prepare_images(&st, &mut messages, images).await {
            Ok(v) => Some(v),
            Err(e) => return e.into_response(),
        }
    };
    if !videos.is_empty() {
        match prepare_videos(&st, &mut messages, videos).await {
            Ok(v) => vision = Some(with_videos(vision, v)),
            Err(e) => return e.into_response(),
        }
    }
    run(st, req.model, PromptInput::Chat(messages), vision, req.sampling, true).await
}

/// An image content part of a chat request: the field it came from and its encoded bytes.
struct RequestImage {
    /// `messages[i].content[j].image_url`.
    field: String,
    bytes: Vec<u8>,
}

/// A video content part of a chat request: the field it came from and the video.
struct RequestVideo {
    /// `messages[i].content[j].video_url`.
    field: String,
    video: PartVideo,
}

/// The video of a part: a checked path inside `--video-dir`, or a data URL's bytes.
enum PartVideo {
    Path(std::path::PathBuf),
    Bytes(Vec<u8>),
}

/// Samples and patches one video (on a blocking worker) through the data pipeline's
/// [`ImagePrep::expand_with_pixels`], as `generate --video` does: its block of vision tokens
/// and its patches; the error is the reason, for people.
fn prepare_video(prep: &ImagePrep, video: PartVideo) -> Result<(String, VideoInputs), String> {
    let (source, blobs) = match video {
        PartVideo::Path(p) => (ImageSource::Path(p.display().to_string()), Vec::new()),
        PartVideo::Bytes(b) => (ImageSource::Blob(0), vec![b]),
    };
    let mut sample = Sample {
        id: Some("request".into()),
        messages: vec![Message::new("user".to_string(), VIDEO_PLACEHOLDER.to_string())],
        videos: vec![source],
        blobs,
        ..Default::default()
    };
    let (_, vision) = prep.expand_with_pixels(&mut sample).map_err(|e| match e {
        EncodeError::BadSample { reason, .. } => reason,
        other => other.to_string(),
    })?;
    let videos =
        vision.and_then(|v| v.videos).ok_or_else(|| "the video gave no patches".to_string())?;
    Ok((std::mem::take(&mut sample.messages[0].content), videos))
}

/// `vision` (a request's images, if any) with the request's videos.
fn with_videos(vision: Option<VisionInputs>, videos: VideoInputs) -> VisionInputs {
    match vision {
        Some(v) => VisionInputs { videos: Some(videos), ..v },
        None => {
            let width = videos.pixel_values.size().get(1).copied().unwrap_or(0);
            VisionInputs {
                pixel_values: tch::Tensor::zeros([0, width], (tch::Kind::Float, tch::Device::Cpu)),
                image_grid_thw: Vec::new(),
                videos: Some(videos),
            }
        }
    }
}

/// Runs `work` (decoding and resizing one image or video of request field `field`) in the
/// API's worker pool, within `--image-timeout-secs` from now: 503 `image_workers_busy` when
/// no worker frees up in time, 400 `invalid_{what}` with the reason `work` gives, 400
/// `{what}_timeout` past the budget.
async fn in_worker_pool<T: Send + 'static>(
    st: &AppState,
    field: String,
    what: &'static str,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, ApiError> {
    let (budget, workers, pool) = (st.image_timeout, st.image_workers, st.image_pool.clone());
    let (invalid, timeout, advice, doing) = match what {
        "video" => (
            "invalid_video",
            "video_timeout",
            "send a shorter or smaller video",
            "sampling and resizing the video's frames",
        ),
        _ => (
            "invalid_image",
            "image_timeout",
            "send a smaller image",
            "decoding and resizing the image",
        ),
    };
    let started = Instant::now();
    let permit = match tokio::time::timeout(budget, pool.acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            return Err(ApiError::new(
                503,
                "server_error",
                format!(
                    "{field}: every image worker (--image-workers {workers}) stayed busy for {} s; retry later",
                    budget.as_secs_f64()
                ),
            )
            .code("image_workers_busy")
            .retry_after(1))
        }
    };
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit; // held until the work is done, even past the budget
        work()
    });
    match tokio::time::timeout(budget.saturating_sub(started.elapsed()), task).await {
        Ok(Ok(Ok(p))) => Ok(p),
        Ok(Ok(Err(reason))) => {
            Err(ApiError::bad_request(format!("{field}: {reason}")).code(invalid))
        }
        Ok(Err(e)) => Err(ApiError::new(
            500,
            "server_error",
            format!("{field}: preparing the {what} failed: {e}"),
        )),
        Err(_) => Err(ApiError::bad_request(format!(
            "{field}: {doing} took longer than {} s (--image-timeout-secs); {advice}",
            budget.as_secs_f64()
        ))
        .code(timeout)),
    }
}

/// Samples and patches every video in the worker pool (each within the time budget), and
/// writes each one's block of `<|video_pad|>` tokens in place of its `<video>` placeholder.
async fn prepare_videos(
    st: &AppState,
    messages: &mut [Message],
    videos: Vec<RequestVideo>,
) -> Result<VideoInputs, ApiError> {
    let Some(prep) = st.images.clone() else {
        return Err(ApiError::bad_request(format!(
            "{}: model `{}` has no vision tower: video content parts need a vision-language model (Qwen2-VL)",
            videos[0].field, st.base_name
        ))
        .code("videos_not_supported"));
    };
    if prep.video_pad_id().is_none() {
        return Err(ApiError::bad_request(format!(
            "{}: model `{}` takes no videos (its config.json has no video_token_id)",
            videos[0].field, st.base_name
        ))
        .code("videos_not_supported"));
    }
    let placeholders: usize =
        messages.iter().map(|m| m.content.matches(VIDEO_PLACEHOLDER).count()).sum();
    if placeholders != videos.len() {
        return Err(ApiError::bad_request(format!(
            "messages: the text holds `{VIDEO_PLACEHOLDER}` {} time(s) besides the {} video part(s); `{VIDEO_PLACEHOLDER}` is reserved for video parts",
            placeholders - videos.len(),
            videos.len()
        ))
        .code("invalid_video"));
    }
    let jobs = videos.into_iter().map(|v| {
        let prep = prep.clone();
        let video = v.video;
        in_worker_pool(st, v.field, "video", move || prepare_video(&prep, video))
    });
    let prepared =
        futures_util::future::join_all(jobs).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut blocks = prepared.iter().map(|(block, _)| block.as_str());
    for m in messages.iter_mut() {
        if m.content.contains(VIDEO_PLACEHOLDER) {
            let mut out = String::new();
            for (k, part) in m.content.split(VIDEO_PLACEHOLDER).enumerate() {
                if k > 0 {
                    out.push_str(blocks.next().unwrap_or_default());
                }
                out.push_str(part);
            }
            m.content = out;
        }
    }
    let tensors: Vec<&tch::Tensor> = prepared.iter().map(|(_, v)| &v.pixel_values).collect();
    let pixel_values = tch::Tensor::f_cat(&tensors, 0).map_err(|e| {
        ApiError::new(500, "server_error", format!("stacking the videos' patches: {e}"))
    })?;
    Ok(VideoInputs {
        pixel_values,
        grid_thw: prepared.iter().flat_map(|(_, v)| v.grid_thw.iter().copied()).collect(),
        second_per_grid_ts: prepared
            .iter()
            .flat_map(|(_, v)| v.second_per_grid_ts.iter().copied())
            .collect(),
    })
}

/// The video of a `video_url` part: a base64 `data:video/...` URL (a video file's bytes), or
/// a path (`file://` or plain; relative to `video_dir`) of a video file or a folder of frames
/// inside `video_dir`, no link out. Remote URLs are refused: the server fetches nothing.
fn video_from_url(
    url: Option<&str>,
    video_dir: Option<&std::path::Path>,
) -> Result<PartVideo, ApiError> {
    let invalid = |m: String| ApiError::bad_request(m).code("invalid_video");
    let Some(url) = url else {
        return Err(invalid("a video_url part needs `video_url.url` (a data:video/...;base64,... URL or a path under --video-dir)".into()));
    };
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(ApiError::bad_request("remote video URLs are not fetched by this server; send the video inline as a data URL (data:video/mp4;base64,...) or name it by path under --video-dir")
            .code("remote_video_url"));
    }
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(invalid("the video data URL has no `,` before its data".into()));
        };
        let mut fields = meta.split(';');
        let mime = fields.next().unwrap_or_default().trim().to_ascii_lowercase();
        if !mime.starts_with("video/") {
            return Err(ApiError::bad_request(format!("type `{mime}` is not a video; send data:video/mp4;base64,... (or webm, x-matroska, quicktime, avi)")).code("unsupported_video_type"));
        }
        if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
            return Err(invalid(
                "the video data URL must be base64 (data:video/mp4;base64,...)".into(),
            ));
        }
        use base64::Engine as _;
        let compact: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&compact)
            .map_err(|e| invalid(format!("the video data is not valid base64: {e}")))?;
        if !crate::vision::VIDEO_FILE_DECODING {
            return Err(ApiError::bad_request("this server was built without video file decoding (cargo feature `ffmpeg`): name a folder of frames by path under --video-dir instead")
                .code("video_decoding_unavailable"));
        }
        return Ok(PartVideo::Bytes(bytes));
    }
    let Some(root) = video_dir else {
        return Err(ApiError::new(
            403,
            "permission_error",
            "reading videos by path is off: send a data URL, or start the server with --video-dir DIR",
        )
        .code("video_dir_not_set"));
    };
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.is_empty() {
        return Err(invalid("the video path is empty".into()));
    }
    let given = std::path::Path::new(path);
    let joined = if given.is_relative() { root.join(given) } else { given.to_path_buf() };
    let outside = || {
        ApiError::new(
            403,
            "permission_error",
            format!("video path `{path}` is outside the video directory (--video-dir)"),
        )
        .code("path_outside_video_dir")
    };
    let lexically_inside =
        !joined.components().any(|c| matches!(c, std::path::Component::ParentDir))
            && joined.starts_with(root);
    let real = match joined.canonicalize() {
        Ok(p) => p,
        // Do not tell whether a path outside the video directory exists.
        Err(_) if !lexically_inside => return Err(outside()),
        Err(e) => {
            return Err(ApiError::new(
                404,
                "not_found_error",
                format!("video path `{path}` does not exist ({e})"),
            )
            .code("video_path_not_found"))
        }
    };
    if !real.starts_with(root) {
        return Err(outside());
    }
    if real.is_dir() {
        let frames = crate::vision::frame_files(&real).map_err(|e| invalid(format!("{e:#}")))?;
        if frames.iter().any(|f| !f.canonicalize().is_ok_and(|c| c.starts_with(root))) {
            return Err(ApiError::new(
                403,
                "permission_error",
                format!("a frame of `{path}` links outside the video directory (--video-dir)"),
            )
            .code("path_outside_video_dir"));
        }
    }
    Ok(PartVideo::Path(real))
}

/// One image ready for the model: its block of vision tokens (the text that replaces its
/// `<image>` placeholder), its patches `[patches, C·T·P·P]` and its grid.
struct PreparedImage {
    block: String,
    pixel_values: tch::Tensor,
    grid: [i64; 3],
}

/// Checks every image's size from its header, then decodes, resizes and patchifies the images
/// in the worker pool (each within the time budget), and writes each one's block of vision
/// tokens in place of its `<image>` placeholder in `messages`.
async fn prepare_images(
    st: &AppState,
    messages: &mut [Message],
    images: Vec<RequestImage>,
) -> Result<VisionInputs, ApiError> {
    let Some(prep) = st.images.clone() else {
        return Err(ApiError::bad_request(format!(
            "{}: model `{}` has no vision tower: image content parts need a vision-language model (Qwen2-VL)",
            images[0].field, st.base_name
        ))
        .code("images_not_supported"));
    };
    let placeholders: usize =
        messages.iter().map(|m| m.content.matches(IMAGE_PLACEHOLDER).count()).sum();
    if placeholders != images.len() {
        return Err(ApiError::bad_request(format!(
            "messages: the text holds `{IMAGE_PLACEHOLDER}` {} time(s) besides the {} image part(s); `{IMAGE_PLACEHOLDER}` is reserved for image parts",
            placeholders - images.len(),
            images.len()
        ))
        .code("invalid_image"));
    }
    let cap = prep.max_image_pixels.unwrap_or(DEFAULT_MAX_IMAGE_PIXELS);
    for im in &images {
        let (width, height) = image_dimensions(&im.bytes).map_err(|e| {
            ApiError::bad_request(format!("{}: cannot read the image header: {e:#}", im.field))
                .code("invalid_image")
        })?;
        if u64::from(width) * u64::from(height) > cap {
            let too_large = ImageTooLarge { width, height, limit: cap };
            return Err(
                ApiError::bad_request(format!("{}: {too_large}", im.field)).code("image_too_large")
            );
        }
    }
    let jobs = images.into_iter().map(|im| {
        let prep = prep.clone();
        let bytes = im.bytes;
        in_worker_pool(st, im.field, "image", move || prepare_image(&prep, bytes))
    });
    let prepared =
        futures_util::future::join_all(jobs).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut blocks = prepared.iter().map(|p| p.block.as_str());
    for m in messages.iter_mut() {
        if m.content.contains(IMAGE_PLACEHOLDER) {
            let mut out = String::new();
            for (k, part) in m.content.split(IMAGE_PLACEHOLDER).enumerate() {
                if k > 0 {
                    out.push_str(blocks.next().unwrap_or_default());
                }
                out.push_str(part);
            }
            m.content = out;
        }
    }
    let tensors: Vec<&tch::Tensor> = prepared.iter().map(|p| &p.pixel_values).collect();
    let pixel_values = tch::Tensor::f_cat(&tensors, 0).map_err(|e| {
        ApiError::new(500, "server_error", format!("stacking the images' patches: {e}"))
    })?;
    Ok(VisionInputs::images(pixel_values, prepared.iter().map(|p| p.grid).collect()))
}

/// Decodes, resizes and patchifies one image (on a blocking worker); the error is the reason,
/// for people.
fn prepare_image(prep: &ImagePrep, bytes: Vec<u8>) -> Result<PreparedImage, String> {
    let mut sample = Sample {
        id: Some("request".into()),
        messages: vec![Message::new("user".to_string(), IMAGE_PLACEHOLDER.to_string())],
        images: vec![ImageSource::Blob(0)],
        blobs: vec![bytes],
        ..Default::default()
    };
    let (_, vision) = prep.expand_with_pixels(&mut sample).map_err(|e| match e {
        // "image 0 (embedded, N bytes): why" → "why"
        EncodeError::BadSample { reason, .. } => match reason.split_once("): ") {
            Some((head, why)) if head.starts_with("image 0 (") => why.to_string(),
            _ => reason,
        },
        other => other.to_string(),
    })?;
    let vision = vision.ok_or_else(|| "the image gave no patches".to_string())?;
    let grid = *vision.image_grid_thw.first().ok_or_else(|| "the image has no grid".to_string())?;
    let block = std::mem::take(&mut sample.messages[0].content);
    Ok(PreparedImage { block, pixel_values: vision.pixel_values, grid })
}

/// The image types an `image_url` data URL may carry.
const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/jpg", "image/webp"];

/// The encoded bytes of an `image_url` part: a base64 `data:` URL of a PNG, JPEG or WebP image.
/// Remote URLs are refused: the server fetches nothing.
fn image_from_url(url: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let Some(url) = url else {
        return Err(ApiError::bad_request(
            "an image_url part needs `image_url.url` (a data:image/...;base64,... URL)",
        )
        .code("invalid_image"));
    };
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(ApiError::bad_request("remote image URLs are not fetched by this server; send the image inline as a data URL (data:image/png;base64,...)")
            .code("remote_image_url"));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        let shown: String = url.chars().take(32).collect();
        return Err(ApiError::bad_request(format!("unsupported image URL `{shown}`: send the image as a data URL (data:image/png;base64,...)")).code("invalid_image"));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::bad_request("the image data URL has no `,` before its data")
            .code("invalid_image"));
    };
    let mut fields = meta.split(';');
    let mime = fields.next().unwrap_or_default().trim().to_ascii_lowercase();
    if !IMAGE_TYPES.contains(&mime.as_str()) {
        return Err(ApiError::bad_request(format!("image type `{mime}` is not supported; send PNG, JPEG or WebP (data:image/png;base64,...)")).code("unsupported_image_type"));
    }
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::bad_request(
            "the image data URL must be base64 (data:image/png;base64,...)",
        )
        .code("invalid_image"));
    }
    use base64::Engine as _;
    let compact: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(&compact).map_err(|e| {
        ApiError::bad_request(format!("the image data is not valid base64: {e}"))
            .code("invalid_image")
    })
}

/// Sends a generation to the engine and answers with its result (JSON) or its stream (SSE).
async fn run(
    st: Arc<AppState>,
    model: String,
    prompt: PromptInput,
    vision: Option<VisionInputs>,
    sampling: Sampling,
    chat: bool,
) -> Response {
    let (choice, stop, logprobs) = match sampling
        .choice(st.max_tokens_limit)
        .and_then(|c| Ok((c, sampling.stop_sequences()?, sampling.logprobs(chat)?)))
    {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let request = GenRequest {
        model: model.clone(),
        prompt,
        choice,
        seed: sampling.seed,
        stop,
        logprobs,
        vision,
        events: tx,
    };
    if let Err(e) = st.send(Command::Generate(Box::new(request))) {
        return e.into_response();
    }
    let prompt_tokens = match rx.recv().await {
        Some(Event::Start { prompt_tokens }) => prompt_tokens,
        Some(Event::Error(e)) => return e.into_response(),
        _ => {
            return ApiError::new(500, "server_error", "the engine dropped the request")
                .into_response()
        }
    };
    let id = st.next_id(if chat { "chatcmpl" } else { "cmpl" });
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let shape = Shape {
        id,
        created,
        model,
        chat,
        return_token_ids: sampling.return_token_ids,
        logprobs: logprobs.is_some(),
    };
    if sampling.stream {
        let include_usage = sampling.stream_options.unwrap_or_default().include_usage;
        return stream(shape, prompt_tokens, include_usage, rx);
    }
    let mut steps = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Token { logprobs, .. }) => steps.extend(logprobs),
            Some(Event::Start { .. }) => {}
            Some(Event::Done { finish_reason, text, token_ids, prompt_tokens }) => {
                return Json(shape.full(&text, &token_ids, &steps, finish_reason, prompt_tokens))
                    .into_response();
            }
            Some(Event::Error(e)) => return e.into_response(),
            None => {
                return ApiError::new(500, "server_error", "the engine dropped the request")
                    .into_response()
            }
        }
    }
}

/// The response fields of one request.
struct Shape {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    return_token_ids: bool,
    /// The request asked for log-probabilities.
    logprobs: bool,
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    /// The `logprobs` of a choice (or chunk) holding `steps`, `text_start` characters into the
    /// completion's text (the legacy shape's `text_offset`); null when not asked for.
    fn logprobs(&self, steps: &[StepLogprobs], text_start: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        if self.chat {
            let entry = |t: &TokenInfo| json!({"token": t.text, "logprob": shown(t.logprob), "bytes": t.text.as_bytes()});
            let content: Vec<Value> = steps
                .iter()
                .map(|s| {
                    let mut e = entry(&s.chosen);
                    e["top_logprobs"] = s.top.iter().map(entry).collect();
                    e
                })
                .collect();
            return json!({"content": content, "refusal": null});
        }
        let mut offset = text_start;
        let mut text_offset = Vec::with_capacity(steps.len());
        for s in steps {
            text_offset.push(offset);
            offset += s.chosen.text.chars().count();
        }
        let top: Vec<Value> = steps
            .iter()
            .map(|s| {
                let mut m = serde_json::Map::new();
                for t in s.top.iter().chain(std::iter::once(&s.chosen)) {
                    m.insert(t.text.clone(), json!(shown(t.logprob)));
                }
                Value::Object(m)
            })
            .collect();
        json!({
            "tokens": steps.iter().map(|s| s.chosen.text.as_str()).collect::<Vec<_>>(),
            "token_logprobs": steps.iter().map(|s| shown(s.chosen.logprob)).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": text_offset,
        })
    }

    fn full(
        &self,
        text: &str,
        ids: &[i64],
        steps: &[StepLogprobs],
        finish: &str,
        prompt_tokens: usize,
    ) -> Value {
        let logprobs = self.logprobs(steps, 0);
        let mut choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": logprobs})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs})
        };
        if self.return_token_ids {
            choice["token_ids"] = json!(ids);
        }
        json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
               "choices": [choice], "usage": usage(prompt_tokens, ids.len())})
    }

    /// A streamed chunk; `logprobs`: the chunk's `logprobs` value.
    fn chunk(
        &self,
        delta: Option<&str>,
        finish: Option<&str>,
        first: bool,
        logprobs: Value,
    ) -> Value {
        let choice = if self.chat {
            let mut d = json!({});
            if first {
                d["role"] = json!("assistant");
            }
            if let Some(t) = delta {
                d["content"] = json!(t);
            }
            json!({"index": 0, "delta": d, "finish_reason": finish, "logprobs": logprobs})
        } else {
            json!({"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish, "logprobs": logprobs})
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }
}

/// A log-probability as OpenAI shows it: `-inf` (a token the model rules out) as -9999.0.
fn shown(logprob: f32) -> f32 {
    logprob.max(-9999.0)
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Server-sent events: a chunk per piece of text (with the log-probabilities of the tokens
/// that arrived since the last chunk, when asked), a last chunk with `finish_reason` (and
/// the log-probabilities not sent yet), the usage chunk when asked (`stream_options.include_usage`), then `data: [DONE]`.
fn stream(
    shape: Shape,
    prompt_tokens: usize,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
) -> Response {
    struct St {
        rx: UnboundedReceiver<Event>,
        shape: Shape,
        first: bool,
        done: bool,
        /// Log-probabilities of tokens not sent yet (their text may be held back).
        pending: Vec<StepLogprobs>,
        /// Characters of the completion's text sent so far (legacy `text_offset`).
        sent_chars: usize,
    }
    impl St {
        /// The `logprobs` of the next chunk: those pending, sent now.
        fn take_logprobs(&mut self) -> Value {
            let steps = std::mem::take(&mut self.pending);
            let v = self.shape.logprobs(&steps, self.sent_chars);
            self.sent_chars += steps.iter().map(|s| s.chosen.text.chars().count()).sum::<usize>();
            v
        }
    }
    let state = St { rx, shape, first: true, done: false, pending: Vec::new(), sent_chars: 0 };
    let body = futures_util::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            let out = match s.rx.recv().await {
                Some(Event::Token { text, logprobs, .. }) => {
                    s.pending.extend(logprobs);
                    if text.is_empty() && !(s.first && s.shape.chat) {
                        continue;
                    }
                    let lp = s.take_logprobs();
                    let b = sse(&s.shape.chunk(Some(&text), None, s.first, lp));
                    s.first = false;
                    b
                }
                Some(Event::Done { finish_reason, token_ids, .. }) => {
                    let lp = if s.pending.is_empty() { Value::Null } else { s.take_logprobs() };
                    let mut b =
                        sse(&s.shape.chunk(None, Some(finish_reason), s.first, lp)).to_vec();
                    if include_usage {
                        let mut u = s.shape.chunk(None, None, false, Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, token_ids.len());
                        b.extend_from_slice(&sse(&u));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    s.done = true;
                    Bytes::from(b)
                }
                Some(Event::Start { .. }) => continue,
                Some(Event::Error(e)) => {
                    s.done = true;
                    let mut b = sse(&e.body()).to_vec();
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    Bytes::from(b)
                }
                None => {
                    s.done = true;
                    let e = ApiError::new(500, "server_error", "the engine dropped the request");
                    Bytes::from(sse(&e.body()).to_vec())
                }
            };
            return Some((Ok::<Bytes, std::convert::Infallible>(out), s));
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| {
            ApiError::new(500, "server_error", "building the stream").into_response()
        })
}
