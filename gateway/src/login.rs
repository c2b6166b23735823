//! The login pages: plain HTML forms (no JavaScript, no build step) that
//! trade an access code, the admin token or the admin password for a session
//! cookie ([`crate::session`]).
//!
//! - `GET /login` (`?user=n` fills in the number), `POST /login` (form fields
//!   `user`, `code`) → `cm_session`, 303 to `/user/{n}/`;
//!   `GET|POST /logout` ends it and goes back to `/login`.
//! - `GET /admin/login`, `POST /admin/login` (field `secret`: the admin token
//!   or `gateway.admin_password`) → `cm_admin`, 303 to `/admin/`;
//!   `GET|POST /admin/logout`.
//! - `GET /admin/api/whoami`: `{"admin": true, "via": "token" | "session"}`.
//!
//! Failed logins are counted in Redis per client address and per account
//! (`cm:login:fail:ip:<addr>`, `cm:login:fail:user:<n>`,
//! `cm:login:fail:admin`; a fixed one-minute window). An account is refused
//! for the rest of the minute after [`MAX_FAILS_PER_ACCOUNT`] failures; an
//! address after [`MAX_FAILS_PER_IP`] (higher, as a workshop room often shares
//! one address). A refused attempt is not checked at all, so a right code is
//! refused too until the minute is over.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::session::{cookie, Subject, ADMIN_COOKIE, USER_COOKIE};
use crate::state::AppState;

/// Failed logins one account may have per window.
pub const MAX_FAILS_PER_ACCOUNT: u32 = 10;
/// Failed logins one client address may have per window.
pub const MAX_FAILS_PER_IP: u32 = 30;
/// The rate-limit window.
pub const WINDOW_SECS: u64 = 60;

/// The login routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", get(logout).post(logout))
        .route("/admin/login", get(admin_login_page).post(admin_login))
        .route("/admin/logout", get(admin_logout).post(admin_logout))
        .route("/admin/api/whoami", get(whoami))
}

// ---------------------------------------------------------------------------
// Client address and rate limiting
// ---------------------------------------------------------------------------

/// The peer address of the request, when the server records it.
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())))
    }
}

struct Limiter {
    ip_key: String,
    account_key: String,
}

impl Limiter {
    fn new(ip: Option<IpAddr>, account: &str) -> Self {
        let ip = ip.map(|ip| ip.to_string()).unwrap_or_else(|| "unknown".into());
        Limiter { ip_key: format!("cm:login:fail:ip:{ip}"), account_key: format!("cm:login:fail:{account}") }
    }

    /// `Some(seconds to wait)` when this attempt must be refused.
    async fn blocked(&self, state: &AppState) -> Result<Option<u64>, ApiError> {
        let mut conn = state.auth.accounts_conn();
        let (ip, account, ip_ttl, account_ttl): (Option<u32>, Option<u32>, i64, i64) = redis::pipe()
            .get(&self.ip_key)
            .get(&self.account_key)
            .ttl(&self.ip_key)
            .ttl(&self.account_key)
            .query_async(&mut conn)
            .await?;
        let wait = |ttl: i64| ttl.max(1) as u64;
        if account.unwrap_or(0) >= MAX_FAILS_PER_ACCOUNT {
            return Ok(Some(wait(account_ttl)));
        }
        if ip.unwrap_or(0) >= MAX_FAILS_PER_IP {
            return Ok(Some(wait(ip_ttl)));
        }
        Ok(None)
    }

    async fn failed(&self, state: &AppState) -> Result<(), ApiError> {
        let script = redis::Script::new(
            r#"
            for _, k in ipairs(KEYS) do
              if redis.call('INCR', k) == 1 then redis.call('EXPIRE', k, ARGV[1]) end
            end
            return 1
            "#,
        );
        let _: i64 = script
            .key(&self.ip_key)
            .key(&self.account_key)
            .arg(WINDOW_SECS)
            .invoke_async(&mut state.auth.accounts_conn())
            .await?;
        Ok(())
    }
}

