"""What structured output costs: decode speed with and without a JSON schema, in one run.

The same GPT4People deployment as `bench.llama` (its own Redis, one batched
worker on the bundled model, the web app) answers the same questions as free
text and as JSON constrained by a schema (``response_format`` ``json_schema``:
the sampler runs llama.cpp's grammar stage for that job). Each row is the
aggregate completion tokens/s of N simultaneous requests, the two kinds taking
turns (ABBA); the ratio is what to read. Every constrained answer is checked to
parse as JSON with the schema's keys. Writes bench/results/grammar.json.

    python -m bench.grammar [--concurrency 1,4] [--rounds 2] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.llama import HTTP, QUESTIONS, ROOT, gpt4people

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "mood": {"type": "string", "enum": ["calm", "tense", "joyful", "sad"]},
        "characters": {
            "type": "array",
            "items": {"type": "string", "maxLength": 30},
            "maxItems": 4,
        },
        "summary": {"type": "string", "maxLength": 300},
    },
    "required": ["title", "mood", "characters", "summary"],
    "additionalProperties": False,
}


def _body(question: str, max_tokens: int, constrained: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": not constrained,  # free text runs to max_tokens; JSON ends when closed
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "story", "schema": SCHEMA, "strict": True},
        }
    return body


def _one(base: str, question: str, max_tokens: int, constrained: bool) -> tuple[int, bool]:
    """One request: (completion tokens, whether a constrained answer parsed as the schema)."""
    response = HTTP.post(f"{base}/v1/chat/completions",
                         json=_body(question, max_tokens, constrained))  # fmt: skip
    response.raise_for_status()
    body = response.json()
    tokens = int(body["usage"]["completion_tokens"])
    if not constrained:
        return tokens, True
    choice = body["choices"][0]
    try:
        answer = json.loads(choice["message"]["content"])
    except json.JSONDecodeError:
        # Cut by max_tokens before the object closed: valid so far, not counted as bad.
        return tokens, choice["finish_reason"] == "length"
    return tokens, isinstance(answer, dict) and set(answer) == set(SCHEMA["required"])


def _concurrent(base: str, n: int, max_tokens: int, constrained: bool) -> tuple[float, int]:
    """Aggregate completion tokens/s of n simultaneous requests, and how many answers failed
    their schema."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda q: _one(base, q, max_tokens, constrained), questions))
    elapsed = time.perf_counter() - started
    return sum(t for t, _ in results) / elapsed, sum(1 for _, ok in results if not ok)


def main() -> None:
    """Run the benchmark, print the table, write bench/results/grammar.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4", help="N simultaneous requests per row")
    parser.add_argument("--rounds", type=int, default=2, help="turns per kind (ABBA)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    samples: dict[str, list[float]] = {}
    invalid = 0
    with tempfile.TemporaryDirectory() as tmp, \
            gpt4people(Path(tmp), args.threads, max(levels)) as (base, _):  # fmt: skip
        _one(base, "Hi", 4, constrained=True)  # warm: the first grammar, the first prompt
        for n in levels:
            for turn in range(2 * args.rounds):
                constrained = turn % 4 in (1, 2)  # free, JSON, JSON, free, ...
                rate, bad = _concurrent(base, n, args.max_tokens, constrained)
                samples.setdefault(f"{'json' if constrained else 'free'}_c{n}", []).append(rate)
                invalid += bad
    print(f"\n{'tokens/s':<14} {'free text':>10} {'JSON schema':>12} {'ratio':>6}")
    rows = []
    for n in levels:
        free = statistics.median(samples[f"free_c{n}"])
        constrained = statistics.median(samples[f"json_c{n}"])
        rows.append({"concurrency": n, "free_tps": free, "json_tps": constrained,
                     "ratio": constrained / free})  # fmt: skip
        print(f"{'c' + str(n):<14} {free:>10.1f} {constrained:>12.1f} {constrained / free:>6.2f}")
    print(f"constrained answers not matching the schema: {invalid}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar.json").write_text(json.dumps(
        {"rows": rows, "samples": samples, "invalid": invalid, "max_tokens": args.max_tokens},
        indent=2))  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
