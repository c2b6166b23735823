# Fallback: the warm ComfyUI as a Consul service, for a GPU node where ComfyUI
# runs under systemd instead of as the Nomad `comfyui` job. With Nomad running
# ComfyUI, do NOT use this file: Nomad registers the service itself.
#
# gpu-task finds ComfyUI as the passing `comfyui` instance tagged with the
# UUID of the GPU Nomad leased to it (NVIDIA_VISIBLE_DEVICES, as `nvidia-smi -L`
# prints it, e.g. GPU-5f3c9a4e-...). Tag matching is case-insensitive and
# accepts a tag that contains the UUID (here `gpu=GPU-...`, as the Nomad job
# tags its instances).
#
# Before registering, replace GPU-UUID-OF-THIS-GPU with the real UUID and
# register it once through the API with a token holding the `comfyui` policy
# (the agent keeps the service and its token in its data dir):
#   uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i 0)
#   sed "s/GPU-UUID-OF-THIS-GPU/$uuid/" consul/services/comfyui.hcl > /tmp/comfyui-service.hcl
#   CONSUL_HTTP_TOKEN=<comfyui token> consul services register /tmp/comfyui-service.hcl
# (Dropping the file into /etc/consul.d/ works too, but then the agent
# registers it with its `acl.tokens.default`, which would need the policy.)
# With several GPUs, make one copy per GPU with its own id, port and tags.
service {
  id   = "comfyui-0"
  name = "comfyui"
  # ComfyUI has no authentication: like the Nomad job, keep it on loopback
  # (`--listen 127.0.0.1`); only gpu-task, on this node, talks to it.
  address = "127.0.0.1"
  port    = 8188
  # The same tags as nomad/comfyui.nomad.hcl gives its instances.
  tags = ["gpu=GPU-UUID-OF-THIS-GPU", "gpu-index=0"]
  meta = {
    runner = "systemd"
  }

  # ComfyUI answers /system_stats once it is up (devices, VRAM); a ComfyUI
  # that is still starting fails the check and gets no work.
  check {
    id       = "comfyui-0-http"
    name     = "ComfyUI /system_stats"
    http     = "http://127.0.0.1:8188/system_stats"
    method   = "GET"
    interval = "10s"
    timeout  = "5s"
    # A ComfyUI gone for good disappears from the catalog.
    deregister_critical_service_after = "30m"
  }
}
