# comfy-multi GPU node image, built over SSH on a running Verda instance.
#
# Verda has no Packer builder and no image upload, so this template uses the
# `null` source: it connects to an instance you created (Verda console or
# API, image e.g. ubuntu-24.04-cuda-12.8-open-docker on 1H100.80S.30V),
# provisions it, and leaves it as it is. Shut the instance down afterwards and
# keep its OS volume: scripts/gpu-up.sh clones that volume for every new GPU
# node (see packer/README.md).
#
#   packer build -var ssh_host=203.0.113.7 \
#                -var ssh_private_key_file=$HOME/.ssh/verda_ed25519 \
#                packer/gpu-node.pkr.hcl
#
# Written for Packer 1.6.6 (Debian 12's package): no required_plugins, no data
# sources. Nothing secret lives here: the SSH key is a path on your machine.

variable "ssh_host" {
  type        = string
  description = "Public IP address or host name of the freshly created Verda instance to provision."
}

variable "ssh_username" {
  type        = string
  default     = "root"
  description = "SSH user on the instance (Verda's Ubuntu images log in as root). A non-root user needs passwordless sudo."
}

variable "ssh_private_key_file" {
  type        = string
  default     = "~/.ssh/id_ed25519"
  description = "Path on this machine of the private key whose public half was given to the instance (Verda SSH key)."
}

variable "nvidia_driver_major" {
  type        = string
  default     = "570"
  description = "NVIDIA driver major version the image must already have (570 = Verda's ubuntu-24.04-cuda-12.8 images). nvidia.sh fails the build otherwise; it installs no driver."
}

variable "nomad_version" {
  type        = string
  default     = "1.10.5"
  description = "Nomad version installed from releases.hashicorp.com. The VPS runs the same one: scripts/deploy-control.sh runs scripts/nomad.sh, whose defaults equal these pins (tests/tests/deploy_scripts.rs checks that)."
}

variable "nomad_sha256" {
  type        = string
  default     = "4242244ab1f6887e963d6bb674ac490ee9b270a29aff6f826c51ef3187c77044"
  description = "sha256 of nomad_<nomad_version>_linux_amd64.zip, as published in HashiCorp's SHA256SUMS."
}

variable "nomad_device_nvidia_version" {
  type        = string
  default     = "1.1.0"
  description = "Version of HashiCorp's NVIDIA device plugin (nomad-device-nvidia) installed into the Nomad plugin dir."
}

variable "nomad_device_nvidia_sha256" {
  type        = string
  default     = ""
  description = "sha256 of nomad-device-nvidia_<version>_linux_amd64.zip. Empty: nomad.sh verifies the zip against HashiCorp's GPG-signed SHA256SUMS (signing key fingerprint pinned in the script) and prints the sha256 to pin here."
}

variable "nomad_plugin_dir" {
  type        = string
  default     = "/opt/nomad/plugins"
  description = "Nomad plugin dir on the node; must equal plugin_dir in nomad/agent/client-gpu.hcl."
}

variable "consul_version" {
  type        = string
  default     = "1.8.7"
  description = "Consul version the node must report. 1.8.7 is the version consul/*.hcl are written and tested for; the VPS runs the same build (scripts/deploy-control.sh)."
}

variable "consul_deb" {
  type        = string
  default     = "consul_1.8.7+dfsg1-2+b3_amd64.deb"
  description = "Debian bullseye package whose consul binary is installed (unpacked with dpkg-deb, not installed as a package); fetched from pool/main/c/consul/ of deb.debian.org, else archive.debian.org."
}

variable "consul_sha256" {
  type        = string
  default     = "e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9"
  description = "sha256 of consul_deb (as listed in Debian bullseye's signed package index)."
}

variable "comfyui_commit" {
  type        = string
  default     = "637221995f7424a561bd825de3e61ea117dfe1e3"
  description = "Full git commit of ComfyUI to install under /opt/comfyui (637221995f… is the v0.3.64 release, whose editor is comfyui-frontend-package 1.27.10, the one the gateway serves)."
}

variable "comfyui_repo" {
  type        = string
  default     = "https://github.com/Comfy-Org/ComfyUI.git"
  description = "Git URL ComfyUI is cloned from."
}

variable "torch_pins" {
  type        = string
  default     = "torch==2.8.0 torchvision==0.23.0 torchaudio==2.8.0"
  description = "pip constraints (space separated) holding torch and friends while ComfyUI's requirements.txt is installed from PyPI."
}

