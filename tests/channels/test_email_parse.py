"""Which mail is answered, and what the question is: parsing without a server."""

from __future__ import annotations

import pytest
from imap_tools import MailMessage

from channels.email.parse import UnreadableMailError, base_subject, read_mail, skip_reason
from kernel.settings import Settings

SETTINGS = Settings(email_from="GPT4People <bot@gpt4people.test>")


def parse(headers: str, body: str = "A question?") -> MailMessage:
    raw = f"{headers}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    return MailMessage.from_bytes(raw.encode())


BASE = "From: Ann <ann@example.org>\r\nTo: bot@gpt4people.test\r\nMessage-ID: <a@example.org>"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("Auto-Submitted: auto-generated", "Auto-Submitted"),
        ("Precedence: junk", "precedence"),
        ("List-Unsubscribe: <mailto:u@example.org>", "mailing list"),
        ("X-Autoreply: yes", "auto-reply"),
        ("Return-Path: <>", "delivery report"),
    ],
)
def test_automatic_mail_has_a_reason_not_to_answer(extra: str, reason: str) -> None:
    found = skip_reason(parse(f"{BASE}\r\n{extra}"), SETTINGS)
    assert found is not None and reason in found


@pytest.mark.parametrize("sender", ["noreply@shop.example", "no-reply@x.org", "postmaster@x.org",
                                    "do-not-reply@x.org", "bot@gpt4people.test"])  # fmt: skip
def test_robots_and_ourselves_are_not_answered(sender: str) -> None:
    headers = BASE.replace("Ann <ann@example.org>", sender)
    assert skip_reason(parse(headers), SETTINGS) is not None


def test_auto_submitted_no_and_ordinary_mail_are_answered() -> None:
    assert skip_reason(parse(f"{BASE}\r\nAuto-Submitted: no"), SETTINGS) is None


def test_the_allow_list_takes_addresses_and_domains() -> None:
    allow = Settings(email_allow="boss@corp.example, @example.org")
    assert skip_reason(parse(BASE), allow) is None
    stranger = BASE.replace("ann@example.org", "eve@evil.example")
    assert skip_reason(parse(stranger), allow) == "sender not on the allow-list"


def test_re_prefixes_never_pile_up() -> None:
    assert base_subject("Re: RE: Aw: Fwd: Re[2]: Lunch") == "Lunch"
    assert base_subject("Lunch") == "Lunch"


def test_mail_without_a_sender_or_message_id_is_set_aside() -> None:
    with pytest.raises(UnreadableMailError, match="no sender"):
        read_mail(parse("To: bot@gpt4people.test\r\nMessage-ID: <x@y>"), SETTINGS)
    with pytest.raises(UnreadableMailError, match="Message-ID"):
        read_mail(parse("From: ann@example.org"), SETTINGS)


def test_references_and_in_reply_to_make_the_thread() -> None:
    headers = f"{BASE}\r\nReferences: <r1@x> <r2@x>\r\nIn-Reply-To: <r3@x>"
    assert read_mail(parse(headers), SETTINGS).references == ("<r1@x>", "<r2@x>", "<r3@x>")


def test_attachments_are_kept_as_references_within_type_and_size_limits() -> None:
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"], message["Message-ID"] = "ann@example.org", "<att@example.org>"
    message.set_content("What is in this picture?")
    message.add_attachment(b"\x89PNG" + bytes(100), maintype="image", subtype="png",
                           filename="cat.png")  # fmt: skip
    message.add_attachment(b"MZ" + bytes(100), maintype="application", subtype="x-msdownload",
                           filename="run.exe")  # fmt: skip
    message.add_attachment(b"\x89PNG" + bytes(5000), maintype="image", subtype="png",
                           filename="huge.png")  # fmt: skip
    parsed = read_mail(MailMessage.from_bytes(message.as_bytes()),
                       Settings(email_max_attachment_bytes=1000))  # fmt: skip
    assert [a.content_type for a in parsed.attachments] == ["image/png"]
    assert parsed.question == "What is in this picture?"
