# Node pool of the rented GPU node(s): the warm ComfyUI and comfy-workflow.
# It must exist before comfy-workflow and comfyui are registered, which is
# usually before any GPU node has joined:
#   nomad node pool apply nomad/pools/gpu.hcl
node_pool "gpu" {
  description = "comfy-multi GPU nodes (nvidia device plugin): comfyui, comfy-workflow"
}
