//! Errors of the gateway's HTTP surface, in ComfyUI's error shape.
//!
//! The stock editor shows `error.message` of a failed `/prompt`; every error
//! here renders as `{error: {type, message, details, extra_info}, node_errors}`
//! so participants read what went wrong and what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// Everything a gateway request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is malformed.
    #[error("{message}")]
    BadRequest { kind: &'static str, message: String, details: String },
    /// The prompt failed validation; `node_errors` says where.
    #[error("{message}")]
    InvalidPrompt { kind: &'static str, message: String, details: String, node_errors: Value },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    /// A limit refuses the request; `kind` names which.
    #[error("{message}")]
    Limit { kind: &'static str, message: String, status: StatusCode },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::BadRequest { kind, details: message.clone(), message }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } | ApiError::InvalidPrompt { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Limit { status, .. } => *status,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error's `type` in the JSON answer; also the metrics' rejection `reason`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest { kind, .. }
            | ApiError::InvalidPrompt { kind, .. }
            | ApiError::Limit { kind, .. } => kind,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl From<dispatcher::queue::QueueError> for ApiError {
    fn from(e: dispatcher::queue::QueueError) -> Self {
        use dispatcher::queue::QueueError;
        match e {
            QueueError::NotFound(_) => ApiError::NotFound(e.to_string()),
            QueueError::Transition { .. } => ApiError::Conflict(e.to_string()),
            QueueError::Redis(_) => ApiError::Unavailable(e.to_string()),
            QueueError::Corrupt { .. } => ApiError::Internal(e.to_string()),
            QueueError::UserQueueFull { .. } => {
                ApiError::Limit { kind: "user_queue_limit", message: e.to_string(), status: StatusCode::BAD_REQUEST }
            }
            QueueError::QueueFull { .. } => {
                ApiError::Limit { kind: "queue_full", message: e.to_string(), status: StatusCode::TOO_MANY_REQUESTS }
            }
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::Unavailable(format!("Redis error ({e}); try again in a moment"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        let (details, node_errors) = match &self {
            ApiError::BadRequest { details, .. } => (details.clone(), json!({})),
            ApiError::InvalidPrompt { details, node_errors, .. } => (details.clone(), node_errors.clone()),
            other => (other.to_string(), json!({})),
        };
        let body = json!({
            "error": {
                "type": self.kind(),
                "message": self.to_string(),
                "details": details,
                "extra_info": {},
            },
            "node_errors": node_errors,
        });
        (status, Json(body)).into_response()
    }
}
