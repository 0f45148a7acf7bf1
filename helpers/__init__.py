"""Helpers: capability queues (``helper.<name>``) that the core routes to by name.

The helper SDK and the built-in helpers (calc, image, time) arrive with issue 5;
the queue naming they will use is fixed in `workers.contract.helper_queue`.
"""
