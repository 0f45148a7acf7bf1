"""The operator's side (findings 5, 7 and 13): Flower, the embedded Redis, printed secrets.

Each test runs `gpt4people` as an operator would: `up` in the foreground with
its own Redis, `status` against URLs that carry a password. What is asserted is
what another user of the machine, or someone on the network, would notice:
which address Flower answers on, whether Redis lets them in, whether files can
be read, whether a password shows in the output or in `ps`.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import redis

from gpt4people.redis_server import RedisServer, free_port
from tests.conftest import ROOT, base_env, redis_url, run_cli, wait_for
from tests.security.conftest import DB_SEC_OPS

FLOWER_LOGIN = "operator:a-long-flower-password-42"
REFUSAL_WAIT_S = 60  # an `up` that refuses exits before starting anything


@dataclass
class Stack:
    """One running `gpt4people up` and where to find its parts."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    state: Path
    log: Path
    http_port: int
    flower_port: int

    def family(self) -> list[psutil.Process]:
        """`up` and every process it started."""
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def redis_url(self) -> str:
        """The URL `up` wrote for the other commands (with the password, if any)."""
        return (self.state / "redis.url").read_text(encoding="utf-8").split()[0]


def start_up(tmp: Path, workers: int, **settings: str) -> Stack:
    """`gpt4people up` with its own Redis in a state folder that does not exist yet."""
    http_port, flower_port = free_port(), free_port()
    state = tmp / "state"  # `up` creates it: its mode is up's choice, not pytest's
    env = base_env(state, engine="echo", http_port=str(http_port),
                   flower_port=str(flower_port), **settings)  # fmt: skip
    log = tmp / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpt4people.cli", "up", "--workers", str(workers)],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    stack = Stack(process, env, state, log, http_port, flower_port)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
                 .status_code == 200, 90, "the web app of `up`", every=0.2)  # fmt: skip
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{flower_port}/healthcheck", timeout=1)
                 .status_code == 200, 90, "Flower of `up`", every=0.2)  # fmt: skip
    except BaseException:
        stop_up(stack)
        raise
    return stack


def stop_up(stack: Stack) -> None:
    """Ctrl-C, as an operator stops it; `up` stops its children itself."""
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGINT)
        try:
            stack.process.wait(60)
        except subprocess.TimeoutExpired:
            stack.process.kill()
            stack.process.wait(10)


