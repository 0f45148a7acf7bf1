"""Fixtures of the reliability tests: the Twilio recorder."""

from tests.channels.twilio_recorder import twilio

__all__ = ["twilio"]
