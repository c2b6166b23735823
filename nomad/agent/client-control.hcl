# Client half of the Nomad agent on the Hetzner VPS: node pool `control`,
# where Redis, the gateway and the dispatcher run (as `exec` tasks).
#
# Install as /etc/nomad.d/client.hcl next to server.hcl (one agent, both
# roles; data_dir, TLS, ACL and Consul settings are in server.hcl). The
# in-process client talks to the local server directly, so no `servers` here.
#
# Host directories (create them before the jobs run; owners as listed):
#
#   /srv/comfy-multi/data     comfy-multi:comfy-multi 0750  gateway DATA_DIR (outputs, secrets/access-codes.txt)
#   /srv/comfy-multi/redis    redis:redis             0750  Redis AOF
#   /etc/comfy-multi/tls      root:comfy-multi        0750  fullchain.pem (0644), privkey.pem (0640): the gateway's certificate
#   /opt/comfy-multi/bin      root:root               0755  gateway, dispatcher binaries

client {
  enabled   = true
  node_pool = "control"

  host_volume "comfy-data" {
    path      = "/srv/comfy-multi/data"
    read_only = false
  }

  host_volume "redis-data" {
    path      = "/srv/comfy-multi/redis"
    read_only = false
  }

  host_volume "comfy-tls" {
    path      = "/etc/comfy-multi/tls"
    read_only = true
  }

  # What the exec driver copies into each task's chroot: Nomad's defaults plus
  # /opt/comfy-multi, where the gateway and dispatcher binaries live. (Setting
  # chroot_env replaces the default list, so the defaults are repeated.)
  # Written as a map attribute, which Nomad's config parser reads like the
  # block form of its docs and which is also plain HCL2.
  chroot_env = {
    "/bin"                 = "/bin"
    "/etc"                 = "/etc"
    "/lib"                 = "/lib"
    "/lib32"               = "/lib32"
    "/lib64"               = "/lib64"
    "/run/resolvconf"      = "/run/resolvconf"
    "/run/systemd/resolve" = "/run/systemd/resolve"
    "/sbin"                = "/sbin"
    "/usr"                 = "/usr"
    "/opt/comfy-multi"     = "/opt/comfy-multi"
  }

  # Left for the OS, Consul and the Nomad agent itself on a small VPS.
  reserved {
    cpu    = 500
    memory = 768
  }
}

# Everything on the control node runs isolated; raw_exec stays off here.
plugin "raw_exec" {
  config {
    enabled = false
  }
}

# `exec`'s default allow_caps include net_bind_service, which the gateway
# adds (cap_add) to bind 443 as an unprivileged user.
plugin "exec" {
  config {
    default_pid_mode = "private"
    default_ipc_mode = "private"
  }
}
