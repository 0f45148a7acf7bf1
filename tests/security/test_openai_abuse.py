"""Abuse of the structured-output, tool and logprobs fields of the OpenAI API.

A JSON schema becomes a llama.cpp grammar in the web process and again in the
worker, which parses it recursively and runs it over the whole vocabulary: each
schema here once crashed a worker (SIGSEGV), froze an engine thread shared by
every job, or took gigabytes and seconds to convert. They are refused before
conversion, with a 400 that names the bound.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import reduce
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from answer.core import answer
from answer.engines.echo import EchoEngine
from answer.engines.grammar import grammar_for
from channels.web import create_app
from kernel.contract import ChatMessage, GenerationOptions, Job, ResponseFormat, ToolSpec
from kernel.settings import Settings

RECURSIVE_ARRAYS = {
    "type": "object",
    "properties": {"x": {"$ref": "#/$defs/A"}},
    "$defs": {
        "A": {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}]},
              "minItems": 1},
        "B": {"type": "array", "items": {"$ref": "#/$defs/A"}, "maxItems": 2},
    },
}  # fmt: skip
HOSTILE: dict[str, dict[str, Any]] = {
    # 38 bytes that segfaulted the worker: 30,000 nested groups parsed recursively.
    "a long maxLength": {"type": "string", "maxLength": 30000},
    "a long maxItems": {"type": "array", "minItems": 1, "maxItems": 30000},
    # 3 GB and 8 s in the web process to convert.
    "a huge repetition in a pattern": {"type": "string", "pattern": "^a{1000000000}$"},
    "a huge minLength": {"type": "string", "minLength": 100000000},
    # A grammar whose ambiguity the caller chooses: 21 s per sampling step at depth 16.
    "recursive arrays": RECURSIVE_ARRAYS,
    "a pattern repeating an empty match": {"type": "string", "pattern": "^(a?){0,200}$"},
    "a 4000-entry enum": {"type": "string", "enum": [f"{'q' * 24}{i}" for i in range(4000)]},
    "a self-reference by path": {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}},
    "a reference to the root": {"type": "object", "properties": {"a": {"$ref": "#"}}},
    # Refused by llama.cpp only in the worker (a 502, the grammar dumped to its log).
    "a digit class llama.cpp refuses": {"type": "string", "pattern": "^\\d{3}$"},
    "an empty enum": {"enum": []},
    "an empty anyOf": {"anyOf": []},
    # 500s before.
    "items: true": {"type": "array", "items": True},
    "a $ref that is a number": {"$ref": 5},
    "properties as a list": {"properties": [1]},
    "deep nesting": reduce(lambda inner, _: {"type": "array", "items": inner}, range(12), {}),
}


def schema_options(schema: dict[str, Any]) -> GenerationOptions:
    return GenerationOptions(response_format=ResponseFormat(type="json_schema", json_schema=schema))


@pytest.mark.parametrize("schema", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_schema_is_refused_before_it_is_converted(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="response_format json_schema"):
        grammar_for(schema_options(schema))


def test_hostile_tool_parameters_and_too_many_tools_are_refused() -> None:
    tool = ToolSpec(name="t", parameters={"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 30000}}})  # fmt: skip
    with pytest.raises(ValueError, match="maxLength"):
        grammar_for(GenerationOptions(tools=[tool], tool_choice="required"))
    many = [ToolSpec(name=f"t{i}") for i in range(33)]
    with pytest.raises(ValueError, match="at most 32 tools"):
        grammar_for(GenerationOptions(tools=many, tool_choice="required"))


def test_an_ordinary_schema_still_gets_its_grammar() -> None:
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "size": {"enum": ["small", "large"]},
        "sights": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "home": {"$ref": "#/$defs/Place"}},
        "required": ["city"], "$defs": {"Place": {"type": "object", "properties": {
            "name": {"type": "string"}}}}}  # fmt: skip
    assert grammar_for(schema_options(schema))


def test_a_hostile_schema_that_reaches_a_worker_gets_a_sentence_not_a_crash() -> None:
    # From a web process that did not check it (an older one, another integration).
    job = Job(channel="http", user="u", reply_to="caller",
              messages=[ChatMessage(role="user", content="describe Paris")],
              options=schema_options(HOSTILE["a long maxLength"]))  # fmt: skip
    reply = answer(job, EchoEngine())
    assert not isinstance(reply, tuple)
    assert reply.finish_reason == "fallback" and "maxLength" in reply.text


@pytest.fixture(scope="module")
def client(echo_web: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{echo_web}/v1", api_key="unused", timeout=30, max_retries=0)


@pytest.mark.parametrize("name", ["a long maxLength", "items: true", "recursive arrays"])
def test_over_http_a_hostile_schema_is_a_400_naming_the_field(
    client: openai.OpenAI, name: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": HOSTILE[name]}},
        )  # fmt: skip
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "response_format", body


@pytest.fixture(scope="module")
def long_answers(echo_worker: str) -> Iterator[TestClient]:
    """A deployment whose operator allows long answers (GPT4P_MAX_TOKENS=32768)."""
    with TestClient(create_app(Settings(redis_url=echo_worker, engine="echo",
                                        max_tokens=32768))) as web:  # fmt: skip
        yield web


def test_logprobs_that_would_fill_redis_are_a_400(long_answers: TestClient) -> None:
    # 32768 tokens x 21 logprobs x 8 choices: some 10 GB of stored results.
    response = long_answers.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32768,
        "logprobs": True, "top_logprobs": 20, "n": 8})  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "top_logprobs"
    modest = long_answers.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
        "logprobs": True, "top_logprobs": 5})  # fmt: skip
    assert modest.status_code == 200, modest.text


def test_cors_for_every_origin_without_an_api_key_is_warned_about(
    echo_worker: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="channels.web"):
        create_app(Settings(redis_url=echo_worker, engine="echo", http_cors_origins=["*"]))
    assert any("GPT4P_HTTP_CORS_ORIGINS=*" in r.getMessage() for r in caplog.records)
