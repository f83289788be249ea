"""e2e: JWT authentication and Rego authorization through a real gateway process.

Real RS256/ES256 tokens are verified against keys a real HTTP server publishes as a JWKS document (Python's
``http.server`` serving a directory); the embedded engine evaluates a bundle on disk; the remote engine talks to the
OPA REST API stand-in (``tests/opa_server.py``, the real OPA engine in its own process). Spans go to the OTLP
receiver, so the decision id can be followed from the response header to the span, the access log and the decision
log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.jwt_tokens import KeyPair, b64url, forge, jwks
from tests.opa_server import opa_server
from tests.otlp_receiver import OtlpHttpReceiver
from tests.procs import Gateway, eventually, free_port, gateway, log_events, metric_sum, stop, wait_http

pytestmark = pytest.mark.e2e

ISSUER = "https://idp.test"
AUDIENCE = "shop"

POLICY = """package meshgate.authz

import rego.v1

default allow := {"allowed": false, "reason": "no rule allows this request"}

allow := {"allowed": true, "headers": {"x-policy": "REVISION"}} if {
	input.meshgate.route == "orders"
	"reader" in input.meshgate.principal.roles
}

allow := {"allowed": false, "http_status": 418, "body": "teapot says no", "headers": {"x-deny": "custom"}} if {
	input.meshgate.route == "custom"
}

allow := true if input.meshgate.route == "maybe"
"""

# The shadow candidate: stricter, it allows only the optional route. Never enforced, only compared.
SHADOW = """package meshgate.authz

import rego.v1

default allow := false

allow if input.meshgate.route == "maybe"
"""


def write_bundle(directory: Path, text: str, revision: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".manifest").write_text(json.dumps({"revision": revision, "roots": ["meshgate"]}))
    (directory / "authz.rego").write_text(text.replace("REVISION", revision))


@contextmanager
def jwks_server(directory: Path) -> Iterator[str]:
    """A real HTTP server publishing ``directory/jwks.json``; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/jwks.json", process=process)
        yield f"http://127.0.0.1:{port}/jwks.json"
    finally:
        stop(process)


@dataclass
class Stack:
    gw: Gateway
    rsa: KeyPair
    ec: KeyPair
    receiver: OtlpHttpReceiver

    def token(self, key: KeyPair | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **claims}
        return (key or self.rsa).sign({k: v for k, v in body.items() if v is not None})


def policy_config(jwks_url: str, upstream: int, bundle: Path, **authz: Any) -> dict[str, Any]:
    routes = [
        {"name": name, "match": {"path_prefix": f"/{name}/"}, "cluster": "a", "rewrite": {"prefix": "/anything/"}}
        for name in ("orders", "custom", "maybe", "open")
    ]
    routes[2]["auth"] = "optional"
    routes[3]["auth"] = "none"
    return {
        "service": "shop",
        "routes": routes,
        "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{upstream}"]}],
        "authn": {
            "jwt": {
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "jwks_url": jwks_url,
                "algorithms": ["RS256", "ES256"],
                "forward_claims": {"sub": "x-user"},
                "max_token_size": "4KiB",
            }
        },
        "authz": {"bundle": str(bundle), "cache": {"ttl": "60s"}, **authz},
    }


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, KeyPair, KeyPair]:
    directory = tmp_path_factory.mktemp("idp")
    rsa, ec = KeyPair.rsa("rsa-1"), KeyPair.ec("ec-1")
    (directory / "jwks.json").write_text(json.dumps(jwks(rsa, ec)))
    return directory, rsa, ec


@pytest.fixture(scope="module")
def jwks_url(keys_dir: tuple[Path, KeyPair, KeyPair]) -> Iterator[str]:
    with jwks_server(keys_dir[0]) as url:
        yield url


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    keys_dir: tuple[Path, KeyPair, KeyPair],
    jwks_url: str,
    upstream_a: int,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("policy")
    write_bundle(tmp / "bundle", POLICY, "r1")
    write_bundle(tmp / "shadow", SHADOW, "s1")
    config = policy_config(jwks_url, upstream_a, tmp / "bundle", shadow={"bundle": str(tmp / "shadow")})
    with OtlpHttpReceiver() as receiver:
        config["telemetry"] = {"tracing": {"otlp_endpoint": receiver.endpoint, "batch": {"delay": "100ms"}}}
        with gateway(tmp, config) as gw:
            yield Stack(gw, keys_dir[1], keys_dir[2], receiver)


