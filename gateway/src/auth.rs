//! Who is calling: participants (access code or session cookie) and the
//! instructor (admin token, admin password, or admin session).
//!
//! # Accounts
//!
//! Participants are numbered 1..=N. N lives in Redis (`cm:auth:participants`),
//! not in the gateway's memory: the gateway raises it to `gateway.participants`
//! on start (never lowers it), and [`Accounts::create`] (`gateway users
//! create`, or the admin page) adds N+1 while gateways run, so adding a user
//! needs no restart. Each participant's access code is stored only as a
//! SHA-256 hash; the plaintext is shown once and appended to
//! `<data_dir>/secrets/access-codes.txt` (mode 0600) as the instructor's
//! handout (a reset appends a new line for the same number: the last line
//! wins). Codes are random (≈60 bits), so a fast hash is enough: nobody can
//! guess their way back from it.
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `cm:auth:participants` | string | N, the highest participant number |
//! | `cm:auth:codes` | hash n → sha256(code) | access codes |
//! | `cm:auth:created` | hash n → unix seconds | when the account was made |
//! | `cm:auth:disabled` | set of n | disabled participants |
//!
//! Sessions are in [`crate::session`]. A reset or a disable ends every session
//! of that participant in the same Lua script that changes the account, and
//! a login checks the code and makes the session in one script, so no session
//! made with an old code survives a reset.
//!
//! # Who may call what
//!
//! A request to `/user/{n}/...` ([`Participant`]) is allowed with
//! `Authorization: Bearer <code of n>`, the admin token as bearer, a
//! `cm_session` cookie of a live session of n, or a live `cm_admin` session.
//! A number outside 1..=N is 404 whoever asks; no credentials, a wrong code,
//! an expired or forged session, or another participant's session is 401; a
//! disabled participant is 403 (the instructor still gets through).
//! `/admin/...` routes use [`Admin`]: the admin token as bearer or a live
//! `cm_admin` session.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use rand::Rng;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::session::{self, cookie, session_key_of, Sessions, Subject, ADMIN_COOKIE, USER_COOKIE};
use crate::state::AppState;

const CODES_KEY: &str = "cm:auth:codes";
const CREATED_KEY: &str = "cm:auth:created";
const DISABLED_KEY: &str = "cm:auth:disabled";
const PARTICIPANTS_KEY: &str = "cm:auth:participants";
/// Unambiguous characters for codes people type.
const CODE_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";

fn hash(code: &str) -> String {
    hex::encode(Sha256::digest(code.trim().as_bytes()))
}

/// Compares without leaking where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new access code, `xxxx-xxxx-xxxx`.
pub fn new_code() -> String {
    let mut rng = rand::thread_rng();
    let chars: Vec<char> =
        (0..12).map(|_| CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())] as char).collect();
    chars.chunks(4).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join("-")
}

fn unix_now() -> u64 {
    session::now_ms() / 1000
}

/// 403 for a disabled participant, in ComfyUI's error shape.
pub fn disabled_error(n: u32) -> ApiError {
    ApiError::Limit {
        kind: "account_disabled",
        message: format!("participant {n} is disabled by the instructor; ask them to enable it again"),
        status: StatusCode::FORBIDDEN,
    }
}

// ---------------------------------------------------------------------------
// Accounts
// ---------------------------------------------------------------------------

/// One participant as [`Accounts::list`] shows it (never the code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub user: u32,
    pub enabled: bool,
    pub has_code: bool,
    /// Unix seconds; `None` for accounts made before this was recorded.
    pub created: Option<u64>,
}

/// A code just issued by [`Accounts::create`] or [`Accounts::reset`].
#[derive(Debug)]
pub struct Issued {
    pub user: u32,
    /// The plaintext code: show it once.
    pub code: String,
    /// Where the code was appended for the instructor, or why it could not be.
    pub handout: Result<PathBuf, String>,
}

/// Participants' accounts in Redis: shared by the gateway, the `gateway
/// users` CLI and the admin page.
#[derive(Clone)]
pub struct Accounts {
    conn: ConnectionManager,
    /// `gateway.participants`: N when Redis has none yet.
    initial: u32,
    data_dir: PathBuf,
}

