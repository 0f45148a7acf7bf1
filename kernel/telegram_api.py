"""Telegram's Bot API over plain HTTPS and JSON, with a timeout on every call and the bot
token kept out of every log line and error message.

The Bot API is a handful of JSON methods at ``<GPT4P_TELEGRAM_API_BASE>/bot<token>/<method>``
and file downloads at ``<base>/file/bot<token>/<file_path>``. httpx calls them directly:
python-telegram-bot and aiogram are async-first frameworks with their own application
loop, update dispatcher and persistence, heavy to run inside a Celery task or a
short-lived webhook handler and offering nothing we need beyond these calls; a plain
client also lets tests point the base URL at a local server speaking the same protocol.

It is in the kernel because both the Telegram channel (webhook, poller, delivery) and
the image helper (fetching a photo someone sent, `fetch_telegram_file`) use it, and the
helper SDK may import the kernel only. httpx is imported lazily: the helper SDK stays
light to import.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kernel.contract import MediaRef

if TYPE_CHECKING:
    import httpx

    from kernel.settings import Settings

# httpx logs every request's URL at INFO, and a Bot API URL holds the bot token.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.INFO)

# A photo someone sent the bot rides on its job as this, followed by Telegram's file_id:
# no URL (the download URL holds the bot token), fetched only from GPT4P_TELEGRAM_API_BASE.
TELEGRAM_FILE_SCHEME = "telegram-file:"
_FILE_ID = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# What getFile may answer as a path: Telegram's are like "photos/file_12.jpg".
_FILE_PATH = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_./-]{0,255}$")
MAX_DESCRIPTION_CHARS = 200
MASK = "<bot-token>"


class BotApiError(RuntimeError):
    """Telegram answered, and refused: `status` (HTTP), its `description`, and for a 429 the
    seconds it asks us to wait (`retry_after`)."""

    def __init__(self, method: str, status: int, description: str, retry_after: float | None):
        super().__init__(f"Telegram {method} answered {status}: {description}")
        self.status = status
        self.description = description
        self.retry_after = retry_after


class BotApiUnreachableError(RuntimeError):
    """No answer from Telegram. `maybe_sent`: the request may have reached it (a read
    timeout, a connection lost after sending) rather than surely not (no connection)."""

    def __init__(self, method: str, error: Exception, maybe_sent: bool) -> None:
        super().__init__(f"no answer from Telegram to {method} ({error.__class__.__name__})")
        self.maybe_sent = maybe_sent


class TelegramFileRefusedError(ValueError):
    """A file someone sent that is not fetched (too large, not ours to name); says why."""


def bot_id(token: str) -> str:
    """The bot's own id, the token's part before the colon: public, unlike the rest."""
    return token.split(":", 1)[0]


def telegram_file_ref(file_id: str) -> MediaRef:
    """The job's reference to a photo someone sent (Telegram sends photos as JPEG)."""
    return MediaRef(url=TELEGRAM_FILE_SCHEME + file_id, content_type="image/jpeg")


def _description(body: Any, status: int) -> str:
    text = body.get("description") if isinstance(body, dict) else None
    return str(text or f"HTTP {status}")[:MAX_DESCRIPTION_CHARS]


def _retry_after(body: Any) -> float | None:
    parameters = body.get("parameters") if isinstance(body, dict) else None
    value = parameters.get("retry_after") if isinstance(parameters, dict) else None
    return float(value) if isinstance(value, int | float) and 0 <= value <= 86_400 else None