def up_refusal(tmp: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run `up` that should refuse to start; stop it (and fail) if it starts after all."""
    env = base_env(tmp / "state", engine="echo", http_port=str(free_port()),
                   flower_port=str(free_port()), **settings)  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "up", "--workers", "0"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=REFUSAL_WAIT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
        pytest.fail(f"`up` with {sorted(settings)} started instead of refusing")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def listening_addresses(port: int) -> set[str]:
    """The local addresses something listens on at TCP `port` (read from the kernel)."""
    return {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    }


@pytest.fixture(scope="module")
def public_web_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`up` with the web app on every address, as the README suggests for webhooks."""
    stack = start_up(tmp_path_factory.mktemp("ops-up"), workers=1, http_host="0.0.0.0")
    yield stack
    stop_up(stack)


@pytest.fixture(scope="module")
def public_flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`up` with Flower on every address, with a login."""
    stack = start_up(tmp_path_factory.mktemp("ops-flower"), workers=0,
                     flower_host="0.0.0.0", flower_basic_auth=FLOWER_LOGIN)  # fmt: skip
    yield stack
    stop_up(stack)


# --- finding 5: Flower ---------------------------------------------------------------


def test_flower_stays_on_loopback_when_the_web_app_faces_the_network(
    public_web_stack: Stack,
) -> None:
    assert listening_addresses(public_web_stack.http_port) == {"0.0.0.0"}
    assert listening_addresses(public_web_stack.flower_port) == {"127.0.0.1"}
    banner = public_web_stack.log.read_text()
    assert f"Flower           http://127.0.0.1:{public_web_stack.flower_port}/" in banner
    # A web app facing the network without an API key is said out loud.
    assert "listens on 0.0.0.0 (GPT4P_HTTP_HOST) without GPT4P_HTTP_API_KEY" in banner


def test_up_refuses_a_public_flower_without_a_login(tmp_path: Path) -> None:
    done = up_refusal(tmp_path, flower_host="0.0.0.0")
    assert done.returncode == 2
    assert "GPT4P_FLOWER_BASIC_AUTH" in done.stderr
    assert "GPT4P_FLOWER_HOST" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state" / "redis.url").exists()  # nothing was started


@pytest.mark.parametrize(
    "login",
    ["admin:change-me-too", "admin:short-pw1", "admin:change-me"],
    ids=["the-example-password", "eleven-characters", "the-redis-example"],
)
def test_up_refuses_the_example_password_and_short_ones(tmp_path: Path, login: str) -> None:
    done = up_refusal(tmp_path, flower_host="0.0.0.0", flower_basic_auth=login)
    assert done.returncode == 2
    assert "GPT4P_FLOWER_BASIC_AUTH" in done.stderr
    assert login.split(":")[1] not in done.stdout + done.stderr
    assert not (tmp_path / "state" / "redis.url").exists()


def test_a_public_flower_asks_for_the_login_that_no_command_line_shows(
    public_flower_stack: Stack,
) -> None:
    flower = f"http://127.0.0.1:{public_flower_stack.flower_port}"
    assert listening_addresses(public_flower_stack.flower_port) == {"0.0.0.0"}
    for path in ("/", "/api/workers", "/api/tasks"):
        assert httpx.get(f"{flower}{path}", timeout=5).status_code == 401, path
    user, password = FLOWER_LOGIN.split(":")
    assert httpx.get(f"{flower}/api/workers", auth=(user, password), timeout=5).is_success
    assert httpx.get(f"{flower}/api/workers", auth=(user, "wrong"), timeout=5).status_code == 401
    # Every local user can read every process's command line (`ps`).
    for process in public_flower_stack.family():
        assert password not in " ".join(process.cmdline()), process.name()
    assert password not in public_flower_stack.log.read_text()


# --- finding 7: the embedded Redis ---------------------------------------------------


def test_the_embedded_redis_refuses_a_client_without_the_password(
    public_web_stack: Stack,
) -> None:
    address = urlsplit(public_web_stack.redis_url())
    stranger = redis.Redis(host=address.hostname or "", port=address.port or 0,
                           socket_timeout=5)  # fmt: skip
    with pytest.raises(redis.AuthenticationError, match=r"(?i)auth"):
        stranger.ping()
    with pytest.raises(redis.AuthenticationError):
        stranger.lpush("inference", b"{}")  # no task injected either
    stranger.close()
    assert address.password  # the URL the other commands read carries it


def test_the_state_is_for_this_user_only(public_web_stack: Stack) -> None:
    state = public_web_stack.state
    data = state / "redis"
    # A written job reaches the append-only file before the modes are read.
    assert run_cli(["ask", "--timeout", "30", "write something"], public_web_stack.env)\
        .returncode == 0  # fmt: skip
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "redis.url").stat().st_mode) == 0o600
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name.startswith("appendonly") for p in files), files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is {path.stat().st_mode:o}"
    for folder in (p for p in data.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0, folder


def test_the_children_of_up_still_reach_redis(public_web_stack: Stack) -> None:
    done = run_cli(["ask", "--timeout", "30", "are you there?"], public_web_stack.env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "are you there?"
    status = run_cli(["status", "--json"], public_web_stack.env)
    report = json.loads(status.stdout)
    assert report["redis"]["up"]
    assert any(name.startswith("worker1@") for name in report["workers"])


# --- finding 13: secrets printed ------------------------------------------------------


def test_neither_up_nor_status_prints_the_embedded_password(public_web_stack: Stack) -> None:
    password = urlsplit(public_web_stack.redis_url()).password or ""
    assert len(password) >= 16
    for args in (["status", "--json"], ["status"]):
        done = run_cli(args, public_web_stack.env)
        assert done.returncode == 0, done.stderr
        assert password not in done.stdout + done.stderr
        assert "***" in done.stdout
    assert password not in public_web_stack.log.read_text()


def _forms(server: RedisServer) -> list[tuple[str, tuple[str, ...], bool]]:
    """(URL, the secret as it could be printed, reachable) for each way of writing a Redis
    password; an encoded one must appear neither decoded nor as written."""
    pw, host, db = server.password or "", f"{server.host}:{server.port}", DB_SEC_OPS
    dead = f"127.0.0.1:{free_port()}"
    odd = "S3cret@PW;x/y?z"  # needs percent-encoding in a URL
    encoded = "S3cret%40PW%3Bx%2Fy%3Fz"
    return [
        (f"redis://:{pw}@{host}/{db}", (pw,), True),
        (f"redis://default:{pw}@{host}/{db}", (pw,), True),
        (f"redis://{host}/{db}?password={pw}", (pw,), True),
        (f"redis://{dead}/{db}?socket_timeout=5&password={pw}", (pw,), False),
        (f"redis://{host}/{db}?pass%77ord={pw}", (pw,), True),  # redis-py decodes the name
        (f"redis://{dead}/{db}?pass%77ord={pw}", (pw,), False),
        (f"rediss://default:{encoded}@{dead}/{db}", (odd, encoded), False),
        (f"redis://{dead}/{db}?password={encoded}", (odd, encoded), False),
        (f"sentinel://:{encoded}@{dead}/{db};sentinel://:{encoded}@{dead}", (odd, encoded), False),
    ]


@pytest.mark.parametrize("form", range(9))
def test_status_prints_no_password_in_any_form(
    redis_server: RedisServer, tmp_path: Path, form: int
) -> None:
    url, secrets, reachable = _forms(redis_server)[form]
    # Sentinels have a password of their own, in a variable of its own.
    sentinel = {"redis_sentinel_password": secrets[0]} if url.startswith("sentinel") else {}
    env = base_env(tmp_path, redis_url=url, **sentinel)
    outputs = []
    for args in (["status", "--json", "--timeout", "0.5"], ["status", "--timeout", "0.5"]):
        done = run_cli(args, env, timeout=60)
        outputs.append(done.stdout)
        for secret in secrets:
            assert secret not in done.stdout + done.stderr, (args, done.stdout + done.stderr)
        assert "Traceback" not in done.stderr
        assert done.returncode == (0 if reachable else 3), done.stderr
    report = json.loads(outputs[0])
    assert report["redis"]["up"] is reachable
    assert "***" in report["redis"]["url"]


def test_the_shared_test_redis_wants_its_password(redis_server: RedisServer) -> None:
    address = urlsplit(redis_url(redis_server, DB_SEC_OPS))
    stranger = redis.Redis(host=address.hostname or "", port=address.port or 0, db=DB_SEC_OPS)
    with pytest.raises(redis.AuthenticationError):
        stranger.ping()
    stranger.close()
    with redis.Redis.from_url(redis_url(redis_server, DB_SEC_OPS)) as client:
        assert client.ping()


def test_a_cli_error_masks_the_url_it_quotes(tmp_path: Path) -> None:
    secret = "An0ther-S3cret-PW"
    env = base_env(tmp_path, redis_url=f"redis://:{secret}@127.0.0.1:{free_port()}/0")
    done = run_cli(["helpers"], env, timeout=60)
    assert done.returncode == 3
    assert "unreachable" in done.stderr
    assert secret not in done.stdout + done.stderr
