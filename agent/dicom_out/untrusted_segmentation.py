"""The regions of an sCT the model says not to trust, as a DICOM Segmentation of the sCT CT series.

A navigation system that imports the sCT series must see, on the same images, where the sCT should not be used
for planning (an implant, a calcified lesion, motion: input unlike what the model was validated on). The agent's
confidence check (``engines.confidence``) finds those regions once on the whole volume; this module writes them as
one Segmentation instance (highdicom): BINARY, one segment "sCT not trusted", derived from the sCT images the
agent wrote (so it references them as source images, shares their study and frame of reference, and lies on
their grid voxel for voxel). Only flagged volumes get one: no region, no Segmentation.

Like the sCT series, the Segmentation says what it is wherever a person or a program looks: a SeriesDescription
and ContentDescription naming it as derived from synthetic CT, not for diagnosis; ImageComments naming the
model, its confidence method and threshold; and a ContributingEquipmentSequence naming the model as the
processing equipment. Its UIDs are derived from the volume (the same volume always makes the same Segmentation),
as the sCT's are.

Codes: the segment's property category is SCT 309825002 "Spatial and Relational Concept" (CID 7150) and its type
DCM 111207 "Image artifact(s)": the region is not an anatomical finding but a place where the image, the sCT,
cannot be relied on. The algorithm is AUTOMATIC, identified by the model's name and version (family DCM 123110
"Artificial Intelligence").
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from agent.records import FlagReport, SctVolume

#: The file the Segmentation is written to, beside the sCT's CT0001.dcm ... in the series folder.
SEGMENTATION_FILE: Final = "SEG0001.dcm"
SEGMENT_LABEL: Final = "sCT not trusted"
#: SeriesDescription (LO, at most 64 characters): what it is, and that it comes from synthetic data.
SERIES_DESCRIPTION: Final = "sCT NOT TRUSTED regions - SYNTHETIC CT - NOT FOR DIAGNOSIS"
#: ContentLabel is a CS: upper case, digits, space and underscore, at most 16 characters.
CONTENT_LABEL: Final = "SCT_UNTRUSTED"
#: The Segmentation's SeriesNumber is the sCT series' plus this (the sCT's is the MR's plus 1000 by default).
SERIES_NUMBER_OFFSET: Final = 1000
#: CIELab display colour of the segment: a saturated orange (the page's and the picture's outline colour).
DISPLAY_COLOUR_RGB: Final = (255, 140, 0)
_LO_MAX: Final = 64


def segmentation_of(
    volume: SctVolume,
    flagged: FlagReport,
    ct_images: Sequence[Dataset],
    *,
    series_uid: str,
    instance_uid: str,
    series_number: int,
    software_version: str,
    produced: datetime,
) -> Dataset:
    """The Segmentation of ``flagged.mask`` over ``ct_images`` (the sCT's datasets, slice order, pixel data not
    needed). Raises ``ValueError`` when there is nothing to segment or the mask does not fit the images."""
    if not flagged.regions:
        raise ValueError("flagged: no region, no Segmentation")
    if flagged.mask.shape != (len(ct_images), *volume.geometry.shape[1:]):
        raise ValueError(
            f"flagged mask: found {flagged.mask.shape}, expected {(len(ct_images), *volume.geometry.shape[1:])} "
            "(one frame per sCT image)"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=volume.model_id[:_LO_MAX],
        family=codes.DCM.ArtificialIntelligence,
        version=volume.model_version[:_LO_MAX],
        parameters={
            "confidence method": flagged.method,
            "threshold": str(flagged.threshold),
            "min_region_mm3": f"{flagged.min_region_mm3:g}",
        },
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
        segmented_property_type=codes.DCM.ImageArtifacts,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*DISPLAY_COLOUR_RGB),
    )
    seg = hd.seg.Segmentation(
        source_images=list(ct_images),
        pixel_array=np.ascontiguousarray(flagged.mask, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=str(ct_images[0].Manufacturer),
        manufacturer_model_name=str(ct_images[0].ManufacturerModelName),
        software_versions=software_version,
        device_serial_number=socket.gethostname()[:_LO_MAX] or "unknown",
        content_description=f"Regions of a synthetic CT not to trust ({flagged.count})"[:_LO_MAX],
        content_label=CONTENT_LABEL,
        omit_empty_frames=True,
        contributing_equipment=[
            hd.ContributingEquipment(
                manufacturer="sct-edge-agent",
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=volume.model_id[:_LO_MAX],
                software_versions=volume.model_version[:_LO_MAX],
                contribution_datetime=produced,
                contribution_description=(
                    f"Confidence of synthetic CT inference from MR (sct-edge-agent {software_version})"
                )[:_LO_MAX],
            )
        ],
    )
    seg.SeriesDescription = SERIES_DESCRIPTION
    seg.ImageComments = (
        f"Regions of the SYNTHETIC CT series {ct_images[0].SeriesNumber} (computed from MR by model "
        f"{volume.model_id} version {volume.model_version}) whose confidence ({flagged.method}) is below "
        f"the calibrated threshold {flagged.threshold} of 255: the input there is outside the conditions the "
        f"model was validated on. {flagged.count} region(s), {flagged.volume_ml:.1f} mL. NOT FOR DIAGNOSIS."
    )
    return seg
