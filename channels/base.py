"""What every channel's intake shares: the error for input that cannot become a job."""

from __future__ import annotations


class InvalidInboundError(ValueError):
    """What arrived cannot become a job; the message is safe to show the sender."""
