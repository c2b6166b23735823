//! Finding the warm ComfyUI and the gateway.
//!
//! A dispatched job lands on whichever GPU Nomad leased to it; the matching
//! ComfyUI is the `comfyui` Consul service instance tagged with that GPU's
//! UUID (from `NVIDIA_VISIBLE_DEVICES`). The gateway is the `comfy-gateway`
//! service. `COMFYUI_URL` and `GATEWAY_URL` override Consul (the local stack,
//! tests, a machine without Consul).

use dispatcher::consul::{ConsulClient, ConsulError, ServiceInstance};
use dispatcher::contract::{CONSUL_COMFYUI_SERVICE, CONSUL_GATEWAY_SERVICE};

use crate::env::TaskEnv;
use crate::retry::Backoff;

/// Why a service could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("{0}; or set {1}")]
    Consul(ConsulError, &'static str),
    #[error("Consul at {addr} knows no passing `{service}` service; start it, or set {var}")]
    NoInstance { service: &'static str, addr: String, var: &'static str },
}

impl DiscoverError {
    fn is_transient(&self) -> bool {
        match self {
            DiscoverError::Consul(ConsulError::Status { status, .. }, _) => *status >= 500,
            DiscoverError::Consul(ConsulError::Decode { .. }, _) => false,
            _ => true,
        }
    }
}

/// ComfyUI's base URL.
pub async fn comfyui(env: &TaskEnv, consul: &ConsulClient) -> Result<String, DiscoverError> {
    if let Some(url) = &env.comfyui_url {
        return Ok(url.clone());
    }
    let instance = Backoff::QUICK
        .run("finding ComfyUI in Consul", DiscoverError::is_transient, || async {
            let instances = consul
                .healthy(CONSUL_COMFYUI_SERVICE, None)
                .await
                .map_err(|e| DiscoverError::Consul(e, "COMFYUI_URL"))?;
            pick_comfyui(&instances, &env.gpu_uuids).cloned().ok_or_else(|| DiscoverError::NoInstance {
                service: CONSUL_COMFYUI_SERVICE,
                addr: consul.addr().to_string(),
                var: "COMFYUI_URL",
            })
        })
        .await?;
    tracing::info!(node = %instance.node, id = %instance.id, url = %instance.base_url(), "found ComfyUI in Consul");
    Ok(instance.base_url())
}

/// The gateway's base URL.
pub async fn gateway(env: &TaskEnv, consul: &ConsulClient) -> Result<String, DiscoverError> {
    if let Some(url) = &env.gateway_url {
        return Ok(url.clone());
    }
    let instance = Backoff::QUICK
        .run("finding the gateway in Consul", DiscoverError::is_transient, || async {
            let instances = consul
                .healthy(CONSUL_GATEWAY_SERVICE, None)
                .await
                .map_err(|e| DiscoverError::Consul(e, "GATEWAY_URL"))?;
            instances.into_iter().next().ok_or_else(|| DiscoverError::NoInstance {
                service: CONSUL_GATEWAY_SERVICE,
                addr: consul.addr().to_string(),
                var: "GATEWAY_URL",
            })
        })
        .await?;
    Ok(instance.base_url())
}

/// The ComfyUI instance serving one of `gpu_uuids`; when none is tagged with
/// them (or no GPU is named), the first passing instance.
pub fn pick_comfyui<'a>(
    instances: &'a [ServiceInstance],
    gpu_uuids: &[String],
) -> Option<&'a ServiceInstance> {
    let matching = gpu_uuids.iter().find_map(|uuid| instances.iter().find(|i| i.has_tag_containing(uuid)));
    if matching.is_none() && !gpu_uuids.is_empty() && !instances.is_empty() {
        tracing::warn!(
            gpus = ?gpu_uuids,
            "no comfyui instance is tagged with this job's GPU; using the first passing one"
        );
    }
    matching.or_else(|| instances.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, tags: &[&str]) -> ServiceInstance {
        ServiceInstance {
            node: "gpu".into(),
            id: id.into(),
            address: "10.0.0.5".into(),
            port: 8188,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: Default::default(),
        }
    }

    #[test]
    fn prefers_the_instance_of_the_leased_gpu() {
        let all = [instance("a", &["GPU-aaaa"]), instance("b", &["gpu", "GPU-bbbb"])];
        assert_eq!(pick_comfyui(&all, &["GPU-bbbb".into()]).unwrap().id, "b");
        assert_eq!(pick_comfyui(&all, &["gpu-BBBB".into()]).unwrap().id, "b");
        // Unknown GPU or none named: the first one.
        assert_eq!(pick_comfyui(&all, &["GPU-cccc".into()]).unwrap().id, "a");
        assert_eq!(pick_comfyui(&all, &[]).unwrap().id, "a");
        assert!(pick_comfyui(&[], &[]).is_none());
    }

    #[tokio::test]
    async fn overrides_skip_consul() {
        let env = TaskEnv::from_lookup(|k| match k {
            "NOMAD_META_job_id" => Some("j".into()),
            "NOMAD_META_user_id" => Some("1".into()),
            "COMFYUI_URL" => Some("http://comfy:8188".into()),
            "GATEWAY_URL" => Some("http://gw:8080".into()),
            _ => None,
        })
        .unwrap();
        // A Consul that does not exist: never asked.
        let consul = ConsulClient::new("http://127.0.0.1:9", None);
        assert_eq!(comfyui(&env, &consul).await.unwrap(), "http://comfy:8188");
        assert_eq!(gateway(&env, &consul).await.unwrap(), "http://gw:8080");
    }
}
