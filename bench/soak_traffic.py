"""The traffic of `bench.soak`: the fake peers, the senders, the inbox that times answers,
the accounting of what became of each message, and the table.

Each message the soak sends is a `Record`: which route it took (SMS, email,
HTTP streamed or not, a helper call), when it was sent, whether the service
accepted it and every answer that came back for it. SMS and email answers are
attributed through a sender number or Message-ID of the message's own.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import httpx

from channels.email.intake import digest
from tests.channels import mail_servers
from tests.channels.mail_servers import Dovecot, SmtpCapture
from tests.channels.twilio_recorder import TwilioRecorder, running_recorder

EMAIL_FROM = "soak@gpt4people.test"
ANSWER_TOKENS = 24
QUESTIONS = (
    "What is the capital of France?", "Name a colour of the sky.", "How many legs has a cat?",
    "What do bees make?", "Say hello in Spanish.", "What is water made of?",
    "Name a planet.", "What season comes after winter?",
)  # fmt: skip
HELPER_CALLS = ("/calc (2+3)*4 - 2**3", "/calc 6*7", "/time UTC", "/time Tokyo")
# Route -> weight in the mix. Helper calls go by SMS and HTTP; email carries plain questions.
MIX = {"sms": 3, "sms-helper": 1, "email": 2, "http": 2, "http-stream": 2, "http-helper": 1}
_PART = re.compile(r"^\((\d+)/(\d+)\) ")


class Clock:
    """Seconds since the soak started (since `reset`)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def reset(self) -> None:
        """Start counting from now."""
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class Record:
    """One message the soak sent and what became of it (times are seconds since the start)."""

    seq: int
    route: str
    sent_at: float
    accepted: bool = False
    refused: str | None = None  # what the client saw instead of an acceptance
    failed: str | None = None  # an error the client saw after the job was accepted
    answers: list[float] = field(default_factory=list)  # arrival of each answer (or part)
    labels: list[str] = field(default_factory=list)  # per answer: SMS part, reply Message-ID
    first_token: float | None = None  # streamed HTTP only
    job: str = ""  # the job id, to find the message in the logs

    @property
    def copies(self) -> int:
        """How many times it was answered: a part sent twice, or two different replies."""
        if not self.labels:
            return len(self.answers)
        if self.route == "email":
            return len(set(self.labels))  # one Message-ID resent is one reply in every client
        # An SMS reply starts with its whole text or its part 1; a second start is a second
        # answer even when it was split differently (the model ran again).
        starts = sum(1 for label in self.labels if label == "whole" or label.startswith("1/"))
        return max(starts, *Counter(self.labels).values())

    @property
    def latency(self) -> float | None:
        """Seconds from sending to the first answer."""
        return self.answers[0] - self.sent_at if self.answers else None

    def as_json(self) -> dict[str, Any]:
        """Every number of the record; no message content, numbers or addresses."""
        return {"seq": self.seq, "route": self.route, "sent_at": round(self.sent_at, 3),
                "accepted": self.accepted, "refused": self.refused, "failed": self.failed,
                "answers": [round(t, 3) for t in self.answers], "copies": self.copies,
                "latency": self.latency, "first_token": self.first_token,
                "job": self.job}  # fmt: skip


@contextlib.contextmanager
def peers(with_email: bool) -> Iterator[tuple[TwilioRecorder, SmtpCapture, Dovecot | None]]:
    """The Twilio recorder, an SMTP sink and (with email) dovecot, as the tests start them."""
    mailbox = mail_servers.running_dovecot() if with_email else contextlib.nullcontext()
    with (
        running_recorder("AC" + "5" * 32, "soak-auth-token") as recorder,
        mail_servers.running_smtp() as capture,
        mailbox as box,
    ):
        yield recorder, capture, box


