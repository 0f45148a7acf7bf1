"""The quality set stays sound, and its checker judges answers as a reader would.

No model runs here: `python -m bench.quality` does that. These keep the set loadable,
large enough and covering every kind of prompt issue 17 names, and pin the verdicts
of hand-written answers: right, wrong, too long, and leaking the prompt machinery.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench.quality import CATEGORIES, Item, QualitySetError, check, leak, load_set, sentences
from kernel.settings import Settings

SYSTEM_PROMPT = Settings().system_prompt
ITEMS = {item.id: item for item in load_set()}


def _verdict(item_id: str, answer: str) -> str:
    return check(ITEMS[item_id], answer, SYSTEM_PROMPT).reason


def test_the_set_has_over_a_hundred_items_of_every_kind() -> None:
    assert len(ITEMS) >= 100
    counts = {c: sum(i.category == c for i in ITEMS.values()) for c in CATEGORIES}
    assert min(counts.values()) >= 5, counts


def test_every_regex_compiles_and_every_item_is_well_formed() -> None:
    for item in ITEMS.values():
        for pattern in (*item.accept, *item.forbid):
            re.compile(pattern, item.flags)
        roles = [m["role"] for m in item.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], item.id
        assert all(m["content"].strip() for m in item.messages), item.id


def test_each_kind_carries_its_own_limit_or_history() -> None:
    for item in ITEMS.values():
        if item.category == "multi_turn":
            assert len(item.messages) >= 3, item.id
        if item.category == "sms_length":
            assert item.max_chars is not None and item.max_chars <= 160, item.id
        if item.category == "one_word":
            assert item.max_words is not None and item.max_words <= 3, item.id
        if item.category == "one_sentence":
            assert item.max_sentences == 1, item.id


def test_a_follow_up_needs_its_history() -> None:
    # The follow-up alone is not answerable: what makes it right lies in earlier turns.
    assert ITEMS["multi-capital-germany"].messages[-1]["content"] == "And of Germany?"
    assert _verdict("multi-capital-germany", "The capital of Germany is Berlin.") == "right"
    assert _verdict("multi-capital-germany", "Paris.") == "wrong"


def test_right_answers_pass_in_their_usual_forms() -> None:
    assert _verdict("fact-spider-legs", "A spider has eight legs.") == "right"
    assert _verdict("fact-spider-legs", "Spiders have 8 legs.") == "right"
    assert _verdict("fact-water-freezes", "Water freezes at 0°C.") == "right"
    assert _verdict("arith-1000-plus-1000", "1000 + 1000 = 2,000") == "right"
    assert _verdict("word-grass", "Green.") == "right"
    assert _verdict("sentence-bicycle", "A bicycle is a vehicle with two wheels.") == "right"
    assert _verdict("format-yes-sun-star", "Yes.") == "right"
    assert _verdict("format-uppercase", "DOG") == "right"


def test_wrong_answers_fail() -> None:
    assert _verdict("fact-spider-legs", "There are 10 legs.") == "wrong"
    assert _verdict("fact-water-freezes", "Water freezes at 100 degrees.") == "wrong"
    assert _verdict("arith-6-times-7", "6 times 7 is 36.") == "wrong"
    assert _verdict("format-yes-sun-star", "No.") == "wrong"
    assert _verdict("format-uppercase", "dog") == "wrong"
    # A number inside a longer one, or a list marker, is not the number.
    assert _verdict("fact-continents", "There are 7,982,982,982 continents.") == "wrong"
    assert _verdict("sms-leap-year", "A leap year has 366.25 days.") == "wrong"
    assert _verdict("arith-apples-left", "1. 3 apples\n2. 1 apple\n\nOne is left.") == "wrong"
    assert _verdict("arith-apples-left", "You have 2 apples left.") == "right"
    # Nor is an answer that goes on to give another result.
    contradiction = "So, 9 + 8 = 17.\n\nThe answer is 9 + 17 = 26."
    assert _verdict("arith-9-plus-8", contradiction) == "forbidden"
    assert _verdict("arith-9-plus-8", "The answer is 17.") == "right"


def test_an_answer_that_ignores_its_limit_fails() -> None:
    verdict = check(ITEMS["word-grass"], "The colour of grass is green.", SYSTEM_PROMPT)
    assert verdict.reason.startswith("too many words") and verdict.over_limit
    assert not check(ITEMS["word-grass"], "Grass is blue, I think", SYSTEM_PROMPT).over_limit
    long_sms = "Canberra is the capital of Australia. " * 5
    assert _verdict("sms-capital-australia", long_sms).startswith("too long")
    two = "A bicycle has two wheels. You ride it by pushing the pedals."
    assert _verdict("sentence-bicycle", two).startswith("too many sentences")


def test_an_answer_that_leaks_the_prompt_machinery_fails_as_a_leak() -> None:
    cases = {
        "There are 8 legs.<|im_end|>": "special token",
        "8 legs <end_of_turn>": "special token",
        "Eight.\n<start_of_image>": "special token",
        "Eight legs.\nUser: How many legs does an ant have?": "speaker label",
        f"Eight legs.\n1. {SYSTEM_PROMPT}": "system prompt",
    }
    for answer, what in cases.items():
        verdict = check(ITEMS["fact-spider-legs"], answer, SYSTEM_PROMPT)
        assert verdict.leaked and not verdict.correct, answer
        assert what in verdict.reason, (answer, verdict.reason)
    assert leak("Spiders have eight legs, and <b>ants</b> have six.", SYSTEM_PROMPT) is None
    assert leak("Eight. A user asked: why?", SYSTEM_PROMPT) is None
    # A phrase of the prompt said in passing is not the prompt: 20 characters of whole words.
    prompt = "You are X, a helpful assistant.  Be brief."
    assert leak("I'm glad to have a helpful assistant like you.", prompt) is None
    assert leak("I am x, a helpful\nassistant", prompt) == "system prompt"


def test_sentences_are_counted_at_their_ends_only() -> None:
    assert sentences("Paris.") == 1
    assert sentences("It is 3.5 km long") == 1
    assert sentences("Hi! How are you?") == 2
    assert sentences("") == 0


def _write(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"items": items}), encoding="utf-8")
    return path


def test_a_malformed_set_is_refused_naming_the_item(tmp_path: Path) -> None:
    hello = [{"role": "user", "content": "Hi"}]
    good: dict[str, Any] = {"id": "a", "category": "fact", "messages": hello, "accept": ["hi"]}
    assert load_set(_write(tmp_path / "ok.json", [good])) == [Item(**good)]
    broken = {
        "duplicate ids: a": [good, good],
        "item b: bad regex": [dict(good, id="b", accept=["(unclosed"])],
        "item c: unknown category": [dict(good, id="c", category="poetry")],
        "item d: no accepted answer": [dict(good, id="d", accept=[])],
        "item e: ": [dict(good, id="e", expected="x")],
    }
    for message, items in broken.items():
        with pytest.raises(QualitySetError, match=re.escape(message)):
            load_set(_write(tmp_path / "set.json", items))
