"""`gpt4people up`: the whole stack as child processes of one foreground command.

Every child runs in its own session (process group), so that stopping the
stack also stops what the children started (Celery's pool processes) and a
Ctrl-C in the terminal reaches only the supervisor, which then stops the
children in order: the web app first (no new jobs), then Flower and the
workers, Redis last (so workers finish cleanly and the append-only file is
flushed). Anything still alive after the grace period is killed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from gpt4people.redis_server import RedisServer, new_password
from kernel.redis_client import ping, remove_runtime_url, running_up_pid, write_runtime_url
from kernel.redis_urls import redact_url, scrub, url_secrets
from kernel.settings import Settings

BUILT_IN_HELPERS = ("calc", "image", "time")

log = logging.getLogger(__name__)

STOP_GRACE_S = 20.0
MAX_RESTARTS = 5  # within RESTART_WINDOW_S, then the stack gives up and stops
RESTART_WINDOW_S = 120.0
KILL_WAIT_S = 5.0


class StackError(RuntimeError):
    """The stack cannot start here; the message says what to change."""


OPEN_API_WARNING = (
    "gpt4people: WARNING: the HTTP API listens on {host} (GPT4P_HTTP_HOST) without "
    "GPT4P_HTTP_API_KEY: anyone who reaches it can use the model and read /metrics. "
    'Set a key before going public (README, "Security").'
)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "" (every address): it may face the network


def check_flower_exposure(settings: Settings) -> None:
    """Refuse a Flower that others could reach without a login: its API can run any task."""
    if settings.flower_basic_auth is None and not is_loopback(settings.flower_host):
        raise StackError(
            f"Flower would listen on {settings.flower_host} (GPT4P_FLOWER_HOST) with no login, "
            "and its API can run any task: set GPT4P_FLOWER_BASIC_AUTH=user:password "
            "(a password of 12+ characters), or GPT4P_FLOWER_HOST=127.0.0.1"
        )


def make_private_dir(path: Path) -> None:
    """Create `path` for this user only (0700); tighten it if it is ours and not shared."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    # A sticky folder (/tmp) is shared by design: never change one that is not ours alone.
    if info.st_uid == os.getuid() and not info.st_mode & stat.S_ISVTX:
        path.chmod(0o700)


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on `host`:`port` (so a child can bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # GPT4P_FLOWER_HOST=::1
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    """One supervised process."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        """Start it in a session of its own."""
        self.process = subprocess.Popen(
            self.command, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        """Send `signum` to its whole process group."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


@dataclass
class Stack:
    """The processes of one `gpt4people up`."""

    settings: Settings
    workers: int
    redis_url: str | None = None
    redis: RedisServer | None = None
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def plan(self) -> list[Child]:
        """The children to start, in start order."""
        python = sys.executable
        children = [
            Child(
                f"worker{i}",
                [python, "-m", "gpt4people.cli", "worker", "--hostname", f"worker{i}@%h"],
            )
            for i in range(1, self.workers + 1)
        ]
        children.append(
            Child(
                "deliver",
                [
                    python,
                    "-m",
                    "gpt4people.cli",
                    "deliver",
                    "--hostname",
                    "deliver@%h",
                    "--concurrency",
                    "2",
                ],
            )
        )
        children.extend(
            Child(f"helper-{name}", [python, "-m", "gpt4people.cli", "helper", name,
                                     "--concurrency", "1"])
            for name in BUILT_IN_HELPERS
        )  # fmt: skip
        if self.settings.imap_host:
            children.append(Child("email", [python, "-m", "gpt4people.cli", "email"]))
        children.append(
            Child(
                "web",
                [
                    python, "-m", "uvicorn", "channels.web:create_app", "--factory",
                    "--host", self.settings.http_host, "--port", str(self.settings.http_port),
                    "--log-level", self.settings.log_level.lower(), "--no-access-log",
                    "--timeout-graceful-shutdown", "10",
                ],
            )
        )  # fmt: skip
        # `gpt4people flower` checks its address and login itself and hands the login to
        # Flower in its environment, never on a command line that `ps` shows.
        children.append(Child("flower", [python, "-m", "gpt4people.cli", "flower"]))
        return children

    def check(self) -> None:
        """Refuse to start over another `up` or on ports already taken, saying which."""
        other = None if self.settings.redis_url else running_up_pid(self.settings)
        if other is not None:
            raise StackError(
                f"gpt4people up is already running (pid {other}) with state in "
                f"{self.settings.state_dir}; stop it, or set GPT4P_STATE_DIR for a second one"
            )
        check_flower_exposure(self.settings)
        settings = self.settings
        ports = {"GPT4P_HTTP_PORT": (settings.http_host, settings.http_port),
                 "GPT4P_FLOWER_PORT": (settings.flower_host, settings.flower_port)}  # fmt: skip
        for variable, (host, port) in ports.items():
            if not port_free(host, port):
                raise StackError(f"port {port} is already in use: set {variable} to another")

    def start(self) -> None:
        """Start Redis (embedded unless GPT4P_REDIS_URL is set) and every child."""
        self.check()
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
            ping(self.redis_url, timeout=5)
        else:
            # Only this user may read the state (conversations, numbers) or reach Redis: a
            # private folder and a fresh password each run, kept in the 0600 runtime file.
            make_private_dir(self.settings.state_dir)
            self.redis = RedisServer(
                self.settings.state_dir / "redis", password=new_password()
            ).start()
            self.redis_url = self.redis.url
            write_runtime_url(self.settings, self.redis_url)
        self.env = dict(os.environ, GPT4P_REDIS_URL=self.redis_url)
        for child in self.plan():
            child.start(self.env)
            self.children.append(child)
        self._announce()

    def _announce(self) -> None:
        settings = self.settings
        host, port = settings.http_host, settings.http_port
        where = "embedded" if self.redis else "external"
        login = " (login: GPT4P_FLOWER_BASIC_AUTH)" if self.settings.flower_basic_auth else ""
        lines = [
            f"Redis ({where})   {redact_url(self.redis_url or '')}",
            f"workers          {self.workers} (engine: {self.settings.engine})",
            f"HTTP API         http://{host}:{port}/v1/chat/completions",
            f"health           http://{host}:{port}/healthz",
            f"Flower           http://{self.settings.flower_host}:{self.settings.flower_port}/"
            + login,
            'ask it            gpt4people ask "What is the capital of France?"',
            "stop             Ctrl-C",
        ]
        banner = "gpt4people is up:\n  " + "\n  ".join(lines)
        print(scrub(banner, url_secrets(self.redis_url or "")), flush=True)
        if not is_loopback(host) and not (settings.http_api_key or settings.http_api_keys):
            print(OPEN_API_WARNING.format(host=host), file=sys.stderr, flush=True)

    def watch(self) -> int:
        """Restart children that die (a few times); return when asked to stop or they keep dying."""
        while not self.stopping:
            for child in self.children:
                if child.alive():
                    continue
                code = child.process.returncode if child.process else None
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
                if len(child.restarts) >= MAX_RESTARTS:
                    print(f"gpt4people: {child.name} keeps exiting (status {code}); stopping",
                          file=sys.stderr, flush=True)  # fmt: skip
                    return 1
                # A worker's consumer can die when Redis goes away (a kombu bug); its jobs
                # are safe in Redis and a fresh process picks them up.
                print(f"gpt4people: {child.name} exited (status {code}); restarting",
                      file=sys.stderr, flush=True)  # fmt: skip
                child.restarts.append(now)
                child.start(self.env)
            if self.redis and self.redis.process and self.redis.process.poll() is not None:
                print("gpt4people: Redis exited; stopping", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """Stop every child (web first, Redis last), killing whatever outlives the grace period."""
        stop_children(sorted(self.children, key=lambda c: {"web": 0, "flower": 1}.get(c.name, 2)))
        if self.redis is not None:
            self.redis.stop()
            remove_runtime_url(self.settings)


def stop_children(order: list[Child]) -> None:
    """SIGTERM each child's leader, wait out the grace period, then kill their groups."""
    for child in order:
        # The leader only: a Celery worker then finishes its pool's jobs itself.
        if child.alive() and child.process is not None:
            child.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in order:
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_GRACE_S)
        # Pool processes may outlive their parent: kill the rest of the group.
        child.signal_group(signal.SIGKILL)
        try:
            child.process.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL", child.name, child.process.pid)


def supervise(children: list[Child]) -> int:
    """Run `children` in the foreground until SIGINT/SIGTERM or until one exits."""
    stopping = False

    def request_stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        for child in children:
            child.start(dict(os.environ))
        while not stopping and status == 0:
            dead = [c for c in children if not c.alive()]
            if dead:
                print(f"gpt4people: {dead[0].name} exited; stopping", file=sys.stderr, flush=True)
                status = 1
            time.sleep(0.2)
    finally:
        stop_children(children)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status


def run_stack(settings: Settings, workers: int) -> int:
    """Run the stack in the foreground until SIGINT or SIGTERM; return the exit status."""
    stack = Stack(settings, workers)

    def request_stop(signum: int, _: FrameType | None) -> None:
        if not stack.stopping:
            print(f"\ngpt4people: {signal.Signals(signum).name}, stopping...", flush=True)
        stack.stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start()
        status = stack.watch()
    finally:
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("gpt4people: stopped", flush=True)
    return status
