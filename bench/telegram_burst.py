"""How fast the Telegram webhook acknowledges a burst of 200 verified updates.

The same measure as `bench.sms_burst` (whose measure and report it uses): its own
Redis and the web app (uvicorn, one process, as `gpt4people up` runs it), no worker,
since the webhook only verifies, records and enqueues. Sends 200 distinct updates
from 200 chats with the secret-token header, `--concurrency` at a time, and prints
p50/p99 response times against the same web app's `GET /healthz` under the same
burst. Writes bench/results/telegram_burst.json.

    python -m bench.telegram_burst [--n 200] [--concurrency 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import httpx

from bench.sms_burst import Webhook, run_and_report

TOKEN, SECRET = "123456:bench-token-of-the-telegram-bot", "bench-secret"


def _update(i: int) -> dict[str, object]:
    chat = 5_000_000 + i
    message = {"message_id": i + 1, "date": 0, "chat": {"id": chat, "type": "private"},
               "from": {"id": chat, "is_bot": False}, "text": f"question {i}"}  # fmt: skip
    return {"update_id": 900_000 + i, "message": message}


def _webhook(base: str) -> Callable[[httpx.AsyncClient], Webhook]:
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}

    def posting(client: httpx.AsyncClient) -> Webhook:
        async def webhook(i: int) -> httpx.Response:
            return await client.post(f"{base}/telegram", json=_update(i), headers=headers)

        return webhook

    return posting


def main() -> None:
    """Run the burst and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    settings = {"telegram_bot_token": TOKEN, "telegram_secret": SECRET,
                "telegram_rate_limit": "100000"}  # fmt: skip
    run_and_report("telegram", settings, args.n, args.concurrency, _webhook)


if __name__ == "__main__":
    main()
