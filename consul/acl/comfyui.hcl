# Policy for registering the warm ComfyUI by hand on a GPU node where it runs
# under systemd instead of Nomad (consul/services/comfyui.hcl, registered with
# `consul services register -token ...`). Not needed when Nomad runs ComfyUI:
# then the GPU node's nomad-client token registers it.
# Consul 1.8 rule syntax.
service "comfyui" {
  policy = "write"
}
