"""Structured output and tool calls in the answer path: the grammars (checked by llama.cpp's
own grammar sampler), rendering and parsing of calls, the core's use of them, and the real
bundled model held to them."""

from __future__ import annotations

import ctypes
import json
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import jsonschema
import llama_cpp
import pytest

from answer.core import REFUSED_REPLY, answer
from answer.engines import Engine, Generation, TextSink
from answer.engines.grammar import grammar_for
from answer.routing import AfterHelper, HelperCall
from answer.tools import (
    HELPERS_HEADING,
    as_text,
    calls_text,
    helper_input,
    instruction,
    parse_calls,
)
from kernel.contract import (
    ChatMessage,
    GenerationOptions,
    Job,
    ResponseFormat,
    ToolCall,
    ToolSpec,
)
from kernel.helper_contract import HelperRequest
from kernel.helper_registry import HelperInfo
from kernel.model_files import default_model_path
from kernel.settings import Settings

# --- llama.cpp's grammar sampler as a recogniser -------------------------------------------


@cache
def vocab() -> Any:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    path = default_model_path(Settings())
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model
    return llama_cpp.llama_model_get_vocab(model)


def parses(grammar: str) -> bool:
    """Whether llama.cpp reads `grammar`."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab(), grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def _allowed(sampler: Any, token: int) -> bool:
    data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
    return not math.isinf(data[0].logit)


def matches(grammar: str, text: str) -> bool:
    """Whether llama.cpp's sampler lets a model write exactly `text` under `grammar`."""
    raw = text.encode()
    tokens = (llama_cpp.llama_token * (len(raw) + 8))()
    count = llama_cpp.llama_tokenize(vocab(), raw, len(raw), tokens, len(tokens), False, False)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab(), grammar.encode(), b"root")
    assert sampler, "the grammar does not parse"
    try:
        for token in tokens[:count]:
            if not _allowed(sampler, token):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return _allowed(sampler, llama_cpp.llama_vocab_eos(vocab()))
    finally:
        llama_cpp.llama_sampler_free(sampler)


# --- schemas and a small validator (jsonschema is not a dependency) -------------------------

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "verified": {"type": "boolean"},
                "phone": {"type": ["string", "null"]},
            },
            "required": ["city", "verified", "phone"],
            "additionalProperties": False,
        },
        "friends": {"type": "array", "items": {"$ref": "#/$defs/friend"}, "maxItems": 2},
    },
    "required": ["name", "kind", "age", "tags", "owner", "friends"],
    "additionalProperties": False,
    "$defs": {
        "friend": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "score": {"type": "number"}},
            "required": ["name", "score"],
            "additionalProperties": False,
        }
    },
}
A_PET = {"name": "Rex", "kind": "dog", "age": 3, "tags": ["good"],
         "owner": {"city": "Oslo", "verified": True, "phone": None},
         "friends": [{"name": "Tom", "score": 1.5}]}  # fmt: skip


def problems(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> list[str]:
    """What in `value` breaks `schema`, as jsonschema (the reference validator) says."""
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}"
            for e in validator.iter_errors(value)]  # fmt: skip


def schema_options(schema: dict[str, Any], **fields: Any) -> GenerationOptions:
    fmt = ResponseFormat(type="json_schema", json_schema=schema, strict=True)
    return GenerationOptions(response_format=fmt, **fields)


WEATHER = ToolSpec(
    name="get_weather",
    description="The current weather in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)  # fmt: skip
CALC = ToolSpec(
    name="calculate",
    description="Evaluates an arithmetic expression.",
    parameters={"type": "object", "properties": {"expression": {"type": "string",
                "maxLength": 60}}, "required": ["expression"], "additionalProperties": False},
)  # fmt: skip
WEATHER_CALL = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
TWO_CALLS = (
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}, '
    '{"name": "calculate", "arguments": {"expression": "2*3"}}]}'
)
CALC_CALL = '{"tool_calls": [{"name": "calculate", "arguments": {"expression": "1+1"}}]}'


def tool_options(**fields: Any) -> GenerationOptions:
    return GenerationOptions(**{"tools": [WEATHER, CALC], **fields})


# --- grammars -------------------------------------------------------------------------------


def test_plain_text_without_tools_has_no_grammar() -> None:
    assert grammar_for(GenerationOptions()) is None
    assert grammar_for(tool_options(tool_choice="none")) is None