@dataclass
class BotApi:
    """One bot's API: `call` a method, `download` a file; each with a timeout."""

    token: str = field(repr=False)  # never printed
    base: str
    timeout: float
    _client: httpx.Client | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> BotApi:
        """The bot of GPT4P_TELEGRAM_BOT_TOKEN at GPT4P_TELEGRAM_API_BASE; ValueError if unset."""
        if settings.telegram_bot_token is None:
            raise ValueError("set GPT4P_TELEGRAM_BOT_TOKEN (BotFather's token for the bot)")
        return cls(settings.telegram_bot_token.get_secret_value(),
                   settings.telegram_api_base.rstrip("/"), settings.telegram_timeout)  # fmt: skip

    @property
    def client(self) -> httpx.Client:
        """One connection pool for the bot's calls, made on first use."""
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=self.timeout, follow_redirects=False)
        return self._client

    def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def masked(self, text: str) -> str:
        """`text` without the bot token (for a message that might quote a URL)."""
        return text.replace(self.token, MASK) if self.token else text

    def call(
        self, method: str, params: dict[str, Any] | None = None, *,
        files: dict[str, tuple[str, bytes, str]] | None = None, timeout: float | None = None,
    ) -> Any:  # fmt: skip
        """Call `method` with `params` (JSON, or a multipart form with `files`); its result.

        Raises `BotApiError` when Telegram refuses, `BotApiUnreachableError` without an answer.
        """
        import httpx

        url = f"{self.base}/bot{self.token}/{method}"
        limit = httpx.Timeout(timeout or self.timeout)
        try:
            if files is not None:
                form = {k: str(v) for k, v in (params or {}).items()}
                response = self.client.post(url, data=form, files=files, timeout=limit)
            else:
                response = self.client.post(url, json=params or {}, timeout=limit)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                httpx.WriteTimeout, httpx.WriteError) as error:  # fmt: skip
            # The request never reached Telegram whole: it cannot have been acted on.
            raise BotApiUnreachableError(method, error, maybe_sent=False) from None
        except httpx.HTTPError as error:  # read/write timeouts, a connection lost midway
            raise BotApiUnreachableError(method, error, maybe_sent=True) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 200 and isinstance(body, dict) and body.get("ok") is True:
            return body.get("result")
        raise BotApiError(method, response.status_code, self.masked(_description(body,
                          response.status_code)), _retry_after(body))  # fmt: skip

    def download(self, file_path: str, limit: int) -> bytes:
        """The file at `file_path` (as getFile named it), refused past `limit` bytes."""
        import httpx

        if not _FILE_PATH.match(file_path) or ".." in file_path:
            raise TelegramFileRefusedError("Telegram named a file path we do not fetch")
        url = f"{self.base}/file/bot{self.token}/{file_path}"
        data = bytearray()
        try:
            with self.client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise BotApiError("file download", response.status_code,
                                      f"HTTP {response.status_code}", None)  # fmt: skip
                if int(response.headers.get("content-length") or 0) > limit:
                    raise TelegramFileRefusedError(f"the file is larger than {limit} bytes")
                for chunk in response.iter_bytes():
                    data.extend(chunk)
                    if len(data) > limit:
                        raise TelegramFileRefusedError(f"the file is larger than {limit} bytes")
        except httpx.HTTPError as error:
            raise BotApiUnreachableError("file download", error, maybe_sent=True) from None
        return bytes(data)


def fetch_telegram_file(ref: MediaRef, settings: Settings) -> bytes:
    """The bytes of a photo someone sent the bot (`telegram_file_ref`): getFile, then its
    download, both from GPT4P_TELEGRAM_API_BASE only, at most GPT4P_TELEGRAM_MEDIA_MAX_BYTES.

    Raises `TelegramFileRefusedError` (the message is safe to show the sender), or
    `BotApiError` / `BotApiUnreachableError` when Telegram refuses or does not answer.
    """
    file_id = ref.url.removeprefix(TELEGRAM_FILE_SCHEME)
    if not ref.url.startswith(TELEGRAM_FILE_SCHEME) or not _FILE_ID.match(file_id):
        raise TelegramFileRefusedError("not a Telegram file reference")
    try:
        api = BotApi.from_settings(settings)
    except ValueError as error:
        raise TelegramFileRefusedError(str(error)) from None
    limit = settings.telegram_media_max_bytes
    try:
        found = api.call("getFile", {"file_id": file_id})
        if not isinstance(found, dict) or not isinstance(found.get("file_path"), str):
            raise TelegramFileRefusedError("Telegram has no such file (any more)")
        if int(found.get("file_size") or 0) > limit:
            raise TelegramFileRefusedError(f"the file is larger than {limit} bytes")
        return api.download(found["file_path"], limit)
    finally:
        api.close()
