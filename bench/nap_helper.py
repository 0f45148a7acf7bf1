"""A helper that really runs for a while: the hostile load of `bench.helper_dos`.

Run as ``gpt4people helper bench.nap_helper``; it uses only the helper SDK's
first shape, so the same module runs on older trees for comparisons.
"""

from __future__ import annotations

import time

from helpers.sdk import HelperRequest, HelperResult, helper

MAX_NAP_S = 10.0


@helper("nap", "Naps the seconds it is given (at most 10), then says so.", time_limit=30)
def nap(request: HelperRequest) -> HelperResult:
    """Sleep as asked: a helper busy with work that takes seconds (an outside API, a model)."""
    try:
        seconds = min(MAX_NAP_S, max(0.0, float(request.text or "0")))
    except ValueError:
        seconds = 0.0
    time.sleep(seconds)
    return HelperResult(text=f"napped {seconds:g}s")
