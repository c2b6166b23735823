# Consul server on the Hetzner VPS (Consul 1.8.7: every key here exists in 1.8).
#
# Install as /etc/consul.d/consul.hcl next to what `consul/gen-secrets.sh`
# generates there:
#
#   /etc/consul.d/consul.hcl     this file
#   /etc/consul.d/gossip.hcl     `encrypt = "<gossip key>"` (mode 0600, never in git)
#   /etc/consul.d/tls.hcl        ca_file / cert_file / key_file of this server
#                                (the same paths as below; it only matters when
#                                the secrets live somewhere else)
#   /etc/consul.d/tls/           consul-agent-ca.pem, server.pem, server-key.pem, ...
#
# and start it with `consul agent -config-dir=/etc/consul.d`; the agent loads
# every *.hcl of that directory in lexical order (later files win for single
# values). Check the set with `consul validate /etc/consul.d`.
#
# The GPU node joins this server over the public Internet: open TCP 8300
# (server RPC, TLS) and TCP+UDP 8301 (LAN gossip, encrypted with the gossip
# key) to the GPU node's address only. The HTTP API (8500) and DNS (8600)
# stay on loopback; reach the UI with `ssh -L 8500:127.0.0.1:8500 vps`.

datacenter = "comfy"
data_dir   = "/var/lib/consul"
log_level  = "INFO"

server           = true
bootstrap_expect = 1
ui               = true

# go-sockaddr templates, evaluated on the host at start: the IPv4 address of
# the interface holding the default route (on a Hetzner VPS: the public
# address). With a WireGuard link instead, use "{{ GetInterfaceIP \"wg0\" }}".
bind_addr      = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"
advertise_addr = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"
# HTTP API, DNS and UI only for local processes (Nomad, the CLI, ssh -L).
client_addr = "127.0.0.1"

ports {
  http  = 8500
  https = 8501
  dns   = 8600
}

# --- Gossip encryption -------------------------------------------------------
# `encrypt` is NOT here: gen-secrets.sh writes it into /etc/consul.d/gossip.hcl.
encrypt_verify_incoming = true
encrypt_verify_outgoing = true

# --- TLS for RPC and HTTPS ---------------------------------------------------
# Consul 1.8 takes these as top-level keys (the `tls { }` block is 1.12+).
verify_incoming        = true
verify_outgoing        = true
verify_server_hostname = true
ca_file                = "/etc/consul.d/tls/consul-agent-ca.pem"
cert_file              = "/etc/consul.d/tls/server.pem"
key_file               = "/etc/consul.d/tls/server-key.pem"

# Clients (the GPU node) get their certificate from this server at start, so
# no client key has to be copied to a rented machine. auto_encrypt signs with
# the Connect CA: Connect is on by default on 1.8 servers, set explicitly
# because auto_encrypt depends on it. A client must present an agent token
# with node:write for that request (see client-gpu.hcl).
auto_encrypt {
  allow_tls = true
}
connect {
  enabled = true
}

# --- ACLs --------------------------------------------------------------------
# Bootstrap once with `consul acl bootstrap` (see consul/README.md). The agent
# token is set at run time with `consul acl set-agent-token agent <secret>`;
# enable_token_persistence keeps it in data_dir across restarts, so no token
# is ever written into a config file.
primary_datacenter = "comfy"
acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
}

performance {
  raft_multiplier = 1
}
