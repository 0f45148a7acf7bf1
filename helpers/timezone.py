"""The `time` helper: the current time in a named time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from helpers.sdk import HelperError, HelperRequest, HelperResult, helper


def _zone(name: str) -> ZoneInfo:
    name = name.strip().replace(" ", "_") or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        pass
    # "paris" or "new_york" -> Europe/Paris, America/New_York
    wanted = name.lower()
    matches = sorted(z for z in available_timezones() if z.lower().rsplit("/", 1)[-1] == wanted)
    if matches:
        return ZoneInfo(matches[0])
    raise HelperError(f"I don't know the time zone {name!r}; try e.g. Europe/Paris or Tokyo")


def time_in(name: str, now: datetime | None = None) -> str:
    """A sentence telling the time in zone `name`."""
    zone = _zone(name)
    local = (now or datetime.now(UTC)).astimezone(zone)
    offset = local.strftime("%z")
    return (
        f"It is {local:%H:%M} on {local:%A %d %B %Y} in {zone.key} (UTC{offset[:3]}:{offset[3:]})."
    )


@helper(
    "time",
    "The current time in a time zone, e.g. Europe/Paris or Tokyo.",
    capabilities=["time.now"],
    time_limit=5,
    max_input_chars=64,
)
def current_time(request: HelperRequest) -> HelperResult:
    """Tell the time in the zone named by the request's text (UTC when empty)."""
    return HelperResult(text=time_in(request.text))
