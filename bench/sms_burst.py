"""How fast the SMS webhook answers Twilio under a burst of 200 signed webhooks.

Starts its own Redis and the web app (uvicorn, one process, as `gpt4people up`
runs it); no worker is needed, since the webhook only verifies, records and
enqueues. Sends 200 distinct signed webhooks, `--concurrency` at a time, and
prints p50/p99 response times, against the anchor of the same web app's
`GET /healthz` under the same burst. Writes bench/results/sms_burst.json.
With ``--channel whatsapp``, the webhooks are Twilio's WhatsApp ones (``whatsapp:``
senders) to ``POST /whatsapp``, and it writes bench/results/whatsapp_burst.json.

    python -m bench.sms_burst [--n 200] [--concurrency 20] [--channel sms|whatsapp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from twilio.request_validator import RequestValidator

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT, TOKEN = "AC" + "2" * 32, "bench-token"


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _burst(n: int, concurrency: int, request: object) -> list[float]:
    gate = asyncio.Semaphore(concurrency)
    samples: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            response = await request(i)  # type: ignore[operator]
            samples.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text

    await asyncio.gather(*(one(i) for i in range(n)))
    return samples


Webhook = Callable[[int], Awaitable[httpx.Response]]


async def measure(
    base: str, n: int, concurrency: int, name: str,
    webhook_of: Callable[[httpx.AsyncClient], Webhook],
) -> dict[str, float]:  # fmt: skip
    """`n` calls of the webhook `webhook_of(client)` makes, `concurrency` at a time, against
    as many `GET /healthz` of the same app: their p50/p99 (and the webhook's mean), in ms."""
    async with httpx.AsyncClient(timeout=30) as client:

        async def health(_: int) -> httpx.Response:
            return await client.get(f"{base}/healthz")

        await _burst(20, concurrency, health)  # warm up
        anchor = await _burst(n, concurrency, health)
        hooks = await _burst(n, concurrency, webhook_of(client))
    return {
        "healthz_p50_ms": _quantile(anchor, 0.5), "healthz_p99_ms": _quantile(anchor, 0.99),
        f"{name}_p50_ms": _quantile(hooks, 0.5), f"{name}_p99_ms": _quantile(hooks, 0.99),
        f"{name}_mean_ms": statistics.mean(hooks) * 1000,
    }  # fmt: skip


def run_and_report(
    name: str, settings: dict[str, str], n: int, concurrency: int,
    webhook_of: Callable[[str], Callable[[httpx.AsyncClient], Webhook]],
) -> None:  # fmt: skip
    """Start Redis and the web app with `settings`, measure the `name` webhook that
    `webhook_of(base)` posts, print the table and write bench/results/<name>_burst.json."""
    sys.path.insert(0, str(ROOT))
    from gpt4people.redis_server import RedisServer, free_port
    from tests.conftest import base_env, start_web, stop_process

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        env = base_env(Path(tmp), redis_url=server.url, engine="echo", log_level="WARNING",
                       **settings)  # fmt: skip
        port = free_port()
        web = start_web(env, port)
        base = f"http://127.0.0.1:{port}"
        try:
            results = asyncio.run(measure(base, n, concurrency, name, webhook_of(base)))
        finally:
            stop_process(web)
    print(f"{n} {name} webhooks, {concurrency} at a time")
    for key, value in results.items():
        print(f"{key:<18}{value:>10.2f} ms")
    ratio = results[f"{name}_p50_ms"] / results["healthz_p50_ms"]
    print(f"{name} p50 / healthz p50: {ratio:.1f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_burst.json").write_text(json.dumps(results, indent=2))


def _twilio_webhook(channel: str) -> Callable[[str], Callable[[httpx.AsyncClient], Webhook]]:
    validator = RequestValidator(TOKEN)
    prefix = "whatsapp:" if channel == "whatsapp" else ""  # how Twilio writes the addresses

    def at(base: str) -> Callable[[httpx.AsyncClient], Webhook]:
        def posting(client: httpx.AsyncClient) -> Webhook:
            async def webhook(i: int) -> httpx.Response:
                params = {"MessageSid": "SM" + uuid.uuid4().hex, "AccountSid": ACCOUNT,
                          "From": f"{prefix}+1555{i:07d}", "To": f"{prefix}+15550000000",
                          "Body": f"question {i}", "NumMedia": "0"}  # fmt: skip
                signature = validator.compute_signature(f"{base}/{channel}", params)
                return await client.post(f"{base}/{channel}", data=params,
                                         headers={"X-Twilio-Signature": signature})  # fmt: skip

            return webhook

        return posting

    return at


def main() -> None:
    """Run the burst and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--channel", choices=("sms", "whatsapp"), default="sms")
    args = parser.parse_args()
    settings = {"twilio_account_sid": ACCOUNT, "twilio_auth_token": TOKEN,
                "sms_rate_limit": "100000"}  # fmt: skip
    run_and_report(args.channel, settings, args.n, args.concurrency,
                   _twilio_webhook(args.channel))  # fmt: skip


if __name__ == "__main__":
    main()
