"""Two models on one deployment: the request's `model` picks the workers serving it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gpt4people.redis_server import RedisServer, free_port
from tests.conftest import (
    DB_MODELS,
    base_env,
    redis_url,
    run_cli,
    start_web,
    start_worker,
    stop_process,
)


@pytest.fixture(scope="module")
def two_models(redis_server: RedisServer, state_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    url = redis_url(redis_server, DB_MODELS)
    echo_env = base_env(state_dir, redis_url=url, engine="echo")
    scripted_env = base_env(state_dir, redis_url=url, engine="scripted")
    processes = [start_worker(echo_env, "echo-model@test"),
                 start_worker(scripted_env, "scripted-model@test")]  # fmt: skip
    port = free_port()
    processes.append(start_web(echo_env, port))
    yield f"http://127.0.0.1:{port}", echo_env
    for process in processes:
        stop_process(process)


def test_the_model_named_in_the_request_answers(two_models: tuple[str, dict[str, str]]) -> None:
    base, _ = two_models
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", timeout=30, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["echo", "scripted"]
    for model in ("scripted", "echo") * 3:
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "who answers?"}]
        )
        assert completion.model == model
    # A name this deployment does not serve (as clients written for others send) still works.
    other = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "anyone?"}]
    )
    assert other.model in {"echo", "scripted"}


def test_ask_can_name_a_model(two_models: tuple[str, dict[str, str]]) -> None:
    _, env = two_models
    import json

    for model in ("scripted", "echo"):
        done = run_cli(["ask", "--json", "--model", model, "which one?"], env)
        assert json.loads(done.stdout)["model"] == model
