"""Whether a mail's From is genuine, as OUR receiving server judged it (RFC 8601).

From and Reply-To are whatever the sender typed. Only the
``Authentication-Results`` header fields that our own receiving server added
say whether From is real: those at the top of the mail whose authserv-id is
ours (``GPT4P_EMAIL_AUTHSERV_ID``; unset, nothing is authenticated). A header
the sender wrote into the mail names another server, or sits below ours;
either way it is not read. The receiving server must delete incoming headers
that claim its own authserv-id, as RFC 8601 section 5 requires (OpenDMARC,
rspamd and the large providers do); it strips only those naming its own id,
which is why there is no default id to guess (such as the IMAP host's name).

From counts as authenticated on ``dmarc=pass`` whose ``header.from`` is its
domain, or on ``dkim=pass`` / ``spf=pass`` for a domain aligned with it; an
explicit ``dmarc=fail`` wins over everything else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

AUTH_HEADER = "Authentication-Results"
MAX_HEADERS = 20  # more of them is not a real server's doing: the rest are not read
MAX_HEADER_CHARS = 8192
_PAIR = re.compile(r'([A-Za-z0-9_.-]+(?:\s*/\s*[0-9]+)?)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s";]+)')


@dataclass(frozen=True)
class MethodResult:
    """One ``method=result`` of an Authentication-Results field, with its properties."""

    method: str
    result: str
    properties: dict[str, str] = field(default_factory=dict)


def _without_comments(value: str) -> str:
    """`value` with its (possibly nested) comments removed; quoted strings kept."""
    out: list[str] = []
    depth, quoted, escaped = 0, False, False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(char)
            continue
        if char == "\\" and (quoted or depth):
            escaped = True
            if depth == 0:
                out.append(char)
        elif quoted:
            quoted = char != '"'
            out.append(char)
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            quoted = char == '"'
            out.append(char)
    return "".join(out)


def _split_outside_quotes(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted, escaped = False, False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_results(value: str) -> tuple[str, list[MethodResult]]:
    """The authserv-id (lower case) and the method results of one header field."""
    segments = _split_outside_quotes(_without_comments(str(value)[:MAX_HEADER_CHARS]))
    head = segments[0].split()
    authserv_id = _unquote(head[0]).lower() if head else ""
    results = []
    for segment in segments[1:]:
        pairs = _PAIR.findall(segment)
        if not pairs:
            continue  # "none", or noise
        method = re.sub(r"\s*/.*", "", pairs[0][0]).lower()
        properties = {key.lower(): _unquote(val).lower() for key, val in pairs[1:]}
        results.append(MethodResult(method, _unquote(pairs[0][1]).lower(), properties))
    return authserv_id, results


def trusted_results(headers: Sequence[str], authserv_id: str) -> list[MethodResult]:
    """What our server said: for each method, its results in the topmost field with our id.

    Only the leading run of fields with our authserv-id counts: the first field
    naming another server ends it, since everything below was in the mail before
    our server received it. Within the run, a method's topmost field wins, so a
    second verdict appended further down cannot overrule ours.
    """
    ours = authserv_id.strip().lower()
    chosen: dict[str, list[MethodResult]] = {}
    for header in headers[:MAX_HEADERS]:
        server, results = parse_results(header)
        if not ours or server != ours:
            break
        by_method: dict[str, list[MethodResult]] = {}
        for result in results:
            by_method.setdefault(result.method, []).append(result)
        for method, found in by_method.items():
            chosen.setdefault(method, found)
    return [result for found in chosen.values() for result in found]


def aligned(domain: str, from_domain: str) -> bool:
    """Whether `domain` (a DKIM ``d=`` or SPF domain) may vouch for mail from `from_domain`.

    Equal, or `from_domain` is a subdomain of it: the owner of a domain owns its
    subdomains. The converse (a subdomain vouching for its parent) is refused,
    since without the Public Suffix List ``you.github.io`` could vouch for
    ``github.io``.
    """
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if "." not in domain or not from_domain:
        return False
    return from_domain == domain or from_domain.endswith("." + domain)


def _domain_of(value: str) -> str:
    return value.rpartition("@")[2].strip().lower()


def from_authenticated(headers: Sequence[str], sender: str, authserv_id: str | None) -> bool:
    """Whether our receiving server authenticated the From address `sender`."""
    if not authserv_id:
        return False
    from_domain = _domain_of(sender)
    results = trusted_results(headers, authserv_id)
    dmarc = [r for r in results if r.method == "dmarc"]
    if any(r.result == "fail" for r in dmarc):
        return False
    for result in results:
        if result.result != "pass":
            continue
        props = result.properties
        # A dmarc=pass that does not say for which From domain vouches for none.
        vouched_for = _domain_of(props.get("header.from", ""))
        if result.method == "dmarc" and vouched_for and vouched_for == from_domain:
            return True
        signer = props.get("header.d") or _domain_of(props.get("header.i", ""))
        if result.method == "dkim" and aligned(signer, from_domain):
            return True
        envelope = props.get("smtp.mailfrom", "")
        if result.method == "spf" and aligned(_domain_of(envelope), from_domain):
            return True
    return False
