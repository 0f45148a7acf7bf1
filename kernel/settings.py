"""Every knob of GPT4People, read from ``GPT4P_*`` environment variables.

This is the single source of configuration: each field is typed, bounded and
described where it is declared, and nothing else in the code base reads
``os.environ`` for a setting.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from kernel.catalogue import BUNDLED_MODELS, DEFAULT_MODEL
from kernel.contract import Priority
from kernel.redis_urls import check_redis_url

ENV_PREFIX = "GPT4P_"
ENV_FILE_VARIABLE = "GPT4P_ENV_FILE"
DEFAULT_ENV_FILE = ".env"
GGUF_MAGIC = b"GGUF"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpt4people"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt4people"


# Passwords an example or a tutorial shows: whoever reads them could log in.
EXAMPLE_PASSWORDS = frozenset({"change-me", "change-me-too", "changeme", "password", "admin"})
MIN_FLOWER_PASSWORD_CHARS = 12
MIN_API_KEY_CHARS = 16
# A browser's Origin header: scheme://host[:port], nothing after (a trailing / is forgiven).
_ORIGIN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s?#]+/?$")


def check_flower_login(login: str) -> None:
    """Raise `ValueError` (never quoting the password) unless `login` is a strong user:password."""
    user, _, password = login.partition(":")
    if not user or not password:
        raise ValueError("must be user:password")
    if "," in login:
        raise ValueError("must not contain a comma (Flower reads it as a second login)")
    if password.lower() in EXAMPLE_PASSWORDS:
        raise ValueError("is the example password: choose your own")
    if len(password) < MIN_FLOWER_PASSWORD_CHARS:
        raise ValueError(f"the password needs {MIN_FLOWER_PASSWORD_CHARS} characters or more")


class SettingsError(RuntimeError):
    """A ``GPT4P_*`` variable holds a value that cannot be used; the message names it."""


class Settings(BaseSettings):
    """All settings; see the README's "Configuration" table for the same list."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        env_ignore_empty=True,  # Compose passes unset variables as ""
        env_file_encoding="utf-8",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """As Compose does: a .env file in the working directory, which the environment
        overrides; GPT4P_ENV_FILE names another file, or none when empty."""
        env_file = os.environ.get(ENV_FILE_VARIABLE, DEFAULT_ENV_FILE) or None
        dotenv = DotEnvSettingsSource(settings_cls, env_file=env_file)
        return init_settings, env_settings, dotenv, file_secret_settings

    # --- Redis and Celery -------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Broker and result store, e.g. redis://:pw@host:6379/0 or rediss://..., or "
        "Sentinels: sentinel://:pw@h1:26379;sentinel://:pw@h2:26379/0; unset: the Redis that "
        "`gpt4people up` started, else redis://127.0.0.1:6379/0.",
    )
    redis_master_name: str = Field(
        "mymaster",
        min_length=1,
        max_length=200,
        description="With a sentinel:// URL: the name under which the Sentinels watch the primary.",
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="With a sentinel:// URL: the Sentinels' own password, if they have one."
    )
    redis_wait_replicas: int = Field(
        1,
        ge=0,
        le=16,
        description="Replicas that must have an accepted message before its channel "
        "acknowledges it (Redis WAIT; at most as many as are connected). 0: never wait.",
    )
    redis_wait_timeout: float = Field(
        1.0,
        gt=0,
        le=4,  # under the 5 s socket timeout of the clients that wait
        description="Seconds to wait for those replicas; then the message is accepted anyway.",
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Runtime files of `gpt4people up` (the embedded Redis URL, its data folder).",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where the bundled default model is assembled.",
    )

    # --- the model ----------------------------------------------------------------------
    engine: Literal["llama", "echo", "scripted"] = Field(
        "llama",
        description="`llama` runs the GGUF model; `echo` answers with the prompt; `scripted` "
        "follows fixed rules (calls helpers on request) for wiring tests.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="The bundled model to run (`gpt4people models` lists them): "
        + ", ".join(BUNDLED_MODELS)
        + ". GPT4P_MODEL_PATH wins over it.",
    )
    model_path: Path | None = Field(
        None, description="A GGUF file to run instead of a bundled model (any llama.cpp model)."
    )
    n_ctx: int = Field(4096, ge=256, le=1_048_576, description="Context window in tokens.")
    parallel: int = Field(
        8, ge=1, le=512,
        description="Jobs one llama worker decodes together (batched, one KV sequence of "
        "GPT4P_N_CTX tokens each); 1: one job at a time per process, without batching.",
    )  # fmt: skip
    priority_slots: int = Field(
        2, ge=0, le=512,
        description="Extra slots of a batched worker that only interactive jobs use (its "
        "queues' fast lanes, `<queue>.interactive`): a person's message starts at once however "
        "busy the other GPT4P_PARALLEL slots are; 0: no fast lane.",
    )  # fmt: skip
    sender_slots: int = Field(
        4, ge=0, le=100_000,
        description="Fair share: jobs of one sender (phone number, address, API key) in "
        "flight at once at their own priority; the sender's further jobs wait as bulk "
        "behind everyone else's. 0: no cap.",
    )  # fmt: skip
    channel_priorities: Annotated[dict[str, Priority], NoDecode] = Field(
        default_factory=dict,
        description="Each channel's default job priority, as `channel=priority` pairs "
        "(e.g. `email=interactive,http=bulk`) over the built-in defaults: sms, whatsapp, "
        "telegram and cli interactive; http and email normal. An HTTP caller may also ask "
        "for a priority per request.",
    )
    batch_invariant: bool = Field(
        False,
        description="Make each answer independent of the other jobs in its batch (greedy "
        "text equals the text alone) by turning off llama.cpp's CPU weight repacking: about "
        "15% less batched throughput on CPU.",
    )
    n_threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads for decoding; unset: all cores."
    )
    n_gpu_layers: int | None = Field(
        None,
        ge=-1,
        le=10_000,
        description="Layers offloaded to the GPU; -1 offloads all; unset: all on a worker "
        "pinned with --gpu, none otherwise.",
    )
    gpu: int | None = Field(
        None, ge=0, le=255, description="Set by `worker --gpu N`: the GPU this worker is pinned to."
    )
    max_tokens: int = Field(
        256, ge=1, le=32_768, description="Default and ceiling for tokens in one answer."
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Default sampling temperature.")
    seed: int | None = Field(
        None, ge=0, description="Sampling seed for reproducible answers; unset: random."
    )
    system_prompt: str = Field(
        "You are GPT4People, a helpful assistant. Answer clearly and briefly.",
        max_length=4000,
        description="Instruction put before every conversation.",
    )
    max_prompt_chars: int = Field(
        32_000, ge=1, le=2_000_000, description="Longest prompt accepted from any channel."
    )

    # --- time limits --------------------------------------------------------------------
    job_timeout: float = Field(
        300.0, gt=0, le=86_400, description="Seconds a caller waits for an answer."
    )
    task_soft_time_limit: int = Field(
        240, ge=1, le=86_400, description="Seconds before an inference is asked to stop."
    )
    task_time_limit: int = Field(
        300, ge=1, le=86_400, description="Seconds before an inference process is killed."
    )

    # --- processes and ports ------------------------------------------------------------
    http_host: str = Field("127.0.0.1", description="Address the web app listens on.")
    http_port: int = Field(8000, ge=1, le=65_535, description="Port of the web app.")
    http_api_key: SecretStr | None = Field(
        None,
        description="When set, /v1/* requires `Authorization: Bearer <key>` (and so do "
        "/metrics, /docs, /openapi.json and /readyz's details, unless made public below).",
    )
    http_api_keys: SecretStr | None = Field(
        None,
        description="More API keys, comma-separated (one per client), each accepted like "
        "GPT4P_HTTP_API_KEY; an Idempotency-Key is scoped to the API key that sent it.",
    )
    http_public_metrics: bool = Field(
        False, description="With an API key set: leave /metrics open (a private scrape network)."
    )
    http_public_docs: bool = Field(
        False, description="With an API key set: leave /docs, /redoc and /openapi.json open."
    )
    http_max_image_bytes: int = Field(
        5_000_000,
        ge=0,
        le=10_000_000,  # the image helper's own ceiling
        description="Largest inline (data: URL) images of one HTTP request together, decoded; "
        "the request body may be this much (base64) larger than a prompt. 0: none accepted.",
    )
    http_cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) whose browser pages may call /v1/*, "
        'comma-separated or a JSON list; "*" for any. Unset: same-origin pages only.',
    )
    flower_port: int = Field(5555, ge=1, le=65_535, description="Port of the Flower dashboard.")
    flower_host: str = Field(
        "127.0.0.1", min_length=1, max_length=253,
        description="Address Flower listens on; anything but loopback needs "
        "GPT4P_FLOWER_BASIC_AUTH (Flower's API can run any task).",
    )  # fmt: skip
    flower_basic_auth: SecretStr | None = Field(
        None,
        description="Flower's login, user:password (a password of 12+ characters, not the "
        "example's); required when GPT4P_FLOWER_HOST is not loopback.",
    )
    worker_heartbeat_ttl: float = Field(
        15.0, ge=1, le=3600,
        description="Seconds without a heartbeat after which a worker's jobs are requeued and "
        "an inference worker no longer counts for /readyz (set the same in every process).",
    )  # fmt: skip
    worker_concurrency: int = Field(
        1, ge=1, le=256, description="Inference processes per worker (each loads the model)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of every process."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="`json`: one object per line with the job id; `text`: for people."
    )

    # --- helpers ----------------------------------------------------------------------
    model_tools: bool = Field(
        False,
        description="Offer the live helpers to the model as tools (for instruct models; "
        "small base models call tools poorly). /name routing works regardless.",
    )
    helper_ttl: float = Field(
        15.0, gt=1, le=3600, description="Seconds a helper stays live without a heartbeat."
    )
    helper_rate_limit: int = Field(
        30, ge=1, le=100_000,
        description="Helper calls (/name, pictures, the model's) one sender may make per "
        "window on a channel; over it, a polite refusal and the helper does not run.",
    )  # fmt: skip
    helper_rate_window: int = Field(
        600, ge=1, le=604_800, description="Helper rate-limit window, seconds."
    )

    # --- SMS (Twilio) -----------------------------------------------------------------
    twilio_account_sid: str | None = Field(
        None, pattern=r"^AC[0-9a-fA-F]{32}$", description="Your Twilio Account SID (AC...)."
    )
    twilio_auth_token: SecretStr | None = Field(
        None, description="Twilio auth token: verifies webhooks and authenticates sends."
    )
    twilio_from: str | None = Field(
        None, max_length=32, description="Number replies are sent from; unset: the number texted."
    )
    twilio_messaging_service_sid: str | None = Field(
        None, pattern=r"^MG[0-9a-fA-F]{32}$", description="Send through this Messaging Service."
    )
    twilio_api_base: str = Field(
        "https://api.twilio.com", description="Twilio's REST base URL (a local recorder in tests)."
    )
    twilio_timeout: float = Field(10.0, gt=0, le=120, description="Seconds per Twilio API call.")
    public_url: str | None = Field(
        None, description="The URL Twilio calls, e.g. https://bot.example.com (behind a proxy)."
    )
    sms_max_parts: int = Field(3, ge=1, le=10, description="Most SMS parts one reply is sent in.")
    sms_max_inbound_chars: int = Field(
        1600, ge=1, le=20_000, description="Longest text message accepted; longer gets a notice."
    )
    sms_max_tokens: int = Field(160, ge=8, le=4096, description="Answer length asked for SMS.")
    sms_rate_limit: int = Field(
        20, ge=1, le=100_000, description="Messages one number may send per window."
    )
    sms_rate_window: int = Field(3600, ge=1, le=604_800, description="Rate-limit window, seconds.")
    sms_history_turns: int = Field(
        6, ge=0, le=100, description="Earlier exchanges kept as a number's conversation."
    )
    sms_history_chars: int = Field(
        2000, ge=0, le=100_000, description="Most characters of history put before a message."
    )
    sms_history_ttl: int = Field(
        86_400, ge=60, le=31_536_000, description="Seconds of silence after which it is forgotten."
    )
    sms_retry_backoff: float = Field(
        2.0, ge=0.05, le=600, description="First delay before a failed send is retried, seconds."
    )
    sms_max_retries: int = Field(6, ge=0, le=50, description="Retries of a transient send failure.")
    sms_media_max_bytes: int = Field(
        5_000_000, ge=1, le=100_000_000, description="Largest MMS media fetched for a helper."
    )
    sms_replay_window_days: int = Field(
        30, ge=1, le=366,
        description="Days a webhook's MessageSid is remembered: a signed webhook posted "
        "again within them is refused (Twilio signs no timestamp to check instead).",
    )  # fmt: skip

    # --- pictures sent back (GET /media/<token>) ----------------------------------------
    media_ttl: int = Field(
        600, ge=1, le=86_400,
        description="Seconds a helper's picture stays at its /media/<token> link, for Twilio "
        "or Telegram to fetch (more than once: retries); then Redis deletes it.",
    )  # fmt: skip
    media_max_bytes: int = Field(
        5_000_000, ge=1, le=20_000_000,
        description="Largest picture sent back by link; a larger one is not sent (the text is).",
    )  # fmt: skip

    # --- WhatsApp (through Twilio: the SMS settings above apply where none is here) -----
    twilio_whatsapp_from: str | None = Field(
        None, pattern=r"^whatsapp:\+[1-9][0-9]{3,16}$",
        description="WhatsApp sender replies come from, with its prefix (whatsapp:+14155238886), "
        "used exactly as From; unset: the Messaging Service, else the number written to.",
    )  # fmt: skip
    whatsapp_max_parts: int = Field(
        3, ge=1, le=10, description="Most WhatsApp messages one reply is sent in."
    )
    whatsapp_max_tokens: int = Field(
        400, ge=8, le=4096, description="Answer length asked for WhatsApp."
    )
    whatsapp_max_per_hour: int = Field(
        300, ge=0, le=1_000_000,
        description="WhatsApp messages (each part counts) sent per clock hour, all senders "
        "together; past it replies are held for the next hour. 0: no cap.",
    )  # fmt: skip

    # --- email (IMAP in, SMTP out) -----------------------------------------------------
    imap_host: str | None = Field(None, description="IMAP server; set to enable the email channel.")
    imap_port: int | None = Field(
        None, ge=1, le=65_535, description="IMAP port; unset: 993 with tls, else 143."
    )
    imap_user: str | None = Field(None, description="IMAP login (often the address).")
    imap_password: SecretStr | None = Field(None, description="IMAP password or app password.")
    imap_ssl: Literal["tls", "starttls", "plain"] = Field(
        "tls",
        description="IMAP connection security: tls, starttls or plain (true/false: tls/plain).",
    )
    imap_folder: str = Field("INBOX", description="Folder watched for questions.")
    imap_processed_folder: str | None = Field(
        None, description="Move handled mail here (created if missing); unset: leave it flagged."
    )
    imap_set_aside_folder: str | None = Field(
        None, description="Move mail that cannot be parsed here; unset: leave it flagged."
    )
    imap_idle: bool = Field(True, description="Use IMAP IDLE when the server offers it.")
    imap_timeout: float = Field(30.0, gt=0, le=600, description="Seconds per IMAP operation.")
    email_poll_seconds: float = Field(
        30.0, gt=0, le=3600, description="Poll interval without IDLE; IDLE re-check interval."
    )
    smtp_host: str | None = Field(None, description="SMTP server replies are sent through.")
    smtp_port: int = Field(587, ge=1, le=65_535, description="SMTP port.")
    smtp_user: str | None = Field(None, description="SMTP login; unset: no authentication.")
    smtp_password: SecretStr | None = Field(None, description="SMTP password or app password.")
    smtp_starttls: bool = Field(True, description="Upgrade the SMTP connection with STARTTLS.")
    smtp_ssl: bool = Field(False, description="Implicit TLS (port 465) instead of STARTTLS.")
    smtp_timeout: float = Field(30.0, gt=0, le=600, description="Seconds per SMTP operation.")
    email_from: str | None = Field(
        None, max_length=320, description="Address replies come from (and our own mail is)."
    )
    email_allow: str | None = Field(
        None, description="Comma-separated senders or @domains to answer; unset: everyone. "
        "A Reply-To is honoured only when it (or its @domain) is listed here.",
    )  # fmt: skip
    email_authserv_id: str | None = Field(
        None, min_length=1, max_length=255,
        description="authserv-id of the Authentication-Results headers our own receiving "
        "server adds (only those are read); unset: no mail counts as authenticated.",
    )  # fmt: skip
    email_require_auth: bool = Field(
        False, description="Answer only mail whose From our server authenticated (DMARC, or "
        "DKIM/SPF aligned with From); needs GPT4P_EMAIL_AUTHSERV_ID. Off: plain mail is "
        "answered at its From address, without quoting it. A Reply-To is honoured only for "
        "authenticated mail, in From's domain and listed in GPT4P_EMAIL_ALLOW, either way.",
    )  # fmt: skip
    email_rate_limit: int = Field(
        20, ge=1, le=100_000, description="Mails one sender may have answered per window."
    )
    email_rate_window: int = Field(3600, ge=1, le=604_800, description="Rate window, seconds.")
    email_max_chars: int = Field(
        8000, ge=1, le=1_000_000, description="Longest question (after quotes are stripped)."
    )
    email_max_attachment_bytes: int = Field(
        10_000_000, ge=0, le=100_000_000, description="Largest attachment kept for helpers."
    )
    email_html: bool = Field(True, description="Add an HTML alternative to replies.")
    email_max_retries: int = Field(8, ge=0, le=50, description="Retries of a failed SMTP send.")
    email_retry_backoff: float = Field(
        5.0, ge=0.05, le=600, description="First delay before a failed send is retried, seconds."
    )

    # --- Telegram (Bot API: a webhook, or long polling with `gpt4people telegram`) -------
    telegram_bot_token: SecretStr | None = Field(
        None, description="The bot's token from BotFather (123456:ABC...); set to enable Telegram."
    )
    telegram_secret: SecretStr | None = Field(
        None,
        description="The secret_token given to setWebhook (1-256 of A-Z a-z 0-9 _ -): POST "
        "/telegram answers only requests carrying it; unset: the webhook answers 503.",
    )
    telegram_api_base: str = Field(
        "https://api.telegram.org", pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="The Bot API server's root (methods at <base>/bot<token>/<method>): a "
        "local Bot API server, or a recorder in tests.",
    )  # fmt: skip
    telegram_mode: Literal["auto", "webhook", "polling"] = Field(
        "auto",
        description="How updates arrive: webhook (POST /telegram), or polling (`gpt4people "
        "telegram`, started by `up`); auto: webhook when GPT4P_TELEGRAM_SECRET and "
        "GPT4P_PUBLIC_URL are set, else polling.",
    )
    telegram_timeout: float = Field(10.0, gt=0, le=120, description="Seconds per Bot API call.")
    telegram_poll_timeout: int = Field(
        25, ge=1, le=50,
        description="Seconds one getUpdates long poll waits for news (its HTTP timeout is 10 s "
        "more).",
    )  # fmt: skip
    telegram_max_parts: int = Field(
        3, ge=1, le=10, description="Most messages (of 4096 characters) one reply is sent in."
    )
    telegram_max_tokens: int = Field(
        512, ge=8, le=4096, description="Answer length asked for Telegram."
    )
    telegram_max_inbound_chars: int = Field(
        4096, ge=1, le=20_000, description="Longest message accepted; longer gets a notice."
    )
    telegram_rate_limit: int = Field(
        20, ge=1, le=100_000, description="Messages one chat may send per window."
    )
    telegram_rate_window: int = Field(
        3600, ge=1, le=604_800, description="Telegram rate-limit window, seconds."
    )
    telegram_history_turns: int = Field(
        6, ge=0, le=100, description="Earlier exchanges kept as a chat's conversation."
    )
    telegram_history_chars: int = Field(
        4000, ge=0, le=100_000, description="Most characters of history put before a message."
    )
    telegram_history_ttl: int = Field(
        86_400, ge=60, le=31_536_000, description="Seconds of silence after which it is forgotten."
    )
    telegram_replay_window_days: int = Field(
        30, ge=1, le=366,
        description="Days an update is remembered: the same update posted again within them "
        "is answered once.",
    )  # fmt: skip
    telegram_media_max_bytes: int = Field(
        10_000_000, ge=1, le=20_000_000,
        description="Largest photo fetched for a helper (Telegram's bots download 20 MB at most).",
    )  # fmt: skip
    telegram_retry_backoff: float = Field(
        2.0, ge=0.05, le=600, description="First delay before a failed send is retried, seconds."
    )
    telegram_max_retries: int = Field(
        6, ge=0, le=50, description="Retries of a transient Telegram send failure."
    )
    telegram_max_per_hour: int = Field(
        1000, ge=0, le=1_000_000,
        description="Telegram messages (each part counts) sent per clock hour, all chats "
        "together; past it replies are held for the next hour. 0: no cap.",
    )  # fmt: skip

    @field_validator("telegram_bot_token")
    @classmethod
    def _bot_token_shape(cls, value: SecretStr | None) -> SecretStr | None:
        # Never quoted: the message names the shape, not the value.
        if value is not None and not re.fullmatch(r"\d{1,20}:[A-Za-z0-9_-]{20,100}",
                                                  value.get_secret_value()):  # fmt: skip
            raise ValueError("must be BotFather's token, digits:letters (123456:ABC-DEF...)")
        return value

    @field_validator("telegram_secret")
    @classmethod
    def _webhook_secret_shape(cls, value: SecretStr | None) -> SecretStr | None:
        # Telegram accepts only these characters in setWebhook's secret_token.
        secret = value.get_secret_value() if value is not None else ""
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise ValueError("must be 1 to 256 characters of A-Z, a-z, 0-9, _ and -")
        return value

    @property
    def telegram_polling(self) -> bool:
        """Whether Telegram's updates are fetched by `gpt4people telegram` (else the webhook)."""
        if self.telegram_bot_token is None:
            return False
        if self.telegram_mode == "auto":
            return not (self.telegram_secret and self.public_url)
        return self.telegram_mode == "polling"

    # --- outbound caps (everything a channel sends, all senders together) -------------
    sms_max_per_hour: int = Field(
        300, ge=0, le=1_000_000,
        description="SMS messages (each part counts) sent per clock hour, all numbers "
        "together; past it replies are held for the next hour. 0: no cap.",
    )  # fmt: skip
    email_max_per_hour: int = Field(
        100, ge=0, le=1_000_000,
        description="Email replies sent per clock hour, all senders together; past it replies "
        "are held for the next hour. 0: no cap.",
    )  # fmt: skip
    outbound_hold_max_age: int = Field(
        4 * 3600, ge=0, le=86_400,
        description="Seconds a reply held by an outbound cap may wait; an older one is "
        "dropped (counted). 0: drop at once instead of holding.",
    )  # fmt: skip

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        return check_redis_url(value) if value else None

    @field_validator("flower_basic_auth")
    @classmethod
    def _strong_flower_login(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_flower_login(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _auth_needs_our_server(self) -> Settings:
        # Without our server's id nothing is authenticated: requiring it would answer no one.
        if self.email_require_auth and not self.email_authserv_id:
            raise ValueError(
                "GPT4P_EMAIL_REQUIRE_AUTH=true needs GPT4P_EMAIL_AUTHSERV_ID (the authserv-id "
                "your receiving server writes in Authentication-Results)"
            )
        return self

    @field_validator("http_api_key", "http_api_keys")
    @classmethod
    def _long_api_keys(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # A blank key would leave every endpoint open without a word; a short one is guessed.
        if value is not None:
            given = value.get_secret_value()
            several = info.field_name == "http_api_keys"
            keys = [k.strip() for k in (given.split(",") if several else [given])]
            keys = [k for k in keys if k] if several else keys  # "a,b," is a list of two
            if not keys or any(len(k) < MIN_API_KEY_CHARS for k in keys):
                raise ValueError(
                    f"each API key needs {MIN_API_KEY_CHARS} characters or more (no blank ones)"
                )
        return value

    @field_validator("http_cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        # "https://a.example,https://b.example" or '["https://a.example"]' (or a list).
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [o.strip() for o in text.split(",") if o.strip()]
        return value

    @field_validator("http_cors_origins")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"{origin!r} is not an origin (scheme://host[:port], no path), nor '*'"
                )
        return [o.rstrip("/") for o in origins]

    @field_validator("channel_priorities", mode="before")
    @classmethod
    def _priority_pairs(cls, value: object) -> object:
        """`sms=interactive,http=bulk` as people write it (JSON is accepted too)."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("{"):
            return json.loads(value)
        pairs = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            channel, equals, priority = item.partition("=")
            if not equals:
                raise ValueError(f"expected channel=priority, got {item!r}")
            pairs[channel.strip()] = priority.strip()
        return pairs

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("model", mode="before")
    @classmethod
    def _bundled_model(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        name = value.strip().lower()
        for model in BUNDLED_MODELS.values():
            if name == model.name or name in model.aliases:
                return model.name
        raise ValueError(
            f"{value!r} is not a bundled model; one of: {', '.join(BUNDLED_MODELS)} "
            "(or set GPT4P_MODEL_PATH to a GGUF file)"
        )

    @field_validator("imap_ssl", mode="before")
    @classmethod
    def _imap_ssl_words(cls, value: object) -> object:
        # GPT4P_IMAP_SSL=true/false as people write it: TLS from the start, or none.
        if isinstance(value, str):
            word = value.strip().lower()
            if word in {"true", "yes", "on", "1", "ssl"}:
                return "tls"
            if word in {"false", "no", "off", "0", "none"}:
                return "plain"
            return word
        if isinstance(value, bool):
            return "tls" if value else "plain"
        return value

    @field_validator("model_path")
    @classmethod
    def _model_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"no GGUF file at {value}")
        with value.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise ValueError(f"{value} is not a GGUF file (it does not start with 'GGUF')")
        return value


def _explain(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        if not problem["loc"]:  # a check of several fields: its message names them
            lines.append(str(problem["msg"]))
            continue
        lines.append(f"{ENV_PREFIX}{str(problem['loc'][0]).upper()}: {problem['msg']}")
    return "invalid settings: " + "; ".join(lines)


def load_settings() -> Settings:
    """Read the settings from the environment, raising `SettingsError` naming each bad variable."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(_explain(error)) from None
    except (OSError, UnicodeDecodeError) as error:  # the .env file
        name = os.environ.get(ENV_FILE_VARIABLE, DEFAULT_ENV_FILE)
        raise SettingsError(f"cannot read {name} ({ENV_FILE_VARIABLE}): {error}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
