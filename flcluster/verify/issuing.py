"""A small certificate authority for devices: test and demo chains for pki_verify.

Theory of operation
-------------------
The original's devices get their chains from the phone maker's PKI. To test and demonstrate pki_verify
without one, :class:`DevicePKI` builds the same shape with ``cryptography``: a self-signed root, an equip
CA it issues, and for each device an equip certificate (issued by the equip CA) and a key attestation
certificate for the device's signing key (issued by the equip certificate), with the extensions the
Servers check (CA flags and key usage, subject and authority key identifiers). It writes the root to a
file for ``root_first_ca_path`` / ``root_second_ca_path`` and issues revocation lists for
``equip_crl_path``. Nothing here is meant to protect anything real: the keys live in memory.

CA and equip keys are EC P-256 (fast to make); a device's signing key is RSA-2048 by default, as the
original's devices use, or EC P-256.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from flcluster.verify.identity import DeviceIdentity
from flcluster.verify.pki import PrivateKey

__all__ = ["DevicePKI"]

_DAY = datetime.timedelta(days=1)


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _new_key(kind: Literal["rsa", "ec"]) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not sign_certs,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


class DevicePKI:
    """A root, an equip CA, and device chains issued on request (see the module docstring).

    Args:
        organisation: The organisation name in every subject (two PKIs with the same one have the same
            names but different keys: a chain of one does not verify against the other's root).
        now: The time certificates are valid from (a day before it); default the wall clock.
        valid_days: How long the CA certificates and, by default, device certificates stay valid.
    """

    def __init__(
        self,
        organisation: str = "flcluster test devices",
        *,
        now: datetime.datetime | None = None,
        valid_days: int = 3650,
    ) -> None:
        self.organisation = organisation
        self.now = datetime.datetime.now(datetime.UTC) if now is None else now
        self.valid_days = valid_days
        self._serial = 1
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name("flcluster test root CA", organisation)
        self.root = self._issue(
            root_name, self.root_key.public_key(), root_name, self.root_key, None, ca=True, path_length=None
        )
        self.equip_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.equip_ca = self._issue(
            _name("flcluster test equip CA", organisation),
            self.equip_ca_key.public_key(),
            root_name,
            self.root_key,
            self.root,
            ca=True,
            path_length=1,
        )

    @property
    def root_pem(self) -> str:
        """The root certificate as PEM text."""
        return _pem(self.root)

    def write_root(self, path: str | Path) -> str:
        """Write the root certificate (PEM) to ``path``, for ``root_first_ca_path``; return the path."""
        Path(path).write_text(self.root_pem)
        return str(path)

    def issue_device(
        self,
        name: str = "device",
        *,
        key: Literal["rsa", "ec"] = "rsa",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> DeviceIdentity:
        """A new device: its signing key, equip and key attestation certificates, and the CA chain.

        Args:
            name: The device's common name.
            key: Its signing key: RSA-2048 (as the original's devices) or EC P-256.
            not_before: Validity start of both device certificates (default: a day before ``now``).
            not_after: Validity end of both device certificates (default: ``valid_days`` after ``now``).
        """
        validity = (not_before, not_after)
        equip_key = ec.generate_private_key(ec.SECP256R1())
        equip = self._issue(
            _name(f"{name} equip", self.organisation),
            equip_key.public_key(),
            self.equip_ca.subject,
            self.equip_ca_key,
            self.equip_ca,
            ca=True,
            path_length=0,
            validity=validity,
        )
        signing_key = _new_key(key)
        attestation = self._issue(
            _name(f"{name} key attestation", self.organisation),
            signing_key.public_key(),
            equip.subject,
            equip_key,
            equip,
            ca=False,
            path_length=None,
            validity=validity,
        )
        return DeviceIdentity(signing_key, _pem(attestation), _pem(equip), _pem(self.equip_ca), self.root_pem)

    def revocation_list(self, revoked: Sequence[DeviceIdentity]) -> bytes:
        """A PEM CRL of the equip CA revoking the equip certificates of ``revoked``."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.equip_ca.subject)
            .last_update(self.now - _DAY)
            .next_update(self.now + 30 * _DAY)
        )
        for identity in revoked:
            cert = x509.load_pem_x509_certificate(identity.equip_cert.encode())
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(self.now - _DAY)
                .build()
            )
        crl = builder.sign(self.equip_ca_key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

    def _issue(
        self,
        subject: x509.Name,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        issuer_name: x509.Name,
        issuer_key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
        *,
        ca: bool,
        path_length: int | None,
        validity: tuple[datetime.datetime | None, datetime.datetime | None] = (None, None),
    ) -> x509.Certificate:
        not_before, not_after = validity
        self._serial += 1
        issuer_public = issuer_key.public_key() if issuer is None else issuer.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(self._serial)
            .not_valid_before(self.now - _DAY if not_before is None else not_before)
            .not_valid_after(self.now + self.valid_days * _DAY if not_after is None else not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
            .add_extension(_usage(sign_certs=ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),  # type: ignore[arg-type]
                critical=False,
            )
        )
        return builder.sign(issuer_key, hashes.SHA256())
