"""TLS for the picker's ext_proc port and the collector's stream (`server.secure_serving`).

The field's endpoint picker serves TLS by default, and gateways that resolve an InferencePool's
picker themselves (Envoy AI Gateway, Istio, kgateway, GKE) connect with TLS without checking the
certificate. So: a certificate from `server.cert_path` (`tls.crt`, `tls.key`: a Kubernetes TLS
Secret's keys), read again whenever its files change, or else a self-signed one made at start.

Reloading rides on gRPC's dynamic server credentials: gRPC asks for the configuration at every
new connection's handshake, and gets a new one only when the files' contents changed, so a
rotated Secret takes effect on the next connection without a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extproc.config import ServerConfig

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
# The name a self-signed certificate is made for, besides this host's own names: clients that
# check it can pin the certificate and override the target name to this.
SELF_SIGNED_NAME = "extproc"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A PEM certificate (chain) and its PEM private key."""

    cert: bytes
    key: bytes


def self_signed(*, days: int = 365, names: tuple[str, ...] = ()) -> KeyPair:
    """A fresh P-256 key and a certificate for it, signed by itself, valid for `days`, naming
    `extproc`, localhost, 127.0.0.1, ::1, this host's name and `names`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SELF_SIGNED_NAME)])
    dns = {SELF_SIGNED_NAME, "localhost", socket.gethostname(), *names}
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(dns)]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def read_pair(directory: Path) -> KeyPair:
    """`tls.crt` and `tls.key` from `directory`; raises OSError when either cannot be read."""
    return KeyPair((directory / CERT_FILE).read_bytes(), (directory / KEY_FILE).read_bytes())


class _Reloader:
    """gRPC's certificate fetcher: a new configuration when the files' contents changed."""

    def __init__(self, directory: Path, first: KeyPair) -> None:
        self._directory = directory
        self._current = first

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            pair = read_pair(self._directory)
        except OSError as exc:  # mid-rotation, say: keep serving the last good pair
            log.warning("cannot read the TLS certificate in %s: %s", self._directory, exc)
            return None
        if pair == self._current:
            return None
        if not _matches(pair):
            # A Secret's two files are swapped one after the other: wait for the second.
            log.warning(
                "the TLS key in %s is not the certificate's; keeping the last", self._directory
            )
            return None
        self._current = pair
        log.info("serving the TLS certificate in %s anew (it changed)", self._directory)
        return _configuration(pair)


def server_credentials(cert_path: str) -> grpc.ServerCredentials:
    """The credentials for `add_secure_port`: `cert_path`'s pair, reloaded, or a self-signed
    one. A `cert_path` whose files cannot be read stops start-up (OSError): serving a
    certificate nobody configured would hide the mistake."""
    # gRPC reports each refused handshake itself, in its own format and below our handlers;
    # say once what those lines mean.
    log.info(
        "TLS on: a plaintext client is refused at its handshake; gRPC logs each as "
        "'Handshake failed ... WRONG_VERSION_NUMBER'"
    )
    if not cert_path:
        log.info("TLS with a self-signed certificate made at start (no server.cert_path)")
        return grpc.ssl_server_credentials([_chain(self_signed())])
    directory = Path(cert_path)
    first = read_pair(directory)
    # gRPC documents None from the fetcher as "no change"; its stubs do not say so.
    fetch = _Reloader(directory, first)
    return grpc.dynamic_ssl_server_credentials(_configuration(first), fetch)  # type: ignore[arg-type]


def add_port(server: grpc.aio.Server, address: str, config: ServerConfig) -> int:
    """Listen on `address`, over TLS when `config.secure_serving` (docs/deploy.md, "TLS")."""
    if not config.secure_serving:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(config.cert_path))


def _matches(pair: KeyPair) -> bool:
    """The key is the certificate's own (both parse, and their public keys are equal)."""
    try:
        cert = x509.load_pem_x509_certificate(pair.cert)
        key = serialization.load_pem_private_key(pair.key, password=None)
    except ValueError:
        return False
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw))


def _configuration(pair: KeyPair) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([_chain(pair)])


def _chain(pair: KeyPair) -> tuple[bytes, bytes]:
    return pair.key, pair.cert
