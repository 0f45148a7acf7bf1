"""Running a helper: its Celery task on queue ``helper.<name>``, registered with a heartbeat."""

from __future__ import annotations

import importlib
import logging
import traceback
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from helpers.sdk import Helper, HelperError, HelperRequest
from kernel.contract import helper_task
from workers.commandline import helper_worker_arguments
from workers.lifecycle import HelperRegistration, add_concern

log = logging.getLogger(__name__)

BUILT_IN = {"calc": "helpers.calc", "image": "helpers.image", "time": "helpers.timezone"}


class HelperNotFoundError(LookupError):
    """No helper by that name or module; the message says what exists."""


def load_helper(name: str) -> Helper:
    """A built-in helper by name, or the `Helper` in a module (``pkg.mod`` or ``pkg.mod:attr``)."""
    module_name, _, attribute = BUILT_IN.get(name, name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise HelperNotFoundError(
            f"no helper {name!r}: built-in ones are {', '.join(BUILT_IN)}, or give a module "
            f"path such as mypackage.myhelper ({error})"
        ) from None
    if attribute:
        found = getattr(module, attribute, None)
        if not isinstance(found, Helper):
            raise HelperNotFoundError(f"{module_name}:{attribute} is not a helper")
        return found
    helpers = [value for value in vars(module).values() if isinstance(value, Helper)]
    if len(helpers) != 1:
        raise HelperNotFoundError(
            f"{module_name} must define exactly one helper (found {len(helpers)})"
        )
    return helpers[0]


def register_task(app: Celery, helper: Helper) -> Task:
    """The Celery task that runs `helper`, with its time limits.

    It returns the helper's result, ``{"error": message}`` for a `HelperError` (shown to
    the user), or ``{"failure": "timeout"|"error"}`` when the helper ran out of time or
    raised: the core words those. A hard kill (the hard time limit, a crash) reaches the
    caller's errback instead, through Celery.
    """

    @app.task(
        name=helper_task(helper.name),
        bind=True,
        soft_time_limit=helper.time_limit,
        time_limit=helper.hard_time_limit,
        resultrepr_maxsize=1,  # events show "{, ...}", not what the helper answered
        # A helper that kills its process (a picture that exhausts memory) would kill
        # every process it is requeued to: it fails, and its caller is answered.
        reject_on_worker_lost=False,
    )
    def run_helper(self: Task, request_data: dict[str, Any]) -> dict[str, Any]:
        try:
            return helper.run(HelperRequest.model_validate(request_data)).model_dump()
        except HelperError as error:
            return {"error": str(error)}
        except SoftTimeLimitExceeded:
            log.warning("helper %s ran out of time", helper.name)
            return {"failure": "timeout"}
        except Exception as error:  # noqa: BLE001 - a helper's bug must not reach the user
            # The class only: an exception's message may quote what the user sent.
            log.warning("helper %s failed: %s", helper.name, error.__class__.__name__)
            frames = "".join(traceback.format_tb(error.__traceback__))  # where, not what
            log.debug("helper %s failed at:\n%s", helper.name, frames)
            return {"failure": "error"}

    return run_helper


def run_helper_worker(
    app: Celery, helper: Helper, hostname: str, concurrency: int, loglevel: str, ttl: float
) -> None:
    """Run `helper` as a Celery worker until stopped, registered while it runs."""
    register_task(app, helper)
    add_concern(HelperRegistration(helper, ttl))
    app.worker_main(helper_worker_arguments(helper.name, hostname, concurrency, loglevel))
