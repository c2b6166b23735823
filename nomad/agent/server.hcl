# Nomad agent on the Hetzner VPS: the (only) server. The same agent is also
# the client of node pool `control` (client-control.hcl).
#
# Install as /etc/nomad.d/server.hcl, next to client-control.hcl and what is
# generated on the VPS (never committed, mode 0600, owned by root):
#
#   /etc/nomad.d/gossip.hcl        server { encrypt = "<nomad operator gossip keyring generate>" }
#   /etc/nomad.d/consul.hcl        consul { token = "<Consul token of the Nomad agents>" }
#   /etc/nomad.d/tls/              nomad-agent-ca.pem, nomad-agent-ca-key.pem (stays here),
#                                  global-server-nomad.pem, global-server-nomad-key.pem,
#                                  global-client-nomad.pem, global-client-nomad-key.pem (for the GPU node)
#
# (`nomad tls ca create`, `nomad tls cert create -server -region global`,
# `nomad tls cert create -client`: nomad/README.md has the commands.)
# Start it with `nomad agent -config /etc/nomad.d`: every *.hcl / *.json of
# the directory is loaded and merged (maps such as meta merge key by key).
#
# Network: only the RPC port 4647 is reached from outside, by the GPU node,
# over mutual TLS; open it to the GPU node's address only. The HTTP API (4646)
# listens on loopback: use the CLI on the VPS or `ssh -L 4646:127.0.0.1:4646`.
# With a single server, Serf (4648) needs no firewall opening.

datacenter = "comfy"
region     = "global"
data_dir   = "/opt/nomad/data"  # packer/scripts/nomad.sh creates it
log_level  = "INFO"

# The IPv4 address of the interface with the default route (the VPS's public
# address). With a WireGuard link instead: "{{ GetInterfaceIP \"wg0\" }}".
bind_addr = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"

addresses {
  # Jobs on this node (dispatcher, gateway) and the CLI reach it on loopback.
  http = "127.0.0.1"
}

advertise {
  # Nomad refuses to derive a loopback advertise address by itself; say it.
  http = "127.0.0.1"
  rpc  = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"
  serf = "{{ GetDefaultInterfaces | exclude \"type\" \"IPv6\" | attr \"address\" }}"
}

server {
  enabled          = true
  bootstrap_expect = 1

  # `encrypt` (the gossip key) is NOT here: it is in the generated gossip.hcl.

  # Applied once, when the cluster is first bootstrapped (afterwards:
  # `nomad operator scheduler set-config -memory-oversubscription=true`).
  # ComfyUI needs it: its memory_max = -1 (no hard limit) is only honoured
  # with memory oversubscription on.
  default_scheduler_config {
    scheduler_algorithm             = "binpack"
    memory_oversubscription_enabled = true
  }

  # Dispatched comfy-workflow children pile up (one per workflow); keep the
  # finished ones a day for `nomad job status`, then collect them.
  job_gc_threshold = "24h"
}

acl {
  enabled = true
}

# Mutual TLS for RPC: the GPU client must present a certificate signed by this
# CA, and the server's certificate must name server.global.nomad. The HTTP API
# stays plain because it only listens on loopback (see `addresses`).
tls {
  http = false
  rpc  = true

  ca_file   = "/etc/nomad.d/tls/nomad-agent-ca.pem"
  cert_file = "/etc/nomad.d/tls/global-server-nomad.pem"
  key_file  = "/etc/nomad.d/tls/global-server-nomad-key.pem"

  verify_server_hostname = true
  verify_https_client    = false
}

# Consul on this host (consul/server.hcl): HTTP on loopback. The Nomad agents'
# Consul token comes from the generated consul.hcl. Nomad registers itself as
# service `nomad`, which is how the GPU client finds this server.
consul {
  address          = "127.0.0.1:8500"
  auto_advertise   = true
  server_auto_join = true
  client_auto_join = true
}

ui {
  enabled = true
}

telemetry {
  publish_allocation_metrics = true
  publish_node_metrics       = true
}
