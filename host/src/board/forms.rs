//! What the new-run form is built from (plugins and their JSON Schemas, the host's own keys,
//! models, data sets), the YAML it drafts, the inline `data check`, and files for the page.
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::Board;
use crate::plugins::Registry;
use crate::serve::error::ApiError;
use crate::train::config::TrainConfig;

/// Largest file `/api/file` sends.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// How deep the pickers look for models and data under their folders.
const MAX_DEPTH: usize = 3;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "server_error", e.to_string())
}

/// Runs blocking work (plugin discovery, tokenizers, files) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

pub async fn info(State(b): State<Arc<Board>>) -> Json<Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "runs_dir": b.roots.runs,
        "models_dir": b.roots.models,
        "data_dir": b.roots.data,
    }))
}

/// `ferrotune plugins --json`: every plugin with its config schema.
pub async fn plugins(State(b): State<Arc<Board>>) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let registry = Registry::discover(&b.search);
        Ok(Json(crate::plugins::plugins_json(&registry)))
    })
    .await
}

/// A number/integer/boolean/string property of the host schema with its default.
fn prop(kind: &str, default: Value, description: &str) -> Value {
    let mut p = json!({"type": kind, "description": description});
    if !default.is_null() {
        p["default"] = default;
    }
    p
}

fn object(props: Vec<(&str, Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in props {
        m.insert(k.to_string(), v);
    }
    json!({"type": "object", "properties": m})
}

/// The host's keys worth a form field, with the defaults a config that leaves them out gets
/// (read from a parsed minimal config, so they cannot drift from the trainer's).
pub fn host_schema_value() -> Value {
    let cfg = TrainConfig::from_yaml(
        "model: m\noutput_dir: o\nadapter: {plugin: lora}\ndata: {plugin: alpaca, path: d}\n",
    )
    .expect("the minimal config parses");
    let (o, s, d, t) = (&cfg.optimizer, &cfg.scheduler, &cfg.data, &cfg.training);
    let mut lr = prop("number", json!(o.lr), "peak learning rate");
    lr["exclusiveMinimum"] = json!(0);
    let mut wd = prop("number", json!(o.weight_decay), "decoupled weight decay (AdamW)");
    wd["minimum"] = json!(0);
    let mut clip = prop("number", json!(o.max_grad_norm), "clip the global gradient norm to this");
    clip["exclusiveMinimum"] = json!(0);
    let mut kind = prop(
        "string",
        json!(format!("{:?}", s.kind).to_lowercase()),
        "learning-rate schedule after warm-up",
    );
    kind["enum"] = json!(["constant", "linear", "cosine"]);
    let mut warmup =
        prop("number", json!(s.warmup_ratio), "warm-up over this fraction of all steps");
    warmup["minimum"] = json!(0);
    warmup["maximum"] = json!(1);
    let int = |default: Value, min: u64, what: &str| {
        let mut p = prop("integer", default, what);
        p["minimum"] = json!(min);
        p
    };
    let mut eval_ratio =
        prop("number", json!(d.eval_ratio), "fraction of samples held out for the eval loss");
    eval_ratio["minimum"] = json!(0);
    eval_ratio["maximum"] = json!(0.5);
    let mut device = prop("string", json!(cfg.device), "cpu, cuda or cuda:N");
    device["examples"] = json!(["cpu", "cuda"]);
    let mut dtype = prop("string", json!(cfg.dtype), "compute dtype of the frozen base");
    dtype["enum"] = json!(["f32", "bf16"]);
    let mut finetuning = prop("string", json!("adapter"), "what trains");
    finetuning["enum"] = json!(["adapter", "full", "freeze"]);
    json!({"sections": {
        "top": object(vec![
            ("device", device),
            ("dtype", dtype),
            ("seed", int(json!(cfg.seed), 0, "seed of init, shuffling and dropout")),
            ("finetuning", finetuning),
        ]),
        "optimizer": object(vec![("lr", lr), ("weight_decay", wd), ("max_grad_norm", clip)]),
        "scheduler": object(vec![("type", kind), ("warmup_ratio", warmup)]),
        "data": object(vec![
            ("cutoff_len", int(json!(d.cutoff_len), 1, "longer samples are truncated to this many tokens")),
            ("eval_ratio", eval_ratio),
            ("packing", prop("boolean", json!(d.packing), "pack samples into cutoff_len rows")),
            ("train_on_prompt", prop("boolean", json!(d.train_on_prompt), "labels on prompt tokens too")),
        ]),
        "training": object(vec![
            ("epochs", int(json!(t.epochs), 1, "passes over the data")),
            ("max_steps", int(Value::Null, 1, "stop after this many optimizer steps (instead of epochs)")),
            ("micro_batch_size", int(json!(t.micro_batch_size), 1, "samples per forward/backward")),
            ("gradient_accumulation_steps", int(json!(t.gradient_accumulation_steps), 1, "micro-batches per optimizer step")),
            ("logging_steps", int(json!(t.logging_steps), 1, "a metrics line every N steps")),
            ("eval_steps", int(Value::Null, 1, "eval loss every N steps (needs data.eval_ratio)")),
            ("save_steps", int(Value::Null, 1, "a checkpoint every N steps (what resume starts from)")),
            ("save_total_limit", int(Value::Null, 1, "keep at most this many checkpoints")),
            ("gradient_checkpointing", prop("boolean", json!(t.gradient_checkpointing), "recompute activations in backward")),
        ]),
    }})
}

pub async fn host_schema() -> Json<Value> {
    Json(host_schema_value())
}

/// Folders (depth ≤ [`MAX_DEPTH`]) under `root` for which `keep` says yes, sorted.
fn walk(root: &FsPath, keep: &mut dyn FnMut(&FsPath) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if keep(&p) {
                found.push(p.clone());
            }
            // Links are not followed: the pickers stay inside the folder.
            if e.file_type().is_ok_and(|t| t.is_dir()) && depth + 1 < MAX_DEPTH {
                stack.push((p, depth + 1));
            }
        }
    }
    found.sort();
    found
}

