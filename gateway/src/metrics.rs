//! `GET /metrics`: the gateway's Prometheus metrics, for the instructor's
//! token only.
//!
//! Names and counters live in `dispatcher::metrics`; this handler sets the
//! gauges that are read from Redis at scrape time (jobs by state, queue
//! length per mode and tier) and renders everything. It takes the admin
//! token as `Authorization: Bearer` (or an admin session); anything else is
//! 401, so the endpoint can face the internet with the rest of the gateway.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use dispatcher::metrics;

use crate::error::ApiError;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Result<impl IntoResponse, ApiError> {
    state.auth.admin(&headers).await?;
    metrics::set_job_states(&state.store.count_by_state().await?);
    metrics::set_queue_lengths(state.store.mode().await?, &state.store.queued_by_tier().await?);
    metrics::set_health(&crate::health_report(&state).await);
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics::render()))
}
