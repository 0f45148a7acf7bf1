"""Turning a conversation into the text a model completes.

A GGUF that carries a chat template (``tokenizer.chat_template``) gets exactly
that template, rendered in a Jinja sandbox as llama.cpp and Hugging Face do.
A base model without one (the bundled Gemma 3 270M) gets a plain transcript
that ends in ``Assistant:`` and stops when the model starts the user's turn.

A conversation that ends with the assistant's words (prefill) is rendered with that
turn left open, so the model continues it; a raw prompt (the legacy completions API)
is the last message's text as it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from answer.guard import AnswerGuard
from kernel.contract import ChatMessage

USER_LABEL = "User"
ASSISTANT_LABEL = "Assistant"
# A base model tends to go on writing the next turns itself; these end its answer.
TRANSCRIPT_STOPS = (f"\n{USER_LABEL}:", f"\n{ASSISTANT_LABEL}:", "\n\n\n")
# One worked exchange shows a base model the shape of an answer: short, on one
# line, then the turn ends. In a small trial on Gemma 3 270M it kept answers on
# topic and on one line more often than the bare instruction did.
TRANSCRIPT_EXAMPLE = (
    (USER_LABEL, "What is the largest planet in the solar system?"),
    (ASSISTANT_LABEL, "Jupiter is the largest planet in the solar system."),
)


# Stands for the assistant's words to continue while the template is rendered.
PREFILL_MARKER = "\u2063GPT4P-PREFILL\u2063"


class ChatTemplateError(ValueError):
    """The model's chat template could not be rendered for this conversation."""


@dataclass(frozen=True)
class PromptText:
    """The text to complete and the strings that end the answer."""

    text: str
    stop: tuple[str, ...] = field(default_factory=tuple)
    # Special tokens in the text (the template's, or a raw prompt's) are read as such.
    templated: bool = False
    # Where the answer stops being one (an invented turn, the instruction recited);
    # None for a raw prompt, whose continuation is the caller's business.
    guard: AnswerGuard | None = None


def _with_system(messages: Sequence[ChatMessage], system_prompt: str) -> list[ChatMessage]:
    if not system_prompt or (messages and messages[0].role == "system"):
        return list(messages)
    return [ChatMessage(role="system", content=system_prompt), *messages]


def render_transcript(messages: Sequence[ChatMessage], system_prompt: str) -> PromptText:
    """The plain completion format for models without a chat template; a last assistant
    message is left open (its text as given, but for leading spaces) to be continued."""
    parts: list[str] = []
    conversation = _with_system(messages, system_prompt)
    prefill = conversation.pop().content.lstrip() if continues(conversation) else None
    if conversation[0].role == "system":
        parts.append(conversation.pop(0).content.strip() + "\n")
    parts.extend(f"{label}: {text}" for label, text in TRANSCRIPT_EXAMPLE)
    for message in conversation:
        content = _transcript_content(message)
        if message.role == "system":
            parts.append(content)
        else:
            label = USER_LABEL if message.role == "user" else ASSISTANT_LABEL
            parts.append(f"{label}: {content}")
    parts.append(f"{ASSISTANT_LABEL}:" + (f" {prefill}" if prefill else ""))
    return PromptText(text="\n".join(parts), stop=TRANSCRIPT_STOPS,
                      guard=_guard(system_prompt, transcript=True))  # fmt: skip


def _transcript_content(message: ChatMessage) -> str:
    """A turn's text in a transcript: a tool's answer says so, and calls are written out."""
    content = message.content.strip()
    if message.role == "tool":
        return f"(result of {message.name or 'the tool'}) {content}".strip()
    if message.tool_calls:
        calls = " ".join(
            json.dumps({"name": call.name, "arguments": _arguments(call.arguments)})
            for call in message.tool_calls
        )
        return f"{content} {calls}".strip()
    return content


def _arguments(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _guard(system_prompt: str, transcript: bool) -> AnswerGuard:
    """The guard against reciting the operator's instruction and, in a transcript, writing
    the next speaker's turn (a caller's own system message is theirs to have quoted)."""
    return AnswerGuard.for_instruction(system_prompt, labels=transcript)


def continues(messages: Sequence[ChatMessage]) -> bool:
    """The conversation ends with the assistant's words, to be continued (prefill)."""
    return bool(messages) and messages[-1].role == "assistant"


def last_turn(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The least of a conversation that still makes sense: its leading system message and
    everything from the last user message on (the question, with any calls, tool answers
    and the start of the answer that follow it)."""
    system = [messages[0]] if messages and messages[0].role == "system" else []
    starts = [i for i, m in enumerate(messages) if m.role == "user"]
    start = starts[-1] if starts else len(messages) - 1
    return [*system, *messages[max(start, len(system)) :]]


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def render_chat_template(
    template: str,
    messages: Sequence[ChatMessage],
    system_prompt: str,
    bos_token: str = "",
    eos_token: str = "",
) -> PromptText:
    """Render the model's own chat template, ending with the assistant's turn opened."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    conversation = [_template_message(m) for m in _with_system(messages, system_prompt)]
    prefill = messages[-1].content if continues(messages) else None
    if prefill is not None:
        # The assistant's turn is rendered whole around a marker and cut there: the text
        # up to the marker, then the words to continue (llama.cpp's server does the same).
        conversation[-1]["content"] = PREFILL_MARKER
    try:
        text = environment.from_string(template).render(
            messages=conversation,
            add_generation_prompt=prefill is None,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except ChatTemplateError:
        # Many templates refuse a system turn ("System role not supported"):
        # fold the instruction into the first user message instead.
        if not system_prompt or messages[0].role == "system":
            raise
        folded = (
            [
                ChatMessage(role="user", content=f"{system_prompt}\n\n{messages[0].content}"),
                *messages[1:],
            ]
            if messages[0].role == "user"
            else list(messages)
        )
        rendered = render_chat_template(template, folded, "", bos_token, eos_token)
        return replace(rendered, guard=_guard(system_prompt, transcript=False))
    except TemplateError as error:
        raise ChatTemplateError(f"chat template failed: {error}") from error
    if prefill is not None:
        at = text.rfind(PREFILL_MARKER)
        if at < 0:
            raise ChatTemplateError("the chat template dropped the assistant's last message")
        text = text[:at] + prefill
    stop = (eos_token,) if eos_token else ()
    guard = _guard(system_prompt, transcript=False)
    return PromptText(text=text, stop=stop, templated=True, guard=guard)


def _template_message(message: ChatMessage) -> dict[str, object]:
    """A message as chat templates read it (Hugging Face's shape for tool calls)."""
    data: dict[str, object] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]  # fmt: skip
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        data["name"] = message.name
    return data


def build_prompt(
    messages: Sequence[ChatMessage],
    system_prompt: str,
    chat_template: str | None,
    bos_token: str = "",
    eos_token: str = "",
    raw: bool = False,
) -> PromptText:
    """The prompt for `messages`: the model's chat template when it has one, else a transcript;
    `raw`: the last message's text alone, as it is (no template, no system prompt)."""
    if raw:
        return PromptText(text=messages[-1].content, templated=True)
    if chat_template:
        return render_chat_template(chat_template, messages, system_prompt, bos_token, eos_token)
    return render_transcript(messages, system_prompt)
