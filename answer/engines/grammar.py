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
``type``, a malformed pattern) raise `ValueError` with a message fit for a 400.
"""

from __future__ import annotations

import json
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
        try:
            copied = _anchored(json.loads(json.dumps(schema)))
            resolved = self.converter.resolve_refs(copied, "input")
            return str(self.converter.visit(resolved, name))
        except (AssertionError, ValueError, KeyError, TypeError, IndexError,
                RecursionError) as error:  # fmt: skip
            reason = str(error) or type(error).__name__
            if "remote schemas" in reason:
                reason = "a $ref must point inside the schema (#/...)"
            raise ValueError(f"{what} cannot be enforced: {reason}") from None

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
        return str(self.converter.format_grammar())


def _anchored(schema: Any) -> Any:
    """`schema` with every ``pattern`` anchored at both ends (the converter needs that): a
    string matching the anchored pattern matches the pattern too."""
    if isinstance(schema, list):
        return [_anchored(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    anchored = {key: _anchored(value) for key, value in schema.items()}
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        start = pattern.startswith("^")
        end = pattern.endswith("$") and not pattern.endswith("\\$")
        if not (start and end):
            inner = pattern[1 if start else 0 : len(pattern) - 1 if end else len(pattern)]
            anchored["pattern"] = f"^{'' if start else '.*'}({inner}){'' if end else '.*'}$"
    return anchored


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
    calls = _calls_rule(grammar, tools, options.parallel_tool_calls)
    if options.tool_choice != "auto":
        return grammar.text(calls)
    words = answer if answer is not None else grammar.rule("text", TEXT_RULE)
    return grammar.text(grammar.rule("reply", f"[ \\t\\n]? ( {calls} | {words} )"))
