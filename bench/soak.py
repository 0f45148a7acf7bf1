"""Soak: the whole stack under mixed traffic for N minutes while its processes are killed.

Starts, each a real process in a session of its own with a temporary state
folder: Redis (append-only, so it survives SIGKILL), `--workers` inference
workers with the bundled model, the delivery worker, the calc and time helpers,
the web app and the mailbox poller. Twilio's REST API is the tests' recorder;
mail comes in through dovecot and goes out to an aiosmtpd sink. Then it sends
about `--rate` messages a minute, mixed: SMS (each from a number of its own),
email, HTTP chat completions streamed and not, and helper calls (`/calc`,
`/time`) by SMS and HTTP. Every `--kill-every` seconds (±30%) it SIGKILLs the
process group of one of: an inference worker, the delivery worker, Redis. Like
Compose's restart policy, a process that dies (killed or on its own) is started
again: workers after 1 s, Redis after 2 s on the same port and data.

At the end it stops sending, waits up to `--grace` seconds for stragglers and
`--linger` more for answers sent twice, then prints, per route: sent, accepted,
answered, lost (accepted, never answered), doubled (answered more than once),
refused (an HTTP error the client saw while its job was not known to be queued:
a plain request's 503/504, a stream's error before its first chunk), failed (a
stream's error after it), p50/p99 latency; each kill and how soon answers came
after it; each process's memory (RSS with its children) at start and end;
Redis memory; queue depths and the ledger.
Writes bench/results/soak.json (every record, no message content).

    python -m bench.soak [--minutes 5] [--kill-every 120] [--rate 20] [--workers 2] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import redis

from bench.soak_traffic import (
    EMAIL_FROM,
    Clock,
    Inbox,
    Record,
    Sender,
    peers,
    report,
    send_traffic,
    settled,
)
from gpt4people.redis_server import RedisServer, free_port
from gpt4people.status import queue_depths
from kernel.keys import LEDGER_KEY, UNACKED_KEY
from kernel.redis_client import redis_client
from tests.channels.mail_servers import DOVECOT
from tests.channels.twilio_recorder import OUR_NUMBER
from tests.conftest import base_env, ping_worker, stop_process

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
START_TIMEOUT_S = 300.0  # two workers loading the model on a busy 2-core machine
JOB_TIMEOUT_S = 150  # what the web app waits for an answer; the HTTP client waits longer


class SoakError(RuntimeError):
    """The soak cannot go on; the message says which process and where its log is."""


@dataclass
class Service:
    """One process of the stack, started again when it dies (as a supervisor would)."""

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    log: Path
    restart_after: float = 1.0
    process: subprocess.Popen[bytes] | None = None
    killed: bool = False  # by the soak (not on its own) since its last start
    down_since: float | None = None
    kills: int = 0
    exits: list[int] = field(default_factory=list)  # exit statuses when it died on its own

    def start(self) -> None:
        """Start it (again)."""
        self.process, self.killed, self.down_since = self.launch(), False, None

    def alive(self) -> bool:
        """Whether it runs."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> bool:
        """SIGKILL its whole process group, as a crash or the OOM killer would (False: it
        was not running)."""
        if not self.alive():
            return False
        assert self.process is not None
        self.killed, self.kills = True, self.kills + 1
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return True

    def rss(self) -> int:
        """Resident memory of the process and its children, in bytes."""
        if not self.alive():
            return 0
        assert self.process is not None
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        return 0


