# Nomad client on the rented Verda GPU node: node pool `gpu`, the NVIDIA device
# plugin, the warm ComfyUI (nomad/comfyui.nomad.hcl) and the dispatched
# comfy-workflow jobs (both raw_exec).
#
# Install as /etc/nomad.d/client.hcl. Next to it, made per rental and never
# committed (mode 0600, root):
#
#   /etc/nomad.d/tls/nomad-agent-ca.pem             the CA certificate (never the CA key)
#   /etc/nomad.d/tls/global-client-nomad.pem        client certificate and key, made on the VPS
#   /etc/nomad.d/tls/global-client-nomad-key.pem    with `nomad tls cert create -client`
#   /etc/nomad.d/consul.hcl                         consul { token = "<Consul token of the Nomad agents>" }
#   /etc/nomad.d/gpu-meta.hcl                       the GPU UUIDs, see "GPU UUIDs" below
#   /etc/nomad.d/join.hcl                           optional: client { server_join { retry_join = ["<VPS>:4647"] } }
#                                                   (without it the server is found through Consul, service `nomad`)
#
# and the plugin binary /opt/nomad/plugins/nomad-device-nvidia (Packer image).
#
# GPU UUIDs
# ---------
# comfyui.nomad.hcl runs one ComfyUI per GPU and tags it in Consul with the
# GPU's UUID, read from this node's client meta gpu_uuid_0, gpu_uuid_1, ...
# Write them at boot, before Nomad starts, from the driver itself:
#
#   nvidia-smi --query-gpu=index,uuid --format=csv,noheader |
#     awk -F', *' 'BEGIN { print "client {\n  meta {" }
#                  { printf "    gpu_uuid_%s = \"%s\"\n", $1, $2 }
#                  END { print "  }\n}" }' >/etc/nomad.d/gpu-meta.hcl
#
# (client meta from several files merges key by key). The UUIDs are the same
# strings the nvidia device plugin uses as device IDs, so they equal what a
# comfy-workflow allocation finds in NVIDIA_VISIBLE_DEVICES. On a node that is
# already running, `nomad node meta apply gpu_uuid_0=GPU-…` does the same
# without a restart.
#
# Directories (packer/scripts/comfyui.sh creates them): /opt/comfyui/models
# (root-owned, filled by packer/scripts/models.sh; ComfyUI only reads it) and
# /opt/comfyui/output (owned by the `comfyui` user ComfyUI runs as).

datacenter = "comfy"
region     = "global"
data_dir   = "/opt/nomad/data"
plugin_dir = "/opt/nomad/plugins"
log_level  = "INFO"

bind_addr = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"

addresses {
  # Local CLI only; the server reaches this client over its RPC connection.
  http = "127.0.0.1"
}

advertise {
  http = "127.0.0.1"
  rpc  = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"
}

# On SIGTERM (machine shutdown after `dispatcher drain`) leave gracefully
# instead of just vanishing.
leave_on_terminate = true

client {
  enabled   = true
  node_pool = "gpu"

  host_volume "comfyui-models" {
    path      = "/opt/comfyui/models"
    read_only = true
  }

  host_volume "comfyui-output" {
    path      = "/opt/comfyui/output"
    read_only = false
  }

  # Static meta: marks the node as a comfy-multi GPU node. The per-GPU keys
  # gpu_uuid_<index> (what ComfyUI and its Consul tag are pinned to) come
  # from the generated gpu-meta.hcl, see above.
  meta {
    comfy_multi_role = "gpu"
  }

  # Left for the OS, Consul and the Nomad agent.
  reserved {
    cpu    = 1000
    memory = 2048
  }
}

# ComfyUI and gpu-task run unisolated: ComfyUI uses its GPU without a Nomad
# device reservation (the workflow's reservation is the lease), which the
# isolated drivers would not let it open.
plugin "raw_exec" {
  config {
    enabled = true
  }
}

plugin "nomad-device-nvidia" {
  config {
    enabled            = true
    fingerprint_period = "1m"
  }
}

acl {
  enabled = true
}

# Mutual TLS to the server's RPC port; the server certificate must name
# server.global.nomad.
tls {
  http = false
  rpc  = true

  ca_file   = "/etc/nomad.d/tls/nomad-agent-ca.pem"
  cert_file = "/etc/nomad.d/tls/global-client-nomad.pem"
  key_file  = "/etc/nomad.d/tls/global-client-nomad-key.pem"

  verify_server_hostname = true
  verify_https_client    = false
}

# The local Consul client (consul/client-gpu.hcl): HTTP on loopback. Nomad
# registers ComfyUI there and finds the server through it.
consul {
  address          = "127.0.0.1:8500"
  client_auto_join = true
}
