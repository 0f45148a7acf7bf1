"""Helpers: capability queues (``helper.<name>``) that the core routes to by name.

`helpers.sdk` is all a helper author needs (it depends only on the kernel);
`helpers.worker` runs helpers as Celery workers; calc, image and timezone are
the built-in ones.
"""
