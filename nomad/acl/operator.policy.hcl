# ACL policy for the people running the workshop (instructor, operator).
# Everything they do day to day, without the management token:
#   nomad job run / status / stop, nomad alloc logs / exec, nomad var put,
#   nomad node drain / eligibility, `dispatcher drain` / `resume` / `status`.
#
#   nomad acl policy apply -description "comfy-multi operators" comfy-operator nomad/acl/operator.policy.hcl
#   nomad acl token create -name "<who>" -policy comfy-operator -ttl 720h
#
# Keep the bootstrap (management) token for ACL changes only.
namespace "default" {
  policy = "write"

  variables {
    path "nomad/jobs/*" {
      capabilities = ["write", "read", "list", "destroy"]
    }
  }
}

node {
  policy = "write"
}

node_pool "*" {
  policy = "read"
}

agent {
  policy = "read"
}

operator {
  policy = "read"
}
