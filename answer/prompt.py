"""Turning a conversation into the text a model completes.

A GGUF that carries a chat template (``tokenizer.chat_template``) gets exactly
that template, rendered in a Jinja sandbox as llama.cpp and Hugging Face do.
A base model without one (the bundled Gemma 3 270M) gets a plain transcript
that ends in ``Assistant:`` and stops when the model starts the user's turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


class ChatTemplateError(ValueError):
    """The model's chat template could not be rendered for this conversation."""


@dataclass(frozen=True)
class PromptText:
    """The text to complete and the strings that end the answer."""

    text: str
    stop: tuple[str, ...] = field(default_factory=tuple)
    templated: bool = False


def _with_system(messages: Sequence[ChatMessage], system_prompt: str) -> list[ChatMessage]:
    if not system_prompt or (messages and messages[0].role == "system"):
        return list(messages)
    return [ChatMessage(role="system", content=system_prompt), *messages]


def render_transcript(messages: Sequence[ChatMessage], system_prompt: str) -> PromptText:
    """The plain completion format for models without a chat template."""
    parts: list[str] = []
    conversation = _with_system(messages, system_prompt)
    if conversation[0].role == "system":
        parts.append(conversation.pop(0).content.strip() + "\n")
    parts.extend(f"{label}: {text}" for label, text in TRANSCRIPT_EXAMPLE)
    for message in conversation:
        content = message.content.strip()
        if message.role == "system":
            parts.append(content)
        else:
            label = USER_LABEL if message.role == "user" else ASSISTANT_LABEL
            parts.append(f"{label}: {content}")
    parts.append(f"{ASSISTANT_LABEL}:")
    return PromptText(text="\n".join(parts), stop=TRANSCRIPT_STOPS)


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
    conversation = [m.model_dump() for m in _with_system(messages, system_prompt)]
    try:
        text = environment.from_string(template).render(
            messages=conversation,
            add_generation_prompt=True,
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
        return render_chat_template(template, folded, "", bos_token, eos_token)
    except TemplateError as error:
        raise ChatTemplateError(f"chat template failed: {error}") from error
    stop = (eos_token,) if eos_token else ()
    return PromptText(text=text, stop=stop, templated=True)


def build_prompt(
    messages: Sequence[ChatMessage],
    system_prompt: str,
    chat_template: str | None,
    bos_token: str = "",
    eos_token: str = "",
) -> PromptText:
    """The prompt for `messages`: the model's chat template when it has one, else a transcript."""
    if chat_template:
        return render_chat_template(chat_template, messages, system_prompt, bos_token, eos_token)
    return render_transcript(messages, system_prompt)
