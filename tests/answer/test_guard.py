"""An answer is cut where a small model starts a turn of its own or recites its instruction."""

from __future__ import annotations

import pytest

from answer.guard import AnswerGuard
from answer.prompt import build_prompt
from kernel.contract import ChatMessage

INSTRUCTION = "You are GPT4People, a helpful assistant. Answer clearly and briefly."
GUARD = AnswerGuard.for_instruction(INSTRUCTION)


def answered(text: str) -> str:
    at = GUARD.cut(text)
    return text if at is None else text[:at]


@pytest.mark.parametrize(
    ("generated", "kept"),
    [
        # What a new user saw from the bundled base model (issue 17).
        (
            "There are 10 legs.\n1. You are a GPT4People, a helpful assistant, and you",
            "There are 10 legs.\n",
        ),
        (
            "Paris is the capital.\nUser: And of Spain?\nAssistant: Madrid.",
            "Paris is the capital.\n",
        ),
        ("Paris. Answer clearly and briefly. Paris again.", "Paris. "),
        ("It is 4.\nHuman: thanks", "It is 4.\n"),
        ("Madrid.\n- assistant: ok", "Madrid.\n"),
    ],
)
def test_the_answer_ends_where_the_model_goes_off_script(generated: str, kept: str) -> None:
    assert answered(generated) == kept


@pytest.mark.parametrize(
    "generated",
    [
        "2 * 3 = 6, and 6 * 7 = 42.",
        "You are welcome! Ask me anything.",
        "Users like it.\nAssistants help people.",
        "The user: a person who uses a system.",  # a label mid-line is prose
        "Step 1. Answer the door. Step 2. Say hello.",
        "You are right: the answer is 8.",
    ],
)
def test_an_answer_that_only_looks_alike_is_kept_whole(generated: str) -> None:
    assert GUARD.cut(generated) is None
    assert GUARD.hold(generated) == 0  # and nothing of it is held back


def test_text_that_could_still_become_a_cut_is_held_back_and_only_that() -> None:
    assert GUARD.hold("Paris.\nUs") == len("Us")
    assert GUARD.hold("Paris.\n2. You are GPT") == len("2. You are GPT")
    assert GUARD.hold("Paris. You are nice") == 0
    assert GUARD.hold("Paris.\nUsers") == 0
    # Only what has not been handed over yet is examined.
    text = "There are 10 legs.\n1. You are a GPT4People, a helpful assistant"
    assert GUARD.cut(text, begin=len(text)) is None


def test_every_prompt_but_a_raw_one_carries_the_guard_of_its_own_instruction() -> None:
    own = [ChatMessage(role="system", content="Reply as a pirate would, matey."),
           ChatMessage(role="user", content="Hi")]  # fmt: skip
    transcript = build_prompt(own, INSTRUCTION, None)
    assert transcript.guard is not None
    assert transcript.guard.cut("Arr.\nReply as a pirate would, arr.") == len("Arr.\n")
    assert transcript.guard.cut("Arr.\nYou are GPT4People, a helpful one.") is None
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    templated = build_prompt(own[1:], INSTRUCTION, template)
    assert templated.guard is not None
    assert templated.guard.cut("Hi.\nUser: more") == len("Hi.\n")
    assert build_prompt(own, INSTRUCTION, None, raw=True).guard is None
