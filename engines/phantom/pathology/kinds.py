"""What pathology a case carries and how its ground truth names each pathological object."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Pathology(StrEnum):
    """The pathologies the phantom can add; the values are also the command-line spelling (``--pathology``)."""

    SCREWS = "screws"
    CALCIFIED_LESION = "calcified-lesion"
    SCLEROTIC_METASTASIS = "sclerotic-metastasis"
    LYTIC_METASTASIS = "lytic-metastasis"
    MOTION = "motion"


#: Every pathology, in the order they are applied (and numbered in ``PhantomCase.anomaly``).
PATHOLOGIES: tuple[Pathology, ...] = tuple(Pathology)


def parse_pathologies(names: Iterable[str | Pathology]) -> tuple[Pathology, ...]:
    """Validated, de-duplicated pathologies in application order.

    Raises ValueError naming the value found and the values expected, so a typo on the command line is reported
    before any simulation.
    """
    wanted: set[Pathology] = set()
    for name in names:
        try:
            wanted.add(Pathology(name))
        except ValueError:
            raise ValueError(
                f"pathology: found {str(name)!r}; expected one of {', '.join(p.value for p in PATHOLOGIES)}"
            ) from None
    return tuple(p for p in PATHOLOGIES if p in wanted)


@dataclass(frozen=True, slots=True)
class AnomalyObject:
    """One pathological object of a case: the region ``PhantomCase.anomaly == label`` describes.

    The region covers the object itself (voxels at least half filled by it) and, for an implant, its MR
    susceptibility footprint; for ``motion`` it is where the ghosting changes the MR magnitude
    (docs/phantom.md, Pathology, Ground truth). ``level`` is the vertebra it belongs to (None for motion and
    rods spanning levels), ``side`` ``"left"``/``"right"`` for bilateral implants; ``centre_mm`` is the object's
    centre in patient LPS millimetres (the FOV centre for motion), ``size_mm`` its largest dimension (the peak
    displacement for motion), ``voxels`` the size of its region in ``anomaly``.
    """

    label: int
    name: str
    kind: Pathology
    level: str | None
    side: str | None
    centre_mm: tuple[float, float, float]
    size_mm: float
    voxels: int
