"""Serving: what one request pins at accept time, the config snapshot plus the upstream and policy
runtimes built for it.

Swapping one ``Serving`` object is the atomic reload: a request that started on version N finishes on version N's
routes and clusters even if N+1 arrives mid-request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.snapshot import Snapshot
from gateway.policy_runtime import NO_POLICY, PolicyRuntime
from gateway.upstream.clusters import ClusterRuntime

__all__ = ["Serving"]


@dataclass(frozen=True, slots=True)
class Serving:
    snapshot: Snapshot
    clusters: Mapping[str, ClusterRuntime]
    policy: PolicyRuntime = NO_POLICY
