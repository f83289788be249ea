"""policy.engine_embedded: values as the contract wants them (boolean, object, false, undefined), v0 and v1 syntax,
data documents, every load error with its exact message, and the input paths a policy reads (input_refs), checked
against the engine itself: the decision on an input cut down to those paths must not change."""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from policy.bundle import Bundle, build_tarball, load_bundle
from policy.engine import UNDEFINED, PolicyError, PolicyLoadError
from policy.engine_embedded import EmbeddedEngine, available_builtins

ENVOY = """package envoy.authz

import rego.v1

default allow := false

http_request := input.attributes.request.http

allow if {
	http_request.method == "GET"
	glob.match("/orders/*", ["/"], http_request.path)
	input.meshgate.principal.sub in data.envoy.readers
}

allow if {
	http_request.method == "POST"
	"admin" in input.meshgate.principal.roles
}
"""

REQUEST: dict[str, Any] = {
    "attributes": {
        "source": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 51234}}},
        "request": {
            "http": {
                "id": "r1",
                "method": "GET",
                "path": "/orders/1",
                "host": "orders",
                "headers": {"x-team": "blue", "accept": "*/*"},
            }
        },
    },
    "parsed_path": ["orders", "1"],
    "parsed_query": {},
    "parsed_body": None,
    "meshgate": {"service": "orders", "route": "orders-read", "principal": {"sub": "alice", "roles": ["user"]}},
}


def bundle_of(tmp_path: Path, files: dict[str, str]) -> Bundle:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return load_bundle(tmp_path)


def engine_of(tmp_path: Path, policy: str, decision: str = "x/decision", **files: str) -> EmbeddedEngine:
    return EmbeddedEngine(bundle_of(tmp_path, {"policy/x.rego": policy, **files}), decision)


# --------------------------------------------------------------------------------------------- values


def test_the_envoy_example_allows_and_denies(tmp_path: Path) -> None:
    engine = EmbeddedEngine(
        bundle_of(tmp_path, {"envoy.rego": ENVOY, "envoy/data.json": '{"readers": ["alice"]}'}), "envoy/authz/allow"
    )
    assert engine.evaluate_sync(REQUEST) is True
    other = copy.deepcopy(REQUEST)
    other["meshgate"]["principal"]["sub"] = "bob"
    assert engine.evaluate_sync(other) is False
    assert (engine.name, engine.revision, engine.decision) == ("embedded", engine.bundle.revision, "envoy/authz/allow")


@pytest.mark.parametrize(
    ("rule", "value"),
    [
        pytest.param("decision := true", True, id="true"),
        pytest.param("decision := false", False, id="false"),
        pytest.param("decision if input.nope", UNDEFINED, id="undefined"),
        pytest.param("decision := null", None, id="null-is-not-undefined"),
        pytest.param('decision := "<undefined>"', "<undefined>", id="a-string-that-looks-undefined"),
        pytest.param(
            'decision := {"allowed": false, "http_status": 403, "headers": {"x": "y"}, "reason": input.user}',
            {"allowed": False, "http_status": 403, "headers": {"x": "y"}, "reason": "alice"},
            id="object",
        ),
        pytest.param("decision contains x if some x in [2, 1]", [1, 2], id="set-as-sorted-array"),
        pytest.param('decision := {"why": {x | some x in ["b", "a", 1]}}', {"why": [1, "a", "b"]}, id="nested-set"),
        pytest.param("decision := 1.5", 1.5, id="number"),
    ],
)
def test_result_values(tmp_path: Path, rule: str, value: object) -> None:
    engine = engine_of(tmp_path, f"package x\n\n{rule}\n")
    assert engine.evaluate_sync({"user": "alice"}) == value
    assert engine.evaluate_sync({"user": "alice"}) is not UNDEFINED or value is UNDEFINED


async def test_evaluate_is_the_async_form(tmp_path: Path) -> None:
    engine = engine_of(tmp_path, "package x\n\ndecision := input.n + 1\n")
    assert await engine.evaluate({"n": 1}) == 2
    assert await engine.evaluate({}) is UNDEFINED
    await engine.close()


def test_no_input_is_kept_between_calls(tmp_path: Path) -> None:
    engine = engine_of(tmp_path, "package x\n\ndecision := input.a\n")
    assert engine.evaluate_sync({"a": 1}) == 1
    assert engine.evaluate_sync({}) is UNDEFINED


