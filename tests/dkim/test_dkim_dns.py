"""Signatures checked the way a receiving server checks them: public keys fetched over
real DNS (dnsmasq on loopback, records as printed by `submitd dkim keygen`), by two
independent verifiers: dkimpy through dnspython, and OpenDKIM's `opendkim-testmsg`
(libopendkim 2.11 in Debian 12, which knows ed25519-sha256 as well as rsa-sha256).
`opendkim-testmsg` cannot be pointed at a name server or port, so it runs in private
network and mount namespaces with dnsmasq on their own 127.0.0.1:53 (netns_verify.py).
The two verifiers have separate tests, so that each skips alone when missing.

Each case is also tampered with, and the verifiers must then refuse it: a verifier that
passes everything would otherwise pass these tests too. Two facts about the OpenDKIM
tool shape the cases: it exits 0 when any one signature verifies, so a message with
several is given to it one signature at a time; and it refuses a message without a Date
field, or with two To fields, as a syntax error (every message here is well-formed, as a
submitted message is after cleanup).
"""

from __future__ import annotations

import random
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from submitd.message import dkim
from tests.dkim.conftest import DOMAIN, DnsServer, OpenDkim, PublishedKey

dkimpy = pytest.importorskip("dkim", reason="dkimpy is the independent verifier")
pytest.importorskip("nacl", reason="dkimpy needs PyNaCl for ed25519")

HEADER = (
    b"From: =?utf-8?q?Ren=C3=A9e?= <renee@example.org>\r\n"
    b"To: bob@example.com,\r\n"
    b"    carol@example.com\r\n"
    b"Cc: dave@example.net\r\n"
    b"Subject:  Quarterly   report \t\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0100\r\n"
    b"Message-ID: <20240101.1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
)
BODY = (
    b"Hello Bob,  \r\n"
    b"\r\n"
    b"the numbers are\tin.   Caf\xc3\xa9 at 10?\r\n"
    b"\r\n"
    b"-- \r\n"
    b"Ren\xc3\xa9e\r\n"
    b"\r\n"
    b" \t \r\n"
)
# Fields that may occur more than once (RFC 5322 3.6: one Resent- block per resending);
# OpenDKIM's tool refuses a message with two To or two Subject fields as a syntax error.
REPEATED = (
    b"Resent-Date: Tue, 2 Jan 2024 09:00:00 +0100\r\n"
    b"Resent-From: second@example.org\r\n"
    b"Resent-To: three@example.com\r\n"
    b"Received: from c by d; Tue, 2 Jan 2024 09:00:00 +0100\r\n"
    b"Resent-Date: Mon, 1 Jan 2024 11:00:00 +0100\r\n"
    b"Resent-From: first@example.org\r\n"
    b"Resent-To: two@example.com\r\n"
    b"Received: from a by b; Mon, 1 Jan 2024 10:00:00 +0100\r\n"
    b"From: renee@example.org\r\n"
    b"To: one@example.com\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0100\r\n"
    b"Subject: twice\r\n"
)
RECEIVED = (
    b"Received: from client.example ([127.0.0.1])\r\n"
    b"\tby submit.example.org with ESMTPSA id 01ABC;\r\n"
    b"\tMon, 1 Jan 2024 10:00:01 +0100\r\n"
)


