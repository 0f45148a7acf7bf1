"""The email channel end to end: mail APPENDed into dovecot, replies read from a real SMTP server.

The echo engine answers with the question itself, so each reply shows what
the channel understood of the mail.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis

from channels.email.intake import EmailRecords, owner_key
from channels.email.poller import HANDLED, SET_ASIDE
from tests.channels.conftest import EMAIL_AUTHSERV_ID, EMAIL_FROM, EMAIL_RATE_LIMIT, start_poller
from tests.channels.mail_servers import Dovecot, SmtpCapture
from tests.conftest import queued_jobs, stop_process, wait_for

_people = itertools.count(1)
# What our receiving server adds on top of a mail whose From it authenticated.
VERDICT = (
    f"Authentication-Results: {EMAIL_AUTHSERV_ID}; dmarc=pass header.from=example.org\n".encode()
)


@pytest.fixture
def person() -> str:
    """An address no other test mails from."""
    return f"person{next(_people)}@example.org"


@pytest.fixture
def email_redis(email_env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(email_env["GPT4P_REDIS_URL"])
    yield client
    client.close()


def mail(
    sender: str,
    subject: str,
    body: str,
    message_id: str,
    *headers: tuple[str, str],
    charset: str = "utf-8",
) -> bytes:
    """A plain-text mail as bytes."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = EMAIL_FROM
    message["Subject"] = subject
    message["Message-ID"] = message_id
    message["Date"] = "Wed, 25 Nov 2026 09:00:00 +0000"
    for name, value in headers:
        message[name] = value
    message.set_content(
        body, charset=charset, cte="quoted-printable" if charset != "utf-8" else None
    )
    return message.as_bytes()


def answers(smtp: SmtpCapture, address: str, count: int = 1) -> list[EmailMessage]:
    """Wait until `count` replies to `address` were accepted by the SMTP server."""

    def enough() -> list[EmailMessage] | None:
        sent = smtp.sent_to(address)
        return sent if len(sent) >= count else None

    return wait_for(enough, 30, f"{count} repl(ies) to {address}")


def wait_idle(dovecot: Dovecot, client: redis.Redis) -> None:
    """Wait until every mail is handled and no job or delivery is pending."""

    def idle() -> bool:
        with dovecot.mailbox() as box:
            unhandled = list(box.uids(f"UNKEYWORD {HANDLED}"))
        queued = queued_jobs(client) + client.llen("deliver.email")
        return not unhandled and queued == 0 and client.hlen("unacked") == 0

    wait_for(idle, 30, "every mail to be handled", every=0.2)


def body_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def test_a_question_is_answered_once_in_the_same_thread(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str,
    email_redis: redis.Redis,
) -> None:  # fmt: skip
    question = "What is the capital of France?"
    # Only mail our server authenticated is quoted (tests/security: backscatter).
    thread = ("References", "<q0@example.org>")
    dovecot.append(VERDICT + mail(person, "Re: Re: Capitals", question,
                                  "<q1-capitals@example.org>", thread))  # fmt: skip
    reply = answers(smtp, person)[0]
    assert reply["Subject"] == "Re: Capitals"
    assert reply["In-Reply-To"] == "<q1-capitals@example.org>"
    assert reply["References"].split() == ["<q0@example.org>", "<q1-capitals@example.org>"]
    assert reply["Auto-Submitted"] == "auto-replied"
    assert EMAIL_FROM in reply["From"]
    text = body_of(reply)
    assert text.startswith("What is the capital of France?")
    assert "> What is the capital of France?" in text  # a short quote of the question
    assert reply.get_body(preferencelist=("html",)) is not None
    wait_idle(dovecot, email_redis)
    assert len(smtp.sent_to(person)) == 1
    assert HANDLED in dovecot.flags("<q1-capitals@example.org>")


