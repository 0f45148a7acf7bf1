"""The batched engine: jobs decoded together answer exactly as they would alone."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from llama_cpp.llama_grammar import json_schema_to_gbnf

from answer.engines import (
    Generation,
    GenerationTimeLimitError,
    GrammarTooSlowError,
    TextDelta,
    delta_logprobs,
)
from answer.engines.batched import GRAMMAR_JOBS, TEXT_INTERVAL_S, BatchedLlamaEngine
from kernel.contract import ChatMessage, GenerationOptions
from kernel.settings import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.model

GREEDY = GenerationOptions(temperature=0.0, max_tokens=24)
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "What do bees make?",
    "How many legs does a spider have?",
    "Write a short greeting for a friend.",
]


def settings(**fields: object) -> Settings:
    # Batch-invariant: what these tests compare is exact text, and llama.cpp's repacked
    # CPU kernels round a lone token differently from a group (see the README).
    base = Settings(engine="llama", n_ctx=512, n_threads=2, max_tokens=64, parallel=4,
                    priority_slots=0, batch_invariant=True)  # fmt: skip
    return base.model_copy(update=fields)


@pytest.fixture(scope="module")
def engine() -> Iterator[BatchedLlamaEngine]:
    engine = BatchedLlamaEngine.load(settings())
    yield engine
    engine.close()


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def test_each_job_in_a_batch_answers_as_it_would_alone(engine: BatchedLlamaEngine) -> None:
    steps = engine.steps
    alone = [engine.generate(ask(q), GREEDY).text for q in QUESTIONS]
    steps_alone, steps = engine.steps - steps, engine.steps
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # more jobs than slots: some wait
        together = list(pool.map(lambda q: engine.generate(ask(q), GREEDY).text, QUESTIONS))
    assert together == alone
    assert all(text.strip() for text in together)
    # Decoded together: far fewer llama_decode calls than one job after another.
    assert engine.steps - steps < steps_alone / 2


def test_the_default_fast_kernels_answer_every_job_in_a_batch() -> None:
    engine = BatchedLlamaEngine.load(settings(batch_invariant=False))
    try:
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            generations = list(pool.map(lambda q: engine.generate(ask(q), GREEDY), QUESTIONS))
    finally:
        engine.close()
    assert all(g.text.strip() and 0 < g.completion_tokens <= 24 for g in generations)
    assert "Paris" in generations[0].text


def test_jobs_of_different_lengths_finish_independently(engine: BatchedLlamaEngine) -> None:
    finished: dict[str, float] = {}

    def run(name: str, max_tokens: int) -> Generation:
        options = GenerationOptions(temperature=0.0, max_tokens=max_tokens, stop=[])
        generation = engine.generate(ask("Tell me a long story about a dragon."), options)
        finished[name] = time.monotonic()
        return generation

    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(run, "long", 60)
        short = pool.submit(run, "short", 3)
        short_generation, long_generation = short.result(), long.result()
    assert short_generation.completion_tokens == 3
    assert short_generation.finish_reason == "length"
    assert long_generation.completion_tokens > 3
    assert finished["short"] < finished["long"]


def test_each_job_keeps_its_own_sampling_settings(engine: BatchedLlamaEngine) -> None:
    # A sampled job beside a greedy one, three times: the greedy one stays greedy (the
    # answer it gives alone), the sampled one keeps its own temperature (not the greedy
    # answer) and its own seed (three seeds, three answers). Not asserted: that a sampled
    # answer is the same alone and beside another job. llama.cpp's arithmetic depends on
    # how many sequences share a step, and at temperature 1 that can tip a draw (seen
    # under load: " A fox." alone, " A pig." when both prompts were decoded in one step).
    alone_greedy = engine.generate(ask("Name an animal."), GREEDY).text
    sampled = []
    for seed in (5, 6, 7):
        hot = GenerationOptions(temperature=1.5, seed=seed, max_tokens=16, ignore_eos=True)
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(engine.generate, ask("Name an animal."), hot)
            b = pool.submit(engine.generate, ask("Name an animal."), GREEDY)
            assert b.result().text == alone_greedy
            sampled.append(a.result().text)
    assert alone_greedy not in sampled
    assert len(set(sampled)) == 3, sampled


def test_streamed_text_is_gathered_not_handed_over_per_token(engine: BatchedLlamaEngine) -> None:
    """The first text goes at once, the rest in pieces no more often than the interval."""
    arrived: list[tuple[float, str]] = []
    options = GenerationOptions(temperature=0.0, max_tokens=48, ignore_eos=True)
    engine.text_interval = 3600.0  # longer than the answer: first piece, then the rest at the end
    try:
        generation = engine.generate(
            ask("Tell me about the sea."),
            options,
            lambda text: arrived.append((time.monotonic(), text)),
        )
        returned = time.monotonic()
    finally:
        engine.text_interval = TEXT_INTERVAL_S
    assert generation.completion_tokens == 48
    assert len(arrived) == 2
    assert "".join(text for _, text in arrived) == generation.text
    assert arrived[0][0] < arrived[1][0] <= returned


def test_stop_strings_end_the_answer_and_never_reach_the_stream(
    engine: BatchedLlamaEngine,
) -> None:
    pieces: list[str] = []
    options = GenerationOptions(temperature=0.0, max_tokens=48, stop=[" the"])
    generation = engine.generate(ask("Why is the sky blue?"), options, pieces.append)
    assert " the" not in generation.text
    assert "".join(pieces) == generation.text
    assert generation.finish_reason == "stop"


def test_a_conversation_turn_reuses_the_history_in_the_kv_cache(
    engine: BatchedLlamaEngine,
) -> None:
    first = ask("My name is Ada. What is the capital of France?")
    answer = engine.generate(first, GREEDY).text
    second = [*first, ChatMessage(role="assistant", content=answer),
              *ask("And what is my name?")]  # fmt: skip
    reused = engine.reused_tokens
    reply = engine.generate(second, GREEDY)
    assert engine.reused_tokens - reused >= 10  # the first turn was not evaluated again
    fresh = BatchedLlamaEngine.load(settings(parallel=2))
    try:
        assert fresh.generate(second, GREEDY).text == reply.text
    finally:
        fresh.close()


def test_a_job_out_of_time_stops_with_its_text_and_frees_its_slot() -> None:
    # 400 tokens take several seconds on a CPU: far past the 1-second limit.
    engine = BatchedLlamaEngine.load(settings(parallel=1, task_soft_time_limit=1, max_tokens=400))
    try:
        pieces: list[str] = []
        long = GenerationOptions(temperature=0.0, max_tokens=400, ignore_eos=True)
        with pytest.raises(GenerationTimeLimitError):
            engine.generate(ask("Tell me a very long story about a dragon."), long, pieces.append)
        assert "".join(pieces).strip()  # what was generated so far reached the caller
        # The only slot is free again: the next job is answered.
        assert engine.generate(ask("What do bees make?"), GREEDY).text.strip()
        assert engine.busy_slots == 0
    finally:
        engine.close()


def test_an_interactive_job_pauses_bulk_jobs_until_it_is_answered(
    engine: BatchedLlamaEngine,
) -> None:
    """A person's message is generated alone, at an idle model's speed, while the bulk jobs
    keep their slots and go on after it (each answer whole)."""
    bulk_text: dict[int, str] = {0: "", 1: ""}
    seen: list[dict[int, int]] = []  # the bulk jobs' text lengths at the person's text events
    lock = threading.Lock()

    def bulk_sink(i: int) -> Callable[[str], None]:
        def sink(text: str) -> None:
            with lock:
                bulk_text[i] += text

        return sink

    def person_sink(_: str) -> None:
        with lock:
            seen.append({i: len(t) for i, t in bulk_text.items()})

    engine.text_interval = 0.0  # every token handed over as it comes: progress is visible
    bulk = GenerationOptions(temperature=0.0, max_tokens=60, ignore_eos=True, priority="bulk")
    person = GenerationOptions(temperature=0.0, max_tokens=32, ignore_eos=True,
                               priority="interactive")  # fmt: skip
    try:
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(engine.generate, ask("Tell me a long story about a dragon."),
                                bulk, bulk_sink(i)) for i in range(2)]  # fmt: skip
            wait_for(lambda: all(bulk_text.values()), 60, "both bulk jobs to generate")
            answer = engine.generate(ask("What do bees make?"), person, person_sink)
            with lock:
                during = {i: len(t) for i, t in bulk_text.items()}
            stories = [job.result(timeout=120) for job in jobs]
    finally:
        engine.text_interval = TEXT_INTERVAL_S
    assert answer.completion_tokens == 32 and len(seen) >= 16
    # From the person's first token to their last, the bulk jobs got at most the token of
    # the step that was decoding when the person's text went out (a thread hop late).
    for i in bulk_text:
        assert during[i] - seen[0][i] <= 12, (seen[0], during)
    assert all(s.completion_tokens == 60 for s in stories)  # then they went on, whole


def test_a_caller_that_gives_up_frees_its_slot() -> None:
    engine = BatchedLlamaEngine.load(settings(parallel=1))
    try:
        stop = threading.Event()

        def impatient(text: str) -> None:
            if text.strip():
                stop.set()
                raise RuntimeError("the client went away")

        with pytest.raises(RuntimeError, match="went away"):
            engine.generate(ask("Tell me a story."), GenerationOptions(max_tokens=200), impatient)
        assert stop.is_set()
        assert engine.generate(ask("What do bees make?"), GREEDY).text.strip()
    finally:
        engine.close()


PERSON = json_schema_to_gbnf(
    json.dumps({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
    })
)  # fmt: skip


def test_a_grammar_job_and_a_free_job_in_one_batch_each_get_what_they_asked_for(
    engine: BatchedLlamaEngine,
) -> None:
    question = ask("Describe a person.")
    free_alone = engine.generate(question, GREEDY).text
    constrained = GenerationOptions(temperature=0.0, max_tokens=60, grammar=PERSON)
    sampled = GenerationOptions(temperature=0.8, seed=4, max_tokens=60, grammar=PERSON)
    steps = engine.steps
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(engine.generate, question, options)
                for options in (constrained, GREEDY, sampled, GREEDY)]  # fmt: skip
        texts = [job.result().text for job in jobs]
    assert engine.steps - steps < 60 + 24  # decoded together, not one after another
    for text in (texts[0], texts[2]):
        person = json.loads(text)
        assert set(person) == {"name", "age", "pets"} and isinstance(person["age"], int)
    # The free jobs are untouched by their neighbours' grammars.
    assert texts[1] == texts[3] == free_alone
    assert not free_alone.lstrip().startswith("{")


def test_logprobs_in_openai_shape_and_the_greedy_token_is_the_most_likely(
    engine: BatchedLlamaEngine,
) -> None:
    options = GenerationOptions(temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=5)
    deltas: list[str] = []
    generation = engine.generate(ask("What is the capital of France?"), options, deltas.append)
    logprobs = generation.logprobs
    # Tokens of the text only: those of a stop string cut off are not the answer's.
    assert logprobs is not None and 0 < len(logprobs) <= generation.completion_tokens
    assert "".join(lp.token for lp in logprobs) == generation.text
    for lp in logprobs:
        assert len(lp.top_logprobs) == 5 and lp.logprob <= 0
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == lp.logprob
        assert bytes(lp.bytes).decode() == lp.token
        assert [t.logprob for t in lp.top_logprobs] == sorted(
            (t.logprob for t in lp.top_logprobs), reverse=True
        )
    # Streamed, each piece of text carries its own tokens' logprobs.
    assert [lp for d in deltas for lp in delta_logprobs(d)] == logprobs
    assert all(isinstance(d, TextDelta) for d in deltas)
    plain = engine.generate(ask("What is the capital of France?"), GREEDY)
    assert plain.logprobs is None and plain.text.startswith(generation.text)


# Ambiguous on purpose: a thousand ways to go on after every letter, so each pass of the
# grammar over the vocabulary takes on the order of a second.
SLOW = 'root ::= "{" ( ' + " | ".join(f'[a-z]+ "{i}"' for i in range(5000)) + ' ) "}"'


def test_a_job_whose_grammar_is_too_slow_ends_and_the_others_go_on(
    engine: BatchedLlamaEngine,
) -> None:
    question = ask("What do bees make?")
    alone = engine.generate(question, GREEDY).text
    hostile = GenerationOptions(temperature=0.0, max_tokens=40, grammar=SLOW)
    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(engine.generate, question, options)
                for options in (GREEDY, hostile, GREEDY)]  # fmt: skip
        with pytest.raises(GrammarTooSlowError, match="too complex"):
            jobs[1].result()
        assert [jobs[0].result().text, jobs[2].result().text] == [alone, alone]
    assert engine.busy_slots == 0  # its slot is free again


def test_at_most_two_grammar_jobs_decode_at_once_and_all_are_answered(
    engine: BatchedLlamaEngine,
) -> None:
    most = 0
    step = engine._step

    def counting() -> None:  # how many jobs with a grammar share each step
        nonlocal most
        most = max(most, sum(1 for slot in engine._slots if slot.grammar is not None))
        step()

    engine._step = counting  # type: ignore[method-assign]
    try:
        constrained = GenerationOptions(temperature=0.0, max_tokens=60, grammar=PERSON)
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(engine.generate, ask("Describe a person."), options)
                    for options in (constrained, constrained, constrained, GREEDY)]  # fmt: skip
            texts = [job.result().text for job in jobs]
    finally:
        del engine._step
    assert most == GRAMMAR_JOBS == 2
    assert texts[0] == texts[1] == texts[2] and json.loads(texts[0])["name"]
    assert texts[3].strip()


def test_a_refused_grammar_is_an_error_and_never_reaches_the_log(
    engine: BatchedLlamaEngine, capfd: pytest.CaptureFixture[str]
) -> None:
    broken = 'root ::= "secret-enum-value" | ( "unclosed"'
    with pytest.raises(ValueError, match="could not be parsed"):
        engine.generate(ask("Hello"), GenerationOptions(max_tokens=8, grammar=broken))
    _, err = capfd.readouterr()
    assert "secret-enum-value" not in err and "unclosed" not in err
    assert engine.generate(ask("What do bees make?"), GREEDY).text.strip()
