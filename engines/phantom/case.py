"""The product of the phantom: co-registered dual-echo MR magnitudes, CT and tissue labels of one subject."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from engines.phantom.acquisition import Acquisition
from engines.phantom.pathology import AnomalyObject, Pathology
from engines.phantom.subject import SubjectParameters
from sct_core.geometry import VolumeGeometry

#: CT numbers are clipped to the range a 12-bit CT scanner stores, -1024 to 3071 HU.
CT_HU_MIN = -1024
CT_HU_MAX = 3071


@dataclass(frozen=True, slots=True, eq=False)
class PhantomCase:
    """One simulated subject, voxel for voxel on one grid.

    ``echoes`` are the magnitude images a scanner reconstructs, already scaled to the unsigned 16-bit range it
    stores (``[echo, slice, row, column]``, echoes in order of echo time). ``ct_hu`` is the matching CT in
    Hounsfield units as int16. ``labels`` holds the tissue (:class:`engines.phantom.tissues.Tissue`) that fills
    most of each voxel: ground truth for per-tissue metrics. Arrays are read-only.

    ``pathologies`` are those added to this case (() for a normal one). ``anomaly`` marks their objects: 0 is
    normal, k >= 1 the region of ``anomaly_objects[k - 1]``. With pathology, ``labels`` still name the
    subject's own anatomy (a screw in a vertebral body leaves its voxels labelled bone), so per-tissue metrics
    should leave out ``anomaly > 0``.
    """

    seed: int
    subject: SubjectParameters
    acquisition: Acquisition
    geometry: VolumeGeometry
    echoes: npt.NDArray[np.uint16]
    ct_hu: npt.NDArray[np.int16]
    labels: npt.NDArray[np.uint8]
    pathologies: tuple[Pathology, ...] = ()
    anomaly: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.uint8))
    anomaly_objects: tuple[AnomalyObject, ...] = ()

    def __post_init__(self) -> None:
        if self.anomaly.size == 0:  # a normal case: nothing anomalous
            object.__setattr__(self, "anomaly", np.zeros(self.geometry.shape, dtype=np.uint8))
        n_echoes = len(self.acquisition.echo_times_ms)
        if self.echoes.shape != (n_echoes, *self.geometry.shape):
            raise ValueError(
                f"echoes shape {self.echoes.shape} does not match {n_echoes} echoes on grid {self.geometry.shape}"
            )
        for name in ("ct_hu", "labels", "anomaly"):
            arr = getattr(self, name)
            if arr.shape != self.geometry.shape:
                raise ValueError(f"{name} shape {arr.shape} does not match grid {self.geometry.shape}")
        highest = int(self.anomaly.max(initial=0))
        if highest != len(self.anomaly_objects):
            raise ValueError(
                f"anomaly labels go up to {highest} but {len(self.anomaly_objects)} anomaly objects are described"
            )
        for arr in (self.echoes, self.ct_hu, self.labels, self.anomaly):
            arr.setflags(write=False)

    @property
    def body_mask(self) -> npt.NDArray[np.bool_]:
        """Voxels inside the body (not air outside it)."""
        return np.asarray(self.labels != 0)
