"""A job's credentials: a CA, the agents' certificate and key, and the operators' token.

Every agent of a job serves gRPC over mutual TLS with a certificate of the job's CA, and
answers only calls that carry the job's token. Agents, their workers and operators
(``etrain status``, ``chaos``, ``snapshot``) connect with the same certificate and token. A
job's credentials live in one directory (mode 0700; key and token 0600)::

    ca.pem  cert.pem  key.pem  token

``etrain credentials create DIR`` makes one to copy to every node of a multi-node job; a job on
one machine gets one in its runtime directory by itself. The certificate names the service,
not a host (``etrain-agent``): clients check it against that name, so agents move between
addresses freely while only holders of the CA's certificates can talk to them.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from elastictrain import constants
from elastictrain.errors import ConfigError

SERVICE_NAME = "etrain-agent"  # the name every agent certificate carries, and clients check
TOKEN_HEADER = "authorization"
_FILES = ("ca.pem", "cert.pem", "key.pem", "token")
_VALID_DAYS = 365


@dataclass(frozen=True)
class JobCredentials:
    ca: bytes  # PEM
    cert: bytes  # PEM
    key: bytes  # PEM
    token: str
    directory: str = ""

    @classmethod
    def load(cls, directory: str | os.PathLike) -> JobCredentials:
        """Read a credentials directory; a missing or unreadable file is a :class:`ConfigError`."""
        root = Path(directory)
        try:
            ca, cert, key, token = (root.joinpath(name).read_bytes() for name in _FILES)
        except OSError as exc:
            raise ConfigError(f"credentials {root}: {exc.strerror}: {exc.filename} (make them "
                              "with `etrain credentials create DIR`)") from exc  # fmt: skip
        text = token.decode("ascii", "replace").strip()
        if len(text) < 16 or not all(pem.startswith(b"-----BEGIN") for pem in (ca, cert, key)):
            raise ConfigError(f"credentials {root}: not a credentials directory")
        return cls(ca, cert, key, text, str(root))

    @classmethod
    def from_env(cls) -> JobCredentials | None:
        """The credentials an agent handed its workers (None: the job runs without them)."""
        directory = os.environ.get(constants.ENV_CREDENTIALS)
        return cls.load(directory) if directory else None

    @property
    def fingerprint(self) -> str:
        """The CA's fingerprint (SHA-256 of its PEM): which job's CA these are."""
        return hashlib.sha256(self.ca).hexdigest()[:32]

    def token_matches(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), f"Bearer {self.token}".encode())

    @property
    def bearer(self) -> str:
        return f"Bearer {self.token}"


def create(directory: str | os.PathLike, *, overwrite: bool = False) -> JobCredentials:
    """A new CA, an agent certificate signed by it (for servers and clients) and a token,
    written to ``directory`` (made mode 0700)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = Path(directory)
    if not overwrite and any(root.joinpath(name).exists() for name in _FILES):
        raise ConfigError(f"credentials {root} exist already (remove them to make new ones)")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etrain job CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVICE_NAME)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVICE_NAME)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem = serialization.Encoding.PEM
    files = {
        "ca.pem": ca.public_bytes(pem),
        "cert.pem": cert.public_bytes(pem),
        "key.pem": key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
        "token": (secrets.token_urlsafe(32) + "\n").encode(),
    }  # fmt: skip
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, data in files.items():
            tmp = root / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            tmp.replace(root / name)
    except OSError as exc:
        raise ConfigError(f"credentials {root}: {exc.strerror}") from exc
    return JobCredentials.load(root)


def local_job_credentials(runtime_job_dir: str | os.PathLike) -> JobCredentials:
    """A local job's credentials in its runtime directory, made the first time (the caller
    holds the job's lock)."""
    directory = Path(runtime_job_dir) / "credentials"
    if directory.joinpath("token").exists():
        return JobCredentials.load(directory)
    return create(directory)
