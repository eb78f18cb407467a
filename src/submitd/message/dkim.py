"""DKIM signing (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463).

Why our own signer (DESIGN principle 7): dkimpy, the Python DKIM library, computes RSA
signatures in pure Python, about ten times slower than OpenSSL through `cryptography`,
and canonicalises a body only when it is whole in memory. Here the body is hashed as a
stream of chunks (`canonical.RelaxedBodyHasher`, C-speed bytes methods) and the
signature is made by OpenSSL. dkimpy and OpenDKIM stay as the independent verifiers in
the tests.

What is signed, and why:
- c=relaxed/relaxed (RFC 6376 3.4.2, 3.4.4): survives the re-folding and whitespace
  changes that relays make, which "simple" does not.
- h= names the fields of RFC 6376 5.4.1 (and RFC 4871 5.5, RFC 8058 3) that are present,
  each as many times as it occurs, so that every instance is covered (5.4.2: instances
  are taken from the bottom up). From is listed once more than it occurs ("oversigned",
  RFC 6376 8.15), so that a From added later breaks the signature instead of being shown
  to the reader unsigned.
- No l= (RFC 6376 8.2: lets anyone append content) and no x=.
- The body hash is computed once for all keys: every key uses SHA-256 over the same
  relaxed body.

Signing a large body costs a pass over it; the submission code runs `sign` in a worker
thread, never on the event loop (DESIGN principle 8). The header and body are never
re-serialised: the caller prepends the returned fields to the message bytes it has, so
every other octet passes through unchanged (DESIGN principle 4).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from submitd.message.canonical import relaxed_body_hash, relaxed_header, split_fields

Algorithm: TypeAlias = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey: TypeAlias = rsa.RSAPrivateKey | Ed25519PrivateKey

RSA_BITS = 2048  # RFC 8301 3.2: signers SHOULD use at least 2048 bits
RSA_MIN_BITS = 1024  # RFC 8301 3.2: signers MUST use at least 1024 bits

# RFC 6376 5.4.1 ("SHOULD be included"), completed with RFC 4871 5.5's fields that 6376
# dropped from its list but that a reader sees (Sender, Message-ID, MIME fields), and
# List-Unsubscribe-Post, which RFC 8058 3.1 requires to be signed. Never Received,
# Return-Path, Comments or Keywords (5.4.1: "SHOULD NOT"), nor DKIM-Signature.
SIGNED_FIELDS: tuple[str, ...] = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-id",
    "content-description",
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-message-id",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
)
# Listed once more than they occur (RFC 6376 8.15). From is REQUIRED in h= (5.4), so it
# is listed even when the header has none.
OVERSIGNED_FIELDS: frozenset[str] = frozenset({"from"})

# sub-domain of RFC 5321 4.1.2, which RFC 6376 3.1 and 3.5 use for s= and d=.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_LINE_WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD be no more than 78 characters
_TXT_STRING = 255  # RFC 1035 3.3: a character-string holds at most 255 octets


@dataclass(frozen=True)
class SigningKey:
    """A private key and where its public half is published: s._domainkey.d (RFC 6376 3.6.2)."""

    domain: str
    selector: str
    algorithm: Algorithm
    private_key: PrivateKey

    def __post_init__(self) -> None:
        if algorithm_of(self.private_key) != self.algorithm:
            raise ValueError(f"a {type(self.private_key).__name__} cannot sign {self.algorithm}")
        object.__setattr__(self, "domain", dns_name(self.domain, "domain"))
        object.__setattr__(self, "selector", dns_name(self.selector, "selector"))


def dns_name(name: str, what: str) -> str:
    """`name` as lower-case A-labels without a final dot, or ValueError.

    d= and s= are domain names (RFC 6376 3.5) and internationalised ones are written as
    A-labels (RFC 8616 4.2). The strict syntax also keeps names safe in file paths.
    """
    try:
        ascii_name = name.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"invalid {what} {name!r}") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or not all(
        len(label) <= 63 and _LABEL.match(label) for label in labels
    ):
        raise ValueError(f"invalid {what} {name!r}")
    return ascii_name


def algorithm_of(private_key: object) -> Algorithm:
    """The DKIM a= algorithm a private key signs with, or ValueError for other key types."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < RSA_MIN_BITS:
            raise ValueError(
                f"RSA key of {private_key.key_size} bits: DKIM needs at least "
                f"{RSA_MIN_BITS} (RFC 8301 3.2)"
            )
        return "rsa-sha256"
    if isinstance(private_key, Ed25519PrivateKey):
        return "ed25519-sha256"
    raise ValueError(f"{type(private_key).__name__} keys cannot sign DKIM (rsa or ed25519 only)")


def generate_key(algorithm: str) -> PrivateKey:
    """A new private key: RSA of 2048 bits (RFC 8301 3.2) or Ed25519 (RFC 8463).

    Accepts "rsa", "rsa-sha256", "ed25519" or "ed25519-sha256".
    """
    kind = algorithm.lower().removesuffix("-sha256")
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if kind == "ed25519":
        return Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {algorithm!r} (rsa or ed25519)")


