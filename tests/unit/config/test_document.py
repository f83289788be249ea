"""The strict YAML loader, the canonical hash and redaction."""

from __future__ import annotations

import hashlib
import json

import pytest

from gateway.config.document import REDACTED, canonical_hash, load_text, redact
from gateway.config.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # YAML 1.1 booleans stay strings: `on: [reset]` keeps its key, `country: NO` its value.
        ("on: [reset]", {"on": ["reset"]}),
        ("a: [yes, no, on, off, y, n, NO]", {"a": ["yes", "no", "on", "off", "y", "n", "NO"]}),
        ("a: [true, True, TRUE, false, False, FALSE]", {"a": [True, True, True, False, False, False]}),
        # Decimal integers only; sexagesimal and dates stay strings.
        ("a: [010, -2, +3, 0]", {"a": [10, -2, 3, 0]}),
        ("a: 1:30", {"a": "1:30"}),
        ("a: 2024-01-02", {"a": "2024-01-02"}),
        ("a: [1.5, .5, 1e3, -2.0]", {"a": [1.5, 0.5, 1000.0, -2.0]}),
        ("a: [~, null, ]", {"a": [None, None]}),
        ("a:", {"a": None}),
        ("a: '5'", {"a": "5"}),
        ('{"a": [1, "x", true, null], "b": {"c": 1.5}}', {"a": [1, "x", True, None], "b": {"c": 1.5}}),
        # Merge keys are plain YAML and handy for shared defaults; explicit keys override merged ones.
        ("d: &d {x: 1, y: 2}\nm: {<<: *d, x: 3}", {"d": {"x": 1, "y": 2}, "m": {"x": 3, "y": 2}}),
        ("a: &a [1]\nb: *a", {"a": [1], "b": [1]}),
    ],
)
def test_scalars_resolve_as_yaml_1_2(text: str, value: object) -> None:
    assert load_text(text) == value


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n"])
def test_empty_document_is_none(text: str) -> None:
    assert load_text(text) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\na: 2\n", '(document): duplicate key "a" (lines 1 and 2)'),
        ('{"a": 1, "a": 2}', '(document): duplicate key "a" (line 1)'),
        (
            "routes:\n  - name: a\n    cluster: c\n    name: b\n",
            'routes[0]: duplicate key "name" (lines 2 and 4)',
        ),
        (
            "a:\n  b: {x: 1, x: 2}\n  c: [{y: 1}, {y: 1, y: 2}]\n",
            'a.b: duplicate key "x" (line 2)\na.c[1]: duplicate key "y" (line 3)',
        ),
        (
            "a:\n  - 1\n - 2\n",
            "line 3, column 2: expected <block end>, but found '<block sequence start>'"
            " (while parsing a block mapping at line 1, column 1)",
        ),
        (
            "a: [1\n",
            "line 2, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence"
            " at line 1, column 4)",
        ),
        (
            "a:\n\tb: 1\n",
            "line 2, column 1: found character '\\t' that cannot start any token (while scanning for the next token)",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "line 2, column 1: expected a single document in the stream at line 1, column 1,"
            " but found another document",
        ),
        ("a: *nope\n", "line 1, column 4: found undefined alias 'nope'"),
        ("a: !!set {x}\n", "line 1, column 4: could not determine a constructor for the tag 'tag:yaml.org,2002:set'"),
        (
            "a: !!binary aGk=\n",
            "line 1, column 4: could not determine a constructor for the tag 'tag:yaml.org,2002:binary'",
        ),
        (
            "a: !!python/name:os.system\n",
            "line 1, column 4: could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'",
        ),
        ("a: !!int x\n", 'line 1, column 4: invalid integer "x"'),
        ("a: !!bool maybe\n", 'line 1, column 4: invalid boolean "maybe" (use true or false)'),
        ("a: !!float x\n", "line 1, column 4: invalid number"),
        ("a: \x00\n", "(document): unacceptable character #x0000 at position 3"),
        ("a: &x [*x]\n", "(document): nested too deeply (more than 64 levels)"),
        ("a: " + "[" * 70 + "]" * 70, "(document): nested too deeply (more than 64 levels)"),
    ],
)
def test_rejected(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(text)
    assert str(info.value) == message


def test_alias_bomb_is_rejected() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError) as info:
        load_text("\n".join(lines))
    assert str(info.value) == "(document): too large (more than 200000 values after expanding aliases)"


def test_duplicate_in_aliased_mapping_reported_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_text("a: &a {x: 1, x: 2}\nb: *a\nc: *a\n")
    assert str(info.value) == 'a: duplicate key "x" (line 1)'


def test_merge_key_may_repeat_a_merged_key() -> None:
    assert load_text("base: &b {x: 1}\nm:\n  <<: *b\n  x: 2\n") == {"base": {"x": 1}, "m": {"x": 2}}


def test_canonical_hash_ignores_key_order_and_formatting() -> None:
    expected = hashlib.sha256(b'{"a":1,"b":[true,null,"\xc3\xa9"]}').hexdigest()
    assert canonical_hash({"b": [True, None, "é"], "a": 1}) == expected
    assert canonical_hash(load_text('b: [true, ~, "é"]\na: 1\n')) == expected
    assert canonical_hash(load_text(json.dumps({"a": 1, "b": [True, None, "é"]}, indent=4))) == expected


def test_redact_replaces_credential_values_anywhere() -> None:
    document = {
        "service": "orders",
        "config_service": {"url": "http://x", "token_file": "./gw.token"},
        "tls": {"cert_file": "a.pem", "key_file": "a.key"},
        "users": [{"name": "u", "Password": "p", "api_key": "k", "client_secret": {"nested": 1}}],
        "token": None,
    }
    assert redact(document) == {
        "service": "orders",
        "config_service": {"url": "http://x", "token_file": REDACTED},
        "tls": {"cert_file": "a.pem", "key_file": REDACTED},
        "users": [{"name": "u", "Password": REDACTED, "api_key": REDACTED, "client_secret": REDACTED}],
        "token": REDACTED,
    }


def test_redact_copies() -> None:
    document: dict[str, object] = {"a": {"b": [1]}}
    copy = redact(document)
    assert copy == document
    assert copy["a"] is not document["a"]
