"""The Celery runtime: the app (``celery -A workers ...``), the inference task and
the worker lifecycle (recovery, liveness, the job ledger, streaming).

Importing the package loads the app only; a worker imports its tasks through
the app's ``imports`` setting (celeryconfig), so nothing below the runtime
pulls the worker side in.
"""

from workers.app import app

celery = app

__all__ = ["app", "celery"]
