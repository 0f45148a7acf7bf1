"""Fixtures of the abuse-path tests: each module starts its own stack on its own database.

The findings of the outside review (issue 14) each have a test here that fails
on the code before the fix. Stacks run with the hardened settings an operator
would set before going public, on databases no other test module uses.
"""

from __future__ import annotations

from tests.channels.mail_servers import dovecot, smtp
from tests.channels.twilio_recorder import twilio

__all__ = ["dovecot", "smtp", "twilio"]

# Redis databases of the security stacks (the session's Redis has 32).
DB_SEC_EMAIL = 16
DB_SEC_SMS = 17
DB_SEC_HTTP = 18
DB_SEC_HELPERS = 19
DB_SEC_OPS = 20
