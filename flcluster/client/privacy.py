"""What a device does to its upload under the FLPlan's ``encrypt_type`` (spec/privacy.md).

Theory of operation
-------------------
A :class:`~flcluster.client.device.Device` owns one :class:`DevicePrivacy`. After local training it asks
:meth:`DevicePrivacy.protect` for the upload: under ``NOT_ENCRYPT`` the trainer's premultiplied weights as
they are; under ``DP_ENCRYPT`` the clipped and noised weights of :func:`~flcluster.client.dp.dp_upload`;
under ``SIGNDS`` a sign and an index array from :func:`~flcluster.client.signds.select` with the names of the
tensors and no data. After getModel answered the new global model, :meth:`DevicePrivacy.observe` lets the
DP clip bound adapt (:func:`~flcluster.client.dp.next_clip`); that bound is the device's only state across
iterations. The pairwise-masking types (``PW_ENCRYPT``, ``STABLE_PW_ENCRYPT``) run rounds of their own and
are not handled here.

Both mechanisms need the trained weights before the multiplication by the data size; a trainer gives them in
:attr:`~flcluster.client.device.TrainResult.weights`, or they are recovered from the premultiplied upload by
dividing (one float32 rounding).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import attrs
import numpy as np
import numpy.typing as npt

from flcluster.client.dp import INITIAL_CLIP, analytic_gaussian_sigma, dp_upload, next_clip
from flcluster.client.signds import select
from flcluster.errors import ConfigError
from flcluster.wire.records import FLPlanParams

__all__ = ["DevicePrivacy", "Upload"]

FloatArray = npt.NDArray[np.float32]
_NO_INDICES = np.empty(0, np.int32)


@attrs.frozen(eq=False)
class Upload:
    """What goes into one ``RequestUpdateModel``.

    Attributes:
        feature_maps: Name → flat float32 tensor (empty tensors for SignDS).
        sign: ``RequestUpdateModel.sign``: 0, or ±1 for SignDS.
        index_array: ``RequestUpdateModel.index_array`` (SignDS), else empty.
    """

    feature_maps: Mapping[str, npt.ArrayLike]
    sign: int = 0
    index_array: npt.NDArray[np.int32] = attrs.field(factory=lambda: _NO_INDICES)


class DevicePrivacy:
    """One device's privacy step and its adaptive DP clip bound.

    Args:
        seed: Seed of the noise and of the SignDS draws; ``None`` (the default) seeds from the operating
            system's entropy. A known seed makes the noise known: for tests and reproducible runs only.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        self._clip = INITIAL_CLIP

    @property
    def clip(self) -> float:
        """The DP clip bound the next DP_ENCRYPT upload uses."""
        return self._clip

    def protect(
        self,
        plan: FLPlanParams,
        before: Mapping[str, npt.ArrayLike],
        upload: Mapping[str, npt.ArrayLike],
        *,
        data_size: int,
        trained: Mapping[str, npt.ArrayLike] | None = None,
    ) -> Upload:
        """The upload for ``plan.encrypt_type``.

        Args:
            plan: The FLPlan of the iteration.
            before: The global model from startFLJob.
            upload: The trainer's premultiplied weights (sent as they are without a mechanism).
            data_size: The declared data size.
            trained: The trained weights before the multiplication (``None``: ``upload / data_size``).

        Returns:
            The feature maps, sign and index array to send.

        Raises:
            ConfigError: The weights do not match the global model, or a parameter is out of range.
        """
        match plan.encrypt_type:
            case "DP_ENCRYPT":
                weights = self._trained(upload, data_size, trained)
                sigma = analytic_gaussian_sigma(plan.dp_eps, plan.dp_delta, self._clip)
                maps = dp_upload(
                    before, weights, data_size=data_size, clip=self._clip, sigma=sigma, rng=self._rng
                )
                return Upload(maps)
            case "SIGNDS":
                weights = self._trained(upload, data_size, trained)
                choice = select(
                    before,
                    weights,
                    sign_k=plan.sign_k,
                    sign_eps=plan.sign_eps,
                    sign_thr_ratio=plan.sign_thr_ratio,
                    sign_dim_out=plan.sign_dim_out,
                    rng=self._rng,
                )
                names = {name: np.empty(0, np.float32) for name in weights}
                return Upload(names, choice.sign, choice.index_array)
            case _:
                return Upload(upload)

    def observe(
        self,
        plan: FLPlanParams,
        before: Mapping[str, npt.ArrayLike],
        new_global: Mapping[str, npt.ArrayLike],
        *,
        uploaded: tuple[str, ...],
        iteration: int,
    ) -> None:
        """Adapt the DP clip bound to how far the global model moved (DP_ENCRYPT only; spec/privacy.md §2.3).

        Args:
            plan: The FLPlan of the iteration.
            before: The global model the device trained from.
            new_global: The model getModel returned after the iteration.
            uploaded: The names of the tensors the device uploaded (the norm runs over these).
            iteration: The server iteration the device took part in.
        """
        if plan.encrypt_type != "DP_ENCRYPT":
            return
        moved = {name: new_global[name] for name in uploaded if name in new_global}
        if len(moved) != len(uploaded):
            return  # the new model lacks an uploaded tensor: nothing to measure, keep the bound
        self._clip = next_clip(self._clip, plan.dp_norm_clip, before, moved, iteration=iteration)

    @staticmethod
    def _trained(
        upload: Mapping[str, npt.ArrayLike], data_size: int, trained: Mapping[str, npt.ArrayLike] | None
    ) -> Mapping[str, npt.ArrayLike]:
        if trained is not None:
            missing = [name for name in upload if name not in trained]
            if missing:
                raise ConfigError(
                    f"TrainResult.weights lacks {missing!r:.200}, which the upload carries; give the trained "
                    "weights of every uploaded tensor"
                )
            return {name: trained[name] for name in upload}
        n = np.float32(data_size)
        return {name: np.asarray(value, dtype=np.float32).reshape(-1) / n for name, value in upload.items()}
