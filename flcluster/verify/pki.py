"""Device certificates and request signatures, checked with ``cryptography`` (spec/device-protocol.md,
"Client verification").

Theory of operation
-------------------
A device of the original (a Huawei phone with hardware key attestation) holds a key pair in its keystore
and a certificate chain for it, leaf first: the *key attestation* certificate (certifying the signing
key), the *equip* certificate (the device), the *equip CA* certificate and a root. With ``pki_verify`` it
sends the first four as text at startFLJob together with ``sign_data``, a signature of
``fl_id + " " + timestamp``; its ``fl_id`` is the SHA-256 of the equip certificate's text. Later requests
carry a ``signature`` made with the same key (updateModel: over ``timestamp + str(iteration)``).

:func:`verify_device_chain` checks such a chain against the trust anchors an operator configured
(:class:`TrustAnchors`, read once by :func:`load_trust_anchors` from ``root_first_ca_path``,
``root_second_ca_path`` and ``equip_crl_path``): dates, the issuer of each link (name and signature), the
equip CA's CA flags and key identifiers, revocation, and returns the device's public key.
:func:`verify_request_signature` checks one signature with such a key; :func:`sign_request` is the
device's side. Every check takes the time as ``now_ms`` from its caller and raises
:class:`~flcluster.errors.VerificationFailed` with the reason the device is told; nothing is cached, so
the functions are pure apart from :func:`load_trust_anchors`, which reads the files.

Keys: RSA signs RSASSA-PSS with SHA-256 (MGF1-SHA-256; the device uses a 32-byte salt, any salt length
verifies, as the original's ``saltLen = -2``); EC keys sign ECDSA with SHA-256, which the original cannot
verify but flcluster can. A device key must be RSA of 2048–8192 bits or EC on P-256, P-384 or P-521.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import re
from pathlib import Path
from typing import Final, TypeAlias

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from flcluster.errors import ConfigError, VerificationFailed

__all__ = [
    "CERT_START_TOLERANCE_MS",
    "MAX_CERT_TEXT",
    "MAX_SIGNATURE_BYTES",
    "PrivateKey",
    "PublicKey",
    "TrustAnchors",
    "accepted_key",
    "check_issued_by",
    "fl_id_of",
    "load_public_key",
    "load_trust_anchors",
    "parse_certificate",
    "public_key_der",
    "sign_request",
    "start_fl_job_signed_data",
    "update_model_signed_data",
    "verify_device_chain",
    "verify_request_signature",
]

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
"""A device's public key: RSA or EC."""
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
"""A device's private key: RSA or EC."""

#: Longest certificate text accepted in one request field (a real one is 1–3 KiB).
MAX_CERT_TEXT: Final = 16 * 1024
#: Longest signature accepted (RSA-8192).
MAX_SIGNATURE_BYTES: Final = 1024
#: How far in the future a certificate's notBefore may be (the original's ``certStartTimeDiff``, 600 s).
CERT_START_TOLERANCE_MS: Final = 600_000

_RSA_BITS = (2048, 8192)
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_PEM_CERT = "-----BEGIN CERTIFICATE-----"
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_SHA256 = hashes.SHA256()
_PSS_VERIFY = padding.PSS(mgf=padding.MGF1(_SHA256), salt_length=padding.PSS.AUTO)
_PSS_SIGN = padding.PSS(mgf=padding.MGF1(_SHA256), salt_length=padding.PSS.DIGEST_LENGTH)


# ---------------------------------------------------------------------------------------- signed data


def fl_id_of(equip_cert: str) -> str:
    """The fl_id of a device: lowercase hex SHA-256 of its equip certificate's text, exactly as sent."""
    return hashlib.sha256(equip_cert.encode("utf-8")).hexdigest()


def start_fl_job_signed_data(fl_id: str, timestamp: str) -> bytes:
    """What ``RequestFLJob.sign_data`` signs: ``fl_id + " " + timestamp`` in UTF-8."""
    return f"{fl_id} {timestamp}".encode()


def update_model_signed_data(timestamp: str, iteration: int) -> bytes:
    """What ``RequestUpdateModel.signature`` signs: ``timestamp + str(iteration)`` in UTF-8, no separator."""
    return f"{timestamp}{iteration}".encode()


# ------------------------------------------------------------------------------------------ keys


def _device_key(key: object, what: str) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey):
        low, high = _RSA_BITS
        if not low <= key.key_size <= high:
            raise VerificationFailed(
                f"{what} is RSA of {key.key_size} bits; {low} to {high} bits are accepted"
            )
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise VerificationFailed(f"{what} is EC on {key.curve.name}; P-256, P-384 or P-521 are accepted")
        return key
    raise VerificationFailed(f"{what} is a {type(key).__name__}; an RSA or EC key is expected")


def accepted_key(key: object, what: str) -> PublicKey:
    """``key`` if it is a device key flcluster accepts (RSA 2048–8192 bits, EC P-256/P-384/P-521).

    Raises:
        VerificationFailed: Another kind or size; the reason names ``what``.
    """
    return _device_key(key, what)


