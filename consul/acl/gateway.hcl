# Policy for the gateway's token (CONSUL_HTTP_TOKEN / `consul.token`).
#
# Nomad registers `comfy-gateway` (with the nomad-control-client token), so
# the gateway writes nothing. It may read whether a warm ComfyUI is up (the
# instructor's view of the GPU side) and its own registration. Node read is
# needed because health queries return only instances whose node the token
# may read. Today the gateway makes no Consul call; the token is optional.
# Consul 1.8 rule syntax.
service "comfyui" {
  policy = "read"
}

service "comfy-gateway" {
  policy = "read"
}

node_prefix "" {
  policy = "read"
}
