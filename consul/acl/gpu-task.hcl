# Policy for gpu-task's token (CONSUL_HTTP_TOKEN in the comfy-workflow task).
#
# gpu-task calls GET /v1/health/service/comfyui?passing=true and
# GET /v1/health/service/comfy-gateway?passing=true (dispatcher::consul).
# Health results are filtered by service read AND node read, hence node_prefix.
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
