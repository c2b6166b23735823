# Policy for the Nomad client on the VPS (node pool "control"), in addition
# to nomad-server on the same agent token.
#
# It registers `nomad-client` and the services of the control jobs: `redis`
# and `comfy-gateway` (and any further control service named `comfy-…`, e.g.
# a dispatcher service). It may not write `comfyui` (note: "comfyui" does not
# start with "comfy-"), which only GPU nodes announce.
# Consul 1.8 rule syntax.
agent_prefix "" {
  policy = "read"
}

node_prefix "" {
  policy = "read"
}

service "nomad-client" {
  policy = "write"
}

service "redis" {
  policy = "write"
}

service_prefix "comfy-" {
  policy = "write"
}

service_prefix "" {
  policy = "read"
}
