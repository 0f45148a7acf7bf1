"""The OpenAI-compatible HTTP channel, through the queue to a real worker."""

from __future__ import annotations

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from channels.web import create_app
from gpt4people.redis_server import RedisServer
from kernel.settings import Settings
from tests.conftest import DB_NO_WORKER, redis_url, wait_for


@pytest.fixture(scope="module")
def client(echo_web: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{echo_web}/v1", api_key="unused", timeout=30, max_retries=0)


def test_the_openai_client_gets_a_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="anything",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello through the queue"},
        ],
    )
    assert completion.choices[0].message.content == "Hello through the queue"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "echo"
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_the_openai_client_streams_a_completion(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "stream me please"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "stream me please"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_multi_part_content_and_max_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": [{"type": "text", "text": "one two three four"}]}],
        max_tokens=2,
    )
    assert completion.choices[0].message.content == "one two"
    assert completion.choices[0].finish_reason == "length"


def test_models_are_listed(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["echo"]


def test_the_same_idempotency_key_is_one_job(echo_web: str) -> None:
    body = {"messages": [{"role": "user", "content": "once"}]}
    headers = {"Idempotency-Key": "order-42"}
    first = httpx.post(f"{echo_web}/v1/chat/completions", json=body, headers=headers, timeout=30)
    second = httpx.post(f"{echo_web}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    other = httpx.post(f"{echo_web}/v1/chat/completions", json=body, timeout=30)
    assert other.json()["id"] != first.json()["id"]


BAD_BODIES = [
    ("not json", b"{this is not json", "application/json"),
    ("empty body", b"", "application/json"),
    ("a list", b"[1, 2]", "application/json"),
    ("form data", b"messages=hi", "application/x-www-form-urlencoded"),
    ("no messages", b'{"model": "x"}', "application/json"),
    ("empty messages", b'{"messages": []}', "application/json"),
    ("unknown role", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "application/json"),
    ("ends with system", b'{"messages": [{"role": "system", "content": "hi"}]}',
     "application/json"),
    ("tool without its call id", b'{"messages": [{"role": "tool", "content": "42"}]}',
     "application/json"),
    ("blank prompt", b'{"messages": [{"role": "user", "content": "  "}]}', "application/json"),
    ("content not text", b'{"messages": [{"role": "user", "content": 42}]}', "application/json"),
    ("temperature 9", b'{"temperature": 9, "messages": [{"role": "user", "content": "x"}]}',
     "application/json"),
    ("n of 9", b'{"n": 9, "messages": [{"role": "user", "content": "x"}]}', "application/json"),
    ("bad utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "application/json"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "content_type"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_bad_bodies_get_a_clear_400(
    echo_web: str, case: str, body: bytes, content_type: str
) -> None:
    response = httpx.post(f"{echo_web}/v1/chat/completions", content=body,
                          headers={"content-type": content_type}, timeout=30)  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_an_oversized_prompt_is_refused_politely(echo_web: str) -> None:
    body = {"messages": [{"role": "user", "content": "x" * 6000}]}
    response = httpx.post(f"{echo_web}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert "limit is 5000" in response.json()["error"]["message"]


def test_health_and_readiness(echo_web: str) -> None:
    assert httpx.get(f"{echo_web}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{echo_web}/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] == "up"
    assert "echo@test" in ready.json()["workers"]


def test_not_ready_without_a_live_inference_worker(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_url(redis_server, DB_NO_WORKER), engine="echo")
    with TestClient(create_app(settings)) as web:
        response = web.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "redis": "up", "workers": []}


def test_an_api_key_when_configured_is_required(echo_worker: str) -> None:
    settings = Settings(redis_url=echo_worker, engine="echo", http_api_key="s3cret-of-16-chars")
    with TestClient(create_app(settings)) as web:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        assert web.post("/v1/chat/completions", json=body).status_code == 401
        wrong = web.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
        right = {"Authorization": "Bearer s3cret-of-16-chars"}
        assert web.get("/v1/models", headers=right).status_code == 200
        assert web.get("/healthz").status_code == 200


def test_redis_down_is_a_503_not_a_crash(unused_redis_url: str) -> None:
    settings = Settings(redis_url=unused_redis_url, engine="echo")
    with TestClient(create_app(settings)) as web:
        assert web.get("/readyz").status_code == 503
        body = {"messages": [{"role": "user", "content": "hi"}]}
        response = web.post("/v1/chat/completions", json=body)
        assert response.status_code == 503
        assert "unavailable" in response.json()["error"]["message"]


@pytest.fixture
def unused_redis_url() -> str:
    from gpt4people.redis_server import free_port

    return f"redis://127.0.0.1:{free_port()}/0"


def test_a_huge_body_is_refused_before_it_is_read(echo_web: str) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}'
    response = httpx.post(f"{echo_web}/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]["message"]


def metric_values(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{base}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_jobs_latency_tokens_and_queues(client: openai.OpenAI, echo_web: str) -> None:
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "count me in"}])

    def recorded() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        values = metric_values(echo_web)
        key = ("gpt4p_job_latency_seconds_count", (("channel", "http"),))
        return values if values.get(key, 0) >= 1 else None

    values = wait_for(recorded, 10, "the job's latency to be recorded")
    assert values[("gpt4p_jobs_received_total", (("channel", "http"),))] >= 1
    assert values[("gpt4p_tokens_generated_total", (("model", "echo"),))] >= 3
    assert values[("gpt4p_queue_depth", (("queue", "inference"),))] == 0
    assert ("gpt4p_time_to_first_token_seconds_count", (("engine", "echo"),)) in values
    assert any(name == "gpt4p_worker_tokens_per_second" for name, _ in values)
    assert any(name == "gpt4p_model_load_seconds" for name, _ in values)


def test_a_caller_chooses_how_soon_and_metrics_count_each_priority(
    client: openai.OpenAI, echo_web: str
) -> None:
    def by_priority() -> dict[str, float]:
        values = metric_values(echo_web)
        return {p: values.get(("gpt4p_jobs_by_priority_total", (("priority", p),)), 0.0)
                for p in ("interactive", "normal", "bulk")}  # fmt: skip

    before = by_priority()
    ask = [{"role": "user", "content": "how soon?"}]
    # The API's default, OpenAI's own service_tier ("flex": bulk), and our field; an open
    # API (no keys) may not ask to be interactive (it would pause everyone else's work).
    client.chat.completions.create(model="m", messages=ask)
    client.chat.completions.create(model="m", messages=ask, service_tier="flex")
    client.chat.completions.create(model="m", messages=ask,
                                   extra_body={"priority": "interactive"})  # fmt: skip
    after = by_priority()
    assert {p: after[p] - before[p] for p in after} == {"interactive": 0, "normal": 2, "bulk": 1}
    refused = httpx.post(f"{echo_web}/v1/chat/completions", timeout=30,
                         json={"messages": ask, "priority": "right now"})  # fmt: skip
    assert refused.status_code == 400 and "priority" in refused.text
