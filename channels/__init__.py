"""Channels: one module per way people reach GPT4People (HTTP today; SMS and email next)."""
