"""The `image` helper (Pillow): describe a picture, or resize, thumbnail or grey it.

Bounded before any pixel is decoded: the picture must be a PNG, JPEG, GIF or
WEBP by its own bytes (whatever type it was sent as), its header must declare
at most MAX_INPUT_PIXELS (a 310 KB PNG can declare 80 million pixels and take
hundreds of MB to decode), and the picture asked for must have at most
MAX_OUTPUT_PIXELS. A picture is only made when the answer's channel can carry it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from urllib.parse import urlparse

from PIL import ExifTags, Image, UnidentifiedImageError

from helpers.sdk import HelperError, HelperRequest, HelperResult, helper
from kernel.contract import MediaRef
from kernel.settings import get_settings

MAX_BYTES = 10_000_000
MAX_SIDE = 4096
MAX_INPUT_PIXELS = 4096 * 4096  # a 12-megapixel phone photo fits; about 67 MB decoded as RGBA
MAX_OUTPUT_PIXELS = 2048 * 2048  # about 1 s to encode and at most a few MB as PNG
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
# Pillow's own guard, for any other code path that opens an image in this process: it
# refuses (DecompressionBombError) above twice this; `_open` checks this bound itself.
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.IGNORECASE | re.DOTALL)
_SIZE = re.compile(r"(\d{1,5})\s*[x×]\s*(\d{1,5})")
_SIDE = re.compile(r"\d{1,5}")
_GREY = {"gray", "grey", "grayscale", "greyscale"}
_RESIZE = {"resize", "thumbnail", "thumb"}
TOO_MANY_PIXELS = (
    f"that picture is too large: I open pictures of at most {MAX_INPUT_PIXELS:,} pixels"
)
NO_PICTURES_HERE = "Pictures cannot be sent back on this channel; ask by email to receive it."


def load(ref: MediaRef, channel: str = "") -> bytes:
    """The bytes of a picture: from a data: URL, from Twilio's media host, or (for a job
    that came from Telegram, and only then) from the bot's files."""
    match = _DATA_URL.match(ref.url)
    if match:
        if len(match.group(2)) > MAX_BYTES * 4 // 3 + 4:  # refuse before decoding base64
            raise HelperError(f"the picture is larger than {MAX_BYTES // 1_000_000} MB")
        try:
            data = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise HelperError("the picture's data is not valid base64") from None
        if len(data) > MAX_BYTES:
            raise HelperError(f"the picture is larger than {MAX_BYTES // 1_000_000} MB")
        return data
    if ref.url.startswith("telegram-file:"):  # a photo sent to the Telegram bot
        if channel != "telegram":  # fetched with the bot's token: for the bot's own chats
            raise HelperError("I can only open pictures sent by MMS or inline in the request")
        return _from_telegram(ref)
    settings = get_settings()
    allowed = {"api.twilio.com", urlparse(settings.twilio_api_base).hostname}
    if (
        urlparse(ref.url).scheme not in {"http", "https"}
        or urlparse(ref.url).hostname not in allowed
    ):
        raise HelperError("I can only open pictures sent by MMS or inline in the request")
    from kernel.media import MediaRefusedError, fetch_media

    try:
        return fetch_media(ref, settings)
    except MediaRefusedError as error:
        raise HelperError(str(error)) from None


def _from_telegram(ref: MediaRef) -> bytes:
    """A photo sent to the Telegram bot, fetched from GPT4P_TELEGRAM_API_BASE only."""
    from kernel.telegram_api import (
        BotApiError,
        BotApiUnreachableError,
        TelegramFileRefusedError,
        fetch_telegram_file,
    )

    try:
        return fetch_telegram_file(ref, get_settings())
    except TelegramFileRefusedError as error:
        raise HelperError(str(error)) from None
    except (BotApiError, BotApiUnreachableError):
        raise HelperError(
            "I could not fetch that photo from Telegram; please send it again"
        ) from None


