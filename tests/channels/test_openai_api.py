"""The rest of the OpenAI API as its clients use it: CORS, request fields, n choices, tool
calls, logprobs, context overflow and the legacy ``/v1/completions``.

Shapes and errors are checked against the echo worker (fast); what depends on the model
(structured output, tool calls, logprobs, prefill, overflow) against the bundled model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import BaseModel, ConfigDict, Field

from channels.web import create_app
from kernel.settings import Settings

KEY = "s3cret-of-16-chars"
ALLOWED = "https://app.example"


@pytest.fixture(scope="module")
def cors_web(echo_worker: str) -> Iterator[TestClient]:
    """The web app with an API key and one allowed origin, in front of the echo worker."""
    settings = Settings(
        redis_url=echo_worker, engine="echo", http_api_key=KEY, http_cors_origins=[ALLOWED]
    )
    with TestClient(create_app(settings)) as web:
        yield web


def preflight(web: TestClient, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    """What a browser asks before a cross-origin POST with a key and a JSON body."""
    return web.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_a_preflight_from_an_allowed_origin_is_answered_without_the_key(
    cors_web: TestClient,
) -> None:
    response = preflight(cors_web, ALLOWED)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_a_preflight_from_another_origin_is_not_allowed(cors_web: TestClient) -> None:
    response = preflight(cors_web, "https://evil.example")
    assert "access-control-allow-origin" not in response.headers


def test_the_key_still_guards_a_cross_origin_request(cors_web: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "from a page"}]}
    refused = cors_web.post("/v1/chat/completions", json=body, headers={"Origin": ALLOWED})
    assert refused.status_code == 401
    # The page can read why it was refused.
    assert refused.headers["access-control-allow-origin"] == ALLOWED
    answered = cors_web.post(
        "/v1/chat/completions",
        json=body,
        headers={"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"},
    )
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == ALLOWED
    assert answered.json()["choices"][0]["message"]["content"] == "from a page"
    other = cors_web.post(
        "/v1/chat/completions",
        json=body,
        headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_without_the_setting_no_origin_is_allowed(echo_worker: str) -> None:
    settings = Settings(redis_url=echo_worker, engine="echo")
    with TestClient(create_app(settings)) as web:
        response = preflight(web, ALLOWED)
    assert "access-control-allow-origin" not in response.headers


def test_the_setting_reads_a_list_or_json_and_refuses_a_path() -> None:
    assert Settings(http_cors_origins="https://a.example, http://localhost:3000/")\
        .http_cors_origins == ["https://a.example", "http://localhost:3000"]  # fmt: skip
    assert Settings(http_cors_origins='["*"]').http_cors_origins == ["*"]
    with pytest.raises(ValueError, match="not an origin"):
        Settings(http_cors_origins="https://a.example/app")


# --- request fields, against the echo worker (it answers with the last message) ----------


@pytest.fixture(scope="module")
def client(echo_web: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{echo_web}/v1", api_key="unused", timeout=30, max_retries=0)


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def refusal(call: Callable[[], object]) -> dict[str, Any]:
    """The error body of a request the server must refuse with 400."""
    with pytest.raises(openai.BadRequestError) as refused:
        call()
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error", body
    return body


def test_an_unknown_response_format_is_a_400(client: openai.OpenAI) -> None:
    error = refusal(lambda: client.chat.completions.create(
        model="echo", messages=ask("hi"), response_format={"type": "sound"},  # type: ignore[typeddict-item]
    ))  # fmt: skip
    assert "response_format" in error["message"]


def test_a_schema_that_cannot_be_enforced_is_a_400_before_queueing(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "https://example.com/remote"}}}
    error = refusal(lambda: client.chat.completions.create(
        model="echo", messages=ask("hi"),
        response_format={"type": "json_schema",
                         "json_schema": {"name": "x", "schema": schema, "strict": True}},
    ))  # fmt: skip
    assert error["param"] == "response_format"


def test_json_formats_are_accepted(client: openai.OpenAI) -> None:
    for response_format in (
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
    ):
        completion = client.chat.completions.create(
            model="echo",
            messages=ask('{"a": 1}'),
            response_format=response_format,  # type: ignore[arg-type]
        )
        assert completion.choices[0].message.content == '{"a": 1}'


def test_top_logprobs_need_logprobs_and_at_most_20(client: openai.OpenAI) -> None:
    refusal(lambda: client.chat.completions.create(model="echo", messages=ask("hi"),
                                                   top_logprobs=3))  # fmt: skip
    refusal(lambda: client.chat.completions.create(model="echo", messages=ask("hi"),
                                                   logprobs=True, top_logprobs=21))  # fmt: skip


def test_logprobs_asked_are_a_list_not_null(client: openai.OpenAI) -> None:
    asked = client.chat.completions.create(
        model="echo", messages=ask("hi"), logprobs=True, top_logprobs=2
    )
    logprobs = asked.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [entry.token for entry in logprobs.content] == ["hi"]
    assert [len(entry.top_logprobs) for entry in logprobs.content] == [1]  # all it has
    plain = client.chat.completions.create(model="echo", messages=ask("hi"))
    assert plain.choices[0].logprobs is None


def test_n_choices_are_n_answers_with_their_usage_summed(client: openai.OpenAI) -> None:
    one = client.chat.completions.create(model="echo", messages=ask("three little words"))
    three = client.chat.completions.create(
        model="echo", messages=ask("three little words"), n=3, seed=7
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {"three little words"}
    assert one.usage is not None and three.usage is not None
    assert three.usage.total_tokens == 3 * one.usage.total_tokens
    refusal(lambda: client.chat.completions.create(model="echo", messages=ask("x"), n=9))


def test_n_choices_stream_side_by_side(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=ask("each one of us"), n=3, stream=True
    )
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "each one of us", 1: "each one of us", 2: "each one of us"}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}


def test_a_last_assistant_message_is_continued_not_refused(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Count to three"},
                  {"role": "assistant", "content": "One, two"}],
    )  # fmt: skip
    assert completion.choices[0].message.content


def test_a_tool_round_trip_is_accepted(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ],
        tools=[WEATHER],
    )  # fmt: skip
    assert completion.choices[0].finish_reason in {"stop", "tool_calls"}


def test_tool_choice_must_name_an_offered_tool(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "launch_rockets"}}
    error = refusal(lambda: client.chat.completions.create(
        model="echo", messages=ask("hi"), tools=[WEATHER], tool_choice=named,  # type: ignore[arg-type]
    ))  # fmt: skip
    assert "launch_rockets" in error["message"]
    refusal(lambda: client.chat.completions.create(model="echo", messages=ask("hi"),
                                                   tool_choice="required"))  # fmt: skip


WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


# --- /v1/completions --------------------------------------------------------------------


def test_a_text_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="echo", prompt="Once upon a time")
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "Once upon a time"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].logprobs is None
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_text_completions_of_several_prompts_n_each(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="echo", prompt=["first one", "second one"], n=2)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert [c.text for c in completion.choices] == ["first one"] * 2 + ["second one"] * 2


def test_a_streamed_text_completion(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="echo", prompt="a b c d e", max_tokens=3,
                                            stream=True))  # fmt: skip
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a b c"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_text_completion_logprobs_have_the_legacy_shape(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="echo", prompt="hello", logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    # The echo worker's one token, certain; its offset counts from the prompt's end.
    assert logprobs.tokens == ["hello"] and logprobs.token_logprobs == [0.0]
    assert logprobs.top_logprobs == [{"hello": 0.0}]
    assert logprobs.text_offset == [len("hello")]


def test_what_text_completions_refuse(client: openai.OpenAI) -> None:
    refusal(lambda: client.completions.create(model="echo", prompt="hi", echo=True))
    refusal(lambda: client.completions.create(model="echo", prompt=[1, 2, 3]))
    refusal(lambda: client.completions.create(model="echo", prompt="hi", logprobs=6))
    refusal(lambda: client.completions.create(model="echo", prompt="  "))
    refusal(lambda: client.completions.create(model="echo", prompt=["a", "b", "c"], n=3))


# The echo worker says back what it is told: told a call in the model's call format, with
# the tool offered, its answer is read as that call (as the model's would be).
CALL_TEXT = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'


def test_a_tool_call_has_openai_s_shape(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo", messages=ask(CALL_TEXT), tools=[WEATHER]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_streamed_tool_call_reassembles_and_leaks_no_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=ask(CALL_TEXT), tools=[WEATHER], stream=True
    )
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += piece.id or ""
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert content == ""
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_without_tools_the_same_text_is_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="echo", messages=ask(CALL_TEXT))
    assert completion.choices[0].message.content == CALL_TEXT
    assert not completion.choices[0].message.tool_calls


def test_streamed_logprobs_come_with_their_text(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=ask("one two three"), logprobs=True, top_logprobs=1, stream=True
    )
    text, tokens = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                tokens += "".join(entry.token for entry in choice.logprobs.content)
    assert text == "one two three"
    assert tokens == text  # every token's logprob, once, in order


# --- the bundled model, end to end (G tests many more grammars in-process) --------------


# Bounded strings and arrays: the grammar holds a small model to the schema, but inside an
# unbounded string or array it may ramble on until max_tokens.
Short = Annotated[str, Field(min_length=1, max_length=30)]


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: Short
    country: Literal["France", "Germany", "Italy", "Spain"]


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Short
    age: int
    address: Address
    hobbies: list[Short] = Field(min_length=1, max_length=3)


@pytest.fixture(scope="module")
def model(model_web: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{model_web}/v1", api_key="unused", timeout=300,
                         max_retries=0)  # fmt: skip


@pytest.mark.model
def test_json_mode_answers_parse(model: openai.OpenAI) -> None:
    completion = model.chat.completions.create(
        model="gemma", messages=ask("Describe a cat as a JSON object with its name and colour."),
        n=4, seed=1,
        max_tokens=200, response_format={"type": "json_object"},
    )  # fmt: skip
    assert len(completion.choices) == 4
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content or ""), dict)


@pytest.mark.model
def test_a_strict_schema_is_followed(model: openai.OpenAI) -> None:
    schema = Person.model_json_schema()
    completion = model.chat.completions.create(
        model="gemma", messages=ask("Invent a person who lives in Europe."), n=4, seed=2,
        max_tokens=300,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )  # fmt: skip
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        Person.model_validate_json(choice.message.content or "", strict=True)


@pytest.mark.model
def test_a_tool_call_round_trip(model: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris right now?"}
    ]
    called = model.chat.completions.create(
        model="gemma", messages=messages, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=100,
    )  # fmt: skip
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees C and sunny"},
    ]  # fmt: skip
    answered = model.chat.completions.create(
        model="gemma", messages=messages, tools=[WEATHER], tool_choice="none",
        temperature=0, max_tokens=60,
    )  # fmt: skip
    assert answered.choices[0].finish_reason in {"stop", "length"}
    assert not answered.choices[0].message.tool_calls
    assert "18" in (answered.choices[0].message.content or "")


@pytest.mark.model
def test_a_streamed_tool_call_is_the_same_call(model: openai.OpenAI) -> None:
    fields: dict[str, Any] = {
        "model": "gemma", "messages": ask("What is the weather in Rome?"), "tools": [WEATHER],
        "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0,
        "max_tokens": 100,
    }  # fmt: skip
    whole = model.chat.completions.create(**fields)
    [call] = whole.choices[0].message.tool_calls or []
    name, arguments, content = "", "", ""
    for chunk in model.chat.completions.create(**fields, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                assert piece.index == 0
                if piece.function is not None:
                    name += piece.function.name or ""
                    arguments += piece.function.arguments or ""
    assert content == ""
    assert (name, json.loads(arguments)) == (
        call.function.name,
        json.loads(call.function.arguments),
    )


@pytest.mark.model
def test_top_logprobs_hold_the_sampled_token_first_at_temperature_0(
    model: openai.OpenAI,
) -> None:
    completion = model.chat.completions.create(
        model="gemma", messages=ask("What is the capital of France?"), temperature=0,
        max_tokens=12, logprobs=True, top_logprobs=5,
    )  # fmt: skip
    entries = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries
    for entry in entries:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert entry.logprob <= 0
    assert "".join(e.token for e in entries).strip() == completion.choices[0].message.content


@pytest.mark.model
def test_a_prefilled_answer_is_continued(model: openai.OpenAI) -> None:
    completion = model.chat.completions.create(
        model="gemma", temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is"}],
    )  # fmt: skip
    continued = completion.choices[0].message.content or ""
    assert "Paris" in continued
    assert not continued.lstrip().startswith("The capital")  # what follows, not a restart


@pytest.mark.model
def test_a_prompt_past_the_context_is_a_400_streamed_or_not(model: openai.OpenAI) -> None:
    long = ask("Please read this. " + "word " * 3000)  # ~3,000 tokens; the context is 2,048
    for stream in (False, True):
        error = refusal(lambda s=stream: model.chat.completions.create(  # type: ignore[misc]
            model="gemma", messages=long, max_tokens=16, stream=s))  # fmt: skip
        assert error["code"] == "context_length_exceeded"
        limit, tokens = sorted(int(n) for n in re.findall(r"(\d+) tokens", error["message"]))
        assert limit <= 2048 and tokens >= 3000


@pytest.mark.model
def test_text_completions_with_the_model(model: openai.OpenAI) -> None:
    # A raw prompt, no chat template: the model continues the text.
    prompt = ("Q: What is the capital of Italy?\nA: Rome.\nQ: What is the capital of France?\n"
              "A: The capital of France is")  # fmt: skip
    fields: dict[str, Any] = {"model": "gemma", "prompt": prompt, "max_tokens": 8,
                              "temperature": 0, "stop": ["\n"]}  # fmt: skip
    whole = model.completions.create(**fields, logprobs=3)
    text = whole.choices[0].text
    assert "Paris" in text
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == text
    assert logprobs.text_offset and logprobs.text_offset[0] == len(prompt)
    assert all(len(top) <= 4 for top in logprobs.top_logprobs)  # 3 and the sampled token
    streamed = model.completions.create(**fields, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