variable "gpu_task_binary" {
  type        = string
  default     = ""
  description = "Path on this machine of the gpu-task binary to install as /usr/local/bin/gpu-task (build it with `cargo build --release -p gpu-task`). Empty: target/release/gpu-task of this repository."
}

variable "models_manifest" {
  type        = string
  default     = ""
  description = "Path on this machine of the model manifest (JSON, entries {name, url, sha256, target}). Empty: packer/models.json."
}

locals {
  gpu_task_binary = var.gpu_task_binary != "" ? var.gpu_task_binary : "${path.root}/../target/release/gpu-task"
  models_manifest = var.models_manifest != "" ? var.models_manifest : "${path.root}/models.json"
  build_dir       = "/tmp/comfy-multi-build"
  # Where the scripts stay on the image, so `--check` can be run on any node.
  image_dir = "/opt/comfy-multi/image"
}

source "null" "verda" {
  communicator         = "ssh"
  ssh_host             = var.ssh_host
  ssh_username         = var.ssh_username
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "10m"
}

build {
  sources = ["source.null.verda"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.build_dir}"]
  }

  provisioner "file" {
    source      = "${path.root}/scripts/"
    destination = local.build_dir
  }

  provisioner "file" {
    source      = local.models_manifest
    destination = "${local.build_dir}/models.json"
  }

  provisioner "file" {
    source      = local.gpu_task_binary
    destination = "${local.build_dir}/gpu-task"
  }

  # Install, in dependency order, then keep the scripts on the image and run
  # every --check once more: the build fails unless the node is complete.
  provisioner "shell" {
    environment_vars = [
      "NVIDIA_DRIVER_MAJOR=${var.nvidia_driver_major}",
      "NOMAD_VERSION=${var.nomad_version}",
      "NOMAD_SHA256=${var.nomad_sha256}",
      "NOMAD_DEVICE_NVIDIA_VERSION=${var.nomad_device_nvidia_version}",
      "NOMAD_DEVICE_NVIDIA_SHA256=${var.nomad_device_nvidia_sha256}",
      "NOMAD_PLUGIN_DIR=${var.nomad_plugin_dir}",
      "CONSUL_VERSION=${var.consul_version}",
      "CONSUL_DEB=${var.consul_deb}",
      "CONSUL_SHA256=${var.consul_sha256}",
      "COMFYUI_COMMIT=${var.comfyui_commit}",
      "COMFYUI_REPO=${var.comfyui_repo}",
      "TORCH_PINS=${var.torch_pins}",
      "GPU_TASK_SRC=${local.build_dir}/gpu-task",
      "MODELS_MANIFEST=${local.build_dir}/models.json",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash -euo pipefail '{{ .Path }}'"
    inline = [
      "cd ${local.build_dir}",
      "bash nvidia.sh",
      "bash consul.sh",
      "bash nomad.sh",
      "bash comfyui.sh",
      "bash gpu-task.sh",
      "bash models.sh",
      "install -d -m 0755 ${local.image_dir}",
      "install -m 0755 lib.sh nvidia.sh consul.sh nomad.sh comfyui.sh gpu-task.sh models.sh ${local.image_dir}/",
      "install -m 0644 models.json ${local.image_dir}/models.json",
      "printf 'NVIDIA_DRIVER_MAJOR=%s\\nNOMAD_VERSION=%s\\nNOMAD_DEVICE_NVIDIA_VERSION=%s\\nNOMAD_PLUGIN_DIR=%s\\nCONSUL_VERSION=%s\\nCOMFYUI_COMMIT=%s\\nTORCH_PINS=\"%s\"\\n' \"$NVIDIA_DRIVER_MAJOR\" \"$NOMAD_VERSION\" \"$NOMAD_DEVICE_NVIDIA_VERSION\" \"$NOMAD_PLUGIN_DIR\" \"$CONSUL_VERSION\" \"$COMFYUI_COMMIT\" \"$TORCH_PINS\" > ${local.image_dir}/pins.env",
      "for s in nvidia consul nomad comfyui gpu-task models; do bash ${local.image_dir}/$s.sh --check; done",
      "rm -rf ${local.build_dir}",
      "echo 'comfy-multi GPU image ready: shut the instance down and keep its OS volume (packer/README.md)'",
    ]
  }
}
