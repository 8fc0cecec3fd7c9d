"""When a simulated study, acquisition and reconstruction happen.

Timestamps are part of what downstream software groups and orders by (AcquisitionTime across echoes,
ContentTime across images), so they follow a real exam: the study opens, localisers and other series run, then
our 3D acquisition takes TR × phase-encoding lines × partitions, and the reconstruction emits images one after
another a few seconds later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from engines.phantom.acquisition import Acquisition

#: Time from opening the study (patient registration) to the start of our series: localisers and a sagittal T2
#: usually come first on a lumbar-spine exam.
STUDY_TO_ACQUISITION_S = 14 * 60.0
#: Delay between the end of the acquisition and the first reconstructed image leaving the reconstructor.
RECONSTRUCTION_LATENCY_S = 4.0
#: Interval between consecutive images leaving the reconstructor (a 3D recon finishes all slices nearly at
#: once).
RECONSTRUCTION_INTERVAL_S = 0.015

#: Fixed clock for reproducible output: a weekday morning in 2026, shifted per seed so studies do not
#: coincide.
DETERMINISTIC_EPOCH = datetime(2026, 3, 2, 7, 30, 0)


@dataclass(frozen=True, slots=True)
class AcquisitionTimeline:
    """Study, acquisition and reconstruction instants of one simulated series."""

    study_start: datetime
    acquisition_start: datetime
    acquisition_duration_s: float
    reconstruction_start: datetime

    @classmethod
    def plan(cls, acquisition: Acquisition, *, study_start: datetime) -> AcquisitionTimeline:
        """Lay out the timeline of an acquisition whose study opened at ``study_start``."""
        duration = scan_duration_s(acquisition)
        acquisition_start = study_start + timedelta(seconds=STUDY_TO_ACQUISITION_S)
        return cls(
            study_start=study_start,
            acquisition_start=acquisition_start,
            acquisition_duration_s=duration,
            reconstruction_start=acquisition_start + timedelta(seconds=duration + RECONSTRUCTION_LATENCY_S),
        )

    @classmethod
    def ending_now(cls, acquisition: Acquisition) -> AcquisitionTimeline:
        """A timeline whose reconstruction starts now, as if the scanner had just finished acquiring."""
        now = datetime.now()
        now = now.replace(microsecond=(now.microsecond // 1000) * 1000)
        back = STUDY_TO_ACQUISITION_S + scan_duration_s(acquisition) + RECONSTRUCTION_LATENCY_S
        return cls.plan(acquisition, study_start=now - timedelta(seconds=back))

    @classmethod
    def for_seed(cls, acquisition: Acquisition, seed: int) -> AcquisitionTimeline:
        """A reproducible timeline: a seed-dependent weekday morning."""
        rng = np.random.default_rng([seed, 0xC10C])
        offset = timedelta(days=int(rng.integers(0, 250)), minutes=int(rng.integers(0, 9 * 60)))
        return cls.plan(acquisition, study_start=DETERMINISTIC_EPOCH + offset)

    def image_time(self, emission_index: int) -> datetime:
        """When the ``emission_index``-th image (0-based) left the reconstructor (its ContentTime)."""
        return self.reconstruction_start + timedelta(seconds=emission_index * RECONSTRUCTION_INTERVAL_S)


def scan_duration_s(acquisition: Acquisition) -> float:
    """TR × in-plane phase-encoding lines × partitions × averages: the duration of a Cartesian 3D GRE scan."""
    slices, rows, columns = acquisition.acquired_matrix
    in_plane_phase_lines = rows if acquisition.readout_axis == "row" else columns
    return (
        acquisition.repetition_time_ms * 1e-3 * in_plane_phase_lines * slices * acquisition.number_of_averages
    )


def dicom_date(moment: datetime) -> str:
    """DA: ``YYYYMMDD``."""
    return moment.strftime("%Y%m%d")


def dicom_time(moment: datetime) -> str:
    """TM with millisecond precision, as Siemens writes it (``HHMMSS.ffffff`` with trailing zeros)."""
    return moment.strftime("%H%M%S.") + f"{moment.microsecond // 1000:03d}000"


def dicom_datetime(moment: datetime) -> str:
    """DT: ``YYYYMMDDHHMMSS.ffffff`` (no UTC offset; consoles write local time)."""
    return dicom_date(moment) + dicom_time(moment)
