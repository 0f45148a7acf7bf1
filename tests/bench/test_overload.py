"""The overload bench's schedule, numbers and anchor template, without a model or a server.

`python -m bench.overload` runs the servers. These pin what it asks and when (the
routes take turns; questions go on while the bulk load runs and until each route has
its minimum), how samples become rows (failed and post-load questions counted, not
timed in), the table printing unknowns, and the chat template it gives llama-server
writing exactly GPT4People's prompt for a conversation, trimmed or not.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from answer.prompt import build_prompt
from bench.overload import (
    TURNS,
    Arrivals,
    conversation_row,
    conversation_template,
    conversation_turns,
    format_table,
    interactive_rows,
    keep_asking,
    p50,
    ratio,
    render_template,
    route_of,
)
from kernel.contract import ChatMessage
from tests.channels.twilio_recorder import Call

SYSTEM = "You are a test assistant."
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma's shape: no system turn (GPT4People folds it into the first user turn), trims.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _sample(route: str, ms: float | None, during_bulk: bool = True) -> dict[str, Any]:
    error = None if ms is not None else "HTTPStatusError: 503"
    return {"route": route, "sent_s": 0.0, "during_bulk": during_bulk, "ms": ms, "error": error}


def test_the_routes_take_turns() -> None:
    assert [route_of(i, ("sms", "http")) for i in range(5)] == ["sms", "http"] * 2 + ["sms"]
    assert {route_of(i, ("http",)) for i in range(3)} == {"http"}


def test_questions_go_on_while_the_load_runs_and_until_each_route_has_its_minimum() -> None:
    routes = ("sms", "http")
    assert keep_asking({}, routes, bulk_running=True, minimum=8)
    assert keep_asking({"sms": 20, "http": 20}, routes, bulk_running=True, minimum=8)
    assert keep_asking({"sms": 8, "http": 7}, routes, bulk_running=False, minimum=8)
    assert not keep_asking({"sms": 8, "http": 8}, routes, bulk_running=False, minimum=8)
    assert keep_asking({"http": 3}, ("http",), bulk_running=False, minimum=4)


def test_each_round_talks_with_someone_else_in_six_turns() -> None:
    rounds = [conversation_turns(r) for r in range(3)]
    assert all(len(turns) == len(TURNS) == 6 for turns in rounds)
    assert len({turns[0] for turns in rounds}) == 3  # no round starts from another's cache
    assert all(turns[1:] == rounds[0][1:] for turns in rounds)


def test_medians_and_ratios_say_unknown_rather_than_fail() -> None:
    assert p50([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(p50([]))
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_rows_time_what_was_answered_and_count_the_rest() -> None:
    ours = {"unloaded": [_sample("sms", 100.0), _sample("http", 50.0), _sample("sms", 300.0)],
            "loaded": [_sample("sms", 150.0), _sample("http", 60.0), _sample("sms", None),
                       _sample("sms", 250.0, during_bulk=False),
                       _sample("http", 80.0)]}  # fmt: skip
    theirs = {"unloaded": [_sample("http", 40.0)], "loaded": [_sample("http", 4000.0)]}
    rows = interactive_rows({"gpt4people": [ours], "llama_server": [theirs]})
    sms = rows["gpt4people_sms"]
    assert (sms["unloaded_p50_ms"], sms["loaded_p50_ms"]) == (200.0, 200.0)
    assert (sms["ratio"], sms["loaded_n"], sms["after_bulk"], sms["errors"]) == (1.0, 2, 1, 1)
    http = rows["gpt4people_http"]
    assert (http["loaded_p50_ms"], http["ratio"], http["target"]) == (70.0, 1.4, 1.5)
    assert rows["llama_server_http"]["ratio"] == 100.0
    assert rows["llama_server_http"]["target"] is None


def test_rows_of_a_server_not_measured_are_unknown() -> None:
    rows = interactive_rows({"gpt4people": []})
    assert math.isnan(rows["gpt4people_sms"]["ratio"])
    assert math.isnan(rows["llama_server_http"]["unloaded_p50_ms"])


def test_the_conversation_row_compares_the_last_turn_with_the_first() -> None:
    row = conversation_row([[100.0, 50.0, 120.0], [140.0, 70.0, 160.0]])
    assert row["ttft_ms_by_turn"] == [120.0, 60.0, 140.0]
    assert row["ratio"] == pytest.approx(140.0 / 120.0)
    assert math.isnan(conversation_row([])["ratio"])


def test_the_table_prints_every_row_and_unknowns_as_dashes() -> None:
    rows = interactive_rows(
        {"gpt4people": [{"unloaded": [_sample("sms", 100.0)], "loaded": [_sample("sms", 120.0)]}]}
    )
    talks = {"gpt4people": conversation_row([[80.0, 90.0]]), "llama_server": conversation_row([])}
    bulk = {"gpt4people": {"seconds": 95.0, "tokens_per_s": 129.3, "errors": 0}}
    table = format_table(rows, talks, bulk, "heading")
    lines = table.splitlines()
    assert lines[0] == "heading"
    sms = next(line for line in lines if line.startswith("GPT4People, SMS"))
    assert "100.0" in sms and "120.0" in sms and "1.20" in sms and "<= 1.5" in sms
    http = next(line for line in lines if line.startswith("GPT4People, HTTP"))
    assert "-" in http and "nan" not in table
    assert any(line.startswith("bulk load, GPT4People") and "129.3" in line for line in lines)
    assert any(line.startswith("GPT4People") and "1.12" in line for line in lines)


def _renderer(template: str | None) -> Any:
    def render(turns: Sequence[tuple[str, str]]) -> str:
        messages = [ChatMessage.model_validate({"role": r, "content": c}) for r, c in turns]
        return build_prompt(messages, SYSTEM, template, "<bos>", "<eos>").text

    return render


CONVERSATION = (("user", "Hi, I'm Zoe."), ("assistant", " Hello Zoe!\n"),
                ("user", "Capital of Italy?"), ("assistant", "Rome."),
                ("user", "And of Spain, it's?"))  # fmt: skip


@pytest.mark.parametrize("template", [CHATML, GEMMA, None], ids=["chatml", "gemma", "transcript"])
def test_the_anchor_template_writes_gpt4peoples_prompt_for_any_conversation(
    template: str | None,
) -> None:
    render = _renderer(template)
    anchor = conversation_template(render)
    for length in (1, 3, 5):
        turns = CONVERSATION[:length]
        as_messages = [{"role": role, "content": content} for role, content in turns]
        assert render_template(anchor, as_messages) == render(turns), length


def test_a_template_that_writes_turns_unlike_each_time_is_refused() -> None:
    numbered = (
        "{% for message in messages %}[{{ loop.index }}] {{ message['role'] }}: "
        "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(ValueError, match="not written alike"):
        conversation_template(_renderer(numbered))


def test_arrivals_note_the_first_accepted_message_to_each_number() -> None:
    arrivals = Arrivals()
    arrivals.append(Call("AC1", {"To": "+1"}, 500))
    arrivals.append(Call("AC1", {"To": "+2"}, 201))
    first = arrivals.wait("+2", timeout=1)
    arrivals.append(Call("AC1", {"To": "+2"}, 201))
    assert arrivals.wait("+2", timeout=1) == first and len(arrivals) == 3
    with pytest.raises(TimeoutError):
        arrivals.wait("+1", timeout=0.01)
    started = time.perf_counter()
    threading.Timer(0.05, arrivals.append, [Call("AC1", {"To": "+3"}, 201)]).start()
    assert arrivals.wait("+3", timeout=5) >= started
