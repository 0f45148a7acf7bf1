"""Calling helpers by name from the core: explicit ``/name``, by media type, or by the model.

The core never waits for a helper. It plans the call here (`HelperGateway.plan`),
and the runtime hands the job over (`workers.handover`): the helper runs on its
own queue and a continuation answers the job with the helper's value, worded
here (`HelperGateway.outcome`). Every failure becomes a short sentence for the
user (and a log line for the operator): an unknown name, a helper with no live
instance, a sender over the helper rate limit, a helper that raised, ran out of
time, was killed or never answered.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kernel.channels import channel_facts
from kernel.contract import Job, MediaRef
from kernel.helper_contract import MAX_REQUEST_CHARS, HelperRequest
from kernel.helper_registry import HelperInfo, HelperRegistry
from kernel.metrics import Metrics
from kernel.ratelimit import SenderRateLimit
from kernel.settings import get_settings

log = logging.getLogger(__name__)

EXPLICIT = re.compile(r"^/([a-z][a-z0-9_-]{0,31})(?:[ \t\r\n]+(.*))?$", re.DOTALL)
RATE_LIMITED = "Sorry, you have asked the helpers too often. Please try again in a few minutes."


@dataclass(frozen=True)
class HelperOutcome:
    """What a helper call produced, already worded for the user."""

    name: str
    text: str
    ok: bool
    image_base64: str | None = None
    image_type: str | None = None


class AfterHelper(BaseModel):
    """How to answer a job once its helper is done; JSON, it travels with the helper call."""

    model_config = ConfigDict(extra="forbid")

    helper: str
    job: Job = Field(description="The job, without its media (the helper has those).")
    tool_call: str | None = Field(
        None, description="The model's own call, when the model asked for the helper: "
        "the model then answers with the helper's outcome.",
    )  # fmt: skip


@dataclass(frozen=True)
class HelperCall:
    """A helper to run for a job: the runtime hands the job over and frees its slot."""

    info: HelperInfo
    request: HelperRequest
    then: AfterHelper


def parse_explicit(prompt: str) -> tuple[str, str] | None:
    """``/calc 2+2`` -> ("calc", "2+2"); None when the prompt does not name a helper."""
    match = EXPLICIT.match(prompt.strip())
    if match is None:
        return None
    return match.group(1), (match.group(2) or "").strip()


def _available(helpers: list[HelperInfo]) -> str:
    names = [h.name for h in helpers if h.live]
    return "Available: " + ", ".join(names) + "." if names else "No helpers are running right now."


def sender_key(job: Job) -> str:
    """Who asked, on which channel, as a Redis key part (a hash: no number or address)."""
    return hashlib.sha256(f"{job.channel}\n{job.user}".encode()).hexdigest()[:20]


def word(name: str, value: dict[str, Any]) -> HelperOutcome:
    """The user's sentence for what a helper task returned: its result, its error, or a
    failure (``timeout``, ``error``, or ``late``: no answer in time)."""
    failure, text = value.get("failure"), value.get("text")
    if failure in {"timeout", "late"}:
        return HelperOutcome(name, f"Sorry, the {name} helper took too long.", ok=False)
    if failure is None and "error" in value:
        return HelperOutcome(name, f"{name}: {value['error']}", ok=False)
    if failure is not None or not isinstance(text, str) or not text.strip():
        return HelperOutcome(name, f"Sorry, the {name} helper could not do that.", ok=False)
    return HelperOutcome(
        name, text, ok=True,
        image_base64=value.get("image_base64"), image_type=value.get("image_type"),
    )  # fmt: skip


class HelperGateway:
    """Looks helpers up in the registry, limits calls per sender, words outcomes."""

    def __init__(self, registry: HelperRegistry, limit: SenderRateLimit | None = None) -> None:
        self.registry = registry
        self.limit = limit

    def live(self) -> list[HelperInfo]:
        """The helpers that can be called now."""
        return self.registry.live()

    def for_media(self, media: list[MediaRef]) -> HelperInfo | None:
        """A live helper that declared it handles one of these media types."""
        for info in self.live():
            if any(fnmatch(m.content_type, p) for m in media for p in info.accepts):
                return info
        return None

    def plan(
        self, name: str, text: str, job: Job, tool_call: str | None = None
    ) -> HelperCall | HelperOutcome:
        """The call of helper `name` for `job`, or the answer when it cannot run (unknown,
        not running, or the sender is over GPT4P_HELPER_RATE_LIMIT)."""
        info = self.registry.get(name)
        if info is None or not info.live:
            state = "is not running right now" if info else "does not exist"
            message = f"The helper '{name}' {state}. {_available(self.registry.all())}"
            return HelperOutcome(name, message, ok=False)
        metrics = Metrics(self.registry.redis)
        if self.limit is not None and self.limit.verdict(sender_key(job)) != "ok":
            log.info("helper %s refused: the sender is over the helper rate limit", name)
            metrics.count("gpt4p_helper_failures", {"helper": name, "reason": "rate_limited"})
            return HelperOutcome(name, RATE_LIMITED, ok=False)
        metrics.count("gpt4p_helper_calls", {"helper": name})
        request = HelperRequest(
            text=text[:MAX_REQUEST_CHARS], media=job.media, channel=job.channel,
            channel_carries_images=channel_facts(job.channel).sends_pictures(get_settings()),
        )  # fmt: skip
        then = AfterHelper(helper=name, job=job.model_copy(update={"media": []}),
                           tool_call=tool_call)  # fmt: skip
        return HelperCall(info, request, then)

    def outcome(self, name: str, value: dict[str, Any]) -> HelperOutcome:
        """Word what helper `name` returned, counting failures in the metrics."""
        outcome = word(name, value)
        if not outcome.ok:
            reason = "timeout" if "too long" in outcome.text else "error"
            Metrics(self.registry.redis).count(
                "gpt4p_helper_failures", {"helper": name, "reason": reason}
            )
        return outcome
