//! The serving engine: one thread that owns the model and every libtorch call, fed by the
//! HTTP handlers through a channel. Between two decode steps it handles adapter loads and
//! unloads, prefills newly arrived requests and merges them into the running batches
//! (continuous batching); each step decodes one token for every running row.
//!
//! Rows of one batch may run different adapters (S-LoRA style: the base output once for the
//! whole batch, each adapter's part on its own rows, [`LinearMode::rows`]) when the adapter's
//! plugin declares `mixed_batch` and it keeps no full module copies; any other adapter gets a
//! batch of its own, and the running batches take their steps in turn.
//!
//! A request's images (Qwen2-VL) arrive decoded, resized and patchified by the HTTP side (off
//! this thread, [`super::api`]); they go through the request's own prefill; its M-RoPE deltas stay in the
//! batch's [`KvCache`] beside its row. Each row samples with its own generator ([`RowRng`]), so
//! a seeded request does not depend on its neighbours, and checks its stop sequences as its
//! text grows, streaming only text that cannot be the start of one.
//!
//! A request may ask for log-probabilities (`logprobs`): each of its tokens then carries its
//! log-probability and the step's most likely tokens under the model's raw distribution
//! (`log_softmax` of the logits before temperature, top-k and top-p, vLLM's default), computed
//! for the rows that ask only.
//!
//! A row keeps the adapter it started with: adapters are attached under an internal name
//! (`name@N`), so an unload (or a reload under the same name) only takes the public name
//! away; the attached layers stay until the last row using them finishes.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::Message;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::error::ApiError;
use crate::data::images::ImagePrep;
use crate::generate::pipeline::{SamplingChoice, TextGenerator};
use crate::generate::{token_logprobs, warp_logits, SamplingParams, TokenLogprob};
use crate::model::linear::LinearMode;
use crate::model::{ForwardArgs, KvCache, VisionInputs};
use crate::peft::adapters::CAP_INIT_REWRITES_BASE;
use crate::peft::PeftModel;
use crate::plugins::Registry;
use crate::util::rng::SplitMix64;

/// Counters the engine keeps and `/health` shows.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Decode steps taken (one per batch per step).
    pub steps: AtomicU64,
    /// Decode steps whose rows ran more than one adapter (per-row adapters).
    pub mixed_steps: AtomicU64,
    /// The most rows decoded in one step.
    pub max_rows: AtomicU64,
    /// Requests finished.
    pub finished: AtomicU64,
}

impl EngineStats {
    pub fn json(&self) -> Value {
        json!({
            "steps": self.steps.load(Ordering::Relaxed), "mixed_steps": self.mixed_steps.load(Ordering::Relaxed),
            "max_rows": self.max_rows.load(Ordering::Relaxed), "finished": self.finished.load(Ordering::Relaxed),
        })
    }
}

/// What the engine is told at start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The name that selects the base model (no adapter).
    pub base_name: String,
    /// Adapter directories the API may load from (`--adapter-dir`), canonical; `None`: the API
    /// loads nothing.
    pub adapter_dir: Option<PathBuf>,
    /// Rows decoded together at most, over all running batches.
    pub max_batch: usize,
    /// Adapters loaded at most; loading one more evicts the least recently used adapter that
    /// has no running or queued request and was neither loaded nor used within
    /// `adapter_grace`; when none can go, the load is refused (429 `adapter_capacity`).
    pub max_adapters: usize,
    /// How long an adapter stays safe from eviction after it was loaded or last used.
    pub adapter_grace: Duration,
    /// `max_tokens` at most (a request without one gets the model's default, capped by this).
    pub max_tokens_limit: usize,
    /// A vision-language model's images are resized to at most this many pixels (default: its
    /// `preprocessor_config.json` `max_pixels`).
    pub image_max_pixels: Option<u64>,
    /// Images whose header announces more pixels are refused before decoding (default:
    /// [`pixel_cap_for`](crate::vision::pixel_cap_for) the resize bound, 4 × it).
    pub max_image_pixels: Option<u64>,
}

/// Stop sequences a request may give at most (as OpenAI).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The prompt of a request.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Plain text, tokenized with the tokenizer's special tokens (`/v1/completions`).
    Text(String),
    /// Chat turns rendered by the model's chat template with the generation prompt.
    Chat(Vec<Message>),
}

/// One generation request.
pub struct GenRequest {
    /// Base name or a loaded adapter's name.
    pub model: String,
    pub prompt: PromptInput,
    /// Sampling (`max_new_tokens` is the request's `max_tokens`); unset fields take the
    /// model's `generation_config.json` defaults.
    pub choice: SamplingChoice,
    /// The request's `seed`: its sampled tokens then come from a generator of its own, so the
    /// same request gives the same text whatever else runs in the batch. `None`: a random seed.
    pub seed: Option<u64>,
    /// Stop sequences: generation ends before the first of them, which is not returned.
    pub stop: Vec<String>,
    /// Log-probabilities with each token and this many most likely tokens of each step
    /// (`Some(0)`: the token's own only); `None`: none.
    pub logprobs: Option<usize>,
    /// The pixel values and grids of a chat prompt's images, prepared off the engine thread;
    /// its messages already hold each image's block of vision tokens (a vision-language
    /// model only).
    pub vision: Option<VisionInputs>,
    /// Where the engine reports: [`Event::Start`] or [`Event::Error`] first.
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
}

