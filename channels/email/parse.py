"""Reading mail well: who asked, what (without quoted history), in which thread, and
whether it must not be answered at all (auto-replies, bounces, lists, ourselves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email import policy
from email.errors import MessageError
from email.headerregistry import AddressHeader
from email.message import Message
from email.utils import getaddresses, parseaddr
from typing import cast

from email_reply_parser import EmailReplyParser
from imap_tools import MailMessage
from inscriptis import get_text

from channels.email.auth import AUTH_HEADER, MAX_HEADERS, from_authenticated
from kernel.contract import MediaRef
from kernel.settings import Settings

_MSGID = re.compile(r"<[^<>\s]+>")
_DAEMON = re.compile(
    r"^(mailer-daemon|postmaster|no-?reply|do-?not-?reply|bounces?|auto-?reply)([+._-].*)?$",
    re.IGNORECASE,
)
# What str.splitlines() breaks on (the email package refuses any of them in a header),
# with the other control characters: none belongs in a header we write.
_LINE_BREAKS_AND_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# A plain ASCII address (IDNs arrive as punycode): nothing else is ever written into To.
_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+"
)
MAX_SUBJECT_CHARS = 512
MAX_FROM_CHARS = 2000  # a real From is far shorter; a longer one is not parsed at all
MAX_FROM_COMMENTS = 10  # the strict parser recurses once per nested "(": bound it first
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
    authenticated: bool = False  # our receiving server vouched for `sender`
    reply_to_ignored: bool = False  # a Reply-To was there and is not where the answer goes


def one_line(text: str) -> str:
    """`text` fit for a header: line breaks and control characters become single spaces."""
    return " ".join(_LINE_BREAKS_AND_CONTROLS.sub(" ", text).split())


def plain_address(address: str) -> bool:
    """Whether `address` is a plain ASCII ``local@domain`` we may write into a To header."""
    return len(address) <= 254 and _ADDRESS.fullmatch(address) is not None


def listed(address: str, settings: Settings) -> bool:
    """Whether GPT4P_EMAIL_ALLOW names `address` or its ``@domain`` (unset names no one)."""
    entries = {a.strip().lower() for a in (settings.email_allow or "").split(",") if a.strip()}
    address = address.lower()
    return address in entries or "@" + address.rpartition("@")[2] in entries


def allowed(address: str, settings: Settings) -> bool:
    """Whether GPT4P_EMAIL_ALLOW lets us answer (or write to) `address`; unset: everyone."""
    return not settings.email_allow or listed(address, settings)


def authserv_id(settings: Settings) -> str | None:
    """The authserv-id of our own receiving server's Authentication-Results; None: none read.

    There is deliberately no fallback (such as the IMAP host): a receiving server
    strips only the headers claiming its own id, so a guessed id is one a sender
    can write into the mail and have believed.
    """
    return settings.email_authserv_id


def sender_of(obj: Message) -> tuple[str, str]:
    """The display name and the lower-case address of the one From of `obj`.

    Anything ambiguous raises `UnreadableMailError`: no From or several, a From
    with several addresses, or one that only a lenient parser reads (``parseaddr``
    takes ``a@x <b@y>`` as ``a@x``). The strict RFC 5322 parser of
    ``email.policy.default`` decides, and any defect it calls invalid refuses.
    """
    values = obj.get_all("From") or []
    if not values:
        raise UnreadableMailError("no sender address we can answer")
    if len(values) > 1:
        raise UnreadableMailError("several From headers")
    value = str(values[0]).strip()
    if len(value) > MAX_FROM_CHARS or value.count("(") > MAX_FROM_COMMENTS:
        raise UnreadableMailError("From header too long or too nested")
    try:
        header = policy.default.header_factory("From", value)
        addresses, defects = cast(AddressHeader, header).addresses, header.defects
    except (MessageError, ValueError, LookupError, TypeError, AttributeError, RecursionError):
        raise UnreadableMailError("From cannot be parsed") from None
    if len(addresses) != 1 or any("Invalid" in type(d).__name__ for d in defects):
        raise UnreadableMailError("From is not exactly one well-formed address")
    address = addresses[0].addr_spec.lower()
    if not plain_address(address):
        raise UnreadableMailError("no sender address we can answer")
    return _display_name(addresses[0].display_name, address), address


def _display_name(name: str, address: str) -> str:
    """`name` fit to echo, or "" when it shows an address other than the real one."""
    shown = {m.group(0).lower() for m in _ADDRESS.finditer(name)}
    return "" if shown - {address} else one_line(name)


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
    try:
        sender = sender_of(obj)[1]
    except UnreadableMailError as error:
        return str(error)
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
    if not allowed(sender, settings):
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


def _reply_address(
    obj: Message, sender: str, authenticated: bool, settings: Settings
) -> tuple[str, bool]:
    """Where the answer goes, and whether a Reply-To was passed over for it.

    Reply-To is honoured only when our server authenticated From, Reply-To is in
    From's own domain, and GPT4P_EMAIL_ALLOW names Reply-To or its domain: anyone
    can type a Reply-To, and answering it would make us a relay that mails
    strangers whatever the sender wrote. The same domain alone is not enough, as
    anyone with a free account passes DMARC for a shared domain (gmail.com).
    """
    given = [a.lower() for _, a in getaddresses([_header(obj, "Reply-To")]) if "@" in a]
    if not given or given[0] == sender:
        return sender, False
    target = given[0]
    same_domain = target.rpartition("@")[2] == sender.rpartition("@")[2]
    if authenticated and same_domain and plain_address(target) and listed(target, settings):
        return target, False
    return sender, True


def read_mail(mail: MailMessage, settings: Settings) -> InboundEmail:
    """Parse one fetched mail; raise `UnreadableMailError` for mail to set aside."""
    obj = mail.obj
    defects = [type(d).__name__ for part in obj.walk() for d in getattr(part, "defects", [])]
    if any(d in _BOUNDARY_DEFECTS for d in defects):
        raise UnreadableMailError(f"broken MIME structure ({', '.join(sorted(set(defects)))})")
    name, sender = sender_of(obj)
    try:
        question = _question_text(mail)
        subject = one_line(mail.subject or "")[:MAX_SUBJECT_CHARS]
    except (LookupError, UnicodeError, ValueError) as error:
        raise UnreadableMailError(f"undecodable text ({error.__class__.__name__})") from None
    message_id = (message_ids(_header(obj, "Message-ID")) or [""])[0]
    if not message_id:
        raise UnreadableMailError("no Message-ID")
    references = message_ids(_header(obj, "References"))
    for parent in message_ids(_header(obj, "In-Reply-To")):
        if parent not in references:
            references.append(parent)
    results = [str(h) for h in (obj.get_all(AUTH_HEADER) or [])[:MAX_HEADERS]]
    authenticated = from_authenticated(results, sender, authserv_id(settings))
    reply_address, ignored = _reply_address(obj, sender, authenticated, settings)
    return InboundEmail(
        message_id=message_id,
        sender=sender,
        sender_name=name,
        reply_address=reply_address,
        subject=subject,
        question=question,
        references=tuple(references),
        date=one_line(_header(obj, "Date")),
        attachments=_attachments(mail, settings),
        authenticated=authenticated,
        reply_to_ignored=ignored,
    )
