"""A person's answer while bulk work floods the model, and a conversation that stays warm:
GPT4People against llama.cpp's own server on the same GGUF, threads and requests.

a) Interactive under overload. Each server first answers a short question
   (``QUESTION``, at most 32 tokens, greedy) `--unloaded-n` times on an idle model;
   then `--bulk` (48) bulk generations start at once over HTTP (256 tokens each,
   ``ignore_eos``, greedy, ``"priority": "bulk"`` for GPT4People) and, while they run,
   the short question is asked every `--every` (3) s until they end, at least
   `--min-samples` (8) times on each route. GPT4People is asked two ways, taking turns:
   by SMS (a signed Twilio webhook to ``POST /sms`` from a number never seen before,
   answered when the local Twilio recorder receives the reply: webhook, queue, model,
   delivery) and over HTTP with ``"priority": "interactive"``. ``llama-server`` gets the
   same mix over HTTP and queues it its own way. Each route's row: the median
   time-to-answer unloaded and loaded, and loaded/unloaded (GPT4People's target: <= 1.5).
b) A conversation that stays warm. Six fixed user turns (the first names a person of
   its round, so no round starts from another's cache), each sent over HTTP with the
   whole history so far, streamed, answers capped at 24 tokens, greedy; the answers
   each server gave are its history. The row is time to first token per turn and
   turn 6 / turn 1. Both get ``"cache_prompt": true`` (llama-server's field; ignored by
   GPT4People).

GPT4People runs as `bench.llama` runs it (its own Redis, one batched worker of
GPT4P_PARALLEL = `--parallel` slots, the web app), with a delivery worker and Twilio
pointed at the recorder (tests/channels/twilio_recorder.py); the bulk client and the
person use API keys of their own (each its own sender for GPT4P_SENDER_SLOTS).
``llama-server --parallel N`` gets a chat template that writes GPT4People's prompt for
any conversation (checked against it before the run; for one question it is
`bench.llama.same_prompt_template`'s) and an HTTP thread per client connection
(``--threads-http 128``: by default N + 2 threads, and every request beyond them waits
for a thread, not in llama-server's own queue). The two take turns, `--rounds` times, the
first one alternating (ABBA). Writes bench/results/overload.json with every sample.

    python -m bench.overload [--parallel 16] [--bulk 48] [--bulk-tokens 256] [--every 3]
                             [--min-samples 8] [--unloaded-n 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.llama import (
    HTTP,
    QUESTIONS,
    ROOT,
    _once_more,
    gpt4people,
    jinja_literal,
    llama_server,
    same_prompt_template,
)

QUESTION = "What is the capital of France?"
ANSWER_TOKENS = 32  # the short question's answer, at most
CONVERSATION_TOKENS = 24  # each answer of the conversation, at most
NAMES = ("Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo")
TURNS = (
    "Hi! My name is {name} and I am planning a trip to Italy in spring.",
    "Which city should I visit first?",
    "What food should I try there?",
    "How many days should I stay?",
    "What is the weather like at that time of year?",
    "Thanks! Can you sum up your advice in one sentence?",
)
TARGET = 1.5  # GPT4People's loaded / unloaded time-to-answer
# (server, route, label, target): the rows of part a.
ROWS: tuple[tuple[str, str, str, float | None], ...] = (
    ("gpt4people", "sms", "GPT4People, SMS (interactive)", TARGET),
    ("gpt4people", "http", "GPT4People, HTTP interactive", TARGET),
    ("llama_server", "http", "llama-server, HTTP", None),
)
MARKERS = ("@@U1@@", "@@A1@@", "@@U2@@", "@@A2@@", "@@U3@@")
# llama-server's HTTP threads: one per connection the client may open (bench.llama's
# HTTP), so every request reaches its own queue instead of waiting for a thread (by
# default it has --parallel + 2, each held by a waiting request or an idle kept-alive
# connection).
HTTP_THREADS = 128
_numbers = itertools.count(1)  # every SMS comes from a number of its own


# --- what is asked, and when -----------------------------------------------------------


def conversation_turns(round_: int) -> list[str]:
    """The six user turns of round `round_`'s conversation."""
    return [turn.format(name=NAMES[round_ % len(NAMES)]) for turn in TURNS]


def route_of(tick: int, routes: Sequence[str]) -> str:
    """The route of the `tick`-th question of a loaded phase: the routes take turns."""
    return routes[tick % len(routes)]


