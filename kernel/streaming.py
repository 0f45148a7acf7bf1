"""Text as it is generated, published on a Redis channel per job for streaming clients."""

from __future__ import annotations

import json
from typing import Literal

from kernel.keys import STREAM_PREFIX


def stream_channel(job_id: str) -> str:
    """The pub/sub channel carrying `job_id`'s text deltas."""
    return STREAM_PREFIX + job_id


def encode_event(kind: Literal["delta", "restart", "end"], text: str = "") -> str:
    """One streaming event as JSON: a text delta, a restart after the job was requeued,
    or the end of the text (the reply follows at once)."""
    return json.dumps({"kind": kind, "text": text})


def decode_event(raw: bytes | str) -> tuple[str, str]:
    """The (kind, text) of a streaming event."""
    data = json.loads(raw)
    return str(data["kind"]), str(data.get("text", ""))