def test_rego_v0_bundle(tmp_path: Path) -> None:
    policy = "package x\n\ndefault decision = false\n\ndecision { input.user == data.x.admin }\n"
    engine = engine_of(tmp_path, policy, **{".manifest": '{"rego_version": 0}', "x/data.json": '{"admin": "root"}'})
    assert engine.evaluate_sync({"user": "root"}) is True
    assert engine.evaluate_sync({"user": "bob"}) is False


def test_v0_syntax_in_a_v1_bundle_is_a_parse_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        engine_of(tmp_path, "package x\n\ndecision { true }\n")
    assert str(caught.value) == "policy/x.rego:3: parse error: `if` keyword is required before rule body"


def test_data_json_is_visible_to_rules(tmp_path: Path) -> None:
    policy = "package x\n\ndecision := data.limits[input.tier]\n"
    engine = engine_of(tmp_path, policy, **{"limits/data.json": '{"gold": 100, "free": 1}'})
    assert engine.evaluate_sync({"tier": "gold"}) == 100
    assert engine.evaluate_sync({"tier": "none"}) is UNDEFINED


def test_tarball_bundle(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "envoy").mkdir(parents=True)
    (source / "envoy.rego").write_text(ENVOY)
    (source / "envoy/data.json").write_text('{"readers": ["alice"]}')
    build_tarball(source, tmp_path / "b.tar.gz")
    assert EmbeddedEngine(load_bundle(tmp_path / "b.tar.gz"), "envoy/authz/allow").evaluate_sync(REQUEST) is True


def test_the_shipped_policy_loads(tmp_path: Path) -> None:
    shipped = Path(__file__).parents[3] / "policy" / "rego"
    engine = EmbeddedEngine(load_bundle(shipped), "meshgate/authz/allow")
    assert isinstance(engine.evaluate_sync(REQUEST), dict)
    assert ("meshgate", "service") not in engine.input_refs


def test_evaluation_errors_are_policy_errors(tmp_path: Path) -> None:
    engine = engine_of(tmp_path, "package x\n\ndecision := 1 if input.a\n\ndecision := 2 if input.b\n")
    assert engine.evaluate_sync({"a": True}) == 1
    with pytest.raises(PolicyError) as caught:
        engine.evaluate_sync({"a": True, "b": True})
    assert str(caught.value) == (
        "embedded policy evaluation failed: policy/x.rego:5: rule conflicts with rule at policy/x.rego:3:1"
    )
    with pytest.raises(PolicyError) as caught:
        engine.evaluate_sync({"a": object()})  # not JSON: the contract's input builder never makes one
    assert str(caught.value) == "embedded policy evaluation failed: object cannot be converted to RegoValue"


# --------------------------------------------------------------------------------------------- load errors


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        pytest.param(
            "package x\n\ndecision if {\n\tinput.a ==\n}\n",
            "policy/x.rego:5: parse error: expecting expression",
            id="parse-error",
        ),
        pytest.param(
            "package x\n\ndecision if {\n\t[ok, _, _] := io.jwt.decode_verify(input.token, {})\n\tok\n}\n",
            "policy/x.rego:4: built-in io.jwt.decode_verify is not available in the embedded engine (use "
            "input.meshgate.principal, which holds the verified JWT claims, or authz.engine: opa)",
            id="jwt",
        ),
        pytest.param(
            'package x\n\ndecision if http.send({"method": "GET", "url": "http://pdp"}).status_code == 200\n',
            "policy/x.rego:3: built-in http.send is not available in the embedded engine (regorus only stubs it, it "
            "would always be undefined; use authz.engine: opa)",
            id="http-send",
        ),
        pytest.param(
            "package x\n\ndecision := true\n\nunused if foo.bar(1)\n\nalso if crypto.sha256(input.a) == input.b\n",
            "policy/x.rego:5: built-in foo.bar is not available in the embedded engine (use authz.engine: opa if OPA "
            "has it)\npolicy/x.rego:7: built-in crypto.sha256 is not available in the embedded engine (use "
            "authz.engine: opa if OPA has it)",
            id="every-unknown-function-even-unreachable",
        ),
        pytest.param(
            "package x\n\ndecision if data.lib.missing(1)\n",
            "policy/x.rego:3: function data.lib.missing is not defined in the bundle",
            id="missing-user-function",
        ),
        pytest.param(
            "package x\n\ndecision := true\n\nother if { y == 1 }\n",
            "policy/x.rego:5: use of undefined variable `y` is unsafe",
            id="unsafe-variable",
        ),
        pytest.param(
            "package x\n\ndecision := true\n\nf(a) := a\n\nf(a, b) := b\n",
            "policy/x.rego:7: data.x.f was previously defined with 1 arguments.",
            id="arity-clash",
        ),
    ],
)
def test_load_errors(tmp_path: Path, policy: str, message: str) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        engine_of(tmp_path, policy)
    assert str(caught.value) == message


