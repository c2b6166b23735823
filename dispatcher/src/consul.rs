//! Finding healthy services in Consul.
//!
//! The warm ComfyUI on each GPU node and the gateway register themselves in
//! Consul; gpu-task looks both up here instead of being told fixed addresses,
//! so a restarted ComfyUI or a moved gateway is found again. Only instances
//! whose every health check passes are returned (`?passing=true`), so a
//! ComfyUI that is still loading models is never handed work.
//!
//! Just the two calls comfy-multi needs: `GET /v1/health/service/<name>` and
//! `GET /v1/status/leader` (is Consul there at all).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// One passing instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInstance {
    /// Consul's node name the instance runs on.
    pub node: String,
    /// The service instance's id (unique per agent).
    pub id: String,
    /// `Service.Address`, or the node's address when the service has none.
    pub address: String,
    /// `Service.Port`.
    pub port: u16,
    /// `Service.Tags` (the warm ComfyUI is tagged with its GPU's UUID).
    pub tags: Vec<String>,
    /// `Service.Meta`.
    pub meta: BTreeMap<String, String>,
}

impl ServiceInstance {
    /// `http://address:port` (or `https` when the service's meta says
    /// `scheme = "https"`), with IPv6 addresses in brackets.
    pub fn base_url(&self) -> String {
        let scheme = match self.meta.get("scheme").map(String::as_str) {
            Some("https") => "https",
            _ => "http",
        };
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("{scheme}://[{}]:{}", self.address, self.port)
        } else {
            format!("{scheme}://{}:{}", self.address, self.port)
        }
    }

    /// Whether one of the instance's tags names `wanted` (case-insensitive;
    /// a tag such as `gpu=GPU-1234…` counts too).
    pub fn has_tag_containing(&self, wanted: &str) -> bool {
        let wanted = wanted.to_ascii_lowercase();
        !wanted.is_empty() && self.tags.iter().any(|t| t.to_ascii_lowercase().contains(&wanted))
    }
}

/// Why Consul could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// Transport failure: Consul is down or the address is wrong.
    #[error("cannot reach Consul at {addr}: {source} (check CONSUL_HTTP_ADDR)")]
    Unreachable { addr: String, source: reqwest::Error },
    /// Consul answered with an error status (403: the token lacks `service:read`).
    #[error("Consul at {addr} answered {status} to {path}: {body} (check CONSUL_HTTP_TOKEN when 403)")]
    Status { addr: String, path: String, status: u16, body: String },
    /// Consul answered something that is not a health listing.
    #[error("Consul at {addr} sent an unreadable answer to {path}: {reason}")]
    Decode { addr: String, path: String, reason: String },
}

/// A small Consul HTTP API client.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    addr: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ConsulClient {
    /// A client for the agent at `addr` (`http://127.0.0.1:8500`; a bare
    /// `host:port` gets `http://`), sending `token` as `X-Consul-Token`.
    pub fn new(addr: &str, token: Option<String>) -> ConsulClient {
        let addr = addr.trim_end_matches('/');
        let addr = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        ConsulClient { addr, token: token.filter(|t| !t.is_empty()), http }
    }

    /// The agent's address as used.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The instances of `service` whose health checks all pass, optionally
    /// only those tagged `tag`. An unknown service is an empty list.
    pub async fn healthy(
        &self,
        service: &str,
        tag: Option<&str>,
    ) -> Result<Vec<ServiceInstance>, ConsulError> {
        let mut path = format!("/v1/health/service/{}?passing=true", urlencoding::encode(service));
        if let Some(tag) = tag {
            path.push_str("&tag=");
            path.push_str(&urlencoding::encode(tag));
        }
        let body = self.get(&path).await?;
        decode_health(&body).map_err(|reason| ConsulError::Decode { addr: self.addr.clone(), path, reason })
    }

    /// Whether Consul answers and has a leader.
    pub async fn reachable(&self) -> bool {
        match self.get("/v1/status/leader").await {
            // An agent without a leader answers `""`.
            Ok(body) => serde_json::from_str::<String>(&body).is_ok_and(|l| !l.is_empty()),
            Err(e) => {
                tracing::debug!(error = %e, "consul not reachable");
                false
            }
        }
    }

    async fn get(&self, path: &str) -> Result<String, ConsulError> {
        let mut req = self.http.get(format!("{}{path}", self.addr));
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        let unreachable = |source| ConsulError::Unreachable { addr: self.addr.clone(), source };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let body = resp.text().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(ConsulError::Status {
                addr: self.addr.clone(),
                path: path.to_string(),
                status: status.as_u16(),
                body: one_line(&body),
            });
        }
        Ok(body)
    }
}

/// The first line of `text`, shortened, for error messages.
fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    let mut out: String = line.chars().take(200).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(default)]
    node: String,
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

