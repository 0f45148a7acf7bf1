"""Text as it is generated, published on a Redis channel per job for streaming clients."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from kernel.contract import TokenLogprob
from kernel.keys import STREAM_PREFIX


def stream_channel(job_id: str) -> str:
    """The pub/sub channel carrying `job_id`'s text deltas."""
    return STREAM_PREFIX + job_id


def encode_event(
    kind: Literal["delta", "restart", "end"],
    text: str = "",
    logprobs: list[TokenLogprob] | None = None,
) -> str:
    """One streaming event as JSON: a text delta (with the logprobs of its tokens when the
    job asked for them), a restart after the job was requeued, or the end of the text (the
    reply follows at once)."""
    event: dict[str, Any] = {"kind": kind, "text": text}
    if logprobs is not None:
        event["logprobs"] = [logprob.model_dump(mode="json") for logprob in logprobs]
    return json.dumps(event)


def decode_event(raw: bytes | str) -> tuple[str, str]:
    """The (kind, text) of a streaming event."""
    event = decode_stream_event(raw)
    return event.kind, event.text


@dataclass(frozen=True)
class StreamEvent:
    """A decoded streaming event; `logprobs` is None unless the job asked for them."""

    kind: str
    text: str
    logprobs: list[TokenLogprob] | None = None


def decode_stream_event(raw: bytes | str) -> StreamEvent:
    """A streaming event with its logprobs, if it carries them."""
    data = json.loads(raw)
    logprobs = data.get("logprobs")
    return StreamEvent(
        kind=str(data["kind"]),
        text=str(data.get("text", "")),
        logprobs=None if logprobs is None
        else [TokenLogprob.model_validate(item) for item in logprobs],
    )  # fmt: skip
