"""Tests of the development PKI (certs.pki) and its CLI (certs.cli)."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, Subject, VerificationError

from certs.cli import main
from certs.errors import PKIError, PKIExistsError, PKIIncompleteError
from certs.pki import (
    PKIPaths,
    init_pki,
    issue_agent_cert,
    issue_server_cert,
    load_certificate,
    load_pki,
    validate_agent_id,
)

TIMEOUT = 10.0
FIXED_NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

_E = TypeVar("_E", bound=x509.ExtensionType)


@pytest.fixture
def pki(tmp_path: Path) -> PKIPaths:
    return init_pki(tmp_path / "pki")


def _cert(path: Path) -> x509.Certificate:
    return load_certificate(path)


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def _fingerprint(path: Path) -> bytes:
    return _cert(path).fingerprint(hashes.SHA256())


def _builder(ca: Path) -> PolicyBuilder:
    return PolicyBuilder().store(Store([_cert(ca)])).time(datetime.now(UTC))


# -- files and permissions ----------------------------------------------------------------------


def test_paths_layout(tmp_path: Path) -> None:
    paths = PKIPaths.at(tmp_path)
    assert paths.server_ca_cert == tmp_path / "server-ca.pem"
    assert paths.server_ca_key == tmp_path / "server-ca.key"
    assert paths.agent_ca_cert == tmp_path / "agent-ca.pem"
    assert paths.agent_ca_key == tmp_path / "agent-ca.key"
    assert paths.server_cert == tmp_path / "server.pem"
    assert paths.server_key == tmp_path / "server.key"
    assert paths.signing_key == tmp_path / "command-signing.key"
    assert paths.signing_pub == tmp_path / "command-signing.pub"
    assert paths.agent_cert("a1") == tmp_path / "agents" / "a1.pem"
    assert paths.agent_key("a1") == tmp_path / "agents" / "a1.key"
    assert not tmp_path.joinpath("agents").exists()


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=["umask022", "umask000", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    value: int = request.param
    old = os.umask(value)
    try:
        yield value
    finally:
        os.umask(old)


def test_file_modes(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "pki"
    paths = init_pki(root, agent_ids=("agent-1", "agent-2"))
    keys = [p for p in root.rglob("*") if p.suffix == ".key"]
    assert len(keys) == 6
    for path in root.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        elif path.suffix == ".key":
            assert mode == 0o600, path
        else:
            assert mode == 0o644, path
        assert not path.name.startswith("."), f"temporary file left behind: {path}"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.agents_dir.stat().st_mode) == 0o700


def test_keys_are_created_private_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(
        path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spy)
    init_pki(tmp_path / "pki")
    monkeypatch.undo()
    key_opens = [o for o in opened if ".key." in Path(o[0]).name]
    assert len(key_opens) == 5  # two CAs, server, command-signing, agent-1
    for name, flags, mode in key_opens:
        assert Path(name).name.startswith("."), name  # a temporary name, renamed afterwards
        assert flags & os.O_CREAT, name
        assert flags & os.O_EXCL, name
        assert mode == 0o600, name


# -- certificate contents -----------------------------------------------------------------------


def _ext(cert: x509.Certificate, kind: type[_E]) -> x509.Extension[_E]:
    return cert.extensions.get_extension_for_class(kind)


def _check_common(cert: x509.Certificate, issuer: x509.Certificate, validity: timedelta) -> None:
    assert cert.version is x509.Version.v3
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert cert.serial_number > 0
    assert cert.issuer == issuer.subject
    assert cert.not_valid_before_utc == FIXED_NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == FIXED_NOW + validity
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == _ext(issuer, x509.SubjectKeyIdentifier).value.digest


def test_ca_certificates(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, now=FIXED_NOW)
    for path, name in (
        (paths.server_ca_cert, "BYOC dev server CA"),
        (paths.agent_ca_cert, "BYOC dev agent CA"),
    ):
        ca = _cert(path)
        _check_common(ca, ca, timedelta(days=3650))
        assert _cn(ca) == name
        assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
            "BYOC dev PKI"
        )
        bc = _ext(ca, x509.BasicConstraints)
        assert bc.critical
        assert bc.value.ca
        assert bc.value.path_length == 0
        ku = _ext(ca, x509.KeyUsage)
        assert ku.critical
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign
        assert not ku.value.digital_signature
    assert _fingerprint(paths.server_ca_cert) != _fingerprint(paths.agent_ca_cert)


def _check_leaf(cert: x509.Certificate, eku: x509.ObjectIdentifier) -> None:
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [eku]


def test_server_certificate(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, now=FIXED_NOW)
    cert = _cert(paths.server_cert)
    _check_common(cert, _cert(paths.server_ca_cert), timedelta(days=397))
    _check_leaf(cert, ExtendedKeyUsageOID.SERVER_AUTH)
    assert _cn(cert) == "localhost"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    # server.pem is the leaf only, no chain
    assert paths.server_cert.read_bytes().count(b"BEGIN CERTIFICATE") == 1


def test_server_certificate_custom_names(tmp_path: Path) -> None:
    paths = init_pki(
        tmp_path, server_dns=("cp.example.test", "localhost"), server_ips=("10.1.2.3",)
    )
    cert = _cert(paths.server_cert)
    assert _cn(cert) == "cp.example.test"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cp.example.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]


def test_agent_certificate(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, agent_ids=("edge-7",), now=FIXED_NOW)
    cert = _cert(paths.agent_cert("edge-7"))
    _check_common(cert, _cert(paths.agent_ca_cert), timedelta(days=365))
    _check_leaf(cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    assert _cn(cert) == "edge-7"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "BYOC dev PKI"
    )
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:byoc:agent:edge-7"]
    key = serialization.load_pem_private_key(paths.agent_key("edge-7").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_issue_agent_cert_validity_and_replacement(pki: PKIPaths) -> None:
    old = pki.agent_cert("agent-1").read_bytes()
    cert_path, key_path = issue_agent_cert(
        pki, "agent-1", valid_for=timedelta(days=30), now=FIXED_NOW
    )
    assert (cert_path, key_path) == (pki.agent_cert("agent-1"), pki.agent_key("agent-1"))
    assert cert_path.read_bytes() != old
    assert _cert(cert_path).not_valid_after_utc == FIXED_NOW + timedelta(days=30)
    with pytest.raises(PKIError, match="positive"):
        issue_agent_cert(pki, "agent-1", valid_for=timedelta(0))


def test_leaf_never_outlives_its_ca(pki: PKIPaths) -> None:
    cert_path, _ = issue_agent_cert(pki, "agent-1", valid_for=timedelta(days=100 * 365))
    assert _cert(cert_path).not_valid_after_utc == _cert(pki.agent_ca_cert).not_valid_after_utc


def test_issue_server_cert_rejects_bad_names(pki: PKIPaths) -> None:
    with pytest.raises(PKIError, match="not an IP address"):
        issue_server_cert(pki, dns=["localhost"], ips=["localhost"])
    with pytest.raises(PKIError, match="DNS name"):
        issue_server_cert(pki, dns=[], ips=["127.0.0.1"])


def test_naive_now_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="timezone-aware"):
        init_pki(tmp_path, now=datetime(2030, 1, 1))


# -- path validation (cryptography.x509.verification is strict, like VERIFY_X509_STRICT) ----------


@pytest.mark.parametrize(
    "subject",
    [
        DNSName("localhost"),
        IPAddress(ipaddress.ip_address("127.0.0.1")),
        IPAddress(ipaddress.ip_address("::1")),
    ],
    ids=["localhost", "127.0.0.1", "::1"],
)
def test_server_cert_verifies(pki: PKIPaths, subject: Subject) -> None:
    verifier = _builder(pki.server_ca_cert).build_server_verifier(subject)
    chain = verifier.verify(_cert(pki.server_cert), [])
    assert chain == [_cert(pki.server_cert), _cert(pki.server_ca_cert)]


def test_server_cert_does_not_verify_for_other_names_or_cas(pki: PKIPaths) -> None:
    leaf = _cert(pki.server_cert)
    with pytest.raises(VerificationError):
        _builder(pki.server_ca_cert).build_server_verifier(DNSName("example.com")).verify(leaf, [])
    with pytest.raises(VerificationError):
        _builder(pki.agent_ca_cert).build_server_verifier(DNSName("localhost")).verify(leaf, [])
    with pytest.raises(VerificationError):  # serverAuth only: not usable as a client cert
        _builder(pki.server_ca_cert).build_client_verifier().verify(leaf, [])


def test_agent_cert_verifies_as_client(pki: PKIPaths) -> None:
    leaf = _cert(pki.agent_cert("agent-1"))
    verified = _builder(pki.agent_ca_cert).build_client_verifier().verify(leaf, [])
    assert verified.chain == [leaf, _cert(pki.agent_ca_cert)]
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:byoc:agent:agent-1")]


def test_agent_cert_does_not_verify_against_server_ca(pki: PKIPaths) -> None:
    leaf = _cert(pki.agent_cert("agent-1"))
    with pytest.raises(VerificationError):
        _builder(pki.server_ca_cert).build_client_verifier().verify(leaf, [])


def test_agent_cert_is_not_a_server_cert(pki: PKIPaths) -> None:
    leaf = _cert(pki.agent_cert("agent-1"))
    with pytest.raises(VerificationError):
        _builder(pki.agent_ca_cert).build_server_verifier(DNSName("agent-1")).verify(leaf, [])


# -- a real mutual TLS handshake ----------------------------------------------------------------


def _server_context(paths: PKIPaths) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    ctx.load_verify_locations(paths.agent_ca_cert)
    return ctx


def _client_context(paths: PKIPaths, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(paths.server_ca_cert)
    ctx.load_cert_chain(cert, key)
    return ctx


def _serve_once(listener: socket.socket, ctx: ssl.SSLContext) -> str:
    """Accept one mTLS connection, answer b"ok" and return the client certificate's CN."""
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    with conn, ctx.wrap_socket(conn, server_side=True) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"ok")
        return _cn(x509.load_der_x509_certificate(der))


