# gateway: the participants' ComfyUI API (HTTPS) and the internal API that
# gpu-task calls back, on the control node (the VPS).
#
# Before the first run (nomad/README.md has the whole sequence):
#   nomad var put nomad/jobs/gateway admin_token=@admin-token internal_secret=@internal-secret
#   nomad var put nomad/jobs/comfy-workflow internal_secret=@internal-secret
# (the SAME internal secret in both: gpu-task presents it, the gateway checks
# it), and a certificate for public_host in the comfy-tls host volume. Then:
#   nomad job run -var public_host=comfy.example.org nomad/gateway.nomad.hcl
#
# Secrets: ADMIN_TOKEN and INTERNAL_SECRET come only from the Nomad variable
# nomad/jobs/gateway, which this job's workload identity may read by default;
# they are rendered into secrets/ (not visible to other tasks) and never
# written into this file. The task does not start before the variable exists:
# otherwise the gateway would generate its own secrets into DATA_DIR/secrets/
# and gpu-task's would not match.
#
# TLS: the gateway terminates TLS itself (GATEWAY_TLS_CERT / GATEWAY_TLS_KEY).
# The certificate and key already exist on the host (e.g. copied there by a
# certbot deploy hook) in the directory of the `comfy-tls` host volume
# (client-control.hcl), mounted read-only at /tls. The gateway checks the
# pair before it serves (a bad file or a key that does not match stops the
# start, naming the file: `nomad alloc logs -stderr -job gateway`).
# Renewals: replace the two files on the host; the gateway watches them and
# serves the new certificate to new connections without a restart (open
# websockets stay). A renewal that does not load is logged and the old
# certificate kept. `nomad alloc signal -s SIGHUP <alloc id>` reloads too.
#
# Metrics: GET https://<public_host>/metrics (Prometheus text) with
# `Authorization: Bearer <admin token>`. Logs: stderr, JSON lines with
# log_format = "json" (`nomad alloc logs -stderr -job gateway | grep <job id>`).
#
# gpu-task finds the gateway through Consul service `comfy-gateway`. The
# instance is registered under public_host (the name in the certificate) with
# meta scheme=https, so gpu-task calls https://<public_host>:<port> and the
# certificate verifies. public_host must therefore resolve to the VPS from the
# GPU node and from the VPS itself (the health check dials it too).
#
# The driver is `exec` (chroot, cgroups, an unprivileged user, host volumes);
# the binary directory is in the chroot through chroot_env in
# client-control.hcl. CAP_NET_BIND_SERVICE lets the unprivileged user bind 443.

variable "datacenters" {
  type        = list(string)
  default     = ["*"]
  description = "Datacenters the gateway may run in."
}

variable "node_pool" {
  type        = string
  default     = "control"
  description = "Node pool of the control node (client-control.hcl)."
}

variable "gateway_command" {
  type        = string
  default     = "/opt/comfy-multi/bin/gateway"
  description = "Path of the gateway binary on the control node (its directory must be in client-control.hcl's chroot_env)."
}

variable "user" {
  type        = string
  default     = "comfy-multi"
  description = "Unprivileged system user the gateway runs as; owns the comfy-data directory and can read the comfy-tls files."
}

variable "public_host" {
  type        = string
  description = "DNS name participants (and gpu-task) use to reach the gateway; the TLS certificate must be valid for it. No default: every deployment has its own."
}

variable "listen_address" {
  type        = string
  default     = "0.0.0.0"
  description = "Address the gateway binds to (GATEWAY_LISTEN is <listen_address>:<port>)."
}

variable "port" {
  type        = number
  default     = 443
  description = "HTTPS port of the gateway (a static port reserved on the node)."
}

variable "participants" {
  type        = number
  default     = 20
  description = "Participants 1..N get an access code on first start (PARTICIPANTS)."
}

variable "tls_cert_file" {
  type        = string
  default     = "fullchain.pem"
  description = "Certificate chain file (PEM) inside the comfy-tls host volume."
}

variable "tls_key_file" {
  type        = string
  default     = "privkey.pem"
  description = "Private key file (PEM) inside the comfy-tls host volume."
}

variable "nomad_addr" {
  type        = string
  default     = "http://127.0.0.1:4646"
  description = "Nomad HTTP API as seen from the control node (NOMAD_ADDR); the agent's HTTP API listens on loopback only."
}

