"""Fixtures shared by the delivery tests: one private Postfix and Dovecot per session."""

from tests.delivery.dovecot_fixture import dovecot_fixture
from tests.delivery.postfix_fixture import postfix_smarthost

__all__ = ["dovecot_fixture", "postfix_smarthost"]
