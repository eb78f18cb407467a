"""The DKIM signer: canonicalisation by the RFC's own example, and signatures that dkimpy,
an independent implementation, verifies for generated messages of every awkward shape.

dkimpy is given the public keys through `dnsfunc`: no test here sends a DNS query.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import itertools
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from submitd.cli.dkim import dkim as dkim_cli
from submitd.message import dkim
from submitd.message.canonical import (
    RelaxedBodyHasher,
    relaxed_body,
    relaxed_body_hash,
    relaxed_header,
    split_fields,
)

try:  # the independent verifier; only the tests that verify need it (fixture `dns`)
    import dkim as dkimpy  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - CI installs it (scripts/dkim-test-deps.txt)
    dkimpy = None

DOMAIN = "example.org"
EMPTY_SHA256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


# --- keys and an in-memory "DNS" for dkimpy -------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> dkim.SigningKey:
    return dkim.SigningKey(DOMAIN, "rsa2048", "rsa-sha256", dkim.generate_key("rsa"))


@pytest.fixture(scope="module")
def ed_key() -> dkim.SigningKey:
    return dkim.SigningKey(DOMAIN, "ed", "ed25519-sha256", dkim.generate_key("ed25519"))


@pytest.fixture(scope="module")
def keys(rsa_key: dkim.SigningKey, ed_key: dkim.SigningKey) -> list[dkim.SigningKey]:
    return [rsa_key, ed_key]


class FakeDns:
    """dkimpy's dnsfunc: TXT records from a dict, so nothing leaves the process."""

    def __init__(self) -> None:
        self.records: dict[bytes, bytes] = {}

    def publish(self, name: str, record: str) -> None:
        self.records[name.encode("ascii").lower()] = record.encode("ascii")

    def publish_key(self, key: dkim.SigningKey) -> None:
        self.publish(f"{key.selector}._domainkey.{key.domain}.", dkim.dns_txt_record(key))

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        return self.records.get(name.lower())


@pytest.fixture(scope="module")
def dns(keys: list[dkim.SigningKey]) -> FakeDns:
    if dkimpy is None:
        pytest.skip("dkimpy, the independent verifier, is not installed (pip install dkimpy)")
    if importlib.util.find_spec("nacl") is None:
        pytest.skip("dkimpy needs PyNaCl for ed25519 (pip install pynacl)")
    fake = FakeDns()
    for key in keys:
        fake.publish_key(key)
    return fake


def signatures_verify(message: bytes, dns: FakeDns) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of `message`, top to bottom."""
    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0]))
    verifier = dkimpy.DKIM(message)
    verdicts = []
    for index in range(count):
        try:
            verdicts.append(bool(verifier.verify(idx=index, dnsfunc=dns)))
        except dkimpy.DKIMException:  # dkimpy raises for some failures, returns False for others
            verdicts.append(False)
    return verdicts


def as_delivered(header: bytes, body: bytes) -> bytes:
    """The message a verifier sees: DATA ends the content with CRLF (RFC 5321 4.1.1.4)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return header + b"\r\n" + body


# --- RFC 6376 3.4.5: the example of relaxed canonicalisation ---------------------------

RFC_EXAMPLE_HEADER = b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
RFC_EXAMPLE_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_rfc6376_example_header() -> None:
    fields = split_fields(RFC_EXAMPLE_HEADER)
    assert [name for name, _ in fields] == [b"A", b"B"]
    assert [relaxed_header(raw) for _, raw in fields] == [b"a:X\r\n", b"b:Y Z\r\n"]


