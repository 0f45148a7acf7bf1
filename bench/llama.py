"""GPT4People's model path against llama.cpp's own server, on the same GGUF and threads.

Measures, in one run:

- tiny: median latency of a 1-token answer through /v1/chat/completions;
- single: decode tokens/s of one 128-token answer (streamed: first token to last),
  also for llama-cpp-python called in-process, and time to first token;
- cN: aggregate completion tokens/s with N concurrent 128-token requests, against
  ``llama-server --parallel N``;
- queue overhead: an echo job through the whole pipeline against a bare Redis
  LPUSH/BRPOP round trip on the same Redis.

GPT4People runs as a user runs it: its own Redis, one ``gpt4people worker``
(batched, GPT4P_PARALLEL slots) and the web app. The anchor ``llama-server``
is built by scripts/install-llama-server (once, cached). Ratios are what to
read: these machines are noisy. Writes bench/results/llama.json.

    python -m bench.llama [--concurrency 1,4,16] [--tiny-n 20] [--rounds 3]
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
STORY = "Write a long story about a lighthouse keeper and a storm."
QUESTIONS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how bread is baked, step by step.",
    "Describe a journey across a desert, with many details.",
    "Write a long letter to a friend about a summer holiday.",
]
ANSWER_TOKENS = 128
N_CTX = 1024  # per conversation, for both servers


@dataclass
class Stream:
    """One streamed completion: when it started, its first token, its end, its tokens."""

    started: float
    first: float
    ended: float
    tokens: int

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one."""
        return (self.tokens - 1) / (self.ended - self.first) if self.ended > self.first else 0.0


def _body(question: str, max_tokens: int, stream: bool) -> dict[str, object]:
    """Greedy; `ignore_eos` (both servers know it) so every answer is max_tokens long."""
    return {"model": "default", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0.0, "stream": stream,
            "ignore_eos": max_tokens > 1}  # fmt: skip


def _complete(base: str, question: str, max_tokens: int) -> tuple[float, int]:
    """One plain request: (seconds, completion tokens)."""
    started = time.perf_counter()
    response = httpx.post(f"{base}/v1/chat/completions", json=_body(question, max_tokens, False),
                          timeout=600)  # fmt: skip
    response.raise_for_status()
    return time.perf_counter() - started, int(response.json()["usage"]["completion_tokens"])


def _stream(base: str, question: str, max_tokens: int) -> Stream:
    """One streamed request; tokens counted from the final usage (or the chunks)."""
    started = time.perf_counter()
    first, chunks, usage = 0.0, 0, None
    body = dict(_body(question, max_tokens, True), stream_options={"include_usage": True})
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
    ended = time.perf_counter()
    return Stream(started, first or ended, ended, int(usage) if usage else chunks)


