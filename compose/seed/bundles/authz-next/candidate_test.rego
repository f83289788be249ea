package meshgate.candidate_test

import rego.v1

import data.meshgate.candidate

test_reader_reads if candidate.allow with input as {"meshgate": {"route": "orders-read", "principal": {"roles": ["orders.read"]}}}

test_admin_alone_no_longer_reads if {
	not candidate.allow with input as {"meshgate": {"route": "orders-read", "principal": {"roles": ["orders.admin"]}}}
}

test_no_principal_denied if {
	not candidate.allow with input as {"meshgate": {"route": "orders-write", "principal": null}}
}
