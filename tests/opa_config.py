"""OPA's configuration file, as far as the OPA stand-in's bundle plugin (``tests/opa_bundles.py``) runs it.

``python -m tests.opa_server --config-file FILE`` reads OPA's own configuration file (YAML or JSON) through
``read_config``; the result is the bundles to download, each with the service it comes from:

- ``services``: a map, or a list of entries each with a ``name``; per service ``url``, ``headers``,
  ``credentials: {bearer: {token | token_path, scheme}}`` and ``response_header_timeout_seconds`` (default 10);
- ``bundles``: per bundle ``service`` (default: the first service), ``resource`` (default ``bundles/<name>``) and
  ``polling: {min_delay_seconds, max_delay_seconds}`` (OPA's defaults 60 and 120 s; integers, as OPA's config types
  require).

Not implemented, and refused with ``ConfigFileError`` so that a test never silently runs without them: bundle
``signing``, ``trigger: manual``, long polling, credentials other than ``bearer``, discovery and the legacy
``bundle`` key. A config OPA itself refuses is refused with OPA's wording where OPA has one. Other OPA sections
(``decision_logs``, ``status``, ``labels``, ...) are accepted and ignored, and an unknown key is logged and ignored
(as OPA ignores it), one ``opa_server: config: ...`` line on stderr each.

Pure data and parsing: no network, no engine (nothing here touches ``opa_bindings``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["BundleSource", "ConfigFileError", "Service", "log", "parse_config", "read_config"]

DEFAULT_MIN_DELAY = 60  # OPA's polling defaults, seconds (download.PollingConfig)
DEFAULT_MAX_DELAY = 120
DEFAULT_RESPONSE_HEADER_TIMEOUT = 10  # OPA's services.*.response_header_timeout_seconds default

# Sections OPA accepts that change nothing about bundle downloads: accepted and ignored.
_IGNORED_SECTIONS = frozenset(
    {
        "labels",
        "decision_logs",
        "status",
        "default_decision",
        "default_authorization_decision",
        "keys",
        "caching",
        "distributed_tracing",
        "server",
        "storage",
        "persistence_directory",
        "nd_builtin_cache",
        "plugins",
    }
)
_SERVICE_KEYS = frozenset(
    {"name", "url", "headers", "credentials", "response_header_timeout_seconds", "allow_insecure_tls", "type", "tls"}
)
_BUNDLE_KEYS = frozenset({"service", "resource", "polling", "persist", "size_limit_bytes", "trigger", "signing"})


class ConfigFileError(Exception):
    """An OPA config this stand-in cannot run as OPA would: invalid for OPA, or using what is not implemented."""


@dataclass(frozen=True, slots=True)
class Service:
    """One entry of OPA's ``services``: where bundles come from and how requests authenticate."""

    name: str
    url: str
    headers: dict[str, str]
    bearer: bool  # credentials.bearer configured: every request carries "<scheme> <token>"
    token: str
    token_path: str | None
    scheme: str
    timeout: int  # seconds; OPA's bound on the response headers, applied to the whole download here

    def authorization(self) -> str | None:
        """The Authorization value for the next request. Like OPA's bearer plugin, ``token_path`` is read and
        stripped on every request (``OSError`` when it cannot be read: that download fails)."""
        if not self.bearer:
            return None
        token = Path(self.token_path).read_text().strip() if self.token_path is not None else self.token
        return f"{self.scheme} {token}"


@dataclass(frozen=True, slots=True)
class BundleSource:
    """One entry of OPA's ``bundles``."""

    name: str
    service: Service
    resource: str
    min_delay: int
    max_delay: int

    @property
    def url(self) -> str:
        return f"{self.service.url.rstrip('/')}/{self.resource.lstrip('/')}"


