"""Fuzz target: the AUTH decoders, PLAIN and LOGIN (`submitd.smtp.sasl`), start and step.

Input layout: byte 0 is a flag set (bit 0: LOGIN rather than PLAIN; bit 1: no initial
response), then responses, each one length byte followed by that many octets (the last
one may be short). The first response is the initial one unless bit 1 is set.

Invariants: only SaslError is raised; each step gives a Challenge or Credentials; the
exchange ends at the first Credentials or SaslError (as in the session); Credentials have
a non-empty login and password that are exactly the octets the client sent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import atheris

with atheris.instrument_imports(include=["submitd"]):
    from _common import check

    from submitd.smtp.sasl import (
        Challenge,
        Credentials,
        LoginMechanism,
        PlainMechanism,
        SaslError,
    )

LOGIN = 0x01
NO_INITIAL = 0x02


def responses(data: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        size = data[pos]
        yield data[pos + 1 : pos + 1 + size]
        pos += 1 + size


def check_credentials(outcome: Credentials, sent: list[bytes], login: bool) -> None:
    check(bool(outcome.login) and bool(outcome.password), f"empty credentials {outcome!r}")
    if login:
        check(len(sent) == 2, f"LOGIN credentials after {len(sent)} responses")
        expected = [outcome.login.encode(), outcome.password.encode()]
    else:
        check(len(sent) == 1, f"PLAIN credentials after {len(sent)} responses")
        expected = [sent[-1].split(b"\0")[0], outcome.login.encode(), outcome.password.encode()]
    check(b"\0".join(expected) == b"\0".join(sent), f"credentials {outcome!r} from {sent!r}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags = data[0]
    login = bool(flags & LOGIN)
    mechanism = LoginMechanism() if login else PlainMechanism()
    items = list(responses(data[1:]))
    sent: list[bytes] = []
    try:
        if flags & NO_INITIAL:
            outcome = mechanism.start(None)
        else:
            first = items.pop(0) if items else b""
            sent.append(first)
            outcome = mechanism.start(first)
        while True:
            if isinstance(outcome, Credentials):
                check_credentials(outcome, sent, login)
                return
            check(isinstance(outcome, Challenge), f"unexpected outcome {outcome!r}")
            check(isinstance(outcome.data, bytes), f"challenge is not bytes: {outcome!r}")
            if not items:
                return
            sent.append(items.pop(0))
            outcome = mechanism.step(sent[-1])
    except SaslError as error:
        check(isinstance(error.malformed, bool), "SaslError.malformed is not a bool")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
