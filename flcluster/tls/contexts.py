"""SSL contexts from loaded certificates (spec/cluster-protocol.md §7.1).

Theory of operation
===================

Three kinds of context, each built once at start-up and shared by every connection of its kind:

- :func:`cluster_listener_context`: the listening side of a cluster link (Scheduler port, a leader's peer
  port). It presents ``server_cert_path`` and **requires** a client certificate issued by a CA in
  ``ca_cert_path`` (and not revoked, with ``crl_path``).
- :func:`cluster_connector_context`: the connecting side (a Server to the Scheduler or to its leader,
  ``flcluster finish``). It presents ``client_cert_path`` and verifies the listener the same way. Host names
  are not checked: a node's identity on a cluster link is its certificate from the cluster's CA.
- :func:`https_server_context`: the device and management HTTP ports. It presents ``server_cert_path`` and
  asks for no client certificate, with ALPN for Hypercorn (h2, http/1.1).

:func:`https_client_context` is the other end of the HTTP ports, for the device SDK, the simulator and the
operator tools: it checks the server's certificate *and* its host name against a CA bundle, and can present
a client certificate (for a proxy that asks for one).

Every context is TLS 1.2 or newer, with the TLS 1.2 cipher suites of ``cipher_list``
(:func:`parse_cipher_list`: the original's allowed names only). Python's :mod:`ssl` loads a certificate and
key only from files, so :func:`_load_identity` writes them for the one call into a private temporary
directory, the key encrypted with a one-time password; nothing stays on disk.
"""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flcluster.errors import ConfigError
from flcluster.tls.certificates import Identity, load_ca_bundle, load_identity

__all__ = [
    "ALLOWED_CIPHERS",
    "DEFAULT_CIPHERS",
    "cluster_connector_context",
    "cluster_listener_context",
    "https_client_context",
    "https_server_context",
    "parse_cipher_list",
]

#: The TLS 1.2 cipher suites the original allows in ``cipher_list`` (its ``kCiphers``), OpenSSL names.
ALLOWED_CIPHERS: Final = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-CCM",
    "ECDHE-ECDSA-AES256-CCM",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
)
#: An empty ``cipher_list``: the ECDHE AES-GCM and CHACHA20-POLY1305 suites of the allowed list.
DEFAULT_CIPHERS: Final = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
)
#: ALPN protocols of the HTTPS ports (Hypercorn's).
HTTP_ALPN: Final = ("h2", "http/1.1")


def parse_cipher_list(cipher_list: str) -> tuple[str, ...]:
    """``cipher_list`` as cipher names: ``""`` gives :data:`DEFAULT_CIPHERS`.

    Raises:
        ConfigError: an empty name, or one outside :data:`ALLOWED_CIPHERS`.
    """
    if cipher_list == "":
        return DEFAULT_CIPHERS
    names = tuple(cipher_list.split(":"))
    for name in names:
        if name not in ALLOWED_CIPHERS:
            raise ConfigError(
                f"config.json key 'cipher_list'={cipher_list!r} is refused: {name!r} is not an allowed "
                "cipher; expected names separated by ':' from: " + ", ".join(ALLOWED_CIPHERS)
            )
    return names


def _base(purpose: ssl._SSLMethod, ciphers: Sequence[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.set_ciphers(":".join(ciphers))
    except ssl.SSLError:
        raise ConfigError(
            f"config.json key 'cipher_list'={':'.join(ciphers)!r} is refused: none of its ciphers can be "
            "used by this OpenSSL"
        ) from None
    return context


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)


def _load_identity(context: ssl.SSLContext, identity: Identity) -> None:
    one_time = secrets.token_urlsafe(32).encode()
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(one_time),
    )
    with tempfile.TemporaryDirectory(prefix="flcluster-tls-") as folder:
        cert_file, key_file = Path(folder) / "chain.pem", Path(folder) / "key.pem"
        _write_private(cert_file, identity.certificate_pem())
        _write_private(key_file, key_pem)
        try:
            context.load_cert_chain(cert_file, key_file, password=one_time)
        except ssl.SSLError as err:
            raise ConfigError(
                f"config.json key {identity.key!r}: the certificate in {identity.path!r} cannot be used for "
                f"TLS: {err.reason or err}"
            ) from None


def _trust(
    context: ssl.SSLContext, cas: Sequence[x509.Certificate], crl: x509.CertificateRevocationList | None
) -> None:
    context.verify_mode = ssl.CERT_REQUIRED
    pem = b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in cas)
    context.load_verify_locations(cadata=pem.decode("ascii"))
    if crl is not None:
        # cadata takes certificates only; a CRL is loaded from a file.
        with tempfile.TemporaryDirectory(prefix="flcluster-tls-") as folder:
            crl_file = Path(folder) / "crl.pem"
            _write_private(crl_file, crl.public_bytes(serialization.Encoding.PEM))
            context.load_verify_locations(cafile=crl_file)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def cluster_listener_context(
    identity: Identity,
    cas: Sequence[x509.Certificate],
    crl: x509.CertificateRevocationList | None,
    ciphers: Sequence[str],
) -> ssl.SSLContext:
    """The listening side of cluster links: presents ``identity``, requires a client certificate."""
    context = _base(ssl.PROTOCOL_TLS_SERVER, ciphers)
    _load_identity(context, identity)
    _trust(context, cas, crl)
    return context


def cluster_connector_context(
    identity: Identity,
    cas: Sequence[x509.Certificate],
    crl: x509.CertificateRevocationList | None,
    ciphers: Sequence[str],
) -> ssl.SSLContext:
    """The connecting side of cluster links: presents ``identity``, verifies the listener (no host name)."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT, ciphers)
    context.check_hostname = False
    _load_identity(context, identity)
    _trust(context, cas, crl)
    return context


def https_server_context(identity: Identity, ciphers: Sequence[str]) -> ssl.SSLContext:
    """The device and management HTTPS ports: present ``identity``; no client certificate is asked for."""
    context = _base(ssl.PROTOCOL_TLS_SERVER, ciphers)
    _load_identity(context, identity)
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(list(HTTP_ALPN))
    return context


def https_client_context(
    ca_cert: str = "", client_cert: str = "", client_password: str = ""
) -> ssl.SSLContext:
    """An HTTPS client's context: the server's certificate and host name checked against ``ca_cert``.

    For the device SDK, the simulator and the operator tools (spec/cluster-protocol.md §7.1).

    Args:
        ca_cert: CA bundle (PEM, or one DER certificate); ``""``: the system's trusted CAs.
        client_cert: A client certificate to present (PKCS#12 or PEM with its key); ``""``: none.
        client_password: Opens ``client_cert``.

    Raises:
        ConfigError: a file cannot be read or used (the message names the argument and the file).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # host names and certificates checked
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_cert:
        cas = load_ca_bundle("argument ca_cert", ca_cert)
        pem = b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in cas)
        context.load_verify_locations(cadata=pem.decode("ascii"))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if client_cert:
        identity = load_identity(
            "argument client_cert", client_cert, password_key="client_password", password=client_password
        )
        _load_identity(context, identity)
    return context
