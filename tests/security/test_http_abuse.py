"""The HTTP API on a public port: abuse paths of the outside review (issue 14: 4, 8, 11, 14).

One stack for the module, on its own Redis database: an echo inference worker,
the image helper, and two web apps under uvicorn, one with API keys (as an
operator sets before going public) and one without (a loopback install).
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from channels.web import create_app
from gpt4people.redis_server import RedisServer, free_port
from kernel.helper_registry import HelperRegistry
from kernel.settings import Settings
from tests.conftest import (
    base_env,
    redis_url,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)
from tests.helpers.conftest import start_helper
from tests.security.conftest import DB_SEC_HTTP

KEY_A, KEY_B = "sk-caller-a-0123456789", "sk-caller-b-9876543210"
WORKER = "echo@sec-http"
# Peak resident memory a hostile body may add to the web process: the body limit's
# ~7 MB, read into memory once and parsed, with room for the allocator (an unbounded
# read of the 95 MB body took it from 70 MB to 349 MB).
RSS_BOUND_KB = 50 * 1024
# Marks the hostile inputs, to look for in the web process's log.
MARK = "HOSTILE-7f3a9c"
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def http_env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings of the module's processes: the echo engine, their own database and logs."""
    state = tmp_path_factory.mktemp("sec-http")
    return base_env(state, redis_url=redis_url(redis_server, DB_SEC_HTTP), engine="echo")


@pytest.fixture(scope="module")
def worker_and_helper(http_env: dict[str, str]) -> Iterator[None]:
    """The echo worker and the image helper, registered and live."""
    helper = start_helper(http_env, "image-sec", "image")
    worker = start_worker(http_env, WORKER)
    client = redis.Redis.from_url(http_env["GPT4P_REDIS_URL"])
    try:
        names = lambda: {h.name for h in HelperRegistry(client).live()}  # noqa: E731
        wait_for(lambda: "image" in names(), 90, "the image helper to register", every=0.2)
        yield
    finally:
        client.close()
        stop_process(worker)
        stop_process(helper)


