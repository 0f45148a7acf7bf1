"""Operator tooling: the ``gpt4people`` command, the process supervisor of
``gpt4people up``, the embedded Redis server and ``gpt4people status``.

The top layer: it may import every package below it, and nothing imports it.
"""
