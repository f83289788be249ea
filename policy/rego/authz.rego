# meshgate's default authorization policy.
#
# The gateway asks for `data.meshgate.authz.allow` (config: `authz.decision: meshgate/authz/allow`) and gets back
# the contract's object form:
#
#     {"allowed": bool, "http_status": int, "reason": "...", "headers": {...}}
#
# WHO may do WHAT lives in data.json (`data.meshgate.access`), not here: to open a path or grant a role, edit the
# data and keep this file as it is. The decision, in order:
#
#   1. a public path or route            -> allowed, no principal needed
#   2. no verified principal              -> 401 "no principal" (+ WWW-Authenticate: Bearer)
#   3. the route has no entry in the data -> 403 "no access rule for route R"
#   4. the method has no entry (nor "*")  -> 403 "method M not allowed on route R"
#   5. the route/method lists roles and the principal holds none of them
#                                         -> 403 "role X required for M on route R"
#   6. otherwise                          -> allowed (an empty role list admits any verified principal)
#
# Roles: the principal's `roles` claim, an array of strings (`input.meshgate.principal.roles`). Any other claim
# shape grants nothing. See docs/policy.md for the input document and for mapping an OAuth `scope` claim instead.
package meshgate.authz

import rego.v1

# ---------------------------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------------------------

# Reached only if every branch below is undefined (e.g. data.json is missing): fail closed, say why.
default allow := {"allowed": false, "http_status": 403, "reason": "denied: no rule matched", "headers": {}}

allow := {"allowed": true, "http_status": 200, "reason": grant_reason, "headers": {}} if {
	grant_reason
} else := {"allowed": false, "http_status": 401, "reason": "no principal", "headers": {"www-authenticate": "Bearer"}} if {
	not authenticated
} else := {"allowed": false, "http_status": 403, "reason": deny_reason, "headers": {}} if {
	deny_reason
}

# Why the request may pass. Undefined when it may not.
grant_reason := "public path" if {
	public
} else := sprintf("%s on route %s is open to any authenticated principal", [method, route]) if {
	authenticated
	count(required_roles) == 0
} else := sprintf("role %s grants %s on route %s", [held[0], method, route]) if {
	authenticated
	count(held) > 0
}

# Why the request may not pass (the principal is known to be there). Undefined when it may.
deny_reason := sprintf("no access rule for route %s", [route]) if {
	not route_rules
} else := sprintf("method %s not allowed on route %s", [method, route]) if {
	not required_roles
} else := sprintf("role %s required for %s on route %s", [required_roles[0], method, route]) if {
	count(required_roles) == 1
	count(held) == 0
} else := sprintf("one of roles %s required for %s on route %s", [concat(", ", required_roles), method, route]) if {
	count(held) == 0
}

# ---------------------------------------------------------------------------------------------------------------
# The request, as the gateway describes it (opa-envoy-plugin shape + `input.meshgate`)
# ---------------------------------------------------------------------------------------------------------------

method := input.attributes.request.http.method

route := input.meshgate.route

# The gateway sets `principal` to the verified JWT claims, or to null when no token was verified.
authenticated if is_object(input.meshgate.principal)

# The is_array guard is not redundant: regorus raises an error for `some x in "a string"` where OPA is undefined.
roles contains role if {
	is_array(input.meshgate.principal.roles)
	some role in input.meshgate.principal.roles
	is_string(role)
}

# ---------------------------------------------------------------------------------------------------------------
# Public paths and routes: data.meshgate.access.public_routes / public_paths
# ---------------------------------------------------------------------------------------------------------------

public if route in data.meshgate.access.public_routes

public if {
	some entry in data.meshgate.access.public_paths
	path_has_prefix(entry.path_prefix)
	method_listed(entry)
}

# Prefixes match whole segments: "/public" covers /public and /public/x, not /publicity.
path_has_prefix(prefix) if {
	segments := [s | some s in split(prefix, "/"); s != ""]
	array.slice(input.parsed_path, 0, count(segments)) == segments
}

# An entry without `methods` applies to every method.
method_listed(entry) if not entry.methods

method_listed(entry) if method in entry.methods

# ---------------------------------------------------------------------------------------------------------------
# Roles per route and method: data.meshgate.access.routes[route][method] (or [route]["*"])
# ---------------------------------------------------------------------------------------------------------------

route_rules := data.meshgate.access.routes[route]

# Any one of these roles admits the request; [] admits any verified principal. Undefined: method not allowed.
required_roles := listed if {
	listed := route_rules[method]
} else := listed if {
	listed := route_rules["*"]
}

# The required roles the principal holds, in data.json order (so reasons are stable).
held := [r | some r in required_roles; r in roles]
