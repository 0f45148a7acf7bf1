"""What `gpt4people status` reports: Redis, live workers, queue depths, the model, and
each registered channel (kernel.channels): enabled or not, its route, its delivery queue."""

from __future__ import annotations

from typing import Any, cast

import redis

from kernel.channels import CHANNELS
from kernel.contract import INFERENCE_QUEUE
from kernel.keys import PRIORITY_SEPARATOR
from kernel.metrics import queue_depths_of
from kernel.model_files import model_label
from kernel.redis_client import redis_client, resolve_redis_url
from kernel.redis_urls import redact_text, redact_url
from kernel.settings import Settings

QUEUE_PATTERNS = (f"{INFERENCE_QUEUE}.*", "deliver.*", "helper.*")


def queue_depths(client: redis.Redis) -> dict[str, int]:
    """Jobs waiting in every GPT4People queue (inference, per-GPU/model, delivery, helpers)."""
    names = {INFERENCE_QUEUE}
    for pattern in QUEUE_PATTERNS:
        # A queue's bulk jobs wait in a list of their own, <queue><separator>9.
        names.update(key.decode().partition(PRIORITY_SEPARATOR)[0]
                     for key in client.scan_iter(match=pattern, count=200))  # fmt: skip
    return queue_depths_of(client, names)


def channel_report(settings: Settings, queues: dict[str, int] | None) -> dict[str, Any]:
    """Each registered channel: whether `settings` enable it, its webhook route, its own
    process, its delivery queue and the replies waiting there (None: Redis not asked)."""
    report = {}
    for facts in CHANNELS.values():
        queue = facts.delivery_queue if facts.delivers_later else None
        report[facts.name] = {
            "configured": facts.configured(settings),
            "route": facts.route,
            "command": facts.command,
            "queue": queue,
            "waiting": None if queue is None or queues is None else queues.get(queue, 0),
            "settings": [f"GPT4P_{name.upper()}" for name in facts.settings],
        }
    return report


def _workers(timeout: float) -> dict[str, Any]:
    from workers.app import app

    inspector = app.control.inspect(timeout=timeout)
    queues = inspector.active_queues() or {}
    active = inspector.active() or {}
    return {
        name: {
            "queues": sorted(q["name"] for q in queues.get(name, [])),
            "active_jobs": len(active.get(name, [])),
        }
        for name in sorted(queues)
    }


def collect_status(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    """A JSON-safe report of the deployment as seen from here."""
    url = resolve_redis_url(settings)
    report: dict[str, Any] = {
        "redis": {"url": redact_url(url), "up": False},
        "engine": settings.engine,
        "model": model_label(settings),
        "workers": {},
        "queues": {},
        "channels": channel_report(settings, None),
    }
    client = redis_client(url, settings, socket_connect_timeout=2, socket_timeout=2)
    try:
        info = cast(dict[str, Any], client.info("server"))
        report["redis"]["version"] = info.get("redis_version")
        report["redis"]["up"] = True
        report["queues"] = queue_depths(client)
        report["channels"] = channel_report(settings, report["queues"])
    except redis.RedisError as error:
        report["redis"]["error"] = redact_text(f"{error.__class__.__name__}: {error}")
        return report
    finally:
        client.close()
    report["workers"] = _workers(timeout)
    return report


def format_status(report: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    redis_info = report["redis"]
    state = f"up (v{redis_info.get('version')})" if redis_info["up"] else "DOWN"
    lines = [f"redis    {redis_info['url']}  {state}"]
    if not redis_info["up"]:
        lines.append(f"         {redis_info.get('error', '')}")
        lines.append("         start the stack with `gpt4people up`, or set GPT4P_REDIS_URL")
        return "\n".join(lines)
    lines.append(f"model    {report['model']} (engine: {report['engine']})")
    workers = report["workers"]
    lines.append(f"workers  {len(workers)} live" + ("" if workers else " (none answered)"))
    for name, info in workers.items():
        lines.append(f"  {name}  queues={','.join(info['queues'])}  active={info['active_jobs']}")
    lines.append("queues")
    for name, depth in report["queues"].items():
        lines.append(f"  {name:<20} {depth} waiting")
    lines.append("channels")
    lines.extend(_channel_lines(report["channels"]))
    return "\n".join(lines)


def _channel_lines(channels: dict[str, Any]) -> list[str]:
    lines = []
    for name, info in channels.items():
        state = "configured" if info["configured"] else "not configured"
        way = [f"POST {info['route']}"] if info["route"] else []
        way += [f"gpt4people {info['command']}"] if info["command"] else []
        queue = f"{info['queue']} {info['waiting']} waiting" if info["queue"] else ""
        lines.append(f"  {name:<10} {state:<15} {', '.join(way) or '-':<24} {queue}".rstrip())
        if not info["configured"] and info["settings"]:
            lines.append(f"  {'':<10} settings: {' '.join(info['settings'])}")
    return lines
