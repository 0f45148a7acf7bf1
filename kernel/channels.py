"""Every channel's facts, registered in one place: its name, whether it answers later
(from a task on its own ``deliver.<channel>`` queue) and whether it carries pictures.

The core and the runtime ask these facts of a job's channel (`channel_facts`);
a new channel is one sub-package of `channels` plus one line here. A channel that
answers later has its delivery task in ``channels.<name>.delivery``, which every
worker imports (celeryconfig).
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel.contract import delivery_queue, delivery_task


@dataclass(frozen=True)
class ChannelFacts:
    """What the rest of GPT4People needs to know about one channel."""

    name: str
    # Answered later, by the channel's delivery task; else the caller waits for the result.
    delivers_later: bool
    # Can carry a helper's picture with the text (as an attachment): helpers make pictures
    # only for such channels.
    carries_images: bool = False

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
        ChannelFacts("cli", delivers_later=False),
        ChannelFacts("sms", delivers_later=True),
        ChannelFacts("email", delivers_later=True, carries_images=True),
    )
}
# A job from a channel not listed (a test's, an integration's) waits for its result.
_UNLISTED = ChannelFacts("", delivers_later=False)


def channel_facts(name: str) -> ChannelFacts:
    """The facts of the channel called `name` (an unlisted channel delivers nothing later)."""
    return CHANNELS.get(name, _UNLISTED)


def delivered_channels() -> list[ChannelFacts]:
    """The channels that answer later, in the order they are registered."""
    return [c for c in CHANNELS.values() if c.delivers_later]
