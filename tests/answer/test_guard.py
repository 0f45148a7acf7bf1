"""An answer is cut where a small model recites its instruction or starts a turn of its own."""

from __future__ import annotations

import pytest

from answer.guard import AnswerGuard
from answer.prompt import build_prompt
from kernel.contract import ChatMessage

INSTRUCTION = "You are GPT4People, a helpful assistant. Answer clearly and briefly."
GUARD = AnswerGuard.for_instruction(INSTRUCTION)
TRANSCRIPT = AnswerGuard.for_instruction(INSTRUCTION, labels=True)


def answered(text: str, guard: AnswerGuard = GUARD) -> str:
    at = guard.cut(text)
    return text if at is None else text[:at]


def streamed(text: str, guard: AnswerGuard = GUARD, step: int = 3) -> tuple[str, str]:
    """(what was handed over while generating, the final text), as the engines do it."""
    handed, emitted = "", 0
    for end in range(step, len(text) + step, step):
        so_far = text[:end]
        at = guard.cut(so_far, emitted)
        if at is not None:
            return handed, so_far[:at]
        ready = len(so_far) - guard.hold(so_far, emitted)
        handed += so_far[emitted:ready]
        emitted = ready
    return handed + text[emitted:], text


@pytest.mark.parametrize(
    ("generated", "kept"),
    [
        # What a new user saw from the bundled base model (issue 17).
        (
            "There are 10 legs.\n1. You are a GPT4People, a helpful assistant, and you",
            "There are 10 legs.\n",
        ),
        ("Paris.\nAnswer clearly and briefly.\nParis again.", "Paris.\n"),
        ("Madrid.\n- You are GPT4People, a helpful assistant!", "Madrid.\n"),
    ],
)
def test_the_answer_ends_where_the_model_recites_its_instruction(generated: str, kept: str) -> None:
    assert answered(generated) == kept
    handed, final = streamed(generated)
    assert final == kept and handed == kept  # nothing of the recital was ever streamed


def test_in_a_transcript_an_invented_turn_is_cut_too() -> None:
    assert answered("Paris is the capital.\nUser: And Spain?", TRANSCRIPT) == (
        "Paris is the capital.\n"
    )
    assert answered("It is 4.\nHuman: thanks", TRANSCRIPT) == "It is 4.\n"
    assert streamed("It is 4.\nHuman: thanks", TRANSCRIPT) == ("It is 4.\n", "It is 4.\n")


@pytest.mark.parametrize(
    "generated",
    [
        "2 * 3 = 6, and 6 * 7 = 42.",
        "You are welcome! Ask me anything.",
        "You are right: the answer is 8.",
        "Chromosome counts:\n- Human: 46\n- Dog: 78",
        "```python\ndef load(id: int):\n    user: User = db.get(id)\n```",
        "```yaml\ndb:\n  user: admin\n```",
        "Roles in the app:\n- Assistant: drafts replies",
        "Step 1. Answer the door. Step 2. Say hello.",
        "Ответ: у паука восемь ног.\nЭто всё.",
        "蜘蛛有八条腿。",
    ],
)
def test_an_answer_that_only_looks_alike_is_kept_whole_and_streamed_at_once(
    generated: str,
) -> None:
    for guard in (GUARD, TRANSCRIPT):
        assert guard.cut(generated) is None
        handed, final = streamed(generated, guard)
        assert final == generated == handed


def test_a_chat_template_answer_may_quote_a_dialogue() -> None:
    dialogue = "Here is a sample chat:\nUser: Hi!\nAssistant: Hello"
    assert GUARD.cut(dialogue) is None  # only a transcript's turns are invented turns


def test_text_that_could_still_become_a_cut_is_held_back_and_only_that() -> None:
    assert GUARD.hold("Paris.\n2. You are GPT") == len("2. You are GPT")
    assert GUARD.hold("Paris.\n1") == 1
    assert GUARD.hold("Paris.\nYou are nice") == 0
    assert TRANSCRIPT.hold("Paris.\nUs") == len("Us")
    assert TRANSCRIPT.hold("Paris.\nUsers") == 0
    # Only what has not been handed over yet is examined.
    text = "There are 10 legs.\n1. You are a GPT4People, a helpful assistant, and"
    assert GUARD.cut(text, begin=len(text)) is None


def test_the_guard_watches_the_operators_instruction_not_a_callers() -> None:
    own = [ChatMessage(role="system", content="The Eiffel Tower is 330 metres tall."),
           ChatMessage(role="user", content="How tall is the Eiffel Tower?")]  # fmt: skip
    transcript = build_prompt(own, INSTRUCTION, None)
    assert transcript.guard is not None and transcript.guard.labels
    assert transcript.guard.cut("The Eiffel Tower is 330 metres tall.") is None
    assert transcript.guard.cut("Yes.\nYou are GPT4People, a helpful assistant.") == 5
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    templated = build_prompt(own[1:], INSTRUCTION, template)
    assert templated.guard is not None and not templated.guard.labels
    assert build_prompt(own, INSTRUCTION, None, raw=True).guard is None
