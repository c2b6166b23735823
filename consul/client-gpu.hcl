# Consul client on the rented GPU node (Consul 1.8.7: every key here exists in 1.8).
#
# Install as /etc/consul.d/consul.hcl. Next to it, generated per rental and
# never committed (`consul/README.md` shows how each one is made):
#
#   /etc/consul.d/gossip.hcl          copy of the VPS's gossip.hcl (`encrypt = "..."`)
#   /etc/consul.d/tls.hcl             `ca_file = "/etc/consul.d/tls/consul-agent-ca.pem"`
#   /etc/consul.d/tls/consul-agent-ca.pem
#                                     the CA certificate only (never the CA key,
#                                     never a server certificate)
#   /etc/consul.d/join.hcl            written by gpu-up.sh: where the VPS is,
#                                       retry_join = ["<VPS address>"]
#                                     and, only when the node sits behind NAT,
#                                       advertise_addr = "<its public address>"
#   /etc/consul.d/acl-tokens.hcl      REQUIRED before the first start, mode 0600,
#                                     written by gpu-up.sh:
#                                       acl { tokens { agent = "<secret>" } }
#                                     auto_encrypt asks the server for this
#                                     node's certificate with the agent token
#                                     (it needs node:write, policy consul-agent)
#                                     before the HTTP API is up, so
#                                     `consul acl set-agent-token` comes too late:
#                                     without the file the agent retries forever
#                                     ("AutoEncrypt.Sign ... Permission denied").
#
# gen-secrets.sh puts gossip.hcl, tls.hcl and tls/consul-agent-ca.pem for this
# node under <secrets dir>/gpu-node/ on the VPS; copy that folder's content here.
# There is deliberately no `retry_join` in this file: the VPS address is not
# part of the repository.

datacenter = "comfy"
data_dir   = "/var/lib/consul"
log_level  = "INFO"

server = false

# The IPv4 address of the interface with the default route. join.hcl may set
# advertise_addr when that address is not reachable from the VPS (NAT).
bind_addr = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"
# HTTP API and DNS for local processes only: Nomad, the warm ComfyUI's
# registration, and gpu-task (raw_exec, CONSUL_HTTP_ADDR=127.0.0.1:8500).
client_addr = "127.0.0.1"

ports {
  http = 8500
  dns  = 8600
}

# Keep trying the server for as long as the node lives (the VPS may restart).
retry_interval = "15s"
retry_max      = 0

# Leave the cluster cleanly when the node is drained and torn down, so the
# server does not keep a failed member around.
leave_on_terminate = true

# --- Gossip encryption: `encrypt` comes from gossip.hcl ----------------------
encrypt_verify_incoming = true
encrypt_verify_outgoing = true

# --- TLS ---------------------------------------------------------------------
# The client holds only the CA certificate; its own certificate is issued by
# the server at start (auto_encrypt). It verifies that it talks to a real
# server of this datacenter (server.comfy.consul in the server certificate).
verify_incoming        = false
verify_outgoing        = true
verify_server_hostname = true
ca_file                = "/etc/consul.d/tls/consul-agent-ca.pem"

auto_encrypt {
  tls = true
}

# --- ACLs --------------------------------------------------------------------
# The agent token comes from the generated acl-tokens.hcl (see the top: it
# must be there at start). Tokens set later with `consul acl set-agent-token`
# are kept in data_dir (enable_token_persistence) and win over the file.
# Local programs pass their own token: Nomad in its consul block, gpu-task
# with CONSUL_HTTP_TOKEN.
primary_datacenter = "comfy"
acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
}
