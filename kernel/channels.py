"""Every channel's facts, registered in one place: its name, whether it answers later
(from a task on its own ``deliver.<channel>`` queue), whether it carries pictures, its
webhook route, one message's length limit, the settings that enable it and the process
`gpt4people up` starts for it.

The core and the runtime ask these facts of a job's channel (`channel_facts`); the
operator's tools follow the list (`CHANNELS`) instead of naming channels by hand. A new
channel is one sub-package of `channels` plus one line here, by these conventions:

- ``route``: ``channels.<name>.webhook`` has ``router`` (a FastAPI APIRouter) serving
  ``POST <route>``; the web app mounts it (channels.web).
- ``delivers_later``: ``channels.<name>.delivery`` registers the task
  ``gpt4people.deliver.<name>``, which every worker imports (celeryconfig) and
  `gpt4people deliver` consumes from ``deliver.<name>`` (all such queues by default, so
  Compose's deliver service needs no change).
- ``command``: `gpt4people <command>` runs the channel's own process (a poller), which
  `gpt4people up` starts when ``configured(settings)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kernel.contract import Priority, delivery_queue, delivery_task
from kernel.settings import Settings


def always(_: Settings) -> bool:
    """A channel that needs no settings (the HTTP API, the CLI) is always on."""
    return True


def sms_configured(settings: Settings) -> bool:
    """Twilio's webhook is verified with the auth token of the account: both are needed."""
    return settings.twilio_account_sid is not None and settings.twilio_auth_token is not None


def whatsapp_configured(settings: Settings) -> bool:
    """The Twilio account, and a WhatsApp sender or a Messaging Service to answer from."""
    return sms_configured(settings) and bool(
        settings.twilio_whatsapp_from or settings.twilio_messaging_service_sid
    )


def telegram_configured(settings: Settings) -> bool:
    """A bot token: updates come by webhook or by polling (Settings.telegram_polling)."""
    return settings.telegram_bot_token is not None


def email_configured(settings: Settings) -> bool:
    """The IMAP poller runs once there is a server to watch."""
    return bool(settings.imap_host)


@dataclass(frozen=True)
class ChannelFacts:
    """What the rest of GPT4People needs to know about one channel."""

    name: str
    # Answered later, by the channel's delivery task; else the caller waits for the result.
    delivers_later: bool
    # Can carry a helper's picture with the text (as an attachment): helpers make pictures
    # only for such channels.
    carries_images: bool = False
    # Its webhook's path (POST), served by ``channels.<name>.webhook.router``; None: none.
    route: str | None = None
    # One message's length limit, in characters; None: no limit of the channel's own.
    max_chars: int | None = None
    # Whether the settings enable it (`up` starts its command, `status` says so).
    configured: Callable[[Settings], bool] = always
    # `gpt4people <command>`: the channel's own process, started by `up` when configured
    # (or, when given, when `runs_command` says so: Telegram polls only without a webhook).
    command: str | None = None
    runs_command: Callable[[Settings], bool] | None = None
    # Pictures go out as a link under GPT4P_PUBLIC_URL (Twilio fetches them): without
    # one, no picture is made for the channel and the person is told so.
    pictures_by_link: bool = False
    # Its jobs' priority unless the caller or GPT4P_CHANNEL_PRIORITIES says otherwise:
    # interactive where a person waits with a phone in hand.
    priority: Priority = "normal"
    # The Settings fields (GPT4P_<FIELD>) an operator sets for it: `status` names them,
    # and Compose passes each to its services (tests/test_deploy.py checks).
    settings: tuple[str, ...] = ()

    def sends_pictures(self, settings: Settings) -> bool:
        """Whether a helper's picture can reach a person on this channel with `settings`."""
        return self.carries_images and (not self.pictures_by_link or bool(settings.public_url))

    def starts_command(self, settings: Settings) -> bool:
        """Whether `up` starts this channel's own process with `settings`."""
        wanted = self.runs_command or self.configured
        return self.command is not None and wanted(settings)

    @property
    def delivery_queue(self) -> str:
        """The queue of this channel's delivery task (channels that deliver later)."""
        return delivery_queue(self.name)

    @property
    def delivery_task(self) -> str:
        """The name of this channel's delivery task (channels that deliver later)."""
        return delivery_task(self.name)


CHANNELS: dict[str, ChannelFacts] = {
    facts.name: facts
    for facts in (
        ChannelFacts("http", delivers_later=False),
        ChannelFacts("cli", delivers_later=False, priority="interactive"),
        ChannelFacts("sms", delivers_later=True, priority="interactive", carries_images=True,
                     route="/sms", max_chars=1600, configured=sms_configured,
                     pictures_by_link=True,
                     settings=("twilio_account_sid", "twilio_auth_token", "twilio_from",
                               "twilio_messaging_service_sid", "public_url")),
        ChannelFacts("email", delivers_later=True, carries_images=True,
                     configured=email_configured, command="email",
                     settings=("imap_host", "imap_user", "imap_password", "smtp_host",
                               "smtp_user", "smtp_password", "email_from")),
        ChannelFacts("whatsapp", delivers_later=True, priority="interactive",
                     carries_images=True, route="/whatsapp", max_chars=1600,
                     configured=whatsapp_configured, pictures_by_link=True,
                     settings=("twilio_account_sid", "twilio_auth_token", "twilio_whatsapp_from",
                               "twilio_messaging_service_sid", "public_url")),
        # Its webhook answers once GPT4P_TELEGRAM_SECRET is set; `up` polls instead while
        # the settings choose polling (Settings.telegram_polling).
        ChannelFacts("telegram", delivers_later=True, priority="interactive",
                     carries_images=True, route="/telegram", max_chars=4096,
                     configured=telegram_configured, command="telegram",
                     runs_command=lambda settings: settings.telegram_polling,
                     settings=("telegram_bot_token", "telegram_secret", "telegram_mode",
                               "public_url")),
    )
}  # fmt: skip
# A job from a channel not listed (a test's, an integration's) waits for its result.
_UNLISTED = ChannelFacts("", delivers_later=False)


def channel_facts(name: str) -> ChannelFacts:
    """The facts of the channel called `name` (an unlisted channel delivers nothing later)."""
    return CHANNELS.get(name, _UNLISTED)


def channel_priority(name: str, settings: Settings) -> Priority:
    """The priority of a job from channel `name` that did not ask for one."""
    return settings.channel_priorities.get(name, channel_facts(name).priority)


def delivered_channels() -> list[ChannelFacts]:
    """The channels that answer later, in the order they are registered."""
    return [c for c in CHANNELS.values() if c.delivers_later]


def webhook_channels() -> list[ChannelFacts]:
    """The channels with a webhook route (mounted by the web app), in registered order."""
    return [c for c in CHANNELS.values() if c.route is not None]


def started_channels(settings: Settings) -> list[ChannelFacts]:
    """The channels whose own process (`gpt4people <command>`) `up` starts with `settings`."""
    return [c for c in CHANNELS.values() if c.starts_command(settings)]