class Inbox:
    """Watches what Twilio and the SMTP server received and files each answer under its record."""

    def __init__(self, recorder: TwilioRecorder, smtp: SmtpCapture, clock: Clock) -> None:
        self.recorder, self.smtp, self.clock = recorder, smtp, clock
        self.by_number: dict[str, Record] = {}
        self.by_message_id: dict[str, Record] = {}
        self.unattributed = 0
        self._seen_calls = self._seen_mail = 0
        self.lock = threading.Lock()

    def poll(self) -> None:
        """File every answer that arrived since the last poll."""
        now = self.clock()
        with self.recorder.lock:
            calls = self.recorder.calls[self._seen_calls :]
            self._seen_calls += len(calls)
        with self.smtp.lock:
            mails = self.smtp.messages[self._seen_mail :]
            self._seen_mail += len(mails)
        with self.lock:
            for call in calls:
                if call.status == 201:
                    part = _PART.match(call.form.get("Body", ""))
                    self._file(self.by_number.get(call.form.get("To", "")), now,
                               f"{part[1]}/{part[2]}" if part else "whole")  # fmt: skip
            for mail in mails:
                original = str(mail.get("In-Reply-To", "")).strip()
                self._file(self.by_message_id.get(original), now, str(mail["Message-ID"]))

    def _file(self, record: Record | None, now: float, label: str) -> None:
        if record is None:
            self.unattributed += 1
            return
        record.answers.append(now)
        record.labels.append(label)


class Sender:
    """Sends one message of a route and records what the client saw."""

    def __init__(self, web: str, recorder: TwilioRecorder, dovecot: Dovecot | None,
                 inbox: Inbox, timeout: float) -> None:  # fmt: skip
        self.web, self.recorder, self.dovecot, self.inbox = web, recorder, dovecot, inbox
        self.clock = inbox.clock
        self.http = httpx.Client(timeout=timeout)
        self.run_id = uuid.uuid4().hex[:8]

    def send(self, record: Record, text: str) -> None:
        """Send `text` by `record.route`; never raises (a failure is recorded)."""
        try:
            if record.route.startswith("sms"):
                self._sms(record, text)
            elif record.route == "email":
                self._email(record, text)
            else:
                self._http(record, text, stream=record.route == "http-stream")
        except Exception as error:  # a connection refused, an IMAP error, a garbled event
            if record.accepted:
                record.failed = record.failed or type(error).__name__
            else:
                record.refused = type(error).__name__

    def _sms(self, record: Record, text: str) -> None:
        number = f"+1555{record.seq:07d}"
        params, headers = self.recorder.webhook(f"{self.web}/sms", number, text)
        record.job = f"sms-{params['MessageSid']}"
        with self.inbox.lock:
            self.inbox.by_number[number] = record
        response = self.http.post(f"{self.web}/sms", data=params, headers=headers)
        record.accepted = response.status_code == 200
        record.refused = None if record.accepted else str(response.status_code)

    def _email(self, record: Record, text: str) -> None:
        assert self.dovecot is not None
        message_id = f"<soak-{self.run_id}-{record.seq}@example.org>"
        record.job = f"email-{digest(message_id)}"
        message = EmailMessage()
        message["From"] = f"person{record.seq}@example.org"
        message["To"], message["Subject"], message["Message-ID"] = EMAIL_FROM, text, message_id
        message.set_content(text)
        with self.inbox.lock:
            self.inbox.by_message_id[message_id] = record
        self.dovecot.append(message.as_bytes())  # in the mailbox: accepted
        record.accepted = True

    def _http(self, record: Record, text: str, stream: bool) -> None:
        body = {"model": "soak", "messages": [{"role": "user", "content": text}],
                "max_tokens": ANSWER_TOKENS, "stream": stream}  # fmt: skip
        url = f"{self.web}/v1/chat/completions"
        if not stream:
            response = self.http.post(url, json=body)
            if response.status_code == 200 and response.json()["choices"][0]["message"]:
                record.accepted = True
                record.job = response.json()["id"].removeprefix("chatcmpl-")
                record.answers.append(self.clock())
            else:
                record.refused = str(response.status_code)
            return
        with self.http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                record.refused = str(response.status_code)
                return
            for line in response.iter_lines():
                self._event(record, line.removeprefix("data: "))
        if record.accepted and not record.answers and record.failed is None:
            record.failed = "stream ended early"

    def _event(self, record: Record, data: str) -> None:
        """One server-sent event: the first chunk (the job id) means the job was queued."""
        if not data:
            return
        if data == "[DONE]":
            record.answers.append(self.clock())
            return
        event = json.loads(data)
        if "error" in event:
            message = str(event["error"].get("message", "error"))
            if record.accepted:
                record.failed = message
            else:
                record.refused = f"stream: {message}"
            return
        record.accepted = True
        record.job = record.job or str(event.get("id", "")).removeprefix("chatcmpl-")
        if event["choices"][0]["delta"].get("content") and record.first_token is None:
            record.first_token = self.clock() - record.sent_at


