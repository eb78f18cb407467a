"""TLS audit of a running server with sslyze, against Mozilla's "intermediate" profile.

Both ports are scanned: submission with STARTTLS (RFC 6409, RFC 3207) and submissions
with TLS from the first octet (RFC 8314). sslyze's own checker
(`sslyze.mozilla_tls_profile`, what `sslyze --mozilla_config=intermediate` runs) must
find nothing wrong but one thing: `certificate_path_validation`. The test server's
certificate is the self-signed one that submitd makes when none is configured; it is in
none of the trust stores sslyze validates against (Mozilla, Apple, Android, Java,
Windows), so no chain to a trusted root can be built. That is the only check of the
profile that is about trust; the certificate's type, curve, signature and lifespan are
checked and pass.

The tests after it read sslyze's results directly, so that each requirement of the
issue fails on its own: protocol versions, TLS 1.2 suites, renegotiation, compression
and the key-exchange groups. sslyze tries elliptic curves only; the finite-field groups
(ffdhe*) of TLS 1.3 are tried with `openssl s_client -groups`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from nassl.ephemeral_key_info import EcDhEphemeralKeyInfo
from sslyze.connection_helpers.opportunistic_tls_helpers import ProtocolWithOpportunisticTlsEnum
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)
from sslyze.scanner.models import (
    AllScanCommandsAttempts,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
)
from sslyze.scanner.scan_command_attempt import ScanCommandAttemptStatusEnum
from sslyze.scanner.scanner import Scanner
from sslyze.server_setting import ServerNetworkConfiguration, ServerNetworkLocation

from tests.conftest import HOSTNAME, RunningServer, make_server

# sslyze's bundled trust stores hold old roots with negative serial numbers.
pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")

PORTS = ("starttls", "implicit")
GROUPS = {"X25519", "secp256r1", "secp384r1"}  # sslyze's names for X25519, P-256, P-384
# Mozilla intermediate, TLS 1.2: ECDHE key exchange, AEAD only. (The profile also allows
# DHE-RSA suites, which need an RSA certificate and a DH group: submitd offers none.)
TLS12_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # The audit is of submitd's own OpenSSL configuration, whatever the caller's is.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("OPENSSL_CONF", raising=False)
        server = make_server(tmp_path_factory.mktemp("tls-audit"))
    try:
        yield server
    finally:
        if server.process is not None:
            server.stop(signal.SIGKILL)


def _request(server: RunningServer, which: str) -> ServerScanRequest:
    starttls = which == "starttls"
    return ServerScanRequest(
        # The name is for SNI and the certificate checks; the address is what is scanned.
        server_location=ServerNetworkLocation(
            hostname=HOSTNAME,
            port=server.starttls_port if starttls else server.tls_port,
            ip_address=server.host,
        ),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication=HOSTNAME,
            tls_opportunistic_encryption=(
                ProtocolWithOpportunisticTlsEnum.SMTP if starttls else None
            ),
            smtp_ehlo_hostname="audit.example.org" if starttls else None,
            network_timeout=10,
        ),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    )


@pytest.fixture(scope="module")
def scans(audited: RunningServer) -> dict[str, ServerScanResult]:
    """One sslyze scan of each port, run concurrently."""
    requests = {which: _request(audited, which) for which in PORTS}
    scanner = Scanner()
    scanner.queue_scans(list(requests.values()))
    by_port = {request.server_location.port: which for which, request in requests.items()}
    results = {by_port[result.server_location.port]: result for result in scanner.get_results()}
    assert set(results) == set(PORTS)
    for which, result in results.items():
        assert result.scan_status == ServerScanStatusEnum.COMPLETED, (which, result)
        assert result.scan_result is not None
        for command in SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER:
            attempt = getattr(result.scan_result, command.value)
            assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, (
                which,
                command,
                attempt.error_reason,
                attempt.error_trace,
            )
    return results


def _attempts(scans: dict[str, ServerScanResult], which: str) -> AllScanCommandsAttempts:
    scan_result = scans[which].scan_result
    assert scan_result is not None
    return scan_result


@pytest.mark.parametrize("which", PORTS)
def test_mozilla_intermediate_profile(
    audited: RunningServer, scans: dict[str, ServerScanResult], which: str
) -> None:
    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    with pytest.raises(ServerNotCompliantWithTlsConfiguration) as failed:
        check_server_against_tls_configuration(scans[which], profile)
    # Only the trust check of the self-signed certificate (see the module doc).
    assert set(failed.value.issues) == {"certificate_path_validation"}, failed.value.issues
    # ... and it fails for the reason given: the server sent the self-signed test
    # certificate, alone, and no trust store knows it.
    ours = x509.load_pem_x509_certificate(audited.cafile.read_bytes())
    info = _attempts(scans, which).certificate_info.result
    assert info is not None
    for deployment in info.certificate_deployments:
        assert deployment.received_certificate_chain == [ours]
        assert deployment.path_validation_results
        assert not any(r.was_validation_successful for r in deployment.path_validation_results)


@pytest.mark.parametrize("which", PORTS)
def test_protocol_versions(scans: dict[str, ServerScanResult], which: str) -> None:
    attempts = _attempts(scans, which)
    for refused in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        result = getattr(attempts, f"{refused}_cipher_suites").result
        assert not result.is_tls_version_supported, refused
        assert result.accepted_cipher_suites == [], refused
    for accepted in ("tls_1_2", "tls_1_3"):
        result = getattr(attempts, f"{accepted}_cipher_suites").result
        assert result.is_tls_version_supported, accepted


@pytest.mark.parametrize("which", PORTS)
def test_cipher_suites_are_ecdhe_aead(scans: dict[str, ServerScanResult], which: str) -> None:
    attempts = _attempts(scans, which)
    accepted_names: dict[str, set[str]] = {}
    for version, allowed in (("tls_1_2", TLS12_SUITES), ("tls_1_3", TLS13_SUITES)):
        result = getattr(attempts, f"{version}_cipher_suites").result
        accepted = result.accepted_cipher_suites
        names = accepted_names[version] = {suite.cipher_suite.name for suite in accepted}
        assert names, version
        assert names <= allowed, (version, names - allowed)
        for suite in accepted:
            # Forward secrecy from ECDHE on one of the three groups, whatever the version.
            key = suite.ephemeral_key
            assert isinstance(key, EcDhEphemeralKeyInfo), (version, suite.cipher_suite.name)
            assert key.curve_name in GROUPS, (version, suite.cipher_suite.name, key.curve_name)
    # The certificate is ECDSA P-256, so exactly the ECDSA half of the TLS 1.2 list.
    assert accepted_names["tls_1_2"] == {name for name in TLS12_SUITES if "_ECDSA_" in name}
    assert accepted_names["tls_1_3"] == TLS13_SUITES


@pytest.mark.parametrize("which", PORTS)
def test_no_renegotiation_no_compression(scans: dict[str, ServerScanResult], which: str) -> None:
    attempts = _attempts(scans, which)
    renegotiation = attempts.session_renegotiation.result
    assert renegotiation is not None
    assert not renegotiation.is_vulnerable_to_client_renegotiation_dos
    # RFC 5746: a server that never renegotiates still says so in its handshake, which is
    # what keeps old clients from the insecure-renegotiation attack.
    assert renegotiation.supports_secure_renegotiation
    compression = attempts.tls_compression.result
    assert compression is not None
    assert not compression.supports_compression


@pytest.mark.parametrize("which", PORTS)
def test_key_exchange_groups(scans: dict[str, ServerScanResult], which: str) -> None:
    curves = _attempts(scans, which).elliptic_curves.result
    assert curves is not None
    assert curves.supports_ecdh_key_exchange
    assert curves.supported_curves is not None and curves.rejected_curves is not None
    assert {curve.name for curve in curves.supported_curves} == GROUPS
    rejected = {curve.name for curve in curves.rejected_curves}
    assert {"secp521r1", "X448", "secp256k1", "brainpoolP256r1"} <= rejected


def _s_client(server: RunningServer, which: str, groups: str, version: str) -> tuple[int, str]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command (Debian package openssl) is needed"
    port = server.starttls_port if which == "starttls" else server.tls_port
    command = [openssl, "s_client", "-connect", f"{server.host}:{port}", "-servername", HOSTNAME]
    command += ["-CAfile", str(server.cafile), version, "-groups", groups, "-brief"]
    if which == "starttls":
        command += ["-starttls", "smtp", "-name", "audit.example.org"]
    result = subprocess.run(command, input=b"", capture_output=True, timeout=30)
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    return result.returncode, output


@pytest.mark.parametrize("which", PORTS)
@pytest.mark.parametrize(
    ("groups", "version", "shared"),
    [
        ("X25519", "-tls1_3", "X25519"),
        ("P-256", "-tls1_3", "ECDH, prime256v1"),
        ("P-384", "-tls1_3", "ECDH, secp384r1"),
        # In TLS 1.2 the client's groups also name the curves it accepts for ECDSA
        # certificates, so a client must offer P-256 for the test certificate.
        ("X25519:P-256", "-tls1_2", "X25519"),
        ("ffdhe2048:ffdhe3072:ffdhe4096:ffdhe6144:ffdhe8192", "-tls1_3", None),
        ("P-521:X448", "-tls1_3", None),
    ],
)
def test_groups_with_openssl_client(
    audited: RunningServer, which: str, groups: str, version: str, shared: str | None
) -> None:
    refusals = audited.log_text().count("NO_SUITABLE_KEY_SHARE")
    code, output = _s_client(audited, which, groups, version)
    if shared is None:
        # asyncio drops the connection without an alert; the server says why in its log.
        assert code != 0, output
        assert "Peer Temp Key" not in output and "Server Temp Key" not in output, output
        deadline = time.monotonic() + 5
        while audited.log_text().count("NO_SUITABLE_KEY_SHARE") == refusals:
            assert time.monotonic() < deadline, "the server did not log the refused key share"
            time.sleep(0.05)
    else:
        assert code == 0, output
        assert f"Peer Temp Key: {shared}" in output or f"Server Temp Key: {shared}" in output, (
            output
        )
        assert "Verification: OK" in output, output


def test_openssl_configuration_file_is_shipped() -> None:
    from submitd.tls import OPENSSL_CONF_PATH

    text = Path(OPENSSL_CONF_PATH).read_text()
    assert "\nGroups = X25519:P-256:P-384\n" in text
    assert "\nOptions = NoRenegotiation\n" in text