def test_a_follow_up_carries_the_thread_as_history(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str,
    email_redis: redis.Redis,
) -> None:  # fmt: skip
    dovecot.append(mail(person, "Planets", "Which planet is largest?", "<p1@example.org>"))
    first = answers(smtp, person)[0]
    ours = first["Message-ID"]
    follow_up = ("In-Reply-To", ours), ("References", f"<p1@example.org> {ours}")
    dovecot.append(mail(person, "Re: Planets", "And the smallest?", "<p2@example.org>",
                        *follow_up))  # fmt: skip
    second = answers(smtp, person, 2)[1]
    assert second["References"].split() == ["<p1@example.org>", ours, "<p2@example.org>"]
    thread = ("<p1@example.org>", ours)
    history = EmailRecords(email_redis).thread(owner_key(person), thread, 10_000)
    assert [(t.role, t.content.splitlines()[-1]) for t in history] == [
        ("user", "Which planet is largest?"), ("assistant", "Which planet is largest?"),
    ]  # fmt: skip


def test_quoted_history_and_signatures_are_not_part_of_the_question(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str
) -> None:
    body = ("How tall is Everest?\n\nOn Tue, 24 Nov 2026, Bot <bot@x> wrote:\n> An old answer\n"
            "> about mountains\n\n-- \nAnn Example\nSent from my phone\n")  # fmt: skip
    dovecot.append(mail(person, "Re: Mountains", body, "<m1@example.org>"))
    text = body_of(answers(smtp, person)[0])
    assert "How tall is Everest?" in text
    assert "old answer" not in text
    assert "Sent from my phone" not in text


def test_html_only_mail_is_read_as_text(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str
) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = person, EMAIL_FROM, "Colours"
    message["Message-ID"] = "<h1@example.org>"
    message.set_content("<html><body><p>Why is the <b>sky</b> blue?</p></body></html>",
                        subtype="html")  # fmt: skip
    dovecot.append(message.as_bytes())
    text = body_of(answers(smtp, person)[0])
    assert "Why is the sky blue?" in text
    assert "<b>" not in text


def test_a_latin1_mail_is_decoded(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str
) -> None:
    dovecot.append(mail(person, "Café", "Où est le café près de la gare ?", "<l1@example.org>",
                        charset="iso-8859-1"))  # fmt: skip
    reply = answers(smtp, person)[0]
    assert "Où est le café près de la gare ?" in body_of(reply)
    assert reply["Subject"] == "Re: Café"


def test_reply_to_alone_does_not_choose_where_the_answer_goes(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str,
    email_redis: redis.Redis,
) -> None:  # fmt: skip
    # Honoured only for an authenticated From, in its domain, and named by
    # GPT4P_EMAIL_ALLOW (unset here): tests/security.
    elsewhere = f"answers-{next(_people)}@example.org"
    dovecot.append(VERDICT + mail(person, "Hi", "Where do answers go?", "<r1@example.org>",
                                  ("Reply-To", elsewhere)))  # fmt: skip
    assert answers(smtp, person)[0]["To"] == person
    wait_idle(dovecot, email_redis)
    assert smtp.sent_to(elsewhere) == []


AUTOMATIC = [
    ("auto-reply", "Out of office", (("Auto-Submitted", "auto-replied"),)),
    ("list mail", "[list] digest", (("List-Id", "<news.example.org>"),)),
    ("bulk", "Offers", (("Precedence", "bulk"),)),
]


@pytest.mark.parametrize(("kind", "subject", "headers"), AUTOMATIC, ids=[a[0] for a in AUTOMATIC])
def test_automatic_mail_is_never_answered(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str,
    email_redis: redis.Redis, kind: str, subject: str, headers: tuple[tuple[str, str], ...],
) -> None:  # fmt: skip
    message_id = f"<auto-{kind.replace(' ', '')}-{person}>"
    dovecot.append(mail(person, subject, "I am away until Monday.", message_id, *headers))
    wait_idle(dovecot, email_redis)
    assert smtp.sent_to(person) == []
    assert HANDLED in dovecot.flags(message_id)


