"""GPT4People workers: the Celery app (``celery -A workers ...``), the core and the engines."""

from workers import tasks as tasks  # registers the inference task with `app`
from workers.app import app

celery = app

__all__ = ["app", "celery"]
