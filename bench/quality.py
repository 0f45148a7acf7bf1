"""Answer quality of each bundled model: a fixed set of short prompts with accepted answers.

The set (bench/quality_set.json, written for this project) holds facts, arithmetic,
one-word and one-sentence instructions, multi-turn follow-ups, SMS-length answers and
a few format instructions. Each item names its accepted answers as regexes (any one
must match), optionally regexes that must not match and limits (characters, words,
sentences); see `check`.

GPT4People runs as `gpt4people up` runs it: one Redis, one batched model worker per
bundled model (GPT4P_MODEL=<name>) on the same Redis database, and the web app. Every
item goes to POST /v1/chat/completions with `model` set to the catalogue name, so the
API routes it to that model's workers; greedy (temperature 0), `--concurrency` at a
time, one model after the other (an idle worker costs nothing). Workers decode
batch-invariantly (GPT4P_BATCH_INVARIANT), so an answer should not depend on which
other items shared its batch: true of SmolLM2's, while a few of Gemma 3's still vary from
run to run. `--parallel 1` runs the unbatched engine, whose greedy answers differ.

Prints per model: correct/total (and per category), the share of answers that leaked a
special token, a speaker label or the system prompt (must be 0), the median answer
length in characters, and tokens/s: completion tokens of all the model's answers over
the wall time of its whole run (aggregate, at `--concurrency`). Writes every answer with
its verdict to bench/results/quality.json.

    python -m bench.quality [--models smollm2-135m-instruct,gemma-3-270m] [--limit N]
                            [--concurrency 4] [--parallel N] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SET_PATH = Path(__file__).with_name("quality_set.json")
# The kinds of prompt issue 17 names, and `format` (yes/no, lists, a bare number).
CATEGORIES = ("fact", "arithmetic", "one_word", "one_sentence", "multi_turn", "sms_length",
              "format")  # fmt: skip
N_CTX = 1024  # per conversation: the longest item is a few dozen tokens
# What a special or control token looks like when it reaches text: <|im_end|>, <eos>,
# <start_of_turn>, <unused12>, </s>...
SPECIAL_TOKEN = re.compile(
    r"<\|[^|>]{1,40}\|>|</?(start|end)_of_\w+>|<(bos|eos|pad|unk|mask|s|/s)>|<unused\d+>",
    re.IGNORECASE,
)
SPEAKER_LABEL = re.compile(
    r"^\s*(user|assistant|system|human|ai)\s*:", re.IGNORECASE | re.MULTILINE
)
# Words of the system prompt spanning this many characters, repeated, count as a leak
# (whole words: " a helpful assistant" said in passing is not the prompt).
PROMPT_RUN = 20
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
WORD = re.compile(r"[\w'’-]+")


@dataclass(frozen=True)
class Item:
    """One prompt of the set and what answers it accepts."""

    id: str
    category: str
    messages: list[dict[str, str]]
    accept: list[str]
    forbid: list[str] = field(default_factory=list)
    max_chars: int | None = None
    max_words: int | None = None
    max_sentences: int | None = None
    case_sensitive: bool = False

    @property
    def flags(self) -> int:
        """The regex flags this item's patterns are matched with."""
        return 0 if self.case_sensitive else re.IGNORECASE


@dataclass(frozen=True)
class Verdict:
    """Whether an answer is right; when not, why (the first reason found)."""

    correct: bool
    reason: str  # right | leak: ... | forbidden | too long | too many words | ... | wrong
    matched: bool  # an accepted answer is in it (limits and leaks aside)
    leaked: bool = False

    @property
    def over_limit(self) -> bool:
        """Right content that broke the item's length limit: the instruction was missed."""
        return self.matched and self.reason.startswith("too ")


class QualitySetError(ValueError):
    """The set file is malformed: the message names the item and the field."""


