"""Tokens file parsing, bearer authentication and role/service checks."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.config.errors import ConfigError
from gateway.configservice.auth import Token, TokenSet, generate_tokens, load_tokens, parse_tokens

SECRET = "s" * 20


def test_parse_tokens() -> None:
    tokens = parse_tokens(
        {
            "tokens": [
                {"name": "ops", "token": SECRET, "role": "admin"},
                {"name": "orders-gw", "token": "g" * 20, "role": "gateway", "service": "orders"},
            ]
        }
    )
    assert [(t.name, t.role, t.service) for t in tokens.tokens] == [
        ("ops", "admin", None),
        ("orders-gw", "gateway", "orders"),
    ]
    assert SECRET not in repr(tokens.tokens)


@pytest.mark.parametrize(
    ("document", "problems"),
    [
        pytest.param(
            None,
            [
                "(document): expected a mapping with one key, tokens",
                "tokens: expected a non-empty list of {name, token, role, service?}",
            ],
            id="empty",
        ),
        pytest.param(
            {"tokens": []}, ["tokens: expected a non-empty list of {name, token, role, service?}"], id="no-tokens"
        ),
        pytest.param(
            {"tokens": [{"name": "a", "token": "short", "role": "root", "extra": 1}]},
            [
                "tokens[0].extra: unknown key",
                "tokens[0].token: required: at least 16 characters, no spaces",
                "tokens[0].role: must be admin or gateway",
            ],
            id="bad-entry",
        ),
        pytest.param(
            {
                "tokens": [
                    {"name": "a", "token": SECRET, "role": "admin"},
                    {"name": "a", "token": SECRET, "role": "admin"},
                ]
            },
            ["tokens[1].name: duplicate name 'a'", "tokens[1].token: the same token as another entry"],
            id="duplicates",
        ),
        pytest.param(
            {"tokens": [{"name": "a", "token": SECRET, "role": "gateway", "service": "Orders"}]},
            ["tokens[0].service: must be a service name (lower-case letters, digits, . _ -)"],
            id="bad-service",
        ),
    ],
)
def test_rejected_tokens(document: Any, problems: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tokens(document)
    assert [str(p) for p in caught.value.problems] == problems
    assert SECRET not in str(caught.value)


def test_authenticate() -> None:
    tokens = TokenSet([Token("ops", "admin", None, SECRET), Token("gw", "gateway", None, "g" * 20)])
    assert tokens.authenticate(f"Bearer {SECRET}") == tokens.tokens[0]
    assert tokens.authenticate(f"bearer   {'g' * 20}  ") == tokens.tokens[1]
    for header in (None, "", "Bearer", "Bearer ", f"Basic {SECRET}", f"Bearer {SECRET}x", SECRET):
        assert tokens.authenticate(header) is None


@pytest.mark.parametrize(
    ("token", "access", "service", "allowed"),
    [
        (Token("a", "admin"), "write", "orders", True),
        (Token("a", "admin"), "write", None, True),
        (Token("g", "gateway"), "write", "orders", False),
        (Token("g", "gateway"), "read", "orders", True),
        (Token("g", "gateway"), "register", "orders", True),
        (Token("g", "gateway", "orders"), "read", "payments", False),
        (Token("g", "gateway", "orders"), "register", "orders", True),
        (Token("g", "gateway", "orders"), "read", None, True),
        (Token("a", "admin", "orders"), "write", None, False),
    ],
)
def test_allows(token: Token, access: Any, service: str | None, allowed: bool) -> None:
    assert (token.allows(access, service) is None) is allowed


def test_generate_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    generated = generate_tokens(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(t.name, t.role) for t in generated.tokens] == [("admin", "admin"), ("gateway", "gateway")]
    loaded = load_tokens(path)
    assert [t.secret for t in loaded.tokens] == [t.secret for t in generated.tokens]
    assert all(len(t.secret) >= 40 for t in loaded.tokens)
    with pytest.raises(FileExistsError):
        generate_tokens(path)  # never overwritten


def test_unreadable_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read tokens file"):
        load_tokens(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("tokens: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_tokens(tmp_path / "bad.yaml")
