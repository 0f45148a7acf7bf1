"""The built-in helpers' own behaviour, without a queue."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import pytest
from PIL import Image

from helpers.calc import calculate
from helpers.image import transform
from helpers.sdk import HelperError, HelperRequest, helper
from helpers.timezone import time_in


@pytest.mark.parametrize(
    ("expression", "value"),
    [("(2+3)*4 - 2**3", "12"), ("0.1 + 0.2", "0.3"), ("1/3", "1/3 (≈ 0.333333333333)"),
     ("2^10", "1024"), ("-7 // 2", "-4"), ("3 × 4 ÷ 6", "2"), ("2**-2", "0.25"),
     ("12345678901234567890 * 98765432109876543210",
      "1219326311370217952237463801111263526900")],
)  # fmt: skip
def test_calc_is_exact(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    ("expression", "error"),
    [("__import__('os').system('id')", "numbers"), ("2**100000", "powers are limited"),
     ("(2**1000)**1000", "too large"), ("1/0", "division by zero"), ("2 +", "could not read"),
     ("abs(-1)", "numbers"), ("", "give me")],
)  # fmt: skip
def test_calc_refuses_what_is_unsafe_or_unbounded(expression: str, error: str) -> None:
    with pytest.raises(HelperError, match=error):
        calculate(expression)


def test_calc_input_length_is_bounded() -> None:
    from helpers.calc import calc

    with pytest.raises(HelperError, match="too long"):
        calc.run(HelperRequest(text="1+" * 400 + "1"))


def test_time_in_a_zone_by_city() -> None:
    noon = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    assert time_in("new york", noon) == (
        "It is 08:00 on Wednesday 01 July 2026 in America/New_York (UTC-04:00)."
    )
    with pytest.raises(HelperError, match="don't know"):
        time_in("Atlantis")


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "blue").save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_resize_thumbnail_and_grayscale_return_an_image() -> None:
    resized = transform(png(100, 50), "resize 20x10")
    assert resized.text.startswith("Done: 20×10 pixels")
    assert resized.image_base64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(resized.image_base64)))
    assert image.size == (20, 10)
    assert transform(png(100, 50), "thumbnail 40").text.startswith("Done: 40×20")
    assert "L (from PNG" in transform(png(10, 10), "grayscale").text


def test_image_refuses_junk_and_huge_sizes() -> None:
    with pytest.raises(HelperError, match="could not open"):
        transform(b"not an image", "")
    with pytest.raises(HelperError, match="up to"):
        transform(png(10, 10), "resize 9000x10")


def test_helper_names_are_checked() -> None:
    with pytest.raises(ValueError, match="must match"):
        helper("Bad Name", "x")(lambda r: None)  # type: ignore[arg-type, return-value]
