"""The reference CT of a case as a CT Image Storage series on the MR grid.

The phantom's CT is registered to the MR voxel for voxel, so it is exported on exactly the MR's grid (same
ImagePositionPatient, orientation and spacing per slice) and the same FrameOfReferenceUID: a viewer overlays
the two without registration and an evaluation compares them voxel by voxel. It is marked DERIVED/SECONDARY
and named as simulated in SeriesDescription and DerivationDescription so that nobody mistakes it for a patient
CT.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from engines.phantom.case import CT_HU_MAX, CT_HU_MIN, PhantomCase
from engines.scanner.clock import dicom_date, dicom_time
from engines.scanner.common import (
    SeriesContext,
    StudyContext,
    add_monochrome_pixels,
    add_patient_and_study,
    add_series,
    bits_stored_for,
    ds_number,
    new_dataset,
)
from engines.scanner.uids import UidSource

#: Stored value = HU - RescaleIntercept. -1024 maps the phantom's HU range onto 0..4095, the unsigned 12-bit
#: encoding most CT scanners use.
CT_RESCALE_INTERCEPT = -1024
#: The CT is notionally acquired this long after the MR series' reconstruction (its own slot in the schedule).
CT_AFTER_MR_S = 20 * 60.0
#: Soft-tissue and bone windows (centre, width) in HU, the two presets a spine CT opens with.
CT_WINDOWS = ((40.0, 400.0), (450.0, 1500.0))
CT_SERIES_DESCRIPTION = "SIMULATED reference CT (phantom) on MR grid"
CT_DERIVATION_DESCRIPTION = (
    "Simulated reference CT of the sct-edge-agent numerical phantom, registered voxel for voxel to the "
    "MR series; not a patient acquisition"
)
#: Interval between consecutive CT images leaving the reconstructor.
CT_RECONSTRUCTION_INTERVAL_S = 0.02


def ct_file_name(series_number: int, instance_number: int) -> str:
    """``CT.<SeriesNumber>.<InstanceNumber>.dcm``, the same naming as the MR export."""
    return f"CT.{series_number}.{instance_number}.dcm"


@dataclass(frozen=True, slots=True, eq=False)
class CtSeries:
    """The plan of the reference CT series; :meth:`dataset` builds one slice on demand."""

    case: PhantomCase
    study: StudyContext
    series: SeriesContext
    uids: UidSource
    bits_stored: int

    @classmethod
    def plan(cls, case: PhantomCase, study: StudyContext, series: SeriesContext, uids: UidSource) -> CtSeries:
        """Check the HU range once and choose the stored bit depth."""
        low, high = int(case.ct_hu.min()), int(case.ct_hu.max())
        if low < CT_HU_MIN or high > CT_HU_MAX:
            raise ValueError(f"CT values must lie in [{CT_HU_MIN}, {CT_HU_MAX}] HU; found [{low}, {high}]")
        stored_max = np.asarray([high - CT_RESCALE_INTERCEPT])
        return cls(case=case, study=study, series=series, uids=uids, bits_stored=bits_stored_for(stored_max))

    @property
    def acquisition_time(self) -> datetime:
        """When the reference CT was (notionally) acquired."""
        return self.study.timeline.reconstruction_start + timedelta(seconds=CT_AFTER_MR_S)

    def dataset(self, slice_index: int) -> Dataset:
        """The CT Image object of one slice; InstanceNumber is the 1-based slice index."""
        case = self.case
        geometry = case.geometry
        acquired = self.acquisition_time
        created = acquired + timedelta(seconds=slice_index * CT_RECONSTRUCTION_INTERVAL_S)
        sop_uid = self.uids.uid("ct-image", self.series.series_instance_uid, slice_index)
        ds = new_dataset(CTImageStorage, sop_uid, self.series.equipment, created)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        add_patient_and_study(ds, self.study)
        add_series(ds, self.study, self.series, "CT", acquired)
        ds.AcquisitionDate = dicom_date(acquired)
        ds.AcquisitionTime = dicom_time(acquired)
        ds.ContentDate = dicom_date(created)
        ds.ContentTime = dicom_time(created)
        ds.DerivationDescription = CT_DERIVATION_DESCRIPTION

        # CT Image module: a routine 120 kV spine protocol.
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = ds_number(
            max(s * n for s, n in zip(geometry.spacing[1:], geometry.shape[1:], strict=True))
        )
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "1000"
        ds.XRayTubeCurrent = 250
        ds.Exposure = 250
        ds.FilterType = "FLAT"
        ds.ConvolutionKernel = "I40f\\3"
        ds.SliceThickness = ds_number(geometry.spacing[0])

        ds.AcquisitionNumber = 1
        ds.InstanceNumber = slice_index + 1
        position = geometry.image_position_patient(slice_index)
        ds.ImagePositionPatient = [ds_number(v) for v in position]
        ds.ImageOrientationPatient = [ds_number(v) for v in geometry.image_orientation_patient]
        ds.SliceLocation = ds_number(float(np.dot(position, geometry.slice_direction)))
        ds.PixelSpacing = [ds_number(v) for v in geometry.pixel_spacing]

        stored = (case.ct_hu[slice_index].astype(np.int32) - CT_RESCALE_INTERCEPT).astype(np.uint16)
        add_monochrome_pixels(ds, stored, bits_stored=self.bits_stored)
        ds.RescaleIntercept = ds_number(CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = [ds_number(c) for c, _ in CT_WINDOWS]
        ds.WindowWidth = [ds_number(w) for _, w in CT_WINDOWS]
        ds.WindowCenterWidthExplanation = ["WINDOW1", "WINDOW2"]
        return ds

    def file_name(self, slice_index: int) -> str:
        """The exported file's name."""
        return ct_file_name(self.series.series_number, slice_index + 1)
