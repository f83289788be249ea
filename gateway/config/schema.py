"""Strict decoding of the plain config document: typed reads by path that collect every problem, never stop early.

A *decoder* is ``(value, path, problems) -> T | None``: it returns the typed value, or records a ``Problem`` and
returns ``None``. ``Fields`` wraps one mapping of the document: creating it reports unknown keys (with the closest
known key as a hint) and keys this build does not support yet; its getters hand each known key to a decoder.
The section compilers (``compile.py``, ``routes.py``, ``clusters.py``) are written entirely in these terms, so every
message format lives here and reads the same everywhere.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from gateway.config.errors import DOCUMENT, Problem
from gateway.config.snapshot import Address
from gateway.config.values import format_duration, parse_address, parse_duration, parse_size, quote

__all__ = [
    "NAME",
    "NAME_HINT",
    "NOT_SUPPORTED",
    "Decoder",
    "Fields",
    "Problems",
    "address",
    "boolean",
    "choice",
    "closest",
    "describe",
    "did_you_mean",
    "duration",
    "first_use",
    "integer",
    "items",
    "join",
    "list_of_any",
    "mapping_of_any",
    "matching",
    "not_above",
    "not_below",
    "number",
    "regex",
    "size",
    "string",
]

T = TypeVar("T")
S = TypeVar("S", bound=str)
Decoder = Callable[[object, str, "Problems"], T | None]

# Route and cluster names end up as metric label values and span names: a small, safe alphabet.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_HINT = 'use letters, digits, ".", "_", "-"; start with a letter or digit'

# Sections of the contract this build cannot honour. Failing loudly is deliberate: silently ignoring, say, `authn`
# would serve every route unauthenticated.
NOT_SUPPORTED = "not supported yet by this meshgate build"

_NOWHERE: Mapping[str, str] = {}  # `moved`: no key of this mapping belongs in a nested section instead


class Problems:
    """The problems found so far, in the order they were checked."""

    def __init__(self) -> None:
        self._items: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self._items.append(Problem(path, message))

    def mark(self) -> int:
        """A position to ask ``since`` about: did the part decoded after it add problems?"""
        return len(self._items)

    def since(self, mark: int) -> bool:
        return len(self._items) > mark

    def extend(self, other: Problems) -> None:
        self._items.extend(other.items)

    @property
    def items(self) -> tuple[Problem, ...]:
        return tuple(self._items)


def join(path: str, key: str) -> str:
    """The path of ``key`` inside the mapping at ``path`` (the document root is ``""``)."""
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
    """How a wrong value is shown after "got": scalars as written in YAML, containers by kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _expected(problems: Problems, path: str, what: str, value: object) -> None:
    problems.add(path, f"expected {what}, got {describe(value)}")


def string(value: object, path: str, problems: Problems) -> str | None:
    if isinstance(value, str):
        return value
    _expected(problems, path, "a string", value)
    return None


def matching(pattern: re.Pattern[str], noun: str, hint: str = "") -> Decoder[str]:
    """A string that must fully match ``pattern``: ``invalid <noun> "x" (<hint>)`` otherwise."""

    def decode(value: object, path: str, problems: Problems) -> str | None:
        text = string(value, path, problems)
        if text is not None and pattern.fullmatch(text) is None:
            problems.add(path, f"invalid {noun} {quote(text)}" + (f" ({hint})" if hint else ""))
            return None
        return text

    return decode


def regex(value: object, path: str, problems: Problems) -> re.Pattern[str] | None:
    """A Python regular expression, compiled here so the request path never compiles one."""
    text = string(value, path, problems)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        problems.add(path, f"invalid regular expression: {exc}")
        return None


def boolean(value: object, path: str, problems: Problems) -> bool | None:
    if isinstance(value, bool):
        return value
    _expected(problems, path, "true or false", value)
    return None


def integer(minimum: int, maximum: int | None = None) -> Decoder[int]:
    """An integer in ``minimum..maximum``; booleans are not integers (YAML ``true`` is not 1 here)."""

    def decode(value: object, path: str, problems: Problems) -> int | None:
        if not isinstance(value, int) or isinstance(value, bool):
            _expected(problems, path, "an integer", value)
            return None
        if maximum is None and value < minimum:
            problems.add(path, f"must be >= {minimum}")
            return None
        if maximum is not None and not minimum <= value <= maximum:
            problems.add(path, f"must be between {minimum} and {maximum}")
            return None
        return value

    return decode


