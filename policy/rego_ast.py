"""A typed view of the AST regorus prints (``Engine.get_ast_as_json()``), and the call sites in it.

Pure: the JSON text in, plain values out. Nodes are single-key objects (``{"RefDot": {...}}``); ``kind`` splits
one into its kind and fields. Var names sit in ``value``; a ``RefDot`` field is ``[span, name]``; a few names
(``some x``, ``every k, v``, ``import ... as a``) are only spans, byte offsets into the module's source.
Both ``policy/engine_embedded.py`` (which built-ins a bundle calls) and ``policy/input_refs.py`` (which input
paths it reads) work on this view.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Call",
    "Module",
    "Node",
    "Segment",
    "calls",
    "chain",
    "children",
    "kind",
    "modules_of",
    "rule_head",
]

Node = dict[str, Any]
# One step of a reference: a constant string key, or the (non-constant) index expression.
Segment = str | Node


@dataclass(frozen=True, slots=True)
class Module:
    """One parsed module: its package path (``("meshgate", "authz")``), import aliases and rules."""

    file: str
    package: tuple[str, ...]
    imports: Mapping[str, tuple[str, ...]]  # alias -> ("input", ...) or ("data", ...)
    rules: tuple[Node, ...]
    source: bytes

    def text(self, span: Mapping[str, Any]) -> str:
        """The source text a span covers (spans are byte offsets)."""
        return self.source[int(span["start"]) : int(span["end"])].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Call:
    """A call site: the function's reference split into a root name and constant segments, and where it is."""

    root: str
    segments: tuple[str, ...]
    line: int

    @property
    def name(self) -> str:
        return ".".join((self.root, *self.segments))


def modules_of(ast_json: str) -> tuple[Module, ...]:
    """The modules of ``Engine.get_ast_as_json()``, in the order they were added."""
    modules = []
    for entry in json.loads(ast_json):
        ast, source = entry["ast"], entry["source"]
        contents = str(source["contents"]).encode("utf-8")
        package = _constant_path(ast["package"]["refr"]) or ()
        imports: dict[str, tuple[str, ...]] = {}
        for item in ast.get("imports", ()):
            path = _constant_path(item["refr"])
            if path is None or path[0] not in ("input", "data"):
                continue  # `import rego.v1`, `import future.keywords.in`
            alias = item.get("as")
            name = contents[alias["start"] : alias["end"]].decode() if alias else path[-1]
            imports[name] = path
        modules.append(Module(str(source["file"]), package, imports, tuple(ast.get("rules", ())), contents))
    return tuple(modules)


def kind(node: Node) -> tuple[str, dict[str, Any]]:
    """``{"RefDot": {...}}`` -> ``("RefDot", {...})``."""
    (name, fields), *_ = node.items()
    return name, fields if isinstance(fields, dict) else {}


def chain(node: Node) -> tuple[str | None, Node | None, list[Segment]]:
    """A reference split into its root and steps: ``input.a[k]`` -> ``("input", None, ["a", <Var k>])``.

    The root is a Var's name, or (``f(x).y``, ``{...}.y``) the non-Var expression it starts from. A bracket index
    that is a string literal is a constant step; any other index (numbers included) is returned as its node.
    """
    segments: list[Segment] = []
    while True:
        name, fields = kind(node)
        if name == "RefDot":
            segments.append(str(fields["field"][1]))
        elif name == "RefBrack":
            index_kind, index = kind(fields["index"])
            is_string = index_kind in ("String", "RawString") and isinstance(index.get("value"), str)
            segments.append(index["value"] if is_string else fields["index"])
        elif name == "Var":
            segments.reverse()
            return str(fields["value"]), None, segments
        else:
            segments.reverse()
            return None, node, segments
        node = fields["refr"]


def rule_head(rule: Node) -> tuple[str, Node | None, list[Segment]]:
    """``(head kind, head fields, head reference steps)``: kind is ``Compr``/``Set``/``Func`` for a rule and
    ``Default`` for a default rule; the steps start with the rule's name."""
    name, fields = kind(rule)
    if name == "Default":
        root, _, segments = chain(fields["refr"])
        return "Default", fields, [root or "", *segments]
    head_kind, head = kind(fields["head"])
    root, _, segments = chain(head["refr"])
    return head_kind, head, [root or "", *segments]


def children(node: Any) -> Iterator[Node]:
    """The objects directly inside ``node`` (expressions, queries, statements, bodies; spans skipped), whatever
    its kind: the generic walk that code which does not know a kind falls back to."""
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for value in values:
        if isinstance(value, dict):
            if not ("start" in value and "end" in value and "line" in value):
                yield value
        elif isinstance(value, list):
            yield from children(value)


def calls(node: Any, line: int = 0) -> Iterator[Call]:
    """Every call with a constant function reference below ``node``."""
    if isinstance(node, dict) and len(node) == 1 and next(iter(node)) == "Call":
        fields = node["Call"]
        root, _, segments = chain(fields["fcn"])
        if root is not None and all(isinstance(s, str) for s in segments):
            yield Call(root, tuple(str(s) for s in segments), int(fields.get("span", {}).get("line", line)))
    for child in children(node):
        yield from calls(child, line)


def _constant_path(node: Node) -> tuple[str, ...] | None:
    root, _, segments = chain(node)
    if root is None or not all(isinstance(s, str) for s in segments):
        return None
    return (root, *(str(s) for s in segments))