def keep_asking(
    asked: Mapping[str, int], routes: Sequence[str], bulk_running: bool, minimum: int
) -> bool:
    """Whether to ask again: while the bulk load runs, and after it until every route
    has `minimum` questions."""
    return bulk_running or min(asked.get(route, 0) for route in routes) < minimum


# --- the numbers -----------------------------------------------------------------------


def p50(samples: Sequence[float]) -> float:
    """The median, NaN for none."""
    return statistics.median(samples) if samples else math.nan


def ratio(a: float, b: float) -> float:
    """a / b, NaN where either is unknown or b is 0."""
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def _times(samples: Sequence[Mapping[str, Any]], route: str) -> list[float]:
    return [s["ms"] for s in samples if s["route"] == route and s["ms"] is not None]


def interactive_rows(rounds: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Part a's rows from every round of each server: medians over all rounds' samples."""
    rows: dict[str, Any] = {}
    for server, route, label, target in ROWS:
        kept = rounds.get(server, [])
        unloaded = [s for r in kept for s in r["unloaded"]]
        loaded = [s for r in kept for s in r["loaded"]]
        unloaded_p50, loaded_p50 = p50(_times(unloaded, route)), p50(_times(loaded, route))
        on_route = [s for s in loaded if s["route"] == route]
        rows[f"{server}_{route}"] = {
            "label": label, "target": target,
            "unloaded_p50_ms": unloaded_p50, "loaded_p50_ms": loaded_p50,
            "ratio": ratio(loaded_p50, unloaded_p50),
            "loaded_n": len(_times(loaded, route)),
            "after_bulk": sum(1 for s in on_route if not s["during_bulk"]),
            "errors": sum(1 for s in [*unloaded, *loaded]
                          if s["route"] == route and s["error"] is not None),
        }  # fmt: skip
    return rows


def conversation_row(conversations: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Part b's row from each round's TTFT per turn (ms): the median of each turn over the
    rounds, and the last turn's over the first's."""
    turns = [p50(list(ttfts)) for ttfts in zip(*conversations, strict=True)]
    return {"ttft_ms_by_turn": turns, "ratio": ratio(turns[-1], turns[0]) if turns else math.nan}


def bulk_row(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The bulk loads of a server: median seconds to finish all, and tokens/s."""
    seconds = [r["bulk"]["seconds"] for r in rounds]
    rates = [r["bulk"]["tokens"] / r["bulk"]["seconds"] for r in rounds if r["bulk"]["seconds"]]
    return {"seconds": p50(seconds), "tokens_per_s": p50(rates),
            "errors": sum(len(r["bulk"]["errors"]) for r in rounds)}  # fmt: skip


def _cell(value: float, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{digits}f}"


def format_table(
    interactive: Mapping[str, Mapping[str, Any]], conversation: Mapping[str, Mapping[str, Any]],
    bulk: Mapping[str, Mapping[str, float]], heading: str,
) -> str:  # fmt: skip
    """The printed table of both parts."""
    lines = [heading, f"{'time to answer, ms':<34}{'unloaded p50':>13}{'loaded p50':>12}"
             f"{'loaded/unl.':>12}{'target':>9}"]  # fmt: skip
    for row in interactive.values():
        target = f"<= {row['target']:g}" if row["target"] else "-"
        note = f"  ({row['loaded_n']} loaded"
        note += f", {row['after_bulk']} after the bulk ended" if row["after_bulk"] else ""
        note += f", {row['errors']} failed)" if row["errors"] else ")"
        lines.append(f"{row['label']:<34}{_cell(row['unloaded_p50_ms'], 13)}"
                     f"{_cell(row['loaded_p50_ms'], 12)}{_cell(row['ratio'], 12, 2)}"
                     f"{target:>9}{note}")  # fmt: skip
    for server, row in bulk.items():
        failed = f", {row['errors']:g} failed" if row["errors"] else ""
        lines.append(f"{'bulk load, ' + _name(server) + ', s':<34}{_cell(row['seconds'], 13)}"
                     f"  ({_cell(row['tokens_per_s'], 0)} tokens/s{failed})")  # fmt: skip
    turns = max((len(r["ttft_ms_by_turn"]) for r in conversation.values()), default=0)
    lines += ["", "conversation: time to first token per turn, ms",
              f"{'':<16}" + "".join(f"{i:>8}" for i in range(1, turns + 1))
              + f"{'last/first':>12}"]  # fmt: skip
    for server, row in conversation.items():
        lines.append(f"{_name(server):<16}" + "".join(_cell(t, 8) for t in row["ttft_ms_by_turn"])
                     + _cell(row["ratio"], 12, 2))  # fmt: skip
    return "\n".join(lines)


def _name(server: str) -> str:
    return {"gpt4people": "GPT4People", "llama_server": "llama-server"}.get(server, server)


# --- a chat template for llama-server that writes GPT4People's prompt ------------------


def conversation_template(render: Callable[[Sequence[tuple[str, str]]], str]) -> str:
    """A chat template (Jinja) for llama-server that writes what `render` (GPT4People's
    prompt for a conversation of (role, content) turns) writes, for any conversation of
    user and assistant turns that starts and ends with the user's.

    Read off a rendering of user, assistant, user, assistant, user turns around markers:
    what comes before the first, between a user's and an assistant's turn, between an
    assistant's and a user's, and after the last. Every piece of text is written as a
    Jinja string, never as template text, so no engine's whitespace control touches it.
    Raises ValueError where the model's template is not that regular."""
    roles = ("user", "assistant", "user", "assistant", "user")
    text = render(list(zip(roles, MARKERS, strict=True)))
    spaced = render([(role, f" {marker} ") for role, marker in zip(roles, MARKERS, strict=True)])
    trims = f" {MARKERS[0]} " not in spaced
    pieces, rest = [], text
    for marker in MARKERS:
        before, found, rest = rest.partition(marker)
        if not found:
            raise ValueError(f"the prompt lost the turn {marker}")
        pieces.append(before)
    prefix, user_to_assistant, assistant_to_user, again_to_assistant, again_to_user = pieces
    if (user_to_assistant, assistant_to_user) != (again_to_assistant, again_to_user):
        raise ValueError("the turns of the prompt are not written alike each time")
    content = "{{ m['content'] | trim }}" if trims else "{{ m['content'] }}"
    return (jinja_literal(prefix) + "{% for m in messages %}{% if m['role'] == 'assistant' %}"
            + jinja_literal(user_to_assistant) + content + "{% else %}{% if not loop.first %}"
            + jinja_literal(assistant_to_user) + "{% endif %}" + content
            + "{% endif %}{% endfor %}" + jinja_literal(rest))  # fmt: skip


def render_template(template: str, messages: Sequence[Mapping[str, str]]) -> str:
    """`template` rendered as chat templates are (Jinja, trim_blocks and lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(messages=messages,
                                                    add_generation_prompt=True)  # fmt: skip


CHECK = (
    ("user", TURNS[0].format(name="Zoe")), ("assistant", "Rome, then Florence."),
    ("user", TURNS[1]), ("assistant", " Florence first: it is small.\n"), ("user", TURNS[2]),
)  # fmt: skip


def same_conversation_template(path: Path, model: str) -> tuple[Path, str]:
    """`conversation_template` for `model` as GPT4People prompts it, written to `path`,
    and GPT4People's prompt for the conversation `CHECK` (for `check_anchor`). Checked
    here to write that prompt, and for one question what `bench.llama.same_prompt_template`
    writes."""
    import llama_cpp
    from llama_cpp import Llama

    from answer.prompt import build_prompt
    from kernel.contract import ChatMessage
    from kernel.settings import Settings

    vocab = Llama(model_path=model, vocab_only=True, verbose=False)

    def token_text(token: int) -> str:
        return vocab.detokenize([token], special=True).decode("utf-8", errors="ignore")

    bos = token_text(vocab.token_bos()) if vocab.token_bos() >= 0 else ""
    adds_bos = bool(bos) and bool(llama_cpp.llama_vocab_get_add_bos(vocab._model.vocab))
    chat_template = vocab.metadata.get("tokenizer.chat_template") or None
    system_prompt = Settings().system_prompt

    def render(turns: Sequence[tuple[str, str]]) -> str:
        messages = [ChatMessage.model_validate({"role": role, "content": content})
                    for role, content in turns]  # fmt: skip
        text = build_prompt(messages, system_prompt, chat_template, bos,
                            token_text(vocab.token_eos())).text  # fmt: skip
        # Both add the BOS token when the model asks for one (as same_prompt_template).
        return text.removeprefix(bos) if adds_bos else text

    template = conversation_template(render)
    expected = render(CHECK)
    if render_template(template, _messages(CHECK)) != expected:
        raise ValueError("the conversation template does not write GPT4People's prompt")
    single = same_prompt_template(path.with_suffix(".single.jinja"), model).read_text()
    one = [{"role": "user", "content": QUESTION}]
    if render_template(template, one) != render_template(single, one):
        raise ValueError("the conversation template differs from same_prompt_template's")
    path.write_text(template)
    return path, expected


def check_anchor(base: str, expected: str) -> None:
    """Raise unless llama-server at `base` writes `expected` for `CHECK` (its own template
    engine, asked through POST /apply-template)."""
    response = HTTP.post(f"{base}/apply-template", json={"messages": _messages(CHECK)})
    response.raise_for_status()
    if response.json()["prompt"] != expected:
        raise ValueError(f"llama-server writes another prompt than GPT4People's: "
                         f"{response.json()['prompt']!r}, not {expected!r}")  # fmt: skip


def _messages(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


# --- the servers -----------------------------------------------------------------------


class Arrivals(list[Any]):
    """The Twilio recorder's list of calls, noting when the first message to each number
    was accepted (the moment the recorder took it, not when someone looked)."""

    def __init__(self) -> None:
        super().__init__()
        self.when: dict[str, float] = {}
        self.changed = threading.Condition()

    def append(self, call: Any) -> None:
        """Keep `call`, and note its arrival if it was accepted."""
        super().append(call)
        if call.status == 201:
            with self.changed:
                self.when.setdefault(call.form.get("To", ""), time.perf_counter())
                self.changed.notify_all()

    def wait(self, number: str, timeout: float) -> float:
        """When the first message to `number` arrived (perf_counter), waiting for it."""
        with self.changed:
            if not self.changed.wait_for(lambda: number in self.when, timeout):
                raise TimeoutError(f"no SMS reached {number} in {timeout:g}s")
            return self.when[number]


@dataclass
class Server:
    """One server under test: where it is and how each kind of caller reaches it."""

    name: str
    base: str
    routes: tuple[str, ...] = ("http",)
    ours: bool = False  # GPT4People: priorities, API keys, SMS
    bulk_key: str = ""
    person_key: str = ""
    recorder: Any = None  # the Twilio recorder (GPT4People)
    arrivals: Arrivals = field(default_factory=Arrivals)

    def headers(self, key: str) -> dict[str, str]:
        """The caller's Authorization header, where the server has keys."""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, messages: list[dict[str, str]], max_tokens: int, priority: str,
             **extra: object) -> dict[str, object]:  # fmt: skip
        """A greedy chat completion; the priority only for GPT4People."""
        body: dict[str, object] = {"model": "default", "messages": messages,
                                   "max_tokens": max_tokens, "temperature": 0.0,
                                   **extra}  # fmt: skip
        if self.ours:
            body["priority"] = priority
        return body


def ask_http(server: Server) -> float:
    """Seconds for the short question over HTTP (interactive for GPT4People)."""
    return _once_more(lambda: _ask_http_once(server), server.base)


def _ask_http_once(server: Server) -> float:
    body = server.body([{"role": "user", "content": QUESTION}], ANSWER_TOKENS, "interactive")
    started = time.perf_counter()
    response = HTTP.post(f"{server.base}/v1/chat/completions", json=body,
                         headers=server.headers(server.person_key))  # fmt: skip
    response.raise_for_status()
    return time.perf_counter() - started


def ask_sms(server: Server, timeout: float = 900) -> float:
    """Seconds from texting the short question (from a new number) until Twilio has the
    reply."""
    number = f"+1555{next(_numbers):07d}"
    url = f"{server.base}/sms"
    params, headers = server.recorder.webhook(url, number, QUESTION)
    started = time.perf_counter()
    response = _once_more(lambda: HTTP.post(url, data=params, headers=headers), server.base)
    if response.status_code != 200:
        raise RuntimeError(f"POST /sms answered {response.status_code}")
    return server.arrivals.wait(number, timeout) - started


def ask(
    server: Server, route: str, sent_s: float = 0.0, during_bulk: bool = False
) -> dict[str, Any]:
    """One short question by `route`, as a sample (ms, or the error it met)."""
    sample: dict[str, Any] = {"route": route, "sent_s": round(sent_s, 3),
                              "during_bulk": during_bulk, "ms": None, "error": None}  # fmt: skip
    try:
        seconds = ask_sms(server) if route == "sms" else ask_http(server)
        sample["ms"] = seconds * 1000
    except Exception as error:  # a refused or dropped request is counted, not fatal
        sample["error"] = f"{type(error).__name__}: {error}"
    return sample


def bulk_one(server: Server, i: int, tokens: int) -> dict[str, Any]:
    """One bulk generation of `tokens` tokens: its seconds and tokens, or its error."""
    body = server.body([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], tokens,
                       "bulk", ignore_eos=True)  # fmt: skip
    started = time.perf_counter()
    try:
        response = _once_more(lambda: HTTP.post(f"{server.base}/v1/chat/completions", json=body,
                              headers=server.headers(server.bulk_key)), server.base)  # fmt: skip
        response.raise_for_status()
        done = int(response.json()["usage"]["completion_tokens"])
        return {"seconds": time.perf_counter() - started, "tokens": done, "error": None}
    except Exception as error:
        return {"seconds": time.perf_counter() - started, "tokens": 0,
                "error": f"{type(error).__name__}: {error}"}  # fmt: skip


def loaded_phase(
    server: Server, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`args.bulk` bulk generations at once and, while they run, the short question every
    `args.every` s (the routes taking turns): (question samples, the bulk load)."""
    questions: list[Future[dict[str, Any]]] = []
    asked: Counter[str] = Counter()
    with (
        ThreadPoolExecutor(args.bulk) as bulk_pool,
        # A thread for every question still waiting (not one waiting for a thread) while
        # the client's connections last.
        ThreadPoolExecutor(max(8, HTTP_THREADS - args.bulk)) as ask_pool,
    ):
        started = time.perf_counter()
        bulk = [bulk_pool.submit(bulk_one, server, i, args.bulk_tokens) for i in range(args.bulk)]
        for tick in itertools.count():
            time.sleep(max(0.0, started + (tick + 1) * args.every - time.perf_counter()))
            running = not all(f.done() for f in bulk)
            if not keep_asking(asked, server.routes, running, args.min_samples):
                break
            route = route_of(tick, server.routes)
            asked[route] += 1
            sent = time.perf_counter() - started
            questions.append(ask_pool.submit(ask, server, route, sent, running))
        loads = [f.result() for f in bulk]
        ended = max(started + load["seconds"] for load in loads)
        samples = [f.result() for f in questions]
    load = {"seconds": ended - started, "tokens": sum(x["tokens"] for x in loads),
            "errors": [x["error"] for x in loads if x["error"]],
            "request_seconds": [round(x["seconds"], 3) for x in loads]}  # fmt: skip
    return samples, load


def stream_turn(server: Server, history: list[dict[str, str]], tokens: int) -> tuple[float, str]:
    """One streamed turn of the conversation: (seconds to its first token, its text)."""
    return _once_more(lambda: _stream_turn_once(server, history, tokens), server.base)


def _stream_turn_once(
    server: Server, history: list[dict[str, str]], tokens: int
) -> tuple[float, str]:
    body = server.body(history, tokens, "normal", stream=True, cache_prompt=True)
    started = time.perf_counter()
    first, parts = 0.0, []
    with HTTP.stream("POST", f"{server.base}/v1/chat/completions", json=body,
                     headers=server.headers(server.person_key)) as response:  # fmt: skip
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    first = first or time.perf_counter()
    return (first or time.perf_counter()) - started, "".join(parts)


def conversation(server: Server, round_: int) -> dict[str, Any]:
    """The six-turn conversation of round `round_`: TTFT per turn (ms) and the answers."""
    history: list[dict[str, str]] = []
    ttfts, answers = [], []
    for turn in conversation_turns(round_):
        history.append({"role": "user", "content": turn})
        seconds, answer = stream_turn(server, history, CONVERSATION_TOKENS)
        history.append({"role": "assistant", "content": answer})
        ttfts.append(seconds * 1000)
        answers.append(answer)
    return {"ttft_ms": ttfts, "answers": answers}


def one_round(server: Server, round_: int, args: argparse.Namespace) -> dict[str, Any]:
    """Part a (unloaded, then loaded) and part b on one server."""
    started = time.perf_counter()
    unloaded = [ask(server, route) for _ in range(args.unloaded_n) for route in server.routes]
    at_load = time.perf_counter()
    loaded, bulk = loaded_phase(server, args)
    at_talk = time.perf_counter()
    talk = conversation(server, round_)
    print(f"  {server.name}: unloaded {at_load - started:.0f} s, loaded {at_talk - at_load:.0f}"
          f" s, conversation {time.perf_counter() - at_talk:.0f} s", file=sys.stderr)  # fmt: skip
    return {"unloaded": unloaded, "loaded": loaded, "bulk": bulk, "conversation": talk}


@contextmanager
def ours(tmp: Path, args: argparse.Namespace, model: str) -> Iterator[Server]:
    """GPT4People with a delivery worker, Twilio at a local recorder, two API keys."""
    sys.path.insert(0, str(ROOT))
    from tests.channels.twilio_recorder import running_recorder

    bulk_key, person_key = (f"bench-{who}-{secrets.token_hex(12)}" for who in ("bulk", "person"))
    with running_recorder("AC" + "7" * 32, "overload-auth-token") as recorder:
        arrivals = Arrivals()
        recorder.calls = arrivals  # the recorder appends each call here, under its lock
        settings = {**recorder.settings(), "temperature": "0",
                    "sms_max_tokens": str(ANSWER_TOKENS), "sms_rate_limit": "100000",
                    "sms_max_per_hour": "0", "http_api_keys": f"{bulk_key},{person_key}",
                    # The bulk load waits longer than a person would: no caller gives up.
                    "job_timeout": "1800", "task_soft_time_limit": "1800",
                    "task_time_limit": "1900"}  # fmt: skip
        with gpt4people(tmp, args.threads, args.parallel, model, settings=settings,
                        deliver=True) as (base, _):  # fmt: skip
            yield Server("gpt4people", base, ("sms", "http"), ours=True, bulk_key=bulk_key,
                         person_key=person_key, recorder=recorder,
                         arrivals=arrivals)  # fmt: skip


def measure(servers: Sequence[Server], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every round of every server, the first one alternating (ABBA)."""
    for server in servers:  # warm up: the model loaded, the connections open
        for route in server.routes:
            warm = ask(server, route)
            if warm["error"]:
                raise RuntimeError(f"{server.name} cannot answer by {route}: {warm['error']}")
    rounds: dict[str, list[dict[str, Any]]] = {server.name: [] for server in servers}
    for round_ in range(args.rounds):
        order = servers if round_ % 2 == 0 else list(reversed(servers))
        for position, server in enumerate(order):
            print(f"round {round_ + 1}/{args.rounds}: {server.name}", file=sys.stderr)
            result = one_round(server, round_, args)
            rounds[server.name].append({"round": round_, "position": position, **result})
    return rounds


def main() -> None:
    """Run the benchmark, print the table, write bench/results/overload.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parallel", type=int, default=16,
                        help="GPT4P_PARALLEL, and llama-server's --parallel")  # fmt: skip
    parser.add_argument("--bulk", type=int, default=48, help="bulk generations at once")
    parser.add_argument("--bulk-tokens", type=int, default=256, help="tokens of each")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between questions")
    parser.add_argument("--min-samples", type=int, default=8,
                        help="loaded questions per route, at least")  # fmt: skip
    parser.add_argument("--unloaded-n", type=int, default=5,
                        help="unloaded questions per route and round")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2,
                        help="turns per server, first one alternating")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from kernel.model_files import resolve_model_path
    from kernel.settings import load_settings

    model = str(resolve_model_path(load_settings()))
    binary = subprocess.run([str(ROOT / "scripts" / "install-llama-server")], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        template, expected = same_conversation_template(Path(tmp) / "conversation.jinja", model)
        http = ["--threads-http", str(HTTP_THREADS)]
        with (
            ours(Path(tmp), args, model) as gpt4p,
            llama_server(binary, model, args.threads, args.parallel, template, http) as anchor,
        ):
            print(f"GPT4People at {gpt4p.base}, llama-server at {anchor}", file=sys.stderr)
            check_anchor(anchor, expected)
            rounds = measure([gpt4p, Server("llama_server", anchor)], args)

    interactive = interactive_rows(rounds)
    talks = {name: conversation_row([r["conversation"]["ttft_ms"] for r in kept])
             for name, kept in rounds.items()}  # fmt: skip
    bulk = {name: bulk_row(kept) for name, kept in rounds.items()}
    heading = (f"interactive under overload: {args.bulk} bulk x {args.bulk_tokens} tokens, "
               f"--parallel {args.parallel}, a question every {args.every:g} s, "
               f"{args.rounds} round(s)")  # fmt: skip
    print()
    print(format_table(interactive, talks, bulk, heading))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(
        {"settings": vars(args), "model": Path(model).name, "question": QUESTION,
         "rows": {"interactive": interactive, "conversation": talks, "bulk": bulk},
         "rounds": rounds}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
