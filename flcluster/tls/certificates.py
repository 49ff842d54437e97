"""Certificate files: a node's identity (PKCS#12 or PEM), the CA bundle, the CRL (cluster-protocol §7).

Theory of operation
===================

Everything here reads a file once and checks what it holds with ``cryptography``; nothing is kept open and
nothing is written. Each loader is told the ``config.json`` key the path came from (``server_cert_path``,
...) and, for a node certificate, the context key of its password (``server_password``), so every refusal is
a :class:`~flcluster.errors.ConfigError` that names both the key and the file, and never the password
(spec/cluster-protocol.md §7.3).

- :func:`load_identity`: a node's certificate, its chain and its private key, from PKCS#12 (the original's
  ``server.p12`` / ``client.p12``) or from one PEM file (certificate, intermediates, key). The key must
  belong to the certificate.
- :func:`load_ca_bundle`: the CA certificates (PEM, one or many; or one DER certificate).
- :func:`load_crl`: the CRL (PEM or DER), which must be signed by one of the CAs.
- :func:`check_issued_by`, :func:`check_not_revoked`: the node's own certificate against the CAs and the CRL,
  so a node whose peers would refuse it is refused at start-up instead.
- :class:`WatchedCertificate`, :func:`refuse_outside_validity`, :func:`expiry_notice`: the validity period of
  each loaded certificate, checked at start-up (an expired one is refused) and reported while running.

The clock is an argument (``now``, an aware UTC datetime): the callers own time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Literal

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from flcluster.errors import ConfigError

__all__ = [
    "Identity",
    "WatchedCertificate",
    "check_issued_by",
    "check_not_revoked",
    "expiry_notice",
    "load_ca_bundle",
    "load_crl",
    "load_identity",
    "refuse_outside_validity",
]

_PEM_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL
)
#: Longest chain walked from a certificate up to a CA (leaf, intermediates, CA).
_MAX_CHAIN = 10


@attrs.frozen
class WatchedCertificate:
    """One loaded certificate whose validity period is checked (spec/cluster-protocol.md §7.4).

    Attributes:
        key: The ``config.json`` key its file came from (``server_cert_path``, ``ca_cert_path``, ...).
        path: The file.
        subject: The certificate's subject, as RFC 4514 text.
        not_before: Start of its validity period (UTC).
        not_after: End of its validity period (UTC).
    """

    key: str
    path: str
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def of(cls, key: str, path: str, certificate: x509.Certificate) -> WatchedCertificate:
        """The validity period of ``certificate``, loaded from ``path`` (named by ``key``)."""
        return cls(
            key=key,
            path=path,
            subject=certificate.subject.rfc4514_string(),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
        )

    def describe(self) -> str:
        """``the certificate in server_cert_path '/x.p12' (CN=...)``, for messages."""
        where = self.key.removeprefix("argument ")
        return f"the certificate in {where} {self.path!r} ({self.subject or 'no subject'})"


@attrs.frozen
class Identity:
    """A node's certificate, the chain that came with it, and its private key.

    Attributes:
        key: The ``config.json`` key of the file (``server_cert_path`` or ``client_cert_path``).
        path: The file.
        certificate: The node's own certificate.
        chain: Intermediate certificates from the same file, leaf-side first (may be empty).
        private_key: The certificate's private key.
    """

    key: str
    path: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes = attrs.field(repr=False)

    def watched(self) -> WatchedCertificate:
        """The validity period of the node's own certificate."""
        return WatchedCertificate.of(self.key, self.path, self.certificate)

    def certificate_pem(self) -> bytes:
        """The certificate then its chain, PEM."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.certificate, *self.chain))


def _label(key: str) -> str:
    """How a message names where a path came from: a ``config.json`` key, or a phrase used as it is."""
    return key if " " in key else f"config.json key {key!r}"


def _read(key: str, path: str) -> bytes:
    if not path:
        raise ConfigError(f"{_label(key)} is empty: name the file")
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as err:
        raise ConfigError(f"{_label(key)}: the file {path!r} cannot be read: {err.strerror or err}") from None


def _public_der(key: object) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    data: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _pem_key(key: str, path: str, password_key: str, password: str, data: bytes) -> PrivateKeyTypes:
    found = _PEM_KEY.search(data)
    if found is None:
        raise ConfigError(
            f"{_label(key)}: the PEM file {path!r} holds no private key; put the certificate and "
            "its private key in one file (or use the PKCS#12 file)"
        )
    block = found.group(0)
    secret = password.encode() if password else None
    try:
        return serialization.load_pem_private_key(block, password=secret)
    except TypeError:
        if secret is None:
            raise ConfigError(
                f"{_label(key)}: the private key in {path!r} is encrypted; set {password_key}"
            ) from None
        # A password for a key that is not encrypted: the key is usable as it is.
        return serialization.load_pem_private_key(block, password=None)
    except (ValueError, UnsupportedAlgorithm):
        if secret is not None:
            raise ConfigError(
                f"{_label(key)}: the private key in {path!r} is refused: {password_key} does not "
                "open it (or the key is malformed)"
            ) from None
        raise ConfigError(
            f"{_label(key)}: the private key in {path!r} is malformed or of an unsupported type"
        ) from None


def _pkcs12(
    key: str, path: str, password_key: str, password: str, data: bytes
) -> tuple[PrivateKeyTypes | None, x509.Certificate | None, list[x509.Certificate]]:
    attempts = [password.encode()] if password else [None, b""]
    for secret in attempts:
        try:
            return pkcs12.load_key_and_certificates(data, secret)
        except (ValueError, UnsupportedAlgorithm):
            continue
    if password:
        why = f"{password_key} does not open it, or it is not a PKCS#12 file"
    else:
        why = f"it is not a PKCS#12 file, or it is protected by a password (set {password_key})"
    raise ConfigError(f"{_label(key)}: the file {path!r} is refused: {why}") from None


def load_identity(key: str, path: str, *, password_key: str, password: str) -> Identity:
    """Load a node certificate file: PKCS#12, or PEM with the certificate, its chain and its private key.

    A file whose content starts with a PEM block is PEM; any other is read as PKCS#12.

    Args:
        key: The ``config.json`` key the path came from (named in every refusal), or a phrase naming where
            it came from (anything with a space in it is used as it is, e.g. ``"argument client_cert"``).
        path: The file.
        password_key: The context key of the password (``server_password`` or ``client_password``).
        password: The password (``""``: none).

    Returns:
        The certificate, its chain and its private key.

    Raises:
        ConfigError: the file cannot be read, is neither format, the password does not open it, it holds no
            certificate or no key, or the key is not the certificate's.
    """
    data = _read(key, path)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(
                f"{_label(key)}: the PEM file {path!r} holds no certificate (or a malformed one)"
            ) from None
        private_key: PrivateKeyTypes | None = _pem_key(key, path, password_key, password, data)
        certificate: x509.Certificate | None = certificates[0]
        chain = certificates[1:]
    else:
        private_key, certificate, chain = _pkcs12(key, path, password_key, password, data)
    if certificate is None:
        raise ConfigError(f"{_label(key)}: the PKCS#12 file {path!r} holds no certificate")
    if private_key is None:
        raise ConfigError(f"{_label(key)}: the PKCS#12 file {path!r} holds no private key")
    if _public_der(private_key) != _public_der(certificate):
        raise ConfigError(
            f"{_label(key)}: the private key in {path!r} does not belong to its certificate "
            f"({certificate.subject.rfc4514_string()})"
        )
    return Identity(key=key, path=path, certificate=certificate, chain=tuple(chain), private_key=private_key)


def load_ca_bundle(key: str, path: str) -> tuple[x509.Certificate, ...]:
    """Load the CA certificates: PEM (one or many) or one DER certificate.

    Raises:
        ConfigError: the file cannot be read or holds no certificate.
    """
    data = _read(key, path)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return tuple(x509.load_pem_x509_certificates(data))
        return (x509.load_der_x509_certificate(data),)
    except ValueError:
        raise ConfigError(
            f"{_label(key)}: the file {path!r} holds no CA certificate (PEM or DER expected)"
        ) from None


def _signed_by(subject: x509.Certificate, issuer: x509.Certificate) -> bool:
    if subject.issuer != issuer.subject:
        return False
    try:
        subject.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def check_issued_by(identity: Identity, cas: Sequence[x509.Certificate], *, ca_key: str) -> None:
    """Refuse a node certificate that does not lead, through its own chain, to one of ``cas``.

    Raises:
        ConfigError: naming both files: the node's peers would refuse this certificate.
    """
    current = identity.certificate
    for _ in range(_MAX_CHAIN):
        if any(_signed_by(current, ca) for ca in cas):
            return
        step = next((c for c in identity.chain if c is not current and _signed_by(current, c)), None)
        if step is None:
            break
        current = step
    raise ConfigError(
        f"{_label(identity.key)}: the certificate in {identity.path!r} "
        f"({identity.certificate.subject.rfc4514_string()}, issued by "
        f"{identity.certificate.issuer.rfc4514_string()}) is not issued by a CA in {ca_key}, so the "
        "cluster's other nodes would refuse it"
    )


def load_crl(
    key: str, path: str, cas: Sequence[x509.Certificate], *, now: dt.datetime
) -> x509.CertificateRevocationList:
    """Load the CRL (PEM or DER) and check it: signed by one of ``cas``, not past its next update.

    Raises:
        ConfigError: the file cannot be read or is no CRL, no CA signed it, or it is out of date.
    """
    data = _read(key, path)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
    except ValueError:
        raise ConfigError(f"{_label(key)}: the file {path!r} is not a CRL (PEM or DER)") from None
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
        raise ConfigError(
            f"{_label(key)}: the CRL in {path!r} (issuer {crl.issuer.rfc4514_string()}) is not "
            "signed by a CA in ca_cert_path"
        )
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now:
        raise ConfigError(
            f"{_label(key)}: the CRL in {path!r} is out of date: its next update was due on "
            f"{_when(next_update)}; install a current one"
        )
    return crl


def check_not_revoked(identity: Identity, crl: x509.CertificateRevocationList, *, crl_key: str) -> None:
    """Refuse a node certificate that the CRL revokes.

    Raises:
        ConfigError: naming the certificate's file and the CRL's key.
    """
    if crl.issuer != identity.certificate.issuer:
        return
    if crl.get_revoked_certificate_by_serial_number(identity.certificate.serial_number) is not None:
        raise ConfigError(
            f"{_label(identity.key)}: the certificate in {identity.path!r} "
            f"({identity.certificate.subject.rfc4514_string()}) is revoked by the CRL in {crl_key}"
        )


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def refuse_outside_validity(watched: WatchedCertificate, *, now: dt.datetime) -> None:
    """Refuse a certificate that has expired or is not valid yet (spec/cluster-protocol.md §7.3 rule 5).

    Raises:
        ConfigError: naming the key, the file and the date.
    """
    if now > watched.not_after:
        raise ConfigError(
            f"{watched.describe()} expired on {_when(watched.not_after)}; replace it with a valid certificate"
        )
    if now < watched.not_before:
        raise ConfigError(
            f"{watched.describe()} is not valid before {_when(watched.not_before)} (check this host's clock)"
        )


def expiry_notice(
    watched: WatchedCertificate, *, now: dt.datetime, warning_days: int
) -> tuple[Literal["warning", "error"], str] | None:
    """What to log about a certificate's validity now (spec/cluster-protocol.md §7.4), or ``None``.

    Returns:
        ``("error", text)`` once it has expired, ``("warning", text)`` while it expires within
        ``warning_days`` days, else ``None``.
    """
    if now > watched.not_after:
        return (
            "error",
            f"{watched.describe()} expired on {_when(watched.not_after)}; a restart will refuse it",
        )
    left = watched.not_after - now
    if left <= dt.timedelta(days=warning_days):
        return (
            "warning",
            f"{watched.describe()} expires on {_when(watched.not_after)}, in {left.days} days "
            f"(cert_expire_warning_time_in_day={warning_days}); renew it",
        )
    return None
