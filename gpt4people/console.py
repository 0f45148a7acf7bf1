"""The one stream `gpt4people up` prints: every child's lines, and its own, named and aligned.

The children of `up` log JSON lines (`up` gives them GPT4P_LOG_FORMAT=json); a reader
thread per child reads its output line by line into a queue, and one writer thread
renders each line for the person watching: on a terminal as text, with the process's
name in a fixed-width column and colours by process and level; piped, or with
GPT4P_LOG_FORMAT=json, as JSON lines with a ``service`` field naming the process.

A child never waits on the console: a line that finds the queue full is dropped and
counted, a line longer than `MAX_LINE_BYTES` is cut, bytes that are not text are shown
escaped (never sent raw to the terminal), and every line is scrubbed of secrets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, cast

from kernel.redis_urls import scrub

SUPERVISOR = "up"  # the name on the supervisor's own lines
MAX_LINE_BYTES = 64 * 1024  # a JSON record with a long traceback fits; a runaway line is cut
SECRET_MARGIN = 256  # characters dropped before a cut, longer than any secret we mask
MAX_MESSAGE_CHARS = 8000  # the text form shows at most this much of one message
QUEUE_LINES = 10_000  # lines waiting for the terminal before a child's are dropped
SHORT_LEVELS = {"WARNING": "WARN", "CRITICAL": "CRIT"}
LEVEL_WIDTH = 5

# ANSI SGR codes: each process a colour of its own, levels coloured by how bad they are.
_PROCESS_COLOURS = ("36", "32", "35", "34", "33", "96", "92", "95", "94", "93")
_LEVEL_COLOURS = {"DEBUG": "2", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}
_DIM, _BOLD = "2", "1"
# C0/C1 control characters but tab and newline: a child's output must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRACEBACK_START = re.compile(r"^Traceback \(most recent call last\):")
_ERROR_HINT = re.compile(r"\b(ERROR|CRITICAL|FATAL|Fatal|Exception)\b|^\w+(\.\w+)*Error\b")
_WARNING_HINT = re.compile(r"\bWARN(ING)?\b|^\w+(\.\w+)*Warning\b")
_READ_CUT = re.compile(r" \.\.\. \[\d+ more bytes cut\]$")


def clean_text(text: str) -> str:
    """`text` with control characters (an escape sequence, a NUL) shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def bounded_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The lines of `stream` as text, each cut at `limit` bytes (the rest skipped and counted)."""
    while chunk := stream.readline(limit):
        line = chunk.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
        if len(chunk) == limit and not chunk.endswith(b"\n"):
            skipped = 0
            while rest := stream.readline(limit):
                skipped += len(rest.rstrip(b"\n"))
                if rest.endswith(b"\n"):
                    break
            if skipped:
                # What is kept ends early: a secret cut in two would not be masked.
                margin = min(SECRET_MARGIN, len(line) // 4)
                skipped += len(line[len(line) - margin :].encode())
                line = line[: len(line) - margin] + f" ... [{skipped} more bytes cut]"
        yield clean_text(line)


class PlainLevels:
    """Guesses the level of a child's lines that are not JSON (a crash before logging is set up)."""

    def __init__(self) -> None:
        self.in_traceback = False

    def level(self, line: str) -> str:
        """ERROR for a traceback (all its lines) or an error; WARNING for a warning; else INFO."""
        if _TRACEBACK_START.match(line):
            self.in_traceback = True
            return "ERROR"
        if self.in_traceback:
            # Frames are indented; the first line that is not ends it (the exception itself).
            self.in_traceback = line.startswith((" ", "\t"))
            return "ERROR"
        if _ERROR_HINT.search(line):
            return "ERROR"
        if _WARNING_HINT.search(line):
            return "WARNING"
        return "INFO"


def parse_line(line: str, levels: PlainLevels | None = None) -> dict[str, Any]:
    """A child's output line as a log entry: its JSON record, or the line as the message."""
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and "msg" in entry:
            return entry
    return {"level": (levels or PlainLevels()).level(line), "msg": line}


