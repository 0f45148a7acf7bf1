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

from kernel.helper_contract import (
    MAX_REQUEST_CHARS,
    NAME_PATTERN,
    HelperError,
    HelperRequest,
    HelperResult,
    HelperSpec,
)

__all__ = [
    "MAX_REQUEST_CHARS",
    "NAME_PATTERN",
    "Helper",
    "HelperError",
    "HelperRequest",
    "HelperResult",
    "helper",
]

Handler = Callable[[HelperRequest], HelperResult]


@dataclass(frozen=True)
class Helper(HelperSpec):
    """A declared helper: its public description and its handler."""

    handler: Handler = field(kw_only=True)

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
