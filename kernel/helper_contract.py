"""What passes between the core and a helper: the request, the result, the error a
user may read, and a helper's public description (`HelperSpec`).

The helper SDK (`helpers.sdk`) builds on these; the answer path and the helper
registry use them without importing any helper.
"""

from __future__ import annotations

import re
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from kernel.contract import MediaRef

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# The longest text a helper call carries; each helper has its own, lower limit
# (`max_input_chars`), checked before it runs.
MAX_REQUEST_CHARS = 100_000


class HelperError(Exception):
    """A helper cannot do what was asked; the message is shown to the user as is."""


class HelperRequest(BaseModel):
    """What a helper receives: only the text and media it works on, never who asked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field("", max_length=MAX_REQUEST_CHARS)
    media: list[MediaRef] = Field(default_factory=list, max_length=10)
    channel: str = Field("", description="Where the answer goes.")
    channel_carries_images: bool = Field(
        False, description="The answer's channel can carry a picture: only then make one."
    )


class HelperResult(BaseModel):
    """What a helper returns: text always, an image where useful."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=20_000)
    image_base64: str | None = Field(None, max_length=15_000_000)
    image_type: str | None = None


class HelperSpec(Protocol):
    """A helper's public description, as the registry publishes it and the core routes by
    (`helpers.sdk.Helper` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def capabilities(self) -> tuple[str, ...]: ...
    @property
    def accepts(self) -> tuple[str, ...]: ...
    @property
    def version(self) -> str: ...
    @property
    def time_limit(self) -> float: ...
