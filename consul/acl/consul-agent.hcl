# Policy of the Consul agents' own token (`acl.tokens.agent`), one token per
# agent: the VPS server and each GPU node client. The agent registers and
# updates its node in the catalog and reads services for anti-entropy.
# Consul 1.8 rule syntax.
node_prefix "" {
  policy = "write"
}

service_prefix "" {
  policy = "read"
}
