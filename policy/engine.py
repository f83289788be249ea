"""The seam between the authz stage and a Rego engine: one small protocol, two implementations.

``engine_embedded.EmbeddedEngine`` evaluates a bundle in-process; ``engine_remote.RemoteEngine`` asks an OPA server
over its REST Data API. Both take the same input document (``policy/input.py``) and return the raw value of the
decision rule, which ``policy/decision.py`` turns into a ``Decision``. Neither interprets the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

__all__ = ["UNDEFINED", "Engine", "PolicyError", "PolicyLoadError", "Undefined", "rule_path"]


class Undefined:
    """The type of ``UNDEFINED``: the decision rule has no value for this input (a deny, per the contract)."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Final = Undefined()


class PolicyError(Exception):
    """Evaluation failed: an engine error, a timeout, OPA unreachable or answering nonsense. Fails closed upstream."""


class PolicyLoadError(Exception):
    """A bundle or policy that cannot be loaded. The message names the file (and line when known) and the problem."""


class Engine(Protocol):
    """A loaded policy, asked one fixed decision rule."""

    @property
    def name(self) -> str:
        """``embedded`` or ``opa``: the ``engine`` label of ``meshgate_authz_duration_seconds``."""
        ...

    @property
    def revision(self) -> str:
        """The bundle revision decisions come from (``.manifest`` revision, else a content hash; "" if unknown)."""
        ...

    async def evaluate(self, input: Mapping[str, Any]) -> object:
        """The decision rule's value for ``input`` (JSON types), ``UNDEFINED``, or raise ``PolicyError``."""
        ...

    async def close(self) -> None: ...


def rule_path(decision: str) -> tuple[str, ...]:
    """``"meshgate/authz/allow"`` -> ``("meshgate", "authz", "allow")``; the config has validated the segments."""
    return tuple(part for part in decision.strip("/").split("/") if part)
