"""The OpenAI-compatible HTTP API: its routes, request schema and guards
(API key, body size, safe errors)."""
