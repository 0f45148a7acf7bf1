"""The llama.cpp engine with the real bundled model."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from llama_cpp.llama_grammar import json_schema_to_gbnf

from answer.engines import Engine, PromptTooLongError
from answer.engines.batched import BatchedLlamaEngine
from answer.engines.llama import LlamaEngine
from answer.engines.tokenizer import context_limit, prompt_tokens
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


def test_the_default_model_is_prompted_through_its_own_chat_template(engine: Engine) -> None:
    assert "<|im_start|>" in (getattr(engine, "chat_template", None) or "")  # ChatML
    assert engine.model_name == "smollm2-135m-instruct"


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
    with pytest.raises(PromptTooLongError, match=r"\d+ tokens, the context holds 496"):
        engine.generate(ask("word " * 2000), GenerationOptions())


def test_ignore_eos_generates_every_token_asked_for(engine: Engine) -> None:
    options = GenerationOptions(temperature=0.0, max_tokens=40, ignore_eos=True)
    generation = engine.generate(ask("Say yes."), options)
    assert generation.finish_reason == "length"
    assert generation.completion_tokens >= 38  # re-tokenised text may merge a token or two


SCHEMA_GRAMMAR = json_schema_to_gbnf(
    json.dumps({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "sunny": {"type": "boolean"},
            "level": {"enum": ["low", "high"]},
        },
        "required": ["city", "sunny", "level"],
    })
)  # fmt: skip


def test_a_grammar_makes_the_answer_follow_it(engine: Engine) -> None:
    for temperature in (0.0, 0.9):
        options = GenerationOptions(temperature=temperature, seed=5, max_tokens=48,
                                    grammar=SCHEMA_GRAMMAR)  # fmt: skip
        answer = json.loads(engine.generate(ask("What is the weather?"), options).text)
        assert set(answer) == {"city", "sunny", "level"}
        assert isinstance(answer["sunny"], bool) and answer["level"] in {"low", "high"}


def test_ignore_eos_does_not_fight_a_grammars_end(engine: Engine) -> None:
    options = GenerationOptions(temperature=0.0, max_tokens=48, ignore_eos=True,
                                grammar='root ::= "yes" | "no"')  # fmt: skip
    generation = engine.generate(ask("Is the sky blue?"), options)
    assert generation.text in {"yes", "no"}
    assert generation.finish_reason == "stop"


def test_a_last_assistant_message_is_continued(engine: Engine) -> None:
    options = GenerationOptions(temperature=0.0, max_tokens=12)
    messages = [*ask("What is the capital of France?"),
                ChatMessage(role="assistant", content="The capital of France is")]  # fmt: skip
    generation = engine.generate(messages, options)
    assert "Paris" in generation.text
    assert not generation.text.startswith("The capital")  # the prefill is not repeated


def test_a_raw_prompt_is_completed_as_it_is(engine: Engine) -> None:
    options = GenerationOptions(temperature=0.0, max_tokens=8, raw_prompt=True)
    generation = engine.generate(ask("One, two, three, four,"), options)
    assert "five" in generation.text.lower()
    assert generation.prompt_tokens <= 10  # no transcript, no system prompt


def test_the_tokenizer_counts_what_the_engine_reads(engine: Engine) -> None:
    settings = Settings(engine="llama", n_ctx=512, max_tokens=48)
    messages = ask("What is the capital of France?")
    for options in (GenerationOptions(), GenerationOptions(raw_prompt=True)):
        counted = prompt_tokens(messages, options, settings)
        assert counted == engine.generate(messages, options.model_copy(
            update={"max_tokens": 1})).prompt_tokens  # fmt: skip
    long = ask("word " * 2000)
    counted = prompt_tokens(long, GenerationOptions(), settings)
    assert counted is not None and counted > context_limit(GenerationOptions(), settings) == 496
    with pytest.raises(PromptTooLongError, match=f"{counted} tokens, the context holds 496"):
        engine.generate(long, GenerationOptions())
    assert prompt_tokens(long, GenerationOptions(), Settings(engine="echo")) is None


def test_a_token_that_is_not_text_ends_the_answer(engine: Engine) -> None:
    # After a finished user turn, ChatML's next token is <|im_start|>: a control token, but
    # not an end of generation. Printed as nothing, it let the next speaker's name through
    # ("assistant\nThanks!").
    turn = ("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
            "<|im_start|>user\nThanks<|im_end|>\n")  # fmt: skip
    generation = engine.generate(
        ask(turn), GenerationOptions(raw_prompt=True, temperature=0, max_tokens=16)
    )
    assert not generation.text.lstrip().startswith(("user", "assistant", "system"))
    assert generation.completion_tokens <= 1


def test_the_model_vocabularies_tell_markup_from_text() -> None:
    import llama_cpp
    from llama_cpp import Llama

    from answer.engines.vocabulary import special_tokens
    from kernel.catalogue import GEMMA3, SMOLLM2
    from kernel.model_files import bundled_model_path

    for model, markup, text in (
        (SMOLLM2, ["<|im_start|>", "<|im_end|>"], ["Paris", " <", "|"]),
        (GEMMA3, ["<start_of_image>", "<end_of_turn>", "<unused7>"], ["<table>", "\n\n", "  "]),
    ):
        llm = Llama(model_path=str(bundled_model_path(model, Settings())), vocab_only=True,
                    verbose=False)  # fmt: skip
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)

        def text_of(token: int, llm: Llama = llm) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

        template = llm.metadata.get("tokenizer.chat_template")
        found = special_tokens(vocab, llama_cpp.llama_vocab_n_tokens(vocab), text_of, template)

        def token(piece: str, llm: Llama = llm) -> int:
            [one] = llm.tokenize(piece.encode(), add_bos=False, special=True)
            return one

        assert all(found.never_text[token(piece)] for piece in markup), model.name
        assert not any(found.never_text[token(piece)] for piece in text), model.name
        assert set(markup[:2]) <= set(found.markers)
        # A control token the template never writes is not a stop string: spelled out,
        # it is text ("tar -xzf <filename>").
        assert "<filename>" not in found.markers


def test_a_raw_prompt_that_ends_in_a_control_token_is_still_continued(engine: Engine) -> None:
    # The end check must look at the token just generated, not at the prompt's last one.
    prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>"
    generation = engine.generate(
        ask(prompt), GenerationOptions(raw_prompt=True, temperature=0, max_tokens=12)
    )
    assert generation.text.startswith("assistant")
