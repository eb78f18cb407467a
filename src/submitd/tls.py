"""The server's TLS context, and a self-signed certificate when none is configured.

Mozilla's "intermediate" configuration (RFC 8314 4.1 asks for TLS 1.2 or later):
TLS 1.2 and 1.3 only ([tls] min_version = "1.3" drops 1.2), ECDHE AEAD suites for
TLS 1.2 (TLS 1.3 suites are all AEAD), key-exchange groups X25519, P-256 and P-384,
no renegotiation, no compression.

Key-exchange groups. Python 3.11 cannot set them on an SSLContext:
`SSLContext.set_ecdh_curve` takes one curve and, on OpenSSL 3, makes it the only
group for TLS 1.2 and 1.3 alike (X25519 alone shuts out P-256-only clients; P-256
alone gives up X25519). So submitd ships `openssl.cnf` beside this module, whose
`system_default` section sets `Groups = X25519:P-256:P-384`. OpenSSL reads its
configuration once, when the ssl module is first imported, so the OPENSSL_CONF
environment variable must name that file before then. The `submitd` command does it
as its first statement (`os.environ.setdefault("OPENSSL_CONF", OPENSSL_CONF_PATH)`
at the top of submitd.cli, before anything imports ssl):

- an administrator's own OPENSSL_CONF is kept (setdefault); their file must then set
  the groups itself, e.g. by including the `[submitd_tls_defaults]` lines;
- the file replaces the system-wide openssl.cnf for this process and the processes
  it starts (FIPS providers or crypto-policies loaded from there need the above);
- `system_default` reaches every SSL context of the process, so outgoing delivery
  offers the same three groups: every current MTA supports X25519 or P-256;
- this module imports nothing at module level that loads ssl or OpenSSL (not even
  cryptography, which may share the system's libcrypto), so that the command line
  can import OPENSSL_CONF_PATH from it first. Keep it so.

The file also sets `Options = NoRenegotiation`, which `server_context` sets anyway:
finding it already set on a new context shows that the configuration was loaded, and
its absence (submitd imported as a library, an administrator's file without it) is
logged as a warning. Whether the groups really are restricted is checked from the
outside by tests/integration/test_tls_audit.py (sslyze, Mozilla's profile).

Without a configured certificate a self-signed one for the hostname is made in the
data directory, with a warning, and made anew when it has less than 30 days left:
clients must then be told to trust it, which is right for tests and a first start,
wrong for production. It is valid for 365 days, within Mozilla's 366-day limit.
"""

from __future__ import annotations

# Standard-library modules that do not load ssl only: see the docstring.
import datetime
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import ssl

    from submitd.config import Config

log = logging.getLogger("submitd.tls")

OPENSSL_CONF_PATH: Final = str(Path(__file__).resolve().with_name("openssl.cnf"))
"""submitd's OpenSSL configuration file, for the OPENSSL_CONF environment variable."""

# Mozilla "intermediate" TLS 1.2 suites; TLS 1.3 suites are all AEAD and always on.
_TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

SELF_SIGNED_DAYS: Final = 365
_RENEW_WITHIN = datetime.timedelta(days=30)


def certificate_paths(config: Config) -> tuple[Path, Path]:
    """The configured pair, or the self-signed pair in the data directory (made if missing
    or within 30 days of its end)."""
    if config.tls.cert is not None and config.tls.key is not None:
        return config.tls.cert, config.tls.key
    directory = config.data_dir / "tls"
    cert, key = directory / "self-signed.crt", directory / "self-signed.key"
    if not (cert.exists() and key.exists()):
        write_self_signed(config.hostname, cert, key)
        log.warning(
            "no TLS certificate configured: made a self-signed one for %s in %s; "
            "clients will not trust it. Set [tls] cert and key for production.",
            config.hostname,
            directory,
        )
    elif _expires_soon(cert):
        write_self_signed(config.hostname, cert, key)
        log.warning(
            "the self-signed TLS certificate in %s expired or was about to: made a new one; "
            "clients that were told to trust the old one must be told again.",
            directory,
        )
    return cert, key


def _expires_soon(cert_path: Path) -> bool:
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    left = certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left < _RENEW_WITHIN


def write_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_bytes)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def server_context(config: Config) -> ssl.SSLContext:
    import ssl

    cert, key = certificate_paths(config)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if not context.options & ssl.OP_NO_RENEGOTIATION:
        log.warning(
            "the OpenSSL configuration does not look like submitd's (OPENSSL_CONF=%s): "
            "TLS key-exchange groups may not be limited to X25519, P-256 and P-384; "
            "see %s",
            os.environ.get("OPENSSL_CONF", "unset"),
            OPENSSL_CONF_PATH,
        )
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers(_TLS12_CIPHERS)
    context.load_cert_chain(cert, key)
    return context
