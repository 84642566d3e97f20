"""A TLS etcd with client certificates: every process of the job reaches it with the TLS it was
given, and nothing reaches it without."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time

import pytest

from elastictrain.coord.embedded import find_etcd_binary, free_loopback_port
from elastictrain.coord.etcd import EtcdClient, EtcdSecurity, parse_endpoints
from elastictrain.errors import ConfigError, CoordinationUnavailableError

pytestmark = pytest.mark.contract


def _pki(root):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def issue(subject, key, issuer, issuer_key, *, ca=False, san=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())  # fmt: skip

    files = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test CA", ca_key, "test CA", ca_key, ca=True)
    for who, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                     ("client", None)):  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(who, key, "test CA", ca_key, san=san)
        files[f"{who}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{who}-key.pem"] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())  # fmt: skip
    files["ca.pem"] = ca.public_bytes(serialization.Encoding.PEM)
    for file_name, data in files.items():
        (root / file_name).write_bytes(data)
    return {k: str(root / k) for k in files}


@pytest.fixture
def tls_etcd(tmp_path):
    pki = _pki(tmp_path)
    port, peer = free_loopback_port(), free_loopback_port()
    url = f"https://127.0.0.1:{port}"
    proc = subprocess.Popen([
        find_etcd_binary(), "--name", "tls", "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
        "--cert-file", pki["server.pem"], "--key-file", pki["server-key.pem"],
        "--trusted-ca-file", pki["ca.pem"], "--client-cert-auth", "--log-level", "error",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    security = EtcdSecurity(pki["ca.pem"], pki["client.pem"], pki["client-key.pem"])
    deadline = time.monotonic() + 20
    while True:
        try:
            EtcdClient(parse_endpoints(f"127.0.0.1:{port}"), 1.0, security).revision()
            break
        except CoordinationUnavailableError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    yield f"127.0.0.1:{port}", security
    proc.kill()
    proc.wait(10)


@pytest.mark.timeout(60)
def test_a_tls_etcd_is_reached_with_the_given_tls_and_only_so(tls_etcd, monkeypatch):
    endpoint, security = tls_etcd
    client = EtcdClient(parse_endpoints(endpoint), 5.0, security)
    client.put("/t/key", b"v")
    assert client.get("/t/key").value == b"v"
    lease = client.grant_lease(5)
    assert client.refresh_lease(lease) > 0
    client.close()
    # what `etrain launch --etcd-*` puts in the environment reaches every process of the job
    for name, value in security.to_env().items():
        monkeypatch.setenv(name, value)
    from_env = EtcdClient.from_spec(endpoint, timeout=5.0)
    assert from_env.get("/t/key").value == b"v"
    from_env.close()
    without_certificate = EtcdSecurity(security.cacert)
    for plain in (EtcdSecurity(), without_certificate):
        with pytest.raises(CoordinationUnavailableError):
            EtcdClient(parse_endpoints(endpoint), 2.0, plain).get("/t/key")


def test_etcd_security_is_checked_before_use():
    with pytest.raises(ConfigError, match="go together"):
        EtcdSecurity(cacert="ca.pem", cert="c.pem")
    with pytest.raises(ConfigError, match="needs --etcd-cacert"):
        EtcdSecurity(cert="c.pem", key="k.pem")
    with pytest.raises(ConfigError, match="go together"):
        EtcdSecurity(user="u")
    with pytest.raises(ConfigError, match="--etcd-cacert /nonexistent"):
        EtcdSecurity(cacert="/nonexistent").channel_credentials()