def send_traffic(sender: Sender, rate: float, rng: random.Random, records: list[Record],
                 until: float) -> list[Future[None]]:  # fmt: skip
    """Send about `rate` messages a minute (Poisson arrivals) until `until` on the clock."""
    mix = {route: w for route, w in MIX.items() if route != "email" or sender.dovecot}
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="send")
    futures = []
    next_at = sender.clock()
    while next_at < until:
        time.sleep(max(0.0, next_at - sender.clock()))
        route = rng.choices(list(mix), weights=list(mix.values()))[0]
        text = rng.choice(HELPER_CALLS if route.endswith("helper") else QUESTIONS)
        record = Record(seq=len(records), route=route, sent_at=sender.clock())
        records.append(record)
        futures.append(pool.submit(sender.send, record, text))
        next_at += rng.expovariate(rate / 60)
    pool.shutdown(wait=False)
    return futures


def settled(records: list[Record], futures: list[Future[None]]) -> bool:
    """Every request returned and every accepted message answered (or told it failed)."""
    return all(f.done() for f in futures) and all(
        r.answers or r.failed or not r.accepted for r in records
    )


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile (None for no values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sent, accepted, answered, lost, doubled, refused, failed and latencies of some records."""
    latencies = [r["latency"] for r in records if r["latency"] is not None]
    unanswered = [r for r in records if r["accepted"] and not r["answers"]]
    return {
        "sent": len(records), "accepted": sum(r["accepted"] for r in records),
        "answered": sum(bool(r["answers"]) for r in records),
        "lost": sum(not r["failed"] for r in unanswered),
        "doubled": sum(r["copies"] > 1 for r in records),
        "refused": sum(not r["accepted"] for r in records),
        "failed": sum(bool(r["failed"]) for r in unanswered),
        "p50": quantile(latencies, 0.5), "p99": quantile(latencies, 0.99),
    }  # fmt: skip


def after_kill(records: list[dict[str, Any]], at: float) -> dict[str, Any]:
    """After a kill: seconds to the next answer, the messages then pending (accepted, not yet
    answered) and seconds until the last of them was answered (None: one never was)."""
    later = [t for r in records for t in r["answers"] if t > at]
    pending = [r for r in records if r["accepted"] and r["sent_at"] < at
               and (not r["answers"] or r["answers"][0] > at)]  # fmt: skip
    backlog = None
    if all(r["answers"] for r in pending):
        backlog = max((r["answers"][0] - at for r in pending), default=0.0)
    return {"next_answer": min(later) - at if later else None, "pending": len(pending),
            "backlog_answered": backlog}  # fmt: skip


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(results: dict[str, Any]) -> str:
    """The soak's table, from the raw numbers alone (so it can be rebuilt from soak.json)."""
    config = results["config"]
    head = (
        f"soak: {config['minutes']:g} min, {config['workers']} workers, {config['rate']:g} "
        f"msg/min, a kill every ~{config['kill_every']:g}s, seed {config['seed']}, email "
        f"{'on' if config['email'] else 'off'}; " + _settled_text(results["settled_after"])
    )
    return "\n".join([head, "", *_route_lines(results["records"]), "", *_kill_lines(results),
                      "", *_memory_lines(results)])  # fmt: skip


def _settled_text(after: float | None) -> str:
    if after is None:
        return "NOT everything answered in the grace period"
    return f"everything answered {after:.1f}s after the traffic stopped"


def _route_lines(records: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'route':<12}{'sent':>6}{'accepted':>9}{'answered':>9}{'lost':>6}{'doubled':>8}"
             f"{'refused':>8}{'failed':>7}{'p50 s':>8}{'p99 s':>8}"]  # fmt: skip
    for route in [*MIX, "all"]:
        if mine := [r for r in records if route in ("all", r["route"])]:
            c = counts(mine)
            lines.append(f"{route:<12}{c['sent']:>6}{c['accepted']:>9}{c['answered']:>9}"
                         f"{c['lost']:>6}{c['doubled']:>8}{c['refused']:>8}{c['failed']:>7}"
                         f"{_s(c['p50']):>8}{_s(c['p99']):>8}")  # fmt: skip
    firsts = [r["first_token"] for r in records if r["first_token"] is not None]
    if firsts:
        lines.append(f"streamed first token: p50 {_s(quantile(firsts, 0.5))} s, "
                     f"p99 {_s(quantile(firsts, 0.99))} s")  # fmt: skip
    reasons = Counter(r["refused"] or r["failed"] for r in records if r["refused"] or r["failed"])
    if reasons:
        lines.append("errors clients saw: " + ", ".join(f"{k} x{n}" for k, n in reasons.items()))
    for r in records:
        if r["copies"] > 1 or (r["accepted"] and not r["answers"] and not r["failed"]):
            what = f"answered {r['copies']} times" if r["copies"] > 1 else "LOST"
            lines.append(f"  {what}: #{r['seq']} {r['route']} sent at {r['sent_at']:.1f}s, "
                         f"job {r['job']}")  # fmt: skip
    return lines


