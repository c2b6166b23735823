# comfyui: the warm ComfyUI, one per GPU of every node in the GPU pool.
#
# Register it (after the GPU node has joined and published its GPU UUIDs, see
# nomad/agent/client-gpu.hcl):
#   nomad job run nomad/comfyui.nomad.hcl
#   nomad job run -var gpu_count=8 nomad/comfyui.nomad.hcl   # an 8-GPU node
#
# How it is built, and why
# ------------------------
# * No `device "nvidia/gpu"` request, on purpose. The device request of the
#   comfy-workflow batch job IS the GPU lease: Nomad admits one workflow per
#   GPU. If ComfyUI reserved the GPU too, no workflow could ever be placed.
#   So ComfyUI uses its GPU outside Nomad's device accounting, pinned with
#   CUDA_VISIBLE_DEVICES. That is also why the driver is raw_exec: `exec`
#   hides /dev/nvidia* from a task that requested no device.
#
# * One task group per GPU index (the `dynamic "group"` below, over
#   0..gpu_count-1), each with one ComfyUI. Its GPU is named by the GPU node's
#   client meta `gpu_uuid_<index>` (the UUID as `nvidia-smi -L` prints it,
#   written at boot, see nomad/agent/client-gpu.hcl). Nomad interpolates
#   `${meta.gpu_uuid_0}` at run time in constraints, env and service tags, so:
#     - the group is only placed where that meta holds a GPU UUID;
#     - ComfyUI gets CUDA_VISIBLE_DEVICES=<that UUID>;
#     - its Consul instance of service `comfyui` is tagged `gpu=<that UUID>`,
#       which gpu-task matches against NVIDIA_VISIBLE_DEVICES of its own lease
#       (the nvidia device plugin's device IDs are the same UUIDs).
#   Rejected alternatives: `count = gpu_count` with a per-alloc tag, because a
#   tag can't be computed from NVIDIA_VISIBLE_DEVICES without a device request
#   (see the first point) and Nomad does not nest interpolations such as
#   `${meta.gpu_uuid_${NOMAD_ALLOC_INDEX}}`; UUIDs passed as job variables,
#   because they change with every rented machine while the node meta is
#   written by the machine itself.
#
# * `type = "system"`: every eligible node of the pool runs its ComfyUIs, so a
#   freshly rented GPU node gets them as soon as it joins, with no re-run. On
#   `nomad node drain` system allocations stop last, after the workflows.
#   Groups whose `gpu_uuid_<index>` is absent on a node are simply not placed
#   there, so gpu_count is the GPU count of the largest node.
#
# * raw_exec cannot mount host volumes. The groups still claim
#   `comfyui-models` and `comfyui-output` (Nomad then places them only on a
#   node that has both), and ComfyUI is pointed at the same host paths:
#   models_dir / output_dir must equal the paths in client-gpu.hcl.
#
# * ComfyUI has no authentication: it listens on 127.0.0.1 and registers that
#   address in Consul. Only gpu-task, on the same node, talks to it.
#
# * Each ComfyUI has its own output subdirectory (`output_dir/gpu-<index>`),
#   and its own temp dir, user dir and sqlite database in the task dir:
#   ComfyUI numbers output files by scanning its output directory, wipes its
#   temp dir at start and migrates its database at start, so two instances
#   must not share any of them. Nothing in the user dir matters here:
#   participants use the gateway's editor, not ComfyUI's own settings.

variable "datacenters" {
  type        = list(string)
  default     = ["*"]
  description = "Datacenters ComfyUI may run in."
}

variable "node_pool" {
  type        = string
  default     = "gpu"
  description = "Node pool of the GPU node(s) (client-gpu.hcl)."
}

variable "gpu_count" {
  type        = number
  default     = 1
  description = "GPUs of the largest GPU node: one ComfyUI group per index 0..gpu_count-1, each needing the node meta gpu_uuid_<index>."
}

variable "comfyui_dir" {
  type        = string
  default     = "/opt/comfyui"
  description = "ComfyUI checkout on the GPU node (installed at a pinned commit by the Packer image); main.py is run from here."
}

