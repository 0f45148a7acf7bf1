"""Reading mail well: who asked, what (without quoted history), in which thread, and
whether it must not be answered at all (auto-replies, bounces, lists, ourselves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import getaddresses, parseaddr

from email_reply_parser import EmailReplyParser
from imap_tools import MailMessage
from inscriptis import get_text

from workers.contract import MediaRef
from workers.settings import Settings

_MSGID = re.compile(r"<[^<>\s]+>")
_DAEMON = re.compile(
    r"^(mailer-daemon|postmaster|no-?reply|do-?not-?reply|bounces?|auto-?reply)([+._-].*)?$",
    re.IGNORECASE,
)
_REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|fw|fwd)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_BOUNDARY_DEFECTS = (
    "StartBoundaryNotFoundDefect", "NoBoundaryInMultipartDefect",
    "MultipartInvariantViolationDefect", "CloseBoundaryNotFoundDefect",
)  # fmt: skip
ATTACHMENT_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/gif", "image/webp", "text/plain", "text/csv",
     "application/pdf"}
)  # fmt: skip


class UnreadableMailError(ValueError):
    """The message cannot be understood; it is set aside. The text never includes the body."""


@dataclass(frozen=True)
class InboundEmail:
    """One mail as the channel needs it."""

    message_id: str
    sender: str
    sender_name: str
    reply_address: str
    subject: str
    question: str
    references: tuple[str, ...] = ()
    date: str = ""
    attachments: tuple[MediaRef, ...] = field(default_factory=tuple)


def base_subject(subject: str) -> str:
    """The subject without any stack of ``Re:``/``Fwd:`` prefixes."""
    return _REPLY_PREFIX.sub("", subject).strip()


def message_ids(value: str) -> list[str]:
    """The ``<...>`` ids in a References or In-Reply-To header, in order."""
    return _MSGID.findall(value or "")


def _header(obj: Message, name: str) -> str:
    value = obj.get(name)
    return str(value).strip() if value is not None else ""


def skip_reason(mail: MailMessage, settings: Settings) -> str | None:
    """Why this mail must not be answered, or None. Checked before anything is queued."""
    obj = mail.obj
    sender = parseaddr(_header(obj, "From"))[1].lower()
    auto = _header(obj, "Auto-Submitted").lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    if _header(obj, "Precedence").lower() in {"bulk", "list", "junk"}:
        return "bulk or list precedence"
    if _header(obj, "List-Id") or _header(obj, "List-Unsubscribe"):
        return "mailing list"
    if _header(obj, "X-Autoreply") or _header(obj, "X-Autorespond"):
        return "auto-reply"
    if obj.get_content_type() == "multipart/report" or _header(obj, "Return-Path") == "<>":
        return "delivery report"
    if _DAEMON.match(sender.split("@", 1)[0]):
        return "automatic sender"
    own = (settings.email_from or "").lower()
    if own and parseaddr(own)[1].lower() == sender:
        return "our own mail"
    if settings.email_allow:
        allowed = [a.strip().lower() for a in settings.email_allow.split(",") if a.strip()]
        domain = "@" + sender.split("@", 1)[-1]
        if sender not in allowed and domain not in allowed:
            return "sender not on the allow-list"
    return None


def _question_text(mail: MailMessage) -> str:
    text = mail.text if mail.text and mail.text.strip() else get_text(mail.html or "")
    text = text.replace("\r\n", "\n")
    return EmailReplyParser.parse_reply(text).strip()


def _attachments(mail: MailMessage, settings: Settings) -> tuple[MediaRef, ...]:
    kept = []
    for index, attachment in enumerate(mail.attachments):
        content_type = attachment.content_type.lower()
        if content_type not in ATTACHMENT_TYPES:
            continue
        if attachment.size > settings.email_max_attachment_bytes:
            continue
        kept.append(MediaRef(url=f"imap-attachment:{mail.uid}/{index}", content_type=content_type))
    return tuple(kept[:10])


def read_mail(mail: MailMessage, settings: Settings) -> InboundEmail:
    """Parse one fetched mail; raise `UnreadableMailError` for mail to set aside."""
    obj = mail.obj
    defects = [type(d).__name__ for part in obj.walk() for d in getattr(part, "defects", [])]
    if any(d in _BOUNDARY_DEFECTS for d in defects):
        raise UnreadableMailError(f"broken MIME structure ({', '.join(sorted(set(defects)))})")
    name, sender = parseaddr(_header(obj, "From"))
    if "@" not in sender:
        raise UnreadableMailError("no sender address")
    reply_to = [a for _, a in getaddresses([_header(obj, "Reply-To")]) if "@" in a]
    try:
        question = _question_text(mail)
        subject = mail.subject or ""
    except (LookupError, UnicodeError, ValueError) as error:
        raise UnreadableMailError(f"undecodable text ({error.__class__.__name__})") from None
    message_id = (message_ids(_header(obj, "Message-ID")) or [""])[0]
    if not message_id:
        raise UnreadableMailError("no Message-ID")
    references = message_ids(_header(obj, "References"))
    for parent in message_ids(_header(obj, "In-Reply-To")):
        if parent not in references:
            references.append(parent)
    return InboundEmail(
        message_id=message_id,
        sender=sender.lower(),
        sender_name=name,
        reply_address=(reply_to[0] if reply_to else sender),
        subject=subject,
        question=question,
        references=tuple(references),
        date=_header(obj, "Date"),
        attachments=_attachments(mail, settings),
    )