impl Accounts {
    pub fn new(conn: ConnectionManager, initial: u32, data_dir: impl Into<PathBuf>) -> Self {
        Accounts { conn, initial, data_dir: data_dir.into() }
    }

    /// The instructor's handout file.
    pub fn handout_path(&self) -> PathBuf {
        crate::secrets::dir(&self.data_dir).join("access-codes.txt")
    }

    /// Sets N from the configuration: when Redis has none, or (with `raise`,
    /// as the gateway does on start) when the configuration asks for more.
    /// Never lowers it. Returns N.
    pub async fn init(&self, raise: bool) -> Result<u32, ApiError> {
        let script = redis::Script::new(
            r#"
            local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
            local want = tonumber(ARGV[1])
            if cur < 0 or (ARGV[2] == '1' and cur < want) then
              redis.call('SET', KEYS[1], want)
              cur = want
            end
            return cur
            "#,
        );
        let n: i64 = script
            .key(PARTICIPANTS_KEY)
            .arg(self.initial)
            .arg(if raise { "1" } else { "0" })
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n as u32)
    }

    /// N: participants are 1..=N.
    pub async fn count(&self) -> Result<u32, ApiError> {
        let n: Option<u32> = self.conn.clone().get(PARTICIPANTS_KEY).await?;
        Ok(n.unwrap_or(self.initial))
    }

    fn no_such_user(n: u32, count: u32) -> ApiError {
        ApiError::NotFound(format!(
            "there is no participant {n} (participants are 1..={count}; `gateway users create` adds one)"
        ))
    }

    /// Gives every participant 1..=N without a code a new one; returns the
    /// new `(n, code)` pairs and appends them to the handout. Safe with
    /// several gateways starting at once (`HSETNX`).
    pub async fn ensure_codes(&self) -> Result<Vec<(u32, String)>, ApiError> {
        let mut conn = self.conn.clone();
        let count = self.count().await?;
        let now = unix_now();
        let mut created = Vec::new();
        for n in 1..=count {
            let code = new_code();
            let fresh: bool = conn.hset_nx(CODES_KEY, n, hash(&code)).await?;
            if fresh {
                let _: bool = conn.hset_nx(CREATED_KEY, n, now).await?;
                created.push((n, code));
            }
        }
        if !created.is_empty() {
            let text: String = created.iter().map(|(n, c)| format!("{n}:{c}\n")).collect();
            let path = self.handout_path();
            crate::secrets::write_private(&path, &text, true)
                .map_err(|e| ApiError::Internal(format!("cannot write {}: {e}", path.display())))?;
            tracing::info!(count = created.len(), path = %path.display(), "generated access codes");
        }
        Ok(created)
    }

    fn hand_out(&self, user: u32, code: String) -> Issued {
        let path = self.handout_path();
        let handout = crate::secrets::write_private(&path, &format!("{user}:{code}\n"), true)
            .map(|()| path.clone())
            .map_err(|e| format!("cannot append to {}: {e}", path.display()));
        Issued { user, code, handout }
    }

    /// Adds participant N+1 with a new code; running gateways accept it at once.
    pub async fn create(&self) -> Result<Issued, ApiError> {
        let code = new_code();
        let script = redis::Script::new(
            r#"
            local n = tonumber(redis.call('GET', KEYS[1]) or ARGV[1]) + 1
            redis.call('SET', KEYS[1], n)
            redis.call('HSET', KEYS[2], n, ARGV[2])
            redis.call('HSET', KEYS[3], n, ARGV[3])
            redis.call('SREM', KEYS[4], n)
            return n
            "#,
        );
        let n: i64 = script
            .key(PARTICIPANTS_KEY)
            .key(CODES_KEY)
            .key(CREATED_KEY)
            .key(DISABLED_KEY)
            .arg(self.initial)
            .arg(hash(&code))
            .arg(unix_now())
            .invoke_async(&mut self.conn.clone())
            .await?;
        let n = n as u32;
        tracing::info!(user = n, "participant created");
        Ok(self.hand_out(n, code))
    }

    /// Every participant 1..=N.
    pub async fn list(&self) -> Result<Vec<Account>, ApiError> {
        let count = self.count().await?;
        let (codes, disabled, created): (
            std::collections::HashMap<u32, String>,
            std::collections::HashSet<u32>,
            std::collections::HashMap<u32, u64>,
        ) = redis::pipe()
            .hgetall(CODES_KEY)
            .smembers(DISABLED_KEY)
            .hgetall(CREATED_KEY)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok((1..=count)
            .map(|user| Account {
                user,
                enabled: !disabled.contains(&user),
                has_code: codes.contains_key(&user),
                created: created.get(&user).copied(),
            })
            .collect())
    }

    /// Gives participant `n` a new code: the old one and every session of `n`
    /// stop working at once.
    pub async fn reset(&self, n: u32) -> Result<Issued, ApiError> {
        let code = new_code();
        let script = redis::Script::new(&format!(
            r#"{}
            local count = tonumber(redis.call('GET', KEYS[1]) or ARGV[3])
            local n = tonumber(ARGV[1])
            if n < 1 or n > count then return -count end
            redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
            redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[5])
            cm_session_revoke_all(ARGV[4], KEYS[3])
            return count
            "#,
            session::LUA_HELPERS
        ));
        let r: i64 = script
            .key(PARTICIPANTS_KEY)
            .key(CODES_KEY)
            .key(Subject::User(n).index_key())
            .key(CREATED_KEY)
            .arg(n)
            .arg(hash(&code))
            .arg(self.initial)
            .arg(session::session_prefix())
            .arg(unix_now())
            .invoke_async(&mut self.conn.clone())
            .await?;
        if r <= 0 {
            return Err(Self::no_such_user(n, (-r) as u32));
        }
        tracing::info!(user = n, "access code reset; sessions revoked");
        Ok(self.hand_out(n, code))
    }

    /// Disables (`true`) or enables participant `n`. Disabling ends every
    /// session of `n`; from then on every request for `n` is 403. Returns
    /// whether anything changed.
    pub async fn set_disabled(&self, n: u32, disabled: bool) -> Result<bool, ApiError> {
        let script = redis::Script::new(&format!(
            r#"{}
            local count = tonumber(redis.call('GET', KEYS[1]) or ARGV[3])
            local n = tonumber(ARGV[1])
            if n < 1 or n > count then return -count - 1 end
            if ARGV[2] == '1' then
              local changed = redis.call('SADD', KEYS[2], ARGV[1])
              cm_session_revoke_all(ARGV[4], KEYS[3])
              return changed
            end
            return redis.call('SREM', KEYS[2], ARGV[1])
            "#,
            session::LUA_HELPERS
        ));
        let r: i64 = script
            .key(PARTICIPANTS_KEY)
            .key(DISABLED_KEY)
            .key(Subject::User(n).index_key())
            .arg(n)
            .arg(if disabled { "1" } else { "0" })
            .arg(self.initial)
            .arg(session::session_prefix())
            .invoke_async(&mut self.conn.clone())
            .await?;
        if r < 0 {
            return Err(Self::no_such_user(n, (-r - 1) as u32));
        }
        tracing::info!(user = n, disabled, "participant {}", if disabled { "disabled" } else { "enabled" });
        Ok(r == 1)
    }

    /// Disables participant `n` (see [`Accounts::set_disabled`]).
    pub async fn disable(&self, n: u32) -> Result<bool, ApiError> {
        self.set_disabled(n, true).await
    }

    /// Enables participant `n` again.
    pub async fn enable(&self, n: u32) -> Result<bool, ApiError> {
        self.set_disabled(n, false).await
    }

    /// Checks `code` for participant `n` and, in the same atomic step, makes
    /// a session for `n`; returns the session id for the cookie.
    /// 404: no such participant (or no code yet); 401: wrong code; 403: disabled.
    pub async fn login(&self, sessions: &Sessions, n: u32, code: &str) -> Result<String, ApiError> {
        let id = session::new_session_id();
        let session_hash = session::session_hash(&id).expect("a fresh id is well-formed");
        let script = redis::Script::new(&format!(
            r#"{}
            local count = tonumber(redis.call('GET', KEYS[1]) or ARGV[3])
            local n = tonumber(ARGV[1])
            if n < 1 or n > count then return 'no_user' end
            local stored = redis.call('HGET', KEYS[2], ARGV[1])
            if not stored then return 'no_code' end
            if stored ~= ARGV[2] then return 'wrong_code' end
            if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 'disabled' end
            cm_session_create(ARGV[4], KEYS[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
            return 'ok'
            "#,
            session::LUA_HELPERS
        ));
        let outcome: String = script
            .key(PARTICIPANTS_KEY)
            .key(CODES_KEY)
            .key(DISABLED_KEY)
            .key(Subject::User(n).index_key())
            .arg(n)
            .arg(hash(code))
            .arg(self.initial)
            .arg(session::session_prefix())
            .arg(&session_hash)
            .arg(Subject::User(n).encode())
            .arg(sessions.ttl_ms())
            .arg(session::now_ms())
            .invoke_async(&mut self.conn.clone())
            .await?;
        match outcome.as_str() {
            "ok" => Ok(id),
            "no_user" => Err(ApiError::NotFound(format!("there is no participant {n}"))),
            "no_code" => Err(ApiError::NotFound(format!("participant {n} has no access code yet"))),
            "disabled" => Err(disabled_error(n)),
            _ => Err(ApiError::Unauthorized(format!(
                "wrong access code for participant {n}; check the code you were given"
            ))),
        }
    }
}

// ---------------------------------------------------------------------------
// Auth: the checks every request goes through
// ---------------------------------------------------------------------------

/// How a request was authorised for a participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `Authorization: Bearer <access code>`.
    Code,
    /// `Authorization: Bearer <admin token>`.
    AdminToken,
    /// A `cm_session` cookie.
    Session,
    /// A `cm_admin` cookie.
    AdminSession,
}

