//! The server's refusals, as OpenAI shapes them: an HTTP status and
//! `{"error": {"message", "type", "code", "param"}}` (`param`: the request field at fault, when one is) (plus `models`, the loaded names, on a 404 for an
//! unknown model), with a `Retry-After` header when waiting helps.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// One refusal: status, OpenAI error type, message for people, machine-readable code.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
    /// `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    pub message: String,
    pub code: Option<&'static str>,
    /// The request field at fault (OpenAI's `param`), when one is.
    pub param: Option<&'static str>,
    /// The names a request may use, when it named an unknown one.
    pub names: Option<Vec<String>>,
    /// Seconds after which a retry may succeed (the `Retry-After` header).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            code: None,
            param: None,
            names: None,
            retry_after: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, field: &'static str) -> Self {
        self.param = Some(field);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_names(mut self, names: Vec<String>) -> Self {
        self.names = Some(names);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({"message": self.message, "type": self.kind, "code": self.code});
        if let Some(param) = self.param {
            error["param"] = json!(param);
        }
        if let Some(names) = &self.names {
            error["models"] = json!(names);
        }
        json!({ "error": error })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.kind, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        response
    }
}
