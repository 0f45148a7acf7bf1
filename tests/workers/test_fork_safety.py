"""A pool process forked while another thread of its parent is talking to Redis still works.

Prefork workers (unbatched inference, delivery, helpers) fork a new pool process
whenever one dies. The parent keeps threads (heartbeats, recovery) that use the
process's Redis client; a fork in the instant one of them holds the client's
pool lock used to leave the child waiting for that lock forever (a replacement
pool process hung before its first job, and every job sent to the worker
waited with it).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from gpt4people.redis_server import RedisServer
from tests.conftest import DB_NO_WORKER, ROOT, base_env, redis_url

CHILD_DEADLINE_S = 20

SCRIPT = textwrap.dedent(f"""
    import os, signal, sys, threading, time
    from workers.app import broker_redis

    client = broker_redis()
    client.ping()
    # A parent thread caught mid-command: it holds the pool's lock across the fork.
    held, release = threading.Event(), threading.Event()

    def busy_thread():
        with client.connection_pool._lock:
            held.set()
            release.wait()

    threading.Thread(target=busy_thread, daemon=True).start()
    held.wait()
    pid = os.fork()
    if pid == 0:  # the new pool process: its first job needs Redis
        try:
            broker_redis().set("fork-safety", str(os.getpid()))
            os._exit(0)
        except BaseException:
            os._exit(3)
    release.set()
    deadline = time.monotonic() + {CHILD_DEADLINE_S}
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    sys.exit("the forked process never got through to Redis")
""")


def test_a_process_forked_while_a_thread_holds_the_redis_client_can_use_redis(
    redis_server: RedisServer, state_dir: Path
) -> None:
    env = base_env(state_dir, redis_url=redis_url(redis_server, DB_NO_WORKER))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=CHILD_DEADLINE_S + 30)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