def test_json_mode_allows_any_json_object_and_nothing_else() -> None:
    grammar = grammar_for(GenerationOptions(response_format=ResponseFormat(type="json_object")))
    assert grammar is not None and parses(grammar)
    assert matches(grammar, '{"a": [1, -2.5e3, {"b": null}], "c": "d\\n"}')
    assert matches(grammar, "{}")
    for not_an_object in ["[1, 2]", '"text"', "42", "Sure! {}"]:
        assert not matches(grammar, not_an_object), not_an_object
    assert not matches(grammar, '{"a": "raw\nnewline"}')  # no JSON parser takes it


def test_a_strict_schema_holds_nested_objects_enums_arrays_and_required_keys() -> None:
    grammar = grammar_for(schema_options(PET))
    assert grammar is not None and parses(grammar)
    assert matches(grammar, json.dumps(A_PET))
    broken = {
        "an unknown enum value": {**A_PET, "kind": "cow"},
        "a missing required key": {k: v for k, v in A_PET.items() if k != "owner"},
        "too few items": {**A_PET, "tags": []},
        "too many items": {**A_PET, "tags": ["a", "b", "c", "d"]},
        "a number for an integer": {**A_PET, "age": 3.5},
        "an extra key": {**A_PET, "colour": "brown"},
        "a nested extra key": {**A_PET, "owner": {**A_PET["owner"], "x": 1}},  # type: ignore[dict-item]
        "a friend without score": {**A_PET, "friends": [{"name": "Tom"}]},
    }
    for what, value in broken.items():
        assert problems(value, PET, PET), what
        assert not matches(grammar, json.dumps(value)), what


def test_openais_schema_wrapper_is_accepted() -> None:
    wrapped = grammar_for(schema_options({"name": "pet", "schema": PET, "strict": True}))
    assert wrapped == grammar_for(schema_options(PET))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (schema_options({"type": "sound"}), "cannot be enforced"),
        (schema_options({"$ref": "https://example.com/schema.json"}), "own $defs"),
        (schema_options({"$ref": "#/$defs/missing"}), "cannot be enforced"),
        (GenerationOptions(response_format=ResponseFormat(type="json_schema")), "needs a json"),
        (tool_options(tool_choice="delete_everything"), "not among the tools"),
        (GenerationOptions(tool_choice="required"), "needs tools"),
        (tool_options(tools=[ToolSpec(name="odd", parameters={"type": "sound"})]), "'odd'"),
    ],
    ids=["unknown type", "remote ref", "missing ref", "no schema", "unknown tool",
         "required without tools", "bad parameters"],
)  # fmt: skip
def test_what_cannot_be_enforced_is_a_value_error_fit_for_a_400(
    options: GenerationOptions, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        grammar_for(options)


def test_auto_allows_plain_text_or_well_formed_calls() -> None:
    grammar = grammar_for(tool_options())
    assert grammar is not None and parses(grammar)
    for allowed in [WEATHER_CALL, TWO_CALLS, CALC_CALL, "The weather is fine.", " Yes, 42."]:
        assert matches(grammar, allowed), allowed
    for refused in [
        "{not a call",  # text cannot start like a call
        ' {"tool_calls": []}',
        '{"tool_calls": [{"name": "rm", "arguments": {}}]}',  # not an offered tool
        '{"tool_calls": [{"name": "get_weather", "arguments": {"town": "Paris"}}]}',
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "X", "unit": "K"}}]}',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',  # not the call format
    ]:
        assert not matches(grammar, refused), refused


def test_required_allows_only_calls_and_a_named_tool_only_its_calls() -> None:
    required = grammar_for(tool_options(tool_choice="required"))
    assert required is not None and parses(required)
    assert matches(required, WEATHER_CALL) and matches(required, TWO_CALLS)
    assert not matches(required, "The weather is fine.")
    named = grammar_for(tool_options(tool_choice="calculate"))
    assert named is not None and matches(named, CALC_CALL)
    assert not matches(named, WEATHER_CALL) and not matches(named, "Two.")


def test_without_parallel_calls_one_call_only() -> None:
    grammar = grammar_for(tool_options(tool_choice="required", parallel_tool_calls=False))
    assert grammar is not None and matches(grammar, WEATHER_CALL)
    assert not matches(grammar, TWO_CALLS)