fn too_many(wait: u64) -> (StatusCode, String, Option<u64>) {
    (
        StatusCode::TOO_MANY_REQUESTS,
        format!("Too many failed logins. Wait {wait} seconds, then try again."),
        Some(wait),
    )
}

// ---------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A complete, small HTML page.
pub fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 26rem; margin: 4rem auto; padding: 0 1rem; color: #222; }}
label {{ display: block; margin: 1rem 0 .25rem; }}
input {{ width: 100%; padding: .5rem; font-size: 1.1rem; box-sizing: border-box; }}
button {{ margin-top: 1.25rem; padding: .6rem 1.4rem; font-size: 1.1rem; }}
.error {{ background: #fde8e8; border: 1px solid #e0a0a0; padding: .6rem .8rem; border-radius: 4px; }}
.muted {{ color: #666; font-size: .9rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"#,
        title = escape(title),
    )
}

fn error_block(error: Option<&str>) -> String {
    error.map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, escape(e))).unwrap_or_default()
}

fn login_form(user: &str, error: Option<&str>) -> String {
    page(
        "Log in",
        &format!(
            r#"{error}
<form method="post" action="/login">
<label for="user">Participant number</label>
<input id="user" name="user" inputmode="numeric" pattern="[0-9]+" required autocomplete="username" value="{user}"{focus_user}>
<label for="code">Access code</label>
<input id="code" name="code" required autocomplete="current-password" placeholder="xxxx-xxxx-xxxx"{focus_code}>
<button type="submit">Log in</button>
</form>
<p class="muted">Your number and access code are on the card the instructor gave you.</p>"#,
            error = error_block(error),
            user = escape(user),
            focus_user = if user.is_empty() { " autofocus" } else { "" },
            focus_code = if user.is_empty() { "" } else { " autofocus" },
        ),
    )
}

fn admin_form(error: Option<&str>) -> String {
    page(
        "Instructor login",
        &format!(
            r#"{error}
<form method="post" action="/admin/login">
<label for="secret">Admin token or password</label>
<input id="secret" name="secret" type="password" required autofocus autocomplete="current-password">
<button type="submit">Log in</button>
</form>"#,
            error = error_block(error),
        ),
    )
}

/// An HTML answer that is never cached.
fn html(status: StatusCode, body: String, retry_after: Option<u64>) -> Response {
    let mut res = (status, Html(body)).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(secs) = retry_after {
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}

fn redirect_with_cookie(to: &str, cookie: HeaderValue) -> Response {
    let mut res = Redirect::to(to).into_response();
    res.headers_mut().append(header::SET_COOKIE, cookie);
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// An error page for a failure the user cannot fix by retyping (Redis down).
fn unavailable(e: ApiError) -> Response {
    tracing::error!("login: {e}");
    html(StatusCode::SERVICE_UNAVAILABLE, page("Try again", &error_block(Some(&e.to_string()))), None)
}

// ---------------------------------------------------------------------------
// Participants
// ---------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct LoginQuery {
    #[serde(default)]
    user: String,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    html(StatusCode::OK, login_form(q.user.trim(), None), None)
}

#[derive(Deserialize, Default)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    code: String,
}

