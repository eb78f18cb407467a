"""submitd: a mail submission server (RFC 6409)."""

__version__ = "0.1.0"
