"""Protocol deviations requested as ``KEY=VALUE`` settings (``sct-agent simulate --set``).

A deviation that changes the physics (echo time, TR, flip angle, bandwidth, field) must change the pixels too,
or the simulator would produce headers that lie about the images and a validator test would pass for the wrong
reason. Those keys therefore change the :class:`Acquisition` before the phantom is simulated. Every other
DICOM keyword has no physics here and is written verbatim into the headers (``Acquisition.header_overrides``),
after checking that the keyword exists and the value is valid for its VR, so a typo fails loudly instead of
writing a file no scanner would.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.valuerep import validate_value

from engines.phantom.acquisition import Acquisition
from sct_core.errors import SctError

#: Physics keys other than the per-echo times, mapped onto Acquisition fields (all in the units DICOM uses).
PHYSICS_KEYS: dict[str, tuple[str, str]] = {
    "RepetitionTime": ("repetition_time_ms", "ms"),
    "FlipAngle": ("flip_angle_deg", "degrees"),
    "PixelBandwidth": ("pixel_bandwidth_hz", "Hz per pixel"),
    "MagneticFieldStrength": ("field_strength_t", "tesla"),
}
_ECHO_TIME_KEY = re.compile(r"^EchoTime([1-9][0-9]*)$")

#: Attributes the simulator derives from the image data or the file structure; overriding them would produce a
#: file that contradicts itself (wrong pixel count, duplicate UIDs), not a protocol deviation.
STRUCTURAL_KEYWORDS = frozenset(
    {
        "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
        "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID", "SpecificCharacterSet",
        "PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
        "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "InstanceNumber",
        "ImagePositionPatient", "SliceLocation", "EchoTime", "EffectiveEchoTime", "DimensionIndexValues",
        "StackID", "InStackPositionNumber",
    }
)  # fmt: skip

#: Enumerated values (PS3.3) of attributes a protocol check reads: a value outside them is not a deviation any
#: scanner writes but an invalid file, so it is refused. Defined terms (open lists) are not restricted.
ENUMERATED_VALUES: dict[str, frozenset[str]] = {
    "MRAcquisitionType": frozenset({"2D", "3D"}),
    "ScanningSequence": frozenset({"SE", "IR", "GR", "EP", "RM"}),
    "InPlanePhaseEncodingDirection": frozenset({"ROW", "COL", "COLUMN", "OTHER"}),
    "AngioFlag": frozenset({"Y", "N"}),
    "VariableFlipAngleFlag": frozenset({"Y", "N"}),
    "EchoPulseSequence": frozenset({"SPIN", "GRADIENT", "BOTH"}),
    "Spoiling": frozenset({"RF", "GRADIENT", "RF_AND_GRADIENT", "NONE"}),
    "ComplexImageComponent": frozenset({"MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "MIXED"}),
}

#: VRs whose values can be typed on a command line and checked by pydicom's validators.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
#: Text VRs whose backslash is a value separator (LT, ST, UT and UR hold a single value that may contain one).
_SINGLE_VALUE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})


class SettingError(SctError, ValueError):
    """A ``KEY=VALUE`` setting that cannot be applied; the message names attribute, value and expectation."""

    def __init__(self, attribute: str, found: str, expected: str) -> None:
        super().__init__(
            f"--set {attribute}: found {found!r}; expected {expected}",
            attribute=attribute,
            found=found,
            expected=expected,
        )


@dataclass(frozen=True, slots=True)
class Setting:
    """One parsed ``KEY=VALUE``."""

    keyword: str
    text: str


def is_echo_time_key(keyword: str) -> bool:
    """Whether a key sets one echo's time (``EchoTime1``, ``EchoTime2``, ...)."""
    return _ECHO_TIME_KEY.match(keyword) is not None


