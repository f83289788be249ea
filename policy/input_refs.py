"""Which parts of ``input`` a policy can read: the paths that make the decision cache's key correct.

``input_refs(modules, decision)`` walks every rule of every module (reachable or not: over-approximating is
safe) and returns paths under ``input``. A path stops at the first step that is not a constant string:
``input.attributes.request.http.headers[k]`` reads ``("attributes", "request", "http", "headers")``; bare
``input`` (``walk(input, ...)``, ``object.get(input, ...)``) reads ``()``, everything. The result is minimal: a
path whose prefix is also read is dropped.

Conservative is the invariant: two inputs that agree on every returned path get the same decision. So reads are
recorded whole wherever the analysis cannot follow a value:

- Aliases are followed. A package rule ``http_request := input.attributes.request.http`` (one definition, plus an
  optional default), a local ``x := input.a.b`` or ``x = input.a.b``, an import ``import input.attributes as a``,
  aliases of aliases, and ``data.<pkg>.http_request.x`` all extend the aliased path, so ``http_request.method``
  reads ``(..., "http", "method")`` and not the whole request.
- An alias used any other way (passed to a function, iterated, compared or returned whole, read under ``data.<pkg>``
  or ``data[x]``, or the decision rule itself) reads its whole path.
- A local binding fails its body when its path is undefined, so a local alias with no use that implies its
  definedness (one in the same body, not under ``not``, not inside a comprehension or ``every``) reads its whole
  path too; so does one bound twice (``x = input.a; x = input.b`` compares the two) and one a nested ``some`` or
  ``every`` shadows.
- ``with`` targets are not reads (the value replaces the input there); ``with`` values are walked.
- Node kinds this module does not know are walked generically: every reference inside is a whole read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from policy.rego_ast import Module, Node, Segment, chain, children, kind, rule_head

__all__ = ["InputPath", "input_refs"]

InputPath = tuple[str, ...]
# A place in the input an expression denotes, and whether constant steps may still extend it (false after x[k]).
Target = tuple[InputPath, bool]
Targets = frozenset[Target]

_REFS: Final = frozenset({"Var", "RefDot", "RefBrack"})
_EVERYTHING: Final[Targets] = frozenset({((), True)})


def input_refs(modules: Sequence[Module], decision: Sequence[str]) -> frozenset[InputPath]:
    """Every input path the policy in ``modules`` can read when asked ``decision`` (``("pkg", "rule")``)."""
    aliases = _rule_aliases(modules)
    analysis = _Analysis(modules, aliases, recording=True)
    for module in modules:
        for rule in module.rules:
            analysis.rule(module, rule)
    analysis.returned(tuple(decision))  # the decision's value leaves the policy whole
    return _minimal(analysis.reads)


# --------------------------------------------------------------------------------------------- rule aliases


def _rule_aliases(modules: Sequence[Module]) -> dict[tuple[str, ...], Targets]:
    """Complete rules whose value is (a reference into) the input, by path below ``data``; solved to a fixpoint,
    since an alias may be defined through another one."""
    definitions: dict[tuple[str, ...], list[tuple[Module, Node, str]]] = {}
    for module in modules:
        for rule in module.rules:
            head_kind, _, steps = rule_head(rule)
            if all(isinstance(step, str) for step in steps):
                definitions.setdefault((*module.package, *map(str, steps)), []).append((module, rule, head_kind))
    candidates = {}
    for path, defs in definitions.items():
        values = [(module, rule) for module, rule, head_kind in defs if head_kind != "Default"]
        # Two definitions may both hold (a conflict that depends on both values): not an alias, read whole.
        if len(values) == 1 and all(head_kind in ("Compr", "Default") for _, _, head_kind in defs):
            candidates[path] = values[0]
    aliases: dict[tuple[str, ...], Targets] = {}
    for _ in range(len(candidates) + 1):
        analysis = _Analysis(modules, aliases, recording=False)
        solved = {}
        for path, (module, rule) in candidates.items():
            targets = analysis.rule(module, rule)
            if targets:
                solved[path] = targets
        if solved == aliases:
            break
        aliases = solved
    return aliases


# --------------------------------------------------------------------------------------------- scopes


@dataclass(slots=True, eq=False)
class _Alias:
    """A local variable bound to input paths; ``defined_by_use`` once a use in its own body implies it is defined."""

    targets: Targets
    defined_by_use: bool = False


@dataclass(slots=True, eq=False)
class _Scope:
    """One query's variables: aliases, other locals (which shadow rules and imports), and which statements bind."""

    parent: _Scope | None
    aliases: dict[str, _Alias] = field(default_factory=dict)
    locals: set[str] = field(default_factory=set)
    bindings: dict[int, Node] = field(default_factory=dict)  # id(assign expression) -> the aliased side

    def lookup(self, name: str) -> tuple[_Alias | None, bool] | None:
        """``(alias or None for a plain local, whether it is this scope's)``; ``None`` when no scope declares it."""
        scope: _Scope | None = self
        depth = 0
        while scope is not None:
            if name in scope.aliases:
                return scope.aliases[name], depth == 0
            if name in scope.locals:
                return None, depth == 0
            scope, depth = scope.parent, depth + 1
        return None


