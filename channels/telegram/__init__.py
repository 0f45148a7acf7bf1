"""The Telegram channel: a bot's updates in (webhook or long polling), replies out by its API."""
