"""Turning a Telegram update into a job, or answering a command itself: the same work
for the webhook (`channels.telegram.webhook`) and the poller (`channels.telegram.poller`).

An update is handled once: its ids are claimed in Redis for
GPT4P_TELEGRAM_REPLAY_WINDOW_DAYS, so Telegram's retries of a webhook and a replayed
request get no second answer. ``/start`` and ``/help`` are answered without the
model, ``/reset`` clears the chat's conversation; any other ``/name`` goes to the
core as written (a helper), without the ``@botname`` Telegram adds in groups. Replies
go out later through ``deliver.telegram``, never in the webhook's answer.
"""

from __future__ import annotations

import logging

from celery import Celery

from channels.telegram.state import TelegramState, chat_id, chat_key
from channels.telegram.updates import Message, Update
from kernel.contract import ChatMessage, GenerationOptions, Job, Reply
from kernel.metrics import Metrics
from kernel.replication import make_durable
from kernel.settings import Settings
from workers.client import enqueue_delivery, submit

log = logging.getLogger(__name__)

START_TEXT = "Hello! I'm GPT4People: ask me anything and an AI model answers here. /help says more."
HELP_TEXT = (
    "GPT4People: write any question and an AI model answers in this chat. Send a photo "
    "with /image info (or resize 320x200, thumbnail 128, grayscale) to work on it. "
    "/reset starts a new conversation."
)
RESET_TEXT = "Done: our conversation is cleared. What would you like to ask?"
RATE_TEXT = "You've sent a lot of messages. Please wait a while before writing again."
TOO_LONG_TEXT = "Your message is {length} characters long; please keep it under {limit}."
EMPTY_TEXT = "I read text and photos: send me a question in words."
TELEGRAM_BREVITY = " You are answering in a Telegram chat: reply concisely, in plain text."


def described(update: Update) -> str:
    """The update and its chat's pseudonym, as logs name them (never the chat's id)."""
    chat = update.message.chat.id if update.message else None
    return f"update {update.update_id} from chat {chat_id(chat) if chat is not None else '-'}"


def command_of(words: str) -> tuple[str, str] | None:
    """A leading ``/name`` (``/name@bot`` in groups): its lowercased name and the text with
    the ``@bot`` dropped; None for a message that is no command."""
    head, _, rest = words.strip().partition(" ")
    if not head.startswith("/") or len(head) < 2:
        return None
    name = head[1:].split("@", 1)[0]
    return name.lower(), f"/{name} {rest}".strip()


class TelegramChannel:
    """Handles one update exactly once: a command answered, or a job queued."""

    name = "telegram"

    def __init__(self, settings: Settings, state: TelegramState, celery: Celery) -> None:
        self.settings = settings
        self.state = state
        self.celery = celery

    def to_job(self, update: Update, message: Message, words: str) -> Job:
        """A job for an ordinary message: the chat's conversation, then this message."""
        settings, who = self.settings, chat_key(message.chat.id)
        system = ChatMessage(role="system", content=settings.system_prompt + TELEGRAM_BREVITY)
        return Job(
            id=f"{self.name}-{update.update_id}",
            channel=self.name,
            user=who,
            messages=[system, *self.state.history(who), ChatMessage(role="user", content=words)],
            options=GenerationOptions(max_tokens=settings.telegram_max_tokens),
            reply_to=str(message.chat.id),
            media=message.media(settings.telegram_media_max_bytes),
            idempotency_key=update.source_id,
        )

    def _answer(self, update: Update, message: Message, text: str) -> None:
        reply = Reply(job_id=f"{self.name}-{update.update_id}", channel=self.name,
                      reply_to=str(message.chat.id), text=text, model="none",
                      engine="keyword")  # fmt: skip
        enqueue_delivery(self.celery, self.state.redis, reply)

    def receive(self, update: Update, replay: bool = False) -> str:
        """Handle one update exactly once; return what was done (for the log).

        `replay` is for an update handled again after a failure (from the spool, or one
        the poller fetches again because its place was not stored): its first attempt
        may have claimed it, and what follows is idempotent per update.
        """
        message, state = update.message, self.state
        if message is None:
            return "ignored (not a message)"
        if message.sender is not None and message.sender.is_bot:
            return "ignored (from a bot)"
        seen_days_ago = state.claim_message(update.source_id)
        if seen_days_ago is not None and not replay:
            Metrics(state.redis).count("gpt4p_webhook_duplicates", {"channel": self.name})
            return f"duplicate (first seen {seen_days_ago} day(s) ago)"
        who = chat_key(message.chat.id)
        state.opt_in(who)  # writing to the bot again undoes a block it was told of (403)
        verdict = state.rate_verdict(who)
        if verdict != "ok":
            if verdict == "notify":
                self._answer(update, message, RATE_TEXT)
            return f"rate limited ({verdict})"
        words = message.words.strip()
        command = command_of(words)
        if command is not None:
            name, words = command
            answer = {"start": START_TEXT, "help": HELP_TEXT, "reset": RESET_TEXT}.get(name)
            if answer is not None:
                if name == "reset":
                    state.forget(who)
                self._answer(update, message, answer)
                return f"/{name}"
        length, limit = len(words), self.settings.telegram_max_inbound_chars
        if length > limit:
            self._answer(update, message, TOO_LONG_TEXT.format(length=length, limit=limit))
            return "too long"
        job = self.to_job(update, message, words)
        if not words and not job.media:
            self._answer(update, message, EMPTY_TEXT)
            return "empty"
        submit(self.celery, job, client=state.redis)
        state.remember(who, job.messages[-1])
        return f"queued job {job.id}"

    def receive_durably(self, update: Update, replay: bool = False) -> str:
        """`receive`, returning only once Redis replicas have what it wrote (when there are
        replicas), so that the 200 to Telegram or the poller's next place survives a failover."""
        outcome = self.receive(update, replay)
        make_durable(self.state.redis, self.settings)
        return outcome