def dkimpy_verdicts(message: bytes, server: DnsServer) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, keys fetched from our dnsmasq."""
    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0]))
    verifier = dkimpy.DKIM(message)
    verdicts = []
    for index in range(count):
        try:
            verdicts.append(bool(verifier.verify(idx=index, dnsfunc=server.txt)))
        except dkimpy.DKIMException:
            verdicts.append(False)
    return verdicts


def signed(header: bytes, body: bytes, keys: list[dkim.SigningKey], chunk: int = 0) -> bytes:
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else body
    return dkim.sign(header, pieces, keys) + header + b"\r\n" + body


def cases(key: dkim.SigningKey) -> dict[str, bytes]:
    """Messages signed with `key` alone, by name."""
    big = b"".join(b"line %06d of the attachment  \t text\r\n" % i for i in range(26_000))
    return {
        "typical": signed(HEADER, BODY, [key]),
        "empty-body": signed(HEADER, b"", [key]),
        "blank-lines-only": signed(HEADER, b"\r\n \r\n\r\n", [key]),
        "repeated-fields": signed(REPEATED, BODY, [key]),
        "one-megabyte": signed(HEADER, big, [key], chunk=65_536),
        "received-added": RECEIVED + signed(HEADER, BODY, [key]),
    }


def tampered(message: bytes) -> bytes:
    """The same message with one signed word changed (for REPEATED: in the lower of the
    two Resent-To fields, which only bottom-up selection of instances covers)."""
    if b"Quarterly" in message:
        return message.replace(b"Quarterly", b"Quarterlz", 1)
    return message.replace(b"two@example.com", b"tw0@example.com", 1)


def one_signature_each(name: str, message: bytes) -> dict[str, bytes]:
    """Copies of `message` keeping one of its DKIM-Signature fields each, the rest as is.

    `opendkim-testmsg` exits 0 when any one signature verifies (libopendkim 2.11), so
    each signature is given to it alone. Dropping the others changes nothing that the
    kept one covers: no signature here names DKIM-Signature in h=.
    """
    header, body = message.split(b"\r\n\r\n", 1)
    fields = re.findall(rb"(?:^|(?<=\r\n))[^ \t\r\n][^\r\n]*(?:\r\n[ \t][^\r\n]*)*", header)
    signatures = [f for f in fields if f.lower().startswith(b"dkim-signature:")]
    copies = {}
    for index, keep in enumerate(signatures):
        kept = [f for f in fields if f is keep or not f.lower().startswith(b"dkim-signature:")]
        copies[f"{name}-sig{index}"] = b"\r\n".join(kept) + b"\r\n\r\n" + body
    return copies


def corrupt_signature(message: bytes, index: int) -> bytes:
    """`message` with one character of the b= value of its index-th signature changed."""
    field = re.findall(rb"DKIM-Signature:.*?\r\n(?![ \t])", message, re.S)[index]
    at = field.rindex(b"b=") + 12
    changed = field[:at] + (b"A" if field[at : at + 1] != b"A" else b"B") + field[at + 1 :]
    return message.replace(field, changed)


def single_key_cases(key: dkim.SigningKey) -> dict[str, bytes]:
    """cases(key), each also tampered with (names ending in -tampered)."""
    messages = cases(key)
    return messages | {f"{name}-tampered": tampered(m) for name, m in messages.items()}


def dual_signed(published: dict[str, PublishedKey]) -> dict[str, bytes]:
    """One message signed with the rsa and the ed25519 key; and with either one corrupted."""
    message = signed(HEADER, BODY, [published["rsa"].key, published["ed25519"].key])
    assert message.count(b"DKIM-Signature:") == 2
    return {
        "good": message,
        "bad-rsa": corrupt_signature(message, 0),
        "bad-ed": corrupt_signature(message, 1),
    }


def client_signed(published: dict[str, PublishedKey]) -> tuple[bytes, bytes]:
    """(as submitted, as we pass it on): a message signed by the client (c=simple/simple,
    byte-exact), then our Received field and our rsa and ed25519 signatures on top."""
    client = published["client"].key
    assert isinstance(client.private_key, rsa.RSAPrivateKey)
    client_pem = client.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    original = HEADER + b"\r\n" + BODY
    client_field = dkimpy.sign(
        original,
        client.selector.encode(),
        client.domain.encode(),
        client_pem,
        canonicalize=(b"simple", b"simple"),
        include_headers=[b"from", b"to", b"cc", b"subject", b"date", b"message-id"],
    )
    submitted = client_field + original
    header, body = submitted.split(b"\r\n\r\n", 1)
    ours = dkim.sign(header + b"\r\n", [body], [published["rsa"].key, published["ed25519"].key])
    final = RECEIVED + ours + submitted
    assert final.endswith(submitted)  # DESIGN principle 4: the client's octets untouched
    return submitted, final


def unpublished_key_message() -> bytes:
    unpublished = dkim.SigningKey(DOMAIN, "nokey", "rsa-sha256", dkim.generate_key("rsa"))
    return signed(HEADER, BODY, [unpublished])


# --- dkimpy, keys fetched with dnspython from dnsmasq -----------------------------------


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_dkimpy_over_real_dns(
    algorithm: str, published: dict[str, PublishedKey], dns_server: DnsServer
) -> None:
    for name, message in single_key_cases(published[algorithm].key).items():
        assert dkimpy_verdicts(message, dns_server) == [not name.endswith("-tampered")], name


def test_dkimpy_rsa_and_ed25519_on_one_message(
    published: dict[str, PublishedKey], dns_server: DnsServer
) -> None:
    verdicts = {name: dkimpy_verdicts(m, dns_server) for name, m in dual_signed(published).items()}
    assert verdicts == {"good": [True, True], "bad-rsa": [False, True], "bad-ed": [True, False]}


def test_dkimpy_client_signature_and_ours(
    published: dict[str, PublishedKey], dns_server: DnsServer
) -> None:
    submitted, final = client_signed(published)
    assert dkimpy_verdicts(submitted, dns_server) == [True]
    assert dkimpy_verdicts(final, dns_server) == [True, True, True]


def test_dkimpy_unknown_selector(dns_server: DnsServer) -> None:
    assert dkimpy_verdicts(unpublished_key_message(), dns_server) == [False]


# --- OpenDKIM, in its own namespaces, with dnsmasq on its 127.0.0.1:53 ------------------


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_opendkim_over_real_dns(
    algorithm: str, published: dict[str, PublishedKey], opendkim: OpenDkim
) -> None:
    messages = single_key_cases(published[algorithm].key)
    results = opendkim.verify(messages)
    for name in messages:
        code, stderr = results[name]
        if name.endswith("-tampered"):
            assert code != 0 and "Bad signature" in stderr, (name, stderr)
        else:
            assert code == 0, (name, stderr)


def test_opendkim_rsa_and_ed25519_on_one_message(
    published: dict[str, PublishedKey], opendkim: OpenDkim
) -> None:
    alone: dict[str, bytes] = {}
    for name, message in dual_signed(published).items():
        alone |= one_signature_each(name, message)
    results = opendkim.verify(alone)
    verdicts = {name: code == 0 for name, (code, _) in results.items()}
    assert verdicts == {
        "good-sig0": True,
        "good-sig1": True,
        "bad-rsa-sig0": False,
        "bad-rsa-sig1": True,
        "bad-ed-sig0": True,
        "bad-ed-sig1": False,
    }, results


def test_opendkim_client_signature_and_ours(
    published: dict[str, PublishedKey], opendkim: OpenDkim
) -> None:
    _, final = client_signed(published)
    results = opendkim.verify(one_signature_each("final", final))
    codes = {name: code for name, (code, _) in results.items()}
    assert codes == {"final-sig0": 0, "final-sig1": 0, "final-sig2": 0}, results


def test_opendkim_unknown_selector(opendkim: OpenDkim) -> None:
    code, stderr = opendkim.verify({"nokey": unpublished_key_message()})["nokey"]
    assert code != 0, stderr


def generated_messages(key: dkim.SigningKey, count: int, seed: int) -> dict[str, bytes]:
    """Well-formed messages with awkward whitespace: WSP runs and folds in the header
    values, WSP at line ends, blank and WSP-only lines at the end, 8-bit octets, bodies
    with and without a final CRLF, signed from chunks of random sizes."""
    rng = random.Random(seed)
    words = [b"alpha", b"b\xc3\xa9ta", b"\xff\xfe", b"x", b"=?utf-8?q?a?=", b"<id@example.org>"]
    gaps = [b" ", b"  ", b"\t", b" \t ", b"\r\n ", b"\r\n\t", b" \r\n  "]

    def value() -> bytes:
        parts = [rng.choice([b"", b" ", b"\t "])]
        for _ in range(rng.randint(1, 5)):
            parts += [rng.choice(words), rng.choice(gaps)]
        return b"".join(parts[:-1]) + rng.choice([b"", b" ", b"\t"])

    def line() -> bytes:
        return b"".join(
            rng.choice([*words, b" ", b"\t", b"  \t"]) for _ in range(rng.randint(0, 8))
        )

    messages = {}
    for number in range(count):
        header = (
            b"From: " + value() + b" <renee@example.org>\r\n"
            b"To: " + value() + b"\r\n"
            b"Subject:" + value() + b"\r\n"
            b"Date: Mon, 1 Jan 2024 10:00:00 +0100\r\n"
            b"X-Unsigned: " + value() + b"\r\n"
        )
        body = b"".join(line() + b"\r\n" for _ in range(rng.randint(0, 12)))
        body += b"".join(
            rng.choice([b"\r\n", b" \r\n", b"\t\t\r\n"]) for _ in range(rng.randint(0, 3))
        )
        unterminated = rng.random() < 0.3 and body
        if unterminated:
            body += line() + b"x"  # no final CRLF: verified as delivered, with it
        chunk = rng.randint(1, 64)
        message = signed(header, body, [key], chunk=chunk)
        messages[f"gen{number}"] = message + (b"\r\n" if unterminated else b"")
    return messages


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_generated_messages_both_verifiers(
    algorithm: str,
    published: dict[str, PublishedKey],
    dns_server: DnsServer,
    opendkim: OpenDkim,
) -> None:
    messages = generated_messages(published[algorithm].key, 40, seed=6376)
    for name, message in messages.items():
        assert dkimpy_verdicts(message, dns_server) == [True], (name, message)
    failed = {name: r for name, r in opendkim.verify(messages).items() if r[0] != 0}
    assert not failed, {name: (failed[name], messages[name]) for name in failed}