async fn login(State(state): State<AppState>, ClientIp(ip): ClientIp, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    let user_field = form.user.trim();
    let Ok(n) = user_field.parse::<u32>() else {
        let msg = "Enter your participant number (the number on your card).";
        return html(StatusCode::BAD_REQUEST, login_form(user_field, Some(msg)), None);
    };
    let limiter = Limiter::new(ip, &Subject::User(n).encode());
    match limiter.blocked(&state).await {
        Ok(Some(wait)) => {
            let (status, msg, retry) = too_many(wait);
            tracing::warn!(user = n, ?ip, "login refused: too many failures");
            return html(status, login_form(user_field, Some(&msg)), retry);
        }
        Ok(None) => {}
        Err(e) => return unavailable(e),
    }
    match state.auth.accounts().login(state.auth.sessions(), n, &form.code).await {
        Ok(id) => {
            if let Some(old) = cookie(&headers, USER_COOKIE) {
                let _ = state.auth.sessions().revoke(old).await;
            }
            tracing::info!(user = n, ?ip, "participant logged in");
            redirect_with_cookie(&format!("/user/{n}/"), state.auth.sessions().set_cookie(Subject::User(n), &id))
        }
        Err(e @ (ApiError::Unauthorized(_) | ApiError::NotFound(_))) => {
            tracing::warn!(user = n, ?ip, "login failed: {e}");
            if let Err(e) = limiter.failed(&state).await {
                return unavailable(e);
            }
            let msg = match e {
                ApiError::NotFound(_) => format!("There is no participant {n}. Check the number on your card."),
                _ => "That access code is not right for this participant number. Check your card and try again."
                    .to_string(),
            };
            html(StatusCode::UNAUTHORIZED, login_form(user_field, Some(&msg)), None)
        }
        Err(e @ ApiError::Limit { .. }) => {
            html(StatusCode::FORBIDDEN, login_form(user_field, Some(&format!("You cannot log in: {e}."))), None)
        }
        Err(e) => unavailable(e),
    }
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, USER_COOKIE) {
        if let Err(e) = state.auth.sessions().revoke(id).await {
            return unavailable(e);
        }
    }
    redirect_with_cookie("/login", state.auth.sessions().clear_cookie(USER_COOKIE))
}

// ---------------------------------------------------------------------------
// Instructor
// ---------------------------------------------------------------------------

async fn admin_login_page() -> Response {
    html(StatusCode::OK, admin_form(None), None)
}

#[derive(Deserialize, Default)]
struct AdminForm {
    #[serde(default)]
    secret: String,
}

async fn admin_login(State(state): State<AppState>, ClientIp(ip): ClientIp, headers: HeaderMap, Form(form): Form<AdminForm>) -> Response {
    let limiter = Limiter::new(ip, &Subject::Admin.encode());
    match limiter.blocked(&state).await {
        Ok(Some(wait)) => {
            let (status, msg, retry) = too_many(wait);
            tracing::warn!(?ip, "admin login refused: too many failures");
            return html(status, admin_form(Some(&msg)), retry);
        }
        Ok(None) => {}
        Err(e) => return unavailable(e),
    }
    if !state.auth.is_admin_secret(&form.secret) {
        tracing::warn!(?ip, "admin login failed");
        if let Err(e) = limiter.failed(&state).await {
            return unavailable(e);
        }
        return html(
            StatusCode::UNAUTHORIZED,
            admin_form(Some("That is neither the admin token nor the admin password.")),
            None,
        );
    }
    match state.auth.sessions().create(Subject::Admin).await {
        Ok(id) => {
            if let Some(old) = cookie(&headers, ADMIN_COOKIE) {
                let _ = state.auth.sessions().revoke(old).await;
            }
            tracing::info!(?ip, "instructor logged in");
            redirect_with_cookie("/admin/", state.auth.sessions().set_cookie(Subject::Admin, &id))
        }
        Err(e) => unavailable(e),
    }
}

async fn admin_logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, ADMIN_COOKIE) {
        if let Err(e) = state.auth.sessions().revoke(id).await {
            return unavailable(e);
        }
    }
    redirect_with_cookie("/admin/login", state.auth.sessions().clear_cookie(ADMIN_COOKIE))
}

/// `GET /admin/api/whoami`: whether the caller is the instructor, and how.
async fn whoami(admin: Admin) -> Json<serde_json::Value> {
    Json(json!({ "admin": true, "via": admin.via }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_show() {
        let html = login_form("<script>", Some("a & \"b\""));
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("a &amp; &quot;b&quot;"));
        assert!(html.contains(r#"action="/login""#));
        assert!(admin_form(None).contains(r#"type="password""#));
    }
}
