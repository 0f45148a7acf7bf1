"""Tool calls for models without tool support in their chat template (the bundled Gemma 3).

The offered tools are written into the system prompt (names, descriptions, argument
schemas and the one call format), and the grammar of `answer.engines.grammar` holds the
model to that format:

    {"tool_calls": [{"name": "NAME", "arguments": {...}}]}

Earlier calls and the tools' answers in the conversation are written as text the model
reads (an assistant turn holding its call, a user turn holding the tool's answer), and
the model's output is parsed back into `ToolCall`s. `StreamGate` keeps the raw call out
of streamed text.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from answer.engines.grammar import CALLS_KEY
from kernel.contract import ChatMessage, ToolCall, ToolChoice, ToolSpec
from kernel.helper_registry import HelperInfo

EXAMPLE_CALL = '{"tool_calls": [{"name": "TOOL", "arguments": {...}}]}'
# The heading of the helpers offered to the model (GPT4P_MODEL_TOOLS); the scripted test
# engine recognises it.
HELPERS_HEADING = "You can use these helpers:"
TOOLS_HEADING = "You can call these tools:"
HELPER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    # Bounded, so a small model cannot ramble inside the call until it runs out of tokens.
    "properties": {
        "input": {"type": "string", "maxLength": 200, "description": "What to ask the helper."}
    },
    "required": ["input"],
    "additionalProperties": False,
}


def new_call_id() -> str:
    """A tool call id as OpenAI writes them: ``call_`` and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


def helper_tools(helpers: Sequence[HelperInfo]) -> list[ToolSpec]:
    """The live helpers as tools: each takes one text, its ``input``."""
    return [
        ToolSpec(name=h.name, description=h.description[:4096], parameters=HELPER_PARAMETERS)
        for h in helpers
    ]


def helper_input(call: ToolCall) -> str:
    """The text to send a helper for the model's call of it."""
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        return call.arguments
    if isinstance(arguments, dict):
        given = arguments.get("input")
        if isinstance(given, str | int | float) and not isinstance(given, bool):
            return str(given)
        texts = [v for v in arguments.values() if isinstance(v, str)]
        if len(texts) == 1:
            return texts[0]
    return json.dumps(arguments)


def instruction(tools: Sequence[ToolSpec], choice: ToolChoice, heading: str = TOOLS_HEADING) -> str:
    """The system prompt's section that offers `tools` and says how to call them."""
    lines = [heading]
    for tool in tools:
        description = " ".join(tool.description.split())
        lines.append(
            f"- {tool.name}: {description}".rstrip(": ") if description else f"- {tool.name}"
        )
        schema = json.dumps(tool.parameters, separators=(",", ":"), ensure_ascii=False)
        lines.append(f"  arguments: {schema}")
    lines.append(f"To call a tool, reply with only a JSON object such as {EXAMPLE_CALL} "
                 "and nothing else.")  # fmt: skip
    if choice == "required":
        lines.append("You must call one of these tools now.")
    elif choice not in {"auto", "none"}:
        lines.append(f"You must call the tool {choice} now.")
    else:
        lines.append("If no tool is needed, answer in plain words.")
    return "\n".join(lines)


def calls_text(calls: Sequence[ToolCall]) -> str:
    """Tool calls written as the model writes them."""
    return json.dumps(
        {CALLS_KEY: [{"name": c.name, "arguments": _arguments(c.arguments)} for c in calls]},
        ensure_ascii=False,
    )


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# After the tools' answers: without it a small model repeats its call instead of answering.
ANSWER_WITH_IT = "Answer my question with {it}, in plain words."


def _tool_answers(
    messages: Sequence[ChatMessage], names: dict[str, str], last: bool
) -> ChatMessage:
    parts = []
    for message in messages:
        name = message.name or names.get(message.tool_call_id or "", "") or "the"
        tool = f"The {name} tool" if name != "the" else "The tool"
        parts.append(f"{tool} answered: {message.content.strip()}")
    if last:
        parts.append(ANSWER_WITH_IT.format(it="it" if len(messages) == 1 else "them"))
    return ChatMessage(role="user", content="\n".join(parts))