def _mtls_exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str
) -> tuple[str | Exception, bytes | Exception]:
    """One exchange over loopback; returns what each side got (a value or its exception)."""
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        listener.settimeout(TIMEOUT)
        served = pool.submit(_serve_once, listener, server_ctx)
        client: bytes | Exception
        try:
            with (
                socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT) as raw,
                client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                client = tls.recv(2)
        except OSError as exc:  # ssl.SSLError is an OSError
            client = exc
        server: str | Exception
        try:
            server = served.result(timeout=TIMEOUT)
        except OSError as exc:
            server = exc
    return server, client


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake(pki: PKIPaths, hostname: str) -> None:
    client_ctx = _client_context(pki, pki.agent_cert("agent-1"), pki.agent_key("agent-1"))
    server, client = _mtls_exchange(_server_context(pki), client_ctx, hostname)
    assert server == "agent-1"  # the control plane reads the agent id from the CN
    assert client == b"ok"


def test_mutual_tls_rejects_agent_from_another_pki(pki: PKIPaths, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other")
    client_ctx = _client_context(pki, other.agent_cert("agent-1"), other.agent_key("agent-1"))
    server, client = _mtls_exchange(_server_context(pki), client_ctx, "localhost")
    assert isinstance(server, ssl.SSLCertVerificationError), server
    assert client != b"ok"


def test_mutual_tls_client_rejects_wrong_hostname(pki: PKIPaths) -> None:
    client_ctx = _client_context(pki, pki.agent_cert("agent-1"), pki.agent_key("agent-1"))
    server, client = _mtls_exchange(_server_context(pki), client_ctx, "example.com")
    assert isinstance(client, ssl.SSLCertVerificationError), client
    assert isinstance(server, Exception)


# -- init, re-init, load ------------------------------------------------------------------------


def test_reinit_keeps_cas_and_adds_missing_agents(pki: PKIPaths) -> None:
    kept = [pki.server_ca_cert, pki.agent_ca_cert, pki.server_cert]
    fingerprints = [_fingerprint(p) for p in kept]
    signing_key = pki.signing_key.read_bytes()
    agent_1 = pki.agent_cert("agent-1").read_bytes()

    again = init_pki(pki.root, agent_ids=("agent-1", "agent-2"))
    assert again == pki
    assert [_fingerprint(p) for p in kept] == fingerprints
    assert pki.signing_key.read_bytes() == signing_key
    assert pki.agent_cert("agent-1").read_bytes() == agent_1
    new_leaf = _cert(pki.agent_cert("agent-2"))
    assert _builder(pki.agent_ca_cert).build_client_verifier().verify(new_leaf, [])

    init_pki(pki.root, overwrite=True)
    assert _fingerprint(pki.server_ca_cert) != fingerprints[0]
    assert _fingerprint(pki.agent_ca_cert) != fingerprints[1]
    assert pki.signing_key.read_bytes() != signing_key
    assert pki.agent_cert("agent-1").read_bytes() != agent_1


def test_reinit_reissues_agent_with_missing_key(pki: PKIPaths) -> None:
    pki.agent_key("agent-1").unlink()
    init_pki(pki.root)
    key = serialization.load_pem_private_key(pki.agent_key("agent-1").read_bytes(), None)
    assert key.public_key() == _cert(pki.agent_cert("agent-1")).public_key()


def test_init_into_partial_pki_is_refused(pki: PKIPaths) -> None:
    fingerprint = _fingerprint(pki.server_ca_cert)
    pki.agent_ca_key.unlink()
    with pytest.raises(PKIExistsError, match=r"agent-ca\.key"):
        init_pki(pki.root)
    assert _fingerprint(pki.server_ca_cert) == fingerprint  # nothing was touched
    init_pki(pki.root, overwrite=True)
    assert load_pki(pki.root) == pki


def test_init_into_dir_with_stray_ca_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "server-ca.pem").write_text("not mine")
    with pytest.raises(PKIExistsError):
        init_pki(tmp_path)
    assert (tmp_path / "server-ca.pem").read_text() == "not mine"