def test_rfc6376_example_body() -> None:
    assert relaxed_body(RFC_EXAMPLE_BODY) == b" C\r\nD E\r\n"
    expected = hashlib.sha256(b" C\r\nD E\r\n").digest()
    assert relaxed_body_hash(RFC_EXAMPLE_BODY) == expected


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        # 3.4.4 b: empty lines at the end are ignored; an empty body stays empty (the CRLF
        # of 3.4.3 is for "simple" only; RFC 4871 erratum 1384).
        (b"", b""),
        (b"\r\n", b""),
        (b"\r\n\r\n\r\n", b""),
        # Steps in order: a line of WSP becomes empty first, then is dropped as trailing.
        (b"\r\n\r\n  \r\n", b""),
        (b" \t \r\n\t\r\n", b""),
        (b"x\r\n \r\n\t\r\n", b"x\r\n"),
        # Empty lines inside the body stay.
        (b"a\r\n\r\n\r\nb\r\n\r\n", b"a\r\n\r\n\r\nb\r\n"),
        (b"a\r\n \r\nb\r\n", b"a\r\n\r\nb\r\n"),
        # WSP runs to one SP; WSP at line ends removed, also before an empty line.
        (b"a  \t b\t\r\n", b"a b\r\n"),
        (b"\t lead\r\n", b" lead\r\n"),
        # No final CRLF (BDAT): hashed as delivered, with the CRLF.
        (b"abc", b"abc\r\n"),
        (b"abc \t ", b"abc\r\n"),
        (b"abc\r\n  ", b"abc\r\n"),
        # Bare CR and LF are ordinary octets, not line ends; WSP before them stays.
        (b"a \rb\r\n", b"a \rb\r\n"),
        (b"a \nb\r\n", b"a \nb\r\n"),
        (b"a\r\r\n", b"a\r\r\n"),
        (b"a\r", b"a\r\r\n"),
        # 8-bit octets pass through.
        (b"caf\xc3\xa9 \xff\r\n", b"caf\xc3\xa9 \xff\r\n"),
    ],
)
def test_relaxed_body_cases(body: bytes, canonical: bytes) -> None:
    assert relaxed_body(body) == canonical
    assert reference_relaxed_body(body) == canonical
    assert relaxed_body_hash(body) == hashlib.sha256(canonical).digest()
    # Fed one octet at a time, every boundary is exercised.
    assert relaxed_body_hash(body[i : i + 1] for i in range(len(body))) == (
        hashlib.sha256(canonical).digest()
    )


def test_empty_body_hash_is_sha256_of_nothing(rsa_key: dkim.SigningKey) -> None:
    field = dkim.sign(b"From: a@example.org\r\n", b"", [rsa_key], timestamp=1)
    assert f"bh={EMPTY_SHA256};".encode() in field


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"Subject: Hello\r\n", b"subject:Hello\r\n"),
        (b"SUBJECT:Hello", b"subject:Hello\r\n"),
        (b"Subject \t:  \t Hello \t World \t\r\n", b"subject:Hello World\r\n"),
        (b"To: a@example.org,\r\n\tb@example.org\r\n", b"to:a@example.org, b@example.org\r\n"),
        (b"To:\r\n a@example.org\r\n", b"to:a@example.org\r\n"),
        (b"X-Empty:\r\n", b"x-empty:\r\n"),
        (b"X-Empty:  \r\n \r\n", b"x-empty:\r\n"),
        (b"X-8bit: caf\xc3\xa9\r\n", b"x-8bit:caf\xc3\xa9\r\n"),
        # Only WSP is whitespace to relaxed canonicalisation (3.4.2), not VT or FF.
        (b"X-Ctl: a\x0c\r\n", b"x-ctl:a\x0c\r\n"),
    ],
)
def test_relaxed_header_cases(raw: bytes, canonical: bytes) -> None:
    assert relaxed_header(raw) == canonical


def test_split_fields_skips_what_cannot_be_named() -> None:
    header = b" stray continuation\r\nno colon here\r\nFrom: a\r\n b\r\n: empty name\r\nTo: c\r\n"
    assert split_fields(header) == [(b"From", b"From: a\r\n b"), (b"To", b"To: c")]


# --- the streaming body hash against a line-by-line reading of the RFC ------------------


