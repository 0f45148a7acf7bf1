"""MMS: media references ride on the job; fetching them is authenticated and bounded."""

from __future__ import annotations

import pytest

from channels.sms.webhook import SmsInbound
from kernel.contract import MediaRef
from kernel.media import MediaRefusedError, fetch_media
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
    wrong = Settings(twilio_account_sid=twilio.account_sid, twilio_auth_token="nope")
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