def number(minimum: float, maximum: float | None = None, *, positive: bool = False) -> Decoder[float]:
    """A finite number (integer or decimal) in ``minimum..maximum``; ``positive``: above ``minimum``, not at it."""

    def decode(value: object, path: str, problems: Problems) -> float | None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            _expected(problems, path, "a number", value)
            return None
        if not math.isfinite(value):
            problems.add(path, "must be a finite number")
            return None
        if positive and value <= minimum:
            problems.add(path, f"must be > {minimum}")
            return None
        if maximum is None and value < minimum:
            problems.add(path, f"must be >= {minimum}")
            return None
        if maximum is not None and not minimum <= value <= maximum:
            problems.add(path, f"must be between {minimum} and {maximum}")
            return None
        return float(value)

    return decode


def duration(*, positive: bool) -> Decoder[float]:
    """A duration string -> seconds. A bare number is refused: ``timeout: 5`` could mean seconds or milliseconds."""

    def decode(value: object, path: str, problems: Problems) -> float | None:
        if not isinstance(value, str):
            _expected(problems, path, 'a duration string like "250ms" or "2s"', value)
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            problems.add(path, str(exc))
            return None
        if positive and seconds <= 0:
            problems.add(path, "must be > 0")
            return None
        return seconds

    return decode


def size(*, positive: bool) -> Decoder[int]:
    """A byte count: an integer, or a string with a unit (``"512KiB"``)."""

    def decode(value: object, path: str, problems: Problems) -> int | None:
        if not isinstance(value, int | str) or isinstance(value, bool):
            _expected(problems, path, 'a size (bytes, or a string like "512KiB")', value)
            return None
        try:
            count = parse_size(value)
        except ValueError as exc:
            problems.add(path, str(exc))
            return None
        if positive and count <= 0:
            problems.add(path, "must be > 0")
            return None
        return count

    return decode


def address(value: object, path: str, problems: Problems) -> Address | None:
    if not isinstance(value, str):
        _expected(problems, path, 'an address string like "127.0.0.1:8080"', value)
        return None
    try:
        return parse_address(value)
    except ValueError as exc:
        problems.add(path, str(exc))
        return None


def not_below(path: str, seconds: float, name: str, bound: float, problems: Problems) -> bool:
    """Is the duration at ``path`` at least the one named ``name``? ``must be >= <name> (<bound>)`` otherwise."""
    if seconds < bound:
        problems.add(path, f"must be >= {name} ({format_duration(bound)})")
        return False
    return True


def not_above(path: str, seconds: float, name: str, bound: float, problems: Problems) -> bool:
    """Is the duration at ``path`` at most the one named ``name``? ``must be <= <name> (<bound>)`` otherwise."""
    if seconds > bound:
        problems.add(path, f"must be <= {name} ({format_duration(bound)})")
        return False
    return True


def choice(options: Sequence[S], noun: str = "value") -> Decoder[S]:
    """One of ``options``, exactly as written (case-sensitive, like every other keyword of the file)."""

    def decode(value: object, path: str, problems: Problems) -> S | None:
        text = string(value, path, problems)
        if text is None:
            return None
        for option in options:
            if option == text:
                return option  # the option itself, so a Literal-typed ``options`` gives a Literal
        problems.add(path, f"unknown {noun} {quote(text)} (one of {', '.join(options)})")
        return None

    return decode


def list_of_any(value: object, path: str, problems: Problems) -> list[object] | None:
    """A list, items not yet decoded (the caller walks them with their ``[i]`` paths)."""
    if isinstance(value, list):
        return value
    _expected(problems, path, "a list", value)
    return None


def mapping_of_any(value: object, path: str, problems: Problems) -> Mapping[Any, object] | None:
    """A mapping whose keys are data, not a fixed schema (so not ``Fields``); keys and values not yet decoded."""
    if isinstance(value, Mapping):
        return value
    _expected(problems, path, "a mapping", value)
    return None


def items(value: object, path: str, problems: Problems, *, empty: str | None) -> list[tuple[str, object]]:
    """The ``([i] path, item)`` pairs of a list; ``empty`` is the problem if it has none (``None``: allowed)."""
    entries = list_of_any(value, path, problems)
    if entries is None:
        return []
    if not entries and empty is not None:
        problems.add(path, empty)
    return [(f"{path}[{index}]", entry) for index, entry in enumerate(entries)]


