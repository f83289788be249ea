# Tests for authz.rego against the shipped data.json. Run them with `meshgate policy test policy/rego`.
#
# Each test builds an input the way the gateway does (see docs/policy.md) with `request(...)`, asks for the
# decision `with input as ...`, and checks the whole object: the reason is part of the contract with users.
package meshgate.authz_test

import rego.v1

import data.meshgate.authz

# An input document as the gateway builds it: `path` may carry a query string; principal is the verified JWT
# claims or null.
request(method, path, route, principal) := {
	"attributes": {"request": {"http": {
		"method": method,
		"path": path,
		"host": "orders",
		"scheme": "http",
		"headers": {},
	}}},
	"parsed_path": [s | some s in split(trim_prefix(split(path, "?")[0], "/"), "/")],
	"parsed_query": {},
	"parsed_body": null,
	"meshgate": {"service": "orders", "route": route, "principal": principal},
}

alice := {"sub": "alice", "roles": ["orders.read"]}

bob := {"sub": "bob", "roles": ["orders.read", "orders.write"]}

root := {"sub": "root", "roles": ["orders.admin", "admin"]}

nobody := {"sub": "nobody"}

allowed(reason) := {"allowed": true, "http_status": 200, "reason": reason, "headers": {}}

forbidden(reason) := {"allowed": false, "http_status": 403, "reason": reason, "headers": {}}

unauthenticated := {"allowed": false, "http_status": 401, "reason": "no principal", "headers": {"www-authenticate": "Bearer"}}

# --- public paths and routes: no principal needed -------------------------------------------------------------

test_public_route_needs_no_principal if {
	authz.allow == allowed("public path") with input as request("GET", "/healthz", "health", null)
}

test_public_path_prefix_needs_no_principal if {
	authz.allow == allowed("public path") with input as request("GET", "/public/logo.png?v=2", "static", null)
}

test_public_path_matches_whole_segments_only if {
	authz.allow == unauthenticated with input as request("GET", "/publicity", "static", null)
}

test_public_path_limited_to_listed_methods if {
	authz.allow == unauthenticated with input as request("POST", "/public/upload", "static", null)
}

test_public_path_allows_a_principal_too if {
	authz.allow.allowed with input as request("HEAD", "/public", "static", alice)
}

# --- no principal -----------------------------------------------------------------------------------------------

test_no_principal_is_401_with_challenge if {
	authz.allow == unauthenticated with input as request("GET", "/orders/1", "orders-read", null)
}

test_missing_principal_field_is_401 if {
	authz.allow == unauthenticated with input as {"attributes": {"request": {"http": {"method": "GET"}}}}
}

# --- roles per route and method --------------------------------------------------------------------------------

test_reader_may_read if {
	authz.allow == allowed("role orders.read grants GET on route orders-read")
		with input as request("GET", "/orders/1", "orders-read", alice)
}

test_admin_may_read_through_second_listed_role if {
	authz.allow == allowed("role orders.admin grants GET on route orders-read")
		with input as request("GET", "/orders/1", "orders-read", root)
}

test_reader_may_not_write if {
	authz.allow == forbidden("role orders.write required for POST on route orders-write")
		with input as request("POST", "/orders", "orders-write", alice)
}

test_writer_may_write if {
	authz.allow == allowed("role orders.write grants POST on route orders-write")
		with input as request("POST", "/orders", "orders-write", bob)
}

test_delete_needs_admin if {
	authz.allow == forbidden("role orders.admin required for DELETE on route orders-write")
		with input as request("DELETE", "/orders/1", "orders-write", bob)
	authz.allow.allowed with input as request("DELETE", "/orders/1", "orders-write", root)
}

test_several_roles_are_listed_in_the_reason if {
	authz.allow == forbidden("one of roles orders.read, orders.admin required for GET on route orders-read")
		with input as request("GET", "/orders/1", "orders-read", nobody)
}

test_unlisted_method_is_refused if {
	authz.allow == forbidden("method GET not allowed on route orders-write")
		with input as request("GET", "/orders", "orders-write", root)
}

test_star_covers_every_method if {
	authz.allow == allowed("role admin grants PATCH on route admin")
		with input as request("PATCH", "/admin/users/1", "admin", root)
}

test_empty_role_list_admits_any_principal if {
	authz.allow == allowed("GET on route profile is open to any authenticated principal")
		with input as request("GET", "/me", "profile", nobody)
}

test_empty_role_list_still_needs_a_principal if {
	authz.allow == unauthenticated with input as request("GET", "/me", "profile", null)
}

test_unknown_route_is_refused if {
	authz.allow == forbidden("no access rule for route billing") with input as request("GET", "/bills", "billing", root)
}

# --- the roles claim ---------------------------------------------------------------------------------------------

test_roles_must_be_an_array_of_strings if {
	authz.roles == {"orders.read"} with input as request("GET", "/", "x", {"roles": ["orders.read", 7, null]})
	count(authz.roles) == 0 with input as request("GET", "/", "x", {"roles": "orders.read"})
}

test_scope_claim_grants_nothing if {
	not authz.allow.allowed with input as request("GET", "/orders/1", "orders-read", {"sub": "s", "scope": "orders.read"})
}

# --- the rules live in data: a test can swap them ------------------------------------------------------------

test_rules_come_from_data if {
	rules := {"public_routes": [], "public_paths": [], "routes": {"orders-read": {"GET": ["auditor"]}}}
	authz.allow == allowed("role auditor grants GET on route orders-read")
		with input as request("GET", "/orders/1", "orders-read", {"sub": "x", "roles": ["auditor"]})
		with data.meshgate.access as rules
	authz.allow == unauthenticated
		with input as request("GET", "/healthz", "health", null)
		with data.meshgate.access as rules
}

test_without_data_every_route_is_refused if {
	authz.allow == forbidden("no access rule for route orders-read")
		with input as request("GET", "/orders/1", "orders-read", root)
		with data.meshgate.access as {}
}
