"""``discovery: {registry: NAME}``: compiled to ``Cluster.registry`` only when the config has a config service to ask.

The rejected messages through the whole compiler are in ``test_compile_rejected.py``; here the section compiler is
driven directly with both values of ``registry_available``, and once through ``compile_document`` with a
``config_service`` section.
"""

from __future__ import annotations

import pytest

from gateway.config.clusters import compile_clusters
from gateway.config.compile import compile_document
from gateway.config.schema import Problems
from gateway.config.snapshot import Cluster, RegistryDiscovery

from .sample import DELETE, edited

REGISTRY_CLUSTER = {"name": "orders", "discovery": {"registry": "orders-v2"}, "lb": "least_request"}


def test_registry_cluster_compiles_when_a_config_service_is_available() -> None:
    problems = Problems()
    section = compile_clusters([REGISTRY_CLUSTER], problems, registry_available=True)
    assert problems.items == ()
    assert section.clusters == {
        "orders": Cluster("orders", lb="least_request", registry=RegistryDiscovery("orders-v2"))
    }
    assert section.clusters["orders"].endpoints == ()
    assert section.clusters["orders"].dns is None


@pytest.mark.parametrize("available", [False, True])
def test_dns_and_static_clusters_do_not_care_about_the_flag(available: bool) -> None:
    problems = Problems()
    section = compile_clusters(
        [{"name": "a", "endpoints": ["127.0.0.1:1"]}, {"name": "b", "discovery": {"dns": "b:80"}}],
        problems,
        registry_available=available,
    )
    assert problems.items == ()
    assert {name: cluster.registry for name, cluster in section.clusters.items()} == {"a": None, "b": None}


def test_without_a_config_service_the_registry_is_a_problem_and_the_cluster_is_declared_only() -> None:
    problems = Problems()
    section = compile_clusters([REGISTRY_CLUSTER], problems)  # the default: no config service
    assert [(p.path, p.message) for p in problems.items] == [
        ("clusters[0].discovery.registry", "needs a config_service section")
    ]
    assert section.clusters == {}
    assert section.names == ["orders"]  # routes naming it get no second, "unknown cluster" problem


def test_whole_config_with_a_config_service_section() -> None:
    document = edited(
        {
            "clusters[0].endpoints": DELETE,
            "clusters[0].discovery": {"registry": "orders"},
            "config_service": {"url": "http://127.0.0.1:7000", "token_file": "./gateway.token"},
        }
    )
    cluster = compile_document(document).clusters["orders"]
    assert cluster.registry == RegistryDiscovery("orders")
    assert cluster.endpoints == ()
