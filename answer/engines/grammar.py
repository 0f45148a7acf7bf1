"""GBNF grammars for structured output and tool calls, which llama.cpp's sampler enforces.

`grammar_for` turns a job's `response_format` and `tools` into one grammar (or None for
free text). JSON Schemas go through llama.cpp's own converter
(`llama_cpp.llama_grammar.SchemaConverter`), with strings kept to valid JSON (no raw
control characters). Tool calls have one shape, whatever the model:

    {"tool_calls": [{"name": "NAME", "arguments": {...}}, ...]}

each call's arguments held to that tool's parameters schema. With ``tool_choice``
"auto" the answer is either such a call or plain text that cannot start like one (its
first character is neither ``{`` nor a blank); "required" allows only calls, a named
function only calls of it; ``parallel_tool_calls`` false allows a single call.

Keywords the converter cannot enforce (``minimum``, ``maximum``, ``multipleOf``,
``uniqueItems``, ...) are not enforced; refused schemas (remote ``$ref``, an unknown
``type``) raise `ValueError` with a message fit for a 400.

A schema is a caller's input that becomes work in every process it reaches: its
grammar is built in the web process and again in the worker, parsed by llama.cpp
(recursively, on the engine thread's stack) and run over the whole vocabulary at
each step the job's own pick is refused. So a schema is bounded before it is
converted (`check_schema`): its size, depth and number of nodes; repetition counts
(``maxLength``, ``maxItems``, ...: the converter writes a bound of N as N nested
optional groups, and llama.cpp crashes on deep nesting); alternatives (``enum``,
``anyOf``: each one sharing a prefix is one more grammar stack to follow at every
step); no ``pattern`` (a regular expression becomes a grammar whose ambiguity a
caller controls) and no recursive ``$ref``. The grammar itself is capped too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kernel.contract import GenerationOptions, ResponseFormat, ToolSpec

# The key of the one object a tool-call answer is; `answer.tools` parses it back.
CALLS_KEY = "tool_calls"
# Parallel calls in one answer, at most: a small model may otherwise repeat a call until
# it runs out of tokens.
MAX_PARALLEL_CALLS = 8
# A JSON string character: anything but a quote, a backslash or a control character
# (llama.cpp's converter lets raw newlines into strings, which no JSON parser accepts).
JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
# Bounds on what a caller's schema may ask of the grammar (see the module's docstring).
MAX_SCHEMA_CHARS = 16_384  # one schema, as JSON
MAX_SCHEMA_DEPTH = 10  # nested objects and lists of the schema's JSON itself
MAX_SCHEMA_NODES = 256  # sub-schemas in one schema
MAX_REPETITION = 256  # minLength, maxLength, minItems, maxItems, ...
MAX_ALTERNATIVES = 64  # enum values (or anyOf/oneOf branches) at one place
MAX_ALL_ALTERNATIVES = 256  # ... in the whole schema
MAX_TOOLS = 32  # tools offered in one grammar
MAX_GRAMMAR_CHARS = 65_536
REPETITION_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
                       "maxProperties", "minContains", "maxContains")  # fmt: skip
_LOCAL_REF = re.compile(r"#/(\$defs|definitions)/[^/]+")
REFUSED_KEYWORDS = {
    "pattern": "a pattern",
    "patternProperties": "patternProperties",
    "$dynamicRef": "a $dynamicRef",
    "$recursiveRef": "a $recursiveRef",
}
# Plain text, when the model may answer in words instead of calling a tool: it cannot
# start like a call (with "{", even after blanks).
TEXT_RULE = r"[^{ \t\r\n] [^\x00]*"


def _schema_of(response_format: ResponseFormat) -> dict[str, Any]:
    schema = response_format.json_schema
    if schema is None:
        raise ValueError("response_format of type json_schema needs a json_schema")
    # OpenAI's wrapper {"name": ..., "schema": {...}, "strict": ...}, if passed as is.
    inner = schema.get("schema")
    if isinstance(inner, dict) and "name" in schema:
        return inner
    return schema


class _Grammar:
    """One grammar assembled from several schemas, their rules sharing one namespace."""

    def __init__(self) -> None:
        from llama_cpp.llama_grammar import SchemaConverter

        self.converter = SchemaConverter(
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )

    def schema(self, schema: dict[str, Any], name: str, what: str) -> str:
        """Add the rules of `schema`; the name of its rule."""
        if not isinstance(schema, dict):
            raise ValueError(f"{what} must be a JSON Schema object")
        check_schema(schema, what)
        try:
            copied = json.loads(json.dumps(schema))
            resolved = self.converter.resolve_refs(copied, "input")
            return str(self.converter.visit(resolved, name))
        except Exception as error:  # noqa: BLE001 - any failure of the converter is the schema's
            reason = str(error) or type(error).__name__
            if "remote schemas" in reason:
                reason = "a $ref must point inside the schema (#/...)"
            raise ValueError(f"{what} cannot be enforced: {reason[:200]}") from None

    def rule(self, name: str, body: str) -> str:
        """Add a rule of our own; its (unique) name."""
        return str(self.converter._add_rule(name, body))

    def text(self, root: str) -> str:
        """The grammar, starting at rule `root`."""
        rules = self.converter._rules
        if "char" in rules:
            rules["char"] = JSON_CHAR
        if root != "root":
            rules["root"] = root
        grammar = str(self.converter.format_grammar())
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise ValueError("the schema is too large to enforce: make it smaller")
        return grammar


def check_schema(schema: dict[str, Any], what: str) -> None:
    """Raise ValueError (fit for a 400) unless `schema` stays within the bounds above."""
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not JSON") from None
    if size > MAX_SCHEMA_CHARS:
        raise ValueError(f"{what} is longer than {MAX_SCHEMA_CHARS} characters")
    nodes = _walk(schema, what, depth=0)
    if nodes > MAX_SCHEMA_NODES:
        raise ValueError(f"{what} has more than {MAX_SCHEMA_NODES} sub-schemas")
    if _alternatives(schema) > MAX_ALL_ALTERNATIVES:
        raise ValueError(f"{what} offers more than {MAX_ALL_ALTERNATIVES} alternatives in all")
    _refuse_recursion(schema, what)


def _walk(node: Any, what: str, depth: int) -> int:
    """Check one node of the schema and what it holds; the number of dict nodes."""
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep "
                         "(counting properties, items and lists)")  # fmt: skip
    if isinstance(node, list):
        return sum(_walk(item, what, depth + 1) for item in node)
    if not isinstance(node, dict):
        return 0
    for keyword, name in REFUSED_KEYWORDS.items():
        if keyword in node:
            raise ValueError(f"{what} uses {name}, which cannot be enforced safely here")
    for keyword in REPETITION_KEYWORDS:
        value = node.get(keyword)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= MAX_REPETITION):  # fmt: skip
            raise ValueError(f"{what}: {keyword} must be a whole number from 0 to "
                             f"{MAX_REPETITION}")  # fmt: skip
    for keyword in ("enum", "anyOf", "oneOf", "allOf", "type"):
        value = node.get(keyword)
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{what}: an empty {keyword} allows nothing")
            if len(value) > MAX_ALTERNATIVES:
                raise ValueError(f"{what}: {keyword} has more than {MAX_ALTERNATIVES} entries")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and _LOCAL_REF.fullmatch(ref)):
        raise ValueError(f"{what}: a $ref must name one of the schema's own $defs "
                         "(#/$defs/NAME)")  # fmt: skip
    return 1 + sum(_walk(value, what, depth + 1) for value in node.values())


def _alternatives(node: Any) -> int:
    """How many enum values and anyOf/oneOf branches the schema holds in all."""
    if isinstance(node, list):
        return sum(_alternatives(item) for item in node)
    if not isinstance(node, dict):
        return 0
    own = sum(len(node[k]) for k in ("enum", "anyOf", "oneOf") if isinstance(node.get(k), list))
    return own + sum(_alternatives(value) for value in node.values())


def _refs(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node)) if node else set()
    if not isinstance(node, dict):
        return set()
    own = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
    return own.union(*(_refs(value) for value in node.values()))


def _refuse_recursion(schema: dict[str, Any], what: str) -> None:
    """A $ref that leads back to where it is (a grammar whose depth the model chooses)."""
    targets: dict[str, Any] = {"#": schema}
    for container in ("$defs", "definitions"):
        defs = schema.get(container)
        if isinstance(defs, dict):
            targets.update({f"#/{container}/{name}": value for name, value in defs.items()})
    edges = {ref: _refs(node) for ref, node in targets.items()}

    def reaches(start: str) -> bool:
        seen, todo = set(), list(edges.get(start, ()))
        while todo:
            ref = todo.pop()
            if ref == start:
                return True
            if ref not in seen:
                seen.add(ref)
                todo.extend(edges.get(ref, ()))
        return False

    if any(reaches(ref) for ref in edges):
        raise ValueError(f"{what} refers to itself ($ref), which cannot be enforced safely here")


def _literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def _answer_rule(grammar: _Grammar, response_format: ResponseFormat) -> str | None:
    if response_format.type == "json_object":
        return grammar.schema({"type": "object"}, "answer", "response_format json_object")
    if response_format.type == "json_schema":
        return grammar.schema(_schema_of(response_format), "answer",
                              "response_format json_schema")  # fmt: skip
    if response_format.type == "text":
        return None
    raise ValueError(f"unsupported response_format type {response_format.type!r}")


def _call_rule(grammar: _Grammar, index: int, tool: ToolSpec) -> str:
    arguments = grammar.schema(
        tool.parameters, f"tool{index}-arguments", f"the parameters of tool {tool.name!r}"
    )
    head = (
        f'"{{" space {_literal(json.dumps("name"))} space ":" space '
        f'{_literal(json.dumps(tool.name))} space "," space '
        f'{_literal(json.dumps("arguments"))} space ":" space'
    )
    return grammar.rule(f"tool{index}-call", f'{head} {arguments} "}}" space')


def _calls_rule(grammar: _Grammar, tools: list[ToolSpec], parallel: bool) -> str:
    call = grammar.rule(
        "call", " | ".join(_call_rule(grammar, i, tool) for i, tool in enumerate(tools))
    )
    more = f'( "," space {call} ){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    return grammar.rule(
        "calls",
        f'"{{" space {_literal(json.dumps(CALLS_KEY))} space ":" space "[" space {call} {more} '
        '"]" space "}" space',
    )


def offered_tools(options: GenerationOptions) -> list[ToolSpec]:
    """The tools the model may call for these options (none when tool_choice is "none";
    only the named one when tool_choice names one); ValueError for an unknown name."""
    choice = options.tool_choice
    if choice == "none":
        return []
    if choice in {"auto", "required"}:
        if choice == "required" and not options.tools:
            raise ValueError('tool_choice "required" needs tools')
        return list(options.tools)
    named = [tool for tool in options.tools if tool.name == choice]
    if not named:
        raise ValueError(f"tool_choice names the function {choice!r}, which is not among the tools")
    return named


def grammar_for(options: GenerationOptions) -> str | None:
    """The GBNF grammar the answer must follow, or None for free text without tools.

    Raises ValueError (its message fit for a 400) when a schema cannot be turned into a
    grammar, the response format is unknown, or tool_choice names an unknown tool."""
    tools = offered_tools(options)
    if options.response_format.type == "text" and not tools:
        return None
    grammar = _Grammar()
    answer = _answer_rule(grammar, options.response_format)
    if not tools:
        assert answer is not None
        return grammar.text(answer)
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} tools can be offered at once")
    calls = _calls_rule(grammar, tools, options.parallel_tool_calls)
    if options.tool_choice != "auto":
        return grammar.text(calls)
    words = answer if answer is not None else grammar.rule("text", TEXT_RULE)
    return grammar.text(grammar.rule("reply", f"[ \\t\\n]? ( {calls} | {words} )"))
