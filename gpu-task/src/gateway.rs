//! Client of the gateway's internal API (`dispatcher::contract::internal`).
//!
//! gpu-task never talks to participants or to Redis: everything it learns
//! (the job has started, ComfyUI's progress, the output files, the verdict)
//! goes to the gateway, which owns the job record. Every call carries the
//! shared secret, since these routes must stay closed to participants.

use std::time::Duration;

use dispatcher::contract::{internal, Finished, OutputQuery, WorkflowPayload, INTERNAL_SECRET_HEADER};

use crate::history::one_line;

/// Timeout of every call except output uploads.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of posting a preview: a late preview is worthless.
const PREVIEW_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a call to the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Transport failure: the gateway is down, or the address is wrong.
    #[error("cannot reach the gateway at {url}: {reason} (check GATEWAY_URL or its Consul service)")]
    Unreachable { url: String, reason: String },
    /// The gateway answered with an error status.
    #[error("the gateway at {url} answered {status} to {what}: {body}{hint}", hint = status_hint(*.status))]
    Status { url: String, what: &'static str, status: u16, body: String },
    /// The gateway's answer is not what the contract says.
    #[error("the gateway at {url} sent an unreadable {what}: {reason}")]
    Decode { url: String, what: &'static str, reason: String },
}

fn status_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => " (check INTERNAL_SECRET)",
        _ => "",
    }
}

impl GatewayError {
    /// Whether trying again later may help (transport errors, 5xx, 408, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            GatewayError::Unreachable { .. } => true,
            GatewayError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            GatewayError::Decode { .. } => false,
        }
    }
}

/// The gateway, as seen by one job.
#[derive(Debug, Clone)]
pub struct Gateway {
    base: String,
    job: String,
    secret: Option<String>,
    http: reqwest::Client,
}

impl Gateway {
    /// A client for job `job` of the gateway at `base` (`http://host:port`),
    /// trusting `ca` besides the public roots for HTTPS.
    pub fn new(base: &str, job: &str, secret: Option<String>, ca: Vec<reqwest::Certificate>) -> Gateway {
        let http = ca
            .into_iter()
            .fold(reqwest::Client::builder(), |b, cert| b.add_root_certificate(cert))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        if secret.is_none() {
            tracing::warn!("INTERNAL_SECRET is not set: the gateway will refuse gpu-task's calls");
        }
        Gateway { base: base.trim_end_matches('/').to_string(), job: job.to_string(), secret, http }
    }

    /// The gateway's address.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: String) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(secret) = &self.secret {
            req = req.header(INTERNAL_SECRET_HEADER, secret);
        }
        req
    }

    async fn send(
        &self,
        what: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GatewayError> {
        let resp = req
            .send()
            .await
            .map_err(|e| GatewayError::Unreachable { url: self.base.clone(), reason: describe(&e) })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(GatewayError::Status {
            url: self.base.clone(),
            what,
            status: status.as_u16(),
            body: one_line(&body),
        })
    }

    /// `GET workflow`: the job's workflow, when it did not fit the payload.
    pub async fn workflow(&self) -> Result<WorkflowPayload, GatewayError> {
        let req = self.request(reqwest::Method::GET, internal::workflow(&self.job)).timeout(CALL_TIMEOUT);
        let resp = self.send("the workflow request", req).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| GatewayError::Unreachable { url: self.base.clone(), reason: describe(&e) })?;
        serde_json::from_slice(&bytes).map_err(|e| GatewayError::Decode {
            url: self.base.clone(),
            what: "workflow",
            reason: e.to_string(),
        })
    }

    /// `GET inputs/{reference}`: one of the participant's files the prompt
    /// refers to; returns its bytes.
    pub async fn input(&self, reference: &str) -> Result<Vec<u8>, GatewayError> {
        let req = self.request(reqwest::Method::GET, internal::input(&self.job, reference));
        let resp = self.send("an input file request", req).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| GatewayError::Unreachable { url: self.base.clone(), reason: describe(&e) })?;
        Ok(bytes.to_vec())
    }

    /// `POST started`: the job is running.
    pub async fn started(&self) -> Result<(), GatewayError> {
        let req = self.request(reqwest::Method::POST, internal::started(&self.job)).timeout(CALL_TIMEOUT);
        self.send("started", req).await.map(drop)
    }

    /// `POST events`: one ComfyUI websocket message, as received.
    pub async fn event(&self, raw: &str) -> Result<(), GatewayError> {
        let req = self
            .request(reqwest::Method::POST, internal::events(&self.job))
            .timeout(CALL_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(raw.to_string());
        self.send("an event", req).await.map(drop)
    }

    /// `POST preview`: one binary preview frame, as received from ComfyUI.
    pub async fn preview(&self, frame: bytes::Bytes) -> Result<(), GatewayError> {
        let req = self
            .request(reqwest::Method::POST, internal::preview(&self.job))
            .timeout(PREVIEW_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(frame);
        self.send("a preview", req).await.map(drop)
    }

    /// `PUT outputs`: one output file's bytes. Idempotent.
    pub async fn upload(
        &self,
        query: &OutputQuery,
        content_type: Option<&str>,
        body: reqwest::Body,
    ) -> Result<(), GatewayError> {
        let mut req =
            self.request(reqwest::Method::PUT, internal::outputs(&self.job)).query(query).body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        self.send("an output upload", req).await.map(drop)
    }

    /// `POST finished`: the final report.
    pub async fn finished(&self, report: &Finished) -> Result<(), GatewayError> {
        let req = self
            .request(reqwest::Method::POST, internal::finished(&self.job))
            .timeout(CALL_TIMEOUT)
            .json(report);
        self.send("the final report", req).await.map(drop)
    }
}

/// What went wrong in a transport error, without the wrapper layers: the
/// innermost cause ("Connection refused (os error 111)").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    one_line(&cause.to_string())
}

/// [`root_cause`] of a reqwest error, naming timeouts as such.
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else {
        root_cause(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_errors_are_worth_retrying() {
        let status =
            |status| GatewayError::Status { url: "u".into(), what: "w", status, body: String::new() };
        assert!(status(502).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(404).is_transient());
        assert!(!status(409).is_transient());
        assert!(GatewayError::Unreachable { url: "u".into(), reason: "r".into() }.is_transient());
    }

    #[test]
    fn refused_secret_says_what_to_check() {
        let e =
            GatewayError::Status { url: "http://gw".into(), what: "started", status: 401, body: "no".into() };
        assert_eq!(
            e.to_string(),
            "the gateway at http://gw answered 401 to started: no (check INTERNAL_SECRET)"
        );
    }
}
