"""``push_policies``: load a bundle directory into a running OPA through its Policy and Data APIs.

For ``meshgate policy push``, when OPA runs as a sidecar without a bundle server. Each ``*.rego`` file (tests,
``*_test.rego``, excluded) becomes ``PUT /v1/policies/<relative path>`` with the raw text; each ``data.json`` below
the root becomes ``PUT /v1/data/<its directory>``. A ``data.json`` at the root is pushed key by key
(``PUT /v1/data/<key>``): ``PUT /v1/data`` would replace OPA's whole data document, including what other clients
put there. All files are read and checked before the first request, so a broken ``data.json`` pushes nothing.
Policies go first, in path order; OPA compiles each module against those already loaded, so the first refusal
stops the push and is reported with its file. Nothing is deleted from OPA: a file removed from the bundle
stays loaded until someone deletes it.

Why aiohttp and not opa-python-client's ``AsyncOpaClient`` (a product dependency, which was tried first):
``update_or_create_data`` refuses anything but a dict, so a root ``data.json`` such as ``{"admins": ["alice"]}``
cannot be pushed under its key, and it always appends ``/<endpoint>``, so ``/v1/data`` itself is unreachable (OPA's
router does not match ``/v1/data/``); ``update_policy_from_string`` by default rewrites v0 Rego and pushes the
rewrite instead of the file; the client takes host and port only (no OPA behind a path prefix) and ships no type
information. Two PUTs by hand are shorter than the workarounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp

__all__ = ["PushError", "bundle_files", "push_policies"]

_BODY_LIMIT: Final = 300  # characters of a non-JSON error body kept in a PushError


class PushError(Exception):
    """A push that stopped: the message names the file (or the OPA address) and OPA's own error message."""


def bundle_files(bundle_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(policies, data files)`` of a bundle directory, each in path order: ``*.rego`` except ``*_test.rego``,
    and ``data.json``. Hidden directories (``.git``, editor folders) are skipped."""
    policies: list[Path] = []
    data: list[Path] = []
    for path in sorted(bundle_dir.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(bundle_dir).parts[:-1]) or not path.is_file():
            continue
        if path.suffix == ".rego" and not path.name.endswith("_test.rego"):
            policies.append(path)
        elif path.name == "data.json":
            data.append(path)
    return policies, data


def _opa_error(status: int, payload: bytes) -> str:
    """OPA's ``message`` and each detailed error as ``file:row: code: message``; else the status and raw body."""
    try:
        body: Any = json.loads(payload)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        text = payload.decode("utf-8", "replace").strip()[:_BODY_LIMIT]
        return f"HTTP {status}: {text or '(empty body)'}"
    details = [body["message"]]
    for error in body.get("errors") or []:
        if isinstance(error, dict):
            location = error.get("location")
            where = ""
            if isinstance(location, dict) and location.get("file"):
                where = f"{location['file']}:{location.get('row', '?')}: "
            details.append(f"{where}{error.get('code', '')}: {error.get('message', '')}")
    return "; ".join(details)


@dataclass(frozen=True, slots=True)
class _Put:
    """One request of a push: which file it comes from, the API path, the body, and the line to print."""

    file: str
    path: str
    body: bytes
    content_type: str
    expect: int  # the status OPA answers on success: 200 for the Policy API, 204 for the Data API
    line: str


def _plan(bundle_dir: Path) -> list[_Put]:
    """Every request a push of ``bundle_dir`` makes, in order. Reads and checks all files first, so an unreadable
    or invalid file stops the push before anything reaches OPA."""
    if not bundle_dir.is_dir():
        raise PushError(f"{bundle_dir}: not a directory")
    policies, data_files = bundle_files(bundle_dir)
    if not policies and not data_files:
        raise PushError(f"{bundle_dir}: no *.rego or data.json files")
    puts: list[_Put] = []
    for path in policies:
        name = path.relative_to(bundle_dir).as_posix()
        body = path.read_bytes()
        puts.append(_Put(name, f"/v1/policies/{quote(name)}", body, "text/plain", 200, f"pushed policy {name}"))
    for path in data_files:
        name = path.relative_to(bundle_dir).as_posix()
        try:
            document = json.loads(path.read_bytes())
        except ValueError as exc:
            raise PushError(f"{name}: invalid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise PushError(f"{name}: a data.json must hold a JSON object")
        parts = path.parent.relative_to(bundle_dir).parts
        # Below the root the file is the document at its directory; at the root each key is a document of its own.
        targets = [(parts, document)] if parts else [((key,), value) for key, value in document.items()]
        for target, value in targets:
            url_path = "/v1/data/" + "/".join(quote(part, safe="") for part in target)
            line = f"pushed data {name} -> data.{'.'.join(target)}"
            puts.append(_Put(name, url_path, json.dumps(value).encode(), "application/json", 204, line))
    return puts


async def push_policies(
    opa_url: str,
    bundle_dir: Path,
    *,
    token: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - a budget per request, not a deadline for the whole push
) -> list[str]:
    """Push every policy and data file of ``bundle_dir`` to the OPA at ``opa_url``; one human line per push.

    ``timeout`` bounds each request. Raises ``PushError`` naming the file and OPA's message on the first refusal,
    or the address when OPA cannot be reached. Files pushed before a failure stay pushed (OPA's APIs have no
    multi-request transaction).
    """
    base = opa_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise PushError(f"{opa_url}: not an http(s) URL")
    puts = _plan(bundle_dir)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lines: list[str] = []
    current = ""  # the file being pushed, for the messages below
    try:
        # trust_env=False: OPA is a sidecar or in-cluster service; an HTTP(S)_PROXY meant for the internet must not
        # carry policy pushes (and their bearer token) elsewhere.
        async with aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False
        ) as session:
            for put in puts:
                current = put.file
                async with session.put(
                    base + put.path, data=put.body, headers={"Content-Type": put.content_type}
                ) as response:
                    payload = await response.read()
                if response.status != put.expect:
                    raise PushError(f"{put.file}: OPA refused it: {_opa_error(response.status, payload)}")
                lines.append(put.line)
    except TimeoutError:
        raise PushError(f"{current}: OPA at {opa_url} did not answer within {timeout:g}s") from None
    except aiohttp.ClientConnectorError as exc:
        raise PushError(f"cannot reach OPA at {opa_url}: {exc.os_error.strerror or exc}") from None
    except aiohttp.ClientError as exc:
        raise PushError(f"{current}: {type(exc).__name__}: {exc}") from None
    return lines