def private_key_pem(private_key: PrivateKey) -> bytes:
    """The key as unencrypted PEM PKCS#8, the form `load_signing_key` reads."""
    return private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def load_signing_key(path: Path, domain: str, selector: str) -> SigningKey:
    """Read a PEM private key (PKCS#8; PKCS#1 RSA too); the algorithm follows the key type.

    Raises ValueError, naming the file, for an unreadable, encrypted or unsuitable key:
    the server reads keys at start-up and must say which one is wrong.
    """
    try:
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(private_key, rsa.RSAPrivateKey | Ed25519PrivateKey):
        name = type(private_key).__name__
        raise ValueError(f"{path}: {name} keys cannot sign DKIM (rsa or ed25519 only)")
    try:
        return SigningKey(domain, selector, algorithm_of(private_key), private_key)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def dns_txt_record(key: SigningKey) -> str:
    """The TXT record to publish at <selector>._domainkey.<domain> (RFC 6376 3.6.1).

    RSA: p= is the DER SubjectPublicKeyInfo in base64 (3.6.1). Ed25519: p= is the raw
    32-octet public key in base64 (RFC 8463 4), not wrapped in SubjectPublicKeyInfo.
    """
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        kind = "rsa"
        public = key.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        kind = "ed25519"
        public = key.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"


def txt_strings(record: str) -> list[str]:
    """The record cut into character-strings of at most 255 octets (RFC 1035 3.3.14).

    A 2048-bit RSA record is about 400 octets; verifiers concatenate the strings
    (RFC 6376 3.6.2.2), so the cut may fall anywhere.
    """
    return [record[i : i + _TXT_STRING] for i in range(0, len(record), _TXT_STRING)] or [""]


def zone_line(key: SigningKey) -> str:
    """The record as a master-file line: `s._domainkey.d. IN TXT "..." "..."`."""
    strings = " ".join(f'"{part}"' for part in txt_strings(dns_txt_record(key)))
    return f"{key.selector}._domainkey.{key.domain}. IN TXT {strings}"


def sign(
    header: bytes,
    body: bytes | Iterable[bytes],
    keys: Sequence[SigningKey],
    *,
    timestamp: int | None = None,
) -> bytes:
    """DKIM-Signature fields, one per key, folded and each ending in CRLF, to prepend.

    `header` is the header section including its final CRLF, without the blank line;
    `body` is everything after the blank line, whole or as an iterable of chunks (a
    spooled body is hashed without being held in memory). With no keys, returns b"".
    """
    if not keys:
        return b""
    body_hash = base64.b64encode(relaxed_body_hash(body)).decode("ascii")
    names, signed_data = _signed_fields(header)
    when = int(time.time()) if timestamp is None else timestamp
    return b"".join(_signature_field(key, names, signed_data, body_hash, when) for key in keys)


def _signed_fields(header: bytes) -> tuple[list[str], bytes]:
    """The h= names and the canonical fields they select, in h= order (RFC 6376 5.4.2).

    A name listed n times selects the last n instances of the field, from the bottom up;
    a name listed once more than the field occurs selects nothing the extra time, which
    is what makes oversigning work (8.15).
    """
    instances: dict[str, list[bytes]] = defaultdict(list)
    for field_name, raw in split_fields(header):
        instances[field_name.decode("ascii", "replace").lower()].append(raw)
    names: list[str] = []
    parts: list[bytes] = []
    for name in SIGNED_FIELDS:
        present = instances.get(name, [])
        names.extend([name] * (len(present) + (name in OVERSIGNED_FIELDS)))
        parts.extend(relaxed_header(raw) for raw in reversed(present))
    return names, b"".join(parts)


def _signature_field(
    key: SigningKey, names: list[str], signed_data: bytes, body_hash: str, when: int
) -> bytes:
    """One DKIM-Signature field: the tags, then b= over the header hash (RFC 6376 3.7, 5.5)."""
    tags = [
        "v=1",
        f"a={key.algorithm}",
        "c=relaxed/relaxed",
        f"d={key.domain}",
        f"s={key.selector}",
        f"t={when}",
        "h=" + ":".join(names),
        f"bh={body_hash}",
    ]
    unsigned = _fold("DKIM-Signature: ", [*tags, "b="])
    # 3.7: the field itself is hashed last, canonicalised, with b= empty and no CRLF.
    data = signed_data + relaxed_header(unsigned.encode("ascii"))[:-2]
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        signature = key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        # RFC 8463 3: Ed25519 (PureEdDSA) signs the SHA-256 hash of the data.
        signature = key.private_key.sign(hashlib.sha256(data).digest())
    encoded = base64.b64encode(signature).decode("ascii")
    # FWS is allowed anywhere in the b= value and is ignored by verifiers (3.5).
    width = _LINE_WIDTH - 2
    lines = [encoded[i : i + width] for i in range(0, len(encoded), width)]
    return (unsigned + "\r\n\t" + "\r\n\t".join(lines) + "\r\n").encode("ascii")


def _fold(start: str, tags: list[str]) -> str:
    """Tags joined by "; ", folded before a tag (or between h= names) at 78 columns."""
    out = start
    column = len(start)
    for index, tag in enumerate(tags):
        text = tag + (";" if index < len(tags) - 1 else "")
        if index and column + 1 + len(text) > _LINE_WIDTH:
            out += "\r\n\t"
            column = 1
        elif index:
            out += " "
            column += 1
        if tag.startswith("h=") and column + len(text) > _LINE_WIDTH:
            # h= = hdr-name *( *FWS ":" *FWS hdr-name ) (3.5): fold after a colon.
            pieces = text.split(":")
            for number, piece in enumerate(pieces):
                item = piece + (":" if number < len(pieces) - 1 else "")
                if column + len(item) > _LINE_WIDTH and column > 1:
                    out += "\r\n\t"
                    column = 1
                out += item
                column += len(item)
            continue
        out += text
        column += len(text)
    return out
