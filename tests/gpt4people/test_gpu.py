"""GPU pinning, testable without a GPU: the environment, queues and name a pinned worker gets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gpt4people.redis_server import RedisServer
from tests.conftest import (
    DB_GPU,
    DB_SCALE,
    ROOT,
    base_env,
    ping_worker,
    redis_url,
    run_cli,
    start_worker,
    stop_process,
    wait_for,
)


@pytest.fixture(scope="module")
def gpu_env(redis_server: RedisServer, state_dir: Path) -> dict[str, str]:
    return base_env(state_dir, redis_url=redis_url(redis_server, DB_GPU), engine="echo")


@pytest.fixture(scope="module")
def gpu1_worker(gpu_env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "worker", "--gpu", "1", "--hostname", "gpu1@test"],
        env=gpu_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    wait_for(lambda: ping_worker(gpu_env["GPT4P_REDIS_URL"], "gpu1@test"), 120, "gpu1 worker",
             every=0.5)  # fmt: skip
    yield process
    stop_process(process)


def test_a_pinned_worker_consumes_its_gpu_queue_and_the_shared_one(
    gpu1_worker: subprocess.Popen[bytes], gpu_env: dict[str, str]
) -> None:
    inspected = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "inspect", "active_queues",
         "-d", "gpu1@test", "--json"],
        env=gpu_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    queues = {q["name"] for q in json.loads(inspected.stdout)["gpu1@test"]}
    shared = {"inference", "inference.gpu1", "inference.model.echo"}
    assert queues == shared | {f"{queue}.interactive" for queue in shared}  # and fast lanes


def test_the_pinned_workers_processes_see_only_their_gpu(
    gpu1_worker: subprocess.Popen[bytes],
) -> None:
    family = [psutil.Process(gpu1_worker.pid), *psutil.Process(gpu1_worker.pid).children(True)]
    pool = [p for p in family if p.pid != gpu1_worker.pid]
    assert len(pool) == 1  # one inference at a time per GPU
    for process in family:
        environ = process.environ()
        assert environ["CUDA_VISIBLE_DEVICES"] == "1"
        assert environ["GPT4P_GPU"] == "1"  # offload every layer by default


def test_a_job_can_target_a_gpu(
    gpu1_worker: subprocess.Popen[bytes], gpu_env: dict[str, str]
) -> None:
    done = run_cli(["ask", "--json", "--gpu", "1", "on the GPU please"], gpu_env)
    assert json.loads(done.stdout)["worker"] == "gpu1@test"


def test_a_job_for_a_gpu_nobody_serves_fails_clearly(
    gpu1_worker: subprocess.Popen[bytes], gpu_env: dict[str, str]
) -> None:
    done = run_cli(["ask", "--gpu", "7", "--timeout", "2", "anyone?"], gpu_env)
    assert done.returncode == 4
    assert "is a worker consuming inference.gpu7?" in done.stderr


def test_all_gpus_without_any_says_so(gpu_env: dict[str, str]) -> None:
    env = dict(gpu_env, PATH="/usr/bin:/bin")  # no nvidia-smi on these machines
    done = run_cli(["worker", "--gpus", "all"], env, timeout=60)
    assert done.returncode == 2
    assert "no NVIDIA GPU found" in done.stderr


def test_two_workers_share_one_queue_and_both_answer(
    redis_server: RedisServer, state_dir: Path
) -> None:
    from kernel.contract import ChatMessage, Job
    from kernel.settings import Settings
    from workers.app import celery_for
    from workers.client import submit, wait_for_reply

    env = base_env(state_dir, redis_url=redis_url(redis_server, DB_SCALE), engine="echo")
    workers = [start_worker(env, "host-a@test"), start_worker(env, "host-b@test")]
    try:
        app = celery_for(Settings(redis_url=env["GPT4P_REDIS_URL"]))
        jobs = [
            Job(channel="cli", user="t", reply_to="cli",
                messages=[ChatMessage(role="user", content=f"job {i}")])
            for i in range(30)
        ]  # fmt: skip
        for job in jobs:
            submit(app, job)
        answered_by = [wait_for_reply(app, job.id, 60).worker for job in jobs]
    finally:
        for worker in workers:
            stop_process(worker)
    assert set(answered_by) == {"host-a@test", "host-b@test"}


def test_in_a_container_the_queue_gpu_and_the_cuda_device_can_differ(
    gpu_env: dict[str, str],
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "worker", "--gpu", "3", "--cuda-device", "0",
         "--hostname", "gpu3@test"],
        env=gpu_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: ping_worker(gpu_env["GPT4P_REDIS_URL"], "gpu3@test"), 120, "gpu3",
                 every=0.5)  # fmt: skip
        environ = psutil.Process(process.pid).environ()
        assert (environ["CUDA_VISIBLE_DEVICES"], environ["GPT4P_GPU"]) == ("0", "3")
    finally:
        stop_process(process)


def test_operators_can_add_a_queue_to_a_running_worker(
    gpu1_worker: subprocess.Popen[bytes], gpu_env: dict[str, str]
) -> None:
    def celery(*args: str) -> str:
        command = [sys.executable, "-m", "celery", "-A", "workers", *args]
        done = subprocess.run(command, env=gpu_env, cwd=ROOT, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    celery("control", "add_consumer", "inference.gpu9", "-d", "gpu1@test")
    queues = json.loads(celery("inspect", "active_queues", "-d", "gpu1@test", "--json"))
    assert "inference.gpu9" in {q["name"] for q in queues["gpu1@test"]}
    celery("control", "cancel_consumer", "inference.gpu9", "-d", "gpu1@test")
    queues = json.loads(celery("inspect", "active_queues", "-d", "gpu1@test", "--json"))
    assert "inference.gpu9" not in {q["name"] for q in queues["gpu1@test"]}
    stats = json.loads(celery("inspect", "stats", "-d", "gpu1@test", "--json"))
    assert stats["gpu1@test"]["pool"]["max-concurrency"] == 1
