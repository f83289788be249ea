# A candidate policy, run in shadow mode beside the shipped one (compose/seed/services/orders.yaml `authz.shadow`).
#
# What it would change: orders.admin no longer implies reading orders, reads need orders.read itself. Before
# enforcing it, the shadow run shows who it would lock out: every request where it disagrees with the enforced
# policy counts in meshgate_authz_shadow_disagreements_total, and each shadow decision is logged (event "decision",
# "shadow": true) with the enforced outcome beside its own, under the request's decision id.
package meshgate.candidate

import rego.v1

default allow := false

allow if input.meshgate.route == "health"

allow if {
	input.meshgate.route == "orders-read"
	"orders.read" in input.meshgate.principal.roles
}

allow if {
	input.meshgate.route == "orders-write"
	"orders.write" in input.meshgate.principal.roles
}