variable "consul_addr" {
  type        = string
  default     = "http://127.0.0.1:8500"
  description = "Consul HTTP API of the local agent (CONSUL_HTTP_ADDR)."
}

variable "log_filter" {
  type        = string
  default     = "info"
  description = "RUST_LOG filter for the gateway's logs (stderr, `nomad alloc logs -stderr`)."
}

variable "log_format" {
  type        = string
  default     = "text"
  description = "LOG_FORMAT: \"json\" for one JSON object per log line (with job_id and user_id on a job's lines), anything else for human-readable lines."
}

variable "cpu" {
  type        = number
  default     = 500
  description = "CPU reservation in MHz."
}

variable "memory_mb" {
  type        = number
  default     = 512
  description = "Memory limit in MiB (outputs are streamed to disk, not held in memory)."
}

job "gateway" {
  type        = "service"
  datacenters = var.datacenters
  node_pool   = var.node_pool

  group "gateway" {
    # One instance: the access codes and outputs live in one data directory.
    count = 1

    network {
      port "https" {
        static = var.port
      }
    }

    volume "data" {
      type      = "host"
      source    = "comfy-data"
      read_only = false
    }

    volume "tls" {
      type      = "host"
      source    = "comfy-tls"
      read_only = true
    }

    restart {
      attempts = 10
      interval = "10m"
      delay    = "10s"
      mode     = "delay"
    }

    task "gateway" {
      driver = "exec"
      user   = var.user

      config {
        command = var.gateway_command
        args    = ["serve"]
        cap_add = ["net_bind_service"]
      }

      volume_mount {
        volume      = "data"
        destination = "/data"
      }

      volume_mount {
        volume      = "tls"
        destination = "/tls"
        read_only   = true
      }

      env {
        GATEWAY_LISTEN   = "${var.listen_address}:${NOMAD_PORT_https}"
        GATEWAY_TLS_CERT = "/tls/${var.tls_cert_file}"
        GATEWAY_TLS_KEY  = "/tls/${var.tls_key_file}"
        DATA_DIR         = "/data"
        PARTICIPANTS     = var.participants
        NOMAD_ADDR       = var.nomad_addr
        CONSUL_HTTP_ADDR = var.consul_addr
        RUST_LOG         = var.log_filter
        LOG_FORMAT       = var.log_format
      }

      # ADMIN_TOKEN and INTERNAL_SECRET from the Nomad variable only. Until
      # the variable exists the task waits here (nomadVar blocks); a variable
      # without one of the two items fails the render (error_on_missing_key).
      # An optional item consul_token becomes CONSUL_HTTP_TOKEN.
      template {
        destination          = "secrets/gateway.env"
        env                  = true
        change_mode          = "restart"
        error_on_missing_key = true
        data                 = <<-EOT
        {{ with nomadVar "nomad/jobs/gateway" }}
        ADMIN_TOKEN={{ .admin_token }}
        INTERNAL_SECRET={{ .internal_secret }}
        {{ range .Tuples }}{{ if eq .K "consul_token" }}CONSUL_HTTP_TOKEN={{ .V }}{{ end }}{{ end }}
        {{ end }}
        EOT
      }

      # REDIS_URL from Consul: the healthy instance(s) of service `redis`.
      template {
        destination = "local/redis.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
        {{ range service "redis" }}
        REDIS_URL=redis://{{ .Address }}:{{ .Port }}
        {{ end }}
        EOT
      }

      service {
        name     = "comfy-gateway"
        provider = "consul"
        port     = "https"
        address  = var.public_host
        tags     = ["https"]

        meta {
          scheme = "https"
        }

        check {
          name     = "gateway /healthz"
          type     = "http"
          protocol = "https"
          path     = "/healthz"
          interval = "10s"
          timeout  = "3s"
          # With a custom service address Nomad points the check at it too:
          # Consul dials https://<public_host>:<port>/healthz and verifies the
          # certificate, as gpu-task will. A wrong DNS record or an expired
          # certificate turns the check (and the gateway) critical.
        }
      }

      resources {
        cpu    = var.cpu
        memory = var.memory_mb
      }
    }
  }
}
