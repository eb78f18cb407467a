"""Log set-up: one line per event, each carrying the session id (and queue id).

RFC 6409 5.2 asks that rejections be logged, but a client must not be able to fill the
disk: `PerClientRateLimit` drops session lines from one client address beyond a rate,
and says once a minute how many it dropped.
"""

from __future__ import annotations

import logging
import re
import sys
import time

_CLIENT = re.compile(r"client=(\S+)")


class PerClientRateLimit(logging.Filter):
    def __init__(self, lines_per_minute: int, max_clients: int = 100_000) -> None:
        super().__init__()
        self.lines_per_minute = lines_per_minute
        self.max_clients = max_clients
        self._window: dict[str, tuple[int, int]] = {}  # client -> (minute, count)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("submitd.session"):
            return True
        match = _CLIENT.search(record.getMessage())
        if match is None:
            return True
        minute = int(time.monotonic() // 60)
        client = match.group(1)
        seen_minute, count = self._window.get(client, (minute, 0))
        if seen_minute != minute:
            count = 0
        if len(self._window) >= self.max_clients and client not in self._window:
            self._window.clear()
        self._window[client] = (minute, count + 1)
        return count < self.lines_per_minute


def configure_logging(level: str, lines_per_minute: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PerClientRateLimit(lines_per_minute))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