async def call(
    url: str, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=sent) as response:
        return response.status, dict(response.headers), await response.read()


async def scrape(gw: Gateway) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{gw.admin_url}/metrics") as response:
        return await response.text()


# --- authentication --------------------------------------------------------------------------------------------


async def test_a_request_without_a_token_gets_the_bearer_challenge(stack: Stack) -> None:
    status, headers, body = await call(f"{stack.gw.url}/orders/1")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="meshgate"'
    reply = json.loads(body)
    assert reply["error"] == "unauthenticated"
    assert "x-decision-id" not in {name.lower() for name in headers}  # refused before any policy decision
    assert metric_sum(await scrape(stack.gw), "meshgate_authn_failures_total", reason="missing_token") >= 1


def _attacks(stack: Stack) -> dict[str, tuple[str, str]]:
    """name -> (token, the reason it must be refused with)."""
    now = int(time.time())
    good = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300}
    valid = stack.rsa.sign(good)
    head, payload, signature = valid.split(".")
    # Alg confusion: an HS256 token whose HMAC secret is the RSA public key, which a naive verifier would accept.
    confusion_input = f"{b64url(json.dumps({'alg': 'HS256', 'kid': 'rsa-1'}).encode())}.{payload}"
    confusion_sig = hmac.new(stack.rsa.public_pem(), confusion_input.encode(), hashlib.sha256).digest()
    tampered = b64url(json.dumps({**good, "sub": "admin"}).encode())
    return {
        "alg-none": (forge({"alg": "none", "kid": "rsa-1"}, good), "disallowed_alg"),
        "alg-confusion": (f"{confusion_input}.{b64url(confusion_sig)}", "disallowed_alg"),
        "expired": (stack.rsa.sign({**good, "exp": now - 3600}), "expired"),
        "not-yet-valid": (stack.rsa.sign({**good, "nbf": now + 3600}), "not_yet_valid"),
        "wrong-issuer": (stack.rsa.sign({**good, "iss": "https://evil.test"}), "wrong_issuer"),
        "wrong-audience": (stack.rsa.sign({**good, "aud": "billing"}), "wrong_audience"),
        "unknown-kid": (KeyPair.rsa("rsa-9").sign(good), "unknown_kid"),
        "tampered-payload": (f"{head}.{tampered}.{signature}", "bad_signature"),
        "truncated": (f"{head}.{payload}", "malformed"),
        "oversized": (stack.rsa.sign({**good, "pad": "x" * 5000}), "too_large"),
        "kid-path": (stack.rsa.sign(good, headers={"kid": "../../etc/passwd"}), "malformed"),
        "foreign-key-same-kid": (KeyPair.rsa("rsa-1").sign(good), "bad_signature"),
    }


async def test_the_attack_corpus_is_refused_with_a_reason_each(stack: Stack) -> None:
    attacks = _attacks(stack)
    before = await scrape(stack.gw)
    for name, (token, _reason) in attacks.items():
        status, headers, body = await call(f"{stack.gw.url}/orders/1", token)
        assert status == 401, name
        challenge = headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="meshgate", error="invalid_token", error_description="'), name
        assert json.loads(body)["error"] == "unauthenticated", name
    after = await scrape(stack.gw)
    expected: dict[str, int] = {}
    for _token, reason in attacks.values():
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        grown = metric_sum(after, "meshgate_authn_failures_total", reason=reason) - metric_sum(
            before, "meshgate_authn_failures_total", reason=reason
        )
        assert grown == count, reason
    # No token of the corpus reached the log, valid signature or not.
    text = stack.gw.log_path.read_text()
    for name, (token, _reason) in attacks.items():
        # The signature part (or, unsigned, the payload) of each token: a fragment no log line may hold.
        fragment = token.split(".")[-1] or token.split(".")[1]
        assert fragment not in text, name


