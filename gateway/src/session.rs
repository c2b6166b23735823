//! Browser sessions: what the login pages hand out instead of asking for the
//! access code on every request.
//!
//! A session id is 32 random bytes (64 hex characters) that lives only in the
//! browser's cookie: `cm_session` for a participant, `cm_admin` for the
//! instructor, both `HttpOnly; SameSite=Lax; Path=/` (plus `Secure` when the
//! gateway serves HTTPS itself). Redis keeps only the SHA-256 of the id:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `cm:session:<sha256 of id>` | string, TTL = `gateway.session_hours` | `user:<n>` or `admin` |
//! | `cm:sessions:user:<n>` / `cm:sessions:admin` | sorted set | the hashes of that subject's live sessions, scored by expiry (ms) |
//!
//! The index lets [`Sessions::revoke_all`] (and the account scripts in
//! [`crate::auth`], which revoke atomically with a reset or a disable) end
//! every session of one participant at once. A session is never extended:
//! after its TTL the participant logs in again. A cookie whose id is not
//! well-formed, unknown, expired or revoked is simply not a session.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, HeaderValue};
use rand::RngCore;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The participant's session cookie.
pub const USER_COOKIE: &str = "cm_session";
/// The instructor's session cookie.
pub const ADMIN_COOKIE: &str = "cm_admin";

const SESSION_PREFIX: &str = "cm:session:";
const INDEX_PREFIX: &str = "cm:sessions:";

/// Lua helpers shared by every script that makes or ends sessions; scripts
/// that use them start with this text. `prefix` is [`SESSION_PREFIX`].
pub(crate) const LUA_HELPERS: &str = r#"
local function cm_session_create(prefix, idx, hash, value, ttl, now)
  ttl = tonumber(ttl)
  now = tonumber(now)
  redis.call('SET', prefix .. hash, value, 'PX', ttl)
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
  redis.call('ZADD', idx, now + ttl, hash)
  if redis.call('PTTL', idx) < ttl then redis.call('PEXPIRE', idx, ttl) end
end
local function cm_session_revoke_all(prefix, idx)
  local members = redis.call('ZRANGE', idx, 0, -1)
  for _, m in ipairs(members) do redis.call('DEL', prefix .. m) end
  redis.call('DEL', idx)
  return #members
end
"#;

/// Whom a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// Participant `n`.
    User(u32),
    /// The instructor.
    Admin,
}

impl Subject {
    /// The value stored under the session key.
    pub fn encode(self) -> String {
        match self {
            Subject::User(n) => format!("user:{n}"),
            Subject::Admin => "admin".into(),
        }
    }

    /// The inverse of [`Subject::encode`].
    pub fn decode(value: &str) -> Option<Subject> {
        match value {
            "admin" => Some(Subject::Admin),
            other => other.strip_prefix("user:")?.parse().ok().filter(|n| *n > 0).map(Subject::User),
        }
    }

    /// The sorted set of this subject's live sessions.
    pub fn index_key(self) -> String {
        format!("{INDEX_PREFIX}{}", self.encode())
    }

    /// The cookie this subject's sessions travel in.
    pub fn cookie_name(self) -> &'static str {
        match self {
            Subject::User(_) => USER_COOKIE,
            Subject::Admin => ADMIN_COOKIE,
        }
    }
}

/// A fresh session id: 32 random bytes, hex.
pub fn new_session_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The SHA-256 (hex) of a well-formed session id; `None` for anything else,
/// so a forged value never reaches Redis.
pub fn session_hash(id: &str) -> Option<String> {
    let ok = id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| hex::encode(Sha256::digest(id.as_bytes())))
}

/// The Redis key of a session, from its hash.
pub fn session_key(hash: &str) -> String {
    format!("{SESSION_PREFIX}{hash}")
}

/// The Redis key of the session a cookie names, or a key that never exists
/// when the cookie is absent or malformed (handy in pipelines).
pub fn session_key_of(cookie: Option<&str>) -> String {
    match cookie.and_then(session_hash) {
        Some(hash) => session_key(&hash),
        None => format!("{SESSION_PREFIX}-"),
    }
}

/// The prefix of session keys, for the Lua helpers.
pub(crate) fn session_prefix() -> &'static str {
    SESSION_PREFIX
}

/// The value of cookie `name` in the request's `Cookie` header(s).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Makes, finds and ends sessions.
#[derive(Clone)]
pub struct Sessions {
    conn: ConnectionManager,
    ttl: Duration,
    secure: bool,
}

