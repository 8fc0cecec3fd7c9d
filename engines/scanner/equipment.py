"""The scanners the simulator impersonates.

Vendor and model select vendor-specific rules downstream (docs/vendors.md), so each output form claims the
vendor whose export style it copies: classic single-frame files are Siemens-like, the Enhanced multi-frame
object is Philips-like. The model follows the field strength because a validator cross-checks model, field and
Larmor frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.phantom.acquisition import Acquisition
from engines.scanner.identity import station_serial


@dataclass(frozen=True, slots=True)
class Equipment:
    """General and Enhanced General Equipment attributes of one device."""

    manufacturer: str
    model_name: str
    software_versions: tuple[str, ...]
    device_serial_number: str
    station_name: str
    #: (0002,0013) ImplementationVersionName as the vendor's export writes it (at most 16 characters).
    implementation_version_name: str


def siemens_mr(acquisition: Acquisition, seed: int) -> Equipment:
    """A Siemens MAGNETOM running syngo MR E11: Avanto fit at 1.5 T, Prisma fit at 3 T."""
    serial = station_serial(seed, "SIEMENS MR")
    model = "Avanto_fit" if acquisition.table_field_strength() < 2.0 else "Prisma_fit"
    return Equipment(
        manufacturer="SIEMENS",
        model_name=model,
        software_versions=("syngo MR E11",),
        device_serial_number=serial,
        station_name=f"MRC{serial}",
        implementation_version_name="MR_VE11E",
    )


def philips_mr(acquisition: Acquisition, seed: int) -> Equipment:
    """A Philips Ingenia (1.5 T) or Ingenia Elition X (3 T) on release 5.7."""
    serial = station_serial(seed, "Philips MR")
    model = "Ingenia" if acquisition.table_field_strength() < 2.0 else "Ingenia Elition X"
    return Equipment(
        manufacturer="Philips",
        model_name=model,
        software_versions=("5.7.1", "5.7.1.1"),
        device_serial_number=serial,
        station_name=f"MR{serial[-2:]}",
        implementation_version_name="Philips MR 57.0",
    )


def siemens_ct(seed: int) -> Equipment:
    """The CT that notionally acquired the reference: a Siemens SOMATOM Definition AS+."""
    serial = station_serial(seed, "SIEMENS CT")
    return Equipment(
        manufacturer="SIEMENS",
        model_name="SOMATOM Definition AS+",
        software_versions=("syngo CT VA48A",),
        device_serial_number=serial,
        station_name=f"CT{serial}",
        implementation_version_name="CT_VA48A",
    )