# --- authorization -----------------------------------------------------------------------------------------------


async def test_allowed_by_claims_with_forwarded_claim_and_policy_headers(stack: Stack) -> None:
    token = stack.token(roles=["reader"])
    status, headers, body = await call(f"{stack.gw.url}/orders/1", token, {"x-user": "mallory"})
    assert status == 200
    echoed = json.loads(body)["headers"]
    assert echoed["x-user"] == "alice"  # from the verified token; the client's copy was dropped
    assert echoed["x-policy"] == "r1"  # an allowing object result's headers go to the upstream
    uuid.UUID(headers["x-decision-id"])


async def test_es256_token_without_the_role_is_denied_with_the_policy_reason(stack: Stack) -> None:
    status, headers, body = await call(f"{stack.gw.url}/orders/1", stack.token(stack.ec))
    assert status == 403
    reply = json.loads(body)
    assert reply["error"] == "forbidden"
    assert reply["reason"] == reply["message"] == "no rule allows this request"
    assert reply["decision_id"] == headers["x-decision-id"]


async def test_policy_status_headers_and_body_shape_the_deny(stack: Stack) -> None:
    status, headers, body = await call(f"{stack.gw.url}/custom/x", stack.token(roles=["reader"]))
    assert (status, body) == (418, b"teapot says no")
    assert headers["x-deny"] == "custom"
    uuid.UUID(headers["x-decision-id"])


async def test_optional_route_admits_no_token_but_never_a_bad_one(stack: Stack) -> None:
    status, headers, _ = await call(f"{stack.gw.url}/maybe/x")
    assert status == 200
    assert "x-decision-id" in {name.lower() for name in headers}
    expired = stack.token(exp=int(time.time()) - 600)
    status, _, _ = await call(f"{stack.gw.url}/maybe/x", expired)
    assert status == 401


async def test_auth_none_route_skips_both_but_still_strips_claim_headers(stack: Stack) -> None:
    status, headers, body = await call(f"{stack.gw.url}/open/x", headers={"X-User": "mallory"})
    assert status == 200
    assert "x-decision-id" not in {name.lower() for name in headers}
    assert "x-user" not in json.loads(body)["headers"]


async def test_decision_id_is_the_same_in_header_span_access_log_and_decision_log(stack: Stack) -> None:
    token = stack.token(roles=["reader"])
    status, headers, _ = await call(f"{stack.gw.url}/orders/trace?token=s3cr3t", token, {"Cookie": "sid=c00kie"})
    assert status == 200
    decision_id = headers["x-decision-id"]
    spans = stack.receiver.wait_for(lambda s: s.attributes.get("meshgate.authz.decision_id") == decision_id, count=2)
    authz = next(s for s in spans if s.name == "authz")
    server = next(s for s in spans if s.kind == "SERVER")
    assert (authz.kind, authz.parent_span_id, authz.trace_id) == ("INTERNAL", server.span_id, server.trace_id)
    assert authz.attributes["meshgate.authz.allowed"] is True
    assert authz.attributes["meshgate.authz.engine"] == "embedded"
    assert authz.attributes["meshgate.authz.cache"] in ("hit", "miss")

    def lines() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        access = [r for r in log_events(stack.gw, "request") if r.get("decision_id") == decision_id]
        decided = [r for r in log_events(stack.gw, "decision") if r.get("decision_id") == decision_id]
        return access, decided

    async def written() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        found = lines()
        return found if all(found) else None

    access, decided = await eventually(written, 5, "the access and decision log lines")
    assert access[0]["trace_id"] == server.trace_id
    enforced = next(r for r in decided if not r.get("shadow"))
    assert enforced["trace_id"] == server.trace_id
    assert enforced["bundle_revision"] == "r1"
    assert enforced["decision"] == "meshgate/authz/allow"
    assert enforced["result"]["allowed"] is True
    http = enforced["input"]["attributes"]["request"]["http"]
    assert http["headers"]["authorization"] == http["headers"]["cookie"] == "<redacted>"
    assert enforced["input"]["meshgate"]["principal"]["sub"] == "alice"
    text = stack.gw.log_path.read_text()
    for secret in (token, "s3cr3t", "c00kie"):
        assert secret not in text