def test_load_pki(pki: PKIPaths, tmp_path: Path) -> None:
    assert load_pki(pki.root) == pki
    with pytest.raises(PKIIncompleteError, match="not a directory"):
        load_pki(tmp_path / "nowhere")
    pki.server_key.unlink()
    with pytest.raises(PKIIncompleteError, match=r"server\.key"):
        load_pki(pki.root)


def test_exception_tree() -> None:
    assert issubclass(PKIExistsError, PKIError)
    assert issubclass(PKIIncompleteError, PKIError)
    assert not issubclass(PKIError, OSError | ValueError)


@pytest.mark.parametrize("agent_id", ["a", "agent-1", "0", "a" * 63, "x-y-z9"])
def test_good_agent_ids(agent_id: str) -> None:
    assert validate_agent_id(agent_id) == agent_id


@pytest.mark.parametrize(
    "agent_id",
    ["", "Agent", "-a", "a-", "a" * 64, "a_b", "a.b", "a/b", "../x", "a\n", " a", "агент"],
)
def test_bad_agent_ids_are_refused(agent_id: str, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="invalid agent id"):
        validate_agent_id(agent_id)
    root = tmp_path / "pki"
    with pytest.raises(PKIError, match="invalid agent id"):
        init_pki(root, agent_ids=("agent-1", agent_id))
    assert not root.exists()  # refused before anything was written


