# Policy for the Nomad server on the VPS (its `consul { token = ... }`).
# The VPS's Nomad agent is server and client at once: its token gets this
# policy AND nomad-control-client.
#
# Nomad's server registers its own `nomad` service (http, rpc, serf checks)
# and reads the catalog to find other Nomad servers. Nomad's documentation
# also lists `acl = "write"`: that is only for Consul Connect service-identity
# tokens, which comfy-multi does not use, so it is left out here. Nomad's
# `consul { allow_unauthenticated = true }` (the default) is assumed.
# Consul 1.8 rule syntax (no `mesh`, `partition` or `peering` rules: those are
# newer than 1.8).
agent_prefix "" {
  policy = "read"
}

node_prefix "" {
  policy = "read"
}

service "nomad" {
  policy = "write"
}

service_prefix "" {
  policy = "read"
}
