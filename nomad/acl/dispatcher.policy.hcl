# ACL policy of the dispatcher job's workload identity.
#
# Attached to every task of job `dispatcher` (no token is ever created for it):
#
#   nomad acl policy apply -namespace default -job dispatcher \
#     -description "comfy-multi dispatcher: dispatch and follow comfy-workflow, drain GPU nodes" \
#     comfy-dispatcher nomad/acl/dispatcher.policy.hcl
#
# What each capability is for (dispatcher/src/nomad.rs):
#   dispatch-job  POST   /v1/job/comfy-workflow/dispatch (with the idempotency token)
#   read-job      GET    /v1/job/:id, /v1/job/:id/allocations, /v1/allocation/:id,
#                        /v1/evaluation/:id, and the Job/Allocation/Evaluation
#                        topics of /v1/event/stream
#   list-jobs     listing the dispatched children
#   submit-job    DELETE /v1/job/:id: stopping a dispatched child on cancel or
#                 at the drain deadline (Nomad requires submit-job to stop a job)
#   node write    GET /v1/nodes, /v1/node/:id; POST /v1/node/:id/drain and
#                 /v1/node/:id/eligibility for `dispatcher drain` / `resume`
namespace "default" {
  capabilities = ["dispatch-job", "read-job", "list-jobs", "submit-job"]
}

node {
  policy = "write"
}