def test_tools_with_a_response_format_answer_in_json_or_call() -> None:
    options = tool_options(response_format=ResponseFormat(type="json_object"))
    grammar = grammar_for(options)
    assert grammar is not None and matches(grammar, WEATHER_CALL) and matches(grammar, '{"a": 1}')
    assert not matches(grammar, "Plain words.")


# --- rendering and parsing ------------------------------------------------------------------


def test_calls_parse_into_openai_tool_calls_with_fresh_ids() -> None:
    calls = parse_calls(TWO_CALLS, [WEATHER, CALC])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "celsius"}), ("calculate", {"expression": "2*3"}),
    ]  # fmt: skip
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id
    # One call object, OpenAI's own shape, and the old helper convention are understood too.
    single = parse_calls('{"name": "calculate", "arguments": {"expression": "1"}}', [CALC])
    assert [c.name for c in single] == ["calculate"]
    wrapped = parse_calls('[{"function": {"name": "calculate", "arguments": "{}"}}]', [CALC])
    assert [c.arguments for c in wrapped] == ["{}"]
    helper = parse_calls('{"helper": "calculate", "input": "6*7"}', [CALC])
    assert helper_input(helper[0]) == "6*7"


@pytest.mark.parametrize(
    "text",
    ["The weather is fine.", "{not json", '{"tool_calls": [{"name": "rm", "arguments": {}}]}',
     WEATHER_CALL + " and more words", '{"a": 1}', '{"tool_calls": []}'],
)  # fmt: skip
def test_text_that_is_no_call_of_an_offered_tool_stays_text(text: str) -> None:
    assert parse_calls(text, [WEATHER, CALC]) == []


def test_calls_cut_short_or_repeated_keep_each_complete_call_once() -> None:
    cut = WEATHER_CALL[:-2] + ", " + WEATHER_CALL[16:-2] + ", " + CALC_CALL[16:40]
    assert [c.name for c in parse_calls(cut, [WEATHER, CALC])] == ["get_weather"]


def test_offered_tools_are_listed_with_their_schemas_and_the_call_format() -> None:
    section = instruction([WEATHER, CALC], "auto")
    assert "get_weather: The current weather in a city." in section
    assert '"enum":["celsius","fahrenheit"]' in section
    assert '{"tool_calls": [{"name": "TOOL", "arguments": {...}}]}' in section
    assert "You must call the tool calculate" in instruction([CALC], "calculate")
    assert instruction([CALC], "auto", HELPERS_HEADING).startswith(HELPERS_HEADING)


def test_calls_and_tool_answers_in_the_history_become_text_the_model_reads() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    other = ToolCall(id="call_2", name="calculate", arguments='{"expression": "2+2"}')
    history = [
        ChatMessage(role="user", content="Weather in Paris, and 2+2?"),
        ChatMessage(role="assistant", content="", tool_calls=[call, other]),
        ChatMessage(role="tool", content="18 C, sunny", tool_call_id="call_1"),
        ChatMessage(role="tool", content="4", tool_call_id="call_2", name="calculate"),
    ]
    written = as_text(history)
    assert [m.role for m in written] == ["user", "assistant", "user"]
    assert written[1].content == calls_text([call, other])
    assert json.loads(written[1].content)["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert written[2].content == (
        "The get_weather tool answered: 18 C, sunny\nThe calculate tool answered: 4\n"
        "Answer my question with them, in plain words."
    )
    # When a call must come next, the tools' answers are not followed by that request.
    assert as_text(history, answer_next=False)[2].content.endswith("answered: 4")


# --- the core with a scripted engine --------------------------------------------------------


