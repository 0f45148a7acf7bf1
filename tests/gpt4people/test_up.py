"""`gpt4people up`: the whole stack on embedded defaults, stopped cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from gpt4people.redis_server import free_port
from tests.conftest import ROOT, base_env, run_cli, wait_for


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_starts_everything_and_stops_leaving_nothing(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    http_port, flower_port = free_port(), free_port()
    # No GPT4P_REDIS_URL: `up` starts its own Redis and the other commands find it.
    env = base_env(tmp_path, engine="echo", http_port=str(http_port),
                   flower_port=str(flower_port))  # fmt: skip
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "up", "--workers", "1"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200, 60, "web app")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=1).is_success, 60,
                 "Flower")  # fmt: skip
        assert (tmp_path / "redis.url").exists()

        done = wait_for(lambda: (d := run_cli(["ask", "--timeout", "5", "are you up?"], env))
                        .returncode == 0 and d, 90, "an answer from `ask`")  # fmt: skip
        assert done.stdout.strip() == "are you up?"
        ping = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workers", "inspect", "ping"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "pong" in ping.stdout, ping.stdout + ping.stderr

        def helpers_live() -> bool:
            listed = json.loads(run_cli(["helpers", "--json"], env).stdout)
            return {h["name"] for h in listed if h["live"]} >= {"calc", "image", "time"}

        wait_for(helpers_live, 60, "the built-in helpers to be live", every=0.5)
        calc = run_cli(["ask", "--timeout", "30", "/calc (2+3)*4 - 2**3"], env)
        assert calc.stdout.strip() == "12"
        second = run_cli(["up"], env, timeout=60)
        assert second.returncode == 2
        assert "already running" in second.stderr

        family = [up.pid] + [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        assert len(family) >= 5  # up, redis, worker (+ pool), web, flower

        up.send_signal(stop_signal)
        assert up.wait(30) == 0
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                                 psutil.STATUS_ZOMBIE for p in family), 5,
                 "every process of the stack to be gone")  # fmt: skip
        assert not (tmp_path / "redis.url").exists()
        assert (tmp_path / "redis" / "appendonly.aof").exists() or any(
            (tmp_path / "redis").glob("appendonly*")
        )
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert "gpt4people is up" in output
    assert f"http://127.0.0.1:{http_port}/v1/chat/completions" in output
    assert_one_console(output, stopped=["web", "flower", "worker1", "deliver", "helper-calc",
                                        "helper-image", "helper-time", "redis"])  # fmt: skip


def assert_one_console(output: str, stopped: list[str]) -> None:
    """Piped, `up` prints one stream of JSON lines, each naming its process; no Celery
    banner, no wall of warnings; at the end, what it stopped."""
    entries = [json.loads(line) for line in output.splitlines()]  # every line is JSON
    services = {entry["service"] for entry in entries}
    assert {"up", "web", "worker1", "deliver", "helper-calc", "flower"} <= services, services
    assert any(e["service"] == "web" and e.get("logger", "").startswith("uvicorn")
               for e in entries)  # fmt: skip  # uvicorn's lines in our format too
    messages = [f"{entry['service']}: {entry['msg']}" for entry in entries]
    assert not [m for m in messages if "[queues]" in m or "-------------- " in m]  # banner
    assert not [m for m in messages if "SecurityWarning" in m or "superuser" in m]
    if os.geteuid() == 0:
        assert sum("running as root" in m for m in messages) == 1
    for name in stopped:
        assert any(m.startswith(f"up: stopped {name} (pid ") for m in messages), name
    assert messages[-1] == "up: gpt4people: stopped"


def test_up_with_zero_workers_still_serves_health(tmp_path: Path) -> None:
    http_port = free_port()
    env = base_env(tmp_path, engine="echo", http_port=str(http_port),
                   flower_port=str(free_port()))  # fmt: skip
    up = subprocess.Popen([sys.executable, "-m", "gpt4people.cli", "up", "--workers", "0"],
                          env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
                 .status_code == 200, 60, "web app")  # fmt: skip
        assert run_cli(["status", "--json"], env).returncode == 0
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
    assert not os.path.exists(tmp_path / "redis.url")


def test_up_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(tmp_path, engine="echo", http_port=str(port),
                       flower_port=str(free_port()))  # fmt: skip
        done = run_cli(["up", "--workers", "0"], env, timeout=60)
    assert done.returncode == 2
    assert f"port {port} is already in use: set GPT4P_HTTP_PORT" in done.stderr
    assert not (tmp_path / "redis.url").exists()