def test_bad_agent_id_is_refused_by_issue(pki: PKIPaths) -> None:
    with pytest.raises(PKIError, match="invalid agent id"):
        issue_agent_cert(pki, "../../etc/evil")
    assert not list(pki.root.glob("**/evil*"))


# -- command-signing key ------------------------------------------------------------------------


def test_signing_key_signs_and_verifies(pki: PKIPaths) -> None:
    private_pem = pki.signing_key.read_bytes()
    public_pem = pki.signing_pub.read_bytes()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    private = serialization.load_pem_private_key(private_pem, password=None)
    public = serialization.load_pem_public_key(public_pem)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert public == private.public_key()
    message = b'{"cmd":"restart","target":"web"}'
    signature = private.sign(message)
    public.verify(signature, message)
    with pytest.raises(InvalidSignature):
        public.verify(signature, message + b" ")


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_init_then_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pki"
    argv = ["init", str(root), "--agent", "a1", "--agent", "a2", "--dns", "cp.test"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 12
    assert all(line.startswith("created ") for line in lines)
    assert f"{root / 'agents' / 'a1.pem'}  CN=a1, expires " in out
    assert f"{root / 'server.pem'}  CN=cp.test, expires " in out
    assert str(root / "agents" / "a2.key") in out
    assert "PRIVATE KEY" not in out

    assert main(["show", str(root)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for cert in [root / "server-ca.pem", root / "agent-ca.pem", root / "server.pem"]:
        assert _fingerprint(cert).hex() in out
    for agent_id in ("a1", "a2"):
        assert _fingerprint(root / "agents" / f"{agent_id}.pem").hex() in out
    assert "CN=BYOC dev agent CA" in out
    assert "PRIVATE KEY" not in out

    assert main(["init", str(root), "--agent", "a3"]) == 0
    out, _ = capsys.readouterr()
    assert f"kept     {root / 'server-ca.key'}" in out
    assert f"created  {root / 'agents' / 'a3.pem'}" in out


def test_cli_init_force_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path)]) == 0
    fingerprint = _fingerprint(tmp_path / "server-ca.pem")
    assert main(["init", str(tmp_path), "--force", "--ip", "10.0.0.1"]) == 0
    out, _ = capsys.readouterr()
    assert f"replaced {tmp_path / 'server-ca.pem'}" in out
    assert _fingerprint(tmp_path / "server-ca.pem") != fingerprint
    san = _ext(_cert(tmp_path / "server.pem"), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]


def test_cli_agent(pki: PKIPaths, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", str(pki.root), "edge-2", "--days", "30"]) == 0
    out, _ = capsys.readouterr()
    assert str(pki.agent_cert("edge-2")) in out
    cert = _cert(pki.agent_cert("edge-2"))
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, minutes=5)


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "{missing}"],
        ["agent", "{missing}", "a1"],
        ["agent", "{root}", "Not_Valid"],
        ["agent", "{root}", "a1", "--days", "0"],
        ["init", "{partial}"],
        ["init", "{missing}", "--ip", "not-an-ip"],
    ],
)
def test_cli_errors(
    argv: list[str], pki: PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "agent-ca.pem").write_bytes(pki.agent_ca_cert.read_bytes())
    args = [a.format(missing=tmp_path / "missing", root=pki.root, partial=partial) for a in argv]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("byoc-certs: error: ")
    assert err.count("\n") == 1


def test_cli_as_module(pki: PKIPaths) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "certs.cli", "show", str(pki.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _fingerprint(pki.server_cert).hex() in result.stdout
