//! `POST /api/preview`: `data preview` for the page. Each sample as the trainer encodes it
//! (the objective's layout: preference pairs, KTO rows, …), its text cut into labelled and
//! unlabelled spans, and its images and video frames as small PNGs with their sizes and token
//! counts.
use std::io::Cursor;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::forms::{blocking, load_checked, TempConfig};
use super::Board;
use crate::data::{Encoded, ImageData, SampleImage, IGNORE_INDEX};
use crate::plugins::Registry;
use crate::serve::error::ApiError;
use crate::text::Tokenizer;

/// Samples one preview shows at most.
const MAX_SAMPLES: usize = 50;
/// Thumbnails fit in this many pixels a side.
const THUMB: u32 = 320;
/// Video frames shown per video at most.
const MAX_FRAMES: usize = 8;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    #[serde(default)]
    yaml: Option<String>,
    #[serde(default)]
    run: Option<String>,
    #[serde(default = "three")]
    n: usize,
}

fn three() -> usize {
    3
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(e.to_string())
}

pub async fn preview(
    State(b): State<Arc<Board>>,
    body: Result<Json<PreviewRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if !(1..=MAX_SAMPLES).contains(&req.n) {
        return Err(ApiError::bad_request(format!("n {}: give 1 to {MAX_SAMPLES}", req.n)));
    }
    blocking(move || {
        let (_tmp, path) = match (&req.yaml, &req.run) {
            (Some(yaml), None) => {
                let t = TempConfig::write(&b.roots.runs, yaml)?;
                let p = t.0.clone();
                (Some(t), p)
            }
            (None, Some(run)) => {
                let dir = b.runs.dir_of(run)?;
                let p = dir.join(super::runs::CONFIG);
                if !p.is_file() {
                    return Err(ApiError::bad_request(format!(
                        "run `{run}` has no {} (it was not started by a board): paste its YAML instead",
                        super::runs::CONFIG
                    )));
                }
                (None, p)
            }
            _ => return Err(ApiError::bad_request("give one of `yaml` and `run`")),
        };
        let explain = |mut e: ApiError| {
            if let Some(t) = &_tmp {
                e.message = t.explain(&e.message);
            }
            e
        };
        let cfg = load_checked(&b, &path).map_err(explain)?;
        let registry = Registry::discover(&b.search);
        let tok = Tokenizer::from_dir(&cfg.model).map_err(|e| bad(format!("{e:#}")))?;
        let prep = crate::train::image_prep(&cfg, &tok).map_err(|e| bad(format!("{e:#}")))?;
        let rows = crate::train::config_rows(&cfg, &registry).map_err(|e| bad(format!("{e:#}")))?;
        let total = rows.len();
        let opts = crate::train::encode_options(&cfg);
        let objective = registry
            .objective(&cfg.objective.plugin, &cfg.objective.config_json())
            .map_err(|e| bad(format!("{e:#}")))?;
        use ferrotune_plugin_api::Objective;
        let layout = crate::data::layout::Layout::from_needs(&cfg.objective.plugin, &objective.needs())
            .map_err(|e| bad(format!("{e:#}")))?;
        let rows: Vec<_> = rows.into_iter().take(req.n).collect();
        let prepared = crate::data::layout::prepare(layout, rows, &tok, prep.as_ref(), &opts)
            .map_err(|e| bad(format!("{e:#}")))?;
        let samples: Vec<Value> =
            prepared.sequences().iter().map(|(i, e)| sample_json(&tok, *i, e)).collect();
        let refused: Vec<Value> = prepared
            .bad
            .iter()
            .chain(&prepared.skipped)
            .map(|(i, why)| json!({"index": i, "error": why}))
            .collect();
        Ok(Json(json!({
            "total": total,
            "layout": layout.name(),
            "samples": samples,
            "refused": refused,
        })))
    })
    .await
}

/// One encoded sample: spans, counts, images and videos.
fn sample_json(tok: &Tokenizer, index: usize, e: &Encoded) -> Value {
    let mut segments = Vec::new();
    let n = e.input_ids.len();
    let mut start = 0;
    while start < n {
        let on = e.labels[start] != IGNORE_INDEX;
        let end = (start..n).find(|&j| (e.labels[j] != IGNORE_INDEX) != on).unwrap_or(n);
        let text = tok
            .decode(&e.input_ids[start..end], false)
            .unwrap_or_else(|err| format!("<cannot decode: {err}>"));
        segments.push(json!({"text": crate::data::compress_image_pads(&text), "labelled": on}));
        start = end;
    }
    let images: Vec<Value> =
        e.images.iter().filter(|im| im.video.is_none()).map(image_json).collect();
    let videos: Vec<Value> =
        e.images.iter().filter(|im| im.video.is_some()).map(video_json).collect();
    json!({
        "index": index,
        "tokens": n,
        "labelled_tokens": e.num_label_tokens(),
        "truncated_from": e.truncated_from,
        "segments": segments,
        "images": images,
        "videos": videos,
    })
}

/// `img` scaled to fit [`THUMB`], as a PNG data URL.
fn thumbnail(img: &image::DynamicImage) -> Option<String> {
    let small = if img.width() > THUMB || img.height() > THUMB {
        img.thumbnail(THUMB, THUMB)
    } else {
        img.clone()
    };
    let mut png = Vec::new();
    small.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).ok()?;
    Some(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png)))
}

fn image_json(im: &SampleImage) -> Value {
    let cap = crate::vision::pixel_cap_for(im.max_pixels);
    let decoded = match &im.data {
        ImageData::File(p) => crate::vision::load_image(p, cap),
        ImageData::Bytes(b) => crate::vision::decode_image(b, cap),
    };
    let (url, error) = match decoded {
        Ok(img) => (thumbnail(&img), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    json!({
        "url": url,
        "error": error,
        "width": im.original_size.0,
        "height": im.original_size.1,
        "resized": [im.resized_size.0, im.resized_size.1],
        "tokens": im.tokens,
        "source": match &im.data { ImageData::File(p) => json!(p), ImageData::Bytes(_) => Value::Null },
    })
}

fn video_json(im: &SampleImage) -> Value {
    let plan = im.video.as_ref().expect("a video");
    let (frames, error) = match &im.data {
        ImageData::File(p) => match crate::vision::read_frames(p, plan, plan.max_pixels.max(1)) {
            Ok(frames) => (
                frames
                    .into_iter()
                    .take(MAX_FRAMES)
                    .map(|f| {
                        let (w, h) = f.dimensions();
                        json!({"url": thumbnail(&image::DynamicImage::ImageRgb8(f)), "width": w, "height": h})
                    })
                    .collect::<Vec<_>>(),
                None,
            ),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        },
        ImageData::Bytes(_) => (Vec::new(), Some("a video stored as bytes is not shown".to_string())),
    };
    json!({
        "frames": frames,
        "error": error,
        "width": plan.original_size.0,
        "height": plan.original_size.1,
        "frames_kept": plan.indices.len(),
        "frames_total": plan.total_frames,
        "fps": plan.fps,
        "tokens": im.tokens,
        "describe": plan.describe(),
    })
}
