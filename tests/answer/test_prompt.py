"""Prompts: the model's own chat template when it has one, a plain transcript otherwise."""

from __future__ import annotations

import pytest

from answer.prompt import ChatTemplateError, build_prompt, last_turn
from kernel.contract import ChatMessage, ToolCall

SYSTEM = "Answer briefly."
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma's template refuses a system turn, as several real templates do.
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def conversation() -> list[ChatMessage]:
    return [
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello! How can I help?"),
        ChatMessage(role="user", content="What is 2+2?"),
    ]


def test_without_a_template_the_model_completes_a_transcript() -> None:
    prompt = build_prompt(conversation(), SYSTEM, chat_template=None)
    assert prompt.text.startswith(SYSTEM)
    assert prompt.text.endswith("User: What is 2+2?\nAssistant:")
    assert "User: Hi\nAssistant: Hello! How can I help?\n" in prompt.text
    # The answer ends where the model starts writing the user's next turn.
    assert "\nUser:" in prompt.stop
    assert not prompt.templated


def test_a_chat_template_is_rendered_with_the_generation_prompt() -> None:
    prompt = build_prompt(conversation(), SYSTEM, chat_template=CHATML, eos_token="<|im_end|>")
    assert prompt.text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    assert prompt.text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "User:" not in prompt.text
    assert prompt.stop == ("<|im_end|>",)
    assert prompt.templated


def test_a_template_without_system_role_gets_the_instruction_in_the_first_turn() -> None:
    prompt = build_prompt(conversation(), SYSTEM, chat_template=NO_SYSTEM, bos_token="<bos>")
    assert prompt.text.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\nHi<end_of_turn>")
    assert prompt.text.endswith("<start_of_turn>model\n")


def test_a_broken_template_is_a_clear_error() -> None:
    with pytest.raises(ChatTemplateError, match="chat template"):
        build_prompt(conversation(), SYSTEM, chat_template="{% for m in messages %}")


def test_a_callers_system_message_replaces_the_default() -> None:
    messages = [ChatMessage(role="system", content="Talk like a pirate."), *conversation()]
    prompt = build_prompt(messages, SYSTEM, chat_template=None)
    assert prompt.text.startswith("Talk like a pirate.")
    assert SYSTEM not in prompt.text


def test_a_last_assistant_message_is_left_open_to_be_continued() -> None:
    messages = [*conversation(), ChatMessage(role="assistant", content="The answer is")]
    transcript = build_prompt(messages, SYSTEM, chat_template=None)
    assert transcript.text.endswith("User: What is 2+2?\nAssistant: The answer is")
    templated = build_prompt(messages, SYSTEM, chat_template=NO_SYSTEM, bos_token="<bos>")
    assert templated.text.endswith("<start_of_turn>model\nThe answer is")
    assert "<end_of_turn>" not in templated.text.rsplit("model\n", 1)[1]


def test_a_raw_prompt_is_the_last_message_as_it_is() -> None:
    messages = [ChatMessage(role="user", content="Once upon a time")]
    prompt = build_prompt(messages, SYSTEM, chat_template=CHATML, raw=True)
    assert prompt.text == "Once upon a time"
    assert prompt.stop == ()


def test_tool_calls_and_answers_are_written_into_the_transcript() -> None:
    call = ToolCall(id="call_1", name="weather", arguments='{"city": "Paris"}')
    messages = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=[call]),
        ChatMessage(role="tool", content="Sunny, 21C", tool_call_id="call_1", name="weather"),
    ]
    text = build_prompt(messages, SYSTEM, chat_template=None).text
    assert 'Assistant: {"name": "weather", "arguments": {"city": "Paris"}}' in text
    assert "(result of weather) Sunny, 21C" in text
    assert text.endswith("Assistant:")


def test_the_last_turn_runs_from_the_last_user_message() -> None:
    messages = [ChatMessage(role="system", content="Be brief."), *conversation(),
                ChatMessage(role="assistant", content="It is")]  # fmt: skip
    assert [m.content for m in last_turn(messages)] == ["Be brief.", "What is 2+2?", "It is"]


def test_a_conversation_is_turns_in_the_bundled_instruct_models_own_template() -> None:
    # An SMS history, an email thread or a multi-turn HTTP chat reach the prompt the same way.
    from llama_cpp import Llama

    from kernel.catalogue import SMOLLM2
    from kernel.model_files import bundled_model_path
    from kernel.settings import Settings

    path = bundled_model_path(SMOLLM2, Settings())
    template = Llama(model_path=str(path), vocab_only=True, verbose=False).metadata[
        "tokenizer.chat_template"
    ]
    prompt = build_prompt(conversation(), "You are GPT4People.", template, "", "<|im_end|>")
    assert prompt.text == (
        "<|im_start|>system\nYou are GPT4People.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.templated and "<|im_end|>" in prompt.stop
    # Without a template (a base model) the same turns are a transcript.
    transcript = build_prompt(conversation(), "You are GPT4People.", None).text
    assert transcript.endswith(
        "User: Hi\nAssistant: Hello! How can I help?\nUser: What is 2+2?\nAssistant:"
    )
