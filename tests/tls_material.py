"""Test certificates for TLS (spec/cluster-protocol.md §7): a cluster CA from ``trustme`` and its files.

:func:`make_pki` writes, under a folder, everything a TLS cluster's ``config.json`` names: the CA (PEM),
a server and a client certificate both as the original's PKCS#12 files (with passwords) and as PEM files
(certificate and key in one), and can sign a CRL. Certificates name ``127.0.0.1`` and ``localhost`` so
HTTPS clients can check host names on loopback.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import attrs
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from flcluster.config import ClusterConfig

SERVER_PASSWORD = "server-secret"
CLIENT_PASSWORD = "client-secret"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _encryption(password: str) -> serialization.KeySerializationEncryption:
    if password:
        return serialization.BestAvailableEncryption(password.encode())
    return serialization.NoEncryption()


def write_p12(path: Path, leaf: trustme.LeafCert, password: str) -> Path:
    """Write ``leaf`` (certificate and key) as a PKCS#12 file protected by ``password``."""
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    data = pkcs12.serialize_key_and_certificates(
        b"flcluster",
        key,  # type: ignore[arg-type]
        cert,
        None,
        _encryption(password),
    )
    path.write_bytes(data)
    return path


def write_pem(path: Path, leaf: trustme.LeafCert, password: str = "") -> Path:
    """Write ``leaf`` as one PEM file: certificate, then key (encrypted with ``password`` if given)."""
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(password)
    )
    path.write_bytes(leaf.cert_chain_pems[0].bytes() + key_pem)
    return path


@attrs.frozen
class ClusterPki:
    """A cluster CA and the files of its certificates (see the module docstring)."""

    folder: Path
    ca: trustme.CA
    ca_path: Path
    server_leaf: trustme.LeafCert
    client_leaf: trustme.LeafCert
    server_p12: Path
    client_p12: Path
    server_pem: Path
    client_pem: Path

    def config(self, **changes: object) -> ClusterConfig:
        """A ``config.json`` record naming the p12 files and the CA (``changes`` override any key)."""
        values: dict[str, object] = {
            "server_cert_path": str(self.server_p12),
            "client_cert_path": str(self.client_p12),
            "ca_cert_path": str(self.ca_path),
        }
        values.update(changes)
        return ClusterConfig(**values)  # type: ignore[arg-type]

    def crl(self, revoked: list[trustme.LeafCert], *, next_update: dt.datetime | None = None) -> Path:
        """Write a CRL signed by this CA that revokes ``revoked``; return its path."""
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), password=None)
        now = _now()
        due = next_update or now + dt.timedelta(days=30)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(min(now, due) - dt.timedelta(days=1))
            .next_update(due)
        )
        for leaf in revoked:
            serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        path = self.folder / f"crl-{len(revoked)}.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


def make_pki(
    folder: Path,
    *,
    ca: trustme.CA | None = None,
    not_after: dt.datetime | None = None,
    not_before: dt.datetime | None = None,
) -> ClusterPki:
    """Write a CA (a new one unless given) and a server and a client certificate under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA(organization_name="flcluster test CA") if ca is None else ca
    ca_path = folder / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_path))
    leaves = [
        authority.issue_cert(
            "127.0.0.1", "localhost", common_name=name, not_after=not_after, not_before=not_before
        )
        for name in ("flcluster-server", "flcluster-client")
    ]
    server, client = leaves
    return ClusterPki(
        folder=folder,
        ca=authority,
        ca_path=ca_path,
        server_leaf=server,
        client_leaf=client,
        server_p12=write_p12(folder / "server.p12", server, SERVER_PASSWORD),
        client_p12=write_p12(folder / "client.p12", client, CLIENT_PASSWORD),
        server_pem=write_pem(folder / "server.pem", server),
        client_pem=write_pem(folder / "client.pem", client),
    )
