"""Scalar formats: durations, sizes, addresses; every rejection with its exact message."""

from __future__ import annotations

import pytest

from gateway.config.snapshot import Address
from gateway.config.values import format_duration, parse_address, parse_duration, parse_size, quote


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("100ms", 0.1),
        ("0ms", 0.0),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("0.001s", 0.001),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
    ],
)
def test_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.025, "25ms"),
        (0.1, "100ms"),
        (0.7, "700ms"),
        (1.5, "1500ms"),
        (0.0005, "0.5ms"),
        (1.0, "1s"),
        (90.0, "90s"),
        (300.0, "5m"),
        (5400.0, "90m"),
        (7200.0, "2h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds  # what a message shows reads back as the same value


@pytest.mark.parametrize(
    "text",
    ["2x", "", "2", "-1s", "+1s", "1m30s", ".5s", "1.s", "2 s", " 2s", "2S", "1us", "1d", "s", "1e3ms"],
)
def test_duration_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid duration .* \(use e\.g\. 250ms, 2s, 1m\)$") as info:
        parse_duration(text)
    assert str(info.value) == f"invalid duration {quote(text)} (use e.g. 250ms, 2s, 1m)"


@pytest.mark.parametrize(
    ("value", "count"),
    [
        (0, 0),
        (8190, 8190),
        ("8190", 8190),
        ("64B", 64),
        ("10KB", 10_000),
        ("1MB", 1_000_000),
        ("2GB", 2_000_000_000),
        ("512KiB", 512 * 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1024**3),
    ],
)
def test_size(value: int | str, count: int) -> None:
    assert parse_size(value) == count


@pytest.mark.parametrize("text", ["10mb", "1.5MiB", "KiB", "-1", "10 MiB", "1TiB", "", "10k"])
def test_size_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid size") as info:
        parse_size(text)
    assert str(info.value) == f"invalid size {quote(text)} (use e.g. 8190, 512KiB, 10MiB, 1MB)"


def test_negative_size_rejected() -> None:
    with pytest.raises(ValueError, match=r"^must be >= 0$"):
        parse_size(-1)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        ("localhost:1", Address("localhost", 1)),
        ("orders.svc.cluster.local:65535", Address("orders.svc.cluster.local", 65535)),
        ("my_host:80", Address("my_host", 80)),
        ("[::1]:9901", Address("::1", 9901)),
        ("[fe80::1%eth0]:80", Address("fe80::1%eth0", 80)),
        ("0.0.0.0:08080", Address("0.0.0.0", 8080)),
    ],
)
def test_address(text: str, address: Address) -> None:
    assert parse_address(text) == address


def test_address_str_round_trips() -> None:
    assert str(parse_address("[::1]:9901")) == "[::1]:9901"
    assert str(parse_address("127.0.0.1:80")) == "127.0.0.1:80"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo", 'invalid address "foo" (expected host:port)'),
        ("", 'invalid address "" (expected host:port)'),
        (":8080", 'invalid address ":8080" (host is empty)'),
        ("host:", 'invalid address "host:" (port must be 1..65535)'),
        ("host:0", 'invalid address "host:0" (port must be 1..65535)'),
        ("host:65536", 'invalid address "host:65536" (port must be 1..65535)'),
        ("host:http", 'invalid address "host:http" (port must be 1..65535)'),
        ("host:-1", 'invalid address "host:-1" (port must be 1..65535)'),
        ("host:+80", 'invalid address "host:+80" (port must be 1..65535)'),
        ("::1:8080", 'invalid address "::1:8080" (write an IPv6 host in brackets, e.g. [::1]:8080)'),
        ("a b:80", 'invalid address "a b:80" (invalid host "a b")'),
        ("http://a:80", 'invalid address "http://a:80" (expected host:port, not a URL)'),
        ("-a:80", 'invalid address "-a:80" (invalid host "-a")'),
        ("[::1]", 'invalid address "[::1]" (expected [host]:port)'),
        ("[]:80", 'invalid address "[]:80" (host is empty)'),
        ("[nope]:80", 'invalid address "[nope]:80" ("nope" is not an IPv6 address)'),
        ("[::1]:0", 'invalid address "[::1]:0" (port must be 1..65535)'),
    ],
)
def test_address_rejected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid address") as info:
        parse_address(text)
    assert str(info.value) == message


def test_quote_escapes_and_shortens() -> None:
    assert quote('a"b\n') == '"a\\"b\\n"'
    assert quote("x" * 100) == '"' + "x" * 57 + '..."'
