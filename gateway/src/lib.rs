//! The comfy-multi gateway: what participants' browsers and gpu-task talk to.
//!
//! # Layout
//!
//! - [`state`]: the shared application state every handler gets.
//! - [`secrets`]: the admin token and the internal secret, from the config or
//!   generated once into the data folder.
//! - [`auth`]: participants' accounts (access codes stored hashed in Redis,
//!   [`auth::Accounts`]), the [`auth::Participant`] extractor that guards every
//!   `/user/{n}/` route and the [`auth::Admin`] extractor for `/admin/...`.
//! - [`session`]: browser sessions (`cm_session`, `cm_admin` cookies).
//! - [`login`]: the login and logout pages.
//! - [`error`]: [`error::ApiError`], rendered in ComfyUI's error shape so the
//!   stock editor shows it.
//! - [`validate`]: checks a submitted prompt before anything is stored.
//! - [`files`]: where outputs live on disk, and safe file names.
//! - [`comfy`]: the per-user ComfyUI server API (`/user/{n}/api/...`).
//! - [`internal`]: the internal API gpu-task calls (`/_internal/...`),
//!   guarded by the shared secret.
//! - [`editor`]: the stock ComfyUI editor's files at `/user/{n}/`.
//! - [`editor_api`]: the rest of the ComfyUI API the editor calls (settings,
//!   userdata, object_info, uploads, ...), per participant.
//! - [`userdata`]: participants' settings and saved files, and the
//!   instructor's pre-loaded workflows.
//! - [`ws`]: the editor's websocket (`/user/{n}/ws`): ComfyUI's protocol,
//!   each participant's own progress, fanned out from one Redis subscription.
//! - [`tls`]: HTTPS with the workshop's certificate: checked at start,
//!   reloaded on SIGHUP or a file change, and the HTTP-to-HTTPS redirect.
//! - [`metrics`]: `GET /metrics` (Prometheus), for the admin token.
//! - [`admin`]: the instructor's admin page (`/admin/`), its live websocket
//!   and its actions (`/admin/api/...`).

pub mod admin;
pub mod auth;
pub mod comfy;
pub mod editor;
pub mod editor_api;
pub mod error;
pub mod files;
pub mod internal;
pub mod login;
pub mod metrics;
pub mod secrets;
pub mod session;
pub mod state;
pub mod tls;
pub mod userdata;
pub mod validate;
pub mod ws;

use axum::routing::get;
use axum::Router;
use tower_http::trace::TraceLayer;

pub use state::AppState;

/// The whole HTTP surface.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .merge(comfy::routes(&state))
        .merge(editor_api::routes())
        .merge(editor::routes())
        .merge(ws::routes())
        .merge(internal::routes(&state))
        .merge(login::routes())
        .merge(admin::routes())
        .merge(metrics::routes())
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The health of every component as this gateway sees it (`/healthz`, `/metrics`).
pub(crate) async fn health_report(state: &AppState) -> dispatcher::health::Report {
    let nomad = matches!(state.cluster.executor, dispatcher::config::ExecutorKind::Nomad);
    dispatcher::health::gather(&state.store, state.cluster.consul.as_ref(), nomad).await
}

/// What is up and what is down (`dispatcher::health`): 200 while the
/// gateway can take submits (Redis answers), 503 when it cannot.
///
/// `{"ok", "redis", "components": {name: {status, since?, error?}}, "problems": [sentence]}`
async fn healthz(axum::extract::State(state): axum::extract::State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    use dispatcher::health::{Component, Status};
    let report = health_report(&state).await;
    let redis = report.status(Component::Redis) == Status::Up;
    let body = axum::Json(serde_json::json!({
        "ok": redis,
        "redis": redis,
        "components": report.components,
        "problems": report.problems(),
    }));
    if redis {
        body.into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}
