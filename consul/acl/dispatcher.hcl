# Policy for the dispatcher's token (CONSUL_HTTP_TOKEN / `consul.token`).
#
# The dispatcher talks to Nomad, not Consul, to place work; from Consul it
# only reads whether warm ComfyUI instances are passing (how many GPUs can
# take work, `dispatcher status`). Node read is needed because health queries
# return only instances whose node the token may read.
# Consul 1.8 rule syntax.
service "comfyui" {
  policy = "read"
}

node_prefix "" {
  policy = "read"
}
