"""The answer path: a `Job` in, a `Reply` out (prompt, engines, helper routing).

It knows neither Celery nor the channels: the runtime (``workers``) calls it,
and it reaches Redis only through the kernel.
"""