def test_parse_errors_of_every_module_are_reported(tmp_path: Path) -> None:
    files = {"a.rego": "package a\n\nallow if {\n", "b/b.rego": "package b\n\nallow := \n"}
    with pytest.raises(PolicyLoadError) as caught:
        EmbeddedEngine(bundle_of(tmp_path, files), "a/allow")
    assert str(caught.value).splitlines() == [
        "a.rego:4: parse error: expecting expression",
        "b/b.rego:4: parse error: expecting expression",
    ]


def test_functions_in_the_bundle_and_builtins_are_accepted(tmp_path: Path) -> None:
    policy = (
        "package x\n\nimport data.lib\n\ndouble(n) := n * 2\n\n"
        'decision if { double(input.n) == lib.inc(3); net.cidr_contains("10.0.0.0/8", input.ip); print("ok") }\n'
    )
    engine = engine_of(tmp_path, policy, **{"lib.rego": "package lib\n\ninc(n) := n + 1\n"})
    assert engine.evaluate_sync({"n": 2, "ip": "10.1.2.3"}) is True
    assert {"glob.match", "net.cidr_contains", "print"} <= available_builtins()
    assert not {"http.send", "io.jwt.decode_verify"} & available_builtins()


@pytest.mark.parametrize(
    ("decision", "message"),
    [
        pytest.param(
            "meshgate/authz/allow",
            "decision meshgate/authz/allow: package meshgate.authz is not in the bundle (its packages: lib, x)",
            id="no-package",
        ),
        pytest.param(
            "x/allow",
            "decision x/allow: package x has no rule allow (its rules: decision, helper, obj[_])",
            id="no-rule",
        ),
        pytest.param("x/helper", "decision x/helper: helper is a function, not a rule", id="function"),
    ],
)
def test_decision_must_name_a_rule(tmp_path: Path, decision: str, message: str) -> None:
    files = {
        "policy/x.rego": "package x\n\ndecision := true\n\nhelper(a) := a\n\nobj[k] := 1 if some k in input.ks\n",
        "lib.rego": "package lib\n\nq := 1\n",
    }
    with pytest.raises(PolicyLoadError) as caught:
        EmbeddedEngine(bundle_of(tmp_path, files), decision)
    assert str(caught.value) == message


def test_partial_object_rule_as_decision(tmp_path: Path) -> None:
    engine = engine_of(tmp_path, "package x\n\ndecision[k] := 1 if some k in input.ks\n")
    assert engine.evaluate_sync({"ks": ["a"]}) == {"a": 1}


def test_unsafe_tar_member_never_reaches_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("../x.rego")
        info.size = 0
        archive.addfile(info)
    with pytest.raises(PolicyLoadError, match=r"^\.\./x\.rego: unsafe member name"):
        load_bundle(path)


# --------------------------------------------------------------------------------------------- input_refs

HTTP = ("attributes", "request", "http")


def prune(document: Any, paths: frozenset[tuple[str, ...]]) -> Any:
    """``document`` keeping only ``paths`` (and the objects on the way to them)."""
    if () in paths or not isinstance(document, dict):
        return document
    kept: dict[str, Any] = {}
    for key in {path[0] for path in paths if path}:
        if key in document:
            kept[key] = prune(document[key], frozenset(path[1:] for path in paths if path and path[0] == key))
    return kept


