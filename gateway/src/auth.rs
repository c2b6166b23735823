//! Who is calling: participants by access code, the instructor by admin token.
//!
//! Each participant `n` (1..=participants) has an access code, generated on
//! the gateway's first start and stored only as a SHA-256 hash in Redis
//! (`cm:auth:codes`, field `n`). The plaintext codes are written once, at
//! generation, to `<data_dir>/secrets/access-codes.txt` (mode 0600) for the
//! instructor to hand out. Codes are random (≈60 bits), so a fast hash is
//! enough: nobody can guess their way back from it.
//!
//! A request to `/user/{n}/...` must carry `Authorization: Bearer <code of n>`,
//! or the admin token.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use rand::Rng;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

const CODES_KEY: &str = "cm:auth:codes";
/// Unambiguous characters for codes people type.
const CODE_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";

/// Checks access codes and the admin token.
#[derive(Clone)]
pub struct Auth {
    conn: ConnectionManager,
    admin_token: Arc<str>,
    participants: u32,
}

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

impl Auth {
    pub fn new(conn: ConnectionManager, admin_token: String, participants: u32) -> Self {
        Auth { conn, admin_token: admin_token.into(), participants }
    }

    /// Gives every participant without a code a new one; returns the new
    /// `(n, code)` pairs and appends them to `<data_dir>/secrets/access-codes.txt`.
    /// Safe with several gateways starting at once (`HSETNX`).
    pub async fn ensure_codes(&self, data_dir: &Path) -> Result<Vec<(u32, String)>, ApiError> {
        let mut conn = self.conn.clone();
        let mut created = Vec::new();
        for n in 1..=self.participants {
            let code = new_code();
            let fresh: bool = conn.hset_nx(CODES_KEY, n, hash(&code)).await?;
            if fresh {
                created.push((n, code));
            }
        }
        if !created.is_empty() {
            let text: String = created.iter().map(|(n, c)| format!("{n}:{c}\n")).collect();
            let path = crate::secrets::dir(data_dir).join("access-codes.txt");
            crate::secrets::write_private(&path, &text, true)
                .map_err(|e| ApiError::Internal(format!("cannot write {}: {e}", path.display())))?;
            tracing::info!(count = created.len(), path = %path.display(), "generated access codes");
        }
        Ok(created)
    }

    /// Whether `token` is the admin token.
    pub fn is_admin(&self, token: &str) -> bool {
        constant_time_eq(token.as_bytes(), self.admin_token.as_bytes())
    }

    /// Checks that `token` lets its bearer act as participant `n`.
    pub async fn check(&self, n: u32, token: &str) -> Result<(), ApiError> {
        if n == 0 || n > self.participants {
            return Err(ApiError::NotFound(format!("there is no participant {n}")));
        }
        if self.is_admin(token) {
            return Ok(());
        }
        let stored: Option<String> = self.conn.clone().hget(CODES_KEY, n).await?;
        match stored {
            Some(stored) if constant_time_eq(stored.as_bytes(), hash(token).as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::Unauthorized(format!(
                "wrong access code for participant {n}; check the code you were given"
            ))),
            None => Err(ApiError::NotFound(format!("participant {n} has no access code yet"))),
        }
    }
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim()).filter(|t| !t.is_empty())
}

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
        let token = bearer(parts).ok_or_else(|| {
            ApiError::Unauthorized("log in first: send `Authorization: Bearer <your access code>`".into())
        })?;
        state.auth.check(n, token).await?;
        Ok(Participant(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
