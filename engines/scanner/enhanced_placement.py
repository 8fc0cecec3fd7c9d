"""Where a verbatim header override goes in an Enhanced MR object.

A classic MR file keeps every attribute at the top level; the Enhanced IOD moves most acquisition attributes
into functional-group macros and renames some classic ones (ScanningSequence becomes EchoPulseSequence and
friends). A deviation such as ``RepetitionTime=20`` or ``ScanningSequence=SE`` is only meaningful if it lands
where a reader of Enhanced objects looks, so overrides are placed by these rules, in order:

1. Classic-only keywords with an Enhanced counterpart are translated (:data:`CLASSIC_TRANSLATIONS`).
2. A keyword the object already holds is replaced wherever it occurs: top level, shared functional groups and
   every per-frame item (so ``PixelBandwidth`` changes inside MRImagingModifierSequence).
3. A keyword the object does not hold yet goes into its macro's shared item (:data:`MACRO_HOMES`).
4. Anything else is written at the top level, as Philips writes ScanOptions.

Afterwards, attributes whose presence the IOD ties to a changed value follow it (:func:`_consistent`), as they
would on a scanner that really ran the deviating protocol: a 2D scan has no 3D k-space coverage, a DERIVED image
no MR Pulse Sequence module, an inversion-recovery scan an inversion time. The file stays a valid object and
a check rejects it for the deviation, not for a malformed header.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from engines.scanner.common import DEFAULT_INVERSION_TIME_MS

#: MR Pulse Sequence module attributes (PS3.3 C.8.13.4); the module is present only for ORIGINAL/MIXED images.
MR_PULSE_SEQUENCE_ATTRIBUTES = (
    "PulseSequenceName", "MRAcquisitionType", "EchoPulseSequence", "MultipleSpinEcho", "MultiPlanarExcitation",
    "PhaseContrast", "TimeOfFlightContrast", "SteadyStatePulseSequence", "EchoPlanarPulseSequence",
    "SaturationRecovery", "SpectrallySelectedSuppression", "OversamplingPhase", "GeometryOfKSpaceTraversal",
    "RectilinearPhaseEncodeReordering", "SegmentedKSpaceTraversal", "CoverageOfKSpace",
    "NumberOfKSpaceTrajectories",
)  # fmt: skip

#: Functional-group macro that holds an attribute the simulator does not write by default.
MACRO_HOMES: dict[str, str] = {
    "InversionTimes": "MRModifierSequence",
    "FlowCompensationDirection": "MRModifierSequence",
    "PartialFourierDirection": "MRModifierSequence",
    "ParallelReductionFactorInPlane": "MRModifierSequence",
    "ParallelAcquisitionTechnique": "MRModifierSequence",
    "ParallelReductionFactorOutOfPlane": "MRModifierSequence",
    "ParallelReductionFactorSecondInPlane": "MRModifierSequence",
    "VelocityEncodingDirection": "MRVelocityEncodingSequence",
    "DiffusionBValue": "MRDiffusionSequence",
    "DiffusionDirectionality": "MRDiffusionSequence",
    "ReceiveCoilType": "MRReceiveCoilSequence",
    "TransmitCoilType": "MRTransmitCoilSequence",
    "SpecificAbsorptionRateValue": "MRTimingAndRelatedParametersSequence",
}


def apply_enhanced_overrides(ds: Dataset, overrides: tuple[tuple[str, Any], ...]) -> None:
    """Write each override at the place the Enhanced MR IOD keeps that attribute (module docstring)."""
    for keyword, value in overrides:
        translate = CLASSIC_TRANSLATIONS.get(keyword)
        if translate is not None:
            translate(ds, value)
        else:
            place(ds, keyword, value)
    if overrides:
        _consistent(ds)


def _consistent(ds: Dataset) -> None:
    """Add or drop the conditional attributes whose condition an override changed (module docstring)."""
    image_type = ds.get("ImageType")
    if image_type is not None and len(image_type) > 0 and image_type[0] == "DERIVED":
        for keyword in MR_PULSE_SEQUENCE_ATTRIBUTES:
            if keyword in ds:
                delattr(ds, keyword)
    if ds.get("MRAcquisitionType", "3D") != "3D" and "CoverageOfKSpace" in ds:
        del ds.CoverageOfKSpace
    modifiers = [item for item in _macro_items(ds) if item.get("InversionRecovery") == "YES"]
    for item in modifiers:
        if "InversionTimes" not in item:
            item.InversionTimes = [DEFAULT_INVERSION_TIME_MS]


def place(ds: Dataset, keyword: str, value: Any) -> None:
    """Replace ``keyword`` everywhere the object holds it, else put it in its macro or at the top level."""
    stored = list(value) if isinstance(value, tuple) else value
    found = False
    if keyword in ds:
        setattr(ds, keyword, stored)
        found = True
    for item in _macro_items(ds):
        if keyword in item:
            setattr(item, keyword, stored)
            found = True
    if found:
        return
    home = MACRO_HOMES.get(keyword)
    if home is None:
        setattr(ds, keyword, stored)
        return
    shared = ds.SharedFunctionalGroupsSequence[0]
    if home not in shared:
        setattr(shared, home, DicomSequence([Dataset()]))
    setattr(getattr(shared, home)[0], keyword, stored)


def _macro_items(ds: Dataset) -> list[Dataset]:
    """Every item of every functional-group macro, shared and per frame."""
    items: list[Dataset] = []
    groups = list(ds.get("SharedFunctionalGroupsSequence", [])) + list(
        ds.get("PerFrameFunctionalGroupsSequence", [])
    )
    for group in groups:
        for element in group:
            if element.VR == "SQ":
                items.extend(element.value)
    return items


def _tokens(value: Any) -> set[str]:
    if isinstance(value, tuple | list):
        return {str(v) for v in value}
    return {token for token in str(value).split("\\") if token}


def _scanning_sequence(ds: Dataset, value: Any) -> None:
    """ScanningSequence: GR/SE decide EchoPulseSequence; IR and EP switch on their Enhanced flags.

    MultipleSpinEcho exists only for spin-echo pulse sequences (type 1C), so it follows EchoPulseSequence.
    """
    tokens = _tokens(value)
    if "GR" in tokens and "SE" in tokens:
        place(ds, "EchoPulseSequence", "BOTH")
    elif "SE" in tokens:
        place(ds, "EchoPulseSequence", "SPIN")
    elif "GR" in tokens:
        place(ds, "EchoPulseSequence", "GRADIENT")
    if ds.get("EchoPulseSequence") in ("SPIN", "BOTH"):
        echoes = {float(item.EffectiveEchoTime) for item in _macro_items(ds) if "EffectiveEchoTime" in item}
        place(ds, "MultipleSpinEcho", "YES" if len(echoes) > 1 else "NO")
    elif "MultipleSpinEcho" in ds:
        del ds.MultipleSpinEcho
    place(ds, "InversionRecovery", "YES" if "IR" in tokens else "NO")
    place(ds, "EchoPlanarPulseSequence", "YES" if "EP" in tokens else "NO")


def _sequence_variant(ds: Dataset, value: Any) -> None:
    """SequenceVariant: SP decides Spoiling, SS/TRSS the steady state, MTC/OSP/SK their own attributes."""
    tokens = _tokens(value)
    place(ds, "Spoiling", "RF" if "SP" in tokens else "NONE")
    if "TRSS" in tokens:
        place(ds, "SteadyStatePulseSequence", "TIME_REVERSED")
    elif "SS" in tokens:
        place(ds, "SteadyStatePulseSequence", "FREE_PRECESSION")
    place(ds, "MagnetizationTransfer", "OFF_RESONANCE" if "MTC" in tokens else "NONE")
    place(ds, "OversamplingPhase", "2D" if "OSP" in tokens else "NONE")
    place(ds, "SegmentedKSpaceTraversal", "PARTIAL" if "SK" in tokens else "SINGLE")


def _sequence_name(ds: Dataset, value: Any) -> None:
    place(ds, "PulseSequenceName", value)


def _imaging_frequency(ds: Dataset, value: Any) -> None:
    place(ds, "TransmitterFrequency", float(value))


def _image_type(ds: Dataset, value: Any) -> None:
    """ImageType also sets every frame's FrameType: the IOD requires the two to agree."""
    place(ds, "ImageType", value)
    place(ds, "FrameType", value)


#: Classic MR keywords the Enhanced IOD replaces with other attributes, and how each maps.
CLASSIC_TRANSLATIONS: dict[str, Callable[[Dataset, Any], None]] = {
    "ScanningSequence": _scanning_sequence,
    "SequenceVariant": _sequence_variant,
    "SequenceName": _sequence_name,
    "ImagingFrequency": _imaging_frequency,
    "ImageType": _image_type,
}