INPUTS: list[dict[str, Any]] = [
    REQUEST,
    {},
    {"a": {"b": {"c": 1, "d": 2}}, "x": {"k": 1}, "list": [1, 2], "flag": True, "n": 1},
    {"a": {}, "b": {"c": 1}, "x": {"k": 2, "j": 1}, "list": [], "flag": False, "h": {"one": {"y": 1}}, "k": "one"},
    {"a": {"b": 1, "x": 2}, "c": True, "b": {"x": 2}, "parsed_path": ["orders", "1"], "arr": [3, 4]},
    {"a": "string", "x": [1], "pairs": [["a", 1]], "s": ["v"], "o": {"k": "v"}, "user": "u"},
    {"attributes": {"request": {"http": {"method": "POST", "headers": {}}}}, "meshgate": {"principal": None}},
    {"attributes": {"request": {"http": {"method": "GET", "headers": {"x-team": "red"}}}}},
]

# (policy after "package x\nimport rego.v1\n", expected input_refs)
REFS = [
    pytest.param(
        "http_request := input.attributes.request.http\ndefault decision := false\n"
        'decision if {\n  http_request.method == "GET"\n  http_request.headers["x-team"] == "blue"\n}\n',
        {(*HTTP, "method"), (*HTTP, "headers", "x-team")},
        id="envoy-package-alias",
    ),
    pytest.param(
        'http_request := input.attributes.request.http\ndecision if data.x.http_request.method == "GET"\n',
        {(*HTTP, "method")},
        id="alias-through-data-ref",
    ),
    pytest.param(
        'req := input.attributes.request\nhttp := req.http\ndecision if http.method == "GET"\n',
        {(*HTTP, "method")},
        id="alias-of-alias-rule",
    ),
    pytest.param(
        "decision if {\n  x := input.a.b\n  x.c == 1\n}\n",
        {("a", "b", "c")},
        id="local-alias",
    ),
    pytest.param(
        "decision if {\n  x := input.a\n  y := x.b\n  y.c == 1\n}\n",
        {("a", "b", "c")},
        id="local-alias-of-alias",
    ),
    pytest.param(
        "decision if {\n  input.a.b = x\n  x.c == 1\n}\n",
        {("a", "b", "c")},
        id="unification-alias",
    ),
    pytest.param(
        "decision if {\n  x := input.a\n  true\n}\n",
        {("a",)},
        id="unused-local-alias-reads-definedness",
    ),
    pytest.param(
        "decision if {\n  x := input.a\n  not x.b\n}\n",
        {("a",)},
        id="alias-only-under-not",
    ),
    pytest.param(
        "decision if {\n  x := input.a\n  count([1 | x.b]) == 0\n}\n",
        {("a",)},
        id="alias-only-in-comprehension",
    ),
    pytest.param(
        "decision if {\n  x = input.a\n  x = input.b\n  x.c == 1\n}\n",
        {("a",), ("b",)},
        id="bound-twice-compares-whole",
    ),
    pytest.param(
        "decision if {\n  some k\n  input.x[k] == 1\n}\n",
        {("x",)},
        id="some-k-index",
    ),
    pytest.param(
        "decision if {\n  x := input.h[input.k]\n  x.y == 1\n}\n",
        {("h",), ("k",)},
        id="dynamic-index-in-alias",
    ),
    pytest.param(
        'decision if walk(input, [["a"], 1])\n',
        {()},
        id="walk-input",
    ),
    pytest.param(
        "decision if input == {}\n",
        {()},
        id="whole-input",
    ),
    pytest.param(
        'decision := object.get(input, "a", 0)\n',
        {()},
        id="object-get-input",
    ),
    pytest.param(
        'decision := object.get(input.a, "b", 0)\n',
        {("a",)},
        id="object-get-input-a",
    ),
    pytest.param(
        "req := input.attributes.request.http\ndecision if is_object(req)\n",
        {HTTP},
        id="alias-passed-whole-to-function",
    ),
    pytest.param(
        'req := input.attributes.request.http\ndecision if { some h in req.headers; h == "blue" }\n',
        {(*HTTP, "headers")},
        id="alias-iterated",
    ),
    pytest.param(
        "req := input.attributes.request.http\ndecision := req\n",
        {HTTP},
        id="alias-returned",
    ),
    pytest.param(
        "decision := input.a\n",
        {("a",)},
        id="decision-is-an-alias",
    ),
    pytest.param(
        "req := input.attributes.request.http\ndecision if count(data.x) > 0\n",
        {HTTP},
        id="package-read-whole",
    ),
    pytest.param(
        "r := input.a if input.c\nr := input.b if not input.c\ndecision if r.x == 2\n",
        {("a",), ("b",), ("c",)},
        id="rule-defined-twice-is-read-whole",
    ),
    pytest.param(
        "r := input.a if input.c\nelse := input.b\ndecision if r.x == 2\n",
        {("a", "x"), ("b", "x"), ("c",)},
        id="else-alias",
    ),
    pytest.param(
        'decision if input.parsed_path[0] == "orders"\n',
        {("parsed_path",)},
        id="numeric-index-stops",
    ),
    pytest.param(
        'decision if input["attributes"].request.http.method == "GET"\n',
        {(*HTTP, "method")},
        id="string-brackets-extend",
    ),
    pytest.param(
        "decision if input.x with input.y as 1\n",
        {("x",)},
        id="with-target-is-not-a-read",
    ),
    pytest.param(
        "f(v) := v if input.flag\ndecision if f(1) == 1\n",
        {("flag",)},
        id="function-reads-input",
    ),
    pytest.param(
        "s contains input.a.b if true\ndecision if count(s) > 0\n",
        {("a", "b")},
        id="set-rule-key",
    ),
    pytest.param(
        "decision if {\n  some k, v in input.o\n  k == v\n}\n",
        {("o",)},
        id="some-in",
    ),
    pytest.param(
        "decision if {\n  every v in input.arr { v > 2 }\n}\n",
        {("arr",)},
        id="every",
    ),
    pytest.param(
        "decision := [v | some [k, v] in input.pairs; k == input.user]\n",
        {("pairs",), ("user",)},
        id="comprehension-pattern",
    ),
    pytest.param(
        "decision if {\n  x := input.a\n  y := {k | some k in x}\n  count(y) > 0\n}\n",
        {("a",)},
        id="alias-iterated-in-comprehension",
    ),
]


