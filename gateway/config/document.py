"""Config text -> plain data, plus the two things done to the decoded document: its hash and its redacted copy.

The text is YAML (JSON is a subset of it) read with a stricter loader than PyYAML's ``SafeLoader``:

- duplicate mapping keys are errors (PyYAML silently keeps the last one, so a typo'd second ``cluster:`` would win);
- scalars resolve as in YAML 1.2: only ``true``/``false`` are booleans (``on``, ``no``, ``yes`` stay strings, so
  ``country: NO`` or ``on: [reset]`` mean what they say), integers are decimal (``010`` is 10, ``1:30`` is a string),
  and dates stay strings;
- only plain-data tags are constructed (no ``!!set``, ``!!binary``, ``!!python/...``), so the result always has a
  canonical JSON form;
- aliases may not expand into a huge or endlessly deep document (the "billion laughs").

Nothing here reads files: the caller hands in the text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config.errors import DOCUMENT, ConfigError, Problem
from gateway.config.values import quote

__all__ = ["REDACTED", "canonical_hash", "load_text", "redact"]

REDACTED = "<redacted>"
# Keys whose values are credentials (or point at them): redacted wherever they appear in the document.
_SECRET_KEY = re.compile(r"token|secret|password|passwd|credential|api_key|private_key|key_file", re.IGNORECASE)

# Far above any real config, far below what would stall a reload: aliases are counted each time they are used.
_MAX_NODES = 200_000
_MAX_DEPTH = 64

_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _TAG + "merge"


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 core-schema scalars and only plain-data constructors."""


# Own copies (never mutate SafeLoader's): keep only the null and merge resolvers of YAML 1.1, and only the
# plain-data constructors; bool/int/float come back below with YAML 1.2 rules.
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in (_TAG + "null", _MERGE_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.yaml_constructors = {
    tag: constructor
    for tag, constructor in yaml.SafeLoader.yaml_constructors.items()
    if tag is None or tag in (_TAG + "null", _TAG + "str", _TAG + "seq", _TAG + "map")
}


def _construct_int(loader: _StrictLoader, node: Node) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    try:
        return int(text, 10)  # decimal only: YAML 1.1 would read "010" as octal 8
    except ValueError:
        raise ConstructorError(None, None, f"invalid integer {quote(text)}", node.start_mark) from None


def _construct_float(loader: _StrictLoader, node: Node) -> float:
    try:
        return float(loader.construct_yaml_float(node))  # type: ignore[arg-type]
    except ValueError:
        raise ConstructorError(None, None, "invalid number", node.start_mark) from None


def _construct_bool(loader: _StrictLoader, node: Node) -> bool:
    text = str(loader.construct_scalar(node)).lower()  # type: ignore[arg-type]
    if text not in ("true", "false"):
        raise ConstructorError(None, None, f"invalid boolean {quote(text)} (use true or false)", node.start_mark)
    return text == "true"


_StrictLoader.add_implicit_resolver(_TAG + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_StrictLoader.add_implicit_resolver(_TAG + "int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    _TAG + "float",
    re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9]+[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_StrictLoader.add_constructor(_TAG + "bool", _construct_bool)
_StrictLoader.add_constructor(_TAG + "int", _construct_int)
_StrictLoader.add_constructor(_TAG + "float", _construct_float)


def load_text(text: str) -> object:
    """Decode one YAML/JSON document to plain data; ``ConfigError`` for syntax errors and duplicate keys.

    An empty document (nothing, or only comments) decodes to ``None``; the compiler reports it.
    """
    try:
        loader = _StrictLoader(text)  # the reader rejects unprintable characters here already
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_reader_problem(exc)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems = _check_nodes(node)
        if problems:
            raise ConfigError(problems)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_marked_problem(exc)]) from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_reader_problem(exc)]) from None
    except RecursionError:
        # The composer is recursive too, so a pathologically nested text fails before _check_nodes sees it.
        raise ConfigError([Problem(DOCUMENT, f"nested too deeply (more than {_MAX_DEPTH} levels)")]) from None
    finally:
        loader.dispose()


def _reader_problem(exc: yaml.reader.ReaderError) -> Problem:
    character = exc.character if isinstance(exc.character, int) else ord(exc.character)
    return Problem(DOCUMENT, f"unacceptable character #x{character:04x} at position {exc.position}")


def _marked_problem(exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else DOCUMENT
    message = exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:
        context_mark = exc.context_mark
        at = f" at line {context_mark.line + 1}, column {context_mark.column + 1}" if context_mark else ""
        # The composer phrases some errors as context + "but found ..."; read in that order they make a sentence.
        if exc.problem.startswith("but "):
            message = f"{exc.context}{at}, {exc.problem}"
        else:
            message = f"{exc.problem} ({exc.context}{at})"
    return Problem(where, message)


def _check_nodes(root: Node) -> list[Problem]:
    """Duplicate keys (with their logical path), and the size/depth guard, over the composed node graph."""
    problems: list[Problem] = []
    reported: set[int] = set()  # key nodes already reported: an aliased mapping is walked once per use
    budget = _MAX_NODES
    stack: list[tuple[Node, str, int]] = [(root, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return [Problem(DOCUMENT, f"too large (more than {_MAX_NODES} values after expanding aliases)")]
        if depth > _MAX_DEPTH:
            return [Problem(DOCUMENT, f"nested too deeply (more than {_MAX_DEPTH} levels)")]
        if isinstance(node, MappingNode):
            problems.extend(_duplicate_keys(node, path, reported))
            children = [(value, _key_path(path, key)) for key, value in node.value if key.tag != _MERGE_TAG]
        elif isinstance(node, SequenceNode):
            children = [(item, f"{path}[{index}]") for index, item in enumerate(node.value)]
        else:
            continue
        # Reversed, so the stack pops children in document order and problems come out in that order.
        stack.extend((child, child_path, depth + 1) for child, child_path in reversed(children))
    return problems


def _duplicate_keys(node: MappingNode, path: str, reported: set[int]) -> list[Problem]:
    problems: list[Problem] = []
    first_line: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        # Merged keys (``<<: *defaults``) may legitimately be overridden, so only explicit keys are compared.
        if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
            continue
        identity = (key.tag, key.value)  # `1:` and `"1":` are different keys
        line = key.start_mark.line + 1
        if identity not in first_line:
            first_line[identity] = line
        elif id(key) not in reported:
            reported.add(id(key))
            first = first_line[identity]
            lines = f"lines {first} and {line}" if first != line else f"line {line}"
            message = f"duplicate key {quote(key.value)} ({lines})"
            problems.append(Problem(path or DOCUMENT, message))
    return problems


def _key_path(path: str, key: Node) -> str:
    name = key.value if isinstance(key, ScalarNode) else "?"
    return f"{path}.{name}" if path else str(name)


def canonical_hash(document: object) -> str:
    """sha256 hex of the document's canonical JSON (sorted keys, no whitespace): equal content, equal hash."""
    text = json.dumps(_plain(document), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(value: object) -> object:
    # json.dumps only knows dict and list; a caller may hand compile_document any Mapping.
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def redact(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the document with the value of every credential-like key replaced by ``"<redacted>"``."""
    return {key: REDACTED if _SECRET_KEY.search(key) else _redact_value(value) for key, value in document.items()}


def _redact_value(value: object) -> object:
    if isinstance(value, Mapping):
        return redact({str(key): item for key, item in value.items()})
    if isinstance(value, list):
        return [_redact_value(item) for item in value]
    return value