/// What the engine reports about one request.
#[derive(Debug, Clone)]
pub enum Event {
    /// Admitted: the prompt is tokenized and the adapter resolved.
    Start {
        prompt_tokens: usize,
    },
    /// One new token and the text it adds (may be empty while a character is incomplete);
    /// its log-probabilities when the request asked for them (`id` -1: the rest of the text
    /// at the end, no token).
    Token {
        id: i64,
        text: String,
        logprobs: Option<StepLogprobs>,
    },
    /// Finished: `stop` (an end-of-sequence token or a stop sequence) or `length`
    /// (`max_tokens`); the full text (without the stop sequence).
    Done {
        finish_reason: &'static str,
        text: String,
        token_ids: Vec<i64>,
        prompt_tokens: usize,
    },
    Error(ApiError),
}

/// A token as logprobs show it: its id, its text decoded alone, and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: i64,
    pub text: String,
    pub logprob: f32,
}

/// One generated token's log-probability and the most likely tokens of its step (most likely
/// first), under the model's raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogprobs {
    pub chosen: TokenInfo,
    pub top: Vec<TokenInfo>,
}

/// Work for the engine.
pub enum Command {
    Generate(Box<GenRequest>),
    /// Load the PEFT directory `path` as adapter `name`; `trusted`: from the command line, not
    /// bound to `--adapter-dir`.
    Load {
        name: String,
        path: String,
        trusted: bool,
        reply: tokio::sync::oneshot::Sender<Result<Value, ApiError>>,
    },
    Unload {
        name: String,
        reply: tokio::sync::oneshot::Sender<Result<Value, ApiError>>,
    },
    /// Finish the running requests, then stop.
    Shutdown,
}

/// An adapter the engine has attached.
struct Slot {
    public: String,
    /// The name it is attached to the model under.
    internal: String,
    path: PathBuf,
    mixes: bool,
    /// Rows running on it.
    in_use: usize,
    last_used: u64,
    /// When it was loaded or last given a request.
    touched: Instant,
}

/// A request ready to prefill.
struct Admitted {
    ids: Vec<i64>,
    internal: Option<String>,
    params: SamplingParams,
    rng: RowRng,
    vision: Option<VisionInputs>,
    logprobs: Option<usize>,
}

/// One running request.
struct Row {
    internal: Option<String>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    params: SamplingParams,
    /// The row's own sampling generator (unused by greedy rows).
    rng: RowRng,
    stop: Vec<String>,
    /// Log-probabilities with each token, and this many top tokens.
    logprobs: Option<usize>,
    prompt_tokens: usize,
    generated: Vec<i64>,
    /// The text streamed so far.
    sent: String,
    /// The token to feed at the next step.
    last: i64,
}

/// Rows decoded together: `key` `None` for the mixed batch, else the one adapter (by internal
/// name) of an adapter that cannot share a batch.
struct Batch {
    key: Option<String>,
    rows: Vec<Row>,
    cache: KvCache,
    /// `[rows, positions]` 1 = token, 0 = left padding.
    mask: Option<Tensor>,
}

/// The engine's state (lives on its own thread).
pub struct Engine {
    gen: TextGenerator,
    /// A vision-language model's image settings, shared with the HTTP side, which prepares
    /// images off this thread.
    pub images: Option<Arc<ImagePrep>>,
    registry: Registry,
    cfg: EngineConfig,
    adapters: Vec<Slot>,
    /// Unloaded or evicted adapters still used by running rows.
    retiring: Vec<Slot>,
    batches: Vec<Batch>,
    pending: VecDeque<Box<GenRequest>>,
    tick: u64,
    serial: u64,
    /// The loaded adapters' public names, for `/v1/models` (read by the HTTP side).
    listing: Arc<RwLock<Vec<String>>>,
    pub stats: Arc<EngineStats>,
}

/// One row's random numbers ([`SplitMix64`]): a request's draws depend on its seed and its
/// step alone, never on the other rows of the batch or on libtorch's global generator.
#[derive(Debug, Clone)]
pub struct RowRng(SplitMix64);

impl RowRng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64(seed))
    }

    /// A generator with a seed nobody chose (a request without `seed`).
    pub fn unseeded() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Self::new(h.finish())
    }

    /// Uniform in (0, 1].
    pub fn next_unit(&mut self) -> f64 {
        self.0.uniform()
    }
}

/// Draws one token from `probs` `[1, V]` by inverse CDF at `u` in (0, 1]: the first token
/// whose cumulative probability reaches `u` (never a token of probability 0).
pub fn draw_token(probs: &Tensor, u: f64) -> Result<i64> {
    let cdf = probs.f_to_kind(Kind::Double)?.f_cumsum(-1, Kind::Double)?;
    let v = cdf.size2()?.1;
    let total = cdf.f_double_value(&[0, v - 1])?;
    let below = cdf.f_lt(u * total)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    Ok(below.min(v - 1))
}

/// Picks each row's next token from `[B, V]` logits: argmax for greedy rows, transformers'
/// warpers then a draw with the row's own generator for the others.
fn pick_tokens(logits: &Tensor, rows: &mut [(&SamplingParams, &mut RowRng)]) -> Result<Vec<i64>> {
    let mut out: Vec<i64> = Vec::try_from(&logits.f_argmax(-1, false)?.f_to_device(Device::Cpu)?)?;
    for (i, (p, rng)) in rows.iter_mut().enumerate() {
        if !p.is_greedy() {
            let row = logits.f_narrow(0, i as i64, 1)?;
            let probs =
                warp_logits(&row, p.temperature, p.top_k, p.top_p)?.f_softmax(-1, Kind::Float)?;
            out[i] = draw_token(&probs, rng.next_unit())?;
        }
    }
    Ok(out)
}

