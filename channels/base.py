"""The shape every channel shares: turn what arrived into a `Job`, send a `Reply` back.

Channels that answer inside the request (HTTP, CLI) deliver by returning the
reply to the waiting caller; channels that answer later (SMS, email) deliver
from a task on their ``deliver.<channel>`` queue.
"""

from __future__ import annotations

from typing import Protocol

from workers.contract import Job, Reply


class InvalidInboundError(ValueError):
    """What arrived cannot become a job; the message is safe to show the sender."""


class InboundChannel(Protocol):
    """One way people reach GPT4People: what arrives there becomes a `Job`."""

    name: str

    def to_job(self, inbound: object) -> Job:
        """Verify and parse an inbound message into a job, or raise `InvalidInboundError`."""
        ...


class OutboundChannel(Protocol):
    """A channel that answers later, from a task on its ``deliver.<channel>`` queue."""

    name: str

    def deliver(self, reply: Reply) -> None:
        """Send `reply` to where its job asked, exactly once."""
        ...