def _cli(state: Path, env: dict[str, str], name: str, *args: str) -> Service:
    """A `python -m ...` process logging (appending, across restarts) to STATE/NAME.log."""
    log = state / f"{name}.log"

    def launch() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            out.write(f"--- soak: started {time.strftime('%H:%M:%S')} ---\n".encode())
            out.flush()
            return subprocess.Popen([PYTHON, "-m", *args], env=env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    return Service(name, launch, log)


class Stack:
    """Every process of the soak, supervised by a thread that restarts the dead."""

    def __init__(self, state: Path, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.state, self.env, self.clock = state, env, Clock()
        self.events: list[dict[str, Any]] = []
        self.port = int(env["GPT4P_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        self.web_port = free_port()
        redis_dir = state / "redis"
        self.services: dict[str, Service] = {
            "redis": Service("redis", lambda: self._redis(redis_dir), redis_dir / "redis.log", 2.0)
        }
        for i in range(1, args.workers + 1):
            self._add(
                f"soak-w{i}@bench", "gpt4people.cli", "worker", "--hostname", f"soak-w{i}@bench"
            )
        self._add(
            "soak-deliver@bench", "gpt4people.cli", "deliver", "--hostname", "soak-deliver@bench"
        )
        for helper in ("calc", "time"):
            self._add(f"soak-{helper}@bench", "gpt4people.cli", "helper", helper, "--hostname",
                      f"soak-{helper}@bench", "--concurrency", "1")  # fmt: skip
        self._add("web", "uvicorn", "channels.web:create_app", "--factory", "--host",
                  "127.0.0.1", "--port", str(self.web_port), "--no-access-log")  # fmt: skip
        if "GPT4P_IMAP_HOST" in env:
            self._add("email", "gpt4people.cli", "email")
        self.stopping = threading.Event()
        self.calm = threading.Event()  # no more kills: the traffic stopped
        self.lock = threading.Lock()  # no restart while the stack is being stopped

    def _add(self, name: str, *args: str) -> None:
        self.services[name] = _cli(self.state, self.env, name, *args)

    def _redis(self, data_dir: Path) -> subprocess.Popen[bytes]:
        process = RedisServer(data_dir, port=self.port).start().process
        assert process is not None
        return process

    @property
    def workers(self) -> list[str]:
        """Names of the inference workers."""
        return [name for name in self.services if name.startswith("soak-w")]

    def start(self) -> None:
        """Start every process and wait until each is ready, failing with its log's path."""
        for service in self.services.values():
            try:
                service.start()
            except Exception as error:
                raise SoakError(
                    f"{service.name} cannot start ({error}); see {service.log}"
                ) from None
        for service in self.services.values():
            self._wait_ready(service)
        threading.Thread(target=self._supervise, daemon=True).start()

    def _ready(self, service: Service) -> bool:
        url = self.env["GPT4P_REDIS_URL"]
        if service.name == "web":
            return httpx.get(f"{self.web_url}/healthz", timeout=2).status_code == 200
        if service.name == "email":
            return "watching" in service.log.read_text(errors="replace")
        return service.name == "redis" or ping_worker(url, service.name)

    def _wait_ready(self, service: Service) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not service.alive():
                raise SoakError(f"{service.name} exited while starting; see {service.log}")
            with contextlib.suppress(Exception):
                if self._ready(service):
                    return
            time.sleep(0.5)
        raise SoakError(f"{service.name} not ready in {START_TIMEOUT_S:g}s; see {service.log}")

    @property
    def web_url(self) -> str:
        """Base URL of the web app."""
        return f"http://127.0.0.1:{self.web_port}"

    def _supervise(self) -> None:
        """Start again whatever died, after its delay; note who died and why."""
        while not self.stopping.wait(0.25):
            with self.lock:
                for service in self.services.values():
                    if not service.alive() and not self.stopping.is_set():
                        self._revive(service)

    def _revive(self, service: Service) -> None:
        """Note that `service` died, then start it again once its delay has passed."""
        now = self.clock()
        if service.down_since is None:
            service.down_since = now
            if not service.killed:
                rc = service.process.returncode if service.process else -1
                service.exits.append(rc)
                self.event(f"{service.name} exited on its own (status {rc})")
        elif now - service.down_since >= service.restart_after:
            try:
                service.start()
                self.event(f"{service.name} restarted")
            except Exception as error:  # e.g. Redis's port not free yet: try again
                service.down_since = now
                self.event(f"{service.name} failed to restart: {error}")

    def event(self, what: str) -> None:
        """Note something that happened, with the soak's time."""
        self.events.append({"at": round(self.clock(), 3), "what": what})
        print(f"  [{self.clock():7.1f}s] {what}", flush=True)

    def stop(self) -> None:
        """Stop everything cleanly: the channels first, Redis last."""
        self.stopping.set()
        self.calm.set()
        with self.lock:
            pass  # a restart under way has finished
        for service in reversed(self.services.values()):
            if service.process is not None:
                with contextlib.suppress(Exception):
                    stop_process(service.process)

    def wait_all_up(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until every process runs, e.g. after a late kill."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(s.alive() for s in self.services.values()):
            time.sleep(0.25)

    def snapshot(self, end: bool = False) -> dict[str, Any]:
        """Memory of every process and of Redis; at the end also queue depths and the ledger."""
        shot: dict[str, Any] = {"rss": {n: s.rss() for n, s in self.services.items()}}
        client = redis_client(self.env["GPT4P_REDIS_URL"], socket_timeout=5)
        try:
            memory = cast(dict[str, Any], client.info("memory"))
            shot["redis"] = {k: memory[k] for k in ("used_memory", "used_memory_human")}
            if end:  # an empty queue is no key in Redis: name the known ones anyway
                known = dict.fromkeys(
                    ["deliver.sms", "deliver.email", "helper.calc", "helper.time"], 0
                )
                shot["queues"] = known | queue_depths(client)
                shot["ledger"] = int(client.hlen(LEDGER_KEY))  # type: ignore[arg-type]
                shot["unacked"] = int(client.hlen(UNACKED_KEY))  # type: ignore[arg-type]
        except redis.RedisError as error:
            shot["redis_error"] = str(error)
        finally:
            client.close()
        return shot


def _env(
    state: Path, args: argparse.Namespace, recorder: Any, smtp: Any, box: Any
) -> dict[str, str]:
    """Settings of every process: short answers, time limits that fit them, no rate limits."""
    settings = dict(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", engine="llama", n_ctx="1024",
        # The cores shared out: llama.cpp threads on an oversubscribed CPU spin and crawl.
        n_threads=str(max(1, (os.cpu_count() or 2) // args.workers)), max_tokens="32",
        job_timeout=str(JOB_TIMEOUT_S), task_time_limit="60", task_soft_time_limit="45",
        twilio_account_sid=recorder.account_sid, twilio_auth_token=recorder.auth_token,
        twilio_from=OUR_NUMBER, twilio_api_base=recorder.url, sms_retry_backoff="0.5",
        sms_max_tokens="24", sms_rate_limit="100000", email_rate_limit="100000",
        smtp_host=smtp.host, smtp_port=str(smtp.port), smtp_starttls="false",
        email_from=EMAIL_FROM, email_retry_backoff="0.5", email_poll_seconds="2",
    )  # fmt: skip
    if box is not None:
        settings.update(imap_host="127.0.0.1", imap_port=str(box.port), imap_user=box.user,
                        imap_password=box.password, imap_ssl="plain")  # fmt: skip
    return base_env(state, **settings)


def _chaos(
    stack: Stack, args: argparse.Namespace, rng: random.Random, kills: list[dict[str, Any]]
) -> None:
    """Every `--kill-every` s (±30%) SIGKILL a random worker, the delivery worker or Redis."""
    while not stack.calm.wait(args.kill_every * rng.uniform(0.7, 1.3)):
        targets = {"worker": stack.workers, "deliver": ["soak-deliver@bench"], "redis": ["redis"]}
        name = rng.choice(targets[rng.choice(list(targets))])
        if not stack.services[name].kill():
            continue  # still down from an earlier kill: the next one comes at the next tick
        kills.append({"at": round(stack.clock(), 3), "target": name})
        stack.event(f"killed {name}")


def run(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """Start the stack, soak it, and return every raw number."""
    with_email = not args.no_email and Path(DOVECOT).exists()
    if not args.no_email and not with_email:
        print(f"no dovecot at {DOVECOT}: the soak goes on without email", flush=True)
    records: list[Record] = []
    kills: list[dict[str, Any]] = []
    with peers(with_email) as (recorder, smtp, box):
        stack = Stack(state, args, _env(state, args, recorder, smtp, box))
        try:
            print(f"starting the stack (logs in {state}) ...", flush=True)
            stack.start()
            inbox = Inbox(recorder, smtp, stack.clock)
            sender = Sender(stack.web_url, recorder, box, inbox, timeout=JOB_TIMEOUT_S + 30)
            _warm_up(sender, state)
            stack.clock.reset()
            start = stack.snapshot()
            threading.Thread(target=_watch, args=(stack, inbox), daemon=True).start()
            settled_after = _soak(stack, sender, args, records, kills)
            stack.wait_all_up(timeout=60)  # end figures of running processes, not of gaps
            end = stack.snapshot(end=True)
        finally:
            stack.stop()
    return {
        "config": vars(args) | {"email": with_email, "state": str(state)},
        "records": [r.as_json() for r in records], "kills": kills, "events": stack.events,
        "start": start, "end": end, "unattributed_answers": inbox.unattributed,
        "settled_after": settled_after,
        "services": {n: {"kills": s.kills, "exits": s.exits} for n, s in stack.services.items()},
    }  # fmt: skip


def _soak(stack: Stack, sender: Sender, args: argparse.Namespace, records: list[Record],
          kills: list[dict[str, Any]]) -> float | None:  # fmt: skip
    """Traffic and kills, then the grace period; seconds it took to settle (None: never)."""
    chaos_rng, traffic_rng = random.Random(args.seed + 1), random.Random(args.seed)
    threading.Thread(target=_chaos, args=(stack, args, chaos_rng, kills), daemon=True).start()
    print(f"soaking for {args.minutes:g} min ...", flush=True)
    futures = send_traffic(sender, args.rate, traffic_rng, records, args.minutes * 60)
    stack.calm.set()
    stack.event(f"traffic stopped after {len(records)} messages; grace {args.grace:g}s")
    stopped_at = stack.clock()
    while stack.clock() < stopped_at + args.grace and not settled(records, futures):
        time.sleep(0.5)
    if not settled(records, futures):
        return None
    settled_after = stack.clock() - stopped_at
    # A job requeued after a kill may be answered again well after its first answer:
    # keep watching for a while (about two heartbeat TTLs and a ledger recheck).
    stack.event(f"all answered; watching {args.linger:g}s more for answers sent twice")
    time.sleep(args.linger)
    return settled_after


def _warm_up(sender: Sender, state: Path) -> None:
    """One answered request before the clock starts: every model loaded, the path warm."""
    warm = Record(seq=-1, route="http", sent_at=sender.clock())
    sender.send(warm, "Say hello.")
    if not warm.answers:
        raise SoakError(f"the warm-up request failed ({warm.refused}); see the logs in {state}")


def _watch(stack: Stack, inbox: Inbox) -> None:
    while not stack.stopping.wait(0.1):
        inbox.poll()


def main() -> None:
    """Run the soak and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to send traffic")
    parser.add_argument("--kill-every", type=float, default=120.0, help="seconds between kills")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per minute")
    parser.add_argument("--workers", type=int, default=2, help="inference workers")
    parser.add_argument("--grace", type=float, default=180.0, help="seconds to wait at the end")
    parser.add_argument("--linger", type=float, default=45.0, help="then watch for doubles")
    parser.add_argument("--seed", type=int, default=1, help="seed of the traffic and the kills")
    parser.add_argument("--no-email", action="store_true", help="leave out the email channel")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="gpt4p-soak-"))
    try:
        results = run(args, state)
    except SoakError as error:
        sys.exit(f"soak: {error}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"logs: {state}\nresults: {out / 'soak.json'}")


if __name__ == "__main__":
    main()
