"""A throw-away self-signed certificate for the servers under test (also the one the
delivery tests' Postfix smarthost gets: tests/delivery/postfix_fixture.py imports this
module as `bench.tlscert`, so it must import nothing from the rest of bench/).

Both servers get the same key type (and, where their configuration allows, the same
pair), because in a one-message-per-connection run the TLS handshake is a large share
of the server's CPU per message: an RSA-2048 signature costs about twenty times an
ECDSA P-256 one, which would swamp any difference between the servers themselves.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KEY_TYPES = ("ec", "rsa")


def _new_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key type must be one of {KEY_TYPES}, not {key_type!r}")


def make_self_signed(
    cert_path: Path, key_path: Path, hostname: str, key_type: str = "ec", days: int = 30
) -> None:
    """Write a PEM certificate (its own CA) valid for `hostname`, localhost and
    127.0.0.1 for `days` days, so a client can verify it with --cafile instead of
    switching verification off. The key file is private (0600), the certificate
    readable by all (0644)."""
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(hostname),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)