def _object(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigFileError(f"{where}: must be an object")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigFileError(f"{where}: must be a string")
    return value


def _integer(value: object, where: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):  # OPA's *int64: 0.5 does not unmarshal
        raise ConfigFileError(f"{where}: must be an integer number of seconds, not {value!r}")
    return value


def _warn_unknown(section: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for key in sorted(set(section) - known):
        name = f"{where}.{key}" if where else key
        log(f"config: {name}: not an OPA setting this stand-in knows; ignored (OPA ignores unknown keys too)")


def _service(name: str, raw: object) -> Service:
    where = f"services.{name}"
    section = _object(raw, where)
    _warn_unknown(section, _SERVICE_KEYS, where)
    if "url" not in section:
        raise ConfigFileError(f"{where}.url: required")
    url = _string(section["url"], f"{where}.url").rstrip("/")
    raw_headers = _object(section.get("headers"), f"{where}.headers")
    headers = {str(k): _string(v, f"{where}.headers.{k}") for k, v in raw_headers.items()}
    timeout = _integer(
        section.get("response_header_timeout_seconds"),
        f"{where}.response_header_timeout_seconds",
        DEFAULT_RESPONSE_HEADER_TIMEOUT,
    )
    credentials = _object(section.get("credentials"), f"{where}.credentials")
    other = sorted(set(credentials) - {"bearer"})
    if other:
        raise ConfigFileError(f"{where}.credentials.{other[0]}: not implemented by the stand-in (only bearer)")
    bearer = "bearer" in credentials
    settings = _object(credentials.get("bearer"), f"{where}.credentials.bearer")
    token = _string(settings.get("token", ""), f"{where}.credentials.bearer.token")
    token_path = settings.get("token_path")
    if token_path is not None:
        token_path = _string(token_path, f"{where}.credentials.bearer.token_path")
        if token:
            # OPA's own message (bearerAuthPlugin.NewClient).
            raise ConfigFileError('invalid config: specify a value for either the "token" or "token_path" field')
    scheme = _string(settings.get("scheme") or "Bearer", f"{where}.credentials.bearer.scheme")
    return Service(name, url, headers, bearer, token, token_path, scheme, timeout)


def _services(raw: object) -> dict[str, Service]:
    """OPA's ``services``: a map of name -> settings, or a list of settings each with a ``name``; in file order."""
    if isinstance(raw, list):
        pairs = []
        for index, entry in enumerate(raw):
            name = _object(entry, f"services[{index}]").get("name")
            pairs.append((_string(name, f"services[{index}].name"), entry))
    else:
        pairs = list(_object(raw, "services").items())
    return {str(name): _service(str(name), entry) for name, entry in pairs}


def parse_config(document: object) -> list[BundleSource]:
    """The bundles an OPA config file configures, or ``ConfigFileError`` (see the module docstring)."""
    top = _object(document, "the config file")
    for key in ("bundle", "discovery"):
        if key in top:
            raise ConfigFileError(f"{key}: not implemented by the stand-in (use 'bundles')")
    _warn_unknown(top, _IGNORED_SECTIONS | {"services", "bundles"}, "")
    services = _services(top.get("services"))
    sources = []
    for name, raw in _object(top.get("bundles"), "bundles").items():
        where = f"bundles.{name}"
        section = _object(raw, where)
        _warn_unknown(section, _BUNDLE_KEYS, where)
        if section.get("signing") is not None:
            raise ConfigFileError(f"{where}.signing: not implemented by the stand-in")
        if section.get("trigger", "periodic") != "periodic":
            raise ConfigFileError(f"{where}.trigger: only periodic is implemented by the stand-in")
        service_name = section.get("service")
        if service_name is None or service_name == "":
            if not services:
                raise ConfigFileError(f"{where}: no services configured to download it from")
            service_name = next(iter(services))  # OPA: the first service when none is named
        service_name = _string(service_name, f"{where}.service")
        if service_name not in services:
            raise ConfigFileError(f'invalid service name "{service_name}" in bundle "{name}"')  # OPA's wording
        resource = _string(section.get("resource") or f"bundles/{name}", f"{where}.resource")
        polling = _object(section.get("polling"), f"{where}.polling")
        if polling.get("long_polling_timeout_seconds") is not None:
            raise ConfigFileError(f"{where}.polling.long_polling_timeout_seconds: not implemented by the stand-in")
        low = _integer(polling.get("min_delay_seconds"), f"{where}.polling.min_delay_seconds", DEFAULT_MIN_DELAY)
        high = _integer(polling.get("max_delay_seconds"), f"{where}.polling.max_delay_seconds", DEFAULT_MAX_DELAY)
        if high < low:
            raise ConfigFileError("max polling delay must be >= min polling delay")  # OPA's wording
        sources.append(BundleSource(str(name), services[service_name], resource, low, high))
    return sources


def read_config(path: Path) -> list[BundleSource]:
    """The bundles the OPA config file at ``path`` (YAML or JSON) configures, or ``ConfigFileError``."""
    try:
        document = yaml.safe_load(path.read_text())  # YAML is a superset of JSON: OPA accepts both too
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"cannot read: {exc}") from None
    return parse_config(document)


def log(message: str) -> None:
    """One line of the stand-in's log on stderr (``opa_server: ...``), for config warnings and bundle outcomes."""
    print(f"opa_server: {message}", file=sys.stderr, flush=True)