/// Decodes the body of `GET /v1/health/service/<name>`.
fn decode_health(body: &str) -> Result<Vec<ServiceInstance>, String> {
    let entries: Vec<HealthEntry> = serde_json::from_str(body).map_err(|e| e.to_string())?;
    Ok(entries
        .into_iter()
        .map(|e| ServiceInstance {
            node: e.node.node,
            id: e.service.id,
            address: if e.service.address.is_empty() { e.node.address } else { e.service.address },
            port: e.service.port,
            tags: e.service.tags.unwrap_or_default(),
            meta: e.service.meta.unwrap_or_default(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Consul's documented `/v1/health/service/<name>` answer:
    /// one instance with its own address, one that inherits the node's.
    const SAMPLE: &str = r#"[
      {
        "Node": {
          "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
          "Node": "verda-h100",
          "Address": "10.1.10.12",
          "Datacenter": "dc1",
          "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
          "Meta": {"instance_type": "t2.medium"},
          "CreateIndex": 10,
          "ModifyIndex": 10
        },
        "Service": {
          "ID": "comfyui-0",
          "Service": "comfyui",
          "Tags": ["gpu", "GPU-8f3c2a1e-0000-1111-2222-333344445555"],
          "Address": "10.1.10.13",
          "TaggedAddresses": {
            "lan": {"address": "10.1.10.13", "port": 8188},
            "wan": {"address": "198.18.0.53", "port": 80}
          },
          "Meta": {"comfyui_version": "0.3.64"},
          "Port": 8188,
          "Weights": {"Passing": 10, "Warning": 1},
          "EnableTagOverride": false,
          "Namespace": "default",
          "CreateIndex": 12,
          "ModifyIndex": 12
        },
        "Checks": [
          {
            "Node": "verda-h100",
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Namespace": "default"
          },
          {
            "Node": "verda-h100",
            "CheckID": "service:comfyui-0",
            "Name": "comfyui http",
            "Status": "passing",
            "Notes": "",
            "Output": "HTTP GET http://10.1.10.13:8188/system_stats: 200 OK",
            "ServiceID": "comfyui-0",
            "ServiceName": "comfyui",
            "ServiceTags": ["gpu"],
            "Namespace": "default"
          }
        ]
      },
      {
        "Node": {"ID": "", "Node": "vps", "Address": "10.1.10.2", "Datacenter": "dc1",
                 "TaggedAddresses": null, "Meta": null, "CreateIndex": 5, "ModifyIndex": 5},
        "Service": {"ID": "comfyui-1", "Service": "comfyui", "Tags": null, "Address": "",
                    "Meta": null, "Port": 8189, "Weights": {"Passing": 1, "Warning": 1}},
        "Checks": []
      }
    ]"#;

    #[test]
    fn decodes_a_health_listing() {
        let instances = decode_health(SAMPLE).unwrap();
        assert_eq!(instances.len(), 2);
        let a = &instances[0];
        assert_eq!(a.node, "verda-h100");
        assert_eq!(a.id, "comfyui-0");
        assert_eq!(a.address, "10.1.10.13");
        assert_eq!(a.port, 8188);
        assert_eq!(a.base_url(), "http://10.1.10.13:8188");
        assert_eq!(a.meta.get("comfyui_version").map(String::as_str), Some("0.3.64"));
        assert!(a.has_tag_containing("gpu-8f3c2a1e-0000-1111-2222-333344445555"));
        assert!(!a.has_tag_containing("GPU-ffff"));
        // No service address: the node's is used; null tags and meta are empty.
        let b = &instances[1];
        assert_eq!(b.address, "10.1.10.2");
        assert_eq!(b.base_url(), "http://10.1.10.2:8189");
        assert!(b.tags.is_empty() && b.meta.is_empty());
    }

    #[test]
    fn empty_and_bad_listings() {
        assert!(decode_health("[]").unwrap().is_empty());
        assert!(decode_health("{\"not\": \"a list\"}").is_err());
    }

    #[test]
    fn urls_for_ipv6_and_https() {
        let mut i = ServiceInstance {
            node: "n".into(),
            id: "g".into(),
            address: "fd00::1".into(),
            port: 8080,
            tags: vec![],
            meta: BTreeMap::new(),
        };
        assert_eq!(i.base_url(), "http://[fd00::1]:8080");
        i.meta.insert("scheme".into(), "https".into());
        i.address = "gw.example".into();
        assert_eq!(i.base_url(), "https://gw.example:8080");
    }

    #[test]
    fn addr_gets_a_scheme() {
        assert_eq!(ConsulClient::new("127.0.0.1:8500", None).addr(), "http://127.0.0.1:8500");
        assert_eq!(ConsulClient::new("https://c:8501/", None).addr(), "https://c:8501");
    }

    #[tokio::test]
    async fn unreachable_consul_is_a_typed_error() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let c = ConsulClient::new(&format!("http://127.0.0.1:{port}"), Some(String::new()));
        assert!(!c.reachable().await);
        let err = c.healthy("comfyui", Some("x")).await.unwrap_err();
        assert!(matches!(err, ConsulError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("CONSUL_HTTP_ADDR"), "{err}");
    }
}
