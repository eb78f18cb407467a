"""The private Postfix smarthost that delivery tests relay to: does it do what they assume?

It must take mail only over verified TLS from an authenticated client, and hand back what
it accepted byte for byte, with one Received field on top and nothing else changed.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Iterator

import pytest

from tests.delivery.postfix_fixture import (  # noqa: F401 (postfix_smarthost is a fixture)
    PostfixSmarthost,
    postfix_smarthost,
    split_received,
)

SENDER = "alice@example.org"
RECIPIENTS = ["bob@example.com", "carol@example.net"]
# A dot-only line and lines starting with dots (smtplib stuffs them, Postfix must
# unstuff them), a "From " line (no ">From" quoting), 8-bit UTF-8, and trailing space.
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com, carol@example.net\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
    b"Message-ID: <fixture-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9e \xe2\x82\xac 5 \r\n"
    b".\r\n"
    b"..two dots\r\n"
    b".one dot\r\n"
    b"From the start of a line\r\n"
    b"\r\n"
    b"last line\r\n"
)
RECEIVED = re.compile(
    rb"Received: from \S+ \(unknown \[127\.0\.0\.1\]\)\r\n"
    rb"\tby postfix\.test \(Postfix\) with ESMTPSA id (?P<id>[0-9A-F]+);\r\n"
    rb"\t[^\r\n]+\r\n"
)


@pytest.fixture
def smarthost(postfix_smarthost: PostfixSmarthost) -> Iterator[PostfixSmarthost]:  # noqa: F811
    """The session's smarthost with an empty mailbox; its log shows with a failure."""
    postfix_smarthost.clear()
    yield postfix_smarthost
    print(f"--- Postfix log ({postfix_smarthost.log_file}) ---\n{postfix_smarthost.log_text()}")


class NamedSMTP(smtplib.SMTP):
    """smtplib checks the certificate against the host it connected to (here an IP
    address); this client checks it against a TLS name instead, as submitd does."""

    def __init__(self, host: str, port: int, tls_name: str) -> None:
        super().__init__(host, port, timeout=15)
        self._host = tls_name  # what starttls() passes as server_hostname


def connect(smarthost: PostfixSmarthost, tls_name: str | None = None) -> NamedSMTP:
    client = NamedSMTP(smarthost.host, smarthost.port, tls_name or smarthost.tls_name)
    client.ehlo("client.example")
    return client


def starttls(client: smtplib.SMTP, smarthost: PostfixSmarthost) -> None:
    client.starttls(context=smarthost.client_context())
    client.ehlo("client.example")


def test_authenticated_relay_is_delivered_byte_for_byte(smarthost: PostfixSmarthost) -> None:
    client = connect(smarthost)
    assert client.has_extn("starttls")
    assert not client.has_extn("auth"), "AUTH must not be offered before TLS"
    starttls(client, smarthost)
    assert client.has_extn("8bitmime")
    assert "PLAIN" in client.esmtp_features["auth"].split()
    client.login(smarthost.username, smarthost.password)
    refused = client.sendmail(SENDER, RECIPIENTS, MESSAGE, mail_options=["BODY=8BITMIME"])
    assert refused == {}
    client.quit()

    [delivered] = smarthost.messages(count=1)
    assert delivered.sender == SENDER
    assert sorted(delivered.recipients) == RECIPIENTS
    received, rest = split_received(delivered.data)
    assert rest == MESSAGE
    # The one line Postfix adds: no TLS or authentication comment, and no "for <...>"
    # clause because the message has two recipients.
    match = RECEIVED.fullmatch(received)
    assert match is not None, received
    assert match["id"].decode() == delivered.queue_id


def test_relay_without_auth_is_refused(smarthost: PostfixSmarthost) -> None:
    client = connect(smarthost)
    starttls(client, smarthost)
    code, reply = client.mail(SENDER)
    assert code == 250, reply
    code, reply = client.rcpt(RECIPIENTS[0])
    # smtpd_relay_restrictions = permit_sasl_authenticated, reject: the plain "reject"
    # says "Recipient address rejected: Access denied" (not "Relay access denied").
    assert code == 554, reply
    assert reply.startswith(b"5.7.1 <bob@example.com>: Recipient address rejected"), reply
    client.quit()


def test_mail_without_tls_is_refused(smarthost: PostfixSmarthost) -> None:
    client = connect(smarthost)
    code, reply = client.mail(SENDER)
    assert code == 530, reply
    with pytest.raises(smtplib.SMTPNotSupportedError):
        client.login(smarthost.username, smarthost.password)
    client.quit()


def test_wrong_password_is_refused(smarthost: PostfixSmarthost) -> None:
    client = connect(smarthost)
    starttls(client, smarthost)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.login(smarthost.username, smarthost.password + "x")
    assert refused.value.smtp_code == 535
    client.close()


def test_certificate_is_checked_against_the_name(smarthost: PostfixSmarthost) -> None:
    client = connect(smarthost, tls_name="other.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        starttls(client, smarthost)
    client.close()
    assert smarthost.messages(count=0) == []
