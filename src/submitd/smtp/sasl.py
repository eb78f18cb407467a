"""SASL mechanisms for AUTH (RFC 4954), sans-I/O.

A mechanism turns the client's decoded responses into credentials, one step at a
time; the session does the base64 and the 334 challenges. Only password mechanisms
exist today: PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login, what Outlook and
many libraries still send). Both are offered only under TLS (RFC 4954 4, RFC 8314).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Credentials:
    login: str
    password: str


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send `334 <base64(data)>` and feed the next line back to the mechanism."""

    data: bytes


class SaslError(Exception):
    """The exchange is malformed (not a wrong password): 501 5.5.2 or 535 5.7.8."""

    def __init__(self, message: str, *, malformed: bool) -> None:
        super().__init__(message)
        self.malformed = malformed


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8", malformed=True) from None


class PlainMechanism:
    """RFC 4616: message = [authzid] NUL authcid NUL passwd, in one response."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, response: bytes) -> Challenge | Credentials:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SaslError("PLAIN response needs authzid NUL authcid NUL passwd", malformed=True)
        authzid, authcid, passwd = (_text(part, "PLAIN response") for part in parts)
        if not authcid or not passwd:
            raise SaslError("empty user name or password", malformed=False)
        # RFC 4616 2: acting as another identity needs authorisation we never grant.
        if authzid and authzid.lower() != authcid.lower():
            raise SaslError("authorization identity differs from the user", malformed=False)
        return Credentials(authcid, passwd)


class LoginMechanism:
    """LOGIN: `Username:` then `Password:` challenges, one value each."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._login: str | None = None

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        if initial is None:
            return Challenge(b"Username:")
        return self.step(initial)

    def step(self, response: bytes) -> Challenge | Credentials:
        value = _text(response, "LOGIN response")
        if self._login is None:
            if not value:
                raise SaslError("empty user name", malformed=False)
            self._login = value
            return Challenge(b"Password:")
        if not value:
            raise SaslError("empty password", malformed=False)
        return Credentials(self._login, value)


Mechanism = PlainMechanism | LoginMechanism

MECHANISMS: dict[str, type[PlainMechanism] | type[LoginMechanism]] = {
    "PLAIN": PlainMechanism,
    "LOGIN": LoginMechanism,
}
