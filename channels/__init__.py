"""Channels: each way people reach GPT4People is a sub-package (``sms``, ``email``,
``http``), holding what arrives and how the answer goes back; ``web`` serves the
HTTP-based ones from one FastAPI app."""
