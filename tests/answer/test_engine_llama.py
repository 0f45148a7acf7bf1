"""The llama.cpp engine with the real bundled model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from answer.engines import Engine, PromptTooLongError
from answer.engines.batched import BatchedLlamaEngine
from answer.engines.llama import LlamaEngine
from kernel.contract import ChatMessage, GenerationOptions
from kernel.settings import Settings

pytestmark = pytest.mark.model


@pytest.fixture(scope="module", params=["one at a time", "batched"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """Both llama.cpp engines must behave the same for one job."""
    settings = Settings(engine="llama", n_ctx=512, n_threads=2, max_tokens=48)
    if request.param == "batched":
        batched = BatchedLlamaEngine.load(settings.model_copy(update={"parallel": 4}))
        yield batched
        batched.close()
    else:
        yield LlamaEngine.load(settings)


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def test_the_bundled_model_has_no_chat_template_so_a_transcript_is_used(
    engine: Engine,
) -> None:
    assert getattr(engine, "chat_template", "missing") is None
    assert engine.model_name == "gemma-3-270m-q4_k_m"


def test_it_generates_text_and_streams_the_same_text(engine: Engine) -> None:
    pieces: list[str] = []
    generation = engine.generate(
        ask("What is the capital of France?"), GenerationOptions(seed=7), pieces.append
    )
    assert generation.text.strip()
    assert "".join(pieces) == generation.text
    assert generation.prompt_tokens > 10
    assert 0 < generation.completion_tokens <= 48
    # The transcript's stop strings end the answer before a made-up next turn.
    assert "\nUser:" not in generation.text


def test_the_same_seed_gives_the_same_answer(engine: Engine) -> None:
    options = GenerationOptions(seed=11, max_tokens=16)
    first = engine.generate(ask("Name a colour."), options).text
    assert engine.generate(ask("Name a colour."), options).text == first


def test_max_tokens_caps_the_answer(engine: Engine) -> None:
    generation = engine.generate(
        ask("Tell me a long story about a dragon."),
        GenerationOptions(max_tokens=4, seed=1, stop=[]),
    )
    assert generation.completion_tokens <= 5


def test_old_turns_are_dropped_to_fit_the_context(engine: Engine) -> None:
    history = []
    for i in range(30):
        history += [
            ChatMessage(role="user", content=f"Remember the number {i} and a long sentence " * 3),
            ChatMessage(role="assistant", content="I will remember it."),
        ]
    generation = engine.generate([*history, *ask("Which numbers?")], GenerationOptions(seed=1))
    assert generation.prompt_tokens + generation.completion_tokens <= 512


def test_a_single_message_longer_than_the_context_is_refused(engine: Engine) -> None:
    with pytest.raises(PromptTooLongError, match="tokens long"):
        engine.generate(ask("word " * 2000), GenerationOptions())


def test_ignore_eos_generates_every_token_asked_for(engine: Engine) -> None:
    options = GenerationOptions(temperature=0.0, max_tokens=40, ignore_eos=True)
    generation = engine.generate(ask("Say yes."), options)
    assert generation.finish_reason == "length"
    assert generation.completion_tokens >= 38  # re-tokenised text may merge a token or two