def load_set(path: Path = SET_PATH) -> list[Item]:
    """Every item of the set, checked: known fields and category, unique ids, valid regexes."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    items: list[Item] = []
    for entry in raw["items"]:
        name = entry.get("id", "?")
        try:
            item = Item(**entry)
        except TypeError as error:
            raise QualitySetError(f"item {name}: {error}") from None
        if item.category not in CATEGORIES:
            raise QualitySetError(f"item {name}: unknown category {item.category!r}")
        if not item.accept:
            raise QualitySetError(f"item {name}: no accepted answer")
        if not item.messages or item.messages[-1].get("role") != "user":
            raise QualitySetError(f"item {name}: the last message must be the user's")
        for pattern in (*item.accept, *item.forbid):
            try:
                re.compile(pattern, item.flags)
            except re.error as error:
                raise QualitySetError(f"item {name}: bad regex {pattern!r}: {error}") from None
        items.append(item)
    duplicates = [name for name, n in Counter(i.id for i in items).items() if n > 1]
    if duplicates:
        raise QualitySetError(f"duplicate ids: {', '.join(duplicates)}")
    return items


def leak(answer: str, system_prompt: str) -> str | None:
    """What of the prompt machinery an answer shows, if any: a special token, a speaker
    label at a line start, or consecutive words of the system prompt spanning
    PROMPT_RUN characters or more (case and spacing aside)."""
    if token := SPECIAL_TOKEN.search(answer):
        return f"special token {token.group(0)}"
    if label := SPEAKER_LABEL.search(answer):
        return f"speaker label {label.group(0).strip()}"
    said = " ".join(answer.lower().split())
    words = system_prompt.lower().split()
    for first in range(len(words)):
        for last in range(first + 1, len(words) + 1):
            run = " ".join(words[first:last]).rstrip(".,;:!?")
            if len(run) >= PROMPT_RUN:
                if run in said:
                    return "system prompt"
                break
    return None


def sentences(text: str) -> int:
    """Sentences in `text`: pieces with a word in them, split where . ! ? meet a space or
    the end (the point of "3.5" splits nothing)."""
    return sum(1 for piece in SENTENCE_END.split(text) if re.search(r"\w", piece))


def check(item: Item, answer: str, system_prompt: str) -> Verdict:
    """Right when nothing leaked, no `forbid` regex matches, the limits hold and an
    `accept` regex matches (searched anywhere in the stripped answer)."""
    text = answer.strip()
    matched = any(re.search(p, text, item.flags) for p in item.accept)
    if leaked := leak(text, system_prompt):
        return Verdict(False, f"leak: {leaked}", matched, leaked=True)
    if any(re.search(p, text, item.flags) for p in item.forbid):
        return Verdict(False, "forbidden", matched)
    if item.max_chars is not None and len(text) > item.max_chars:
        return Verdict(False, f"too long ({len(text)} > {item.max_chars} characters)", matched)
    if item.max_words is not None and len(WORD.findall(text)) > item.max_words:
        return Verdict(False, f"too many words (> {item.max_words})", matched)
    if item.max_sentences is not None and sentences(text) > item.max_sentences:
        return Verdict(False, f"too many sentences (> {item.max_sentences})", matched)
    return Verdict(True, "right", matched) if matched else Verdict(False, "wrong", matched)


@dataclass
class Outcome:
    """One item's answer from one model, with its cost and verdict."""

    model: str
    id: str
    category: str
    answer: str
    completion_tokens: int
    seconds: float
    verdict: Verdict


def bundled_models() -> list[str]:
    """The catalogue's model names, in its order."""
    from kernel.catalogue import BUNDLED_MODELS

    return list(BUNDLED_MODELS)


def prepare_models(names: list[str]) -> None:
    """Find (or assemble, the first time) each model here, before a worker waits for it."""
    from kernel.catalogue import BUNDLED_MODELS
    from kernel.model_files import bundled_model_path
    from kernel.settings import Settings

    for name in names:
        bundled_model_path(BUNDLED_MODELS[name], Settings(model=name))


def _served(base: str) -> set[str]:
    response = httpx.get(f"{base}/v1/models", timeout=10)
    response.raise_for_status()
    return {model["id"] for model in response.json()["data"]}


@contextmanager
def stack(
    tmp: Path, models: list[str], threads: int, parallel: int, system_prompt: str
) -> Iterator[str]:
    """Redis, one batched worker per model on one Redis database, the web app: its URL."""
    sys.path.insert(0, str(ROOT))
    from gpt4people.redis_server import RedisServer, free_port, new_password
    from tests.conftest import base_env, start_web, start_worker, stop_process, wait_for

    with RedisServer(tmp / "redis", password=new_password()) as server:
        settings = {"redis_url": server.url, "engine": "llama", "parallel": str(parallel),
                    "n_ctx": str(N_CTX), "n_threads": str(threads), "batch_invariant": "true",
                    "system_prompt": system_prompt, "log_level": "WARNING"}  # fmt: skip
        processes = []
        try:
            for name in models:
                env = base_env(tmp, model=name, **settings)
                processes.append(start_worker(env, f"{name}@quality", timeout=300))
            port = free_port()
            processes.append(start_web(base_env(tmp, **settings), port))
            base = f"http://127.0.0.1:{port}"
            # Each worker announces its model by heartbeat: every one listed, or a request
            # naming it would go to whichever worker takes the shared queue.
            wait_for(lambda: set(models) <= _served(base), 30, f"/v1/models to list {models}")
            yield base
        finally:
            for process in reversed(processes):
                stop_process(process)