def as_text(messages: Sequence[ChatMessage], answer_next: bool = True) -> list[ChatMessage]:
    """The conversation with its tool calls and tool answers written as text: an assistant
    turn holds its calls in the call format, consecutive tool answers become one user turn.
    `answer_next`: tool answers that end the conversation ask for the answer in words
    (not when a call is required next)."""
    if not any(m.role == "tool" or m.tool_calls for m in messages):
        return list(messages)
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    written: list[ChatMessage] = []
    pending: list[ChatMessage] = []
    for message in messages:
        if message.role == "tool":
            pending.append(message)
            continue
        if pending:
            written.append(_tool_answers(pending, names, last=False))
            pending = []
        if message.tool_calls:
            content = f"{message.content.strip()} {calls_text(message.tool_calls)}".strip()
            message = ChatMessage(role=message.role, content=content)
        written.append(message)
    if pending:
        written.append(_tool_answers(pending, names, last=answer_next))
    return written


def with_instruction(
    messages: Sequence[ChatMessage], section: str, system_prompt: str
) -> list[ChatMessage]:
    """`messages` with `section` added to their system message (or to `system_prompt`)."""
    conversation = list(messages)
    if conversation and conversation[0].role == "system":
        first = conversation[0]
        conversation[0] = ChatMessage(role="system", content=f"{first.content}\n\n{section}")
    else:
        content = f"{system_prompt}\n\n{section}" if system_prompt else section
        conversation.insert(0, ChatMessage(role="system", content=content))
    return conversation


def _one_call(value: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # OpenAI's own shape
        value = value["function"]
    if "helper" in value and "name" not in value:  # the old helper convention
        given = value.get("input", "")
        if not isinstance(given, str | int | float) or isinstance(given, bool):
            return None
        value = {"name": value["helper"], "arguments": {"input": str(given)}}
    name, arguments = value.get("name"), value.get("arguments", value.get("parameters", {}))
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_call_id(), name=name,
                    arguments=json.dumps(arguments, ensure_ascii=False))  # fmt: skip


def parse_calls(text: str, tools: Sequence[ToolSpec]) -> list[ToolCall]:
    """The tool calls `text` makes (one call object, several, or our call format); [] when
    it is not a call of an offered tool."""
    body = text.strip()
    if not body.startswith(("{", "[")):
        return []
    try:
        value, end = json.JSONDecoder().raw_decode(body)
    except ValueError:
        value, end = _complete_calls(body), len(body)
    if body[end:].strip():
        return []
    names = {tool.name for tool in tools}
    if isinstance(value, dict) and isinstance(value.get(CALLS_KEY), list) and len(value) == 1:
        value = value[CALLS_KEY]
    listed = value if isinstance(value, list) else [value]
    calls = [_one_call(item, names) for item in listed]
    if not calls or any(call is None for call in calls):
        return []
    unique: dict[tuple[str, str], ToolCall] = {}
    for call in calls:  # a small model may repeat its call until it runs out of tokens
        if call is not None:
            unique.setdefault((call.name, call.arguments), call)
    return list(unique.values())


def _complete_calls(body: str) -> Any:
    """The complete calls at the start of a call list cut short (by max_tokens); None."""
    prefix = re.match(r'\{\s*"tool_calls"\s*:\s*\[\s*', body)
    if prefix is None:
        return None
    decoder, at = json.JSONDecoder(), prefix.end()
    calls: list[Any] = []
    while True:
        try:
            call, at = decoder.raw_decode(body, at)
        except ValueError:
            return calls or None
        calls.append(call)
        separator = re.match(r"\s*,\s*", body[at:])
        if separator is None:
            return calls
        at += separator.end()


def may_be_call(text: str) -> bool:
    """Whether an answer starting with `text` may still turn out a call (its first
    character past blanks is ``{``, or there is none yet)."""
    body = text.lstrip()
    return not body or body.startswith("{")


class StreamGate:
    """Streamed text with tools offered: held back while the answer may be a call, then
    passed on as it comes (with "required" or a named tool, nothing is streamed: the answer
    is calls). `release` sends what was held once the answer turned out to be text."""

    def __init__(self, sink: Callable[[str], None] | None, choice: ToolChoice) -> None:
        self.sink = sink
        self.only_calls = choice not in {"auto", "none"}
        self.held: list[str] = []
        self.open = False
        self.sent: list[str] = []

    def __call__(self, text: str) -> None:
        if self.open:
            self._send(text)
            return
        self.held.append(text)
        if not self.only_calls and not may_be_call("".join(self.held)):
            self.release()

    def _send(self, text: str) -> None:
        self.sent.append(text)
        if self.sink is not None and text:
            self.sink(text)

    def release(self) -> None:
        """Stream what was held, and from now on all text at once."""
        self.open = True
        held, self.held = "".join(self.held), []
        self._send(held)

    @property
    def streamed(self) -> str:
        """The text passed on so far."""
        return "".join(self.sent)
