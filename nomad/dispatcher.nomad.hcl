# dispatcher: takes queued workflows from Redis and dispatches the
# parameterized batch job comfy-workflow, at most `slots` at once, on the
# control node (the VPS).
#
# Its Nomad API token is its own workload identity: `identity { env = true }`
# puts a signed JWT into NOMAD_TOKEN, and Nomad grants it the policies that
# are attached to this job. Attach the policy once, before the first run
# (with a management token; the job need not exist yet):
#
#   nomad acl policy apply -namespace default -job dispatcher \
#     -description "comfy-multi dispatcher: dispatch and follow comfy-workflow, drain GPU nodes" \
#     comfy-dispatcher nomad/acl/dispatcher.policy.hcl
#
# No token is stored anywhere: not in this file, not in a Nomad variable.
#
#   nomad job run nomad/dispatcher.nomad.hcl
#   nomad job run -var slots=8 nomad/dispatcher.nomad.hcl   # an 8-GPU node
#
# `dispatcher drain` / `resume` / `status` are run by the operator on the VPS
# (with the operator's NOMAD_TOKEN and REDIS_URL), not by this job.

variable "datacenters" {
  type        = list(string)
  default     = ["*"]
  description = "Datacenters the dispatcher may run in."
}

variable "node_pool" {
  type        = string
  default     = "control"
  description = "Node pool of the control node (client-control.hcl)."
}

variable "dispatcher_command" {
  type        = string
  default     = "/opt/comfy-multi/bin/dispatcher"
  description = "Path of the dispatcher binary on the control node (its directory must be in client-control.hcl's chroot_env)."
}

variable "user" {
  type        = string
  default     = "comfy-multi"
  description = "Unprivileged system user the dispatcher runs as."
}

variable "slots" {
  type        = number
  default     = 1
  description = "Workflows in flight at most (SLOTS): the number of GPUs."
}

variable "workflow_job" {
  type        = string
  default     = "comfy-workflow"
  description = "The parameterized job to dispatch (NOMAD_JOB); register nomad/comfy-workflow.nomad.hcl first."
}

variable "gpu_node_pool" {
  type        = string
  default     = "gpu"
  description = "Node pool of the GPU node(s), drained by `dispatcher drain` (NOMAD_GPU_NODE_POOL)."
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
  description = "RUST_LOG filter for the dispatcher's logs (stderr, `nomad alloc logs -stderr`)."
}

variable "cpu" {
  type        = number
  default     = 200
  description = "CPU reservation in MHz."
}

variable "memory_mb" {
  type        = number
  default     = 128
  description = "Memory limit in MiB."
}

job "dispatcher" {
  type        = "service"
  datacenters = var.datacenters
  node_pool   = var.node_pool

  group "dispatcher" {
    # One loop. A second one would be safe (popping a job is atomic in Redis)
    # but would not add GPUs.
    count = 1

    restart {
      attempts = 10
      interval = "10m"
      delay    = "10s"
      mode     = "delay"
    }

    task "dispatcher" {
      driver = "exec"
      user   = var.user

      # SIGTERM: the loop stops taking jobs; jobs in flight keep running in
      # Nomad and are picked up again by the next dispatcher.
      kill_timeout = "30s"

      config {
        command = var.dispatcher_command
        args    = ["run"]
      }

      # NOMAD_TOKEN = this task's workload identity (a JWT), authorized by the
      # policy applied with `-job dispatcher` (see the top of this file).
      identity {
        env         = true
        change_mode = "restart"
      }

      env {
        EXECUTOR            = "nomad"
        SLOTS               = var.slots
        NOMAD_ADDR          = var.nomad_addr
        NOMAD_JOB           = var.workflow_job
        NOMAD_GPU_NODE_POOL = var.gpu_node_pool
        CONSUL_HTTP_ADDR    = var.consul_addr
        # Nothing of the Nomad executor is kept on disk; the alloc dir will do.
        DATA_DIR = "${NOMAD_ALLOC_DIR}/data"
        RUST_LOG = var.log_filter
      }

      # Optional: a Consul token (consul/acl/dispatcher.hcl) as the item
      # consul_token of the Nomad variable nomad/jobs/dispatcher. Without the
      # variable nothing is rendered and the task starts anyway.
      template {
        destination = "secrets/consul.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
        {{ if nomadVarExists "nomad/jobs/dispatcher" }}{{ with nomadVar "nomad/jobs/dispatcher" }}
        {{ range .Tuples }}{{ if eq .K "consul_token" }}CONSUL_HTTP_TOKEN={{ .V }}{{ end }}{{ end }}
        {{ end }}{{ end }}
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

      resources {
        cpu    = var.cpu
        memory = var.memory_mb
      }
    }
  }
}
