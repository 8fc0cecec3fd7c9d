"""``--set KEY=VALUE``: physics keys change the acquisition, other keywords become checked header overrides."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from scanner_support import dciodvfy, export_small, needs_dciodvfy, small_request

from engines.phantom.acquisition import SEED_PROTOCOL
from engines.scanner.common import DEFAULT_INVERSION_TIME_MS
from engines.scanner.deviations import SettingError, apply_settings, parse_setting
from engines.scanner.export import OutputFormat, SimulationRequest
from engines.scanner.readback import read_mr_series


def test_physics_keys_change_the_acquisition_before_simulation() -> None:
    acquisition = apply_settings(
        SEED_PROTOCOL,
        [
            "EchoTime2=4.8",
            "RepetitionTime=9",
            "FlipAngle=12",
            "PixelBandwidth=600",
            "MagneticFieldStrength=3",
        ],
    )
    assert acquisition.echo_times_ms == (2.1, 4.8)
    assert acquisition.repetition_time_ms == 9.0
    assert acquisition.flip_angle_deg == 12.0
    assert acquisition.pixel_bandwidth_hz == 600.0
    assert acquisition.field_strength_t == 3.0
    assert acquisition.header_overrides == ()


def test_other_keywords_become_typed_header_overrides() -> None:
    acquisition = apply_settings(
        SEED_PROTOCOL,
        ["MRAcquisitionType=2D", "ScanningSequence=GR\\IR", "EchoTrainLength=4", "SAR=0.5", "ScanOptions="],
    )
    assert dict(acquisition.header_overrides) == {
        "MRAcquisitionType": "2D",
        "ScanningSequence": ("GR", "IR"),
        "EchoTrainLength": 4,
        "SAR": "0.5",
        "ScanOptions": "",
    }


def test_a_later_setting_of_the_same_key_wins() -> None:
    acquisition = apply_settings(
        SEED_PROTOCOL, ["MRAcquisitionType=2D", "MRAcquisitionType=3D", "EchoTime1=2.0"]
    )
    assert dict(acquisition.header_overrides) == {"MRAcquisitionType": "3D"}
    assert acquisition.echo_times_ms == (2.0, 4.2)


@pytest.mark.parametrize(
    ("setting", "fragments"),
    [
        ("EchoTime2=abc", ["EchoTime2", "'abc'", "echo time in ms"]),
        ("EchoTime3=6.3", ["EchoTime3", "echo number from 1 to 2", "--echoes"]),
        ("EchoTime2=8", ["EchoTime2", "shorter than RepetitionTime"]),
        ("MagneticFieldStrength=7", ["MagneticFieldStrength", "not simulated"]),
        ("FlipAngle=-5", ["FlipAngle", "'-5'", "positive"]),
        ("EchoTimeX=2", ["EchoTimeX", "DICOM keyword"]),
        ("Foo=1", ["Foo", "DICOM keyword"]),
        ("MRAcquisitionType=4D", ["MRAcquisitionType", "2D, 3D"]),
        ("PixelSpacing=0.7", ["PixelSpacing", "VM 2"]),
        ("EchoNumbers=two", ["EchoNumbers", "integers"]),
        ("SOPInstanceUID=1.2.3", ["SOPInstanceUID", "does not derive"]),
        ("ReferencedImageSequence=x", ["ReferencedImageSequence", "VR"]),
        ("=3", ["KEY=VALUE"]),
        ("MRAcquisitionType", ["KEY=VALUE"]),
    ],
)
def test_bad_settings_name_the_attribute_the_value_and_the_expectation(
    setting: str, fragments: list[str]
) -> None:
    with pytest.raises(SettingError) as raised:
        apply_settings(SEED_PROTOCOL, [setting])
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message


def test_echo_count_applies_after_other_settings_and_before_echo_times() -> None:
    """A longer TR makes room for more echoes; EchoTime3 exists only once there are three."""
    assert SimulationRequest(
        seed=1, echoes=4, settings=("RepetitionTime=12",)
    ).acquisition().echo_times_ms == (
        2.1,
        4.2,
        6.3,
        8.4,
    )
    assert SimulationRequest(seed=1, echoes=3, settings=("EchoTime3=6.5",)).acquisition().echo_times_ms == (
        2.1,
        4.2,
        6.5,
    )
    assert SimulationRequest(seed=1, echoes=1).acquisition().echo_times_ms == (2.1,)
    with pytest.raises(ValueError, match=r"--echoes 4: .* at most 3 echoes"):
        SimulationRequest(seed=1, echoes=4).acquisition()


def test_parse_setting_keeps_equals_signs_in_values() -> None:
    setting = parse_setting("ImageComments=a=b")
    assert (setting.keyword, setting.text) == ("ImageComments", "a=b")


@needs_dciodvfy
@pytest.mark.parametrize("output_format", list(OutputFormat))
@pytest.mark.parametrize(
    "setting", ["MRAcquisitionType=2D", "ScanningSequence=GR\\IR", "ImageType=DERIVED\\PRIMARY\\DIXON\\WATER"]
)
def test_deviating_files_are_still_valid_objects(
    tmp_path: Path, output_format: OutputFormat, setting: str
) -> None:
    """A check must reject these for the deviation, not for a malformed header: dciodvfy finds no errors."""
    summary = export_small(tmp_path, small_request(settings=(setting,)), format=output_format)
    returncode, errors = dciodvfy(summary.paths[0])
    assert returncode == 0
    assert errors == []
    ds = pydicom.dcmread(summary.paths[0], stop_before_pixels=True)
    enhanced = output_format is OutputFormat.ENHANCED
    if setting.startswith("MRAcquisitionType"):
        assert read_mr_series(tmp_path).attributes.mr_acquisition_type == "2D"
    elif setting.startswith("ScanningSequence"):
        if enhanced:
            modifier = ds.SharedFunctionalGroupsSequence[0].MRModifierSequence[0]
            assert modifier.InversionRecovery == "YES"
            assert float(modifier.InversionTimes) == DEFAULT_INVERSION_TIME_MS
        else:
            assert list(ds.ScanningSequence) == ["GR", "IR"]
            assert float(ds.InversionTime) == DEFAULT_INVERSION_TIME_MS
    else:
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "DIXON", "WATER"]
        if enhanced:
            frame_type = ds.PerFrameFunctionalGroupsSequence[0].MRImageFrameTypeSequence[0].FrameType
            assert list(frame_type) == list(ds.ImageType)
