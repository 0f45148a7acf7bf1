"""Calling helpers by name from the core: explicit ``/name``, by media type, or by the model.

Every failure becomes a short sentence for the user (and a log line for the
operator): an unknown name, a helper with no live instance, a helper that
raised or ran out of time. Nothing here hangs longer than the helper's own
time limit plus a margin.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError

from helpers.registry import HelperInfo, HelperRegistry
from helpers.sdk import HelperRequest
from workers.contract import MediaRef, helper_task
from workers.metrics import Metrics

log = logging.getLogger(__name__)

EXPLICIT = re.compile(r"^/([a-z][a-z0-9_-]{0,31})(?:[ \t\r\n]+(.*))?$", re.DOTALL)
WAIT_MARGIN_S = 10.0


@dataclass(frozen=True)
class HelperOutcome:
    """What a helper call produced, already worded for the user."""

    name: str
    text: str
    ok: bool
    image_base64: str | None = None
    image_type: str | None = None


def parse_explicit(prompt: str) -> tuple[str, str] | None:
    """``/calc 2+2`` -> ("calc", "2+2"); None when the prompt does not name a helper."""
    match = EXPLICIT.match(prompt.strip())
    if match is None:
        return None
    return match.group(1), (match.group(2) or "").strip()


def parse_tool_call(text: str, names: set[str]) -> tuple[str, str] | None:
    """A structured call ``{"helper": NAME, "input": TEXT}`` in model output, if any."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        call = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict):
        return None
    name, given = call.get("helper"), call.get("input", "")
    if isinstance(name, str) and name in names and isinstance(given, str | int | float):
        return name, str(given)
    return None


def _available(helpers: list[HelperInfo]) -> str:
    names = [h.name for h in helpers if h.live]
    return "Available: " + ", ".join(names) + "." if names else "No helpers are running right now."


class HelperGateway:
    """Looks helpers up in the registry and runs them on their own queues."""

    def __init__(self, app: Celery, registry: HelperRegistry) -> None:
        self.app = app
        self.registry = registry

    def live(self) -> list[HelperInfo]:
        """The helpers that can be called now."""
        return self.registry.live()

    def for_media(self, media: list[MediaRef]) -> HelperInfo | None:
        """A live helper that declared it handles one of these media types."""
        for info in self.live():
            if any(fnmatch(m.content_type, p) for m in media for p in info.accepts):
                return info
        return None

    def call(self, name: str, text: str, media: list[MediaRef], channel: str) -> HelperOutcome:
        """Run helper `name` and word the outcome, failures included."""
        info = self.registry.get(name)
        if info is None or not info.live:
            everyone = self.registry.all()
            state = "is not running right now" if info else "does not exist"
            message = f"The helper '{name}' {state}. {_available(everyone)}"
            return HelperOutcome(name, message, ok=False)
        metrics = Metrics(self.registry.redis)
        metrics.count("gpt4p_helper_calls", {"helper": name})
        outcome = self._run(info, text, media, channel)
        if not outcome.ok:
            reason = "timeout" if "too long" in outcome.text else "error"
            metrics.count("gpt4p_helper_failures", {"helper": name, "reason": reason})
        return outcome

    def _run(
        self, info: HelperInfo, text: str, media: list[MediaRef], channel: str
    ) -> HelperOutcome:
        name = info.name
        request = HelperRequest(text=text, media=media, channel=channel)
        result = self.app.send_task(
            helper_task(name), args=[request.model_dump(mode="json")], queue=info.queue,
            argsrepr=f"<helper request, {len(text)} chars, {len(media)} media>",
        )  # fmt: skip
        try:
            value: Any = result.get(
                timeout=info.time_limit + WAIT_MARGIN_S, disable_sync_subtasks=False
            )
        except CeleryTimeoutError:
            log.warning("helper %s did not answer in %.0fs", name, info.time_limit + WAIT_MARGIN_S)
            result.revoke()
            return HelperOutcome(name, f"Sorry, the {name} helper took too long.", ok=False)
        except Exception as error:  # noqa: BLE001 - any failure inside the helper
            kind = error.__class__.__name__
            log.warning("helper %s failed: %s", name, kind)
            if "TimeLimit" in kind:
                return HelperOutcome(name, f"Sorry, the {name} helper took too long.", ok=False)
            return HelperOutcome(name, f"Sorry, the {name} helper could not do that.", ok=False)
        if "error" in value:
            return HelperOutcome(name, f"{name}: {value['error']}", ok=False)
        return HelperOutcome(
            name, value["text"], ok=True,
            image_base64=value.get("image_base64"), image_type=value.get("image_type"),
        )  # fmt: skip
