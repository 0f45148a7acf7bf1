"""WhatsApp's side of a message, without a server: its formatting, its webhook's fields,
its From and its parts."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from channels.base import InvalidInboundError
from channels.delivery import PermanentDeliveryError
from channels.plaintext import plain_text, whatsapp_text
from channels.sms.webhook import SmsInbound
from channels.whatsapp.delivery import WhatsAppSender
from channels.whatsapp.webhook import WhatsAppInbound
from kernel.channels import CHANNELS
from kernel.contract import MediaRef
from kernel.settings import Settings

RECIPE = """# Pancakes

You need **three** things:

* 2 eggs
* 1 cup of __plain__ _flour_
* 300 ml milk

## Steps

1. Whisk everything.
2. Fry *both* sides:
   - 1 minute each
   - until ~~burnt~~ golden
"""


def test_a_recipe_is_written_in_whatsapps_own_formatting() -> None:
    assert whatsapp_text(RECIPE) == (
        "*Pancakes*\n"
        "You need *three* things:\n\n"
        "- 2 eggs\n"
        "- 1 cup of *plain* _flour_\n"
        "- 300 ml milk\n\n"
        "*Steps*\n"
        "1. Whisk everything.\n"
        "2. Fry _both_ sides:\n"
        "   - 1 minute each\n"
        "   - until ~burnt~ golden"
    )


@pytest.mark.parametrize(
    ("markdown", "text"),
    [
        ("**bold** and __bold__", "*bold* and *bold*"),
        ("*italic* and _italic_", "_italic_ and _italic_"),
        ("***both***", "_*both*_"),
        ("See [the docs](https://docs.python.org/3/).", "See the docs (https://docs.python.org/3/)."),
        ("Run `pip install x` first", "Run `pip install x` first"),
        ("> a **quoted** line\n> and another", "> a *quoted* line\n> and another"),
        ("| a | b |\n|---|---|\n| 1 | 2 |", "a | b\n1 | 2"),
    ],
)  # fmt: skip
def test_markdown_marks_become_whatsapps(markdown: str, text: str) -> None:
    assert whatsapp_text(markdown) == text


def test_a_code_block_stays_monospace_between_triple_backticks() -> None:
    answer = "Install it:\n\n```bash\npip install requests\npython -m http.server\n```"
    assert whatsapp_text(answer) == (
        "Install it:\n\n```\npip install requests\npython -m http.server\n```"
    )


@pytest.mark.parametrize(
    "text",
    ["2*3*4 = 24", "(2+3)*4*(5-1)", "edit __init__.py and my_var_name", "plain words\n\nonly"],
)
def test_arithmetic_names_and_plain_answers_are_left_as_written(text: str) -> None:
    assert whatsapp_text(text) == text


def test_plain_text_for_sms_is_unchanged_by_the_whatsapp_marks() -> None:
    assert plain_text("**bold** `code` > x") == "bold code > x"
    assert plain_text("> quoted **text**") == "quoted text"


def form(**fields: str) -> dict[str, str]:
    """Twilio's WhatsApp webhook form, as its sandbox posts it."""
    return {"MessageSid": "SM" + "a" * 32, "AccountSid": "AC" + "1" * 32,
            "From": "whatsapp:+15551230000", "To": "whatsapp:+14155238886", "Body": "Hi",
            "NumMedia": "0", "ProfileName": "Ann", "WaId": "15551230000", **fields}  # fmt: skip


def test_the_whatsapp_fields_and_media_are_read() -> None:
    inbound = WhatsAppInbound.from_form(
        form(NumMedia="1", MediaUrl0="https://api.twilio.com/m/1", MediaContentType0="image/jpeg")
    )
    assert (inbound.sender, inbound.recipient) == ("whatsapp:+15551230000", "whatsapp:+14155238886")
    assert (inbound.profile_name, inbound.wa_id) == ("Ann", "15551230000")
    assert inbound.media == [MediaRef(url="https://api.twilio.com/m/1", content_type="image/jpeg")]
    assert isinstance(inbound, SmsInbound)


@pytest.mark.parametrize(
    "junk",
    [{"From": "+15551230000"}, {"From": "whatsapp:15551230000"}, {"To": "sms:+1555"},
     {"ProfileName": "x" * 300}, {"WaId": "not-digits"}, {"MessageSid": "nope"}],
    ids=["sms sender", "no plus", "sms recipient", "long profile", "bad waid", "bad sid"],
)  # fmt: skip
def test_fields_that_are_not_whatsapps_are_refused(junk: dict[str, str]) -> None:
    with pytest.raises(InvalidInboundError):
        WhatsAppInbound.from_form(form(**junk))


def sender(**settings: str) -> WhatsAppSender:
    return WhatsAppSender(Settings(twilio_account_sid="AC" + "1" * 32,
                                   twilio_auth_token="t", **settings))  # type: ignore[arg-type]  # fmt: skip


def test_replies_come_from_the_configured_sender_exactly_as_written() -> None:
    configured = sender(twilio_whatsapp_from="whatsapp:+14155238886", twilio_from="+15550000000",
                        twilio_messaging_service_sid="MG" + "2" * 32)  # fmt: skip
    assert configured.origin("whatsapp:+15559999999") == {"from_": "whatsapp:+14155238886"}
    service = sender(twilio_messaging_service_sid="MG" + "2" * 32, twilio_from="+15550000000")
    assert service.origin("whatsapp:+15559999999") == {"messaging_service_sid": "MG" + "2" * 32}
    # Neither: the WhatsApp number the person wrote to, never the SMS number.
    assert sender(twilio_from="+15550000000").origin("whatsapp:+15559999999") == {
        "from_": "whatsapp:+15559999999"
    }
    with pytest.raises(PermanentDeliveryError, match="GPT4P_TWILIO_WHATSAPP_FROM"):
        sender().origin(None)


@pytest.mark.parametrize("value", ["+14155238886", "whatsapp:14155238886", "sms:+14155238886"])
def test_a_whatsapp_sender_without_its_prefix_is_a_settings_error(value: str) -> None:
    with pytest.raises(ValueError, match="twilio_whatsapp_from"):
        Settings(twilio_whatsapp_from=value)


def test_a_long_reply_is_split_in_parts_of_1600_in_whatsapps_formatting() -> None:
    sentence = "The **quick** brown fox jumps over the lazy dog near the river bank. "
    parts = sender().parts_of(sentence * 50, max_parts=3)
    assert [p[:6] for p in parts] == ["(1/3) ", "(2/3) ", "(3/3) "]
    assert all(len(p) <= 1600 for p in parts)
    assert "The *quick* brown fox" in parts[0] and "**" not in "".join(parts)


def test_whatsapp_is_configured_by_the_account_and_a_sender_or_a_messaging_service() -> None:
    whatsapp = CHANNELS["whatsapp"]
    assert (whatsapp.route, whatsapp.max_chars, whatsapp.carries_images) == (
        "/whatsapp",
        1600,
        True,
    )
    assert whatsapp.delivery_queue == "deliver.whatsapp"
    sid, token = "AC" + "1" * 32, SecretStr("t" * 32)
    account = Settings(twilio_account_sid=sid, twilio_auth_token=token)
    assert not whatsapp.configured(account)  # no sender to answer from
    with_sender = account.model_copy(update={"twilio_whatsapp_from": "whatsapp:+14155238886"})
    service = account.model_copy(update={"twilio_messaging_service_sid": "MG" + "2" * 32})
    assert whatsapp.configured(with_sender) and whatsapp.configured(service)
    assert not whatsapp.configured(Settings(twilio_whatsapp_from="whatsapp:+14155238886"))
