"""Helpers that misbehave as an attacker's input could make a helper misbehave.

Each is one module-level helper in the SDK's shape; the abuse tests run them as
real helper workers (`gpt4people helper tests.security.abusive_helpers:NAME`).
"""

from __future__ import annotations

import os
import signal
import time

from celery.exceptions import SoftTimeLimitExceeded

from helpers.sdk import HelperError, HelperRequest, HelperResult, helper
from workers.app import broker_redis

CRASH_RUNS_KEY = "test:crash:runs"
LATCH_PREFIX = "test:latch:"  # + the held helper's input: a list the test pushes to
# The longest the held helper waits for its latch: a safety net, never reached when the
# test passes (it releases the latch itself).
LATCH_SAFETY_S = 120.0


@helper("stubborn", "Ignores being asked to stop, as C code does: killed at its hard limit.",
        time_limit=1)  # fmt: skip
def stubborn(request: HelperRequest) -> HelperResult:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            continue  # what a long computation inside C code does: it never notices
    return HelperResult(text="too late")


@helper("crash", "Kills its own process, as a picture that exhausts memory does.")
def crash(request: HelperRequest) -> HelperResult:
    broker_redis().incr(CRASH_RUNS_KEY)  # how often it ran: once, never requeued
    os.kill(os.getpid(), signal.SIGKILL)
    return HelperResult(text="not reached")


@helper("held", "Runs until the test lets it go, as a slow outside service would.",
        time_limit=LATCH_SAFETY_S + 10, max_input_chars=64)  # fmt: skip
def held(request: HelperRequest) -> HelperResult:
    # Waits on Redis, not on a clock: the test decides when the helper is done.
    if not request.text.isidentifier():
        raise HelperError("name the latch with letters, digits and underscores")
    client, deadline = broker_redis(), time.monotonic() + LATCH_SAFETY_S
    while time.monotonic() < deadline:
        if client.blpop([LATCH_PREFIX + request.text], timeout=1):  # under its socket timeout
            return HelperResult(text=f"released {request.text}")
    return HelperResult(text="never released")