/// How often one gateway notes a participant as heard from (`cm:seen`, the
/// admin page's "online", whose window is minutes): not on every request.
const SEEN_EVERY: Duration = Duration::from_secs(1);

/// Checks access codes, sessions, the admin token and the admin password.
#[derive(Clone)]
pub struct Auth {
    accounts: Accounts,
    sessions: Sessions,
    admin_token: Arc<str>,
    /// SHA-256 of `gateway.admin_password`, when one is set.
    admin_password: Option<Arc<[u8]>>,
    /// When this gateway last noted each participant as heard from.
    seen: Arc<Mutex<HashMap<u32, Instant>>>,
}

impl Auth {
    pub fn new(accounts: Accounts, sessions: Sessions, admin_token: String, admin_password: Option<&str>) -> Self {
        let admin_password =
            admin_password.filter(|p| !p.is_empty()).map(|p| Arc::from(Sha256::digest(p.as_bytes()).as_slice()));
        Auth { accounts, sessions, admin_token: admin_token.into(), admin_password, seen: Arc::default() }
    }

    /// Whether participant `n`, just heard from, is due to be noted in
    /// Redis again (at most once per [`SEEN_EVERY`] per gateway).
    pub fn due_for_seen(&self, n: u32) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("seen lock");
        match seen.get(&n) {
            Some(last) if now.duration_since(*last) < SEEN_EVERY => false,
            _ => {
                seen.insert(n, now);
                true
            }
        }
    }

    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// A handle on the Redis connection the accounts use.
    pub fn accounts_conn(&self) -> ConnectionManager {
        self.accounts.conn.clone()
    }

    /// Whether `token` is the admin token.
    pub fn is_admin(&self, token: &str) -> bool {
        !token.is_empty() && constant_time_eq(token.as_bytes(), self.admin_token.as_bytes())
    }

    /// Whether `secret` (typed into the admin login) is the admin token or
    /// the admin password.
    pub fn is_admin_secret(&self, secret: &str) -> bool {
        let secret = secret.trim();
        let token = self.is_admin(secret);
        let password = self
            .admin_password
            .as_ref()
            .is_some_and(|h| constant_time_eq(Sha256::digest(secret.as_bytes()).as_slice(), h));
        token | password
    }

    /// Checks that bearer `token` lets its bearer act as participant `n`.
    pub async fn check(&self, n: u32, token: &str) -> Result<Via, ApiError> {
        let (count, stored, disabled): (Option<u32>, Option<String>, bool) = redis::pipe()
            .get(PARTICIPANTS_KEY)
            .hget(CODES_KEY, n)
            .sismember(DISABLED_KEY, n)
            .query_async(&mut self.accounts.conn.clone())
            .await?;
        let count = count.unwrap_or(self.accounts.initial);
        if n == 0 || n > count {
            return Err(ApiError::NotFound(format!("there is no participant {n}")));
        }
        if self.is_admin(token) {
            return Ok(Via::AdminToken);
        }
        match stored {
            Some(stored) if constant_time_eq(stored.as_bytes(), hash(token).as_bytes()) => {
                if disabled {
                    Err(disabled_error(n))
                } else {
                    Ok(Via::Code)
                }
            }
            Some(_) => Err(ApiError::Unauthorized(format!(
                "wrong access code for participant {n}; check the code you were given"
            ))),
            None => Err(ApiError::NotFound(format!("participant {n} has no access code yet"))),
        }
    }

    /// Whether the request's headers let it act as participant `n`: a bearer
    /// (code or admin token) when there is one, else the session cookies.
    pub async fn authorize(&self, n: u32, headers: &HeaderMap) -> Result<Via, ApiError> {
        if let Some(token) = bearer_of(headers) {
            return self.check(n, token).await;
        }
        let user_cookie = cookie(headers, USER_COOKIE);
        let admin_cookie = cookie(headers, ADMIN_COOKIE);
        if user_cookie.is_none() && admin_cookie.is_none() {
            // Still 404 for a participant that does not exist.
            let count = self.accounts.count().await?;
            if n == 0 || n > count {
                return Err(ApiError::NotFound(format!("there is no participant {n}")));
            }
            return Err(ApiError::Unauthorized(
                "log in first: open /login, or send `Authorization: Bearer <your access code>`".into(),
            ));
        }
        let (count, disabled, user_session, admin_session): (Option<u32>, bool, Option<String>, Option<String>) =
            redis::pipe()
                .get(PARTICIPANTS_KEY)
                .sismember(DISABLED_KEY, n)
                .get(session_key_of(user_cookie))
                .get(session_key_of(admin_cookie))
                .query_async(&mut self.accounts.conn.clone())
                .await?;
        let count = count.unwrap_or(self.accounts.initial);
        if n == 0 || n > count {
            return Err(ApiError::NotFound(format!("there is no participant {n}")));
        }
        if admin_session.as_deref().and_then(Subject::decode) == Some(Subject::Admin) {
            return Ok(Via::AdminSession);
        }
        if disabled {
            // Its sessions were revoked; say why rather than "log in again".
            return Err(disabled_error(n));
        }
        match user_session.as_deref().and_then(Subject::decode) {
            Some(Subject::User(m)) if m == n => Ok(Via::Session),
            Some(Subject::User(m)) => Err(ApiError::Unauthorized(format!(
                "you are logged in as participant {m}, not {n}; log in as participant {n} at /login"
            ))),
            _ if user_cookie.is_some() => Err(ApiError::Unauthorized(
                "your session has expired or is not valid; log in again at /login".into(),
            )),
            _ => Err(ApiError::Unauthorized(
                "your instructor session has expired or is not valid; log in again at /admin/login".into(),
            )),
        }
    }

    /// How the request is the instructor's, if it is: the admin token as
    /// bearer, or a live admin session.
    pub async fn admin(&self, headers: &HeaderMap) -> Result<AdminVia, ApiError> {
        if let Some(token) = bearer_of(headers) {
            return if self.is_admin(token) {
                Ok(AdminVia::Token)
            } else {
                Err(ApiError::Unauthorized("that is not the admin token".into()))
            };
        }
        match cookie(headers, ADMIN_COOKIE) {
            Some(id) => match self.sessions.lookup(id).await? {
                Some(Subject::Admin) => Ok(AdminVia::Session),
                _ => Err(ApiError::Unauthorized(
                    "your instructor session has expired or is not valid; log in again at /admin/login".into(),
                )),
            },
            None => Err(ApiError::Unauthorized(
                "this is for the instructor: log in at /admin/login, or send `Authorization: Bearer <admin token>`"
                    .into(),
            )),
        }
    }
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    bearer_of(&parts.headers)
}

