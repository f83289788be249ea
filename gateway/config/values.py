"""Pure parsers for the scalar value formats of the config file: durations, sizes and addresses.

Each parser takes the already type-checked scalar and returns the normalized value, or raises ``ValueError`` whose
message is user-facing and complete (the compiler prefixes it with the key's path). Units are deliberately few and
case-sensitive: ``10mb`` could mean megabits or megabytes, so it is refused rather than guessed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from decimal import Decimal

from gateway.config.snapshot import Address

__all__ = ["format_duration", "parse_address", "parse_duration", "parse_size", "quote"]

_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>ms|s|m|h)")
# Decimal, so "100ms" is exactly the float nearest 0.1 rather than 100 * 0.001.
_SECONDS_PER_UNIT = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}

_SIZE = re.compile(r"(?P<number>[0-9]+)(?P<unit>B|KB|MB|GB|KiB|MiB|GiB)?")
_BYTES_PER_UNIT = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}

# A DNS name or an IPv4 address; IPv6 goes in brackets and is checked by ``ipaddress``.
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_QUOTE_LIMIT = 60


def quote(text: str) -> str:
    """``text`` as a double-quoted string for a message; escapes control characters, shortens long values."""
    if len(text) > _QUOTE_LIMIT:
        text = text[: _QUOTE_LIMIT - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def parse_duration(text: str) -> float:
    """``"250ms"``, ``"2s"``, ``"1.5m"``, ``"1h"`` -> seconds. No sign, no bare numbers, one unit."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {quote(text)} (use e.g. 250ms, 2s, 1m)")
    return float(Decimal(match["number"]) * _SECONDS_PER_UNIT[match["unit"]])


def format_duration(seconds: float) -> str:
    """Seconds -> the duration string a message shows for them, in the largest whole unit: 0.25 -> ``"250ms"``,
    90 -> ``"90s"``, 300 -> ``"5m"``. ``parse_duration`` reads every result back to the same float."""
    value = Decimal(repr(seconds))
    if value == 0:
        return "0s"
    for unit in ("h", "m", "s"):
        if value % _SECONDS_PER_UNIT[unit] == 0:
            return f"{value // _SECONDS_PER_UNIT[unit]}{unit}"
    return f"{(value / _SECONDS_PER_UNIT['ms']).normalize():f}ms"


def parse_size(value: int | str) -> int:
    """A byte count: an integer, or ``"512KiB"``, ``"10MiB"``, ``"1GiB"``, ``"10KB"``, ``"1MB"``, ``"64B"``."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must be >= 0")
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"invalid size {quote(value)} (use e.g. 8190, 512KiB, 10MiB, 1MB)")
    return int(match["number"]) * _BYTES_PER_UNIT[match["unit"]]


def parse_address(text: str) -> Address:
    """``"host:port"`` or ``"[ipv6]:port"`` -> ``Address`` (IPv6 host stored without brackets)."""
    if "://" in text:
        raise ValueError(f"invalid address {quote(text)} (expected host:port, not a URL)")
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        if not bracket:
            raise ValueError(f"invalid address {quote(text)} (expected [host]:port)")
        _check_ipv6(text, host)
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError(f"invalid address {quote(text)} (expected host:port)")
        _check_host(text, host)
    if _PORT.fullmatch(port) is None or not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid address {quote(text)} (port must be 1..65535)")
    return Address(host, int(port))


def _check_host(text: str, host: str) -> None:
    if not host:
        raise ValueError(f"invalid address {quote(text)} (host is empty)")
    if ":" in host:
        raise ValueError(f"invalid address {quote(text)} (write an IPv6 host in brackets, e.g. [::1]:8080)")
    if _HOST.fullmatch(host) is None:
        raise ValueError(f"invalid address {quote(text)} (invalid host {quote(host)})")


def _check_ipv6(text: str, host: str) -> None:
    if not host:
        raise ValueError(f"invalid address {quote(text)} (host is empty)")
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"invalid address {quote(text)} ({quote(host)} is not an IPv6 address)") from None