def _ask(
    client: httpx.Client, base: str, model: str, item: Item, max_tokens: int, system_prompt: str
) -> Outcome:
    body = {"model": model, "messages": item.messages, "temperature": 0.0,
            "max_tokens": max_tokens}  # fmt: skip
    started = time.perf_counter()
    response = client.post(f"{base}/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        failed = Verdict(False, f"HTTP {response.status_code}: {response.text[:200]}", False)
        return Outcome(model, item.id, item.category, "", 0, seconds, failed)
    reply: dict[str, Any] = response.json()
    answer = reply["choices"][0]["message"]["content"] or ""
    tokens = int(reply["usage"]["completion_tokens"])
    verdict = check(item, answer, system_prompt)
    return Outcome(model, item.id, item.category, answer, tokens, seconds, verdict)


def ask_all(
    base: str, model: str, items: list[Item], options: argparse.Namespace, system_prompt: str
) -> tuple[list[Outcome], float]:
    """Every item to `model`, `concurrency` at a time: the outcomes and the run's wall time."""
    with httpx.Client(timeout=600) as client:
        _ask(client, base, model, items[0], 4, system_prompt)  # warm up: loads the weights
        started = time.perf_counter()
        with ThreadPoolExecutor(options.concurrency) as pool:
            outcomes = list(pool.map(
                lambda i: _ask(client, base, model, i, options.max_tokens, system_prompt), items
            ))  # fmt: skip
        return outcomes, time.perf_counter() - started


def summary(outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    """One model's numbers: correct/total overall and per category, leaks, length, speed."""
    per_category = {
        category: [sum(o.verdict.correct for o in outcomes if o.category == category),
                   sum(o.category == category for o in outcomes)]
        for category in CATEGORIES if any(o.category == category for o in outcomes)
    }  # fmt: skip
    tokens = sum(o.completion_tokens for o in outcomes)
    return {
        "correct": sum(o.verdict.correct for o in outcomes),
        "total": len(outcomes),
        "per_category": per_category,
        "over_limit": sum(o.verdict.over_limit for o in outcomes),
        "leaks": sum(o.verdict.leaked for o in outcomes),
        "leak_share": sum(o.verdict.leaked for o in outcomes) / len(outcomes),
        "errors": sum(o.verdict.reason.startswith("HTTP") for o in outcomes),
        "median_chars": statistics.median(len(o.answer.strip()) for o in outcomes),
        "median_s": statistics.median(o.seconds for o in outcomes),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
    }


def print_table(summaries: dict[str, dict[str, Any]], concurrency: int) -> None:
    """The table for the README: one column per model."""
    models = list(summaries)
    width = max(14, *(len(m) + 2 for m in models))
    print(f"\n{'':<26}" + "".join(f"{m:>{width}}" for m in models))

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:<26}" + "".join(f"{c:>{width}}" for c in cells))

    row("correct", [f"{s['correct']}/{s['total']}" for s in summaries.values()])
    for category in CATEGORIES:
        cells = [s["per_category"].get(category) for s in summaries.values()]
        if any(cells):
            row(f"  {category}", [f"{c[0]}/{c[1]}" if c else "-" for c in cells])
    row("right, but over its limit", [str(s["over_limit"]) for s in summaries.values()])
    row("leaked (must be 0)", [f"{s['leaks']} ({s['leak_share']:.0%})" for s in summaries.values()])
    row("median answer, chars", [f"{s['median_chars']:.0f}" for s in summaries.values()])
    row("median time to answer, s", [f"{s['median_s']:.1f}" for s in summaries.values()])
    row(f"tokens/s (aggregate, c{concurrency})",
        [f"{s['tokens_per_s']:.1f}" for s in summaries.values()])  # fmt: skip
    if any(s["errors"] for s in summaries.values()):
        row("HTTP errors", [str(s["errors"]) for s in summaries.values()])


def main() -> None:
    """Run the set through every model, print the table, write bench/results/quality.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated catalogue names; default: all bundled")
    parser.add_argument("--limit", type=int, help="only the first N items (a quick run)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests at a time")
    parser.add_argument("--parallel", type=int,
                        help="GPT4P_PARALLEL of each worker; default: --concurrency")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=96, help="per answer")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    known = bundled_models()
    models = args.models.split(",") if args.models else known
    if unknown := [m for m in models if m not in known]:
        parser.error(f"not a bundled model: {', '.join(unknown)} (known: {', '.join(known)})")
    from kernel.settings import Settings

    items = load_set()[: args.limit]
    system_prompt = Settings().system_prompt
    prepare_models(models)
    started = time.perf_counter()
    results: dict[str, list[Outcome]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            stack(Path(tmp), models, args.threads, args.parallel or args.concurrency,
                  system_prompt) as base:  # fmt: skip
        for model in models:
            print(f"{model}: {len(items)} items...", file=sys.stderr, flush=True)
            outcomes, wall = ask_all(base, model, items, args, system_prompt)
            results[model], summaries[model] = outcomes, summary(outcomes, wall)
    print_table(summaries, args.concurrency)
    print(f"\n{len(items)} items per model; whole run {time.perf_counter() - started:.0f}s")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({
        "concurrency": args.concurrency, "parallel": args.parallel or args.concurrency,
        "max_tokens": args.max_tokens, "threads": args.threads,
        "summary": summaries,
        "answers": {model: [asdict(o) for o in outcomes] for model, outcomes in results.items()},
    }, indent=2, ensure_ascii=False))  # fmt: skip


if __name__ == "__main__":
    main()