async def test_second_identical_decision_is_a_cache_hit(stack: Stack) -> None:
    # The policy reads only the route and the roles (not sub): that is the key, so the roles must be new here.
    token = stack.token(roles=["reader", "cache-test"])
    before = await scrape(stack.gw)
    for _ in range(2):
        assert (await call(f"{stack.gw.url}/orders/cached", token))[0] == 200
    after = await scrape(stack.gw)

    def grown(cache: str) -> float:
        name, labels = "meshgate_authz_decisions_total", {"http_route": "orders", "decision": "allow", "cache": cache}
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert (grown("miss"), grown("hit")) == (1, 1)


async def test_shadow_policy_is_counted_and_logged_but_never_enforced(stack: Stack) -> None:
    before = await scrape(stack.gw)
    status, headers, _ = await call(f"{stack.gw.url}/orders/shadow", stack.token(roles=["reader"]))
    assert status == 200  # the shadow denies this one: not enforced
    after = await scrape(stack.gw)
    name = "meshgate_authz_shadow_disagreements_total"
    assert metric_sum(after, name, http_route="orders") - metric_sum(before, name, http_route="orders") == 1
    assert metric_sum(after, "meshgate_authz_shadow_decisions_total", http_route="orders", decision="deny") >= 1

    async def shadow_logged() -> list[dict[str, Any]]:
        decision_id = headers["x-decision-id"]
        return [r for r in log_events(stack.gw, "decision") if r.get("decision_id") == decision_id and r.get("shadow")]

    shadow_lines = await eventually(shadow_logged, 5, "the shadow decision line")
    assert (shadow_lines[0]["outcome"], shadow_lines[0]["enforced"]) == ("deny", "allow")


# --- reloads, remote engine, failures ---------------------------------------------------------------------------


async def test_bundle_change_is_never_answered_from_the_old_cache(
    tmp_path: Path, keys_dir: tuple[Path, KeyPair, KeyPair], jwks_url: str, upstream_a: int
) -> None:
    write_bundle(tmp_path / "bundle", POLICY, "r1")
    config = policy_config(jwks_url, upstream_a, tmp_path / "bundle")
    with gateway(tmp_path, config) as gw:
        stack = Stack(gw, keys_dir[1], keys_dir[2], receiver=None)  # type: ignore[arg-type]
        token = stack.token(roles=["reader"])
        for _ in range(2):  # the second is a cache hit
            assert (await call(f"{gw.url}/orders/1", token))[0] == 200
        # The new revision takes the role away; the cached allow must not outlive the bundle it came from.
        write_bundle(tmp_path / "bundle", POLICY.replace('"reader" in', '"writer" in'), "r2")

        async def reloaded() -> list[dict[str, Any]]:
            return [r for r in log_events(gw, "policy_reloaded") if r.get("revision") == "r2"]

        await eventually(reloaded, 10, "the bundle reload")
        status, _, _ = await call(f"{gw.url}/orders/1", token)
        assert status == 403
        exposition = await scrape(gw)
        assert metric_sum(exposition, "meshgate_authz_decisions_total", decision="deny", cache="miss") == 1
        assert metric_sum(exposition, "meshgate_authz_denials_total", http_route="orders") == 1
        # The revision the dashboards show follows the reload; the old one's series is gone, not left at 1.
        assert metric_sum(exposition, "meshgate_authz_bundle_info", policy="primary", revision="r2") == 1
        assert metric_sum(exposition, "meshgate_authz_bundle_info", revision="r1") == 0


