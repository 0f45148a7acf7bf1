"""Long polling: `gpt4people telegram` fetches the bot's updates with getUpdates, for an
operator without a public URL for the webhook.

The poller's place (the next update_id) is stored in Redis after each update is
handled, so a restart neither answers an update again nor skips one: Telegram keeps
an update until a getUpdates with a later offset confirms it (for 24 hours). An
update fetched again because its place was not stored (the poller stopped in
between) is handled as a replay, which is idempotent per update (the job's
idempotency key, each reply part's claim). Telegram answers getUpdates with 409
while a webhook is set, so the poller refuses to start then, unless told to delete
the webhook (``--delete-webhook``). Every call has a timeout (the long poll's
GPT4P_TELEGRAM_POLL_TIMEOUT plus 10 s); while Telegram or Redis does not answer, it
backs off (1 s, doubling to a minute, or Telegram's retry_after).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Celery
from pydantic import ValidationError

from channels.telegram.intake import TelegramChannel, described
from channels.telegram.state import TelegramState
from channels.telegram.updates import Update
from kernel.redis_client import RedisUnavailableError
from kernel.settings import Settings
from kernel.telegram_api import BotApi, BotApiError, BotApiUnreachableError, bot_id

log = logging.getLogger(__name__)

ALLOWED_UPDATES = ["message"]
MAX_BACKOFF_S = 60.0
FIX_WAIT_S = 300.0  # between checks of what only the operator can fix
REFUSED_TOKEN = frozenset({401, 404})  # Telegram's answers to a token it does not know


class TelegramPollingError(RuntimeError):
    """The poller cannot run (no token, a webhook is set, the token refused); says what to do."""


class PollInterrupted(BaseException):
    """A stop requested while waiting on Telegram: nothing fetched was handled yet."""


class UpdatePoller:
    """Fetches and handles the bot's updates until `stop` is set."""

    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery,
                 api: BotApi | None = None) -> None:  # fmt: skip
        try:
            self.api = api or BotApi.from_settings(settings)
        except ValueError as error:
            raise TelegramPollingError(str(error)) from None
        self.settings = settings
        self.state = TelegramState(client, settings)
        self.channel = TelegramChannel(settings, self.state, celery)
        self.bot = bot_id(self.api.token)
        self.stop = threading.Event()
        self._waiting = False

    def interrupt(self) -> None:
        """Stop (from a signal handler): at once while waiting on Telegram, else once the
        update at hand is handled."""
        self.stop.set()
        if self._waiting:
            raise PollInterrupted

    def prepare(self, delete_webhook: bool = False) -> None:
        """Make sure getUpdates may run: no webhook is set, or it is deleted when asked.

        Waits (backing off) while Telegram does not answer, and while the operator has
        something to fix (a webhook set, the token refused): said as an error every few
        minutes, polling starts once it is fixed. Exiting instead would make `up` give
        up on the whole stack after a few restarts."""
        backoff = 1.0
        while not self.stop.is_set():
            try:
                self._check_webhook(delete_webhook)
                return
            except BotApiError as error:
                if error.status in REFUSED_TOKEN:
                    self._wait_for_fix("Telegram refused the bot token: check "
                                       "GPT4P_TELEGRAM_BOT_TOKEN")  # fmt: skip
                    continue
                backoff = self._pause(error, backoff, error.retry_after)
            except BotApiUnreachableError as error:
                backoff = self._pause(error, backoff)
            except TelegramPollingError as error:
                self._wait_for_fix(str(error))

    def _wait_for_fix(self, problem: str) -> None:
        log.error("%s; checking again in %.0fs", problem, FIX_WAIT_S)
        self.stop.wait(FIX_WAIT_S)

    def _check_webhook(self, delete_webhook: bool) -> None:
        info = self.api.call("getWebhookInfo")
        if not isinstance(info, dict) or not info.get("url"):
            return
        if not delete_webhook:
            raise TelegramPollingError(
                "a webhook is set for this bot, so Telegram does not answer polling: use the "
                "webhook (POST /telegram, GPT4P_TELEGRAM_MODE=webhook), or run `gpt4people "
                "telegram --delete-webhook` to remove it and poll"
            )
        self.api.call("deleteWebhook", {"drop_pending_updates": False})
        log.warning("the bot's webhook was deleted (--delete-webhook): polling instead")

    def run(self) -> None:
        """Poll until stopped, backing off while Telegram or Redis does not answer."""
        log.info("polling Telegram for updates (bot %s)", self.bot)
        backoff = 1.0
        while not self.stop.is_set():
            try:
                self.poll_once()
                backoff = 1.0
            except PollInterrupted:
                break
            except BotApiError as error:
                if error.status in REFUSED_TOKEN:
                    log.error("Telegram refused the bot token (GPT4P_TELEGRAM_BOT_TOKEN)")
                backoff = self._pause(error, backoff, error.retry_after)
            except (BotApiUnreachableError, RedisUnavailableError, redis.RedisError) as error:
                # Unconfirmed updates stay with Telegram: fetched again once all answer.
                backoff = self._pause(error, backoff)
        self.api.close()

    def _pause(self, error: Exception, backoff: float, retry_after: float | None = None) -> float:
        """Wait before the next try (Telegram's retry_after, else `backoff`); the next backoff."""
        wait = min(max(backoff, retry_after or 0.0), MAX_BACKOFF_S)  # a hostile retry_after
        log.warning("%s; next try in %.0fs", self.api.masked(str(error)), wait)
        self.stop.wait(wait)
        return min(backoff * 2, MAX_BACKOFF_S)

    def poll_once(self) -> int:
        """Fetch the updates after our place, handle each and move past it; how many."""
        offset = self.state.offset(self.bot)
        wait = self.settings.telegram_poll_timeout
        params: dict[str, Any] = {"timeout": wait, "allowed_updates": ALLOWED_UPDATES}
        if offset:
            params["offset"] = offset
        self._waiting = True
        try:
            updates = self.api.call("getUpdates", params, timeout=wait + 10)
        finally:
            self._waiting = False
        handled = 0
        for raw in updates if isinstance(updates, list) else []:
            update_id = raw.get("update_id") if isinstance(raw, dict) else None
            if not isinstance(update_id, int) or update_id < offset:
                continue
            self.handle(raw)
            self.state.advance(self.bot, update_id + 1)
            handled += 1
        return handled

    def handle(self, raw: dict[str, Any]) -> None:
        """Handle one update as a replay (it may have been handled before its place was
        stored); an update that does not parse is skipped."""
        try:
            update = Update.model_validate(raw)
        except ValidationError:
            log.warning("update %s skipped: not an update we can read", raw.get("update_id"))
            return
        try:
            outcome = self.channel.receive_durably(update, replay=True)
        except (RedisUnavailableError, redis.RedisError):
            raise  # not handled: fetched again once Redis answers
        except Exception as error:  # noqa: BLE001 - one update must not stop every other
            # Skipped, not retried: an update that fails this way would fail every time.
            log.error("Telegram %s skipped: %s", described(update), error.__class__.__name__)
            return
        log.info("Telegram %s: %s", described(update), outcome)
