"""`gpt4people up`: the whole stack as child processes of one foreground command.

Every child runs in its own session (process group), so that stopping the
stack also stops what the children started (Celery's pool processes) and a
Ctrl-C in the terminal reaches only the supervisor, which then stops the
children in order: the web app first (no new jobs), then Flower and the
workers, Redis last (so workers finish cleanly and the append-only file is
flushed). Anything still alive after the grace period is killed.

What the children write comes back through pipes to one console
(gpt4people.console): they log JSON lines, which `up` prints with each
process's name, as text on a terminal or as JSON lines otherwise.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import quote

from pydantic import SecretStr

from gpt4people.console import Console, ConsoleLogHandler, choose_style
from gpt4people.redis_server import RedisServer, new_password
from kernel.channels import started_channels
from kernel.redis_client import ping, remove_runtime_url, running_up_pid, write_runtime_url
from kernel.redis_urls import redact_url, scrub, url_secrets
from kernel.settings import Settings

BUILT_IN_HELPERS = ("calc", "image", "time")

STOP_GRACE_S = 20.0
MAX_RESTARTS = 5  # within RESTART_WINDOW_S, then the stack gives up and stops
RESTART_WINDOW_S = 120.0
KILL_WAIT_S = 5.0


# Told how each stopped child ended: the child, in words, and the level to say it at.
StopReport = Callable[["Child", str, str], None]


class StackError(RuntimeError):
    """The stack cannot start here; the message says what to change."""


OPEN_API_WARNING = (
    "the HTTP API listens on {host} (GPT4P_HTTP_HOST) without "
    "GPT4P_HTTP_API_KEY: anyone who reaches it can use the model and read /metrics. "
    'Set a key before going public (README, "Security").'
)
RUNNING_AS_ROOT = (
    "running as root: an ordinary user would be safer (Celery's warnings about it are "
    "silenced in the children)"
)
# Celery's multi-line SecurityWarnings about root (or a gid it cannot find): `up` says it
# once, in one line. Filters of PYTHONWARNINGS match the start of a message.
ROOT_WARNING_FILTERS = (
    "ignore:You're running the worker with superuser privileges",
    "ignore:An entry for the specified gid or egid was not found",
)


def child_environment(environ: dict[str, str], redis_url: str) -> dict[str, str]:
    """The environment of `up`'s children: its Redis, JSON logs for the console to read,
    output unbuffered (a pipe would hold it back), no walls of root warnings."""
    warnings = [w for w in (environ.get("PYTHONWARNINGS"), *ROOT_WARNING_FILTERS) if w]
    return dict(environ, GPT4P_REDIS_URL=redis_url, GPT4P_LOG_FORMAT="json",
                PYTHONUNBUFFERED="1", PYTHONWARNINGS=",".join(warnings))  # fmt: skip


def settings_secrets(settings: Settings, redis_url: str) -> set[str]:
    """Every secret `up` knows (passwords, tokens, keys), to mask in whatever it prints."""
    found = url_secrets(redis_url)
    for _, value in settings:
        for item in value if isinstance(value, list | tuple | set) else [value]:
            if isinstance(item, SecretStr) and (secret := item.get_secret_value()):
                found.add(secret)
                # A login written user:password (Flower's) may be quoted as the password
                # alone, and a list of keys (GPT4P_HTTP_API_KEYS) one key at a time.
                found.add(secret.partition(":")[2])
                found.update(key.strip() for key in secret.split(","))
    # As a URL or a form would quote them, too.
    found |= {quote(secret, safe="") for secret in found}
    return {secret for secret in found if len(secret) >= 4}


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

    def start(self, env: dict[str, str], console: Console | None = None) -> None:
        """Start it in a session of its own; its output goes to `console` when given."""
        piped = subprocess.PIPE if console else None
        self.process = subprocess.Popen(
            self.command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            stdout=piped, stderr=subprocess.STDOUT if console else None,
        )  # fmt: skip
        if console is not None and self.process.stdout is not None:
            console.follow(self.name, self.process.stdout)

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
    env: dict[str, str] = field(default_factory=dict)
    console: Console | None = None
    stop_reason: str = ""  # the signal that asked it to stop, once one has

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
        # Each channel's own process (the email poller, ...) once its settings enable it.
        children.extend(
            Child(c.command, [python, "-m", "gpt4people.cli", c.command])
            for c in started_channels(self.settings)
            if c.command is not None
        )
        # uvicorn with our logging (its address and port from the settings), not its own.
        children.append(Child("web", [python, "-m", "gpt4people.webserver"]))
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
        if self.console is not None:
            self.console.add_secrets(settings_secrets(self.settings, self.redis_url))
        if os.geteuid() == 0:
            self._say(RUNNING_AS_ROOT, "WARNING")
        self.env = child_environment(dict(os.environ), self.redis_url)
        for child in self.plan():
            child.start(self.env, self.console)
            self.children.append(child)
        self._announce()

    def _say(self, message: str, level: str = "INFO") -> None:
        """A line of the supervisor's own, on the console (or stderr without one)."""
        if self.console is not None:
            self.console.say(message, level)
        else:
            text = scrub(message, url_secrets(self.redis_url or ""))
            print(f"gpt4people: {text}", file=sys.stderr, flush=True)

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
            'ask it           gpt4people ask "What is the capital of France?"',
            "stop             Ctrl-C",
        ]
        for line in ["gpt4people is up:", *(f"  {line}" for line in lines)]:
            self._say(line)
        if not is_loopback(host) and not (settings.http_api_key or settings.http_api_keys):
            self._say(OPEN_API_WARNING.format(host=host), "WARNING")

    def watch(self) -> int:
        """Restart children that die (a few times); return when asked to stop or they keep dying."""
        while True:
            if self.stop_reason:
                self._say(f"{self.stop_reason}: stopping...")
                return 0
            for child in self.children:
                if child.alive():
                    continue
                code = child.process.returncode if child.process else None
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
                if len(child.restarts) >= MAX_RESTARTS:
                    self._say(f"{child.name} keeps exiting (status {code}); stopping", "ERROR")
                    return 1
                # A worker's consumer can die when Redis goes away (a kombu bug); its jobs
                # are safe in Redis and a fresh process picks them up.
                self._say(f"{child.name} exited (status {code}); restarting", "WARNING")
                child.restarts.append(now)
                child.start(self.env, self.console)
            if self.redis and self.redis.process and self.redis.process.poll() is not None:
                self._say("Redis exited; stopping", "ERROR")
                return 1
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every child (web first, Redis last), killing whatever outlives the grace
        period, and say how each one ended."""

        def said(child: Child, how: str, level: str) -> None:
            pid = child.process.pid if child.process else "-"
            self._say(f"stopped {child.name} (pid {pid}): {how}", level)

        stop_children(sorted(self.children, key=lambda c: {"web": 0, "flower": 1}.get(c.name, 2)),
                      said)  # fmt: skip
        if self.redis is not None and self.redis.process is not None:
            running = self.redis.process.poll() is None
            self.redis.stop()
            remove_runtime_url(self.settings)
            how = describe_exit(self.redis.process.returncode, was_running=running)
            self._say(f"stopped redis (pid {self.redis.process.pid}): {how}")


def describe_exit(code: int | None, was_running: bool = True, killed: bool = False) -> str:
    """How a stopped process ended, in words."""
    if killed:
        return f"killed: still running {STOP_GRACE_S:.0f} s after SIGTERM"
    if code is None:
        return "still running after SIGKILL"
    if not was_running:
        return f"had already exited (status {code})"
    if code == 0:
        return "exited cleanly"
    if code == -signal.SIGTERM:
        return "stopped on SIGTERM"  # uvicorn ends so once it has shut down
    if code < 0:
        return f"ended by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def stop_children(order: list[Child], report: StopReport | None = None) -> None:
    """SIGTERM each child's leader, wait out the grace period, then kill their groups.

    `report` is told, as each one ends, how it ended (in words) and at what level to say it.
    """
    running = {id(child): child.alive() for child in order}
    for child in order:
        # The leader only: a Celery worker then finishes its pool's jobs itself.
        if child.alive() and child.process is not None:
            child.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in order:
        if child.process is None:
            continue
        killed = False
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed = True
        # Pool processes may outlive their parent: kill the rest of the group.
        child.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(KILL_WAIT_S)
        code = child.process.poll()
        if report is not None:
            clean = code in (0, -signal.SIGTERM) and not killed
            level = "INFO" if clean else "WARNING" if code is not None else "ERROR"
            report(child, describe_exit(code, was_running=running[id(child)], killed=killed),
                   level)  # fmt: skip


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
        stop_children(children, lambda child, how, _: print(
            f"gpt4people: stopped {child.name}: {how}", file=sys.stderr, flush=True))  # fmt: skip
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status


def run_stack(settings: Settings, workers: int) -> int:
    """Run the stack in the foreground until SIGINT or SIGTERM; return the exit status.

    Its lines and its children's go to one console on stdout: text on a terminal, JSON
    lines when piped, or as GPT4P_LOG_FORMAT says when the user set it.
    """
    names = [child.name for child in Stack(settings, workers).plan()]
    chosen = settings.log_format if "log_format" in settings.model_fields_set else None
    console = Console(choose_style(sys.stdout, names, chosen, os.environ))
    stack = Stack(settings, workers, console=console)

    def request_stop(signum: int, _: FrameType | None) -> None:
        # Only noted here: the main thread says it (a signal handler must not take locks).
        stack.stop_reason = stack.stop_reason or signal.Signals(signum).name

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, [ConsoleLogHandler(console)]
    try:
        stack.start()
        status = stack.watch()
    finally:
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if stack.children or stack.redis:
            console.say("gpt4people: stopped")
        console.close()
        root.handlers = handlers
    return status
