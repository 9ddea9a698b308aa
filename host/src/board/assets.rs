//! The page: three files compiled into the binary (no network at run time).
use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::serve::error::ApiError;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

fn page(mime: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

pub async fn file(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => page("text/javascript; charset=utf-8", APP_JS),
        "style.css" => page("text/css; charset=utf-8", STYLE),
        _ => ApiError::new(404, "not_found_error", format!("no asset {name}")).into_response(),
    }
}
