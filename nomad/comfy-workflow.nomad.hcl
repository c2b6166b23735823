# comfy-workflow: one participant's workflow on the GPU.
#
# A parameterized batch job: the dispatcher dispatches one child per queued
# comfy-multi job (meta job_id, user_id, priority; idempotency token = job id).
# The child's only task is gpu-task, which drives the warm ComfyUI on the node.
# The device request is the GPU lease: Nomad admits at most one workflow per
# GPU, and every workflow shows in `nomad job status comfy-workflow`.
#
# Register it with:
#   nomad job run nomad/comfy-workflow.nomad.hcl
# and locally (no GPU, the dev agent's own node):
#   nomad job run -var gpu_count=0 -var node_pool=default nomad/comfy-workflow.nomad.hcl

variable "datacenters" {
  type        = list(string)
  default     = ["*"]
  description = "Datacenters the workflow may run in."
}

variable "node_pool" {
  type        = string
  default     = "gpu"
  description = "Node pool of the GPU node(s). The local dev agent's node is in `default`."
}

variable "node_name_pattern" {
  type        = string
  default     = ".+"
  description = "Regular expression the GPU node's name must match, to pin workflows to one node. Any node of the pool by default."
}

variable "gpu_count" {
  type        = number
  default     = 1
  description = "GPUs leased per workflow (`device \"nvidia/gpu\"`). 0 requests no device, for a machine without a GPU."
}

variable "gpu_task_command" {
  type        = string
  default     = "/usr/local/bin/gpu-task"
  description = "Path of the gpu-task binary on the GPU node (installed by the Packer image)."
}

variable "kill_timeout" {
  type        = string
  default     = "30s"
  description = "Time gpu-task gets after SIGTERM to interrupt its prompt in ComfyUI and report."
}

job "comfy-workflow" {
  type        = "batch"
  datacenters = var.datacenters
  node_pool   = var.node_pool

  parameterized {
    payload       = "optional"
    meta_required = ["job_id", "user_id"]
    meta_optional = ["priority"]
  }

  constraint {
    attribute = "${node.unique.name}"
    operator  = "regexp"
    value     = var.node_name_pattern
  }

  group "workflow" {
    count = 1

    # The dispatcher owns retries: Nomad must never run a workflow twice.
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "gpu-task" {
      driver       = "raw_exec"
      kill_timeout = var.kill_timeout

      config {
        command = var.gpu_task_command
      }

      dispatch_payload {
        file = "workflow.json"
      }

      # INTERNAL_SECRET (the gateway's, see nomad/gateway.nomad.hcl) and,
      # optionally, CONSUL_HTTP_TOKEN (item consul_token, a token with
      # consul/acl/gpu-task.hcl) come from the Nomad variable below; nothing
      # secret is here. GATEWAY_URL and COMFYUI_URL may come from the node's
      # environment (raw_exec tasks inherit the Nomad client's), but Nomad
      # strips tokens such as CONSUL_HTTP_TOKEN from it (client env.denylist),
      # so under Consul ACLs the token must come from the variable.
      template {
        destination = "secrets/comfy-multi.env"
        env         = true
        data        = <<-EOT
        {{ with nomadVar "nomad/jobs/comfy-workflow" }}INTERNAL_SECRET={{ .internal_secret }}
        {{ range .Tuples }}{{ if eq .K "consul_token" }}CONSUL_HTTP_TOKEN={{ .V }}{{ end }}{{ end }}{{ end }}
        EOT
      }

      resources {
        cpu    = 200
        memory = 256

        dynamic "device" {
          for_each = var.gpu_count > 0 ? [var.gpu_count] : []
          labels   = ["nvidia/gpu"]
          content {
            count = device.value
          }
        }
      }
    }
  }
}