def _open(data: bytes) -> Image.Image:
    """The picture, opened lazily: its format and size come from the header, no pixels yet."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses only above twice that.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HelperError(TOO_MANY_PIXELS) from None
    except UnidentifiedImageError:
        raise HelperError(
            "I could not open that picture (I read PNG, JPEG, GIF and WEBP)"
        ) from None
    except (OSError, ValueError, SyntaxError):  # Pillow's plugins raise these on broken headers
        raise HelperError("I could not open that picture") from None
    if image.width * image.height > MAX_INPUT_PIXELS:  # whatever Image.MAX_IMAGE_PIXELS says
        raise HelperError(TOO_MANY_PIXELS)
    return image


def _decoded(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise HelperError("I could not open that picture") from None
    return image


def _exif_summary(image: Image.Image) -> str:
    exif = image.getexif()
    if not exif:
        return "no EXIF data"
    names = {ExifTags.TAGS.get(tag, str(tag)): value for tag, value in exif.items()}
    parts = [f"{key} {names[key]}" for key in ("Make", "Model", "DateTime") if key in names]
    if ExifTags.IFD.GPSInfo in exif:
        parts.append("has GPS location")
    return "EXIF: " + (", ".join(str(p) for p in parts) or f"{len(exif)} tags")


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The size of a thumbnail of `size` within `box`: the aspect kept, never enlarged."""
    (width, height), (most_w, most_h) = size, box
    if width <= most_w and height <= most_h:
        return size
    scale = min(most_w / width, most_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _target(image: Image.Image, command: str) -> tuple[str, tuple[int, int]]:
    """What to make ("grey", "resize" or "thumbnail") and its size, checked against the bounds."""
    verb = command.lower().split()[0]
    if verb in _GREY:
        kind, size = "grey", image.size
    else:
        pair, side = _SIZE.search(command), _SIDE.search(command)
        if verb == "resize" and pair:
            box = int(pair.group(1)), int(pair.group(2))
        elif side:
            box = int(side.group(0)), int(side.group(0))
        else:
            raise HelperError("say the size, e.g. resize 320x200 or thumbnail 128")
        if not (0 < box[0] <= MAX_SIDE and 0 < box[1] <= MAX_SIDE):
            raise HelperError(f"sizes go up to {MAX_SIDE} pixels")
        kind = "resize" if verb == "resize" else "thumbnail"
        size = box if kind == "resize" else _fit(image.size, box)
    if size[0] * size[1] > MAX_OUTPUT_PIXELS:
        raise HelperError(
            f"the result would be {size[0]}×{size[1]} pixels; I make pictures of at most "
            f"{MAX_OUTPUT_PIXELS:,} pixels (e.g. 2048×2048)"
        )
    return kind, size


def _make(image: Image.Image, kind: str, size: tuple[int, int]) -> Image.Image:
    if kind == "grey":
        return _decoded(image).convert("L")
    if size[0] < image.width and size[1] < image.height:
        image.draft(image.mode, size)  # JPEG: decode at a reduced scale, far less memory
    return _decoded(image).resize(size, reducing_gap=2.0 if kind == "thumbnail" else None)


def _encoded(image: Image.Image) -> tuple[str, str]:
    buffer = io.BytesIO()
    # optimize=True tries every filter: 13 s instead of 1 s for 2048x2048, for 10% smaller.
    image.save(buffer, format="PNG", compress_level=6)
    return base64.b64encode(buffer.getvalue()).decode(), "image/png"


def transform(data: bytes, command: str, with_image: bool = True) -> HelperResult:
    """Describe the picture, or apply `command` (resize WxH, thumbnail N, grayscale).

    Without `with_image` (the channel cannot carry a picture) nothing is decoded or
    made: the answer says what the result would be.
    """
    image = _open(data)
    summary = f"{image.format} image, {image.width}×{image.height} pixels, {image.mode}"
    words = command.lower().split()
    if not words or words[0] in {"info", "describe", "what"}:
        return HelperResult(text=f"{summary}; {_exif_summary(image)}.")
    if words[0] not in _GREY | _RESIZE:
        raise HelperError("I can: info, resize WxH, thumbnail N, grayscale")
    kind, size = _target(image, command)
    mode = "L" if kind == "grey" else image.mode
    done = f"Done: {size[0]}×{size[1]} pixels, {mode} (from {summary})."
    if not with_image:
        return HelperResult(text=f"{done} {NO_PICTURES_HERE}")
    encoded, media_type = _encoded(_make(image, kind, size))
    return HelperResult(text=done, image_base64=encoded, image_type=media_type)


@helper(
    "image",
    "Describes a picture (format, size, EXIF) or resizes, thumbnails or greys it.",
    capabilities=["image.describe", "image.resize", "image.thumbnail", "image.grayscale"],
    accepts=["image/*"],
    time_limit=20,
    max_input_chars=200,
)
def image_helper(request: HelperRequest) -> HelperResult:
    """Work on the first picture of the request."""
    pictures = [m for m in request.media if m.content_type.startswith("image/")]
    if not pictures:
        raise HelperError("send a picture with your message")
    return transform(load(pictures[0], request.channel), request.text,
                     request.channel_carries_images)  # fmt: skip