fn rel_name(root: &FsPath, p: &FsPath) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

pub async fn models(State(b): State<Arc<Board>>) -> Json<Value> {
    let models: Vec<Value> = b
        .roots
        .models
        .iter()
        .flat_map(|root| {
            walk(root, &mut |p| p.join("config.json").is_file())
                .into_iter()
                .map(move |p| (root.clone(), p))
        })
        .filter(|(root, p)| p.canonicalize().is_ok_and(|c| c.starts_with(root)))
        .filter_map(|(root, p)| {
            let cfg: Value =
                serde_json::from_slice(&std::fs::read(p.join("config.json")).ok()?).ok()?;
            Some(json!({
                "name": rel_name(&root, &p),
                "path": p,
                "model_type": cfg.get("model_type"),
                "vision": cfg.get("vision_config").is_some(),
            }))
        })
        .collect();
    Json(json!({ "models": models }))
}

/// The dataset plugin a data file or folder most likely needs.
fn guess_plugin(p: &FsPath) -> Option<&'static str> {
    if p.is_dir() {
        let names: Vec<String> = std::fs::read_dir(p)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if names.iter().any(|n| n.ends_with(".parquet")) {
            return Some("storyreasoning");
        }
        if names.iter().any(|n| n == "train.json") {
            return guess_plugin(&p.join("train.json"));
        }
        return None;
    }
    let ext = p.extension()?.to_str()?;
    if !matches!(ext, "json" | "jsonl") || p.file_name()? == "dataset_info.json" {
        return None;
    }
    // The first record's keys decide.
    let mut head = vec![0u8; 64 << 10];
    let n = std::io::Read::read(&mut std::fs::File::open(p).ok()?, &mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    if text.contains("\"instruction\"") {
        Some("alpaca")
    } else if text.contains("\"image\"") && text.contains("\"conversations\"") {
        Some("llava")
    } else if text.contains("\"conversations\"") || text.contains("\"messages\"") {
        Some("sharegpt")
    } else {
        None
    }
}

pub async fn datasets(State(b): State<Arc<Board>>) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let Some(root) = &b.roots.data else {
            return Ok(Json(json!({"files": [], "registries": []})));
        };
        let mut files = Vec::new();
        let mut registries = Vec::new();
        for p in walk(root, &mut |p| p.is_file() || guess_plugin(p).is_some()) {
            if p.file_name().is_some_and(|n| n == "dataset_info.json") {
                let entries: Value = std::fs::read(&p)
                    .ok()
                    .and_then(|t| serde_json::from_slice(&t).ok())
                    .unwrap_or(Value::Null);
                let datasets: Vec<Value> = entries
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, e)| {
                        json!({
                            "name": name,
                            "formatting": e.get("formatting").and_then(Value::as_str).unwrap_or("alpaca"),
                            "ranking": e.get("ranking").and_then(Value::as_bool).unwrap_or(false),
                            "file_name": e.get("file_name"),
                        })
                    })
                    .collect();
                registries.push(json!({"dataset_dir": p.parent(), "datasets": datasets}));
            } else if let Some(plugin) = guess_plugin(&p) {
                files.push(json!({"name": rel_name(root, &p), "path": p, "plugin_guess": plugin}));
            }
        }
        Ok(Json(json!({"files": files, "registries": registries})))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftRequest {
    name: String,
    model: String,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    finetuning: Option<String>,
    #[serde(default)]
    sections: Map<String, Value>,
}