variable "comfyui_venv" {
  type        = string
  default     = "/opt/comfyui/venv"
  description = "Python virtualenv of ComfyUI on the GPU node (torch and ComfyUI's requirements)."
}

variable "user" {
  type        = string
  default     = "comfyui"
  description = "Unprivileged system user ComfyUI runs as (created by the Packer image; owns comfyui_dir, models_dir and output_dir)."
}

variable "listen_address" {
  type        = string
  default     = "127.0.0.1"
  description = "Address ComfyUI binds to and registers in Consul. ComfyUI has no authentication: keep it on loopback, gpu-task runs on the same node."
}

variable "models_dir" {
  type        = string
  default     = "/opt/comfyui/models"
  description = "Host path of the comfyui-models host volume (client-gpu.hcl): checkpoints/, loras/, vae/, ... in ComfyUI's layout (filled by packer/scripts/models.sh)."
}

variable "output_dir" {
  type        = string
  default     = "/opt/comfyui/output"
  description = "Host path of the comfyui-output host volume (client-gpu.hcl), writable by `user`; GPU <i> writes to gpu-<i>/ below it."
}

variable "extra_args" {
  type        = string
  default     = ""
  description = "Extra command-line arguments for ComfyUI's main.py, e.g. \"--highvram\" (split on spaces)."
}

variable "cpu" {
  type        = number
  default     = 4000
  description = "CPU reservation per ComfyUI in MHz."
}

variable "memory_mb" {
  type        = number
  default     = 16384
  description = "Host memory reserved per ComfyUI in MiB (models are staged through host RAM)."
}

variable "memory_max_mb" {
  type        = number
  default     = -1
  description = "Hard memory limit per ComfyUI in MiB; -1 = none (needs memory oversubscription, enabled in server.hcl). raw_exec enforces limits since Nomad 1.7."
}

locals {
  # ["${meta.gpu_uuid_0}", "${meta.gpu_uuid_1}", ...]: `$${` is HCL's escape
  # for a literal `${`, so these reach Nomad uninterpolated and Nomad fills
  # them from the node's client meta when it places the group.
  gpu_uuid_refs = [for i in range(var.gpu_count) : "$${meta.gpu_uuid_${i}}"]
}

