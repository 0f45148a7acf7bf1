"""An unrelated request while hostile helper calls run (issue 14, finding 2).

Starts its own Redis, one inference process (the echo engine, one process as
`gpt4people up` runs it by default), the calc and time helpers (one process
each, as `up` runs them), the nap helper of `bench.nap_helper` (NAP_PROCESSES
processes) and the web app, with the helper rate limit out of the way (every
HTTP caller without an API key is one sender). It times `/time UTC` through the
HTTP API alone, then in rounds for each scenario: HOSTILE concurrent hostile
calls are sent, and once all of them are on the queue, one `/time UTC` is sent
and timed, and its reply checked. Scenarios:

* ``calc``: `/calc (2**-1000)**19`, which once ran 5 s to its time limit and is
  now refused before computing;
* ``nap``: `/nap 5`, a helper that really runs 5 s, so an inference slot that
  waited for helpers would answer `/time UTC` only after all of them.

For each round it also counts the hostile calls still unanswered when `/time UTC`
was answered: the slot was free while they ran. Prints a table and writes
bench/results/helper_dos.json.

    python -m bench.helper_dos [--hostile 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from kernel.helper_registry import HelperRegistry
from kernel.keys import METRICS_COUNTERS_KEY
from kernel.redis_client import redis_client

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"calc": "/calc (2**-1000)**19", "nap": "/nap 5"}
HELPERS = {"calc": "calc", "time": "time", "nap": "bench.nap_helper"}
NAP_PROCESSES = 4
UNRELATED = "/time UTC"
TIME_REPLY = re.compile(r"^It is \d\d:\d\d on \w+ \d\d \w+ \d{4} in UTC \(UTC\+00:00\)\.$")
RECEIVED = "gpt4p_jobs_received|channel=http"  # the web app's count of jobs it queued
RATE_LIMIT = "100000"  # the setting's maximum: the benchmark is one sender


def _ask(base: str, text: str) -> tuple[float, str]:
    started = time.perf_counter()
    response = httpx.post(f"{base}/v1/chat/completions", timeout=600,
                          json={"messages": [{"role": "user", "content": text}]})  # fmt: skip
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, str(response.json()["choices"][0]["message"]["content"])


def _ask_time(base: str) -> float:
    """Seconds to answer `/time UTC`; the reply must be the time, not a refusal."""
    elapsed, text = _ask(base, UNRELATED)
    if not TIME_REPLY.match(text):
        raise SystemExit(f"{UNRELATED!r} was answered {text!r}, not with the time")
    return elapsed


def _received(client: redis.Redis) -> int:
    raw = client.hget(METRICS_COUNTERS_KEY, RECEIVED)
    return int(float(raw)) if isinstance(raw, bytes) else 0


@dataclass
class _Hostile:
    """Hostile calls sent at once; when each was answered, and with what."""

    base: str
    text: str
    answered: list[float] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self) -> None:
        try:
            reply = _ask(self.base, self.text)[1]
        except httpx.HTTPError as error:
            reply = f"<{error.__class__.__name__}>"
        with self.lock:
            self.answered.append(time.perf_counter())
            self.replies.append(reply)


def _round(base: str, client: redis.Redis, hostile: str, count: int) -> dict[str, Any]:
    """One `/time UTC`, sent once `count` hostile calls are queued."""
    before = _received(client)
    calls = _Hostile(base, hostile)
    threads = [threading.Thread(target=calls.call) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while _received(client) < before + count and time.monotonic() < deadline:
        time.sleep(0.01)  # a benchmark's poll: the hostile calls must be queued first
    seconds = _ask_time(base)
    answered_at = time.perf_counter()
    for thread in threads:
        thread.join()
    pending = sum(1 for t in calls.answered if t > answered_at)
    return {"seconds": seconds, "hostile_pending": pending, "replies": calls.replies}


def _live_helpers(client: redis.Redis) -> set[str]:
    return {h.name for h in HelperRegistry(client).live()}


def _start_helper(env: dict[str, str], name: str, target: str) -> subprocess.Popen[bytes]:
    log = open(Path(env["GPT4P_STATE_DIR"]) / f"helper-{name}.log", "wb")  # noqa: SIM115
    processes = NAP_PROCESSES if name == "nap" else 1
    return subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "helper", target, "--hostname", f"{name}@bench",
         "--concurrency", str(processes)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _scenario(
    base: str, client: redis.Redis, name: str, hostile: int, rounds: int
) -> dict[str, Any]:
    """`rounds` timed `/time UTC` under `hostile` calls of scenario `name`."""
    loaded = [_round(base, client, SCENARIOS[name], hostile) for _ in range(rounds)]
    seconds = [r["seconds"] for r in loaded]
    replies = Counter(reply for r in loaded for reply in r["replies"])
    return {
        "hostile": SCENARIOS[name],
        "time_utc_under_hostile_s": statistics.median(seconds),
        "time_utc_under_hostile_max_s": max(seconds),
        "hostile_pending_at_answer": [r["hostile_pending"] for r in loaded],
        "hostile_replies": dict(replies),
    }


def _run(hostile: int, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from gpt4people.redis_server import RedisServer, free_port
    from tests.conftest import base_env, start_web, start_worker, stop_process

    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis", password=secrets.token_urlsafe(24)) as server,
    ):
        env = base_env(Path(tmp), redis_url=server.url, engine="echo", worker_concurrency="1",
                       helper_rate_limit=RATE_LIMIT)  # fmt: skip
        processes = [_start_helper(env, name, target) for name, target in HELPERS.items()]
        client = redis_client(server.url)
        try:
            processes.append(start_worker(env, "echo@bench"))
            deadline = time.monotonic() + 120
            while _live_helpers(client) < set(HELPERS):
                assert time.monotonic() < deadline, "the helpers did not register"
                time.sleep(0.2)
            port = free_port()
            processes.append(start_web(env, port))
            base = f"http://127.0.0.1:{port}"
            alone = [_ask_time(base) for _ in range(5)]
            results: dict[str, Any] = {"time_utc_alone_s": statistics.median(alone),
                                       "hostile": hostile, "rounds": rounds}  # fmt: skip
            for name in SCENARIOS:
                results[name] = _scenario(base, client, name, hostile, rounds)
        finally:
            client.close()
            for process in processes:
                stop_process(process)
    return results


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hostile", type=int, default=16, help="concurrent hostile calls")
    parser.add_argument("--rounds", type=int, default=3, help="timed requests under load")
    args = parser.parse_args()
    results = _run(args.hostile, args.rounds)
    print(f"{UNRELATED!r} alone: {results['time_utc_alone_s']:.2f} s (median of 5)")
    print(f"{'hostile load':<28}{'median s':>10}{'max s':>8}  hostile pending at answer")
    for name in SCENARIOS:
        row = results[name]
        print(f"{row['hostile']:<28}{row['time_utc_under_hostile_s']:>10.2f}"
              f"{row['time_utc_under_hostile_max_s']:>8.2f}  "
              f"{row['hostile_pending_at_answer']} of {args.hostile}")  # fmt: skip
        print(f"  hostile replies: {row['hostile_replies']}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "helper_dos.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
