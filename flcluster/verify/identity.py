"""A device's identity for pki_verify: its signing key and certificate chain (the device SDK's side).

Theory of operation
-------------------
The original's device keeps a key pair in its hardware keystore and the chain that certifies it, leaf
first: key attestation, equip, equip CA, root (reference §2.3; its Java client's ``PkiUtil``). A
:class:`DeviceIdentity` is the same in software: the private key and the four certificates as PEM text,
exactly as they are sent in ``RequestFLJob``. Its :attr:`~DeviceIdentity.fl_id` is the SHA-256 of the
equip certificate's text (what the Server checks), and :meth:`~DeviceIdentity.sign` signs request data
as :func:`flcluster.verify.pki.sign_request` does.

:meth:`DeviceIdentity.from_files` reads an identity from a PEM private key and a PEM chain; test and demo
identities come from :class:`flcluster.verify.issuing.DevicePKI`.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from flcluster.errors import ConfigError
from flcluster.verify.pki import PrivateKey, fl_id_of, sign_request

__all__ = ["DeviceIdentity"]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@attrs.frozen(eq=False, repr=False)
class DeviceIdentity:
    """A device's signing key and its certificate chain, as PEM text (leaf first).

    Attributes:
        private_key: The key certified by ``key_attestation`` (RSA or EC).
        key_attestation: The leaf certificate (sent as ``RequestFLJob.key_attestation``).
        equip_cert: The device certificate (``equip_cert``); the device's fl_id is its SHA-256.
        equip_ca_cert: The equip CA certificate (``equip_ca_cert``).
        root_cert: The root certificate (``root_cert``; Servers never trust it, they have their own).
    """

    private_key: PrivateKey
    key_attestation: str
    equip_cert: str
    equip_ca_cert: str
    root_cert: str

    @property
    def fl_id(self) -> str:
        """The device's fl_id: lowercase hex SHA-256 of :attr:`equip_cert`."""
        return fl_id_of(self.equip_cert)

    def sign(self, data: bytes) -> bytes:
        """Sign request data (RSA-PSS or ECDSA with SHA-256)."""
        return sign_request(self.private_key, data)

    def __repr__(self) -> str:
        return f"DeviceIdentity(fl_id={self.fl_id!r})"

    @classmethod
    def from_files(cls, key_path: str, chain_path: str, *, password: bytes | None = None) -> DeviceIdentity:
        """Read an identity: a PEM private key and a PEM file of the four certificates, leaf first.

        Raises:
            ConfigError: A file cannot be read, the key is not RSA or EC, or the chain does not hold
                four certificates.
        """
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password)
            chain = x509.load_pem_x509_certificates(Path(chain_path).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot read the device identity {key_path!r}, {chain_path!r}: {exc}"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"the device key {key_path!r} is a {type(key).__name__}; RSA or EC is expected")
        if len(chain) != 4:
            raise ConfigError(
                f"the chain {chain_path!r} holds {len(chain)} certificates; four are expected "
                "(key attestation, equip, equip CA, root)"
            )
        leaf, equip, equip_ca, root = (_pem(c) for c in chain)
        return cls(key, leaf, equip, equip_ca, root)
