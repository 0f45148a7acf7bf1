"""The core never answers with nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from answer.core import BLANK_FALLBACK, TIMED_OUT_REPLY, answer
from answer.engines import (
    Engine,
    Generation,
    GenerationTimeLimitError,
    PromptTooLongError,
    TextSink,
)
from answer.engines.echo import EchoEngine
from kernel.contract import ChatMessage, GenerationOptions, Job
from workers.tasks import TaskEngine


class ScriptedEngine:
    """Answers with the given texts in turn: the scripted engine for core behaviour."""

    name = "scripted"
    model_name = "scripted"

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.calls: list[GenerationOptions] = []

    def generate(
        self, messages: Sequence[ChatMessage], options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:  # fmt: skip
        self.calls.append(options)
        text = self.texts.pop(0)
        if text == "TOO LONG":
            raise PromptTooLongError("the message is 9000 tokens long")
        return Generation(text, "stop", 3, len(text.split()))


def job(prompt: str = "Hello?") -> Job:
    return Job(channel="cli", user="ann", messages=[ChatMessage(role="user", content=prompt)],
               reply_to="cli")  # fmt: skip


def test_an_answer_is_stripped_and_carries_the_job() -> None:
    the_job = job()
    reply = answer(the_job, ScriptedEngine("  Hi there!\n"), worker="w1")
    assert reply.text == "Hi there!"
    assert (reply.job_id, reply.channel, reply.worker) == (the_job.id, "cli", "w1")


def test_a_blank_generation_is_retried_with_other_sampling() -> None:
    engine = ScriptedEngine(" \n ", "Paris.")
    reply = answer(job(), engine)
    assert reply.text == "Paris."
    assert len(engine.calls) == 2
    assert engine.calls[1].temperature and engine.calls[1].temperature > 0


def test_two_blank_generations_become_a_polite_fallback() -> None:
    reply = answer(job(), ScriptedEngine("", "\n\n"))
    assert reply.text == BLANK_FALLBACK
    assert reply.finish_reason == "fallback"


def test_a_prompt_too_long_for_the_model_gets_a_polite_reply() -> None:
    reply = answer(job(), ScriptedEngine("TOO LONG"))
    assert "too long" in reply.text and "9000 tokens" in reply.text
    # The HTTP API answers 400 for it; SMS and email send the sentence.
    assert reply.finish_reason == "context_length_exceeded"


def test_the_echo_engine_answers_with_the_prompt() -> None:
    reply = answer(job("ping pong"), EchoEngine())
    assert reply.text == "ping pong"
    assert reply.engine == "echo"


class SlowEngine:
    """Produces some text, then runs out of time: past its own deadline (the batched engine)."""

    name = "slow"
    model_name = "slow"

    def __init__(self, before_limit: str) -> None:
        self.before_limit = before_limit

    def generate(
        self, messages: Sequence[ChatMessage], options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:  # fmt: skip
        if on_text is not None and self.before_limit:
            on_text(self.before_limit)
        raise GenerationTimeLimitError()


class SlowUnderCelery(SlowEngine):
    """... or as Celery's soft limit makes it in a task of the prefork pool."""

    def generate(
        self, messages: Sequence[ChatMessage], options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:  # fmt: skip
        try:
            return super().generate(messages, options, on_text)
        except GenerationTimeLimitError:
            raise SoftTimeLimitExceeded() from None


def slow_engines(before_limit: str) -> list[Engine]:
    return [SlowEngine(before_limit), TaskEngine(SlowUnderCelery(before_limit))]


@pytest.mark.parametrize("engine", slow_engines(" The French capital is Paris, and"),
                         ids=["engine", "celery"])  # fmt: skip
def test_an_answer_cut_by_the_time_limit_is_sent_as_far_as_it_got(engine: Engine) -> None:
    reply = answer(job(), engine)
    assert reply.text == "The French capital is Paris, and …"
    assert reply.finish_reason == "length"


@pytest.mark.parametrize("engine", slow_engines(""), ids=["engine", "celery"])
def test_a_time_limit_before_any_text_gets_an_apology(engine: Engine) -> None:
    reply = answer(job(), engine)
    assert reply.text == TIMED_OUT_REPLY


class _NoHelpers:
    """A helper gateway that fails the test if anything is routed to a helper."""

    def plan(self, *_: object, **__: object) -> None:
        raise AssertionError("routed to a helper")

    def for_media(self, *_: object) -> None:
        raise AssertionError("routed by media")

    def live(self) -> list[object]:
        return []


@pytest.mark.parametrize("role", ["assistant", "tool"])
def test_a_conversation_ending_with_a_slash_word_not_the_users_goes_to_the_model(
    role: str,
) -> None:
    # "/time" at the start of the assistant's words to continue, or of a tool's answer, is
    # no request for the time helper: only a person's own message names a helper.
    question = ChatMessage(role="user", content="What did the clock say?")
    last = ChatMessage(role=role, content="/time is what the clock said", tool_call_id="call_1")  # type: ignore[arg-type]
    job = Job(channel="http", user="u", reply_to="http", messages=[question, last])
    reply = answer(job, EchoEngine(), helpers=_NoHelpers())  # type: ignore[arg-type]
    assert not isinstance(reply, tuple) and reply.engine == "echo"
