"""Bearer tokens of the config service: the tokens file, who a request is, and what it may do.

``--tokens FILE`` is YAML ``tokens: [{name, token, role, service?}]``. ``role`` is ``admin`` (may write) or
``gateway`` (may read, and register instances); ``service``, when set, restricts the token to that service's
configs, instances and gateway reports (and names the service a mesh certificate is issued for). Without
``--tokens`` the service writes ``DIR/tokens.yaml`` (mode 0600) on first start, with one admin and one gateway
token.

A presented token is compared with every known one in constant time (``hmac.compare_digest`` over all entries, no
early exit), so neither the answer's timing nor its content tells how much of a guess was right. Token values are
never logged or shown: ``Token.__repr__`` leaves them out.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import yaml

from gateway.config.compile import SERVICE_NAME
from gateway.config.errors import ConfigError, Problem

__all__ = [
    "ROLES",
    "Access",
    "Role",
    "Token",
    "TokenSet",
    "generate_tokens",
    "load_tokens",
    "parse_tokens",
]

Role = Literal["admin", "gateway"]
ROLES: Final[tuple[Role, ...]] = ("admin", "gateway")
# What a call needs: "read" (admin or gateway), "register" (instances: admin or gateway), "write" (admin only).
Access = Literal["read", "register", "write"]

# Short tokens can be guessed; generated ones are 43 characters (32 random bytes).
_MIN_TOKEN_LENGTH: Final = 16
_SERVICE: Final = SERVICE_NAME  # services are named as in the gateway config
_KEYS: Final = ("name", "token", "role", "service")


@dataclass(frozen=True, slots=True)
class Token:
    name: str  # who: the author of what it writes, in logs and history
    role: Role
    service: str | None = None  # only this service, when set
    secret: str = field(default="", repr=False)

    def allows(self, access: Access, service: str | None) -> str | None:
        """``None`` when allowed, else why not (a 403 message). ``service`` is the call's, ``None`` for calls that
        belong to no one service (bundles, the gateway list)."""
        if access == "write" and self.role != "admin":
            return f"token {self.name!r} has role {self.role}; this call needs role admin"
        if self.service is not None and service is not None and service != self.service:
            return f"token {self.name!r} is restricted to service {self.service!r}"
        if self.service is not None and service is None and access == "write":
            return f"token {self.name!r} is restricted to service {self.service!r}; this call affects every service"
        return None


class TokenSet:
    """The known tokens; ``authenticate`` finds the one a request presents."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens: tuple[Token, ...] = tuple(tokens)
        self._secrets = [(token.secret.encode(), token) for token in self.tokens]

    def authenticate(self, authorization: str | None) -> Token | None:
        """The token in an ``Authorization: Bearer <token>`` header, or ``None`` (absent, malformed or unknown)."""
        if not authorization:
            return None
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        candidate = presented.strip().encode()
        found: Token | None = None
        for secret, token in self._secrets:  # every entry, always: the time taken does not depend on a match
            if hmac.compare_digest(candidate, secret):
                found = token
        return found


def parse_tokens(document: object, where: str = "tokens") -> TokenSet:
    """A decoded tokens file -> ``TokenSet``; ``ConfigError`` lists every problem (``tokens[1].role: ...``)."""
    problems: list[Problem] = []
    entries = document.get("tokens") if isinstance(document, Mapping) else None
    if not isinstance(document, Mapping) or set(document) - {"tokens"}:
        problems.append(Problem("(document)", "expected a mapping with one key, tokens"))
    if not isinstance(entries, list) or not entries:
        problems.append(Problem(where, "expected a non-empty list of {name, token, role, service?}"))
        raise ConfigError(problems)
    tokens: list[Token] = []
    names: set[str] = set()
    values: set[str] = set()
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(Problem(at, "expected a mapping {name, token, role, service?}"))
            continue
        for key in entry:
            if key not in _KEYS:
                problems.append(Problem(f"{at}.{key}", "unknown key"))
        name, secret, role, service = (entry.get(key) for key in _KEYS)
        mark = len(problems)
        if not isinstance(name, str) or not name:
            problems.append(Problem(f"{at}.name", "required: a non-empty string"))
        elif name in names:
            problems.append(Problem(f"{at}.name", f"duplicate name {name!r}"))
        if not isinstance(secret, str) or len(secret) < _MIN_TOKEN_LENGTH or secret != secret.strip():
            # The value is never echoed: a message is shown in logs and terminals.
            problems.append(Problem(f"{at}.token", f"required: at least {_MIN_TOKEN_LENGTH} characters, no spaces"))
        elif secret in values:
            problems.append(Problem(f"{at}.token", "the same token as another entry"))
        if role not in ROLES:
            problems.append(Problem(f"{at}.role", "must be admin or gateway"))
        if service is not None and (not isinstance(service, str) or not _SERVICE.fullmatch(service)):
            problems.append(Problem(f"{at}.service", "must be a service name (lower-case letters, digits, . _ -)"))
        if len(problems) == mark:
            assert isinstance(name, str)
            assert isinstance(secret, str)
            assert role in ROLES
            names.add(name)
            values.add(secret)
            tokens.append(Token(name, role, service, secret))
    if problems:
        raise ConfigError(problems)
    return TokenSet(tokens)


def load_tokens(path: Path) -> TokenSet:
    """Read and parse a tokens file; ``ConfigError`` (with the file as the path) when unreadable or invalid."""
    try:
        text = path.read_text(encoding="utf-8")
        document = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError([Problem(str(path), f"cannot read tokens file: {reason}")]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError([Problem(where, f"invalid YAML: {getattr(error, 'problem', None) or error}")]) from None
    return parse_tokens(document)


def generate_tokens(path: Path) -> TokenSet:
    """Write a new tokens file at ``path`` (mode 0600, never overwriting one): an ``admin`` and a ``gateway`` token."""
    tokens = [
        Token("admin", "admin", None, secrets.token_urlsafe(32)),
        Token("gateway", "gateway", None, secrets.token_urlsafe(32)),
    ]
    document = {"tokens": [{"name": t.name, "token": t.secret, "role": t.role} for t in tokens]}
    text = "# meshgate configservice tokens (generated). Keep this file secret.\n" + yaml.safe_dump(
        document, sort_keys=False
    )
    # O_EXCL: two services started on one DIR at once must not each write (and believe) their own tokens.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    return TokenSet(tokens)
