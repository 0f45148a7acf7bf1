"""The helper stack: a scripted inference worker, built-in and sample helpers, the web app."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gpt4people.redis_server import RedisServer, free_port
from kernel.helper_registry import HelperRegistry
from tests.conftest import (
    DB_HELPERS,
    ROOT,
    base_env,
    redis_url,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)

HELPER_TTL = 3.0
SAMPLES = {
    "boom": "tests.helpers.sample_helpers:boom",
    "slow": "tests.helpers.sample_helpers:slow",
    "ghost": "tests.helpers.sample_helpers:ghost",
    "shout": "tests.helpers.shout",
}


@pytest.fixture(scope="session")
def helper_env(redis_server: RedisServer, state_dir: Path) -> dict[str, str]:
    """Settings: the scripted engine with tools offered, a short helper TTL."""
    return base_env(state_dir, redis_url=redis_url(redis_server, DB_HELPERS), engine="scripted",
                    model_tools="true", helper_ttl=str(HELPER_TTL))  # fmt: skip


def start_helper(
    env: dict[str, str], name: str, target: str, host: str = "test"
) -> subprocess.Popen[bytes]:
    """Start `gpt4people helper TARGET` as NAME@HOST, one process (its log is in the state
    folder)."""
    log = open(Path(env["GPT4P_STATE_DIR"]) / f"helper-{name}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "helper", target, "--hostname", f"{name}@{host}",
         "--concurrency", "1"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def registry(helper_env: dict[str, str]) -> Iterator[HelperRegistry]:
    client = redis.Redis.from_url(helper_env["GPT4P_REDIS_URL"])
    yield HelperRegistry(client, ttl=HELPER_TTL)
    client.close()


@pytest.fixture(scope="session")
def helper_stack(
    helper_env: dict[str, str], registry: HelperRegistry
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Every helper running and registered, plus the inference worker."""
    targets = {"calc": "calc", "image": "image", "time": "time", **SAMPLES}
    processes = {name: start_helper(helper_env, name, t) for name, t in targets.items()}
    processes["inference"] = start_worker(helper_env, "scripted@test")

    def all_live() -> bool:
        return {h.name for h in registry.live()} >= set(targets)

    try:
        wait_for(all_live, 90, "every helper to register", every=0.2)
        yield processes
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            stop_process(process)


@pytest.fixture(scope="session")
def helper_web(helper_stack: object, helper_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    process = start_web(helper_env, port)
    yield f"http://127.0.0.1:{port}"
    stop_process(process)