def parse_setting(text: str) -> Setting:
    """Split ``KEY=VALUE``; the key must be non-empty and the value may itself contain ``=``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingError(text or "(empty)", text, "KEY=VALUE with a DICOM keyword, e.g. EchoTime2=4.8")
    return Setting(keyword=key, text=value.strip())


def apply_settings(acquisition: Acquisition, settings: Iterable[str | Setting]) -> Acquisition:
    """The acquisition with every setting applied: physics keys change parameters, the rest become overrides.

    A later setting of the same key wins, as on a command line. The result is validated again, so an echo time
    beyond TR or an unsupported field strength is refused with the Acquisition's own message.
    """
    parsed = [s if isinstance(s, Setting) else parse_setting(s) for s in settings]
    echo_times = list(acquisition.echo_times_ms)
    changes: dict[str, Any] = {}
    overrides: dict[str, Any] = dict(acquisition.header_overrides)
    for setting in parsed:
        echo_match = _ECHO_TIME_KEY.match(setting.keyword)
        if echo_match:
            echo_number = int(echo_match.group(1))
            if echo_number > len(echo_times):
                raise SettingError(
                    setting.keyword,
                    setting.text,
                    f"an echo number from 1 to {len(echo_times)} (the acquisition has {len(echo_times)} "
                    "echoes; use --echoes to add more)",
                )
            echo_times[echo_number - 1] = _positive_number(setting, "a positive echo time in ms, e.g. 4.2")
        elif setting.keyword in PHYSICS_KEYS:
            field_name, unit = PHYSICS_KEYS[setting.keyword]
            changes[field_name] = _positive_number(setting, f"a positive number in {unit}")
        else:
            overrides[setting.keyword] = header_value(setting)
    try:
        return acquisition.with_changes(
            echo_times_ms=tuple(echo_times), header_overrides=tuple(overrides.items()), **changes
        )
    except ValueError as error:
        raise SettingError(
            ", ".join(s.keyword for s in parsed) or "(none)",
            " ".join(f"{s.keyword}={s.text}" for s in parsed),
            f"a consistent acquisition ({error})",
        ) from error


def _positive_number(setting: Setting, expected: str) -> float:
    try:
        value = float(setting.text)
    except ValueError:
        raise SettingError(setting.keyword, setting.text, expected) from None
    if not math.isfinite(value) or value <= 0:
        raise SettingError(setting.keyword, setting.text, expected)
    return value


def header_value(setting: Setting) -> Any:
    """The typed value a verbatim header override holds, checked against the keyword's VR and VM.

    Multi-valued attributes take DICOM's backslash separator (``ScanningSequence=GR\\IR``). An empty value
    writes an empty (zero-length) element, which is how a type-2 attribute is left blank.
    """
    tag = tag_for_keyword(setting.keyword)
    if tag is None:
        raise SettingError(
            setting.keyword,
            setting.text,
            "a DICOM keyword from the standard data dictionary (e.g. MRAcquisitionType, ScanningSequence) "
            f"or a physics key ({', '.join(['EchoTime1', 'EchoTime2', *PHYSICS_KEYS])})",
        )
    if setting.keyword in STRUCTURAL_KEYWORDS:
        raise SettingError(
            setting.keyword,
            setting.text,
            "an attribute the simulator does not derive from the images or the file structure",
        )
    vr = dictionary_VR(tag)
    if vr not in _TEXT_VRS | _INT_VRS | _FLOAT_VRS | {"DS"}:
        raise SettingError(
            setting.keyword, setting.text, f"a keyword whose VR can be set as text (this one is {vr})"
        )
    if setting.text == "":
        return ""
    parts = [setting.text] if vr in _SINGLE_VALUE_TEXT_VRS else setting.text.split("\\")
    _check_multiplicity(setting, dictionary_VM(tag), len(parts))
    allowed = ENUMERATED_VALUES.get(setting.keyword)
    if allowed is not None and not set(parts) <= allowed:
        raise SettingError(
            setting.keyword, setting.text, f"one of {', '.join(sorted(allowed))} (enumerated values)"
        )
    values: list[Any] = []
    for part in parts:
        values.append(_typed_component(setting, vr, part))
    return values[0] if len(values) == 1 else tuple(values)


def _typed_component(setting: Setting, vr: str, part: str) -> Any:
    """One value of an override: ints for integer VRs, floats for FL/FD, the text itself otherwise (DS keeps
    its digits as typed). pydicom's own validator for the VR then checks length, characters and range."""
    value: Any = part
    try:
        if vr in _INT_VRS:
            value = int(part)
        elif vr in _FLOAT_VRS or vr == "DS":
            value = float(part)
    except ValueError:
        kind = "integers" if vr in _INT_VRS else "numbers"
        raise SettingError(setting.keyword, setting.text, f"{kind} ({vr})") from None
    # pydicom validates decimal and integer strings as text, binary numbers as numbers.
    checked: Any = part if vr in ("DS", "IS") else value
    try:
        validate_value(vr, checked, pydicom_config.RAISE)
    except ValueError as error:
        raise SettingError(setting.keyword, setting.text, f"a valid {vr} value ({error})") from None
    return part if vr == "DS" else value


def _check_multiplicity(setting: Setting, vm: str, count: int) -> None:
    """Refuse more values than the dictionary allows (``1``, ``2``, ``1-n``, ``2-2n``, ``3-3n`` ...)."""
    low_text, _, high_text = vm.partition("-")
    low = int(low_text)
    if not high_text:
        allowed = count == low
    elif high_text.endswith("n"):
        step = int(high_text[:-1] or "1")
        allowed = count >= low and count % step == 0
    else:
        allowed = low <= count <= int(high_text)
    if not allowed:
        raise SettingError(setting.keyword, setting.text, f"{vm} value(s) separated by '\\' (VM {vm})")
