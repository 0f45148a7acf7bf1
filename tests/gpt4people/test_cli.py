"""`gpt4people ask` and `status` as a user runs them, against real Redis and workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt4people.redis_server import RedisServer, free_port
from kernel.contract import ChatMessage, Job
from kernel.settings import Settings
from tests.conftest import DB_NO_WORKER, base_env, redis_url, run_cli
from workers.app import celery_for
from workers.client import submit


def test_ask_goes_through_the_queue_and_prints_the_reply(echo_env: dict[str, str],
                                                         echo_worker: str) -> None:  # fmt: skip
    done = run_cli(["ask", "Is anybody out there?"], echo_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Is anybody out there?"


def test_ask_json_shows_who_answered(echo_env: dict[str, str], echo_worker: str) -> None:
    done = run_cli(["ask", "--json", "hello"], echo_env)
    reply = json.loads(done.stdout)
    assert reply["text"] == "hello"
    assert reply["worker"] == "echo@test"
    assert reply["channel"] == "cli"


def test_ask_reads_the_prompt_from_stdin(echo_env: dict[str, str], echo_worker: str) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "gpt4people.cli", "ask", "-"], input="from a pipe\n",
        env=echo_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.strip() == "from a pipe"


def test_ask_against_a_stopped_redis_fails_clearly(state_dir: Path) -> None:
    env = base_env(state_dir, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    done = run_cli(["ask", "hello"], env, timeout=60)
    assert done.returncode == 3
    assert "unreachable" in done.stderr
    assert "gpt4people up" in done.stderr
    assert "Traceback" not in done.stderr


def test_ask_with_no_worker_times_out_clearly(redis_server: RedisServer, state_dir: Path) -> None:
    env = base_env(state_dir, redis_url=redis_url(redis_server, DB_NO_WORKER))
    done = run_cli(["ask", "--timeout", "1", "hello"], env, timeout=60)
    assert done.returncode == 4
    assert "no worker answered within 1s" in done.stderr
    assert "Traceback" not in done.stderr


def test_ask_refuses_an_empty_prompt(echo_env: dict[str, str]) -> None:
    done = run_cli(["ask", "  "], echo_env, timeout=60)
    assert done.returncode == 2
    assert "nothing to ask" in done.stderr


def test_status_shows_redis_workers_queues_and_model(echo_env: dict[str, str],
                                                     echo_worker: str) -> None:  # fmt: skip
    done = run_cli(["status", "--json"], echo_env)
    report = json.loads(done.stdout)
    assert report["redis"]["up"] is True
    # Each queue and its fast lane (interactive jobs).
    assert report["workers"]["echo@test"]["queues"] == [
        "inference", "inference.interactive", "inference.model.echo",
        "inference.model.echo.interactive",
    ]  # fmt: skip
    assert report["queues"]["inference"] == 0
    assert report["model"] == "echo"
    assert report["channels"]["sms"]["queue"] == "deliver.sms"  # every registered channel
    assert report["channels"]["sms"]["waiting"] == 0
    text = run_cli(["status"], echo_env).stdout
    assert "echo@test" in text and "inference" in text
    assert "\nchannels\n" in text and "POST /sms" in text


def test_status_with_redis_down_says_so(state_dir: Path) -> None:
    env = base_env(state_dir, redis_url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    done = run_cli(["status"], env, timeout=60)
    assert done.returncode == 3
    assert "DOWN" in done.stdout
    assert "hunter2" not in done.stdout  # the password is never printed


def test_status_job_says_where_a_job_is(
    echo_env: dict[str, str], echo_worker: str, redis_server: RedisServer, state_dir: Path
) -> None:
    answered = json.loads(run_cli(["ask", "--json", "where am I"], echo_env).stdout)["job_id"]
    done = run_cli(["status", "--job", answered, "--job", "no-such-job"], echo_env)
    assert done.returncode == 0, done.stderr
    mine, unknown = done.stdout.strip().splitlines()
    assert mine.startswith(f"{answered}: inference: result SUCCESS")
    assert unknown == "no-such-job: inference: unknown to Redis | delivery: unknown to Redis"
    # With no worker, a job waits in its queue, ledgered until it has run.
    url = redis_url(redis_server, DB_NO_WORKER)
    app = celery_for(Settings(redis_url=url))
    job = Job(channel="cli", user="tester", reply_to="cli",
              messages=[ChatMessage(role="user", content="anyone?")])  # fmt: skip
    submit(app, job)
    app.close()
    done = run_cli(["status", "--json", "--job", job.id], base_env(state_dir, redis_url=url))
    where = json.loads(done.stdout)[job.id]["inference"]
    assert where["queued_in"] == ["inference.interactive"]  # a cli job is interactive
    assert where["ledgered_s"] is not None and where["result"] is None
    assert "anyone?" not in done.stdout  # whereabouts, never the conversation


@pytest.mark.model
def test_ask_is_answered_by_the_real_model(model_env: dict[str, str], model_worker: str) -> None:
    done = run_cli(["ask", "--json", "--seed", "3", "What is the capital of France?"], model_env)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["engine"] == "llama"
    assert reply["model"] == "smollm2-135m-instruct"
    assert reply["text"].strip()
    assert reply["completion_tokens"] > 0


@pytest.mark.model
def test_the_model_is_loaded_once_per_worker_not_per_job(
    model_env: dict[str, str], model_worker: str, state_dir: Path
) -> None:
    for question in ("Name a colour.", "Name a fruit."):
        assert run_cli(["ask", "--max-tokens", "8", question], model_env).returncode == 0
    loads = [json.loads(line) for line in (state_dir / "model@test.log").read_text().splitlines()
             if "model loaded:" in line]  # fmt: skip
    assert len(loads) == 1
    # Batched (the default): one engine in the worker process, shared by its task threads.
    assert loads[0]["process"] == "MainProcess"
    assert "batched: 8 slots + 2 for interactive jobs" in loads[0]["msg"]


def test_prompts_and_replies_stay_out_of_the_worker_log(
    echo_env: dict[str, str], echo_worker: str, state_dir: Path
) -> None:
    secret = "my-bank-pin-is-4921"
    done = run_cli(["ask", "--json", secret], echo_env)
    job_id = json.loads(done.stdout)["job_id"]
    log = state_dir / "echo@test.log"

    def logged() -> bool:
        return job_id in log.read_text() and "succeeded" in log.read_text()

    from tests.conftest import wait_for

    wait_for(logged, 10, "the worker to log the job")
    assert secret not in log.read_text()


def test_a_model_that_cannot_load_stops_the_worker_instead_of_looping(
    tmp_path: Path, redis_server: RedisServer, state_dir: Path
) -> None:
    import subprocess
    import sys

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))  # right magic, nothing loadable behind it
    env = base_env(state_dir, redis_url=redis_url(redis_server, DB_NO_WORKER),
                   model_path=str(broken))  # fmt: skip
    worker = subprocess.Popen([sys.executable, "-m", "gpt4people.cli", "worker"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        output, _ = worker.communicate(timeout=90)
    finally:
        worker.kill()
    assert "cannot load the model" in output.decode()


def test_worker_logs_are_json_lines_carrying_the_job_id(
    echo_env: dict[str, str], echo_worker: str, state_dir: Path
) -> None:
    from tests.conftest import wait_for

    job_id = json.loads(run_cli(["ask", "--json", "trace me"], echo_env).stdout)["job_id"]
    log = state_dir / "echo@test.log"

    def job_lines() -> list[dict[str, str]]:
        entries = []
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return [e for e in entries if e.get("job_id") == job_id]

    lines = wait_for(job_lines, 10, "log lines with the job id")
    assert any("answered" in e["msg"] for e in lines)
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in lines)
