# Policy for the Nomad client on a GPU node (its `consul { token = ... }`).
#
# It registers its own `nomad-client` service and the services of the jobs it
# runs there: the warm `comfyui` (one instance per GPU, tagged with the GPU
# UUID). It may NOT write `comfy-gateway`: a rented machine must not be able to
# announce a fake gateway that gpu-task would upload outputs to.
# The dispatched comfy-workflow children register no service.
# Nomad also reads the agent (fingerprinting), nodes and services.
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

service "comfyui" {
  policy = "write"
}

service_prefix "" {
  policy = "read"
}
