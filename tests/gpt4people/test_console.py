"""The console of `gpt4people up`: children's lines named, aligned, coloured, bounded, scrubbed."""

from __future__ import annotations

import io
import json
import re

import pytest

from gpt4people.console import (
    MAX_LINE_BYTES,
    MAX_MESSAGE_CHARS,
    SECRET_MARGIN,
    Console,
    ConsoleStyle,
    PlainLevels,
    bounded_lines,
    choose_style,
    parse_line,
    render,
)

NAMES = ("worker1", "deliver", "helper-image", "web", "flower")
TEXT = ConsoleStyle(as_json=False, colour=False, width=len("helper-image"), names=("up", *NAMES))
COLOURED = ConsoleStyle(as_json=False, colour=True, width=TEXT.width, names=TEXT.names)
JSON = ConsoleStyle(as_json=True)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def record(**fields: object) -> str:
    """A line as a child writes it (kernel.logs.JsonFormatter)."""
    entry = {"ts": "2026-01-02T03:04:05.678+00:00", "level": "INFO", "logger": "uvicorn.error",
             "msg": "Started server process [12]", "pid": 12, "process": "MainProcess"}  # fmt: skip
    return json.dumps({**entry, **fields})


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_json_line_becomes_text_with_the_process_name_in_a_fixed_column() -> None:
    web = render("web", parse_line(record()), TEXT)
    image = render("helper-image", parse_line(record(level="WARNING", logger="helpers.image",
                                                     msg="too big")), TEXT)  # fmt: skip
    assert re.fullmatch(r"\d\d:\d\d:\d\d web {10}INFO  uvicorn\.error: Started server "
                        r"process \[12\]", web), web  # fmt: skip
    assert re.fullmatch(r"\d\d:\d\d:\d\d helper-image WARN  helpers\.image: too big", image)
    assert web.index("uvicorn") == image.index("helpers")  # aligned


def test_a_job_id_and_a_traceback_keep_the_prefix_on_every_line() -> None:
    failed = record(level="ERROR", logger="workers.tasks", msg="job failed", job_id="job-42",
                    error="Traceback:\n  File x\nValueError")  # fmt: skip
    entry = parse_line(failed)
    lines = render("worker1", entry, TEXT).split("\n")
    assert lines[0].endswith("ERROR workers.tasks: job failed [job-42]")
    assert [line[9:27] for line in lines] == ["worker1      ERROR"] * 4
    assert lines[-1].endswith("ValueError")
    retrying = parse_line(record(msg="Cannot connect.\nTrying again in 1.00 second...\n"))
    assert [line[28:] for line in render("deliver", retrying, TEXT).split("\n")] == [
        "uvicorn.error: Cannot connect.", "Trying again in 1.00 second..."]  # fmt: skip


def test_a_line_that_is_not_json_is_the_childs_message_at_a_guessed_level() -> None:
    levels = PlainLevels()
    lines = ["starting up", "Traceback (most recent call last):", '  File "x.py", line 1',
             "    boom()", "RuntimeError: it broke", "after the crash",
             "DeprecationWarning: old", "{not json"]  # fmt: skip
    parsed = [parse_line(line, levels) for line in lines]
    assert [p["msg"] for p in parsed] == lines
    assert [p["level"] for p in parsed] == ["INFO", "ERROR", "ERROR", "ERROR", "ERROR", "INFO",
                                            "WARNING", "INFO"]  # fmt: skip
    shown = render("deliver", parsed[0], TEXT)
    assert re.fullmatch(r"\d\d:\d\d:\d\d deliver {6}INFO  starting up", shown), shown


def test_colour_only_on_a_terminal_and_never_with_no_color() -> None:
    entry = parse_line(record(level="ERROR"))
    assert "\x1b" not in render("web", entry, TEXT)
    coloured = render("web", entry, COLOURED)
    assert "\x1b[31mERROR" in coloured  # the level in red
    assert ANSI.sub("", coloured) == render("web", entry, TEXT)
    # Each process a colour of its own.
    assert render("web", entry, COLOURED)[:30] != render("flower", entry, COLOURED)[:30]

    assert choose_style(Terminal(), NAMES, None, {}) == COLOURED
    assert not choose_style(Terminal(), NAMES, None, {"NO_COLOR": "1"}).colour
    assert not choose_style(Terminal(), NAMES, None, {"TERM": "dumb"}).colour
    assert choose_style(io.StringIO(), NAMES, None, {}).as_json  # piped: JSON lines
    assert choose_style(Terminal(), NAMES, "json", {}).as_json  # the user asked for JSON
    asked_text = choose_style(io.StringIO(), NAMES, "text", {})  # asked for text, piped
    assert (asked_text.as_json, asked_text.colour) == (False, False)