def _scrubbed(value: Any, secrets: set[str]) -> Any:
    if isinstance(value, str):
        return clean_text(scrub(value, secrets))
    if isinstance(value, dict):
        return {key: _scrubbed(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item, secrets) for item in value]
    return value


def _paint(text: str, code: str | None, colour: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def process_colour(name: str, names: Iterable[str] = ()) -> str:
    """The colour of process `name`: the next of the palette in start order, else by its name."""
    if name == SUPERVISOR:
        return _BOLD
    known = [n for n in names if n != SUPERVISOR]
    index = known.index(name) if name in known else zlib.crc32(name.encode())
    return _PROCESS_COLOURS[index % len(_PROCESS_COLOURS)]


def _clock(entry: Mapping[str, Any]) -> str:
    """The entry's time as local HH:MM:SS (now, when it has none)."""
    with contextlib.suppress(TypeError, ValueError):
        return datetime.fromisoformat(str(entry.get("ts"))).astimezone().strftime("%H:%M:%S")
    return datetime.now().strftime("%H:%M:%S")


def _bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(message) <= limit:
        return message
    read_cut = _READ_CUT.search(message)  # what the reader cut already: said too
    kept = f"{message[:limit]} ... [{len(message) - limit} more characters cut]"
    return kept + (read_cut.group(0) if read_cut else "")


@dataclass(frozen=True)
class ConsoleStyle:
    """How the console renders: JSON lines or text, colours, the name column's width."""

    as_json: bool = False
    colour: bool = False
    width: int = len(SUPERVISOR)
    names: tuple[str, ...] = ()


def render_text(service: str, entry: Mapping[str, Any], style: ConsoleStyle) -> str:
    """``HH:MM:SS name  LEVEL logger: message [job]``, one line per line of the message."""
    level = str(entry.get("level") or "INFO").upper()
    name = _paint(f"{service:<{style.width}}", process_colour(service, style.names), style.colour)
    shown = _paint(f"{SHORT_LEVELS.get(level, level):<{LEVEL_WIDTH}}",
                   _LEVEL_COLOURS.get(level), style.colour)  # fmt: skip
    prefix = f"{_paint(_clock(entry), _DIM, style.colour)} {name} {shown} "
    logger = entry.get("logger")
    text = _bounded(str(entry.get("msg", "")).rstrip("\n"))
    if logger and service != SUPERVISOR:
        text = f"{_paint(str(logger), _DIM, style.colour)}: {text}"
    job = entry.get("job_id")
    if job and str(job) not in text:  # Celery's own lines already name the task
        text += f" [{job}]"
    if entry.get("error"):
        text += "\n" + _bounded(str(entry["error"]).rstrip("\n"))
    return "\n".join(prefix + line for line in text.split("\n"))


def render_json(service: str, entry: Mapping[str, Any]) -> str:
    """The entry as a JSON line with a ``service`` field (and a time, if it had none)."""
    record = {"ts": entry.get("ts") or datetime.now(UTC).isoformat(timespec="milliseconds"),
              "service": service}  # fmt: skip
    record.update((key, value) for key, value in entry.items() if key not in record)
    return json.dumps(record, ensure_ascii=False)


def render(
    service: str, entry: Mapping[str, Any], style: ConsoleStyle, secrets: Collection[str] = ()
) -> str:
    """One entry of process `service`, scrubbed of `secrets` and URL passwords, for printing."""
    clean = _scrubbed(dict(entry), set(secrets))
    return render_json(service, clean) if style.as_json else render_text(service, clean, style)


def choose_style(
    stream: IO[str], names: Iterable[str], log_format: str | None, environ: Mapping[str, str]
) -> ConsoleStyle:
    """Text on a terminal, JSON lines otherwise; `log_format` (the user's own
    GPT4P_LOG_FORMAT, None when unset) decides when given. Colour only as text on a
    terminal, and never with NO_COLOR set or TERM=dumb."""
    tty = stream.isatty()
    as_json = log_format == "json" if log_format else not tty
    colour = tty and not as_json and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"
    names = (SUPERVISOR, *names)
    return ConsoleStyle(as_json, colour, max(len(n) for n in names), names)


_CLOSE = object()


class Console:
    """The one output stream of `up`: its children's lines and its own, in arrival order."""

    def __init__(self, style: ConsoleStyle, out: IO[str] | None = None) -> None:
        self.style = style
        self.out = out or sys.stdout
        self.secrets: set[str] = set()
        self._lines: queue.Queue[object] = queue.Queue(QUEUE_LINES)
        self._readers: list[threading.Thread] = []
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._broken = False
        self._writer = threading.Thread(target=self._write_all, name="console", daemon=True)
        self._writer.start()

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Mask these from every line printed from now on."""
        # A new set, not changed in place: the writer thread may be reading the old one.
        self.secrets = self.secrets | {s for s in secrets if s}

    def say(self, message: str, level: str = "INFO", service: str = SUPERVISOR) -> None:
        """Print a line of the supervisor's own (it waits a little for room, then drops it)."""
        entry = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": level,
                 "logger": "gpt4people.supervisor", "msg": message}  # fmt: skip
        try:
            self._lines.put((service, entry), timeout=1.0)
        except queue.Full:
            with self._dropped_lock:
                self._dropped += 1

    def follow(self, name: str, stream: IO[bytes]) -> None:
        """Read `stream` (a child's output) to its end in a thread of its own, line by line."""
        reader = threading.Thread(target=self._read, args=(name, stream), daemon=True,
                                  name=f"console-{name}")  # fmt: skip
        self._readers = [r for r in self._readers if r.is_alive()] + [reader]
        reader.start()

    def close(self, timeout: float = 5.0) -> None:
        """Print what the children wrote until they closed their output, then stop."""
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(queue.Full):  # a writer stuck on its output is left behind
            self._lines.put(_CLOSE, timeout=max(0.1, deadline - time.monotonic()))
        self._writer.join(max(1.0, deadline - time.monotonic()))

    def _read(self, name: str, stream: IO[bytes]) -> None:
        levels = PlainLevels()
        with stream:
            for line in bounded_lines(stream):
                if not line.strip():
                    continue  # Celery frames its shutdown notice with blank lines
                try:
                    self._lines.put_nowait((name, parse_line(line, levels)))
                except queue.Full:
                    with self._dropped_lock:
                        self._dropped += 1

    def _write_all(self) -> None:
        while (item := self._lines.get()) is not _CLOSE:
            with self._dropped_lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                lost = f"{dropped} lines dropped: the console could not keep up"
                self._write(SUPERVISOR, {"level": "WARNING", "msg": lost})
            service, entry = cast(tuple[str, dict[str, Any]], item)
            self._write(service, entry)

    def _write(self, service: str, entry: Mapping[str, Any]) -> None:
        if self._broken:
            return
        try:
            text = render(service, entry, self.style, self.secrets)
        except Exception:  # noqa: BLE001 - one odd line must not silence the console
            odd = {"ts": None, "level": "ERROR", "msg": "(a line that could not be shown)"}
            text = render(service, odd, self.style)
        try:
            try:
                self.out.write(text + "\n")
            except UnicodeEncodeError:
                encoding = getattr(self.out, "encoding", None) or "ascii"
                self.out.write(text.encode(encoding, "replace").decode(encoding) + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError, OSError):
            # `up | head`: the reader left. Keep draining the children (so they never block),
            # and point the stream at /dev/null so that the exit's flush does not fail.
            self._broken = True
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())


class ConsoleLogHandler(logging.Handler):
    """Sends the supervisor's own log records to the console, as lines of `up`."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record's message."""
        try:
            self.console.say(record.getMessage(), record.levelname)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
