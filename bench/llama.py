"""GPT4People's model path against llama.cpp's own server, on the same GGUF and threads.

Measures, in one run:

- tiny: median latency of a 1-token answer through /v1/chat/completions;
- single: decode tokens/s of a 128-token answer (streamed: first token to last),
  also for llama-cpp-python called in-process, and time to first token;
- cN: aggregate completion tokens/s with N concurrent 128-token requests, against
  ``llama-server --parallel N``;
- queue overhead: an echo job through the whole pipeline against a bare Redis
  LPUSH/BRPOP round trip on the same Redis;
- echo job over HTTP against a bare Celery round trip: `POST /v1/chat/completions`
  to a web app of its own in front of the echo worker, against ``noop.delay().get()``
  of a minimal Celery app (bench/bare_celery.py, Celery's defaults, its own
  ``celery worker --concurrency 1``) on another database of the same Redis.

GPT4People runs as a user runs it: its own Redis, one ``gpt4people worker``
(batched, GPT4P_PARALLEL slots) and the web app. The anchor ``llama-server``
is built by scripts/install-llama-server (once, cached). The two servers take
turns, `--rounds` times, the first one alternating (ABBA), and each row is the
median of every sample. Ratios are what to read: these machines are noisy.
Writes bench/results/llama.json (with every sample).

    python -m bench.llama [--concurrency 1,4,16] [--tiny-n 20] [--streams 3] [--rounds 4]
                          [--queue-n 30]
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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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
T = TypeVar("T")
N_CTX = 1024  # per conversation, for both servers
# One client with kept-alive connections for every request, so what is timed is the
# server, not a new TCP connection and client per request. Idle connections are let go
# well before the servers' own keep-alive timeouts (5 s) could close one under a request.
HTTP = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=128,
                    max_keepalive_connections=128, keepalive_expiry=1.0))  # fmt: skip


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


def _once_more(measure: Callable[[], T], base: str) -> T:
    """`measure`, again if the server dropped the kept-alive connection under it (as a
    browser retries): said on stderr, so a server that drops requests is noticed."""
    try:
        return measure()
    except httpx.RemoteProtocolError as error:
        print(f"warning: {base} dropped a connection ({error}); measuring again", file=sys.stderr)
        return measure()


def _complete(base: str, question: str, max_tokens: int) -> tuple[float, int]:
    """One plain request: (seconds, completion tokens)."""
    return _once_more(lambda: _complete_once(base, question, max_tokens), base)


def _complete_once(base: str, question: str, max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    response = HTTP.post(f"{base}/v1/chat/completions", json=_body(question, max_tokens, False))
    response.raise_for_status()
    return time.perf_counter() - started, int(response.json()["usage"]["completion_tokens"])


def _stream(base: str, question: str, max_tokens: int) -> Stream:
    """One streamed request; tokens counted from the final usage (or the chunks)."""
    return _once_more(lambda: _stream_once(base, question, max_tokens), base)


def _stream_once(base: str, question: str, max_tokens: int) -> Stream:
    started = time.perf_counter()
    first, chunks, usage = 0.0, 0, None
    body = dict(_body(question, max_tokens, True), stream_options={"include_usage": True})
    with HTTP.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
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


def same_prompt_template(path: Path, model: str) -> Path:
    """A chat template that gives llama-server GPT4People's prompt for a one-question chat.

    GPT4People puts its system prompt before the question (in the model's own chat
    template, or in a transcript with one worked example for a base model without
    one); llama-server given the question alone would build a shorter prompt. The same
    prompt tokens make the two do the same work.
    """
    import llama_cpp
    from llama_cpp import Llama

    from answer.prompt import build_prompt
    from kernel.contract import ChatMessage
    from kernel.settings import Settings

    vocab = Llama(model_path=model, vocab_only=True, verbose=False)

    def token_text(token: int) -> str:
        return vocab.detokenize([token], special=True).decode("utf-8", errors="ignore")

    marker = "@@QUESTION@@"
    bos = token_text(vocab.token_bos()) if vocab.token_bos() >= 0 else ""
    text = build_prompt([ChatMessage(role="user", content=marker)], Settings().system_prompt,
                        vocab.metadata.get("tokenizer.chat_template") or None, bos,
                        token_text(vocab.token_eos())).text  # fmt: skip
    before, after = text.split(marker)
    # Both add the BOS token when the model asks for one (and not twice): leave it out here.
    # (SmolLM2's BOS is <|im_start|>, which its template writes itself and nobody adds.)
    if bos and llama_cpp.llama_vocab_get_add_bos(vocab._model.vocab):
        before = before.removeprefix(bos)
    path.write_text(jinja_literal(before) + "{{ messages[-1]['content'] | trim }}"
                    + jinja_literal(after))  # fmt: skip
    return path


def jinja_literal(text: str) -> str:
    """A Jinja expression that writes `text` exactly. As template text, its last newline
    would be lost (Jinja and llama-server's engine drop a template's trailing newline:
    the prompt's after "assistant", for one) and whitespace next to a block tag too."""
    return "{{ '" + text.replace("\\", "\\\\").replace("'", "\\'") + "' }}"


@contextmanager
def llama_server(
    binary: str, model: str, threads: int, parallel: int, template: Path,
    extra: Sequence[str] = (),
) -> Iterator[str]:  # fmt: skip
    """The anchor: llama.cpp's server with `parallel` slots of N_CTX tokens each (and the
    `extra` arguments)."""
    from gpt4people.redis_server import free_port

    port = free_port()
    process = subprocess.Popen(
        [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
         "-t", str(threads), "-tb", str(threads), "-c", str(N_CTX * parallel),
         "--parallel", str(parallel), "--no-webui", "--log-disable",
         "--jinja", "--chat-template-file", str(template), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", process, "llama-server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def gpt4people(
    tmp: Path, threads: int, parallel: int, model: str, *,
    settings: dict[str, str] | None = None, deliver: bool = False,
) -> Iterator[tuple[str, str]]:  # fmt: skip
    """Redis, one batched model worker, one echo worker (database 1) and the web app:
    (base URL, redis). `settings`: more of the model side's (GPT4P_<NAME>); `deliver`:
    a delivery worker too (`gpt4people deliver`)."""
    sys.path.insert(0, str(ROOT))
    from gpt4people.redis_server import RedisServer, free_port, new_password
    from tests.conftest import base_env, start_web, start_worker, stop_process

    with RedisServer(tmp / "redis", password=new_password()) as server:
        url = server.url.removesuffix("/0")  # with the password; + "/<db>"
        env = base_env(tmp, redis_url=f"{url}/0", engine="llama", parallel=str(parallel),
                       model_path=model,
                       n_ctx=str(N_CTX), n_threads=str(threads), max_tokens="512",
                       log_level="WARNING", **(settings or {}))  # fmt: skip
        echo_env = base_env(tmp, redis_url=f"{url}/1", engine="echo", log_level="WARNING")
        processes = [start_worker(env, "model@bench", timeout=300)]
        try:
            processes.append(start_worker(echo_env, "echo@bench"))
            if deliver:
                processes.append(start_worker(env, "deliver@bench", command="deliver"))
            port = free_port()
            processes.append(start_web(env, port))
            yield f"http://127.0.0.1:{port}", url
        finally:
            for process in reversed(processes):
                stop_process(process)


@contextmanager
def echo_web(tmp: Path, redis_url: str) -> Iterator[str]:
    """A web app of its own in front of `gpt4people`'s echo worker (database 1): its URL."""
    from gpt4people.redis_server import free_port
    from tests.conftest import base_env, start_web, stop_process

    env = base_env(tmp, redis_url=f"{redis_url}/1", engine="echo", log_level="WARNING")
    port = free_port()
    web = start_web(env, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(web)


@contextmanager
def bare_celery(tmp: Path, redis_url: str) -> Iterator[None]:
    """bench/bare_celery.py's worker on database 2 (Celery's defaults but one process), and
    this process's app pointed at it."""
    from bench import bare_celery as bare
    from tests.conftest import stop_process, wait_for

    url = f"{redis_url}/2"
    log = open(tmp / "bare-celery.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker",
         "--concurrency", "1", "--hostname", bare.HOSTNAME, "--loglevel", "WARNING"],
        env=dict(os.environ, **{bare.URL_VARIABLE: url}), cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    bare.use(url)

    def ready() -> bool:
        assert process.poll() is None, f"the bare Celery worker exited; see {log.name}"
        return bool(bare.app.control.ping(destination=[bare.HOSTNAME], timeout=1.0))

    try:
        wait_for(ready, 120, "the bare Celery worker to answer pings", every=0.5)
        yield
    finally:
        stop_process(process)
        log.close()


def _bare_celery_ms(n: int) -> list[float]:
    """`n` round trips of the bare app's no-op task, each in ms."""
    from bench.bare_celery import noop

    samples = []
    for _ in range(n):
        started = time.perf_counter()
        noop.delay().get(timeout=60)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _echo_http_ms(base: str, n: int) -> list[float]:
    """`n` tiny chat completions answered by the echo worker, each in ms (kept alive)."""
    body = {"model": "default", "messages": [{"role": "user", "content": "ping"}]}
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        response = _once_more(lambda: HTTP.post(f"{base}/v1/chat/completions", json=body), base)
        response.raise_for_status()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def celery_vs_http(echo_base: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    """(bare Celery round trips, echo jobs over HTTP), every sample in ms: `n` of each per
    round, the first one alternating (ABBA), after a few of each to warm up."""
    _bare_celery_ms(3)
    _echo_http_ms(echo_base, 3)
    celery: list[float] = []
    echo: list[float] = []
    for turn in range(rounds):
        order = [lambda: celery.extend(_bare_celery_ms(n)),
                 lambda: echo.extend(_echo_http_ms(echo_base, n))]  # fmt: skip
        for measure in order if turn % 2 == 0 else reversed(order):
            measure()
    return celery, echo


def in_process(model: str, threads: int, streams: int, gpu_layers: int = 0) -> list[float]:
    """llama-cpp-python called directly: decode tokens/s of `streams` 128-token completions."""
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=N_CTX, n_threads=threads, n_gpu_layers=gpu_layers,
                verbose=False)  # fmt: skip
    prompt = f"User: {STORY}\nAssistant:"
    llm.create_completion(prompt, max_tokens=4, temperature=0.0)  # warm up
    rates = []
    for _ in range(max(streams, 1)):
        started = time.perf_counter()
        first, tokens = 0.0, 0
        for _ in llm.create_completion(prompt, max_tokens=ANSWER_TOKENS, temperature=0.0,
                                       stream=True):  # fmt: skip
            tokens += 1
            first = first or time.perf_counter()
        rates.append(Stream(started, first, time.perf_counter(), tokens).decode_rate)
    return rates


def queue_overhead(redis_url: str, n: int = 30) -> tuple[float, float]:
    """(echo job through the pipeline, bare Redis round trip), median ms."""
    from bench.ask import _jobs, _median_ms, _redis_round_trip

    _jobs(f"{redis_url}/1", 3, "warm up", None)
    return (_median_ms(_jobs(f"{redis_url}/1", n, "ping", None)),
            _median_ms(_redis_round_trip(f"{redis_url}/1", n)))  # fmt: skip


def _round(base: str, n: int, tiny_n: int, streams: int) -> dict[str, list[float]]:
    """One round on one server: cN, and tiny, `streams` single streams and TTFT when
    `streams` > 0."""
    results: dict[str, list[float]] = {}
    if streams:
        results["tiny_ms"] = [_tiny(base, tiny_n)]
        for _ in range(streams):
            stream = _stream(base, STORY, ANSWER_TOKENS)
            results.setdefault("single_tps", []).append(stream.decode_rate)
            results.setdefault("ttft_ms", []).append((stream.first - stream.started) * 1000)
    results[f"c{n}_tps"] = [_concurrent(base, n)]
    return results


def measure_pair(
    ours: str, anchor: str, n: int, tiny_n: int, streams: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Both servers in turn, `rounds` times, the first one alternating (ABBA: drift on a
    noisy machine hits both alike): every sample of every key."""
    for base in (ours, anchor):
        _complete(base, "warm up", 4)
    samples: tuple[dict[str, list[float]], dict[str, list[float]]] = ({}, {})
    for turn in range(rounds):
        order = [(ours, samples[0]), (anchor, samples[1])]
        for base, kept in order if turn % 2 == 0 else reversed(order):
            for key, values in _round(base, n, tiny_n, streams).items():
                kept.setdefault(key, []).extend(values)
    return samples


def main() -> None:
    """Run the benchmark, print the table, write bench/results/llama.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,16", help="N for the cN rows")
    parser.add_argument("--tiny-n", type=int, default=20, help="1-token requests to time")
    parser.add_argument("--streams", type=int, default=3, help="single streams per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=4,
                        help="turns per server, first one alternating (medians)")  # fmt: skip
    parser.add_argument("--queue-n", type=int, default=30,
                        help="bare Celery and echo HTTP round trips per round")  # fmt: skip
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]

    sys.path.insert(0, str(ROOT))
    from kernel.model_files import resolve_model_path
    from kernel.settings import load_settings

    settings = load_settings()
    model = str(resolve_model_path(settings))
    # GPT4P_N_GPU_LAYERS offloads on all three sides (base_env drops the caller's GPT4P_*).
    gpu = settings.n_gpu_layers
    offload = {"n_gpu_layers": str(gpu)} if gpu is not None else None
    ngl = ["-ngl", str(999 if gpu < 0 else gpu)] if gpu is not None else []
    binary = subprocess.run([str(ROOT / "scripts" / "install-llama-server")], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    ours: dict[str, list[float]] = {}
    anchor: dict[str, list[float]] = {}
    # One GPT4People deployment (GPT4P_PARALLEL = the largest N) for every row, against
    # llama-server --parallel N for each N, as the anchor; an idle server costs
    # nothing, so the two take turns.
    with (
        tempfile.TemporaryDirectory() as tmp,
        gpt4people(Path(tmp), args.threads, max(levels), model, settings=offload) as (
            base,
            redis_url,
        ),
    ):
        print(f"GPT4People at {base}", file=sys.stderr)
        template = same_prompt_template(Path(tmp) / "prompt.jinja", model)
        for n in levels:
            with llama_server(binary, model, args.threads, n, template, ngl) as anchor_base:
                streams = args.streams if n == min(levels) else 0
                pair = measure_pair(base, anchor_base, n, args.tiny_n, streams, args.rounds)
            ours.update(pair[0])
            anchor.update(pair[1])
        echo_ms, rtt_ms = queue_overhead(redis_url)
        with bare_celery(Path(tmp), redis_url), echo_web(Path(tmp), redis_url) as echo_base:
            celery_samples, echo_http_samples = celery_vs_http(echo_base, args.queue_n,
                                                               args.rounds)  # fmt: skip
    direct = in_process(model, args.threads, args.streams, gpu or 0)
    median = statistics.median

    rows = [("tiny (1-token answer), ms", "tiny_ms"), ("time to first token, ms", "ttft_ms"),
            ("single stream, tokens/s", "single_tps")]  # fmt: skip
    rows += [(f"c{n} aggregate, tokens/s", f"c{n}_tps") for n in levels]
    print(f"\n{'measure':<30}{'GPT4People':>12}{'llama-server':>14}{'ratio':>8}")
    table: dict[str, dict[str, object]] = {}
    for label, key in rows:
        a, b = median(ours[key]), median(anchor[key])
        ratio = a / b if b else float("nan")
        samples = {"gpt4people": ours[key], "llama_server": anchor[key]}
        table[key] = {"gpt4people": a, "llama_server": b, "ratio": ratio, "samples": samples}
        print(f"{label:<30}{a:>12.1f}{b:>14.1f}{ratio:>8.2f}")
    single, direct_rate = median(ours["single_tps"]), median(direct)
    print(f"{'single, vs llama-cpp-python':<30}{single:>12.1f}"
          f"{direct_rate:>14.1f}{single / direct_rate:>8.2f}  (in-process)")  # fmt: skip
    print(f"{'queue: echo job vs Redis RTT':<30}{echo_ms:>12.2f}"
          f"{rtt_ms:>14.2f}{echo_ms / rtt_ms:>8.1f}  (ms)")  # fmt: skip
    table["single_vs_llama_cpp_python"] = {"gpt4people": single, "llama_cpp_python": direct_rate,
                                           "ratio": single / direct_rate,
                                           "samples": {"llama_cpp_python": direct}}  # fmt: skip
    table["queue_overhead"] = {"echo_job_ms": echo_ms, "redis_rtt_ms": rtt_ms,
                               "ratio": echo_ms / rtt_ms}  # fmt: skip
    celery_ms, echo_http_ms = median(celery_samples), median(echo_http_samples)
    print(f"{'bare Celery round trip, ms':<30}{celery_ms:>12.2f}")
    print(f"{'echo job over HTTP, ms':<30}{echo_http_ms:>12.2f}")
    print(f"{'echo HTTP / bare Celery':<30}{echo_http_ms / celery_ms:>12.2f}  (target <= 2.0)")
    table["bare_celery_ms"] = {"median": celery_ms, "samples": celery_samples}
    table["echo_http_ms"] = {"median": echo_http_ms, "samples": echo_http_samples}
    table["echo_http_vs_bare_celery"] = {"echo_http_ms": echo_http_ms,
                                         "bare_celery_ms": celery_ms,
                                         "ratio": echo_http_ms / celery_ms}  # fmt: skip
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "llama.json").write_text(json.dumps(
        {"threads": args.threads, "rounds": args.rounds, "streams": args.streams,
         "queue_n": args.queue_n, "n_gpu_layers": gpu, "rows": table},
        indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
