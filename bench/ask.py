"""What one `ask` costs end to end, on the echo engine and on the real model.

Starts its own Redis and one worker per engine (separate databases), then times
N round trips of a job through the queue (submit -> worker -> reply), the
`gpt4people ask` command as a user runs it, and, as the anchor, a bare Redis
LPUSH/BRPOP round trip on the same server. Prints medians and ratios and
writes bench/results/ask.json.

    python -m bench.ask [--n 30] [--model-n 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery import Celery

from kernel.redis_client import redis_client

ROOT = Path(__file__).resolve().parent.parent


def _client(url: str) -> Celery:
    os.environ["GPT4P_REDIS_URL"] = url
    from kernel.settings import load_settings
    from workers.app import celery_for

    return celery_for(load_settings())


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _redis_round_trip(url: str, n: int) -> list[float]:
    client = redis_client(url)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        client.lpush("bench:rt", b"x")
        client.brpop(["bench:rt"], timeout=5)
        samples.append(time.perf_counter() - started)
    return samples


def _jobs(url: str, n: int, prompt: str, max_tokens: int | None) -> list[float]:
    from kernel.contract import ChatMessage, GenerationOptions, Job
    from workers.client import submit, wait_for_reply

    app = _client(url)
    samples = []
    for _ in range(n):
        job = Job(channel="cli", user="bench", reply_to="cli",
                  messages=[ChatMessage(role="user", content=prompt)],
                  options=GenerationOptions(max_tokens=max_tokens, seed=1))  # fmt: skip
        started = time.perf_counter()
        submit(app, job)
        wait_for_reply(app, job.id, timeout=300)
        samples.append(time.perf_counter() - started)
    return samples


def _cli(env: dict[str, str], n: int, prompt: str) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gpt4people.cli", "ask", prompt], env=env, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=30, help="round trips on the echo engine")
    parser.add_argument("--model-n", type=int, default=5, help="round trips on the real model")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from gpt4people.redis_server import RedisServer, new_password
    from tests.conftest import base_env, start_worker, stop_process

    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis", password=new_password()) as server,
    ):
        base = server.url.removesuffix("/0")  # with the password; + "/<db>"
        echo_env = base_env(Path(tmp), redis_url=f"{base}/0", engine="echo")
        model_env = base_env(Path(tmp), redis_url=f"{base}/1", engine="llama")
        workers = [start_worker(echo_env, "echo@bench"), start_worker(model_env, "model@bench")]
        try:
            _jobs(f"{base}/0", 3, "warm up", None)
            _jobs(f"{base}/1", 1, "warm up", 8)
            results = {
                "redis_round_trip_ms": _median_ms(_redis_round_trip(f"{base}/0", args.n)),
                "echo_job_ms": _median_ms(_jobs(f"{base}/0", args.n, "ping", None)),
                "echo_cli_ask_ms": _median_ms(_cli(echo_env, max(3, args.n // 5), "ping")),
                "model_job_ms": _median_ms(
                    _jobs(f"{base}/1", args.model_n, "What is the capital of France?", 32)
                ),
                "model_cli_ask_ms": _median_ms(
                    _cli(model_env, args.model_n, "What is the capital of France?")
                ),
            }
        finally:
            for worker in workers:
                stop_process(worker)
    anchor = results["redis_round_trip_ms"]
    print(f"{'measure':<22}{'median ms':>12}{'x redis RTT':>14}")
    for name, value in results.items():
        print(f"{name:<22}{value:>12.2f}{value / anchor:>14.1f}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ask.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