def _web(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = start_web(env, port)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def keyed(
    http_env: dict[str, str], worker_and_helper: None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The web app with two API keys, one per client (the old single key and the list)."""
    yield from _web(dict(http_env, GPT4P_HTTP_API_KEY=KEY_A, GPT4P_HTTP_API_KEYS=f" {KEY_B} "))


@pytest.fixture(scope="module")
def open_web(
    http_env: dict[str, str], worker_and_helper: None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The web app without an API key: every caller is the same tenant."""
    yield from _web(http_env)


def auth(key: str) -> dict[str, str]:
    """The header of a caller holding `key`."""
    return {"Authorization": f"Bearer {key}"}


def ask(base: str, text: str, key: str | None = KEY_A, **headers: str) -> httpx.Response:
    """POST one user message to chat completions."""
    body = {"messages": [{"role": "user", "content": text}]}
    sent = {**(auth(key) if key else {}), **headers}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=sent, timeout=60)


def answer(response: httpx.Response) -> str:
    """The assistant's text of a successful completion."""
    assert response.status_code == 200, response.text
    return cast(str, response.json()["choices"][0]["message"]["content"])


def openai_error(response: httpx.Response) -> dict[str, Any]:
    """The error object of a response, checked to be in OpenAI's format."""
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS, error
    assert error["message"] and error["type"]
    return cast(dict[str, Any], error)


# --- 4: the body limit holds whatever Content-Length says; the key is checked first ---------


def peak_rss_kb(process: subprocess.Popen[bytes]) -> int:
    """The process's peak resident memory (VmHWM) since the last reset, in kB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def reset_peak_rss(process: subprocess.Popen[bytes]) -> int:
    """Start a new peak-memory measurement of the process; its resident memory now, in kB."""
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    return peak_rss_kb(process)


def chunked_prompt(megabytes: int) -> Iterator[bytes]:
    """A valid chat completions body of about `megabytes` MB, sent without Content-Length."""
    yield b'{"messages": [{"role": "user", "content": "'
    for _ in range(megabytes):
        yield b"x" * (1 << 20)
    yield b'"}]}'


def test_a_chunked_body_over_the_limit_is_refused_with_413(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, web = keyed
    before = reset_peak_rss(web)
    response = httpx.post(f"{base}/v1/chat/completions", content=chunked_prompt(20),
                          headers={**auth(KEY_A), "content-type": "application/json"},
                          timeout=60)  # fmt: skip
    grown = peak_rss_kb(web) - before
    print(f"finding 4: 20 MB chunked body with the key: {response.status_code}, "
          f"web peak RSS {before} kB -> +{grown} kB")  # fmt: skip
    assert response.status_code == 413, response.text[:300]
    assert "larger than" in openai_error(response)["message"]
    assert grown < RSS_BOUND_KB


def test_an_unauthenticated_body_is_refused_before_it_is_read(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, web = keyed
    before = reset_peak_rss(web)
    response = httpx.post(f"{base}/v1/chat/completions", content=chunked_prompt(95),
                          headers={"content-type": "application/json"}, timeout=120)  # fmt: skip
    grown = peak_rss_kb(web) - before
    print(f"finding 4: 95 MB chunked body without a key: {response.status_code}, "
          f"web peak RSS {before} kB -> +{grown} kB")  # fmt: skip
    assert response.status_code == 401
    assert openai_error(response)["code"] == "invalid_api_key"
    assert grown < RSS_BOUND_KB


# --- 8: an Idempotency-Key belongs to one caller and one body ---------------------------------


def test_another_caller_reusing_an_idempotency_key_gets_its_own_answer(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = keyed
    first = ask(base, "A asks: ship order 1234", KEY_A, **{"Idempotency-Key": "order-1234"})
    other = ask(base, "B asks: 6 times 7", KEY_B, **{"Idempotency-Key": "order-1234"})
    assert answer(first) == "A asks: ship order 1234"
    assert answer(other) == "B asks: 6 times 7"
    # Even with A's very body, B's request is B's own job.
    mine = ask(base, "A asks: ship order 99", KEY_A, **{"Idempotency-Key": "order-99"})
    theirs = ask(base, "A asks: ship order 99", KEY_B, **{"Idempotency-Key": "order-99"})
    assert answer(mine) == answer(theirs)
    assert theirs.json()["id"] != mine.json()["id"]


def test_the_same_caller_and_body_get_the_same_answer_and_another_body_a_422(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = keyed
    first = ask(base, "A asks: cancel order 77", KEY_A, **{"Idempotency-Key": "order-77"})
    again = ask(base, "A asks: cancel order 77", KEY_A, **{"Idempotency-Key": "order-77"})
    assert again.json()["id"] == first.json()["id"]
    assert answer(again) == "A asks: cancel order 77"
    reused = ask(base, "A asks: refund order 77", KEY_A, **{"Idempotency-Key": "order-77"})
    assert reused.status_code == 422
    error = openai_error(reused)
    assert error["code"] == "idempotency_key_reused"
    assert "cancel" not in reused.text


def test_without_api_keys_a_key_reused_with_another_body_is_a_422_not_the_first_answer(
    open_web: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = open_web
    first = ask(base, "caller A: my secret plan", None, **{"Idempotency-Key": "order-1234"})
    assert answer(first) == "caller A: my secret plan"
    other = ask(base, "caller B: /calc 6*7", None, **{"Idempotency-Key": "order-1234"})
    assert other.status_code == 422
    assert openai_error(other)["param"] == "Idempotency-Key"
    assert "secret plan" not in other.text


# --- 11: bad input is a 4xx in OpenAI's format, and no request data reaches the log -----------


def test_a_non_ascii_api_key_is_a_401(keyed: tuple[str, subprocess.Popen[bytes]]) -> None:
    base, _ = keyed
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for value in (b"Bearer \xe9", b"Bearer " + KEY_A.encode() + b"\xe9", b"\xff\xfe"):
        response = httpx.post(f"{base}/v1/chat/completions", json=body,
                              headers={"Authorization": value}, timeout=30)  # fmt: skip
        assert response.status_code == 401, response.text
        assert openai_error(response)["type"] == "authentication_error"


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def with_image(url: str, text: str = "what is this?") -> dict[str, Any]:
    """A chat completions body with one image part."""
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": parts}]}


def test_an_inline_image_of_megabytes_reaches_the_image_helper(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = keyed
    png = noise_png(600)
    assert len(png) > 1_000_000
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    response = httpx.post(f"{base}/v1/chat/completions", json=with_image(url),
                          headers=auth(KEY_A), timeout=60)  # fmt: skip
    assert answer(response).startswith("PNG image, 600×600 pixels")


@pytest.mark.parametrize("megabytes", [5.1, 6.0])
def test_an_inline_image_over_the_limit_is_refused_naming_the_limit(
    keyed: tuple[str, subprocess.Popen[bytes]], megabytes: float
) -> None:
    # 5.1 MB fits the body limit and is refused by the image limit; 6 MB by the body limit.
    base, _ = keyed
    payload = base64.b64encode(b"\0" * int(megabytes * 1_000_000)).decode()
    response = httpx.post(f"{base}/v1/chat/completions",
                          json=with_image("data:image/png;base64," + payload),
                          headers=auth(KEY_A), timeout=60)  # fmt: skip
    assert response.status_code == 413
    assert "5000000" in openai_error(response)["message"]


def test_an_image_link_longer_than_a_link_is_a_400(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = keyed
    url = "https://api.twilio.com/" + MARK * 300
    response = httpx.post(f"{base}/v1/chat/completions", json=with_image(url),
                          headers=auth(KEY_A), timeout=30)  # fmt: skip
    assert response.status_code == 400, response.text[:300]
    assert "2048" in openai_error(response)["message"]


def test_a_message_over_two_million_characters_sent_chunked_is_a_4xx(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = keyed

    def body() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "' + MARK.encode()
        for _ in range(21):
            yield b"y" * 100_000
        yield b'"}]}'

    response = httpx.post(f"{base}/v1/chat/completions", content=body(),
                          headers={**auth(KEY_A), "content-type": "application/json"},
                          timeout=60)  # fmt: skip
    assert response.status_code in {400, 413}, response.text[:300]
    openai_error(response)
    assert MARK not in response.text


def test_no_fragment_of_hostile_input_reaches_the_web_log(
    keyed: tuple[str, subprocess.Popen[bytes]], http_env: dict[str, str]
) -> None:
    base, web = keyed
    url = f"{base}/v1/chat/completions"
    hostile: list[dict[str, Any]] = [
        {"json": with_image(f"data:image/png;base64,{MARK}" + "A" * 4000)},
        {"json": with_image(f"https://example.org/{MARK}" + "b" * 3000)},
        {"json": {"messages": [{"role": "user", "content": MARK + "z" * 2_000_001}]}},
        {"json": {"messages": [{"role": MARK, "content": MARK}]}},
        {"json": {"messages": [{"role": "user", "content": [{"type": MARK, "text": MARK}]}]}},
        {"json": {"messages": [{"role": "user", "content": "hi"}], "stop": [MARK * 10]}},
        {"content": f'{{"messages": [{{"role": "user", "content": "{MARK}'.encode()},
    ]
    for request in hostile:
        response = httpx.post(url, headers=auth(KEY_A), timeout=60, **request)
        # A 4xx in OpenAI's format, or a polite answer (the helper says the data is bad).
        assert response.status_code < 500, response.text[:300]
        if response.status_code != 200:
            openai_error(response)
    response = httpx.post(url, json={"messages": [{"role": "user", "content": MARK}]},
                          headers={"Authorization": f"Bearer {MARK}\u00e9".encode("latin-1")},
                          timeout=30)  # fmt: skip
    assert response.status_code == 401
    log = Path(http_env["GPT4P_STATE_DIR"]) / f"web-{base.rsplit(':', 1)[1]}.log"
    assert MARK not in log.read_text(errors="replace")
    assert web.poll() is None


# --- 14: with a key set, metrics, docs and readiness details need it; a scrape never scans ----


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json"])
def test_metrics_and_docs_need_the_api_key(
    keyed: tuple[str, subprocess.Popen[bytes]], path: str
) -> None:
    base, _ = keyed
    refused = httpx.get(base + path, timeout=30)
    assert refused.status_code == 401
    assert openai_error(refused)["type"] == "authentication_error"
    assert httpx.get(base + path, headers=auth(KEY_B), timeout=30).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/v1/models"])
def test_behind_a_proxy_prefix_the_key_is_still_required(
    http_env: dict[str, str], worker_and_helper: None, path: str
) -> None:
    # uvicorn --root-path (UVICORN_ROOT_PATH), as behind a proxy that serves the app under
    # /api and strips it: uvicorn puts the prefix back in front of the request's path,
    # which the guards must see through as the router does.
    env = dict(http_env, GPT4P_HTTP_API_KEY=KEY_A, UVICORN_ROOT_PATH="/api")
    for base, _ in _web(env):
        refused = httpx.get(f"{base}{path}", timeout=30)
        assert refused.status_code == 401, refused.text[:200]
        assert httpx.get(f"{base}{path}", headers=auth(KEY_A), timeout=30).status_code == 200


def test_readiness_names_workers_only_to_a_caller_with_the_key(
    keyed: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = keyed
    assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    anonymous = httpx.get(f"{base}/readyz", timeout=10)
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "ok"}
    assert WORKER not in anonymous.text
    detailed = httpx.get(f"{base}/readyz", headers=auth(KEY_A), timeout=10).json()
    assert WORKER in detailed["workers"] and detailed["redis"] == "up"


def test_metrics_can_be_left_public_for_a_private_scrape_network(
    http_env: dict[str, str], worker_and_helper: None
) -> None:
    settings = Settings(redis_url=http_env["GPT4P_REDIS_URL"], engine="echo",
                        http_api_key=KEY_A, http_public_metrics=True)  # fmt: skip
    with TestClient(create_app(settings)) as web:
        assert web.get("/metrics").status_code == 200
        assert web.get("/openapi.json").status_code == 401
        assert web.get("/v1/models").status_code == 401


def test_a_metrics_scrape_does_not_scan_the_keyspace(
    keyed: tuple[str, subprocess.Popen[bytes]], http_env: dict[str, str]
) -> None:
    base, _ = keyed
    client = redis.Redis.from_url(http_env["GPT4P_REDIS_URL"])
    try:
        # Many unrelated keys, as conversations and results would be: a SCAN would walk them.
        client.mset({f"sec-http:filler:{i}": "x" for i in range(2000)})
        client.config_resetstat()
        scrape = httpx.get(f"{base}/metrics", headers=auth(KEY_A), timeout=30)
        stats = cast(dict[str, Any], client.info("commandstats"))
    finally:
        client.close()
    assert scrape.status_code == 200
    assert "cmdstat_scan" not in stats and "cmdstat_keys" not in stats, sorted(stats)
    # The queues are still all there: the fixed ones and those workers announced.
    for queue in ("inference", "deliver.sms", "helper.image"):
        assert f'gpt4p_queue_depth{{queue="{queue}"}}' in scrape.text


def test_an_unexpected_error_is_a_500_in_openai_format_logged_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.routing import Route

    from channels.http.guard import SafeErrors

    async def broken(request: Request) -> None:
        raise ValueError(f"input_value='{(await request.body()).decode()}'")

    # Where create_app puts it: inside Starlette's own error middleware.
    routes = [Route("/broken", broken, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(SafeErrors)])
    with TestClient(app, raise_server_exceptions=True) as web:
        response = web.post("/broken", content=MARK)
    assert response.status_code == 500
    assert openai_error(response)["type"] == "server_error"
    assert "ValueError" in caplog.text and "/broken" in caplog.text
    assert MARK not in caplog.text and MARK not in response.text
