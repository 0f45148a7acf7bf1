"""The helper SDK: declare a helper in one short module.

    from helpers.sdk import HelperRequest, HelperResult, helper

    @helper("shout", "Repeats your text in capitals.", capabilities=["text.upper"])
    def shout(request: HelperRequest) -> HelperResult:
        return HelperResult(text=request.text.upper())

`gpt4people helper mypackage.shout` then runs it as a Celery worker on queue
``helper.shout``, registered in Redis with a heartbeat, and ``/shout hello``
on any channel is routed to it. The SDK depends on the kernel only, so a
helper's module (and its own unit test) imports it first thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kernel.contract import HARD_LIMIT_MARGIN_S, MediaRef
from kernel.helper_contract import (
    MAX_REQUEST_CHARS,
    NAME_PATTERN,
    HelperError,
    HelperRequest,
    HelperResult,
)
from kernel.media import MediaRefusedError, fetch_media

__all__ = [
    "MAX_REQUEST_CHARS",
    "NAME_PATTERN",
    "Helper",
    "HelperError",
    "HelperRequest",
    "HelperResult",
    "MediaRef",
    "MediaRefusedError",
    "fetch_media",
    "helper",
]

Handler = Callable[[HelperRequest], HelperResult]


@dataclass(frozen=True)
class Helper:
    """A declared helper: its public description (a `kernel.helper_contract.HelperSpec`)
    and its handler."""

    name: str
    description: str
    handler: Handler
    capabilities: tuple[str, ...] = ()
    accepts: tuple[str, ...] = field(default_factory=tuple)
    version: str = "1"
    time_limit: float = 20.0
    max_input_chars: int = 2000

    @property
    def hard_time_limit(self) -> float:
        """Seconds after which the helper's process is killed, if it ignored its time limit."""
        return self.time_limit + HARD_LIMIT_MARGIN_S

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"helper name {self.name!r} must match {NAME_PATTERN.pattern}")
        if not 0 < self.time_limit <= 600:
            raise ValueError("time_limit must be between 0 and 600 seconds")

    def run(self, request: HelperRequest) -> HelperResult:
        """Check the request against this helper's limits, then handle it."""
        if len(request.text) > self.max_input_chars:
            raise HelperError(
                f"that is too long for {self.name} (at most {self.max_input_chars} characters)"
            )
        result = self.handler(request)
        if result.image_base64 is not None and not request.channel_carries_images:
            # Never shipped (or stored in Redis) where nobody can receive it.
            result = result.model_copy(update={"image_base64": None, "image_type": None})
        return result


def helper(
    name: str,
    description: str,
    capabilities: Sequence[str] = (),
    accepts: Sequence[str] = (),
    version: str = "1",
    time_limit: float = 20.0,
    max_input_chars: int = 2000,
) -> Callable[[Handler], Helper]:
    """Declare a helper: `accepts` lists the media types it handles (e.g. ``image/png``)."""

    def declare(handler: Handler) -> Helper:
        return Helper(
            name=name,
            description=description,
            handler=handler,
            capabilities=tuple(capabilities),
            accepts=tuple(accepts),
            version=version,
            time_limit=time_limit,
            max_input_chars=max_input_chars,
        )

    return declare
