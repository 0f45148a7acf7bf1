"""How fast the Telegram webhook acknowledges a burst of 200 verified updates.

The same measure as `bench.sms_burst` (whose burst and quantiles it reuses): its own
Redis and the web app (uvicorn, one process, as `gpt4people up` runs it), no worker,
since the webhook only verifies, records and enqueues. Sends 200 distinct updates
from 200 chats with the secret-token header, `--concurrency` at a time, and prints
p50/p99 response times against the same web app's `GET /healthz` under the same
burst. Writes bench/results/telegram_burst.json.

    python -m bench.telegram_burst [--n 200] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from bench.sms_burst import _burst, _quantile

ROOT = Path(__file__).resolve().parent.parent
TOKEN, SECRET = "123456:bench-token-of-the-telegram-bot", "bench-secret"


def _update(i: int) -> dict[str, object]:
    chat = 5_000_000 + i
    message = {"message_id": i + 1, "date": 0, "chat": {"id": chat, "type": "private"},
               "from": {"id": chat, "is_bot": False}, "text": f"question {i}"}  # fmt: skip
    return {"update_id": 900_000 + i, "message": message}


async def _run(base: str, n: int, concurrency: int) -> dict[str, float]:
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
    async with httpx.AsyncClient(timeout=30) as client:

        async def webhook(i: int) -> httpx.Response:
            return await client.post(f"{base}/telegram", json=_update(i), headers=headers)

        async def health(_: int) -> httpx.Response:
            return await client.get(f"{base}/healthz")

        await _burst(20, concurrency, health)  # warm up
        anchor = await _burst(n, concurrency, health)
        hooks = await _burst(n, concurrency, webhook)
    return {
        "healthz_p50_ms": _quantile(anchor, 0.5), "healthz_p99_ms": _quantile(anchor, 0.99),
        "telegram_p50_ms": _quantile(hooks, 0.5), "telegram_p99_ms": _quantile(hooks, 0.99),
        "telegram_mean_ms": statistics.mean(hooks) * 1000,
    }  # fmt: skip


def main() -> None:
    """Run the burst and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from gpt4people.redis_server import RedisServer, free_port
    from tests.conftest import base_env, start_web, stop_process

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        env = base_env(Path(tmp), redis_url=server.url, engine="echo",
                       telegram_bot_token=TOKEN, telegram_secret=SECRET,
                       telegram_rate_limit="100000", log_level="WARNING")  # fmt: skip
        port = free_port()
        web = start_web(env, port)
        try:
            results = asyncio.run(_run(f"http://127.0.0.1:{port}", args.n, args.concurrency))
        finally:
            stop_process(web)
    print(f"{args.n} Telegram updates, {args.concurrency} at a time")
    for name, value in results.items():
        print(f"{name:<18}{value:>10.2f} ms")
    ratio = results["telegram_p50_ms"] / results["healthz_p50_ms"]
    print(f"telegram p50 / healthz p50: {ratio:.1f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "telegram_burst.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