/// `Value` without nulls and empty strings (what the form left empty).
fn prune(v: Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::String(s) if s.trim().is_empty() => None,
        Value::Object(m) => {
            let m: Map<String, Value> =
                m.into_iter().filter_map(|(k, v)| Some((k, prune(v)?))).collect();
            Some(Value::Object(m))
        }
        other => Some(other),
    }
}

/// The YAML a form's values make: sections in the order the README's reference uses, with
/// output_dir set to the run's folder.
pub fn draft_yaml(b: &Board, req: DraftRequest) -> Result<String, ApiError> {
    super::valid_name(&req.name)?;
    let mut top = serde_yaml::Mapping::new();
    top.insert("model".into(), req.model.clone().into());
    top.insert("output_dir".into(), b.roots.runs.join(&req.name).display().to_string().into());
    for (k, v) in [("device", req.device), ("dtype", req.dtype)] {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            top.insert(k.into(), v.into());
        }
    }
    let full = req.finetuning.as_deref().filter(|f| *f != "adapter" && !f.is_empty());
    if let Some(f) = full {
        top.insert("finetuning".into(), f.into());
    }
    let mut sections = req.sections;
    // The sections, in the order of the config reference (the top-level keys are set above).
    for key in crate::train::config::KEY_ORDER.into_iter().skip_while(|k| *k != "freeze") {
        let Some(v) = sections.remove(key).and_then(prune) else { continue };
        if key == "adapter" && full.is_some() {
            continue;
        }
        if v.as_object().is_some_and(|m| m.is_empty()) {
            continue;
        }
        top.insert(key.into(), plugin_first(v)?);
    }
    if let Some(k) = sections.keys().next() {
        return Err(ApiError::bad_request(format!("sections.{k}: not a section of a run config")));
    }
    let yaml = serde_yaml::to_string(&top).map_err(internal)?;
    Ok(format!("# ferrotune board: run `{}`\n{yaml}", req.name))
}

pub async fn draft(
    State(b): State<Arc<Board>>,
    body: Result<Json<DraftRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(json!({"yaml": draft_yaml(&b, req)?})))
}

/// A section as YAML with its `plugin` key first (then the others, sorted).
fn plugin_first(v: Value) -> Result<serde_yaml::Value, ApiError> {
    let Value::Object(mut m) = v else { return serde_yaml::to_value(v).map_err(internal) };
    let mut out = serde_yaml::Mapping::new();
    if let Some(p) = m.remove("plugin") {
        out.insert("plugin".into(), serde_yaml::to_value(p).map_err(internal)?);
    }
    for (k, v) in m {
        out.insert(k.into(), serde_yaml::to_value(v).map_err(internal)?);
    }
    Ok(serde_yaml::Value::Mapping(out))
}

/// `yaml` with `output_dir` set to `dir` (a run writes only into its own folder).
pub fn pin_output_dir(yaml: &str, dir: &FsPath) -> Result<String, ApiError> {
    let mut v: serde_yaml::Value = serde_yaml::from_str(yaml)
        .map_err(|e| ApiError::bad_request(format!("the YAML does not parse: {e}")))?;
    let Some(m) = v.as_mapping_mut() else {
        return Err(ApiError::bad_request("the YAML is not a mapping of config keys"));
    };
    m.insert("output_dir".into(), dir.display().to_string().into());
    serde_yaml::to_string(&v).map_err(internal)
}

/// Parses run config `path` and checks that every path it reads lies under the board's
/// folders (403 naming the key otherwise).
pub fn load_checked(b: &Board, path: &FsPath) -> Result<TrainConfig, ApiError> {
    let cfg = TrainConfig::from_file(path).map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let r = &b.roots;
    let models_runs: Vec<&FsPath> =
        r.models.iter().map(|p| p.as_path()).chain([r.runs.as_path()]).collect();
    let data: Vec<&FsPath> = r.data.iter().map(|p| p.as_path()).chain([r.runs.as_path()]).collect();
    let check = |key: &str, p: &FsPath, roots: &[&FsPath]| -> Result<(), ApiError> {
        r.inside_of(key, &p.display().to_string(), roots).map(|_| ())
    };
    check("model", &cfg.model, &models_runs)?;
    if !cfg.data.path.as_os_str().is_empty() {
        check("data.path", &cfg.data.path, &data)?;
    }
    for (key, p) in
        [("data.dataset_dir", &cfg.data.dataset_dir), ("data.media_dir", &cfg.data.media_dir)]
    {
        if let Some(p) = p {
            check(key, p, &data)?;
        }
    }
    if let Some(p) = &cfg.adapter_init {
        check("adapter_init", p, &models_runs)?;
    }
    for (i, rw) in cfg.rewards.iter().enumerate() {
        for p in rw.model.iter().chain(&rw.adapter) {
            check(&format!("rewards[{i}]"), p, &models_runs)?;
        }
    }
    if let Some(p) = &cfg.training.logging_dir {
        let inside =
            p.starts_with(&r.runs) && !p.components().any(|c| c == std::path::Component::ParentDir);
        if !inside {
            return Err(super::outside("training.logging_dir", &p.display().to_string()));
        }
    }
    Ok(cfg)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    yaml: String,
}