impl Sessions {
    /// `ttl`: how long a session lasts (at least 1 ms); `secure`: whether
    /// cookies get the `Secure` attribute (the gateway serves HTTPS).
    pub fn new(conn: ConnectionManager, ttl: Duration, secure: bool) -> Self {
        Sessions { conn, ttl: ttl.max(Duration::from_millis(1)), secure }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The TTL in milliseconds, as the scripts take it.
    pub(crate) fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis().max(1) as u64
    }

    /// A new session for `subject`; returns its id (the cookie's value).
    /// Participants' sessions are made by [`crate::auth::Accounts::login`],
    /// which checks the code in the same atomic step.
    pub async fn create(&self, subject: Subject) -> Result<String, ApiError> {
        let id = new_session_id();
        let hash = session_hash(&id).expect("a fresh id is well-formed");
        let script = redis::Script::new(&format!(
            "{LUA_HELPERS}\ncm_session_create(ARGV[1], KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])\nreturn 1"
        ));
        let _: i64 = script
            .key(subject.index_key())
            .arg(SESSION_PREFIX)
            .arg(&hash)
            .arg(subject.encode())
            .arg(self.ttl_ms())
            .arg(now_ms())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(id)
    }

    /// Whom the session `id` belongs to; `None` when it is malformed,
    /// unknown, expired or revoked.
    pub async fn lookup(&self, id: &str) -> Result<Option<Subject>, ApiError> {
        let Some(hash) = session_hash(id) else { return Ok(None) };
        let value: Option<String> = self.conn.clone().get(session_key(&hash)).await?;
        Ok(value.as_deref().and_then(Subject::decode))
    }

    /// Ends one session (logout). Unknown ids are fine.
    pub async fn revoke(&self, id: &str) -> Result<(), ApiError> {
        let Some(hash) = session_hash(id) else { return Ok(()) };
        let script = redis::Script::new(
            r#"
            local v = redis.call('GET', KEYS[1])
            redis.call('DEL', KEYS[1])
            if v then redis.call('ZREM', ARGV[1] .. v, ARGV[2]) end
            return 1
            "#,
        );
        let _: i64 = script
            .key(session_key(&hash))
            .arg(INDEX_PREFIX)
            .arg(&hash)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Ends every session of `subject`; returns how many there were.
    pub async fn revoke_all(&self, subject: Subject) -> Result<usize, ApiError> {
        let script =
            redis::Script::new(&format!("{LUA_HELPERS}\nreturn cm_session_revoke_all(ARGV[1], KEYS[1])"));
        let n: i64 =
            script.key(subject.index_key()).arg(SESSION_PREFIX).invoke_async(&mut self.conn.clone()).await?;
        Ok(n as usize)
    }

    /// `Set-Cookie` for a new session of `subject`.
    pub fn set_cookie(&self, subject: Subject, id: &str) -> HeaderValue {
        let max_age = self.ttl.as_secs().max(1);
        let secure = if self.secure { "; Secure" } else { "" };
        let value = format!("{}={id}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age}{secure}", subject.cookie_name());
        HeaderValue::from_str(&value).expect("cookie is ASCII")
    }

    /// `Set-Cookie` that makes the browser forget cookie `name`.
    pub fn clear_cookie(&self, name: &str) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!("{name}=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0{secure}"))
            .expect("cookie is ASCII")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_only_wellformed_ids_hash() {
        let id = new_session_id();
        assert_eq!(id.len(), 64);
        assert_ne!(id, new_session_id());
        assert!(session_hash(&id).is_some());
        assert_ne!(session_hash(&id).unwrap(), id, "only the hash is stored");
        assert!(session_hash(&id[..63]).is_none());
        assert!(session_hash(&id.to_uppercase()).is_none());
        assert!(session_hash(&format!("{}g", &id[..63])).is_none());
        assert!(session_hash("").is_none());
        assert_eq!(session_key_of(Some("forged")), "cm:session:-");
        assert_eq!(session_key_of(None), "cm:session:-");
    }

    #[test]
    fn subjects_round_trip() {
        for s in [Subject::User(1), Subject::User(100), Subject::Admin] {
            assert_eq!(Subject::decode(&s.encode()), Some(s));
        }
        assert_eq!(Subject::decode("user:0"), None);
        assert_eq!(Subject::decode("user:x"), None);
        assert_eq!(Subject::decode("root"), None);
        assert_eq!(Subject::User(3).index_key(), "cm:sessions:user:3");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; cm_session=abc ; cm_admin=\"def\""));
        h.append(header::COOKIE, HeaderValue::from_static("z=9"));
        assert_eq!(cookie(&h, "cm_session"), Some("abc"));
        assert_eq!(cookie(&h, "cm_admin"), Some("def"));
        assert_eq!(cookie(&h, "z"), Some("9"));
        assert_eq!(cookie(&h, "cm"), None);
    }
}
