"""Splitting answers into SMS parts: readable, numbered, never breaking a word or a character."""

from __future__ import annotations

from channels.sms.split import TRUNCATED_MARKER, split_for_sms, utf16_len


def test_a_short_answer_is_one_unnumbered_part() -> None:
    assert split_for_sms("  Paris is the capital of France.  ") == [
        "Paris is the capital of France."
    ]


def test_parts_end_at_sentences_and_stay_under_the_limit() -> None:
    text = " ".join(f"Sentence number {i} ends here." for i in range(120))
    parts = split_for_sms(text, max_parts=20, limit=400)
    assert all(utf16_len(p) <= 400 for p in parts)
    assert all(p.endswith("ends here.") for p in parts)
    total = len(parts)
    assert [p.split(" ", 1)[0] for p in parts] == [f"({i}/{total})" for i in range(1, total + 1)]


def test_without_sentence_ends_parts_end_between_words() -> None:
    words = [f"w{i}" for i in range(500)]
    parts = split_for_sms(" ".join(words), max_parts=10, limit=300)
    rebuilt = " ".join(p.split(" ", 1)[1] for p in parts).split(" ")
    assert rebuilt == words


def test_emoji_are_counted_as_twilio_counts_them_and_never_cut() -> None:
    text = "🙂" * 1000  # 2,000 UTF-16 units, no spaces at all
    parts = split_for_sms(text, max_parts=5, limit=1600)
    assert all(utf16_len(p) <= 1600 for p in parts)
    assert "".join(p.split(" ", 1)[1] for p in parts) == text


def test_joined_emoji_and_accents_stay_whole() -> None:
    family = "👨\u200d👩\u200d👧"
    accented = "e\u0301"
    text = (family + accented) * 300
    for part in split_for_sms(text, max_parts=10, limit=200):
        body = part.split(" ", 1)[1]
        assert not body.startswith(("\u200d", "\u0301"))
        assert not body.endswith("\u200d")


def test_too_many_parts_are_capped_with_a_marker() -> None:
    text = " ".join(["lorem ipsum dolor sit amet."] * 400)
    parts = split_for_sms(text, max_parts=2, limit=500)
    assert len(parts) == 2
    assert parts[-1].endswith(TRUNCATED_MARKER)
    assert all(utf16_len(p) <= 500 for p in parts)