/// The byte offset where the first stop sequence found in `text` starts.
pub fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How many bytes at the end of `text` might be the start of a stop sequence, and so must not
/// be streamed yet.
pub fn stop_hold_back(text: &str, stop: &[String]) -> usize {
    let mut hold = 0;
    for s in stop {
        for (k, _) in s.char_indices().skip(1) {
            if k > hold && text.ends_with(&s[..k]) {
                hold = k;
            }
        }
    }
    hold
}

/// The linear-layer mode of a step over rows running `names` (internal adapter names, `None` =
/// base): one adapter for all rows when they agree, per-row adapters otherwise.
pub fn rows_mode<'a>(names: &'a [Option<&'a str>]) -> LinearMode<'a> {
    match names.first() {
        Some(first) if names.iter().all(|n| n == first) => {
            LinearMode { adapter: *first, train: false, rows: None }
        }
        _ => LinearMode { adapter: None, train: false, rows: Some(names) },
    }
}

/// One decode step: feeds `tokens` (one per row) after the cached positions, extends `mask`
/// by one column, and returns the logits `[B, V]` of the new position.
pub fn decode_step(
    model: &PeftModel,
    cache: &mut KvCache,
    mask: &mut Tensor,
    tokens: &[i64],
    names: &[Option<&str>],
) -> Result<Tensor> {
    let b = tokens.len() as i64;
    let device = model.device();
    let input = Tensor::f_from_slice(tokens)?.f_view([b, 1])?.f_to_device(device)?;
    *mask = Tensor::f_cat(&[&*mask, &Tensor::f_ones([b, 1], (Kind::Int64, device))?], 1)?;
    model.forward(
        ForwardArgs::ids(&input).mask(Some(mask)).cache(Some(cache)).mode(rows_mode(names)).last(),
    )
}

/// Left-pads a `[B, S]` mask with zeros to `width` columns.
fn pad_mask(mask: Tensor, width: i64) -> Result<Tensor> {
    let (b, s) = mask.size2()?;
    if s == width {
        return Ok(mask);
    }
    Ok(Tensor::f_cat(&[Tensor::f_zeros([b, width - s], (mask.kind(), mask.device()))?, mask], 1)?)
}

/// Joins a prefilled single row (its cache and mask) into a batch.
pub fn join_rows(
    cache: &mut KvCache,
    mask: &mut Option<Tensor>,
    new_cache: KvCache,
    new_mask: Tensor,
) -> Result<()> {
    let width = cache.seq_len().max(new_cache.seq_len());
    cache.append_rows(new_cache)?;
    *mask = Some(match mask.take() {
        None => new_mask,
        Some(m) => Tensor::f_cat(&[pad_mask(m, width)?, pad_mask(new_mask, width)?], 0)?,
    });
    Ok(())
}

/// Keeps rows `keep` of a batch's cache and mask, dropping the leading all-padding columns.
pub fn retain_rows(cache: &mut KvCache, mask: &mut Tensor, keep: &[i64]) -> Result<()> {
    let idx = Tensor::f_from_slice(keep)?.f_to_device(mask.device())?;
    let kept = mask.f_index_select(0, &idx)?;
    let width = kept.size2()?.1;
    let longest = kept.f_sum_dim_intlist(1, false, Kind::Int64)?.f_max()?.f_int64_value(&[])?;
    let first = width - longest;
    cache.retain(keep, first)?;
    *mask = kept.f_narrow(1, first, longest)?;
    Ok(())
}

impl Engine {
    pub fn new(
        mut gen: TextGenerator,
        registry: Registry,
        cfg: EngineConfig,
        listing: Arc<RwLock<Vec<String>>>,
    ) -> Self {
        let images = gen.images.take().map(Arc::new);
        Self {
            gen,
            images,
            registry,
            cfg,
            adapters: Vec::new(),
            retiring: Vec::new(),
            batches: Vec::new(),
            pending: VecDeque::new(),
            tick: 0,
            serial: 0,
            listing,
            stats: Arc::default(),
        }
    }

    pub fn model(&self) -> &PeftModel {
        &self.gen.model
    }

    fn running_rows(&self) -> usize {
        self.batches.iter().map(|b| b.rows.len()).sum()
    }

    fn loaded_names(&self) -> Vec<String> {
        self.adapters.iter().map(|s| s.public.clone()).collect()
    }

    fn publish(&self) {
        *self.listing.write().unwrap_or_else(|p| p.into_inner()) = self.loaded_names();
    }

    /// Runs until [`Command::Shutdown`] (or every sender is gone) and no request is left.
    pub fn run(mut self, rx: Receiver<Command>) {
        let mut stopping = false;
        loop {
            if self.batches.is_empty() && self.pending.is_empty() {
                if stopping {
                    break;
                }
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(c) => stopping |= self.handle(c),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(c) = rx.try_recv() {
                stopping |= self.handle(c);
            }
            self.admit();
            self.step_all();
        }
        tracing::info!("engine stopped");
    }

    /// Handles one command; true for a shutdown.
    fn handle(&mut self, c: Command) -> bool {
        match c {
            Command::Generate(r) => self.pending.push_back(r),
            Command::Load { name, path, trusted, reply } => {
                let _ = reply.send(self.load(&name, &path, trusted));
            }
            Command::Unload { name, reply } => {
                let _ = reply.send(self.unload(&name));
            }
            Command::Shutdown => return true,
        }
        false
    }

    /// Loads adapter `name` from `path`, checking the path, the adapter and the cap first.
    pub fn load(&mut self, name: &str, path: &str, trusted: bool) -> Result<Value, ApiError> {
        if name.is_empty()
            || name.len() > 128
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(ApiError::bad_request(format!(
                "adapter name `{name}` is not allowed: use 1 to 128 characters among letters, digits, `-`, `_`, `.`, `:`"
            )));
        }
        if name == self.cfg.base_name {
            return Err(ApiError::bad_request(format!(
                "`{name}` is the base model's name; choose another adapter name"
            )));
        }
        if self.adapters.iter().any(|s| s.public == name) {
            return Err(ApiError::bad_request(format!(
                "an adapter named `{name}` is already loaded; unload it first"
            ))
            .code("adapter_exists"));
        }
        let dir = self.checked_dir(path, trusted)?;
        self.check_adapter(&dir)?;
        // Decide what makes room before reading a byte of weights.
        let victim = if self.adapters.len() >= self.cfg.max_adapters {
            Some(self.eviction_victim(name)?)
        } else {
            None
        };
        self.serial += 1;
        let internal = format!("{name}@{}", self.serial);
        let start = Instant::now();
        let report =
            self.gen.model.load_peft_adapter_as(&dir, &self.registry, &internal).map_err(|e| {
                ApiError::bad_request(format!(
                    "adapter `{name}` from {path} cannot be loaded: {e:#}"
                ))
                .code("invalid_adapter")
            })?;
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        let mixes = self.gen.model.adapter_mixes(&internal);
        self.tick += 1;
        self.adapters.push(Slot {
            public: name.to_string(),
            internal,
            path: dir.clone(),
            mixes,
            in_use: 0,
            last_used: self.tick,
            touched: Instant::now(),
        });
        let evicted = victim.and_then(|v| {
            let i = self.adapters.iter().position(|s| s.internal == v)?;
            let slot = self.adapters.remove(i);
            let public = slot.public.clone();
            self.drop_slot(slot);
            Some(public)
        });
        self.publish();
        tracing::info!(
            "loaded adapter `{name}` from {} in {load_ms:.1} ms{}",
            dir.display(),
            evicted.as_ref().map(|e| format!(", evicted `{e}`")).unwrap_or_default()
        );
        Ok(json!({
            "name": name, "path": dir.display().to_string(), "modules": report.modules.len(),
            "mixed_batch": mixes, "load_ms": load_ms, "evicted": evicted,
        }))
    }

    /// Requests waiting in the queue for adapter `public`.
    fn queued_for(&self, public: &str) -> usize {
        self.pending.iter().filter(|r| r.model == public).count()
    }

    /// The internal name of the adapter a load of `name` may evict: the least recently used one
    /// with no running or queued request that was neither loaded nor used within the grace
    /// period. When there is none, the refusal (429 `adapter_capacity`) says why each stays.
    fn eviction_victim(&self, name: &str) -> Result<String, ApiError> {
        let grace = self.cfg.adapter_grace;
        let mut reasons = Vec::new();
        let mut retry_after = grace;
        let mut best: Option<&Slot> = None;
        for s in &self.adapters {
            let queued = self.queued_for(&s.public);
            let idle_for = s.touched.elapsed();
            if s.in_use > 0 || queued > 0 {
                reasons.push(format!(
                    "`{}` has {} running and {queued} queued request(s)",
                    s.public, s.in_use
                ));
            } else if idle_for < grace {
                retry_after = retry_after.min(grace - idle_for);
                reasons.push(format!(
                    "`{}` was loaded or used {:.1} s ago",
                    s.public,
                    idle_for.as_secs_f64()
                ));
            } else if best.is_none_or(|b| s.last_used < b.last_used) {
                best = Some(s);
            }
        }
        if let Some(b) = best {
            return Ok(b.internal.clone());
        }
        Err(ApiError::new(
            429,
            "rate_limit_error",
            format!(
                "cannot load `{name}`: {} adapters are loaded (--max-adapters {}) and none can be evicted: {}; adapters with running or queued requests, or loaded or used in the last {} s (--adapter-grace-secs), are kept. Retry later, or unload one (DELETE /v1/adapters/NAME)",
                self.adapters.len(),
                self.cfg.max_adapters,
                reasons.join("; "),
                grace.as_secs_f64()
            ),
        )
        .code("adapter_capacity")
        .retry_after(retry_after.as_secs().max(1)))
    }

    /// The canonical adapter directory `path` names: inside `--adapter-dir` unless `trusted`,
    /// its two files too (no symlink out).
    fn checked_dir(&self, path: &str, trusted: bool) -> Result<PathBuf, ApiError> {
        let root = match (&self.cfg.adapter_dir, trusted) {
            (_, true) => None,
            (Some(r), false) => Some(r.as_path()),
            (None, false) => return Err(ApiError::new(
                403,
                "permission_error",
                "loading adapters through the API is off: start the server with --adapter-dir DIR",
            )
            .code("adapter_dir_not_set")),
        };
        if path.is_empty() {
            return Err(ApiError::bad_request("the adapter path is empty"));
        }
        let given = Path::new(path);
        let joined = match root {
            Some(r) if given.is_relative() => r.join(given),
            _ => given.to_path_buf(),
        };
        let outside = || {
            ApiError::new(
                403,
                "permission_error",
                format!("adapter path `{path}` is outside the adapter directory (--adapter-dir)"),
            )
            .code("path_outside_adapter_dir")
        };
        let dir = match joined.canonicalize() {
            Ok(d) => d,
            // Do not tell whether a path outside the adapter directory exists.
            Err(_) if root.is_some_and(|r| !lexically_inside(&joined, r)) => return Err(outside()),
            Err(e) => {
                return Err(ApiError::new(
                    404,
                    "not_found_error",
                    format!("adapter path `{path}` does not exist ({e})"),
                )
                .code("adapter_path_not_found"))
            }
        };
        if let Some(r) = root {
            if !dir.starts_with(r) {
                return Err(outside());
            }
        }
        let (config, weights) = crate::peft::adapter_files(&dir)
            .map_err(|e| ApiError::bad_request(format!("{e:#}")).code("invalid_adapter"))?;
        if let Some(r) = root {
            for f in [&config, &weights] {
                if !f.canonicalize().is_ok_and(|c| c.starts_with(r)) {
                    return Err(ApiError::new(
                        403,
                        "permission_error",
                        format!(
                            "{} links outside the adapter directory (--adapter-dir)",
                            f.display()
                        ),
                    )
                    .code("path_outside_adapter_dir"));
                }
            }
        }
        Ok(dir)
    }

    /// Refuses adapters that would change the shared base model: full weights trained beside
    /// the adapter, or an initialisation that rewrites base weights (PiSSA, OLoRA).
    fn check_adapter(&self, dir: &Path) -> Result<(), ApiError> {
        if dir.join(crate::peft::non_lora::NON_LORA_FILE).exists() {
            return Err(ApiError::bad_request(format!(
                "{} holds {}: full weights that replace the base model's, which a server shared by many adapters cannot do; merge it instead",
                dir.display(),
                crate::peft::non_lora::NON_LORA_FILE
            ))
            .code("invalid_adapter"));
        }
        let config_path = dir.join(crate::peft::ADAPTER_CONFIG);
        let invalid =
            |e: anyhow::Error| ApiError::bad_request(format!("{e:#}")).code("invalid_adapter");
        let mapped = crate::peft::plugin_config(
            &crate::peft::read_adapter_config(&config_path).map_err(invalid)?,
            &config_path,
        )
        .map_err(invalid)?;
        let method = self
            .registry
            .adapter(&mapped.plugin, &mapped.config_json)
            .map_err(|e| invalid(anyhow::anyhow!("{}: {e}", config_path.display())))?;
        use ferrotune_plugin_api::AdapterMethod;
        if method.capabilities().iter().any(|c| c == CAP_INIT_REWRITES_BASE) {
            return Err(ApiError::bad_request(format!(
                "{}: this adapter's initialisation rewrites the base weights (PiSSA/OLoRA-style init_lora_weights), which a shared base cannot take; merge it, or save it with init_lora_weights: true",
                config_path.display()
            ))
            .code("invalid_adapter"));
        }
        Ok(())
    }

    /// Detaches an adapter slot now, or once its rows finish.
    fn drop_slot(&mut self, slot: Slot) {
        if slot.in_use == 0 {
            if let Err(e) = self.gen.model.remove_adapter(&slot.internal) {
                tracing::warn!("removing adapter `{}`: {e:#}", slot.public);
            }
        } else {
            self.retiring.push(slot);
        }
    }

    /// Unloads adapter `name`: gone for new requests at once, detached when its rows finish.
    pub fn unload(&mut self, name: &str) -> Result<Value, ApiError> {
        let Some(i) = self.adapters.iter().position(|s| s.public == name) else {
            return Err(self.unknown(name));
        };
        let slot = self.adapters.remove(i);
        let (running, path) = (slot.in_use, slot.path.clone());
        self.drop_slot(slot);
        self.publish();
        tracing::info!(
            "unloaded adapter `{name}`{}",
            if running > 0 {
                format!(" ({running} running request(s) finish on it first)")
            } else {
                String::new()
            }
        );
        Ok(
            json!({"name": name, "path": path.display().to_string(), "unloaded": true, "running_requests": running}),
        )
    }

    fn unknown(&self, name: &str) -> ApiError {
        let mut names = vec![self.cfg.base_name.clone()];
        names.extend(self.loaded_names());
        ApiError::new(
            404,
            "not_found_error",
            format!(
                "model `{name}` is neither the base model nor a loaded adapter; loaded: {}",
                names.join(", ")
            ),
        )
        .code("model_not_found")
        .with_names(names)
    }

    /// Marks one row of adapter `internal` finished; a retiring adapter is detached with its last row.
    fn release(&mut self, internal: Option<&str>) {
        let Some(internal) = internal else { return };
        if let Some(s) = self.adapters.iter_mut().find(|s| s.internal == internal) {
            s.in_use = s.in_use.saturating_sub(1);
            s.touched = Instant::now();
        } else if let Some(i) = self.retiring.iter().position(|s| s.internal == internal) {
            self.retiring[i].in_use -= 1;
            if self.retiring[i].in_use == 0 {
                let slot = self.retiring.remove(i);
                self.drop_slot(slot);
            }
        }
    }

    /// Prefills pending requests while the batch has room and joins them to their batch.
    fn admit(&mut self) {
        while self.running_rows() < self.cfg.max_batch {
            let Some(mut req) = self.pending.pop_front() else { break };
            let admitted = match self.start(&mut req) {
                Ok(x) => x,
                Err(e) => {
                    let _ = req.events.send(Event::Error(e));
                    continue;
                }
            };
            let internal = admitted.internal.clone();
            if let Err(e) = self.prefill(*req, admitted) {
                tracing::warn!("prefill failed: {e:#}");
                self.release(internal.as_deref());
            }
        }
    }

    /// Resolves the adapter and tokenizes the prompt (its images are prepared already);
    /// reports [`Event::Start`].
    fn start(&mut self, req: &mut GenRequest) -> Result<Admitted, ApiError> {
        let internal = if req.model == self.cfg.base_name {
            None
        } else {
            match self.adapters.iter().find(|s| s.public == req.model) {
                Some(s) => Some(s.internal.clone()),
                None => return Err(self.unknown(&req.model)),
            }
        };
        let tokenize =
            |e: anyhow::Error| ApiError::bad_request(format!("cannot tokenize the prompt: {e:#}"));
        let (ids, vision) = match &req.prompt {
            PromptInput::Text(t) => (self.gen.tokenizer.encode(t, true).map_err(tokenize)?, None),
            PromptInput::Chat(m) => {
                if !self.gen.tokenizer.has_chat_template() {
                    return Err(ApiError::bad_request(
                        "this model's tokenizer has no chat_template: use /v1/completions",
                    ));
                }
                (self.gen.tokenizer.encode_chat(m, true).map_err(tokenize)?, req.vision.take())
            }
        };
        let mut params = self.gen.sampling_params(&req.choice);
        params.max_new_tokens = params.max_new_tokens.min(self.cfg.max_tokens_limit).max(1);
        let cfg = self.gen.model.config();
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        let need = ids.len() + params.max_new_tokens;
        if need as i64 > cfg.max_position_embeddings {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens; with max_tokens {} that is {need} positions, more than the model's context of {}",
                ids.len(),
                params.max_new_tokens,
                cfg.max_position_embeddings
            ))
            .code("context_length_exceeded"));
        }
        if let Some(i) = &internal {
            self.tick += 1;
            let s = self.adapters.iter_mut().find(|s| &s.internal == i).expect("found above");
            s.in_use += 1;
            s.last_used = self.tick;
            s.touched = Instant::now();
        }
        let _ = req.events.send(Event::Start { prompt_tokens: ids.len() });
        let rng = req.seed.map_or_else(RowRng::unseeded, RowRng::new);
        Ok(Admitted { ids, internal, params, rng, vision, logprobs: req.logprobs })
    }

    /// Runs one request's prompt alone, reports its first token and joins it to a batch.
    fn prefill(&mut self, req: GenRequest, admitted: Admitted) -> Result<()> {
        let Admitted { ids, internal, params, mut rng, vision, logprobs } = admitted;
        let mixes = internal
            .as_deref()
            .is_none_or(|i| self.adapters.iter().any(|s| s.internal == i && s.mixes));
        let model = &self.gen.model;
        let device = model.device();
        let result = tch::no_grad(|| -> Result<(KvCache, Tensor, i64, Option<TokenLogprob>)> {
            let l = ids.len() as i64;
            let input = Tensor::f_from_slice(&ids)?.f_view([1, l])?.f_to_device(device)?;
            let mask = Tensor::f_ones([1, l], (Kind::Int64, device))?;
            let mut cache = model.new_cache(1);
            let mode = LinearMode { adapter: internal.as_deref(), train: false, rows: None };
            let logits = model.forward(
                ForwardArgs::ids(&input)
                    .mask(Some(&mask))
                    .images(vision.as_ref())
                    .cache(Some(&mut cache))
                    .mode(mode)
                    .last(),
            )?;
            let tok = pick_tokens(&logits, &mut [(&params, &mut rng)])?[0];
            let lp = token_logprobs(&logits, &[tok], &[logprobs])?.pop().flatten();
            let mask = model.mask_after_prefill(internal.as_deref(), mask)?;
            Ok((cache, mask, tok, lp))
        });
        let (cache, mask, tok, lp) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = req.events.send(Event::Error(ApiError::new(
                    500,
                    "server_error",
                    format!("prefill: {e:#}"),
                )));
                return Err(e);
            }
        };
        let mut row = Row {
            internal,
            events: req.events,
            params,
            rng,
            stop: req.stop,
            logprobs,
            prompt_tokens: ids.len(),
            generated: Vec::new(),
            sent: String::new(),
            last: tok,
        };
        if self.accept(&mut row, tok, lp) {
            self.release(row.internal.as_deref());
            return Ok(());
        }
        let key = if mixes { None } else { row.internal.clone() };
        let bi = match self.batches.iter().position(|b| b.key == key) {
            Some(i) => i,
            None => {
                let cache = self.gen.model.new_cache(0);
                self.batches.push(Batch { key, rows: Vec::new(), cache, mask: None });
                self.batches.len() - 1
            }
        };
        let batch = &mut self.batches[bi];
        if let Err(e) = join_rows(&mut batch.cache, &mut batch.mask, cache, mask) {
            let _ = row.events.send(Event::Error(ApiError::new(
                500,
                "server_error",
                format!("joining the batch: {e:#}"),
            )));
            let internal = row.internal.clone();
            self.release(internal.as_deref());
            return Err(e);
        }
        batch.rows.push(row);
        Ok(())
    }

    /// Takes token `tok` for `row`: streams the text that is final (not an incomplete
    /// character, not what may be the start of a stop sequence); true when the row is finished
    /// (end-of-sequence, a stop sequence, `max_tokens`, or the client went away).
    fn accept(&self, row: &mut Row, tok: i64, lp: Option<TokenLogprob>) -> bool {
        let finish = if row.params.eos_token_ids.contains(&tok) {
            Some("stop")
        } else {
            row.generated.push(tok);
            row.last = tok;
            let text = self.gen.tokenizer.decode(&row.generated, true).unwrap_or_default();
            let finish = if find_stop(&text, &row.stop).is_some() {
                Some("stop")
            } else {
                (row.generated.len() >= row.params.max_new_tokens).then_some("length")
            };
            let mut delta = String::new();
            if finish.is_none() && !text.ends_with('\u{FFFD}') {
                let ready = text.len() - stop_hold_back(&text, &row.stop);
                if text.is_char_boundary(ready)
                    && ready > row.sent.len()
                    && text[..ready].starts_with(row.sent.as_str())
                {
                    delta = text[row.sent.len()..ready].to_string();
                    row.sent = text[..ready].to_string();
                }
            }
            let logprobs = lp.map(|lp| self.step_logprobs(&lp));
            if row.events.send(Event::Token { id: tok, text: delta, logprobs }).is_err() {
                return true; // the client is gone
            }
            finish
        };
        match finish {
            Some(reason) => {
                let mut text = self.gen.tokenizer.decode(&row.generated, true).unwrap_or_default();
                if let Some(cut) = find_stop(&text, &row.stop) {
                    text.truncate(cut);
                }
                if text.len() > row.sent.len() && text.starts_with(row.sent.as_str()) {
                    let _ = row.events.send(Event::Token {
                        id: -1,
                        text: text[row.sent.len()..].to_string(),
                        logprobs: None,
                    });
                }
                self.stats.finished.fetch_add(1, Ordering::Relaxed);
                let _ = row.events.send(Event::Done {
                    finish_reason: reason,
                    text,
                    token_ids: row.generated.clone(),
                    prompt_tokens: row.prompt_tokens,
                });
                true
            }
            None => false,
        }
    }

    /// Log-probabilities with the tokens' texts, for the API.
    fn step_logprobs(&self, lp: &TokenLogprob) -> StepLogprobs {
        let info = |id: i64, logprob: f32| TokenInfo {
            id,
            text: self.gen.tokenizer.decode(&[id], false).unwrap_or_default(),
            logprob,
        };
        StepLogprobs {
            chosen: info(lp.token_id, lp.logprob),
            top: lp.top.iter().map(|&(id, l)| info(id, l)).collect(),
        }
    }

    /// One decode step for every running batch; finished rows leave their batch.
    fn step_all(&mut self) {
        let mut i = 0;
        while i < self.batches.len() {
            if let Err(e) = self.step(i) {
                tracing::error!("decode step failed: {e:#}");
                let batch = self.batches.remove(i);
                for row in batch.rows {
                    let _ = row.events.send(Event::Error(ApiError::new(
                        500,
                        "server_error",
                        format!("decode step: {e:#}"),
                    )));
                    self.release(row.internal.as_deref());
                }
                continue;
            }
            if self.batches[i].rows.is_empty() {
                self.batches.remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn step(&mut self, bi: usize) -> Result<()> {
        let mut batch = std::mem::replace(
            &mut self.batches[bi],
            Batch { key: None, rows: Vec::new(), cache: KvCache::new(0, 0), mask: None },
        );
        let result = tch::no_grad(|| -> Result<(Vec<i64>, Vec<Option<TokenLogprob>>)> {
            let tokens: Vec<i64> = batch.rows.iter().map(|r| r.last).collect();
            let names: Vec<Option<&str>> =
                batch.rows.iter().map(|r| r.internal.as_deref()).collect();
            self.stats.steps.fetch_add(1, Ordering::Relaxed);
            self.stats.max_rows.fetch_max(names.len() as u64, Ordering::Relaxed);
            if rows_mode(&names).rows.is_some() {
                self.stats.mixed_steps.fetch_add(1, Ordering::Relaxed);
            }
            let mask = batch.mask.as_mut().context("a running batch has a mask")?;
            let logits = decode_step(&self.gen.model, &mut batch.cache, mask, &tokens, &names)?;
            let mut rows: Vec<(&SamplingParams, &mut RowRng)> =
                batch.rows.iter_mut().map(|r| (&r.params, &mut r.rng)).collect();
            let picks = pick_tokens(&logits, &mut rows)?;
            let asked: Vec<Option<usize>> = batch.rows.iter().map(|r| r.logprobs).collect();
            let lps = token_logprobs(&logits, &picks, &asked)?;
            Ok((picks, lps))
        });
        let (picks, lps) = match result {
            Ok(p) => p,
            Err(e) => {
                self.batches[bi] = batch;
                return Err(e);
            }
        };
        let mut keep = Vec::new();
        let mut done = Vec::new();
        for (i, ((row, tok), lp)) in batch.rows.iter_mut().zip(picks).zip(lps).enumerate() {
            if self.accept(row, tok, lp) {
                done.push(i);
            } else {
                keep.push(i as i64);
            }
        }
        if !done.is_empty() {
            let mut rows = std::mem::take(&mut batch.rows);
            for &d in done.iter().rev() {
                let row = rows.remove(d);
                self.release(row.internal.as_deref());
            }
            batch.rows = rows;
            if !batch.rows.is_empty() {
                let mask = batch.mask.as_mut().context("a running batch has a mask")?;
                tch::no_grad(|| retain_rows(&mut batch.cache, mask, &keep))?;
            }
        }
        self.batches[bi] = batch;
        Ok(())
    }
}

/// Whether `path` (not yet existing) lies under `root` by its components alone (no `..`).
fn lexically_inside(path: &Path, root: &Path) -> bool {
    !path.components().any(|c| matches!(c, std::path::Component::ParentDir))
        && path.starts_with(root)
}

/// Loads the model and adapters of the command line, for the engine thread.
pub fn load_engine(
    model_dir: &Path,
    device: Device,
    dtype: Kind,
    registry: Registry,
    cfg: EngineConfig,
    adapters: &[(String, PathBuf)],
    listing: Arc<RwLock<Vec<String>>>,
) -> Result<Engine> {
    if cfg.max_batch == 0 || cfg.max_adapters == 0 {
        bail!("--max-batch and --max-adapters must be at least 1");
    }
    if adapters.len() > cfg.max_adapters {
        bail!(
            "{} adapters are given with --adapter but --max-adapters is {}: raise --max-adapters",
            adapters.len(),
            cfg.max_adapters
        );
    }
    let mut gen = TextGenerator::load(model_dir, device, dtype)?;
    if let Some(max) = cfg.image_max_pixels {
        match &mut gen.images {
            Some(prep) if max >= prep.processor.min_pixels => prep.max_pixels = Some(max),
            Some(prep) => bail!(
                "--image-max-pixels {max} is below the model's min_pixels {}",
                prep.processor.min_pixels
            ),
            None => bail!(
                "--image-max-pixels needs a vision-language model; {} has no vision tower",
                model_dir.display()
            ),
        }
    }
    match (&mut gen.images, cfg.max_image_pixels) {
        (Some(prep), cap) => {
            let resized_to = prep.max_pixels.unwrap_or(prep.processor.max_pixels);
            let cap = cap.unwrap_or_else(|| crate::vision::pixel_cap_for(resized_to));
            if cap == 0 {
                bail!("--max-image-pixels must be at least 1");
            }
            prep.max_image_pixels = Some(cap);
        }
        (None, Some(_)) => bail!(
            "--max-image-pixels needs a vision-language model; {} has no vision tower",
            model_dir.display()
        ),
        (None, None) => {}
    }
    let mut engine = Engine::new(gen, registry, cfg, listing);
    for (name, dir) in adapters {
        engine
            .load(name, &dir.display().to_string(), true)
            .map_err(|e| anyhow::anyhow!("--adapter {name}={}: {}", dir.display(), e.message))?;
    }
    engine.publish();
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_first_stop_sequence_in_the_text_wins() {
        let s = stops(&["cd", "b"]);
        assert_eq!(find_stop("abcd", &s), Some(1));
        assert_eq!(find_stop("xcdb", &s), Some(1));
        assert_eq!(find_stop("xyz", &s), None);
        assert_eq!(find_stop("xyz", &[]), None);
    }

    #[test]
    fn text_that_may_start_a_stop_sequence_is_held_back() {
        let s = stops(&["END", "é!"]);
        assert_eq!(stop_hold_back("abc E", &s), 1);
        assert_eq!(stop_hold_back("abc EN", &s), 2);
        assert_eq!(stop_hold_back("abc ENx", &s), 0);
        assert_eq!(stop_hold_back("café", &s), "é".len(), "whole characters only");
        assert_eq!(stop_hold_back("abc", &[]), 0);
    }

    #[test]
    fn a_row_generator_depends_on_its_seed_alone() {
        let draws = |seed| {
            let mut r = RowRng::new(seed);
            (0..8).map(|_| r.next_unit()).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        assert!(draws(7).iter().all(|&u| u > 0.0 && u <= 1.0));
    }

    #[test]
    fn inverse_cdf_draws_follow_the_probabilities_and_skip_zeros() {
        let probs = Tensor::from_slice(&[0.0f32, 0.25, 0.0, 0.75]).view([1, 4]);
        assert_eq!(draw_token(&probs, 1e-9).unwrap(), 1);
        assert_eq!(draw_token(&probs, 0.25).unwrap(), 1);
        assert_eq!(draw_token(&probs, 0.2500001).unwrap(), 3);
        assert_eq!(draw_token(&probs, 1.0).unwrap(), 3);
        // frequencies over many draws: closed form 1/4, 3/4
        let mut rng = RowRng::new(1);
        let n = 4000;
        let ones = (0..n).filter(|_| draw_token(&probs, rng.next_unit()).unwrap() == 1).count();
        assert!((ones as f64 / n as f64 - 0.25).abs() < 0.03, "{ones} of {n}");
    }
}
