"""Client verification with ``pki_verify`` (spec/device-protocol.md, "Client verification").

Theory of operation
-------------------
With ``pki_verify=True`` a device proves who it is at startFLJob with a certificate chain and a
signature, and signs its later requests with the same key; its timestamps must be fresh and no signed
request may be sent twice. The package is layered:

- :mod:`flcluster.verify.timestamps`: the pure timestamp and replay rules (standard library only);
- :mod:`flcluster.verify.pki`: X.509 chains and signatures with ``cryptography``
  (:func:`verify_device_chain`, :func:`verify_request_signature`, :func:`sign_request`) and reading the
  configured trust anchors (:func:`load_trust_anchors`);
- :mod:`flcluster.verify.lists`: the list signatures of PW_ENCRYPT (spec/secure-aggregation.md §R8): what is
  signed, the key a certificate pair binds to an fl_id, the device's checks of getKeys and getListSign;
- :mod:`flcluster.verify.admission`: what the Server a request lands on checks
  (:func:`verify_start_fl_job`, :func:`check_update_model`) and what the leader keeps and checks
  (:class:`ClientVerifier`);
- :mod:`flcluster.verify.identity` and :mod:`flcluster.verify.issuing`: the device's side
  (:class:`DeviceIdentity`) and a small CA for tests and demos (:class:`DevicePKI`).

Nothing here reads a clock: every check takes ``now_ms`` from its caller.
"""

from __future__ import annotations

from flcluster.errors import VerificationFailed
from flcluster.verify.admission import (
    REASON_EXCHANGE_KEYS_TIMEOUT,
    REASON_SIGNATURE_FAILED,
    REASON_SIGNATURE_TIMEOUT,
    REASON_START_FL_JOB_VERIFY,
    ClientVerification,
    ClientVerifier,
    VerifiedStart,
    check_update_model,
    reason_signature_failed,
    reason_signature_timeout,
    verify_start_fl_job,
)
from flcluster.verify.identity import DeviceIdentity
from flcluster.verify.lists import (
    check_list_signatures,
    check_peer_keys,
    client_list_digest,
    exchange_keys_signed_data,
    peer_key,
    signs_client_list,
)
from flcluster.verify.pki import (
    PrivateKey,
    PublicKey,
    TrustAnchors,
    fl_id_of,
    load_public_key,
    load_trust_anchors,
    parse_certificate,
    public_key_der,
    sign_request,
    start_fl_job_signed_data,
    update_model_signed_data,
    verify_device_chain,
    verify_request_signature,
)
from flcluster.verify.timestamps import ReplayGuard, check_fresh, check_timestamp, parse_timestamp, replay_key

__all__ = [
    "REASON_EXCHANGE_KEYS_TIMEOUT",
    "REASON_SIGNATURE_FAILED",
    "REASON_SIGNATURE_TIMEOUT",
    "REASON_START_FL_JOB_VERIFY",
    "ClientVerification",
    "ClientVerifier",
    "DeviceIdentity",
    "PrivateKey",
    "PublicKey",
    "ReplayGuard",
    "TrustAnchors",
    "VerificationFailed",
    "VerifiedStart",
    "check_fresh",
    "check_list_signatures",
    "check_peer_keys",
    "check_timestamp",
    "check_update_model",
    "client_list_digest",
    "exchange_keys_signed_data",
    "fl_id_of",
    "load_public_key",
    "load_trust_anchors",
    "parse_certificate",
    "parse_timestamp",
    "peer_key",
    "public_key_der",
    "reason_signature_failed",
    "reason_signature_timeout",
    "replay_key",
    "sign_request",
    "signs_client_list",
    "start_fl_job_signed_data",
    "update_model_signed_data",
    "verify_device_chain",
    "verify_request_signature",
    "verify_start_fl_job",
]