job "comfyui" {
  type        = "system"
  datacenters = var.datacenters
  node_pool   = var.node_pool

  # One GPU's ComfyUI at a time; a start (custom nodes, first CUDA init) may
  # take minutes. Nomad requires min_healthy_time < healthy_deadline <
  # progress_deadline.
  update {
    max_parallel      = 1
    min_healthy_time  = "10s"
    healthy_deadline  = "8m"
    progress_deadline = "15m"
  }

  dynamic "group" {
    for_each = local.gpu_uuid_refs
    labels   = ["gpu-${group.key}"]

    content {
      # Only where gpu_uuid_<index> holds a GPU (or MIG) UUID.
      constraint {
        attribute = group.value
        operator  = "regexp"
        value     = "^(GPU|MIG)-"
      }

      # Claimed for placement; raw_exec does not mount them (see above).
      volume "models" {
        type      = "host"
        source    = "comfyui-models"
        read_only = true
      }

      volume "output" {
        type      = "host"
        source    = "comfyui-output"
        read_only = false
      }

      network {
        port "http" {}
      }

      restart {
        attempts = 5
        interval = "10m"
        delay    = "15s"
        mode     = "delay"
      }

      task "comfyui" {
        driver       = "raw_exec"
        user         = var.user
        kill_timeout = "20s"

        # Nomad's own runtime variables are written `$${NOMAD_…}` inside this
        # dynamic block: HCL then hands Nomad the literal `${NOMAD_…}`, which
        # Nomad fills in on the node.
        config {
          command = "/bin/sh"
          args    = ["$${NOMAD_TASK_DIR}/start.sh"]
        }

        env {
          GPU_UUID             = group.value
          GPU_META_KEY         = "gpu_uuid_${group.key}"
          CUDA_VISIBLE_DEVICES = group.value
          COMFYUI_DIR          = var.comfyui_dir
          COMFYUI_PYTHON       = "${var.comfyui_venv}/bin/python"
          COMFYUI_LISTEN       = var.listen_address
          COMFYUI_PORT         = "$${NOMAD_PORT_http}"
          COMFYUI_OUTPUT_DIR   = "${var.output_dir}/gpu-${group.key}"
          COMFYUI_EXTRA_ARGS   = var.extra_args
          PYTHONUNBUFFERED     = "1"
        }

        # Checks that the node meta names a GPU that is really here, then
        # starts ComfyUI on it.
        template {
          destination = "local/start.sh"
          perms       = "0755"
          change_mode = "restart"
          data        = <<-EOT
          #!/bin/sh
          # Written by Nomad from nomad/comfyui.nomad.hcl.
          set -eu
          case "$GPU_UUID" in
            GPU-* | MIG-*) ;;
            *)
              echo "comfyui: node meta $GPU_META_KEY is not a GPU UUID (got '$GPU_UUID'); see nomad/agent/client-gpu.hcl" >&2
              exit 1
              ;;
          esac
          if ! nvidia-smi -L | grep -q -- "$GPU_UUID"; then
            echo "comfyui: node meta $GPU_META_KEY names $GPU_UUID, which nvidia-smi -L does not list on this node:" >&2
            nvidia-smi -L >&2 || true
            exit 1
          fi
          mkdir -p "$COMFYUI_OUTPUT_DIR" "$NOMAD_TASK_DIR/user"
          cd "$COMFYUI_DIR"
          # shellcheck disable=SC2086 # COMFYUI_EXTRA_ARGS is split on purpose
          exec "$COMFYUI_PYTHON" main.py \
            --listen "$COMFYUI_LISTEN" \
            --port "$COMFYUI_PORT" \
            --disable-auto-launch \
            --output-directory "$COMFYUI_OUTPUT_DIR" \
            --temp-directory "$NOMAD_TASK_DIR" \
            --user-directory "$NOMAD_TASK_DIR/user" \
            --database-url "sqlite:///$NOMAD_TASK_DIR/comfyui.db" \
            --extra-model-paths-config "$NOMAD_TASK_DIR/extra_model_paths.yaml" \
            $COMFYUI_EXTRA_ARGS
          EOT
        }

        # Points ComfyUI at the comfyui-models host volume. With the default
        # models_dir (ComfyUI's own models/) this changes nothing: ComfyUI
        # skips paths it already has; another models_dir comes first.
        template {
          destination = "local/extra_model_paths.yaml"
          change_mode = "restart"
          data        = <<-EOT
          comfy_multi:
            base_path: ${var.models_dir}
            is_default: true
            checkpoints: checkpoints/
            configs: configs/
            loras: loras/
            vae: vae/
            vae_approx: vae_approx/
            text_encoders: |
              text_encoders/
              clip/
            clip_vision: clip_vision/
            diffusion_models: |
              diffusion_models/
              unet/
            embeddings: embeddings/
            controlnet: |
              controlnet/
              t2i_adapter/
            upscale_models: upscale_models/
            style_models: style_models/
            hypernetworks: hypernetworks/
            gligen: gligen/
            photomaker: photomaker/
            diffusers: diffusers/
            audio_encoders: audio_encoders/
            model_patches: model_patches/
            classifiers: classifiers/
          EOT
        }

        service {
          name     = "comfyui"
          provider = "consul"
          port     = "http"
          address  = var.listen_address
          # gpu-task picks the instance whose tag contains its GPU's UUID.
          tags = ["gpu=${group.value}", "gpu-index=${group.key}"]

          meta {
            gpu_uuid  = group.value
            gpu_index = "${group.key}"
          }

          check {
            name     = "ComfyUI /system_stats"
            type     = "http"
            path     = "/system_stats"
            interval = "10s"
            timeout  = "5s"

            # Restart a ComfyUI that stopped answering for a minute (not one
            # that is merely busy: /system_stats answers during a run).
            check_restart {
              limit = 6
              grace = "2m"
            }
          }
        }

        resources {
          cpu        = var.cpu
          memory     = var.memory_mb
          memory_max = var.memory_max_mb
        }
      }
    }
  }
}