class Scripted:
    """Answers with the given texts in turn, streamed in small pieces; records its calls."""

    name = "scripted"
    model_name = "scripted"

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.seen: list[tuple[list[ChatMessage], GenerationOptions]] = []

    def generate(
        self, messages: Sequence[ChatMessage], options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:  # fmt: skip
        self.seen.append((list(messages), options))
        text = self.texts.pop(0)
        for start in range(0, len(text), 5):
            if on_text is not None:
                on_text(text[start : start + 5])
        return Generation(text, "stop", 10, len(text.split()))


def job_with(options: GenerationOptions, prompt: str = "Weather in Paris?") -> Job:
    return Job(channel="http", user="key", messages=[ChatMessage(role="user", content=prompt)],
               options=options, reply_to="http")  # fmt: skip


def test_a_call_is_a_reply_with_tool_calls_and_never_streamed_as_text() -> None:
    engine, streamed = Scripted(" " + WEATHER_CALL), []  # type: ignore[var-annotated]
    reply = answer(job_with(tool_options()), engine, on_text=streamed.append)
    assert not isinstance(reply, HelperCall)
    assert reply.finish_reason == "tool_calls" and reply.text == ""
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert streamed == []
    messages, options = engine.seen[0]
    assert options.grammar == grammar_for(tool_options())
    assert messages[0].role == "system" and "get_weather" in messages[0].content


def test_a_text_answer_with_tools_offered_is_streamed_whole() -> None:
    streamed: list[str] = []
    reply = answer(job_with(tool_options()), Scripted("It is sunny in Paris."),
                   on_text=streamed.append)  # fmt: skip
    assert not isinstance(reply, HelperCall)
    assert (reply.text, reply.finish_reason, reply.tool_calls) == (
        "It is sunny in Paris.",
        "stop",
        [],
    )
    assert "".join(streamed) == "It is sunny in Paris."
    assert len(streamed) > 1  # streamed as it came, once it could no longer be a call


def test_with_a_required_tool_nothing_is_streamed_before_the_end() -> None:
    streamed: list[str] = []
    engine = Scripted(CALC_CALL)
    reply = answer(job_with(tool_options(tool_choice="calculate"), "1+1?"), engine,
                   on_text=streamed.append)  # fmt: skip
    assert not isinstance(reply, HelperCall)
    assert [c.name for c in reply.tool_calls] == ["calculate"] and streamed == []
    assert "You must call the tool calculate" in engine.seen[0][0][0].content


def test_json_mode_sets_the_grammar_and_keeps_the_callers_system_prompt() -> None:
    options = GenerationOptions(response_format=ResponseFormat(type="json_object"))
    the_job = job_with(options).model_copy(
        update={
            "messages": [
                ChatMessage(role="system", content="Be terse."),
                ChatMessage(role="user", content="Hi"),
            ]
        }
    )
    engine = Scripted('{"hello": "world"}')
    reply = answer(the_job, engine)
    assert not isinstance(reply, HelperCall) and reply.text == '{"hello": "world"}'
    messages, sent = engine.seen[0]
    assert sent.grammar == grammar_for(options) and messages[0].content == "Be terse."


def test_a_request_that_cannot_be_enforced_gets_a_sentence_not_a_crash() -> None:
    reply = answer(job_with(schema_options({"type": "sound"})), Scripted("never used"))
    assert not isinstance(reply, HelperCall)
    assert reply.finish_reason == "fallback"
    assert reply.text.startswith(REFUSED_REPLY.split("{")[0])


class Gateway:
    """One live `calc` helper: what `answer` asks of a `HelperGateway`, without Redis."""

    info = HelperInfo(name="calc", description="Evaluates an arithmetic expression exactly.",
                      capabilities=("math.eval",), accepts=(), version="1", queue="helper.calc",
                      time_limit=10.0, instances=("calc@test",))  # fmt: skip

    def live(self) -> list[HelperInfo]:
        return [self.info]

    def for_media(self, media: object) -> None:
        return None

    def plan(self, name: str, text: str, job: Job, tool_call: str | None = None) -> HelperCall:
        then = AfterHelper(helper=name, job=job, tool_call=tool_call)
        return HelperCall(self.info, HelperRequest(text=text, channel=job.channel), then)


def test_live_helpers_are_offered_as_tools_held_to_the_call_grammar() -> None:
    engine = Scripted('{"tool_calls": [{"name": "calc", "arguments": {"input": "6*7"}}]}')
    planned = answer(
        job_with(GenerationOptions(), "What is 6*7?"), engine, helpers=Gateway(), offer_tools=True
    )  # type: ignore[arg-type]
    assert isinstance(planned, HelperCall)
    assert (planned.info.name, planned.request.text) == ("calc", "6*7")
    messages, options = engine.seen[0]
    assert HELPERS_HEADING in messages[0].content and "You are GPT4People" in messages[0].content
    assert options.grammar is not None and '"\\"calc\\""' in options.grammar
    assert planned.then.tool_call is not None
    assert parse_calls(planned.then.tool_call, [ToolSpec(name="calc")])[0].name == "calc"
    # The model's words, when it calls nothing, are the reply.
    reply = answer(
        job_with(GenerationOptions(), "Hi"), Scripted("Hello!"), helpers=Gateway(), offer_tools=True
    )  # type: ignore[arg-type]
    assert not isinstance(reply, HelperCall) and reply.text == "Hello!"
    # A caller's own tools win over the helpers.
    own = answer(
        job_with(tool_options()), Scripted(WEATHER_CALL), helpers=Gateway(), offer_tools=True
    )  # type: ignore[arg-type]
    assert not isinstance(own, HelperCall) and own.tool_calls[0].name == "get_weather"


# --- the real bundled model, held to the grammars -------------------------------------------

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
        "sights": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1,
                   "maxItems": 2},
        "country": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24}, "in_europe": {"type": "boolean"}},
            "required": ["name", "in_europe"], "additionalProperties": False},
    },
    "required": ["city", "size", "sights", "country"],
    "additionalProperties": False,
}  # fmt: skip
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]


