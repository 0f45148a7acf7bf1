"""Helpers written by a "third party" for the tests, each in the SDK's one-module shape."""

from __future__ import annotations

import time

from helpers.sdk import HelperRequest, HelperResult, helper


@helper("boom", "Always fails, to test how failures reach users.")
def boom(request: HelperRequest) -> HelperResult:
    raise RuntimeError("internal details that must never reach a user")


@helper("slow", "Takes longer than its time limit.", time_limit=1)
def slow(request: HelperRequest) -> HelperResult:
    time.sleep(30)
    return HelperResult(text="too late")


@helper("ghost", "Registers, then dies.")
def ghost(request: HelperRequest) -> HelperResult:
    return HelperResult(text="boo")


@helper("nap", "Sleeps the seconds it is given (at most 20), then says so.", time_limit=25)
def nap(request: HelperRequest) -> HelperResult:
    seconds = min(20.0, max(0.0, float(request.text or "0")))
    time.sleep(seconds)
    return HelperResult(text=f"slept {seconds:g}s")