def first_use(name: str, path: str, owner: str, seen: dict[str, str], problems: Problems, what: str) -> None:
    """Remember ``owner`` (the entry declaring ``name``); a later one is a ``duplicate <what>`` problem at ``path``."""
    if name in seen:
        problems.add(path, f"duplicate {what} {quote(name)} (first at {seen[name]})")
    else:
        seen[name] = owner


def closest(word: str, candidates: Collection[str]) -> str | None:
    """The candidate ``word`` was most likely meant to be, if any is close enough to suggest."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Collection[str]) -> str:
    """`` (did you mean "x"?)`` or ``""``: appended to unknown-name messages."""
    guess = closest(word, candidates)
    return f" (did you mean {quote(guess)}?)" if guess is not None else ""


class Fields:
    """One mapping of the document being decoded. Use ``Fields.of`` to type-check the value first."""

    def __init__(
        self,
        raw: Mapping[Any, object],
        path: str,
        problems: Problems,
        known: Sequence[str],
        unsupported: Sequence[str] = (),
        moved: Mapping[str, str] = _NOWHERE,
    ) -> None:
        self.raw = raw
        self.path = path
        self.problems = problems
        self._known = known
        for key in raw:
            if not (isinstance(key, str) and key in known):
                self._reject_key(key, unsupported, moved)

    @classmethod
    def of(
        cls,
        value: object,
        path: str,
        problems: Problems,
        known: Sequence[str],
        unsupported: Sequence[str] = (),
        moved: Mapping[str, str] = _NOWHERE,
    ) -> Fields | None:
        """``Fields`` over ``value`` if it is a mapping, else a type problem and ``None``."""
        if isinstance(value, Mapping):
            return cls(value, path, problems, known, unsupported, moved)
        _expected(problems, path, "a mapping", value)
        return None

    def _reject_key(self, key: object, unsupported: Sequence[str], moved: Mapping[str, str]) -> None:
        name = key if isinstance(key, str) else describe(key)
        if name in unsupported:
            self.problems.add(self.at(name), NOT_SUPPORTED)
        elif name in moved:
            # A key of a nested section written one level too high (`server_name` beside `tls`, not inside it).
            self.problems.add(self.at(name), f"unknown key (did you mean {quote(moved[name])}?)")
        else:
            self.problems.add(self.at(name), "unknown key" + did_you_mean(name, [*self._known, *unsupported]))

    def at(self, key: str) -> str:
        return join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self._known and key in self.raw

    def present(self, keys: Sequence[str]) -> list[str]:
        return [key for key in keys if self.has(key)]

    def section(self, key: str, known: Sequence[str], unsupported: Sequence[str] = ()) -> Fields | None:
        """``Fields`` over the mapping at ``key``; ``None`` when absent or not a mapping (that problem recorded)."""
        if not self.has(key):
            return None
        return Fields.of(self.raw[key], self.at(key), self.problems, known, unsupported)

    def get(self, key: str, decode: Decoder[T], default: T) -> T:
        """The decoded value; ``default`` when absent, or when invalid (the problem is recorded)."""
        if not self.has(key):
            return default
        decoded = decode(self.raw[key], self.at(key), self.problems)
        return default if decoded is None else decoded

    def optional(self, key: str, decode: Decoder[T]) -> T | None:
        if not self.has(key):
            return None
        return decode(self.raw[key], self.at(key), self.problems)

    def required(self, key: str, decode: Decoder[T]) -> T | None:
        if not self.has(key):
            self.problems.add(self.at(key), "required")
            return None
        return decode(self.raw[key], self.at(key), self.problems)

    def exactly_one(self, keys: Sequence[str]) -> str | None:
        """The one of ``keys`` that is present; a problem if none or several are."""
        if not self.present(keys):
            self.problems.add(self.path or DOCUMENT, f"needs one of {', '.join(keys)}")
        return self.at_most_one(keys)

    def at_most_one(self, keys: Sequence[str]) -> str | None:
        """The one of ``keys`` that is present, or ``None``; a problem if several are."""
        present = self.present(keys)
        if len(present) > 1:
            self.problems.add(self.path or DOCUMENT, f"use only one of {', '.join(present)}")
            return None
        return present[0] if present else None