@pytest.mark.parametrize(("policy", "expected"), REFS)
def test_input_refs(tmp_path: Path, policy: str, expected: set[tuple[str, ...]]) -> None:
    engine = engine_of(tmp_path, "package x\n\nimport rego.v1\n\n" + policy)
    assert engine.input_refs == frozenset(expected)
    for document in INPUTS:  # the property the cache relies on
        full = _safe(engine, document)
        assert _safe(engine, prune(document, engine.input_refs)) == full, document


def _safe(engine: EmbeddedEngine, document: dict[str, Any]) -> object:
    try:
        return engine.evaluate_sync(document)
    except PolicyError:
        return "error"


def test_input_refs_import_alias_and_other_modules(tmp_path: Path) -> None:
    files = {
        "policy/x.rego": (
            "package x\n\nimport rego.v1\nimport data.lib\nimport input.attributes.request.http as req\n\n"
            'decision if {\n  req.method == "GET"\n  lib.request.host == "orders"\n}\n'
        ),
        "lib.rego": "package lib\n\nrequest := input.attributes.request.http\n\nunused if input.other.thing\n",
    }
    engine = EmbeddedEngine(bundle_of(tmp_path, files), "x/decision")
    assert engine.input_refs == {(*HTTP, "method"), (*HTTP, "host"), ("other", "thing")}


def test_input_refs_in_v0_syntax(tmp_path: Path) -> None:
    policy = (
        "package x\n\nhttp_request = input.attributes.request.http\n\n"
        'default decision = false\n\ndecision { http_request.method == "GET" }\n'
    )
    engine = engine_of(tmp_path, policy, **{".manifest": json.dumps({"rego_version": 0})})
    assert engine.input_refs == {(*HTTP, "method")}


def test_input_refs_of_the_envoy_example(tmp_path: Path) -> None:
    engine = EmbeddedEngine(bundle_of(tmp_path, {"envoy.rego": ENVOY}), "envoy/authz/allow")
    assert engine.input_refs == {
        (*HTTP, "method"),
        (*HTTP, "path"),
        ("meshgate", "principal", "sub"),
        ("meshgate", "principal", "roles"),
    }


def test_null_from_the_input_is_not_undefined(tmp_path: Path) -> None:
    engine = engine_of(tmp_path, "package x\n\ndecision := input.v\n")
    assert engine.evaluate_sync({"v": None}) is None
    assert engine.evaluate_sync({}) is UNDEFINED
    assert engine.evaluate_sync({"v": False}) is False
