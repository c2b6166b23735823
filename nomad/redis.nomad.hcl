# redis: the jobs and the queue, on the control node (the VPS).
#
# redis-server comes from the Debian package (`apt-get install redis-server`);
# stop the package's own service first so it does not hold the port:
#   systemctl disable --now redis-server
#   nomad job run nomad/redis.nomad.hcl
#
# Durability: append-only file on, fsync every second (at most one second of
# writes lost on a power cut), in the `redis-data` host volume
# (client-control.hcl), so it outlives the allocation.
#
# Redis listens on loopback only and registers 127.0.0.1 in Consul: its only
# clients, the gateway and the dispatcher, run on this node and read the
# address from Consul (`{{ range service "redis" }}`). Nothing else can reach
# it, so it has no password.

variable "datacenters" {
  type        = list(string)
  default     = ["*"]
  description = "Datacenters Redis may run in."
}

variable "node_pool" {
  type        = string
  default     = "control"
  description = "Node pool of the control node (client-control.hcl)."
}

variable "redis_command" {
  type        = string
  default     = "/usr/bin/redis-server"
  description = "redis-server from the Debian package (inside the exec chroot, which includes /usr)."
}

variable "user" {
  type        = string
  default     = "redis"
  description = "User Redis runs as (created by the Debian package); owns the redis-data directory."
}

variable "bind_address" {
  type        = string
  default     = "127.0.0.1"
  description = "Address Redis binds to and registers in Consul; loopback, as only local jobs use it."
}

variable "port" {
  type        = number
  default     = 6379
  description = "Redis port (static, so REDIS_URL stays the same across restarts)."
}

variable "cpu" {
  type        = number
  default     = 300
  description = "CPU reservation in MHz."
}

variable "memory_mb" {
  type        = number
  default     = 512
  description = "Memory limit in MiB (leaves room for the fork of an AOF rewrite)."
}

job "redis" {
  type        = "service"
  datacenters = var.datacenters
  node_pool   = var.node_pool

  group "redis" {
    count = 1

    network {
      port "redis" {
        static = var.port
      }
    }

    volume "data" {
      type      = "host"
      source    = "redis-data"
      read_only = false
    }

    restart {
      attempts = 10
      interval = "10m"
      delay    = "5s"
      mode     = "delay"
    }

    task "redis" {
      driver = "exec"
      user   = var.user
      # SIGTERM: Redis flushes the AOF and exits.
      kill_timeout = "30s"

      config {
        command = var.redis_command
        args = [
          "--bind", var.bind_address,
          "--port", "${NOMAD_PORT_redis}",
          "--dir", "/data",
          "--appendonly", "yes",
          "--appendfsync", "always",
          "--protected-mode", "yes",
          "--daemonize", "no",
        ]
      }

      volume_mount {
        volume      = "data"
        destination = "/data"
      }

      service {
        name     = "redis"
        provider = "consul"
        port     = "redis"
        address  = var.bind_address

        check {
          name     = "redis tcp"
          type     = "tcp"
          interval = "10s"
          timeout  = "2s"
        }
      }

      resources {
        cpu    = var.cpu
        memory = var.memory_mb
      }
    }
  }
}
