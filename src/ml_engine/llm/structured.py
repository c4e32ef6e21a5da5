"""JSON schemas → llama.cpp GBNF grammars that make every sampled reply valid, or a refusal.

The conversion is llama-cpp-python's port of llama.cpp's ``json_schema_to_grammar``
(``llama_cpp.llama_grammar.SchemaConverter``). It silently drops what it cannot express (a
``minimum``, a ``format: email``, ``uniqueItems``, the siblings of an ``anyOf``…), so a schema is
first walked here against the keywords the grammar enforces: anything else is refused
(``SchemaRefused``, one line naming the keyword and where it is), never ignored. Annotations
(``title``, ``description``…) constrain nothing and are accepted.

Three fixes over the converter, each making the grammar stricter, never looser:

- its ``char`` rule lets raw control characters into strings, which JSON forbids: replaced by
  llama.cpp's current rule;
- a ``pattern`` is translated into the regex subset the converter parses, with ``.``, ``\\d``,
  ``\\w``, ``\\s`` and negated classes narrowed to characters a JSON string holds unescaped (the
  grammar emits characters raw), and matched as a whole string (``^(…)$``: stricter than JSON
  Schema's search, so every match is valid);
- ``$defs`` of different tools are renamed apart (the converter names a reference's rule by the
  last segment of its path, so two tools' ``Address`` would share one rule).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

# llama.cpp's json-schema-to-grammar: a string character is anything but '"', '\' and the
# control characters, or an escape; nor a code point UTF-8 cannot hold (llama.cpp's grammar
# decodes a surrogate's or an out-of-range lead byte's bytes into one, Python refuses them)
CHAR_RULE = (
    r'[^"\\\x7F\x00-\x1F\uD800-\uDFFF\U00110000-\U001FFFFF] | [\\] (["\\/bfnrt] | "u" '
    + " ".join(["[0-9a-fA-F]"] * 4)
    + ")"
)
# a character a pattern's "." or negated class may produce raw inside a JSON string
# A character a pattern's "." or negated class, or a length-bounded string, may produce: printable
# ASCII but '"' and '\'. llama.cpp's grammar counts code points it decodes from the tokens'
# bytes, and decodes byte runs that are no UTF-8 (overlong forms) into code points: Python then
# reads one as several U+FFFD and the length (or the pattern) no longer holds. Unbounded strings
# keep any character (CHAR_RULE): such a run is still valid JSON text there.
_JSON_RAW_EXCLUDED = '"\\\\\\x00-\\x1F\\x7F-\\U001FFFFF'
# a positive class: llama.cpp lets partial UTF-8 sequences through a negated one
_DOT = "[ !#-\\[\\]-~]"
_CLASS_ESCAPES = {"d": "0-9", "w": "A-Za-z0-9_", "s": " "}

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated"}
    | {"readOnly", "writeOnly"}
)
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_STRING_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3"})
_STRING_FORMATS |= {"uuid4", "uuid5"}
# what the grammar enforces, per kind of node (annotations aside)
_OBJECT = frozenset({"type", "properties", "required", "additionalProperties"})
_ARRAY_LIST = frozenset({"type", "items", "minItems", "maxItems"})
_ARRAY_TUPLE = frozenset({"type", "prefixItems", "items"})
_STRING = frozenset({"type", "minLength", "maxLength"})
_WHY = {
    "oneOf": "the grammar cannot exclude a value that matches several alternatives; use anyOf",
    "allOf": "the grammar merges only the components' properties; write one object schema",
    "not": "a grammar cannot exclude values",
    "if": "conditional schemas (if/then/else) are not enforced by the grammar",
    "then": "conditional schemas (if/then/else) are not enforced by the grammar",
    "else": "conditional schemas (if/then/else) are not enforced by the grammar",
    "uniqueItems": "the grammar cannot compare array items with each other",
    "contains": "the grammar cannot require an item somewhere in an array",
    "minimum": "number bounds are not enforced by the grammar",
    "maximum": "number bounds are not enforced by the grammar",
    "exclusiveMinimum": "number bounds are not enforced by the grammar",
    "exclusiveMaximum": "number bounds are not enforced by the grammar",
    "multipleOf": "the grammar cannot enforce multiples",
    "patternProperties": "property names matched by patterns are not enforced by the grammar",
    "propertyNames": "property-name schemas are not enforced by the grammar",
    "minProperties": "property counts are not enforced by the grammar",
    "maxProperties": "property counts are not enforced by the grammar",
    "dependentRequired": "dependencies between properties are not enforced by the grammar",
    "dependentSchemas": "dependencies between properties are not enforced by the grammar",
}


class SchemaRefused(ValueError):
    """A schema the grammar cannot enforce, or not a schema at all: one line, the client's
    mistake (a 400)."""


def _refuse(where: str, message: str) -> SchemaRefused:
    return SchemaRefused(f"{where}: {message}")


def _count(node: dict[str, Any], key: str, where: str) -> int | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _refuse(f"{where}.{key}", f"expected a non-negative integer, got {value!r}")
    return value


class _Checker:
    """Walks a schema, refusing what the grammar cannot enforce, rewriting what it can
    (patterns, ``$defs`` names) into the converter's dialect."""

    def __init__(self, root: dict[str, Any], prefix: str) -> None:
        self.root, self.prefix = root, prefix
        self.defs: dict[str, str] = {}  # "#/$defs/X" → the renamed "#/$defs/<prefix>X"

    def run(self, where: str) -> dict[str, Any]:
        for section in ("$defs", "definitions"):
            defs = self.root.get(section)
            if defs is None:
                continue
            if not isinstance(defs, dict):
                raise _refuse(f"{where}.{section}", "expected an object of schemas")
            for name in defs:
                self.defs[f"#/{section}/{name}"] = f"#/{section}/{self.prefix}{name}"
        checked = self.node(self.root, where, top=True)
        for section in ("$defs", "definitions"):
            if section in self.root:
                checked[section] = {
                    f"{self.prefix}{name}": self.node(sub, f"{where}.{section}.{name}")
                    for name, sub in self.root[section].items()
                }
        return checked

    def node(self, node: Any, where: str, top: bool = False) -> dict[str, Any]:
        if isinstance(node, bool):
            raise _refuse(where, "a boolean schema is not enforced by the grammar; give {}")
        if not isinstance(node, dict):
            raise _refuse(where, f"a schema must be an object, got {type(node).__name__}")
        keys = set(node) - ANNOTATIONS - ({"$defs", "definitions"} if top else set())
        for key in sorted(keys):
            if key in _WHY:
                raise _refuse(f"{where}.{key}", f"'{key}' is not supported ({_WHY[key]})")
        out = {k: v for k, v in node.items() if k in ANNOTATIONS}
        kind = node.get("type")
        if isinstance(kind, list):
            if not kind or any(t not in _TYPES for t in kind) or len(set(kind)) != len(kind):
                raise _refuse(f"{where}.type", f"expected distinct types of {sorted(_TYPES)}")
            self._only(keys, {"type"}, where, "with a list of types (use anyOf to add keywords)")
            return {**out, "type": list(kind)}
        if kind is not None and kind not in _TYPES:
            raise _refuse(
                f"{where}.type", f"unknown type {kind!r}; expected one of {sorted(_TYPES)}"
            )
        if "$ref" in node:
            return {**out, "$ref": self._ref(node["$ref"], keys, where)}
        if "anyOf" in node:
            self._only(keys, {"anyOf"}, where, "beside anyOf (add them to each alternative)")
            options = node["anyOf"]
            if not isinstance(options, list) or not options:
                raise _refuse(f"{where}.anyOf", "expected a non-empty list of schemas")
            return {
                **out,
                "anyOf": [self.node(o, f"{where}.anyOf[{i}]") for i, o in enumerate(options)],
            }
        if "const" in node or "enum" in node:
            return {**out, **self._constants(node, keys, where)}
        if kind == "object" or (kind is None and keys & {"properties", "additionalProperties"}):
            return {**out, **self._object(node, keys, where)}
        if kind == "array" or (kind is None and keys & {"items", "prefixItems"}):
            return {**out, **self._array(node, keys, where)}
        if kind == "string" or (
            kind is None and keys & {"pattern", "format", "minLength", "maxLength"}
        ):
            return {**out, **self._string(node, keys, where)}
        self._only(keys, {"type"}, where, f"for type {kind or 'any'}")
        return {**out, **({"type": kind} if kind else {})}

    def _only(
        self, keys: set[str], allowed: set[str] | frozenset[str], where: str, why: str
    ) -> None:
        extra = sorted(keys - set(allowed))
        if extra:
            raise _refuse(
                f"{where}.{extra[0]}", f"'{extra[0]}' is not enforced by the grammar {why}"
            )

    def _ref(self, ref: Any, keys: set[str], where: str) -> str:
        self._only(keys, {"$ref"}, where, "beside $ref")
        if not isinstance(ref, str) or ref not in self.defs:
            raise _refuse(
                f"{where}.$ref",
                f"{str(ref)[:80]!r} is not supported; only references to this schema's own "
                "$defs or definitions ('#/$defs/<name>') are, no remote or root references",
            )
        return self.defs[ref]

    def _constants(self, node: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
        self._only(keys, {"type", "const", "enum"}, where, "beside const/enum")
        if "const" in node and "enum" in node:
            raise _refuse(where, "give const or enum, not both")
        values = [node["const"]] if "const" in node else node["enum"]
        if not isinstance(values, list) or not values:
            raise _refuse(f"{where}.enum", "expected a non-empty list of values")
        kind = node.get("type")
        for value in values:
            if kind is not None and not _is_type(value, kind):
                raise _refuse(where, f"the value {json.dumps(value)[:60]} is not of type {kind}")
        return {"const": values[0]} if "const" in node else {"enum": list(values)}

    def _object(self, node: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
        self._only(keys, _OBJECT, where, "on an object")
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise _refuse(f"{where}.properties", "expected an object of schemas")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _refuse(f"{where}.required", "expected a list of property names")
        missing = [name for name in required if name not in properties]
        if missing:
            # the grammar writes only the properties it knows: such an object could never pass
            raise _refuse(f"{where}.required", f"'{missing[0]}' is required but not in properties")
        out: dict[str, Any] = {"type": "object"}
        if properties:
            out["properties"] = {
                name: self.node(sub, f"{where}.properties.{name}")
                for name, sub in properties.items()
            }
        if required:
            out["required"] = list(required)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = self.node(extra, f"{where}.additionalProperties")
        elif isinstance(extra, bool):
            out["additionalProperties"] = extra
        elif extra is not None:
            raise _refuse(f"{where}.additionalProperties", "expected a boolean or a schema")
        return out

    def _array(self, node: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
        items = node.get("items")
        if "prefixItems" in node or isinstance(items, list):
            self._only(keys, _ARRAY_TUPLE, where, "on a tuple (prefixItems: exactly these items)")
            tuple_items = node.get("prefixItems", items)
            if "prefixItems" in node and items not in (None, False):
                raise _refuse(f"{where}.items", "beside prefixItems only items: false is enforced")
            if not isinstance(tuple_items, list) or not tuple_items:
                raise _refuse(f"{where}.prefixItems", "expected a non-empty list of schemas")
            checked = [self.node(s, f"{where}.prefixItems[{i}]") for i, s in enumerate(tuple_items)]
            return {"type": "array", "prefixItems": checked, "items": False}
        self._only(keys, _ARRAY_LIST, where, "on an array")
        low = _count(node, "minItems", where) or 0
        high = _count(node, "maxItems", where)
        if high is not None and high < low:
            raise _refuse(where, f"maxItems {high} < minItems {low}")
        # items absent: any values (the converter would otherwise drop minItems/maxItems)
        sub = self.node({} if items is None else items, f"{where}.items")
        out: dict[str, Any] = {"type": "array", "items": sub}
        if low:
            out["minItems"] = low
        if high is not None:
            out["maxItems"] = high
        return out

    def _string(self, node: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
        self._only(keys, _STRING | {"pattern", "format"}, where, "on a string")
        shaped = [k for k in ("pattern", "format") if k in keys]
        lengths = [k for k in ("minLength", "maxLength") if k in keys]
        if len(shaped) > 1 or (shaped and lengths):
            both = [*shaped, *lengths]
            raise _refuse(
                where,
                f"combine {both[0]} and {both[1]} in one pattern instead: the "
                "grammar enforces one of them",
            )
        if "format" in node:
            if node["format"] not in _STRING_FORMATS:
                raise _refuse(
                    f"{where}.format",
                    f"format {str(node['format'])[:40]!r} is not "
                    f"enforced by the grammar; supported: {sorted(_STRING_FORMATS)}",
                )
            return {"type": "string", "format": node["format"]}
        if "pattern" in node:
            if not isinstance(node["pattern"], str):
                raise _refuse(f"{where}.pattern", "expected a regular expression string")
            try:
                re.compile(node["pattern"])
            except re.error as exc:
                raise _refuse(f"{where}.pattern", f"not a regular expression ({exc})") from None
            return {
                "type": "string",
                "pattern": translate_pattern(node["pattern"], f"{where}.pattern"),
            }
        low, high = _count(node, "minLength", where), _count(node, "maxLength", where)
        if high is not None and low is not None and high < low:
            raise _refuse(where, f"maxLength {high} < minLength {low}")
        if low is None and high is None:
            return {"type": "string"}
        # as a pattern of printable ASCII characters: see _JSON_RAW_EXCLUDED
        bounds = f"{low or 0},{'' if high is None else high}"
        return {"type": "string", "pattern": f"^{_DOT}{{{bounds}}}$"}


def _is_type(value: Any, kind: str | list[str]) -> bool:
    kinds = [kind] if isinstance(kind, str) else kind
    checks = {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "null": value is None,
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
    }
    return any(checks.get(k, False) for k in kinds)


def translate_pattern(pattern: str, where: str) -> str:
    """``pattern`` in the converter's regex subset, whole-string, producing only characters a
    JSON string holds raw; a construct outside that subset is refused naming it."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    out, i = [], 0

    def refuse(what: str) -> SchemaRefused:
        return _refuse(where, f"{what} is not supported in patterns the grammar enforces")

    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1] if i + 1 < len(body) else ""
            if nxt in _CLASS_ESCAPES:
                out.append(f"[{_CLASS_ESCAPES[nxt]}]")
            elif nxt.isalnum() or nxt in ('"', "\\", ""):
                raise refuse(f"the escape '\\{nxt}'")
            else:
                out.append(c + nxt)
            i += 2
        elif c == "[":
            end, text = _char_class(body, i, refuse)
            out.append(text)
            i = end
        elif c == ".":
            out.append(_DOT)
            i += 1
        elif c == '"':
            raise refuse("a '\"' (the grammar writes characters unescaped)")
        elif c in "^$":
            raise refuse(f"an anchor '{c}' inside the pattern")
        elif c == "(":
            if body.startswith("(?:", i):
                out.append("(")
                i += 3
                continue
            if body.startswith("(?", i):
                raise refuse("a lookaround or inline flag '(?'")
            out.append(c)
            i += 1
        elif c in "*+?}" and body.startswith("?", i + 1):
            raise refuse(f"the lazy quantifier '{c}?'")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            raise refuse("a control character")
        else:
            out.append(c)
            i += 1
    return "^(" + "".join(out) + ")$"


def _char_class(body: str, start: int, refuse: Any) -> tuple[int, str]:
    """The class at ``body[start]`` ('['): (index after it, its translation)."""
    i = start + 1
    negated = body.startswith("^", i)
    if negated:  # llama.cpp lets byte runs that are no UTF-8 through negated classes
        raise refuse("a negated character class '[^'")
    i += negated
    parts: list[str] = []
    first = True
    while i < len(body) and (body[i] != "]" or first):
        c = body[i]
        first = False
        if c == "\\":
            nxt = body[i + 1] if i + 1 < len(body) else ""
            if nxt in _CLASS_ESCAPES and not negated:
                parts.append(_CLASS_ESCAPES[nxt])
            elif nxt.isalnum() or nxt in ('"', "\\", ""):
                raise refuse(f"the escape '\\{nxt}' in a character class")
            else:
                parts.append(c + nxt)
            i += 2
            continue
        if c == '"' and not negated:
            raise refuse("a '\"' in a character class")
        if c == "-" and parts and i + 1 < len(body) and body[i + 1] != "]" and not negated:
            low, high = parts[-1][-1], body[i + 1]
            if ord(low) <= 0x22 <= ord(high) or ord(low) <= 0x5C <= ord(high) or ord(low) < 0x20:
                raise refuse(
                    f"the range '{low}-{high}' (it holds '\"', '\\' or control characters; "
                    "split it)"
                )
        parts.append(c)
        i += 1
    if i >= len(body):
        raise refuse("an unclosed '['")
    inner = "".join(parts)
    if negated:
        return i + 1, f"[^{inner}{_JSON_RAW_EXCLUDED}]"
    return i + 1, f"[{inner}]"


def check_schema(schema: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``schema`` as the converter should see it (a deep copy), or ``SchemaRefused``."""
    if not isinstance(schema, dict):
        raise _refuse(where, f"a JSON schema must be an object, got {type(schema).__name__}")
    if _depth(schema) > 64:
        raise _refuse(where, "the schema is nested more than 64 levels deep")
    return _Checker(copy.deepcopy(schema), prefix).run(where)


def _depth(value: Any, level: int = 0) -> int:
    if level > 64:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _converter() -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter: Any, schema: dict[str, Any], name: str, url: str, where: str) -> str:
    try:
        converter.resolve_refs(schema, url)
        return converter.visit(schema, name)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise _refuse(where, f"cannot be turned into a grammar ({reason})") from None


def _grammar(converter: Any) -> str:
    if "char" in converter._rules:
        converter._rules["char"] = CHAR_RULE
    return converter.format_grammar()


def schema_grammar(schema: Any, where: str = "response_format.json_schema.schema") -> str:
    """The GBNF grammar (root rule ``root``) of the values ``schema`` accepts."""
    checked = check_schema(schema, where)
    converter = _converter()
    _visit(converter, checked, "", "schema", where)
    return _grammar(converter)


def json_object_grammar() -> str:
    """Any JSON object (``response_format: json_object``)."""
    return schema_grammar({"type": "object"})


TOOL_OPEN, TOOL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def tool_call_grammar(tools: list[tuple[str, dict[str, Any]]], free_text: bool) -> str:
    """One call ``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`` of one of
    ``tools`` (name, parameters schema), its arguments valid against its schema; with
    ``free_text`` (tool_choice auto) the reply may instead be text, which then does not start
    with '<' (so that it can never be read as a call)."""
    converter = _converter()
    calls = []
    for index, (name, parameters) in enumerate(tools):
        where = f"tools[{index}].function.parameters"
        checked = check_schema(parameters, where, prefix=f"t{index}-")
        wrapper = {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": checked},
            "required": ["name", "arguments"],
        }
        if "$defs" in checked or "definitions" in checked:
            # the converter resolves "#/$defs/…" against the schema it is given: the wrapper
            for section in ("$defs", "definitions"):
                if section in checked:
                    wrapper[section] = checked.pop(section)
        calls.append(_visit(converter, wrapper, f"call{index}", f"tool{index}", where))
    converter._rules["tool-call"] = (
        f"{_literal(TOOL_OPEN)} ( {' | '.join(calls)} ) {_literal(TOOL_CLOSE)}"
    )
    root = "tool-call"
    if free_text:
        converter._rules["free-text"] = "[^<\\x00] [^\\x00]*"
        root = "tool-call | free-text"
    converter._rules["root"] = root
    return _grammar(converter)


def _literal(text: str) -> str:
    return json.dumps(text)
