"""The `image` helper (Pillow): describe a picture, or resize, thumbnail or grey it."""

from __future__ import annotations

import base64
import binascii
import io
import re
from urllib.parse import urlparse

from PIL import ExifTags, Image, UnidentifiedImageError

from helpers.sdk import HelperError, HelperRequest, HelperResult, helper
from workers.contract import MediaRef
from workers.settings import get_settings

MAX_BYTES = 10_000_000
MAX_SIDE = 4096
Image.MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.IGNORECASE | re.DOTALL)
_SIZE = re.compile(r"(\d{1,4})\s*[x×]\s*(\d{1,4})")


def load(ref: MediaRef) -> bytes:
    """The bytes of a picture: from a data: URL, or from Twilio's media host."""
    match = _DATA_URL.match(ref.url)
    if match:
        try:
            data = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise HelperError("the picture's data is not valid base64") from None
        if len(data) > MAX_BYTES:
            raise HelperError(f"the picture is larger than {MAX_BYTES // 1_000_000} MB")
        return data
    settings = get_settings()
    allowed = {"api.twilio.com", urlparse(settings.twilio_api_base).hostname}
    if (
        urlparse(ref.url).scheme not in {"http", "https"}
        or urlparse(ref.url).hostname not in allowed
    ):
        raise HelperError("I can only open pictures sent by MMS or inline in the request")
    from channels.sms_media import MediaRefusedError, fetch_media

    try:
        return fetch_media(ref, settings)
    except MediaRefusedError as error:
        raise HelperError(str(error)) from None


def _exif_summary(image: Image.Image) -> str:
    exif = image.getexif()
    if not exif:
        return "no EXIF data"
    names = {ExifTags.TAGS.get(tag, str(tag)): value for tag, value in exif.items()}
    parts = [f"{key} {names[key]}" for key in ("Make", "Model", "DateTime") if key in names]
    if ExifTags.IFD.GPSInfo in exif:
        parts.append("has GPS location")
    return "EXIF: " + (", ".join(str(p) for p in parts) or f"{len(exif)} tags")


def _encoded(image: Image.Image) -> tuple[str, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode(), "image/png"


def transform(data: bytes, command: str) -> HelperResult:
    """Describe the picture, or apply `command` (resize WxH, thumbnail N, grayscale)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
        raise HelperError("I could not open that picture") from None
    summary = f"{image.format} image, {image.width}×{image.height} pixels, {image.mode}"
    words = command.lower().split()
    if not words or words[0] in {"info", "describe", "what"}:
        return HelperResult(text=f"{summary}; {_exif_summary(image)}.")
    if words[0] in {"gray", "grey", "grayscale", "greyscale"}:
        result = image.convert("L")
    elif words[0] in {"resize", "thumbnail", "thumb"}:
        size = _SIZE.search(command)
        side = re.search(r"\d{1,4}", command)
        if words[0] == "resize" and size:
            width, height = int(size.group(1)), int(size.group(2))
        elif side:
            width = height = int(side.group(0))
        else:
            raise HelperError("say the size, e.g. resize 320x200 or thumbnail 128")
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise HelperError(f"sizes go up to {MAX_SIDE} pixels")
        result = image.copy()
        if words[0] == "resize":
            result = result.resize((width, height))
        else:
            result.thumbnail((width, height))
    else:
        raise HelperError("I can: info, resize WxH, thumbnail N, grayscale")
    encoded, kind = _encoded(result)
    return HelperResult(
        text=f"Done: {result.width}×{result.height} pixels, {result.mode} (from {summary}).",
        image_base64=encoded,
        image_type=kind,
    )


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
    return transform(load(pictures[0]), request.text)