/// `POST /api/check {yaml}`: `data check` of the config, as the run would read it.
pub async fn check(
    State(b): State<Arc<Board>>,
    body: Result<Json<CheckRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    blocking(move || {
        let tmp = TempConfig::write(&b.roots.runs, &req.yaml)?;
        if let Err(mut e) = load_checked(&b, &tmp.0) {
            e.message = tmp.explain(&e.message);
            if e.status == 400 {
                return Ok(Json(json!({"ok": false, "report": null, "error": e.message})));
            }
            return Err(e);
        }
        let registry = Registry::discover(&b.search);
        Ok(Json(match crate::train::review_data(&registry, &tmp.0) {
            Ok((cfg, report)) => json!({
                "ok": !crate::train::would_stop(&cfg, &report),
                "report": report,
                "error": null,
            }),
            Err(e) => json!({"ok": false, "report": null, "error": tmp.explain(&format!("{e:#}"))}),
        }))
    })
    .await
}

/// A config written for a check and removed again (hidden, in the runs folder, so relative
/// paths resolve as they would for a run there).
pub struct TempConfig(pub PathBuf);

impl TempConfig {
    /// `message` with this file's path said as what it is.
    pub fn explain(&self, message: &str) -> String {
        message.replace(&self.0.display().to_string(), "the YAML")
    }

    pub fn write(runs: &FsPath, yaml: &str) -> Result<Self, ApiError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = runs.join(format!(
            ".board-check-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, yaml)
            .map_err(|e| internal(format!("cannot write {}: {e}", p.display())))?;
        Ok(Self(p))
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Deserialize)]
pub struct FileQuery {
    path: String,
}

/// `GET /api/file?path=ABS`: a file under the board's folders (images for the page).
pub async fn file(
    State(b): State<Arc<Board>>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let p = b.roots.inside("path", &q.path)?;
    let meta = std::fs::metadata(&p).map_err(internal)?;
    if !meta.is_file() {
        return Err(ApiError::bad_request(format!("path {} is not a file", q.path)));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ApiError::bad_request(format!(
            "path {}: {} bytes, more than the {} this route sends",
            q.path,
            meta.len(),
            MAX_FILE_BYTES
        )));
    }
    let bytes = std::fs::read(&p).map_err(internal)?;
    let mime =
        match p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("png") => "image/png",
            Some("jpg" | "jpeg") => "image/jpeg",
            Some("webp") => "image/webp",
            Some("gif") => "image/gif",
            Some("json" | "jsonl") => "application/json",
            Some("yaml" | "yml" | "txt" | "log" | "md") => "text/plain; charset=utf-8",
            _ => "application/octet-stream",
        };
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_schema_defaults_are_the_trainers() {
        let s = host_schema_value();
        let p = |section: &str, key: &str| s["sections"][section]["properties"][key].clone();
        assert_eq!(p("optimizer", "lr")["default"], json!(2e-4));
        assert_eq!(p("training", "epochs")["default"], json!(1));
        assert_eq!(p("training", "micro_batch_size")["default"], json!(2));
        assert_eq!(p("data", "cutoff_len")["default"], json!(1024));
        assert_eq!(p("scheduler", "type")["default"], json!("cosine"));
        assert!(p("training", "max_steps").get("default").is_none());
        assert_eq!(p("top", "dtype")["enum"], json!(["f32", "bf16"]));
    }

    #[test]
    fn pinned_output_dir_replaces_the_users() {
        let y = pin_output_dir(
            "model: m\noutput_dir: /elsewhere\ndata: {plugin: alpaca}\n",
            FsPath::new("/runs/a"),
        )
        .unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(v["output_dir"].as_str(), Some("/runs/a"));
        assert_eq!(v["model"].as_str(), Some("m"));
        assert_eq!(pin_output_dir("- a\n- b\n", FsPath::new("/r")).unwrap_err().status, 400);
        assert_eq!(pin_output_dir("a: [", FsPath::new("/r")).unwrap_err().status, 400);
    }

    #[test]
    fn prune_drops_what_the_form_left_empty() {
        let v = prune(json!({"a": null, "b": " ", "c": {"d": ""}, "e": 0, "f": false})).unwrap();
        assert_eq!(v, json!({"c": {}, "e": 0, "f": false}));
    }
}
