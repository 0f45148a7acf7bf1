"""MMS: media references ride on the job; fetching them is authenticated and bounded."""

from __future__ import annotations

import pytest

from channels.sms.webhook import SmsInbound
from kernel.contract import MediaRef
from kernel.media import MediaRefusedError, fetch_media, media_origins
from kernel.settings import Settings
from tests.channels.twilio_recorder import TwilioRecorder

PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)


def settings_for(twilio: TwilioRecorder, **overrides: object) -> Settings:
    return Settings(twilio_account_sid=twilio.account_sid, twilio_auth_token=twilio.auth_token,
                    twilio_api_base=twilio.url, **overrides)  # type: ignore[arg-type]  # fmt: skip


def test_media_urls_and_types_are_carried_on_the_inbound_message() -> None:
    form = {
        "MessageSid": "MM" + "a" * 32, "AccountSid": "AC" + "1" * 32, "From": "+15551230000",
        "To": "+15550000000", "Body": "What is this?", "NumMedia": "2",
        "MediaUrl0": "https://api.twilio.com/m/1", "MediaContentType0": "image/jpeg",
        "MediaUrl1": "https://api.twilio.com/m/2", "MediaContentType1": "image/png",
    }  # fmt: skip
    inbound = SmsInbound.from_form(form)
    assert inbound.media == [
        MediaRef(url="https://api.twilio.com/m/1", content_type="image/jpeg"),
        MediaRef(url="https://api.twilio.com/m/2", content_type="image/png"),
    ]


def test_media_is_fetched_with_twilio_credentials(twilio: TwilioRecorder) -> None:
    twilio.media["cat.png"] = (PNG, "image/png")
    ref = MediaRef(url=f"{twilio.url}/media/cat.png", content_type="image/png")
    assert fetch_media(ref, settings_for(twilio)) == PNG


def test_wrong_credentials_fail(twilio: TwilioRecorder) -> None:
    twilio.media["cat.png"] = (PNG, "image/png")
    ref = MediaRef(url=f"{twilio.url}/media/cat.png", content_type="image/png")
    wrong = Settings(twilio_account_sid=twilio.account_sid, twilio_auth_token="nope",
                     twilio_api_base=twilio.url)  # fmt: skip
    with pytest.raises(Exception, match="401"):
        fetch_media(ref, wrong)


def test_oversized_media_is_refused(twilio: TwilioRecorder) -> None:
    twilio.media["big.png"] = (PNG + bytes(5000), "image/png")
    ref = MediaRef(url=f"{twilio.url}/media/big.png", content_type="image/png")
    with pytest.raises(MediaRefusedError, match="larger than 1000 bytes"):
        fetch_media(ref, settings_for(twilio, sms_media_max_bytes=1000))


@pytest.mark.parametrize("declared", ["application/x-msdownload", "video/mp4", ""])
def test_media_of_other_types_is_not_fetched(twilio: TwilioRecorder, declared: str) -> None:
    ref = MediaRef(url=f"{twilio.url}/media/never", content_type=declared)
    with pytest.raises(MediaRefusedError, match="not accepted"):
        fetch_media(ref, settings_for(twilio))
    assert "never" not in twilio.fetches


@pytest.mark.parametrize(
    "where",
    ["https://evil.example/media/cat.png", "http://api.twilio.com/media/cat.png",
     "https://api.twilio.com:8443/media/cat.png", "https://api.twilio.com@evil.example/m",
     "file:///etc/passwd", "{base_host}:1/media/cat.png"],
)  # fmt: skip
def test_media_and_credentials_go_only_to_twilio_or_the_configured_base(
    twilio: TwilioRecorder, where: str
) -> None:
    # The recorder's host on another port is another origin: refused like any other host.
    ref = MediaRef(url=where.format(base_host=twilio.url.rsplit(":", 1)[0]),
                   content_type="image/png")  # fmt: skip
    with pytest.raises(MediaRefusedError, match="host is not accepted"):
        fetch_media(ref, settings_for(twilio))


def test_media_origins_are_twilio_and_the_configured_base(twilio: TwilioRecorder) -> None:
    port = int(twilio.url.rsplit(":", 1)[1])
    assert media_origins(settings_for(twilio)) == {
        ("https", "api.twilio.com", 443),
        ("http", "127.0.0.1", port),
    }
    assert media_origins(Settings()) == {("https", "api.twilio.com", 443)}
