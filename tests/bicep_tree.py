"""Read Bicep templates through tree-sitter-bicep, for tests that assert on their structure.

A small query layer over the concrete syntax tree: declarations (params, vars, resources,
modules, outputs), object properties by dotted key path, and literal values. Anything that is
not a literal (a reference, a function call, an interpolated string) comes back as `Expr`,
holding its source text, so a test can still compare it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tree_sitter
import tree_sitter_bicep

Node = tree_sitter.Node

_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))

# tree-sitter-bicep 1.1.0 has no rule for the untyped `param <name> = <value>` assignment of
# .bicepparam files (it always expects a type). Such a line is parsed as `var <name> = <value>`
# instead: same expression grammar, same byte offsets ('param' and 'var  ' are both 5 bytes),
# so every value expression is still checked for ERROR and MISSING nodes.
_BICEPPARAM_ASSIGNMENT = re.compile(rb"(?m)^param(?=\s+\w+\s*=)")


@dataclass(frozen=True)
class Expr:
    """A non-literal expression, kept as its source text (e.g. `identity.outputs.clientId`)."""

    text: str


@dataclass(frozen=True)
class Resource:
    symbol: str
    type: str  # e.g. 'Microsoft.ServiceBus/namespaces/queues'
    api_version: str  # e.g. '2024-01-01'; '' when the declaration omits it
    body: Node  # the resource's object
    existing: bool
    conditional: bool  # `= if (...) {...}`
    looped: bool  # `= [for ...]`
    line: int  # 1-based
    leading_comment: str  # comment lines directly above the declaration


@dataclass(frozen=True)
class Module:
    symbol: str
    path: str
    body: Node


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Node | None
    decorators: tuple[str, ...]  # decorator source text, e.g. "@secure()"
    decorator_nodes: tuple[Node, ...] = ()

    def decorator_argument(self, name: str) -> Any:
        """The literal argument of decorator `@name(...)` ([2048, 4096] for @allowed), or None."""
        for node in self.decorator_nodes:
            for call in find_calls(node, name):
                (argument,) = call_arguments(call)
                return literal(argument)
        return None


class Template:
    def __init__(self, path: Path) -> None:
        self.path = path
        source = path.read_bytes()
        if path.suffix == ".bicepparam":
            source = _BICEPPARAM_ASSIGNMENT.sub(b"var  ", source)
        self.source = source
        self.tree = _PARSER.parse(source)
        self.root = self.tree.root_node

    # -- syntax -------------------------------------------------------------------------------
    def syntax_problems(self) -> list[str]:
        """Every ERROR or MISSING node, as 'file:line:col: kind near <text>'."""
        problems: list[str] = []
        for node in _walk(self.root):
            if node.type == "ERROR" or node.is_missing:
                kind = "MISSING " + node.type if node.is_missing else "ERROR"
                row, col = node.start_point
                near = _text(node)[:40]
                problems.append(f"{self.path}:{row + 1}:{col + 1}: {kind} near {near!r}")
        return problems

    # -- declarations -------------------------------------------------------------------------
    def _declarations(self, kind: str) -> Iterator[tuple[Node, tuple[Node, ...]]]:
        decorators: tuple[Node, ...] = ()
        for child in self.root.named_children:
            if child.type == "decorators":
                decorators = tuple(child.named_children)
                continue
            if child.type == kind:
                yield child, decorators
            if child.type != "comment":
                decorators = ()

    def params(self) -> dict[str, Param]:
        found: dict[str, Param] = {}
        for node, decorators in self._declarations("parameter_declaration"):
            name = _first(node, "identifier")
            type_node = _first(node, "type")
            default = _value_after_equals(node)
            found[_text(name)] = Param(
                name=_text(name),
                type=_text(type_node) if type_node is not None else "",
                default=default,
                decorators=tuple(_text(d) for d in decorators),
                decorator_nodes=decorators,
            )
        return found

    def variables(self) -> dict[str, Node]:
        """`var` declarations (and, in a .bicepparam file, the `param` assignments)."""
        found: dict[str, Node] = {}
        for node, _ in self._declarations("variable_declaration"):
            value = _value_after_equals(node)
            assert value is not None
            found[_text(_first(node, "identifier"))] = value
        return found

    def outputs(self) -> dict[str, Node]:
        found: dict[str, Node] = {}
        for node, _ in self._declarations("output_declaration"):
            value = _value_after_equals(node)
            assert value is not None
            found[_text(_first(node, "identifier"))] = value
        return found

    def using(self) -> str | None:
        for child in self.root.named_children:
            if child.type == "using_statement":
                path: str | None = literal(_first(child, "string"))  # a plain string literal
                return path
        return None

    def resources(self) -> list[Resource]:
        found: list[Resource] = []
        for node in _walk(self.root):
            if node.type != "resource_declaration":
                continue
            type_string = literal(_first(node, "string"))
            assert isinstance(type_string, str), f"{self.path}: interpolated resource type"
            rtype, _, version = type_string.partition("@")
            value = _value_after_equals(node)
            assert value is not None
            conditional = value.type == "if_statement"
            looped = value.type == "for_statement"
            body = value
            if conditional or looped:
                body = next(c for c in value.named_children if c.type == "object")
            found.append(
                Resource(
                    symbol=_text(_first(node, "identifier")),
                    type=rtype,
                    api_version=version,
                    body=body,
                    existing=any(c.type == "existing" for c in node.children),
                    conditional=conditional,
                    looped=looped,
                    line=node.start_point[0] + 1,
                    leading_comment=self._leading_comment(node),
                )
            )
        return found

    def modules(self) -> list[Module]:
        found: list[Module] = []
        for node, _ in self._declarations("module_declaration"):
            path = literal(_first(node, "string"))
            body = _value_after_equals(node)
            assert isinstance(path, str) and body is not None
            found.append(Module(symbol=_text(_first(node, "identifier")), path=path, body=body))
        return found

    def resource(self, symbol: str) -> Resource:
        matches = [r for r in self.resources() if r.symbol == symbol]
        assert len(matches) == 1, f"{self.path}: expected one resource {symbol!r}"
        return matches[0]

    def resources_of_type(self, rtype: str) -> list[Resource]:
        return [r for r in self.resources() if r.type.lower() == rtype.lower()]

    def module(self, symbol: str) -> Module:
        matches = [m for m in self.modules() if m.symbol == symbol]
        assert len(matches) == 1, f"{self.path}: expected one module {symbol!r}"
        return matches[0]

    def _leading_comment(self, node: Node) -> str:
        lines = self.source.decode().splitlines()
        row = node.start_point[0] - 1
        collected: list[str] = []
        while row >= 0 and lines[row].lstrip().startswith(("//", "@")):
            if lines[row].lstrip().startswith("//"):
                collected.append(lines[row].strip())
            row -= 1
        return "\n".join(reversed(collected))


@cache
def load(path: Path) -> Template:
    return Template(path)


# -- objects and values -------------------------------------------------------------------------
def keys(obj: Node) -> list[str]:
    """Keys of an object node, in source order (quoted and unquoted alike)."""
    assert obj.type == "object", f"not an object: {obj.type}"
    return [key for key, _ in _properties(obj)]


def prop(obj: Node, path: str) -> Node | None:
    """The value at a dotted key path ('properties.siteConfig.minTlsVersion'), or None."""
    node: Node | None = obj
    for part in path.split("."):
        if node is None or node.type != "object":
            return None
        node = dict(_properties(node)).get(part)
    return node


def literal(node: Node | None) -> Any:
    """A Python value for a literal node; `Expr` for anything computed."""
    if node is None:
        return None
    if node.type == "string":
        if any(c.type == "interpolation" for c in node.named_children):
            return Expr(_text(node))
        raw = _text(node)
        if raw.startswith("'''"):
            return raw[3:-3]
        return raw[1:-1].replace("\\'", "'").replace("\\\\", "\\")
    if node.type == "number":
        return int(_text(node))
    if node.type == "boolean":
        return _text(node) == "true"
    if node.type == "null":
        return None
    if node.type == "array":
        return [literal(c) for c in node.named_children if c.type != "comment"]
    if node.type == "object":
        return {key: literal(value) for key, value in _properties(node)}
    if node.type == "unary_expression" and _text(node).startswith("-"):
        inner = literal(node.named_children[-1])
        return -inner if isinstance(inner, int) else Expr(_text(node))
    return Expr(_text(node))


def text(node: Node | None) -> str:
    return "" if node is None else _text(node)


def find_calls(node: Node, function: str) -> list[Node]:
    """Every call of `function(...)` under node (argument lists: `call_arguments`)."""
    return [
        n
        for n in _walk(node)
        if n.type == "call_expression" and _text(n.named_children[0]) == function
    ]


def call_arguments(call: Node) -> list[Node]:
    args = next(c for c in call.named_children if c.type == "arguments")
    return [c for c in args.named_children if c.type != "comment"]


def find_properties(node: Node, key: str) -> list[Node]:
    """The value of every `key: value` property under node, at any depth, in source order."""
    return [
        value
        for n in _walk(node)
        if n.type == "object"
        for k, value in _properties(n)
        if k == key
    ]


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "'": "'", "$": "$"}


def interpolate(string: Node, resolve: Callable[[Node], str]) -> str:
    """The value of a (possibly interpolated) string literal, as Bicep builds it.

    Escape sequences are decoded; each `${expr}` becomes resolve(expr), so the caller decides
    what a parameter or a function call such as loadTextContent() evaluates to.
    """
    assert string.type == "string", f"not a string: {string.type}"
    if _text(string).startswith("'''"):  # multi-line strings take no escapes or interpolation
        return _text(string)[3:-3]
    parts: list[str] = []
    for child in string.named_children:
        if child.type == "string_content":
            parts.append(_text(child))
        elif child.type == "escape_sequence":
            escape = _text(child)[1:]
            if escape.startswith("u{"):
                parts.append(chr(int(escape[2:-1], 16)))
            else:
                parts.append(_ESCAPES[escape])
        elif child.type == "interpolation":
            (expression,) = [c for c in child.named_children if c.type != "comment"]
            parts.append(resolve(expression))
        else:
            raise AssertionError(f"unexpected {child.type} in string {_text(string)[:40]!r}")
    return "".join(parts)


# -- internals ----------------------------------------------------------------------------------
def _walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from _walk(child)


def _text(node: Node | None) -> str:
    assert node is not None
    return (node.text or b"").decode()


def _first(node: Node, child_type: str) -> Node | None:
    return next((c for c in node.children if c.type == child_type), None)


def _value_after_equals(node: Node) -> Node | None:
    seen_equals = False
    for child in node.children:
        if seen_equals and child.is_named and child.type != "comment":
            return child
        if child.type == "=":
            seen_equals = True
    return None


def _properties(obj: Node) -> Iterator[tuple[str, Node]]:
    for child in obj.named_children:
        if child.type != "object_property":
            continue
        named = [c for c in child.named_children if c.type != "comment"]
        if len(named) < 2:  # a nested resource declaration, not a key: value pair
            continue
        key_node, value = named[0], named[-1]
        key = literal(key_node) if key_node.type == "string" else _text(key_node)
        yield (key.text if isinstance(key, Expr) else key), value
