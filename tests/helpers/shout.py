"""The README's example helper, verbatim: a third-party helper in one short module."""

from helpers.sdk import HelperRequest, HelperResult, helper


@helper("shout", "Repeats your text in capitals.", capabilities=["text.upper"])
def shout(request: HelperRequest) -> HelperResult:
    return HelperResult(text=request.text.upper() or "SAY SOMETHING!")
