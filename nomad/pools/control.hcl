# Node pool of the always-on VPS: Redis, the gateway, the dispatcher.
# Jobs can only be registered into a pool that exists; clients create their
# pool when they join, but apply it up front so the order does not matter:
#   nomad node pool apply nomad/pools/control.hcl
node_pool "control" {
  description = "comfy-multi control plane on the VPS: redis, gateway, dispatcher"
}