/// The bearer token in `headers`, if any.
pub fn bearer_of(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim()).filter(|t| !t.is_empty())
}

// ---------------------------------------------------------------------------
// Extractors
// ---------------------------------------------------------------------------

/// A request authenticated as participant `n` of its `/user/{n}/` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Participant(pub u32);

impl FromRequestParts<AppState> for Participant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound("no such page".into()))?;
        let raw = params.iter().find(|(k, _)| *k == "n").map(|(_, v)| v).unwrap_or_default();
        let n: u32 = raw.parse().map_err(|_| ApiError::NotFound(format!("there is no participant {raw:?}")))?;
        let via = state.auth.authorize(n, &parts.headers).await?;
        // "Online" on the admin page; the instructor acting as n does not count.
        if matches!(via, Via::Code | Via::Session) && state.auth.due_for_seen(n) {
            let _ = state.store.touch_user(n).await;
        }
        Ok(Participant(n))
    }
}

/// How the instructor authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminVia {
    /// `Authorization: Bearer <admin token>`.
    Token,
    /// A `cm_admin` session cookie (from `/admin/login`).
    Session,
}

/// A request from the instructor; guards every `/admin/...` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admin {
    pub via: AdminVia,
}

/// Why a request is not the instructor's: a ComfyUI-shaped JSON error for
/// `/admin/api/...` (and for any request with a bearer token), a redirect to
/// `/admin/login` for the pages a browser opens.
#[derive(Debug)]
pub enum AdminRejection {
    Api(ApiError),
    Login,
}

