"""A failing reliability test says where every message was, and what the processes did.

`Witness.wait` is `wait_for` whose timeout message reports, for each job the
test tracks: whether it sits in the web app's spool, where Redis has its
inference and delivery tasks (`gpt4people.whereabouts`), and what Twilio
received; then each process (alive or its exit status) with the warnings of
its log since the test's last mark, the Redis log, and the test's own
timeline (kills, restarts).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from gpt4people.whereabouts import locate_jobs

T = TypeVar("T")
LOG_LINES = 12


class Witness:
    """Tracks the jobs, processes and logs of one test; explains a timeout."""

    def __init__(
        self,
        client: redis.Redis,
        state_dir: Path,
        processes: dict[str, subprocess.Popen[bytes]],
        delivered: Callable[[str], int] | None = None,
    ) -> None:
        self.client = client
        self.state_dir = state_dir
        self.processes = processes  # each must stay alive: a wait fails as soon as one exits
        self.delivered = delivered  # how many answers a job's recipient got
        self.jobs: dict[str, str] = {}  # job id -> recipient (senders add from their threads)
        self._jobs_lock = threading.Lock()
        self.timeline: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self._marks: dict[Path, int] = {}
        self.mark()

    def track(self, job_id: str, recipient: str) -> None:
        """Report on this job if a wait times out."""
        with self._jobs_lock:
            self.jobs[job_id] = recipient

    def event(self, what: str) -> None:
        """Note something the test did (a kill, a restart) in the timeline."""
        self.timeline.append((time.monotonic() - self.started, what))

    def mark(self) -> None:
        """From now on, `logged_since_mark` and the report read only newer log lines."""
        for log in self.state_dir.glob("*.log"):
            self._marks[log] = log.stat().st_size

    def _since_mark(self, log: Path) -> str:
        if not log.exists():
            return ""
        with open(log, "rb") as file:
            file.seek(self._marks.get(log, 0))
            return file.read().decode("utf-8", "replace")

    def logged_since_mark(self, hostnames: list[str], text: str) -> bool:
        """Whether the log of every process named in `hostnames` has `text` since the mark."""
        return all(text in self._since_mark(self.state_dir / f"{h}.log") for h in hostnames)

    def helper_registered(self, name: str) -> bool:
        """Whether a live instance of helper `name` is registered."""
        from kernel.helper_registry import HelperRegistry

        return any(h.name == name for h in HelperRegistry(self.client, ttl=15).live())

    def wait(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        """Poll `check` like `wait_for`; on a timeout, or as soon as a process exits, fail
        with the whole report."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            exited = [name for name, p in self.processes.items() if p.poll() is not None]
            if exited:
                raise AssertionError(
                    f"{', '.join(exited)} exited while waiting for {what}\n{self.report()}"
                )
            try:
                result = check()
                if result:
                    return result
            except Exception as error:
                last_error = error
            time.sleep(0.1)
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {what} (last error: {last_error})\n"
            f"{self.report()}"
        )

    def report(self) -> str:
        """Where every tracked job is, and what each process logged."""
        lines = ["timeline:"] + [f"  +{t:6.1f}s {what}" for t, what in self.timeline]
        lines += self._jobs_report()
        lines.append("processes:")
        for name, process in self.processes.items():
            state = "alive" if process.poll() is None else f"exited {process.returncode}"
            lines.append(f"  {name} (pid {process.pid}): {state}")
        for log in sorted(self.state_dir.rglob("*.log")):
            tail = [line for line in self._since_mark(log).splitlines()
                    if '"level": "INFO"' not in line][-LOG_LINES:]  # fmt: skip
            if tail:
                lines.append(f"log {log.relative_to(self.state_dir)} (since the last mark):")
                lines += [f"  {line[:400]}" for line in tail]
        return "\n".join(lines)

    def _jobs_report(self) -> list[str]:
        with self._jobs_lock:
            jobs = dict(self.jobs)
        if not jobs:
            return []
        spooled = self._spooled()
        try:
            where = locate_jobs(self.client, jobs)
        except redis.RedisError as error:
            return [f"jobs: Redis unreadable ({error})"]
        lines = ["jobs:"]
        for job_id, recipient in jobs.items():
            answers = self.delivered(recipient) if self.delivered else "?"
            spool = " | SPOOLED in the web app" if job_id in spooled else ""
            lines.append(f"  {where[job_id].describe()}{spool} | answers received: {answers}")
        return lines

    def _spooled(self) -> set[str]:
        spool = self.state_dir / "spool.sqlite3"
        if not spool.exists():
            return set()
        with sqlite3.connect(spool) as db:
            rows = db.execute("SELECT payload FROM inbound").fetchall()
        return {f"sms-{sid}" for (payload,) in rows for sid in _message_sids(payload)}


def _message_sids(payload: str) -> list[str]:
    sid = json.loads(payload).get("MessageSid")
    return [sid] if sid else []