def _kill_lines(results: dict[str, Any]) -> list[str]:
    lines = [f"{'kill at s':>10}  {'target':<20}{'next answer s':>14}{'pending':>9}"
             f"{'all answered s':>16}"]  # fmt: skip
    for kill in results["kills"]:
        after = after_kill(results["records"], kill["at"])
        done = _s(after["backlog_answered"]) if after["backlog_answered"] is not None else "NEVER"
        done = done if after["pending"] else "-"
        lines.append(f"{kill['at']:>10.1f}  {kill['target']:<20}{_s(after['next_answer']):>14}"
                     f"{after['pending']:>9}{done:>16}")  # fmt: skip
    return lines


def _memory_lines(results: dict[str, Any]) -> list[str]:
    start, end, services = results["start"], results["end"], results["services"]
    lines = [f"{'process':<22}{'RSS start MiB':>14}{'RSS end MiB':>13}{'growth':>8}"
             f"{'killed':>8}{'died alone':>11}"]  # fmt: skip
    for name, info in services.items():
        before, after = start["rss"].get(name, 0) / 2**20, end["rss"].get(name, 0) / 2**20
        growth = f"{after / before - 1:+.0%}" if before and after else "-"
        restarted = "*" if info["kills"] or info["exits"] else " "
        lines.append(f"{name:<22}{before:>14.1f}{after:>13.1f}{growth:>8}{restarted}"
                     f"{info['kills']:>7}{len(info['exits']):>11}")  # fmt: skip
    lines.append("* restarted during the soak: its end figure is of a younger process")
    for label, shot in (("start", start), ("end", end)):
        memory = shot.get("redis") or {}
        lines.append(f"redis memory at {label}: {memory.get('used_memory_human', '?')} "
                     f"({memory.get('used_memory', '?')} B)")  # fmt: skip
    queues = " ".join(f"{q}={n}" for q, n in end.get("queues", {}).items())
    lines.append(f"at the end: {queues} ledger={end.get('ledger', '?')} "
                 f"unacked={end.get('unacked', '?')}")  # fmt: skip
    if results["unattributed_answers"]:
        lines.append(f"answers to no message the soak sent: {results['unattributed_answers']}")
    return lines