impl IntoResponse for AdminRejection {
    fn into_response(self) -> Response {
        match self {
            AdminRejection::Api(e) => e.into_response(),
            AdminRejection::Login => Redirect::to("/admin/login").into_response(),
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = AdminRejection;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match state.auth.admin(&parts.headers).await {
            Ok(via) => Ok(Admin { via }),
            Err(e @ ApiError::Unauthorized(_)) => {
                let api = parts.uri.path().starts_with("/admin/api/") || bearer(parts).is_some();
                Err(if api { AdminRejection::Api(e) } else { AdminRejection::Login })
            }
            Err(e) => Err(AdminRejection::Api(e)),
        }
    }
}

/// Refuses a request whose `Origin` names another host than the one it was
/// sent to: a page elsewhere must not use a participant's or the
/// instructor's cookie. `what` names what was asked for, for the message.
pub fn same_origin(headers: &axum::http::HeaderMap, what: &str) -> Result<(), ApiError> {
    use axum::http::header;
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or(origin).trim_end_matches('/');
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(ApiError::Limit {
            kind: "cross_origin",
            message: format!("a page from {origin} may not use {what}; open it at this gateway"),
            status: axum::http::StatusCode::FORBIDDEN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_site_requests_are_refused() {
        use axum::http::{header, HeaderMap};
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "gw.example:8080".parse().unwrap());
        assert!(same_origin(&h, "x").is_ok(), "no Origin: a script or curl");
        h.insert(header::ORIGIN, "http://gw.example:8080".parse().unwrap());
        assert!(same_origin(&h, "x").is_ok());
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(same_origin(&h, "x").unwrap_err().to_string().contains("evil.example"));
    }

    #[test]
    fn codes_are_readable_and_distinct() {
        let a = new_code();
        assert_eq!(a.len(), 14);
        assert!(a.chars().all(|c| c == '-' || CODE_ALPHABET.contains(&(c as u8))));
        assert_ne!(a, new_code());
        assert_eq!(hash(&a), hash(&format!(" {a} ")));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn bearer_is_read_from_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_of(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer  abc ".parse().unwrap());
        assert_eq!(bearer_of(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_of(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer_of(&h), None);
    }
}