def test_a_bounce_is_never_answered(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, email_redis: redis.Redis
) -> None:
    bounce = (
        b"From: Mail Delivery Subsystem <MAILER-DAEMON@example.org>\r\nTo: " + EMAIL_FROM.encode()
        + b"\r\nSubject: Undelivered Mail Returned to Sender\r\nMessage-ID: <bounce1@example.org>"
        b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
        b" boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nCould not deliver.\r\n"
        b"--B--\r\n"
    )  # fmt: skip
    dovecot.append(bounce)
    wait_idle(dovecot, email_redis)
    assert smtp.sent_to("mailer-daemon@example.org") == []
    assert smtp.sent_to("MAILER-DAEMON@example.org") == []


def test_broken_mime_is_set_aside_and_the_next_mail_is_answered(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str
) -> None:
    broken = (
        f"From: {person}\r\nTo: {EMAIL_FROM}\r\nSubject: broken\r\n"
        "Message-ID: <broken1@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="NEVER-THERE"\r\n\r\n'
        "this body has no parts at all\r\n"
    ).encode()
    dovecot.append(broken)
    dovecot.append(mail(person, "Next", "Still there?", "<after-broken@example.org>"))
    assert "Still there?" in body_of(answers(smtp, person)[0])
    assert {HANDLED, SET_ASIDE} <= dovecot.flags("<broken1@example.org>")
    assert len(smtp.sent_to(person)) == 1


def test_a_transient_smtp_failure_is_retried_and_sent_once(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str,
    email_redis: redis.Redis,
) -> None:  # fmt: skip
    refused_before = smtp.refused
    smtp.fail_next = 2
    dovecot.append(mail(person, "Retry", "Will this arrive?", "<t1@example.org>"))
    answers(smtp, person)
    wait_idle(dovecot, email_redis)
    assert smtp.refused - refused_before == 2
    assert len(smtp.sent_to(person)) == 1


def test_a_restart_answers_nothing_twice_and_misses_nothing(
    email_stack: dict[str, subprocess.Popen[bytes]], email_env: dict[str, str], dovecot: Dovecot,
    smtp: SmtpCapture, person: str, email_redis: redis.Redis,
) -> None:  # fmt: skip
    dovecot.append(mail(person, "Before", "Before the restart?", "<before@example.org>"))
    answers(smtp, person)
    wait_idle(dovecot, email_redis)
    stop_process(email_stack["poller"])
    # Mail arriving while the poller is down is answered when it is back.
    dovecot.append(mail(person, "During", "While you were away?", "<during@example.org>"))
    email_stack["poller"] = start_poller(email_env)
    replies = answers(smtp, person, 2)
    wait_idle(dovecot, email_redis)
    assert [r["In-Reply-To"] for r in smtp.sent_to(person)] == [
        "<before@example.org>", "<during@example.org>",
    ]  # fmt: skip
    assert len(replies) == 2


def test_addresses_and_mail_text_stay_out_of_the_logs(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str,
    email_redis: redis.Redis, state_dir: Path,
) -> None:  # fmt: skip
    secret = "my confidential salary question"
    dovecot.append(mail(person, "Private", secret, f"<private-{person}>"))
    answers(smtp, person)
    wait_idle(dovecot, email_redis)
    for name in ("email-poller.log", "email-deliver@test.log", "email-echo@test.log"):
        content = (state_dir / name).read_text()
        assert person not in content, name
        assert secret not in content, name


def test_a_sender_over_the_rate_limit_is_not_answered(
    email_stack: object, dovecot: Dovecot, smtp: SmtpCapture, person: str,
    email_redis: redis.Redis,
) -> None:  # fmt: skip
    for i in range(EMAIL_RATE_LIMIT + 2):
        dovecot.append(mail(person, f"Question {i}", f"Question number {i}?", f"<rl{i}-{person}>"))
    answers(smtp, person, EMAIL_RATE_LIMIT)
    wait_idle(dovecot, email_redis)
    assert len(smtp.sent_to(person)) == EMAIL_RATE_LIMIT
