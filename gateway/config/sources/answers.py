"""How the gateway side reads the config service's answers: one failure type for "no usable answer"."""

from __future__ import annotations

__all__ = ["ServiceUnavailable", "check_status"]


class ServiceUnavailable(Exception):
    """The service could not be asked or did not answer usably; ``auth``: it refused the token."""

    def __init__(self, reason: str, *, auth: bool = False) -> None:
        super().__init__(reason)
        self.auth = auth


def check_status(status: int) -> None:
    """``ServiceUnavailable`` for anything but a 200 (401/403: the token was refused)."""
    if status in (401, 403):
        raise ServiceUnavailable(f"HTTP {status}: the service refused the gateway token", auth=True)
    if status != 200:
        raise ServiceUnavailable(f"HTTP {status}")