def reference_relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 spelt out line by line: slow, obvious, and independent of the
    regex-and-carry implementation under test."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # as delivered (see RelaxedBodyHasher.digest)
    lines = body.split(b"\r\n")[:-1] if body else []
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def chunked(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """`data` cut at the given offsets (any order, repeats allowed: empty chunks too)."""
    offsets = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    if not cuts:
        yield data
        return
    for start, end in itertools.pairwise(offsets):
        yield data[start:end]
    yield b""


# Octets chosen to hit every rule: WSP, CR and LF (bare and paired), 8-bit, plain text.
_AWKWARD = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"b", b"\xff", b"\x00"])
awkward_bodies = st.lists(_AWKWARD, max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(body=awkward_bodies, cuts=st.lists(st.integers(min_value=0, max_value=70), max_size=8))
def test_streaming_hash_matches_reference(body: bytes, cuts: list[int]) -> None:
    expected = reference_relaxed_body(body)
    assert relaxed_body(body) == expected
    assert relaxed_body_hash(chunked(body, cuts)) == hashlib.sha256(expected).digest()


def test_carry_stays_small_whatever_the_body() -> None:
    """A body of one long WSP run, or of bare CRs, is not accumulated between chunks."""
    for filler in (b" ", b"\t ", b" \r", b"\r"):
        hasher = RelaxedBodyHasher()
        for _ in range(2000):
            hasher.update(filler * 512)
            assert len(hasher._carry) <= 2
        hasher.digest()


def test_big_bodies_hash_like_the_reference() -> None:
    """Megabyte bodies of long lines, blank lines and WSP, in uneven chunks."""
    line = b"word \t" * 30 + b"  \r\n"
    bodies = [
        line * 4000,
        b"x" * 1_000_000,
        b"a\r\n" + b"\r\n" * 300_000,
        b"a\r\n" + b"\r\n" * 300_000 + b"b\r\n",
        b" " * 1_000_000 + b"end\r\n",
    ]
    for body in bodies:
        expected = hashlib.sha256(reference_relaxed_body(body)).digest()
        pieces = (body[i : i + 65_537] for i in range(0, len(body), 65_537))
        assert relaxed_body_hash(pieces) == expected


# --- generated messages, signed by us, verified by dkimpy -------------------------------

_NAMES = st.sampled_from(
    [b"From", b"To", b"Cc", b"Subject", b"Date", b"Message-ID", b"Reply-To", b"References",
     b"Content-Type", b"MIME-Version", b"List-Id", b"Received", b"X-Mailer", b"X-Custom",
     b"from", b"SUBJECT", b"tO"]
)  # fmt: skip
# Header text: printable ASCII and 8-bit octets, no controls but HTAB (dkimpy strips all of
# Python's whitespace at value ends, VT and FF included; RFC 6376 3.4.2 strips only WSP).
_HEADER_OCTET = st.sampled_from([*(bytes([c]) for c in range(0x21, 0x7F)), b"\xc3\xa9", b"\xff"])
_WSP_RUN = st.lists(st.sampled_from([b" ", b"\t"]), min_size=1, max_size=4).map(b"".join)


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    """A field value with WSP runs, leading and trailing WSP, and folded lines."""
    value = draw(st.lists(_WSP_RUN, max_size=1).map(b"".join))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        value += draw(st.lists(_HEADER_OCTET, min_size=1, max_size=8).map(b"".join))
        value += draw(
            st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"\r\n ", b"\r\n\t", b" \r\n  "])
        )
    value += draw(st.lists(_HEADER_OCTET, max_size=8).map(b"".join))
    value += draw(st.sampled_from([b"", b" ", b"\t  "]))
    return value


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A header section with one or two From fields, repeated fields and folded values."""
    fields = draw(st.lists(st.tuples(_NAMES, header_values()), max_size=10))
    froms = draw(st.lists(header_values(), min_size=1, max_size=2))
    fields += [(b"From", value) for value in froms]
    order = draw(st.permutations(range(len(fields))))
    return b"".join(fields[i][0] + b":" + fields[i][1] + b"\r\n" for i in order)


_BODY_OCTET = st.sampled_from([b"a", b"Z", b".", b"-", b"\xc3\xa9", b"\x80", b"\xff", b"\x00"])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """CRLF lines with WSP runs anywhere, trailing WSP and trailing empty or WSP lines;
    sometimes empty, sometimes without a final CRLF. No bare CR or LF: dkimpy reads a bare
    LF as a line end, and the SMTP layer refuses them outside BINARYMIME."""
    part = st.one_of(_BODY_OCTET, _WSP_RUN)
    lines = draw(st.lists(st.lists(part, max_size=10).map(b"".join), max_size=8))
    lines += draw(st.lists(st.sampled_from([b"", b" ", b"\t \t"]), max_size=3))
    body = b"".join(line + b"\r\n" for line in lines)
    if draw(st.booleans()):
        body += draw(st.lists(part, max_size=5).map(b"".join))  # an unterminated last line
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=headers(),
    body=bodies(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_generated_messages_verify_with_dkimpy(
    keys: list[dkim.SigningKey], dns: FakeDns, header: bytes, body: bytes, cuts: list[int]
) -> None:
    whole = dkim.sign(header, body, keys, timestamp=1_700_000_000)
    assert dkim.sign(header, chunked(body, cuts), keys, timestamp=1_700_000_000) == whole
    message = whole + as_delivered(header, body)
    assert signatures_verify(message, dns) == [True, True]


def test_chunk_iterables_of_bytearray_and_memoryview(rsa_key: dkim.SigningKey) -> None:
    header = b"From: a@example.org\r\n"
    body = b"line  one \r\nline two\r\n\r\n"
    expected = dkim.sign(header, body, [rsa_key], timestamp=5)
    pieces = [bytearray(body[:7]), memoryview(body[7:15]), body[15:]]
    assert dkim.sign(header, pieces, [rsa_key], timestamp=5) == expected  # type: ignore[arg-type]


# --- what is signed, and how the field looks --------------------------------------------

SAMPLE_HEADER = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Subject: first\r\n"
    b"To: carol@example.com,\r\n\tdave@example.com\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Mailer: test\r\n"
)
SAMPLE_BODY = b"Hello,\r\n\r\nbye.\r\n"


def tags_of(field: bytes) -> dict[str, str]:
    value = re.sub(rb"\r\n[ \t]", b"", field).decode().split(":", 1)[1]
    pairs = (part.split("=", 1) for part in value.split(";") if part.strip())
    return {key.strip(): re.sub(r"\s+", "", val) for key, val in pairs}


def test_field_tags_and_h_list(rsa_key: dkim.SigningKey) -> None:
    field = dkim.sign(SAMPLE_HEADER, SAMPLE_BODY, [rsa_key], timestamp=1_700_000_000)
    tags = tags_of(field)
    assert tags["v"] == "1"
    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert (tags["d"], tags["s"], tags["t"]) == (DOMAIN, "rsa2048", "1700000000")
    assert "l" not in tags and "x" not in tags
    # From oversigned (once more than present), To twice (both instances), no Received
    # (RFC 6376 5.4.1 SHOULD NOT) and no unknown X- field.
    assert tags["h"].split(":") == ["from", "from", "subject", "date", "message-id", "to", "to"]
    assert (
        tags["bh"] == base64.b64encode(hashlib.sha256(b"Hello,\r\n\r\nbye.\r\n").digest()).decode()
    )


def test_field_is_folded_and_ends_in_crlf(keys: list[dkim.SigningKey]) -> None:
    many = b"".join(b"To: r%d@example.com\r\n" % i for i in range(30))
    fields = dkim.sign(b"From: a@example.org\r\n" + many, b"x\r\n", keys)
    assert fields.endswith(b"\r\n")
    starts = [m.start() for m in re.finditer(rb"DKIM-Signature: ", fields)]
    assert starts == [0, fields.index(b"DKIM-Signature: ", 1)]
    for line in fields.split(b"\r\n")[:-1]:
        assert len(line) <= 78
        assert line.startswith((b"DKIM-Signature: ", b"\t"))


def test_no_keys_no_fields() -> None:
    assert dkim.sign(b"From: a\r\n", b"", []) == b""


def test_oversigned_from_and_bottom_up_selection(
    rsa_key: dkim.SigningKey, ed_key: dkim.SigningKey, dns: FakeDns
) -> None:
    fields = dkim.sign(SAMPLE_HEADER, SAMPLE_BODY, [rsa_key, ed_key])
    assert signatures_verify(fields + SAMPLE_HEADER + b"\r\n" + SAMPLE_BODY, dns) == [True, True]
    # A From added anywhere breaks both signatures: h= names one more From than there was.
    for added in (b"From: mallory@evil.example\r\n" + SAMPLE_HEADER,
                  SAMPLE_HEADER + b"From: mallory@evil.example\r\n"):  # fmt: skip
        assert signatures_verify(fields + added + b"\r\n" + SAMPLE_BODY, dns) == [False, False]
    # Either To instance changed: both were signed.
    for old, new in ((b"bob@", b"bobby@"), (b"dave@", b"davey@")):
        changed = SAMPLE_HEADER.replace(old, new)
        assert signatures_verify(fields + changed + b"\r\n" + SAMPLE_BODY, dns) == [False, False]
    # Unsigned fields and refolding/whitespace changes do not matter (relaxed).
    refolded = SAMPLE_HEADER.replace(b"X-Mailer: test", b"X-Mailer: other").replace(
        b"Subject: first", b"Subject:   first \t"
    )
    relaxed = fields + refolded + b"\r\n" + b"Hello,  \r\n\r\nbye.\r\n\r\n\r\n"
    assert signatures_verify(relaxed, dns) == [True, True]
    # The body changed.
    assert signatures_verify(fields + SAMPLE_HEADER + b"\r\nHello!\r\n", dns) == [False, False]


def test_client_signature_survives_ours_and_a_received_field(
    keys: list[dkim.SigningKey], dns: FakeDns, tmp_path: Path
) -> None:
    """DESIGN principle 4: the client's own DKIM signature (c=simple/simple, the strict
    one) still verifies after we prepend a Received field and our signatures."""
    client_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client_pem = client_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    client = dkim.SigningKey("client.example", "c1", "rsa-sha256", client_key)
    client_dns = FakeDns()
    client_dns.records = dict(dns.records)
    client_dns.publish_key(client)
    original = SAMPLE_HEADER + b"\r\n" + SAMPLE_BODY + b"trailing  spaces \r\n\r\n"
    client_field = dkimpy.sign(
        original,
        b"c1",
        b"client.example",
        client_pem,
        canonicalize=(b"simple", b"simple"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    submitted = client_field + original
    assert signatures_verify(submitted, client_dns) == [True]

    header, body = submitted.split(b"\r\n\r\n", 1)
    ours = dkim.sign(header + b"\r\n", [body[:10], body[10:]], keys)
    received = (
        b"Received: from client.example ([127.0.0.1])\r\n"
        b"\tby submit.example.org with ESMTPSA id 01ABC;\r\n"
        b"\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
    )
    for final in (received + ours + submitted, ours + received + submitted):
        assert final.endswith(submitted)  # the client's bytes are untouched
        assert signatures_verify(final, client_dns) == [True, True, True]


# --- keys, records and loading -----------------------------------------------------------


def test_dns_txt_records(rsa_key: dkim.SigningKey, ed_key: dkim.SigningKey) -> None:
    record = dkim.dns_txt_record(rsa_key)
    assert record.startswith("v=DKIM1; k=rsa; p=")
    public = serialization.load_der_public_key(base64.b64decode(record.split("p=", 1)[1]))
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    record = dkim.dns_txt_record(ed_key)
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(record.split("p=", 1)[1])) == 32  # RFC 8463 4: raw key
    strings = dkim.txt_strings(dkim.dns_txt_record(rsa_key))
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == dkim.dns_txt_record(rsa_key)


def write_pem(path: Path, key: object, fmt: serialization.PrivateFormat) -> Path:
    assert isinstance(key, rsa.RSAPrivateKey | Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    return path


def test_load_signing_key(tmp_path: Path) -> None:
    pkcs8 = serialization.PrivateFormat.PKCS8
    loaded = dkim.load_signing_key(
        write_pem(tmp_path / "r.key", dkim.generate_key("rsa"), pkcs8), "Example.ORG.", "S1"
    )
    assert (loaded.algorithm, loaded.domain, loaded.selector) == ("rsa-sha256", DOMAIN, "s1")
    loaded = dkim.load_signing_key(
        write_pem(tmp_path / "e.key", dkim.generate_key("ed25519-sha256"), pkcs8), DOMAIN, "e"
    )
    assert loaded.algorithm == "ed25519-sha256"
    # opendkim-genkey writes PKCS#1 RSA keys: accepted too.
    pkcs1 = write_pem(
        tmp_path / "p1.key",
        dkim.generate_key("rsa"),
        serialization.PrivateFormat.TraditionalOpenSSL,
    )
    assert dkim.load_signing_key(pkcs1, DOMAIN, "p1").algorithm == "rsa-sha256"


def test_load_signing_key_refusals(tmp_path: Path) -> None:
    ec_key = write_pem(
        tmp_path / "ec.key",
        ec.generate_private_key(ec.SECP256R1()),
        serialization.PrivateFormat.PKCS8,
    )
    with pytest.raises(ValueError, match=r"ec\.key.*cannot sign DKIM"):
        dkim.load_signing_key(ec_key, DOMAIN, "s")
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        dkim.generate_key("ed25519").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match=r"enc\.key: not an unencrypted PEM"):
        dkim.load_signing_key(encrypted, DOMAIN, "s")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ValueError, match=r"junk\.key"):
        dkim.load_signing_key(tmp_path / "junk.key", DOMAIN, "s")
    rsa_key = write_pem(
        tmp_path / "ok.key", dkim.generate_key("rsa"), serialization.PrivateFormat.PKCS8
    )
    for domain, selector in (
        ("../etc", "s"),
        ("example.org", "a/b"),
        ("-x.org", "s"),
        ("a..b", "s"),
    ):
        with pytest.raises(ValueError, match="invalid"):
            dkim.load_signing_key(rsa_key, domain, selector)


def test_signing_key_checks_algorithm() -> None:
    with pytest.raises(ValueError, match="cannot sign ed25519"):
        dkim.SigningKey(DOMAIN, "s", "ed25519-sha256", dkim.generate_key("rsa"))
    with pytest.raises(ValueError, match="unknown key type"):
        dkim.generate_key("dsa")


def test_internationalised_domain_is_signed_as_a_label(dns: FakeDns) -> None:
    key = dkim.SigningKey("bücher.example", "s", "ed25519-sha256", dkim.generate_key("ed25519"))
    assert key.domain == "xn--bcher-kva.example"
    local = FakeDns()
    local.publish_key(key)
    header = b"From: a@xn--bcher-kva.example\r\n"
    message = dkim.sign(header, b"hi\r\n", [key]) + header + b"\r\nhi\r\n"
    assert signatures_verify(message, local) == [True]


# --- the command line --------------------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "submitd.toml"
    config.write_text(f'hostname = "submit.example.org"\ndata_dir = "{tmp_path / "data"}"\n')
    return config


@pytest.mark.parametrize("key_type", ["rsa", "ed25519"])
def test_cli_keygen_writes_key_and_prints_record(tmp_path: Path, key_type: str) -> None:
    config = write_config(tmp_path)
    runner = CliRunner()
    args = ["keygen", "Example.org", "--selector", "mail2024", "--type", key_type]
    result = runner.invoke(dkim_cli, [*args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    path = tmp_path / "data" / "dkim" / "example.org" / "mail2024.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = dkim.load_signing_key(path, "example.org", "mail2024")
    match = re.fullmatch(
        r'mail2024\._domainkey\.example\.org\. IN TXT ((?:"[^"]*" ?)+)\n', result.stdout
    )
    assert match, result.stdout
    strings = re.findall(r'"([^"]*)"', match.group(1))
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == dkim.dns_txt_record(key)
    assert len(strings) == (2 if key_type == "rsa" else 1)

    # Never overwritten by accident; --force replaces; `record` prints it again.
    again = runner.invoke(dkim_cli, [*args, "--config", str(config)])
    assert again.exit_code != 0 and "exists" in again.output
    assert dkim.dns_txt_record(dkim.load_signing_key(path, "example.org", "mail2024")) == (
        dkim.dns_txt_record(key)
    )
    shown = runner.invoke(
        dkim_cli, ["record", "example.org", "-s", "mail2024", "--config", str(config)]
    )
    assert shown.exit_code == 0 and shown.stdout == result.stdout
    forced = runner.invoke(dkim_cli, [*args, "--config", str(config), "--force"])
    assert forced.exit_code == 0 and forced.stdout != result.stdout


def test_cli_keygen_out_dir_and_bad_names(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "keys"
    result = runner.invoke(dkim_cli, ["keygen", "example.org", "-s", "s1", "--type", "ed25519",
                                      "--out-dir", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(out / "s1.key").st_mode) == 0o600
    assert list(out.iterdir()) == [out / "s1.key"]  # no temporary file left behind
    for domain, selector in (("../../etc", "s"), ("example.org", "../x"), ("a b", "s")):
        bad = runner.invoke(dkim_cli, ["keygen", domain, "-s", selector, "--out-dir", str(out)])
        assert bad.exit_code == 2 and "invalid" in bad.output
    missing = runner.invoke(
        dkim_cli, ["record", "example.org", "-s", "nope", "--key", str(out / "nope.key")]
    )
    assert missing.exit_code == 1 and "nope.key" in missing.output
