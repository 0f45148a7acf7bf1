"""The web app under uvicorn, logging like every other GPT4People process: `up`'s `web`.

uvicorn's command line installs a log format of its own; run from here, uvicorn's
lines (startup, errors) and the app's all go through kernel.logs, so that `up` can
read them. Address, port and log level come from the settings (GPT4P_HTTP_HOST,
GPT4P_HTTP_PORT, GPT4P_LOG_LEVEL).
"""

from __future__ import annotations

import sys

import uvicorn

from kernel.logs import configure_logging
from kernel.redis_urls import redact_text
from kernel.settings import SettingsError, get_settings


def main() -> int:
    """Serve `channels.web:create_app` until SIGINT or SIGTERM."""
    try:
        settings = get_settings()
    except SettingsError as error:
        print(f"gpt4people: {redact_text(str(error))}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        "channels.web:create_app", factory=True, host=settings.http_host,
        port=settings.http_port, log_config=None, log_level=settings.log_level.lower(),
        access_log=False, timeout_graceful_shutdown=10,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
