"""Flower shows the workers and finished tasks to a real browser, without message content."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpt4people.redis_server import free_port
from tests.conftest import ROOT, run_cli, stop_process, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def flower(echo_worker: str, echo_env: dict[str, str]) -> Iterator[str]:
    """Flower on a free port, watching the echo worker's Redis."""
    port = free_port()
    # The test polls Flower's JSON API to know when the task is in; the page itself
    # is then read in the browser.
    env = dict(echo_env, FLOWER_UNAUTHENTICATED_API="true")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200, 60,
                 "Flower to start", every=0.2)  # fmt: skip
        yield base
    finally:
        stop_process(process)


def page_in_browser(url: str) -> str:
    """The DOM of `url` after headless Chromium ran its scripts."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError("chromium is not installed: run `make install`")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_flower_shows_the_worker_and_a_finished_task_in_a_browser(
    flower: str, echo_env: dict[str, str]
) -> None:
    secret = "a very private question"
    reply = json.loads(run_cli(["ask", "--json", secret], echo_env).stdout)

    def task_seen() -> bool:
        tasks = httpx.get(f"{flower}/api/tasks", timeout=5).json()
        return tasks.get(reply["job_id"], {}).get("state") == "SUCCESS"

    wait_for(task_seen, 30, "Flower to see the finished task", every=0.5)
    workers_page = page_in_browser(f"{flower}/workers")
    assert "echo@test" in workers_page
    tasks_page = page_in_browser(f"{flower}/tasks")
    assert reply["job_id"] in tasks_page
    assert "gpt4people.inference" in tasks_page
    assert "SUCCESS" in tasks_page
    task_page = page_in_browser(f"{flower}/task/{reply['job_id']}")
    # Arguments and result are shown as summaries: readable, without the message.
    assert f"&lt;job {reply['job_id']} via cli, 1 message(s)&gt;" in task_page
    assert "{, ...}" in task_page
    for page in (tasks_page, task_page):
        assert secret not in page