def public_key_der(key: PublicKey) -> bytes:
    """``key`` as DER SubjectPublicKeyInfo (how the leader is told a device's key)."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(der: bytes) -> PublicKey:
    """A device key from DER SubjectPublicKeyInfo.

    Raises:
        VerificationFailed: Not such a key, or not an accepted kind or size.
    """
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise VerificationFailed(f"the device key is not a DER SubjectPublicKeyInfo: {exc}") from None
    return _device_key(key, "the device key")


def verify_request_signature(public_key: PublicKey | bytes, data: bytes, signature: bytes) -> None:
    """Check a device's ``signature`` of ``data`` (RSA-PSS or ECDSA, SHA-256).

    This is the check of every signed device request: startFLJob's ``sign_data``, updateModel's
    ``signature`` and those of the secure-aggregation rounds.

    Args:
        public_key: The device's key, or its DER SubjectPublicKeyInfo.
        data: The bytes the device signed.
        signature: The signature as sent.

    Raises:
        VerificationFailed: The signature is empty, too long or does not verify.
    """
    key = load_public_key(public_key) if isinstance(public_key, bytes) else public_key
    if not signature:
        raise VerificationFailed("the signature is empty")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise VerificationFailed(
            f"the signature has {len(signature)} bytes; at most {MAX_SIGNATURE_BYTES} are accepted"
        )
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, _PSS_VERIFY, _SHA256)
        else:
            key.verify(signature, data, ec.ECDSA(_SHA256))
    except InvalidSignature:
        raise VerificationFailed("the signature does not verify with the device's key") from None


def sign_request(private_key: PrivateKey, data: bytes) -> bytes:
    """The device's side of :func:`verify_request_signature`: sign ``data`` with ``private_key``.

    RSA signs RSASSA-PSS with SHA-256 and a 32-byte salt (Java's ``SHA256withRSA/PSS``), EC signs
    ECDSA with SHA-256.
    """
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, _PSS_SIGN, _SHA256)
    return private_key.sign(data, ec.ECDSA(_SHA256))


# ------------------------------------------------------------------------------------- certificates


def parse_certificate(text: str, what: str) -> x509.Certificate:
    """One certificate from a request field: PEM text, or base64 DER without the PEM armour.

    Args:
        text: The field's text.
        what: The field's name, for the reason.

    Raises:
        VerificationFailed: Empty, longer than :data:`MAX_CERT_TEXT`, or not a certificate.
    """
    if not text:
        raise VerificationFailed(f"{what} is empty")
    if len(text) > MAX_CERT_TEXT:
        raise VerificationFailed(f"{what} has {len(text)} characters; at most {MAX_CERT_TEXT} are accepted")
    try:
        if _PEM_CERT in text:
            return x509.load_pem_x509_certificate(text.encode("utf-8"))
        der = base64.b64decode("".join(text.split()), validate=True)
        return x509.load_der_x509_certificate(der)
    except (ValueError, binascii.Error) as exc:
        raise VerificationFailed(f"{what} is not an X.509 certificate (PEM or base64 DER): {exc}") from None


@attrs.frozen
class TrustAnchors:
    """What device chains are checked against: the root certificates and the revocation lists.

    Attributes:
        roots: The certificates of ``root_first_ca_path`` and ``root_second_ca_path``; any one may
            issue a device's equip CA certificate.
        crls: The revocation lists of ``equip_crl_path`` (none when it is ``""``).
    """

    roots: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()


def _read(path: str, parameter: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{parameter}={path!r} is refused: the file cannot be read ({exc.strerror or exc}); pki_verify "
            "needs it"
        ) from None


def _certificates_of(data: bytes, path: str, parameter: str) -> list[x509.Certificate]:
    try:
        if _PEM_CERT.encode() in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ConfigError(
            f"{parameter}={path!r} is refused: it holds no X.509 certificate in PEM or DER ({exc})"
        ) from None


def _crls_of(data: bytes, path: str) -> list[x509.CertificateRevocationList]:
    try:
        blocks = _PEM_CRL.findall(data)
        if blocks:
            return [x509.load_pem_x509_crl(block) for block in blocks]
        return [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise ConfigError(
            f"equip_crl_path={path!r} is refused: it holds no X.509 CRL in PEM or DER ({exc})"
        ) from None


def load_trust_anchors(
    root_first_ca_path: str, root_second_ca_path: str, equip_crl_path: str = ""
) -> TrustAnchors:
    """Read the trust anchors an operator configured (the only function here that does I/O).

    Args:
        root_first_ca_path: A file with a root certificate (PEM, or DER).
        root_second_ca_path: A file with the other root certificate.
        equip_crl_path: A file with one or more CRLs (PEM, or one DER CRL), or ``""`` for none.

    Raises:
        ConfigError: A path is empty or unreadable, or its file holds no certificate / CRL; the message
            names the parameter and the path.
    """
    roots: list[x509.Certificate] = []
    for parameter, path in (
        ("root_first_ca_path", root_first_ca_path),
        ("root_second_ca_path", root_second_ca_path),
    ):
        if not path:
            raise ConfigError(
                f"{parameter}={path!r} is refused: pki_verify=True needs a root certificate file"
            )
        roots.extend(_certificates_of(_read(path, parameter), path, parameter))
    crls = _crls_of(_read(equip_crl_path, "equip_crl_path"), equip_crl_path) if equip_crl_path else []
    return TrustAnchors(tuple(roots), tuple(crls))


def _utc(now_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC)


def _check_dates(cert: x509.Certificate, what: str, now_ms: int) -> None:
    now = _utc(now_ms)
    if cert.not_valid_before_utc > now + datetime.timedelta(milliseconds=CERT_START_TOLERANCE_MS):
        raise VerificationFailed(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if cert.not_valid_after_utc < now:
        raise VerificationFailed(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """Why ``issuer`` did not issue ``cert`` (name, then signature), or ``None`` when it did."""
    try:
        cert.verify_directly_issued_by(issuer)
    except ValueError:
        return f"its issuer {cert.issuer.rfc4514_string()!r} is not {issuer.subject.rfc4514_string()!r}"
    except InvalidSignature:
        return f"its signature does not verify with the key of {issuer.subject.rfc4514_string()!r}"
    except (TypeError, UnsupportedAlgorithm) as exc:
        return f"its signature cannot be checked ({exc})"
    return None


def check_issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """Check that ``issuer`` directly issued ``cert`` (the issuer's name, then its signature).

    Raises:
        VerificationFailed: It did not; the reason starts with ``what``.
    """
    why = _issued_by(cert, issuer)
    if why is not None:
        raise VerificationFailed(f"{what}: {why}")


def _key_ids_match(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """Why the authority key id of ``cert`` is not the subject key id of ``issuer``, or ``None``."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return f"{issuer.subject.rfc4514_string()!r} has no subject key identifier"
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    if aki is None:
        return "it has no authority key identifier"
    if aki != ski:
        return "its authority key identifier is not its issuer's subject key identifier"
    return None


def _check_ca(cert: x509.Certificate, what: str) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise VerificationFailed(f"{what} is not a CA certificate (basic constraints CA:TRUE)")
    try:
        signs = cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        signs = False
    if not signs:
        raise VerificationFailed(f"{what} may not sign certificates (key usage keyCertSign)")


def _check_revocation(
    cert: x509.Certificate, issuer: x509.Certificate, what: str, trust: TrustAnchors
) -> None:
    for crl in trust.crls:
        if crl.issuer != cert.issuer:
            continue
        try:
            trusted = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        except (TypeError, UnsupportedAlgorithm):
            trusted = False
        if trusted and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise VerificationFailed(
                f"{what} (serial {cert.serial_number:#x}) is revoked by the CRL of "
                f"{crl.issuer.rfc4514_string()!r}"
            )


def verify_device_chain(
    key_attestation: str,
    equip_cert: str,
    equip_ca_cert: str,
    trust: TrustAnchors,
    *,
    now_ms: int,
) -> PublicKey:
    """Check a device's certificate chain and return the key it certifies (spec "Client verification").

    Args:
        key_attestation: The leaf: the certificate of the device's signing key (PEM or base64 DER).
        equip_cert: The device certificate, issuer of ``key_attestation``.
        equip_ca_cert: The equip CA certificate, issuer of ``equip_cert``; issued by one of ``trust.roots``.
        trust: The configured roots and CRLs.
        now_ms: Now, epoch milliseconds.

    Returns:
        The public key of ``key_attestation``.

    Raises:
        VerificationFailed: Any check fails; the reason says which and why.
    """
    leaf = parse_certificate(key_attestation, "key_attestation")
    equip = parse_certificate(equip_cert, "equip_cert")
    equip_ca = parse_certificate(equip_ca_cert, "equip_ca_cert")
    links = (("key_attestation", leaf), ("equip_cert", equip), ("equip_ca_cert", equip_ca))
    for what, cert in links:
        _check_dates(cert, what, now_ms)
    why = _issued_by(leaf, equip)
    if why is not None:
        raise VerificationFailed(f"key_attestation is not issued by equip_cert: {why}")
    why = _issued_by(equip, equip_ca) or _key_ids_match(equip, equip_ca)
    if why is not None:
        raise VerificationFailed(f"equip_cert is not issued by equip_ca_cert: {why}")
    _check_ca(equip_ca, "equip_ca_cert")
    reasons = []
    root = None
    for candidate in trust.roots:
        why = _issued_by(equip_ca, candidate) or _key_ids_match(equip_ca, candidate)
        if why is None:
            root = candidate
            break
        reasons.append(why)
    if root is None:
        raise VerificationFailed(
            "equip_ca_cert is not issued by the root of root_first_ca_path or root_second_ca_path: "
            + "; ".join(reasons)
        )
    for (what, cert), issuer in zip(links, (equip, equip_ca, root), strict=True):
        _check_revocation(cert, issuer, what, trust)
    return _device_key(leaf.public_key(), "the key of key_attestation")