async def test_broken_bundle_on_disk_keeps_the_last_good_policy(
    tmp_path: Path, keys_dir: tuple[Path, KeyPair, KeyPair], jwks_url: str, upstream_a: int
) -> None:
    write_bundle(tmp_path / "bundle", POLICY, "r1")
    with gateway(tmp_path, policy_config(jwks_url, upstream_a, tmp_path / "bundle")) as gw:
        token = Stack(gw, keys_dir[1], keys_dir[2], receiver=None).token(roles=["reader"])  # type: ignore[arg-type]
        (tmp_path / "bundle" / "authz.rego").write_text("package meshgate.authz\n\nallow if {\n")

        async def failed() -> list[dict[str, Any]]:
            return log_events(gw, "policy_reload_failed")

        await eventually(failed, 10, "the failed reload to be logged")
        assert (await call(f"{gw.url}/orders/1", token))[0] == 200


async def test_remote_opa_decides_the_same_and_fails_closed_when_down(
    tmp_path: Path, keys_dir: tuple[Path, KeyPair, KeyPair], jwks_url: str, upstream_a: int
) -> None:
    write_bundle(tmp_path / "bundle", POLICY, "r1")
    port = free_port()
    config = policy_config(jwks_url, upstream_a, tmp_path / "bundle")
    config["authz"] = {"engine": "opa", "opa_url": f"http://127.0.0.1:{port}", "timeout": "500ms"}
    with gateway(tmp_path, config) as gw:
        stack = Stack(gw, keys_dir[1], keys_dir[2], receiver=None)  # type: ignore[arg-type]
        with opa_server(tmp_path / "bundle", port=port):
            assert (await call(f"{gw.url}/orders/1", stack.token(roles=["reader"])))[0] == 200
            status, headers, body = await call(f"{gw.url}/orders/1", stack.token())
            assert status == 403
            assert json.loads(body)["reason"] == "no rule allows this request"
            status, _, body = await call(f"{gw.url}/custom/1", stack.token())
            assert (status, body) == (418, b"teapot says no")
        # The OPA process is gone now: fail closed, with the decision id of the failed decision.
        status, headers, body = await call(f"{gw.url}/orders/1", stack.token(roles=["reader"]))
        assert status == 503
        reply = json.loads(body)
        assert reply["error"] == "policy_unavailable"
        assert reply["decision_id"] == headers["x-decision-id"]
        assert str(port) not in reply["message"]  # the cause (OPA's address) is for the span and decision log


async def test_on_error_allow_admits_counts_and_warns_once(
    tmp_path: Path, keys_dir: tuple[Path, KeyPair, KeyPair], jwks_url: str, upstream_a: int
) -> None:
    config = policy_config(jwks_url, upstream_a, tmp_path / "unused")
    # Nothing listens on this port: every decision fails, and on_error: allow lets the requests through.
    config["authz"] = {"engine": "opa", "opa_url": f"http://127.0.0.1:{free_port()}", "on_error": "allow"}
    with gateway(tmp_path, config) as gw:
        token = Stack(gw, keys_dir[1], keys_dir[2], receiver=None).token()  # type: ignore[arg-type]
        for _ in range(3):
            status, headers, _ = await call(f"{gw.url}/orders/1", token)
            assert status == 200
            uuid.UUID(headers["x-decision-id"])  # a decision was attempted, and logged under this id
        exposition = await scrape(gw)
        assert metric_sum(exposition, "meshgate_authz_decisions_total", http_route="orders", decision="error") == 3

        async def warned() -> list[dict[str, Any]]:
            return log_events(gw, "policy_error_allowed")

        assert len(await eventually(warned, 5, "the fail-open warning")) == 1


def test_check_reports_a_bundle_that_does_not_load(tmp_path: Path) -> None:
    write_bundle(tmp_path / "bundle", 'package meshgate.authz\n\nallow if io.jwt.decode_verify("x", {})\n', "r1")
    config = {
        "service": "shop",
        "routes": [{"name": "r", "cluster": "a"}],
        "clusters": [{"name": "a", "endpoints": ["127.0.0.1:9"]}],
        "authz": {"bundle": "bundle"},  # relative to the config file
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith("authz.bundle: ")
    assert "io.jwt.decode_verify" in result.stderr
    assert "Traceback" not in result.stderr