@dataclass(frozen=True, slots=True)
class _Context:
    module: Module
    rules: frozenset[str]  # names of the rules of the module's package (any module)


# --------------------------------------------------------------------------------------------- the walk


class _Analysis:
    """One walk over the rules. With ``recording`` off it only computes rule-alias targets (the fixpoint)."""

    def __init__(self, modules: Sequence[Module], aliases: Mapping[tuple[str, ...], Targets], *, recording: bool):
        self.aliases = aliases
        self.recording = recording
        self.reads: set[InputPath] = set()
        names: dict[tuple[str, ...], set[str]] = {}
        for module in modules:
            for rule in module.rules:
                _, _, steps = rule_head(rule)
                names.setdefault(module.package, set()).add(str(steps[0]))
        self._rules = {package: frozenset(found) for package, found in names.items()}

    # ------------------------------------------------------------------ entry points

    def rule(self, module: Module, rule: Node) -> Targets:
        """Walk one rule; returns what its value aliases (empty when it is not a reference into the input)."""
        context = _Context(module, self._rules.get(module.package, frozenset()))
        head_kind, head, steps = rule_head(rule)
        assert head is not None
        if head_kind == "Default":
            self._expr(head["value"], _Scope(None), context, positive=True)
            return frozenset()
        path = (*module.package, *steps) if all(isinstance(step, str) for step in steps) else None
        is_alias = path is not None and path in self.aliases
        terms: list[tuple[Node, bool]] = [(step, False) for step in steps[1:] if not isinstance(step, str)]
        params: set[str] = set()
        if head_kind == "Set" and head.get("key"):
            terms.append((head["key"], False))
        if head_kind == "Func":
            for arg in head.get("args", ()):
                if kind(arg)[0] == "Var":
                    params.add(str(kind(arg)[1]["value"]))
                else:
                    terms.append((arg, False))
        head_value = (head.get("assign") or {}).get("value")
        targets: set[Target] = set()
        bodies = kind(rule)[1].get("bodies") or [None]
        for body in bodies:
            if body is not None and body.get("assign"):
                value = body["assign"]["value"]
            else:
                value = None if body is not None and body.get("is_else") else head_value
            value_terms = [*terms, (value, True)] if value is not None else terms
            query = body["query"] if body is not None else None
            targets |= self._query(query, None, context, value_terms, params, record_values=not is_alias)
        return frozenset(targets)

    def returned(self, path: tuple[str, ...]) -> None:
        """``data.<path>`` leaves the policy whole (the decision): any alias it is or holds is read whole."""
        targets = self._data(
            list(path), _Scope(None), _Context(Module("", (), {}, (), b""), frozenset()), positive=False
        )
        if targets:
            self._record(targets)

    # ------------------------------------------------------------------ queries and statements

    def _query(
        self,
        query: Node | None,
        parent: _Scope | None,
        context: _Context,
        terms: Iterable[tuple[Node, bool]],
        declared: Iterable[str] = (),
        *,
        record_values: bool = True,
    ) -> set[Target]:
        """Walk a query in a new scope, then ``terms`` in it (a head value, a comprehension's term: ``True``
        marks a value whose targets are returned); a local alias whose definedness no use implies is read whole."""
        scope = _Scope(parent)
        for name in declared:
            self._declare(name, scope)
        statements = query.get("stmts", []) if query is not None else []
        self._bind(statements, scope, context)
        for statement in statements:
            self._statement(statement, scope, context)
        values: set[Target] = set()
        for node, is_value in terms:
            if is_value and kind(node)[0] in _REFS:
                targets = self._resolve(node, scope, context, positive=True, effects=True)
                if targets:
                    values |= targets
                    if record_values:
                        self._record(targets)
            else:
                self._expr(node, scope, context, positive=True)
        for alias in scope.aliases.values():
            if not alias.defined_by_use:
                self._record(alias.targets)
        return values

    def _bind(self, statements: list[Node], scope: _Scope, context: _Context) -> None:
        """Find this query's local aliases: ``x := <ref>``, ``x = <ref>``, ``<ref> = x`` (each name bound once)."""
        candidates: dict[str, list[tuple[Node, Node]]] = {}
        for statement in statements:
            literal_kind, literal = kind(statement["literal"])
            if literal_kind != "Expr" or kind(literal["expr"])[0] != "AssignExpr":
                continue
            assign = kind(literal["expr"])[1]
            sides = [(assign["lhs"], assign["rhs"])]
            if assign.get("op") == "ColEq":
                scope.locals.update(_var_names(assign["lhs"]))
            else:
                sides.append((assign["rhs"], assign["lhs"]))
            for var, other in sides:
                var_kind, fields = kind(var)
                if var_kind != "Var" or fields["value"] == "_":
                    continue
                name = str(fields["value"])
                if assign.get("op") != "ColEq" and self._known(name, scope, context):
                    continue  # `=` with a rule, an import or an outer variable compares, it does not bind
                candidates.setdefault(name, []).append((literal["expr"], other))
                break
        single = {name: found[0] for name, found in candidates.items() if len(found) == 1}
        for _ in range(len(single) + 1):
            progress = False
            for name, (node, other) in single.items():
                if name in scope.aliases or kind(other)[0] not in _REFS:
                    continue
                targets = self._resolve(other, scope, context, positive=False, effects=False)
                if targets:
                    scope.aliases[name] = _Alias(targets)
                    scope.bindings[id(node)] = other
                    progress = True
            if not progress:
                break
        scope.locals.update(name for name in candidates if name not in scope.aliases)

    def _statement(self, statement: Node, scope: _Scope, context: _Context) -> None:
        literal_kind, literal = kind(statement["literal"])
        if literal_kind == "Expr":
            aliased = scope.bindings.get(id(literal["expr"]))
            if aliased is not None:
                # The binding itself is no read: what the alias denotes is read where it is used.
                self._resolve(aliased, scope, context, positive=True, effects=True)
            else:
                self._expr(literal["expr"], scope, context, positive=True)
        elif literal_kind == "NotExpr":
            self._expr(literal["expr"], scope, context, positive=False)
        elif literal_kind == "SomeVars":
            for span in literal.get("vars", ()):
                self._declare(context.module.text(span), scope)
        elif literal_kind == "SomeIn":
            for pattern in (literal.get("key"), literal.get("value")):
                for name in _var_names(pattern):
                    self._declare(name, scope)
            self._expr(literal["collection"], scope, context, positive=True)
        elif literal_kind == "Every":
            names = [context.module.text(span) for span in (literal.get("key"), literal.get("value")) if span]
            # Not a definedness-implying use: whether `every` over an undefined domain holds is engine lore.
            self._expr(literal["domain"], scope, context, positive=False)
            self._query(literal["query"], scope, context, (), names)
        else:
            self._generic(literal, scope, context, positive=False)
        for modifier in statement.get("with_mods") or ():
            self._expr(modifier["as"], scope, context, positive=False)

    def _declare(self, name: str, scope: _Scope) -> None:
        """A nested ``some``/``every`` variable: an outer alias it shadows is read whole (the safe reading)."""
        found = scope.parent.lookup(name) if scope.parent is not None else None
        if found is not None and found[0] is not None:
            self._record(found[0].targets)
        scope.locals.add(name)

    # ------------------------------------------------------------------ expressions

    def _expr(self, node: Node, scope: _Scope, context: _Context, *, positive: bool) -> None:
        node_kind, fields = kind(node)
        if node_kind in _REFS:
            targets = self._resolve(node, scope, context, positive=positive, effects=True)
            if targets:
                self._record(targets)
        elif node_kind == "Call":
            for param in fields.get("params", ()):
                self._expr(param, scope, context, positive=positive)
        elif node_kind in ("ArrayCompr", "SetCompr"):
            self._query(fields["query"], scope, context, [(fields["term"], False)])
        elif node_kind == "ObjectCompr":
            self._query(fields["query"], scope, context, [(fields["key"], False), (fields["value"], False)])
        else:
            self._generic(fields, scope, context, positive=positive)

    def _generic(self, value: Any, scope: _Scope, context: _Context, *, positive: bool) -> None:
        for child in children(value):
            if _is_node(child):
                self._expr(child, scope, context, positive=positive)
            else:
                self._generic(child, scope, context, positive=positive)

    def _resolve(
        self, node: Node, scope: _Scope, context: _Context, *, positive: bool, effects: bool
    ) -> Targets | None:
        """The input places a reference denotes, or ``None`` when it is not into the input. With ``effects`` the
        reads inside it are recorded (dynamic indexes, a data document holding aliases) and alias uses counted."""
        root, start, steps = chain(node)
        if root is None:
            if effects and start is not None:
                self._expr(start, scope, context, positive=positive)
            self._indexes(steps, scope, context, positive=positive, effects=effects)
            return None
        found = scope.lookup(root)
        if found is not None:
            alias, own = found
            if alias is None:
                self._indexes(steps, scope, context, positive=positive, effects=effects)
                return None
            if effects and own and positive:
                alias.defined_by_use = True
            return self._extend(alias.targets, steps, scope, context, positive=positive, effects=effects)
        if root == "input":
            return self._extend(_EVERYTHING, steps, scope, context, positive=positive, effects=effects)
        if root == "data":
            return self._data(steps, scope, context, positive=positive, effects=effects)
        imported = context.module.imports.get(root)
        if imported is not None:
            if imported[0] == "input":
                return self._extend(
                    frozenset({(imported[1:], True)}), steps, scope, context, positive=positive, effects=effects
                )
            return self._data([*imported[1:], *steps], scope, context, positive=positive, effects=effects)
        if root in context.rules:
            return self._data(
                [*context.module.package, root, *steps], scope, context, positive=positive, effects=effects
            )
        self._indexes(steps, scope, context, positive=positive, effects=effects)
        return None

    def _data(
        self, steps: list[Segment], scope: _Scope, context: _Context, *, positive: bool, effects: bool = True
    ) -> Targets | None:
        """A reference below ``data``: into a rule alias it extends the alias; otherwise every alias inside the
        document it reads is read whole."""
        constant: list[str] = []
        for step in steps:
            if not isinstance(step, str):
                break
            constant.append(step)
        for length in range(len(constant), 0, -1):
            targets = self.aliases.get(tuple(constant[:length]))
            if targets is not None:
                return self._extend(targets, steps[length:], scope, context, positive=positive, effects=effects)
        if effects:
            prefix = tuple(constant)
            for path, targets in self.aliases.items():
                if path[: len(prefix)] == prefix:
                    self._record(targets)
        self._indexes(steps, scope, context, positive=positive, effects=effects)
        return None

    def _extend(
        self, targets: Targets, steps: list[Segment], scope: _Scope, context: _Context, *, positive: bool, effects: bool
    ) -> Targets:
        extended = set()
        for path, extensible in targets:
            for step in steps:
                if extensible and isinstance(step, str):
                    path = (*path, step)
                else:
                    extensible = False
            extended.add((path, extensible))
        self._indexes(steps, scope, context, positive=positive, effects=effects)
        return frozenset(extended)

    def _indexes(
        self, steps: list[Segment], scope: _Scope, context: _Context, *, positive: bool, effects: bool
    ) -> None:
        if effects:
            for step in steps:
                if not isinstance(step, str):
                    self._expr(step, scope, context, positive=positive)

    def _known(self, name: str, scope: _Scope, context: _Context) -> bool:
        """Whether ``name`` already means something here (so ``name = <ref>`` compares rather than binds)."""
        return (
            scope.lookup(name) is not None
            or name in ("input", "data")
            or name in context.module.imports
            or name in context.rules
        )

    def _record(self, targets: Iterable[Target]) -> None:
        if self.recording:
            self.reads.update(path for path, _ in targets)


def _var_names(node: Node | None) -> set[str]:
    """Variables a pattern (``[a, {"k": b}]``) declares."""
    if node is None:
        return set()
    node_kind, fields = kind(node)
    if node_kind == "Var":
        return {str(fields["value"])}
    if node_kind in ("Array", "Object", "Set"):
        return {name for child in children(fields) if _is_node(child) for name in _var_names(child)}
    return set()


def _is_node(value: dict[str, Any]) -> bool:
    return len(value) == 1 and next(iter(value))[:1].isupper()


def _minimal(reads: set[InputPath]) -> frozenset[InputPath]:
    kept: list[InputPath] = []
    for path in sorted(reads, key=len):
        if not any(path[: len(shorter)] == shorter for shorter in kept):
            kept.append(path)
    return frozenset(kept)
