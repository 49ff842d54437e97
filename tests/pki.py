"""Test PKIs for client verification (pki_verify): CAs, device chains and the files a Server reads.

Making keys is the slow part (RSA-2048: tens of milliseconds), so the PKIs and the first devices are made
once per test session (:func:`shared`) and reused; tests that need a device of their own issue it.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import attrs

from flcluster.config import FLContext
from flcluster.runtime.server import JobSettings
from flcluster.settings import job_settings
from flcluster.verify import DeviceIdentity
from flcluster.verify.issuing import DevicePKI
from tests.helpers import lenet_context

DAY = datetime.timedelta(days=1)


@attrs.frozen(eq=False)
class SharedPKI:
    """The session's PKIs.

    Attributes:
        first: The PKI of ``root_first_ca_path``.
        second: The PKI of ``root_second_ca_path`` (either may anchor a device).
        stranger: A PKI no Server trusts.
        twin: Same names as ``first``, other keys (its chains and CRLs must not pass for ``first``'s).
        devices: Devices of ``first`` with RSA keys (as the original's).
        ec_device: A device of ``second`` with an EC key.
        revoked: A device of ``first`` whose equip certificate ``first``'s CRL revokes.
    """

    first: DevicePKI
    second: DevicePKI
    stranger: DevicePKI
    twin: DevicePKI
    devices: tuple[DeviceIdentity, ...]
    ec_device: DeviceIdentity
    revoked: DeviceIdentity


@functools.cache
def shared() -> SharedPKI:
    """The session's PKIs and devices (made on first use)."""
    first = DevicePKI("flcluster test first")
    second = DevicePKI("flcluster test second")
    stranger = DevicePKI("flcluster test stranger")
    twin = DevicePKI("flcluster test first")
    devices = tuple(first.issue_device(f"device {i}") for i in range(6))
    return SharedPKI(
        first=first,
        second=second,
        stranger=stranger,
        twin=twin,
        devices=devices,
        ec_device=second.issue_device("ec device", key="ec"),
        revoked=first.issue_device("revoked device"),
    )


def write_trust(directory: Path, *, crl: bool = True) -> dict[str, str]:
    """Write the shared roots (and the first PKI's CRL revoking ``revoked``) under ``directory``.

    Returns:
        The FLContext keywords that turn pki_verify on with these files.
    """
    pki = shared()
    directory.mkdir(parents=True, exist_ok=True)
    context = {
        "pki_verify": True,
        "root_first_ca_path": pki.first.write_root(directory / "root_first.pem"),
        "root_second_ca_path": pki.second.write_root(directory / "root_second.pem"),
    }
    if crl:
        path = directory / "equip.crl"
        path.write_bytes(pki.first.revocation_list([pki.revoked]))
        context["equip_crl_path"] = str(path)
    return context


def pki_context(directory: Path, threshold: int, iterations: int, **windows: int) -> FLContext:
    """The LeNet job's context of :func:`tests.helpers.lenet_context`, with pki_verify on."""
    return lenet_context(threshold, iterations, **windows).evolve(**write_trust(directory))


def pki_job(directory: Path, threshold: int, iterations: int, **windows: int) -> JobSettings:
    """The job of :func:`pki_context`."""
    return job_settings(pki_context(directory, threshold, iterations, **windows))