def _concurrent(base: str, n: int) -> float:
    """Aggregate completion tokens/s of n simultaneous 128-token requests."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda q: _complete(base, q, ANSWER_TOKENS), questions))
    return sum(tokens for _, tokens in results) / (time.perf_counter() - started)


def _tiny(base: str, n: int) -> float:
    return statistics.median(_complete(base, "Hi", 1)[0] for _ in range(n)) * 1000


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up in {timeout:g}s")


@contextmanager
def llama_server(binary: str, model: str, threads: int, parallel: int) -> Iterator[str]:
    """The anchor: llama.cpp's server with `parallel` slots of N_CTX tokens each."""
    from workers.redis_server import free_port

    port = free_port()
    process = subprocess.Popen(
        [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
         "-t", str(threads), "-tb", str(threads), "-c", str(N_CTX * parallel),
         "--parallel", str(parallel), "--no-webui", "--log-disable"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", process, "llama-server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def gpt4people(tmp: Path, threads: int, parallel: int) -> Iterator[tuple[str, str]]:
    """Redis, one batched model worker, one echo worker and the web app: (base URL, redis)."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import base_env, start_web, start_worker, stop_process
    from workers.redis_server import RedisServer, free_port

    with RedisServer(tmp / "redis") as server:
        url = f"redis://{server.host}:{server.port}"
        env = base_env(tmp, redis_url=f"{url}/0", engine="llama", parallel=str(parallel),
                       n_ctx=str(N_CTX), n_threads=str(threads), max_tokens="512",
                       log_level="WARNING")  # fmt: skip
        echo_env = base_env(tmp, redis_url=f"{url}/1", engine="echo", log_level="WARNING")
        worker = start_worker(env, "model@bench", timeout=300)
        echo = start_worker(echo_env, "echo@bench")
        port = free_port()
        web = start_web(env, port)
        try:
            yield f"http://127.0.0.1:{port}", url
        finally:
            for process in (web, echo, worker):
                stop_process(process)


def in_process(model: str, threads: int) -> Stream:
    """llama-cpp-python called directly: one streamed 128-token completion."""
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=N_CTX, n_threads=threads, verbose=False)
    prompt = f"User: {STORY}\nAssistant:"
    llm.create_completion(prompt, max_tokens=4, temperature=0.0)  # warm up
    started = time.perf_counter()
    first, tokens = 0.0, 0
    for _ in llm.create_completion(prompt, max_tokens=ANSWER_TOKENS, temperature=0.0,
                                   stream=True):  # fmt: skip
        tokens += 1
        first = first or time.perf_counter()
    return Stream(started, first, time.perf_counter(), tokens)


def queue_overhead(redis_url: str, n: int = 30) -> tuple[float, float]:
    """(echo job through the pipeline, bare Redis round trip), median ms."""
    from bench.ask import _jobs, _median_ms, _redis_round_trip

    _jobs(f"{redis_url}/1", 3, "warm up", None)
    return (_median_ms(_jobs(f"{redis_url}/1", n, "ping", None)),
            _median_ms(_redis_round_trip(f"{redis_url}/1", n)))  # fmt: skip


def _round(base: str, n: int, tiny_n: int, single: bool) -> dict[str, float]:
    """One round on one server: cN, and tiny, single stream and TTFT when `single`."""
    results: dict[str, float] = {}
    if single:
        results["tiny_ms"] = _tiny(base, tiny_n)
        stream = _stream(base, STORY, ANSWER_TOKENS)
        results["single_tps"] = stream.decode_rate
        results["ttft_ms"] = (stream.first - stream.started) * 1000
    results[f"c{n}_tps"] = _concurrent(base, n)
    return results


def measure_pair(
    ours: str, anchor: str, n: int, tiny_n: int, single: bool, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Both servers in turn, `rounds` times (drift on a noisy machine hits both): medians."""
    for base in (ours, anchor):
        _complete(base, "warm up", 4)
    samples: tuple[list[dict[str, float]], list[dict[str, float]]] = ([], [])
    for _ in range(rounds):
        for base, kept in zip((ours, anchor), samples, strict=True):
            kept.append(_round(base, n, tiny_n, single))
    ours_medians, anchor_medians = (
        {key: statistics.median(r[key] for r in kept) for key in kept[0]} for kept in samples
    )
    return ours_medians, anchor_medians


def main() -> None:
    """Run the benchmark, print the table, write bench/results/llama.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,16", help="N for the cN rows")
    parser.add_argument("--tiny-n", type=int, default=20, help="1-token requests to time")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="turns per server (medians)")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]

    sys.path.insert(0, str(ROOT))
    from workers.model_files import resolve_model_path
    from workers.settings import load_settings

    model = str(resolve_model_path(load_settings()))
    binary = subprocess.run([str(ROOT / "scripts" / "install-llama-server")], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    ours: dict[str, float] = {}
    anchor: dict[str, float] = {}
    # One GPT4People deployment (GPT4P_PARALLEL = the largest N) for every row, against
    # llama-server --parallel N for each N, as the anchor; an idle server costs
    # nothing, so the two take turns.
    with tempfile.TemporaryDirectory() as tmp, \
            gpt4people(Path(tmp), args.threads, max(levels)) as (base, redis_url):  # fmt: skip
        for n in levels:
            with llama_server(binary, model, args.threads, n) as anchor_base:
                pair = measure_pair(base, anchor_base, n, args.tiny_n, n == min(levels),
                                    args.rounds)  # fmt: skip
            ours.update(pair[0])
            anchor.update(pair[1])
        ours["echo_job_ms"], anchor["redis_rtt_ms"] = queue_overhead(redis_url)
    direct = in_process(model, args.threads)

    rows = [("tiny (1-token answer), ms", "tiny_ms", "lower"),
            ("time to first token, ms", "ttft_ms", "lower"),
            ("single stream, tokens/s", "single_tps", "higher")]  # fmt: skip
    rows += [(f"c{n} aggregate, tokens/s", f"c{n}_tps", "higher") for n in levels]
    print(f"\n{'measure':<30}{'GPT4People':>12}{'llama-server':>14}{'ratio':>8}")
    table = {}
    for label, key, _better in rows:
        ratio = ours[key] / anchor[key] if anchor[key] else float("nan")
        table[key] = {"gpt4people": ours[key], "llama_server": anchor[key], "ratio": ratio}
        print(f"{label:<30}{ours[key]:>12.1f}{anchor[key]:>14.1f}{ratio:>8.2f}")
    direct_ratio = ours["single_tps"] / direct.decode_rate
    print(f"{'single, vs llama-cpp-python':<30}{ours['single_tps']:>12.1f}"
          f"{direct.decode_rate:>14.1f}{direct_ratio:>8.2f}  (in-process)")  # fmt: skip
    overhead = ours["echo_job_ms"] / anchor["redis_rtt_ms"]
    print(f"{'queue: echo job vs Redis RTT':<30}{ours['echo_job_ms']:>12.2f}"
          f"{anchor['redis_rtt_ms']:>14.2f}{overhead:>8.1f}  (ms)")  # fmt: skip
    table["single_vs_llama_cpp_python"] = {"gpt4people": ours["single_tps"],
                                           "llama_cpp_python": direct.decode_rate,
                                           "ratio": direct_ratio}  # fmt: skip
    table["queue_overhead"] = {"echo_job_ms": ours["echo_job_ms"], "ratio": overhead,
                               "redis_rtt_ms": anchor["redis_rtt_ms"]}  # fmt: skip
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "llama.json").write_text(
        json.dumps({"threads": args.threads, "rounds": args.rounds, "rows": table}, indent=2)
    )


if __name__ == "__main__":
    main()
