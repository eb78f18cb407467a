"""Submission policy: what an authenticated user may send (RFC 6409 6.1-6.3).

`limits` holds the per-user limits (rates, recipients, size, recipient domains) and
the rate counters' in-memory side; `rejections` logs what the policy refused, at a
bounded rate (RFC 6409 5.2). The submission seam calls these; the SMTP session never
imports them (DESIGN: the session asks, the policy decides).
"""

from submitd.policy.limits import EffectiveLimits, RateLimiter, effective_limits
from submitd.policy.rejections import RejectionLog

__all__ = ["EffectiveLimits", "RateLimiter", "RejectionLog", "effective_limits"]