@pytest.fixture(scope="module")
def model() -> Iterator[Engine]:
    from answer.engines.batched import BatchedLlamaEngine

    settings = Settings(engine="llama", n_ctx=2048, n_threads=2, parallel=4, max_tokens=120)
    engine = BatchedLlamaEngine.load(settings)
    yield engine
    engine.close()


def answers(model: Engine, jobs: list[Job]) -> list[Any]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda j: answer(j, model), jobs))


@pytest.mark.model
@pytest.mark.timeout(900)  # 20 answers of some 60 tokens each on shared CPU cores
def test_twenty_strict_schema_answers_all_parse_and_validate(model: Engine) -> None:
    jobs = [job_with(schema_options(CITY, temperature=0.8, seed=i),
                     f"Describe {CITIES[i % 5]} as JSON.") for i in range(20)]  # fmt: skip
    for reply in answers(model, jobs):
        assert reply.finish_reason == "stop", reply.text
        value = json.loads(reply.text)
        assert problems(value, CITY, CITY) == [], reply.text


@pytest.mark.model
def test_twenty_json_mode_answers_are_all_json_objects(model: Engine) -> None:
    json_mode = ResponseFormat(type="json_object")
    options = [GenerationOptions(response_format=json_mode, temperature=0.8, seed=i)
               for i in range(20)]  # fmt: skip
    jobs = [job_with(o, f"Give {CITIES[i % 5]}'s name and country as JSON.")
            for i, o in enumerate(options)]  # fmt: skip
    for reply in answers(model, jobs):
        if reply.finish_reason == "stop":  # a long object may be cut by max_tokens
            assert isinstance(json.loads(reply.text), dict), reply.text


@pytest.mark.model
def test_a_required_tool_call_always_parses_with_valid_arguments(model: Engine) -> None:
    questions = ["What is the weather in Rome?", "Is it cold in Oslo?", "Weather for Lima please.",
                 "Hello!", "What is 12 times 7?", "Do I need an umbrella in London?"]  # fmt: skip
    jobs = [job_with(tool_options(tool_choice="required", parallel_tool_calls=False,
                                  temperature=0.7, seed=i), q)
            for i, q in enumerate(questions)]  # fmt: skip
    for reply in answers(model, jobs):
        assert reply.finish_reason == "tool_calls" and reply.text == ""
        (call,) = reply.tool_calls
        spec = {"get_weather": WEATHER, "calculate": CALC}[call.name]
        assert problems(json.loads(call.arguments), spec.parameters, spec.parameters) == []


@pytest.mark.model
def test_a_named_tool_is_called_and_auto_answers_always_parse(model: Engine) -> None:
    named = answer(job_with(tool_options(tool_choice="get_weather", temperature=0),
                            "What is the weather in Paris?"), model)  # fmt: skip
    assert not isinstance(named, HelperCall)
    assert {c.name for c in named.tool_calls} == {"get_weather"}
    assert all("city" in json.loads(c.arguments) for c in named.tool_calls)
    # With "auto" the bundled 270M model mostly answers in words; either way the answer is
    # text or calls that parse, never half a call.
    auto = answer(job_with(tool_options(temperature=0, max_tokens=40),
                           "What is the weather in Paris?"), model)  # fmt: skip
    assert not isinstance(auto, HelperCall)
    assert auto.tool_calls or (auto.text and not auto.text.lstrip().startswith("{"))