def test_json_output_adds_the_service_and_keeps_the_record() -> None:
    out = json.loads(render("worker1", parse_line(record(job_id="job-7")), JSON))
    assert out["service"] == "worker1"
    assert (out["ts"], out["logger"], out["job_id"]) == ("2026-01-02T03:04:05.678+00:00",
                                                         "uvicorn.error", "job-7")  # fmt: skip
    plain = json.loads(render("flower", parse_line("a plain line"), JSON))
    assert (plain["service"], plain["level"], plain["msg"]) == ("flower", "INFO", "a plain line")
    assert plain["ts"]


def test_an_over_long_line_is_cut_and_the_next_one_still_read() -> None:
    stream = io.BytesIO(b"x" * 1000 + b"\nnext\n" + b"y" * 64 + b"\n")
    lines = list(bounded_lines(stream, limit=64))
    assert lines[0] == "x" * 48 + " ... [952 more bytes cut]"  # a margin before the cut
    assert lines[1:] == ["next", "y" * 64]
    # A secret that the cut would split is dropped whole, not printed in part.
    (cut,) = bounded_lines(io.BytesIO(b"x" * 55 + b"hunter2-pass" + b"z" * 100), limit=64)
    assert "hunt" not in cut
    long_message = parse_line(record(msg="z" * (MAX_MESSAGE_CHARS + 10)))
    assert render("web", long_message, TEXT).endswith("z ... [10 more characters cut]")
    (huge,) = bounded_lines(io.BytesIO(b"h" * 2 * MAX_LINE_BYTES + b"\n"))
    assert huge.endswith(f" ... [{MAX_LINE_BYTES + SECRET_MARGIN} more bytes cut]")
    shown = render("web", parse_line(huge), TEXT)  # both cuts said
    assert shown.endswith(f"characters cut] ... [{MAX_LINE_BYTES + SECRET_MARGIN} more bytes cut]")
    assert len(shown) < MAX_MESSAGE_CHARS + 200


def test_bytes_that_are_not_text_cannot_drive_the_terminal() -> None:
    (line,) = bounded_lines(io.BytesIO(b"\x1b[2J\x00ok\xff\xfe\x9b\n"))
    assert "\x1b" not in line and "\x00" not in line
    assert line == "\\x1b[2J\\x00ok\\xff\\xfe\\x9b"
    entry = parse_line(record(msg="colour \x1b[31mred", error="\x1b]0;title\x07"))
    shown = render("web", entry, TEXT) + render("web", entry, JSON)
    assert "\x1b" not in shown and "\x07" not in shown


def test_secrets_are_scrubbed_from_text_and_json() -> None:
    password, token = "Redis-Passw0rd-xyz", "tok-abcdef123456"
    entry = parse_line(record(msg=f"Connected to redis://:{password}@127.0.0.1:6379/0",
                              error=f"bad token {token}"))  # fmt: skip
    for style in (TEXT, JSON, COLOURED):
        shown = render("worker1", entry, style, {password, token})
        assert password not in shown and token not in shown
        assert "redis://:***@127.0.0.1:6379/0" in shown
    # A URL's password is masked even when the console was not told it.
    assert password not in render("web", parse_line(f"redis://u:{password}@h/0"), TEXT)


@pytest.mark.parametrize("as_json", [False, True])
def test_the_console_prints_each_childs_lines_and_its_own_in_one_stream(as_json: bool) -> None:
    out = io.StringIO()
    console = Console(ConsoleStyle(as_json=as_json, width=7, names=("up", "web", "worker1")), out)
    console.add_secrets({"hunter2-secret"})
    console.say("gpt4people is up: hunter2-secret")
    console.follow("web", io.BytesIO(record().encode() + b"\n\n   \nplain hunter2-secret\n"))
    console.follow("worker1", io.BytesIO(record(logger="celery", msg="ready.").encode() + b"\n"))
    console.close()
    printed = out.getvalue().splitlines()
    assert len(printed) == 4  # blank lines are not printed
    assert "hunter2-secret" not in out.getvalue()
    if as_json:
        services = sorted(json.loads(line)["service"] for line in printed)
        assert services == ["up", "web", "web", "worker1"]
    else:
        assert sorted(line[9:16] for line in printed) == ["up     ", "web    ", "web    ",
                                                          "worker1"]  # fmt: skip


def test_each_key_of_a_list_and_each_quoted_form_of_a_secret_is_masked() -> None:
    from gpt4people.supervisor import settings_secrets
    from kernel.settings import Settings

    settings = Settings(http_api_keys="key-one-aaaaaaaaaaaa,key-two-bbbbbbbbbbbb",
                        twilio_auth_token="tok/en+with=signs")  # fmt: skip
    secrets = settings_secrets(settings, "redis://:pw%2Fx%40y@h:6379/0")
    assert {"key-one-aaaaaaaaaaaa", "key-two-bbbbbbbbbbbb", "pw/x@y", "pw%2Fx%40y",
            "tok%2Fen%2Bwith%3Dsigns"} <= secrets  # fmt: skip
    line = record(msg="auth=tok%2Fen%2Bwith%3Dsigns key=key-two-bbbbbbbbbbbb")
    shown = render("web", parse_line(line), TEXT, secrets)
    assert "tok" not in shown and "key-two" not in shown
