//! Errors of the gateway's HTTP surface, in ComfyUI's error shape.
//!
//! The stock editor shows `error.message` of a failed `/prompt`; every error
//! here renders as `{error: {type, message, details, extra_info}, node_errors}`
//! so participants read what went wrong and what to do. [`read_body`],
//! [`RawBody`] and [`JsonBody`] read request bodies with rejections in that
//! shape too (a body over the size limit, not JSON, nested too deeply).

use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
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

    /// A request body that is not JSON, or not the JSON expected; JSON
    /// nested deeper than serde_json's limit (128 levels) is said to be that.
    pub fn invalid_json(e: &serde_json::Error) -> Self {
        if e.to_string().starts_with("recursion limit exceeded") {
            ApiError::bad_request(
                "invalid_json",
                format!("the request body's JSON is nested too deeply (more than 128 levels of arrays or objects; {e})"),
            )
        } else if e.is_data() {
            ApiError::bad_request("invalid_json", format!("the request body is JSON of the wrong shape: {e}"))
        } else {
            ApiError::bad_request("invalid_json", format!("the request body is not valid JSON: {e}"))
        }
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

// ---------------------------------------------------------------------------
// Request bodies, refused in ComfyUI's shape (axum's own rejections are text)
// ---------------------------------------------------------------------------

/// The size limit of a request body unless a route says otherwise (axum's).
pub const DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;
/// How much more of a refused body is read and dropped, at most.
const DRAIN_BYTES: usize = 256 * 1024 * 1024;
/// How long a refused body is read and dropped, at most.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// Reads `body` whole if it has at most `limit` bytes; a longer one is
/// refused with `too_large()`. Before that answer, what the client still
/// sends is read and dropped (within [`DRAIN_BYTES`] and [`DRAIN_TIME`]): a
/// client that is still sending when the connection closes sees a broken
/// pipe instead of the 413.
pub async fn read_body(body: Body, limit: usize, too_large: impl FnOnce() -> ApiError) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request("invalid_body", format!("the request body could not be read: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            drain(stream).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.freeze())
}

/// Reads and drops the rest of a refused request body (see [`read_body`]).
pub async fn drain(mut stream: BodyDataStream) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut dropped = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            dropped += chunk.len();
            if dropped > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// The whole request body, of at most `LIMIT` bytes.
pub struct RawBody<const LIMIT: usize = DEFAULT_BODY_LIMIT>(pub Bytes);

impl<const LIMIT: usize, S: Send + Sync> FromRequest<S> for RawBody<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let too_large = || ApiError::TooLarge(format!("the request body is over this request's limit of {LIMIT} bytes"));
        Ok(RawBody(read_body(req.into_body(), LIMIT, too_large).await?))
    }
}

/// A JSON request body (of at most [`DEFAULT_BODY_LIMIT`] bytes), whatever
/// its `Content-Type`, as ComfyUI reads them.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let RawBody(bytes) = RawBody::<DEFAULT_BODY_LIMIT>::from_request(req, state).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| ApiError::invalid_json(&e))
    }
}

/// `Option<JsonBody<T>>`: `None` for an empty body.
impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        let RawBody(bytes) = RawBody::<DEFAULT_BODY_LIMIT>::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&bytes).map(|v| Some(JsonBody(v))).map_err(|e| ApiError::invalid_json(&e))
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
