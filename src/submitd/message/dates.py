"""Date-time text for the fields we write (Date, Received), once per second.

RFC 5322 3.3 with a numeric zone, always UTC ("+0000"): we do not know the client's
zone. `email.utils.format_datetime` costs more than the rest of a Received field, and a
busy server writes thousands of fields within the same second, so the text is cached.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache


def date_text(now: float) -> str:
    """`now` (seconds since 1970) as RFC 5322 date-time text, to the second."""
    return _text(int(now))


@lru_cache(maxsize=4)
def _text(seconds: int) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, UTC))
